"""Preference data: (prompt, chosen, rejected) with a soft label, for the preference model.

Accepted inputs: the output of ``cai label`` (``prompt``, ``chosen``, ``rejected``, ``p_chosen``: the probability that
``chosen`` is the better response), TRL's preference form (``prompt``/``chosen``/``rejected``, hard labels), or
hh-rlhf (``chosen``/``rejected`` full transcripts, no ``prompt`` column). Without ``p_chosen`` the label is 1.

Each pair becomes two texts, the conversation answered by each response, laid out by ``data.formats.PromptFormat``
exactly as SFT trains the policy and PPO rolls it out (chat template or the paper's transcript, end-of-turn included).
A batch carries the tokens both texts of a pair start with once, and the two continuations (``PreferenceCollator``),
so that the preference model can run the shared prefix once for the pair.
"""

from __future__ import annotations

import torch

from data.base import SplitDataModule, check_split_settings
from data.formats import PromptFormat, transcript_to_messages
from data.sources import load_any_dataset
from models import load_tokenizer
from models.errors import UserError
from models.padding import pad_rows


def pair_texts(example: dict, fmt: PromptFormat, source: str = "dataset", row: int | None = None) -> tuple[str, str]:
    """The two full texts (chosen, rejected) of one row, in the run's prompt format."""
    for col in ("chosen", "rejected"):
        if col not in example:
            raise UserError(f"{source}: no column {col!r}; columns are: {', '.join(example)}")
        if not isinstance(example[col], str):
            where = f"row {row}" if row is not None else f"row {example.get('id', '?')}"
            raise UserError(f"{source}: {where}: {col!r} must be a string, got {type(example[col]).__name__}")
    if example.get("prompt") is None:  # hh-rlhf: both columns are whole transcripts
        turns = [transcript_to_messages(example[c]) for c in ("chosen", "rejected")]
        if not fmt.is_chat or not all(len(t) > 1 and t[-1]["role"] == "assistant" for t in turns):
            return example["chosen"], example["rejected"]  # already in transcript form, or not a conversation
        return tuple(fmt.text(t[:-1], t[-1]["content"]) for t in turns)
    return fmt.text(example["prompt"], example["chosen"]), fmt.text(example["prompt"], example["rejected"])


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens that ``a`` and ``b`` start with in common, leaving at least one token of each after them."""
    n = 0
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        n += 1
    return n


def parse_p_chosen(raw, where: str) -> float:
    """A row's soft label ``p_chosen`` as a float in [0, 1], or a one-line ``UserError`` naming ``where``."""
    try:
        p = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{where}: p_chosen={raw!r} is not a number") from None
    if not 0.0 <= p <= 1.0:  # NaN fails this too
        raise UserError(f"{where}: p_chosen={raw!r} is not a probability in [0, 1]")
    return p


def tokenize_pair(
    example: dict,
    fmt: PromptFormat,
    max_length: int,
    hard_labels: bool,
    source: str = "dataset",
    row: int | None = None,
) -> dict:
    """Token ids of both texts, cut from the left to ``max_length`` (the reward is read at the end), and the label.

    When the longer text is too long, both are cut at the same token if the part cut away is common to both, so the
    two responses are judged in the same context and still share their prefix (``PreferenceCollator``); otherwise
    each keeps its last ``max_length`` tokens.
    """
    where = f"{source}: row {row if row is not None else example.get('id', '?')}"
    raw = example.get("p_chosen")
    if raw is not None and not hard_labels:
        parse_p_chosen(raw, where)
    chosen, rejected = pair_texts(example, fmt, source, row)
    tokenizer = fmt.tokenizer
    ids_c = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    ids_r = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    over = max(len(ids_c), len(ids_r)) - max_length
    if over > 0 and shared_prefix_length(ids_c, ids_r) >= over:
        ids_c, ids_r = ids_c[over:], ids_r[over:]
    elif over > 0:
        ids_c, ids_r = ids_c[-max_length:], ids_r[-max_length:]
    p = 1.0 if hard_labels or raw is None else float(raw)
    return {"chosen_ids": ids_c, "rejected_ids": ids_r, "p_chosen": p}


class PreferenceCollator:
    """One batch of B pairs, split into the prefix both texts of a pair share and the two continuations.

    Layout (what ``PreferenceModel.forward_pairs`` reads): ``prompt_ids``/``prompt_mask`` (B, P), left-padded;
    ``response_ids``/``response_mask`` (2B, R), right-padded, row 2i the rest of pair i's chosen text and row 2i + 1
    the rest of its rejected text; ``p_chosen``, B Python floats (``data.base.float_column``); ``width``, the length
    of the longest whole text (an int, so that a model running whole texts need not read it back from the device).
    The prefix is found on the token ids, so it is exact whatever the tokenizer does at the prompt/response boundary.
    A pair whose texts differ from the first token has an empty prompt row, and its continuations are the whole texts.

    Padding: the prompt block is as wide as the longest prefix and the response block as the longest continuation,
    which together can be wider than the longest text. So the prefix each pair contributes is capped at the length
    ``cap`` that makes the fewest token positions, B * P + 2B * R (``cap`` 0: whole texts, 2B * T), and a batch never
    costs more positions than its whole texts would.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def prefix_cap(lengths: list[tuple[int, int]], shared: list[int]) -> int:
        """The cap on each pair's prefix length with the fewest token positions (ties: the longer cap).

        Args:
            lengths: (chosen, rejected) token counts of each pair.
            shared: Tokens each pair's texts start with in common.
        """

        def positions(cap: int) -> int:
            cut = [min(n, cap) for n in shared]
            rest = max(max(c, r) - k for (c, r), k in zip(lengths, cut))
            return len(shared) * max(cut) + 2 * len(shared) * rest

        return min(sorted({0, *shared}, reverse=True), key=positions)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        shared = [shared_prefix_length(e["chosen_ids"], e["rejected_ids"]) for e in examples]
        cap = self.prefix_cap(lengths, shared)
        shared = [min(n, cap) for n in shared]
        prompts = [e["chosen_ids"][:n] for e, n in zip(examples, shared)]
        responses = [r for e, n in zip(examples, shared) for r in (e["chosen_ids"][n:], e["rejected_ids"][n:])]
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_token_id, "left")  # (B, P)
        response_ids, response_mask = pad_rows(responses, self.pad_token_id, "right")  # (2B, R)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "p_chosen": [float(e["p_chosen"]) for e in examples],  # (B,) Python floats: data.base.float_column
            "width": max(max(c, r) for c, r in lengths),
        }


def join_pairs(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole texts of a ``PreferenceCollator`` batch: ids and mask (2B, T), chosen rows then rejected, right-padded.

    For code that wants one row per text (and for comparing with other libraries' batches).
    """
    rows = []
    for half in (0, 1):  # chosen rows, then rejected rows
        for i in range(batch["prompt_ids"].shape[0]):
            pm, rm = batch["prompt_mask"][i].bool(), batch["response_mask"][2 * i + half].bool()
            rows.append(torch.cat([batch["prompt_ids"][i][pm], batch["response_ids"][2 * i + half][rm]]))
    return pad_rows(rows, pad_token_id, "right")  # (2B, T) each


class PreferenceDataModule(SplitDataModule):
    """Preference pairs for ``cai pm``.

    Args:
        train: ``cai label`` output (its ``pairs`` folder or JSONL), a JSONL/JSON/Parquet file, or a hub dataset.
        val: Validation data in the same forms; None to hold out ``val_fraction`` of ``train``.
        tokenizer: Tokenizer location (linked to the model's by ``cai pm``).
        hard_labels: Ignore ``p_chosen`` and train on hard labels (p = 1), for comparison with soft labels.
        max_length: Tokens per sequence at most (cut from the left).
        batch_size: Pairs per batch (each pair is two rows).
        val_fraction: Share of ``train`` held out when ``val`` is None.
        num_workers: DataLoader worker processes.
        seed: Seed of the hold-out split and shuffling.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``): how each conversation is laid out.
    """

    def __init__(
        self,
        train: str = "runs/tiny/label/pairs",
        val: str | None = None,
        tokenizer: str = "runs/tiny-llama",
        hard_labels: bool = False,
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        prompt_format: str = "auto",
    ):
        super().__init__()
        check_split_settings(max_length, batch_size, num_workers, val_fraction, prompt_format)
        self.save_hyperparameters()

    def prepare_split(self, path: str, train: bool):
        # Validation keeps the soft labels, so that soft- and hard-label runs are measured against the same thing.
        h = self.hparams
        fmt = PromptFormat(load_tokenizer(h.tokenizer, padding_side="right"), h.prompt_format)
        ds = load_any_dataset(path, what="data.train" if train or not h.val else "data.val")
        for col in ("chosen", "rejected"):
            if col not in ds.column_names:
                raise UserError(f"{path}: no column {col!r}; columns are: {', '.join(ds.column_names)}")
        hard = h.hard_labels and train
        return ds.map(
            lambda e, i: tokenize_pair(e, fmt, h.max_length, hard, path, i + 1),
            with_indices=True,
            remove_columns=ds.column_names,
            desc="tokenize",
        )

    def finish_train_split(self, ds):
        return ds.map(lambda e: {"p_chosen": 1.0}) if self.hparams.hard_labels else ds

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.pad_token_id)
