"""Preference pairs for DPO, with the reference model's log-probabilities computed once and cached beside the data.

A row holds the prompt and both responses as separate token lists, the soft label, and the reference model's
sequence log-probabilities of both responses.

Accepted inputs: the ``pairs/`` folder (or ``records.jsonl``) written by ``cai label`` (``prompt``, ``chosen``,
``rejected``, ``p_chosen``, or ``response_a``/``response_b``/``p_a``), TRL's preference form (``prompt``/``chosen``/
``rejected``, hard labels), or hh-rlhf (``chosen``/``rejected`` whole transcripts). Without a label the label is 1.

Each response is laid out by ``data.formats.PromptFormat.dialogue`` and tokenized apart from the prompt, exactly as
SFT tokenizes (prompt, completion), so DPO scores the tokens the SL-CAI policy was trained to write (end-of-turn
included). A row is TRL's tokenized preference row (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) plus
``p_chosen`` and, once ``DPODataModule.add_reference_logps`` has run, ``ref_chosen_logps``/``ref_rejected_logps``.

Reference cache: the log-probabilities depend only on the reference weights, the precision they run in and the
token ids, so they are stored in ``<data>.ref_logps/<sha256>.json`` keyed by a hash of exactly those; a resumed or a
second run with the same reference and data reads them instead of running the reference again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data.base import SplitDataModule, check_split_settings
from data.formats import PromptFormat, transcript_to_messages
from data.preference import parse_p_chosen
from data.sources import load_any_dataset
from models.errors import UserError, check_positive
from models.padding import pad_rows

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
CACHE_VERSION = 1
"""Bumped when the way reference log-probabilities are computed changes (old cache files are then ignored)."""


def pair_parts(example: dict, where: str) -> tuple[str | list[dict], str, str, float | None]:
    """(prompt, chosen, rejected, p_chosen or None) of one row in any accepted form; a bad row is a ``UserError``."""
    if "chosen" not in example and "response_a" in example:  # cai label's records.jsonl without the TRL columns
        p_a = example.get("p_a")
        flip = isinstance(p_a, (int, float)) and p_a < 0.5  # chosen: the response the label favours
        a, b = ("response_b", "response_a") if flip else ("response_a", "response_b")
        p = 1.0 - p_a if flip else p_a
        example = {"prompt": example.get("prompt"), "chosen": example.get(a), "rejected": example.get(b), "p": p}
    else:
        example = {**example, "p": example.get("p_chosen")}
    for col in ("chosen", "rejected"):
        if not isinstance(example.get(col), str):
            got = "nothing" if example.get(col) is None else type(example[col]).__name__
            raise UserError(f"{where}: {col!r} must be a string, got {got}")
    raw = example["p"]
    if raw is not None:
        raw = parse_p_chosen(raw, where)
    prompt = example.get("prompt")
    if prompt is None:  # hh-rlhf: both columns are whole transcripts that share every turn but the last
        turns = [transcript_to_messages(example[c]) for c in ("chosen", "rejected")]
        if not all(len(t) > 1 and t[-1]["role"] == "assistant" for t in turns) or turns[0][:-1] != turns[1][:-1]:
            raise UserError(f"{where}: no 'prompt', and 'chosen'/'rejected' are not transcripts with a common prompt")
        return turns[0][:-1], turns[0][-1]["content"], turns[1][-1]["content"], raw
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
    )
    if not ok:
        raise UserError(f"{where}: 'prompt' must be a string or a list of {{'role', 'content'}} messages")
    return prompt, example["chosen"], example["rejected"], raw


def tokenize_dpo_pair(
    example: dict, fmt: PromptFormat, max_length: int, max_prompt_length: int, source: str = "dataset", row: int = 0
) -> dict:
    """Token ids of the prompt and of both completions, and the label (1 when the row has none).

    A pair longer than ``max_length`` (prompt + its longer response) keeps the last ``max_prompt_length`` prompt
    tokens at most and the first tokens of each response (TRL's ``keep_start`` for completions); the prompt then
    keeps its last tokens that still fit. ``cut`` says whether anything was cut.
    """
    where = f"{source}: row {row}"
    prompt, chosen, rejected, p = pair_parts(example, where)
    try:
        prompt_text, completion_c = fmt.dialogue(prompt, chosen)
        completion_r = fmt.dialogue(prompt, rejected)[1]
    except (ValueError, KeyError, TypeError) as err:  # a chat template refusing the messages
        raise UserError(f"{where}: cannot lay out the conversation ({err})") from None
    tok = fmt.tokenizer
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    chosen_ids = tok(completion_c, add_special_tokens=False)["input_ids"]
    rejected_ids = tok(completion_r, add_special_tokens=False)["input_ids"]
    if not prompt_ids or not chosen_ids or not rejected_ids:
        raise UserError(f"{where}: the prompt or a response has no tokens")
    longest = max(len(chosen_ids), len(rejected_ids))
    cut = len(prompt_ids) + longest > max_length
    if cut:
        budget = max_length - min(len(prompt_ids), max_prompt_length)  # tokens left for a response
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        prompt_ids = prompt_ids[-(max_length - max(len(chosen_ids), len(rejected_ids))) :]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "p_chosen": 1.0 if p is None else p,
        "cut": cut,
    }


class DPOCollator:
    """A batch of B pairs: each prompt once, and both responses after it.

    Layout (what ``models.sequence_logprobs.pair_logprobs`` reads): ``prompt_ids``/``prompt_mask`` (B, P),
    left-padded; ``response_ids``/``response_mask`` (2B, R), right-padded, row 2i pair i's chosen response and row
    2i + 1 its rejected one; ``p_chosen`` (B,); ``ref_chosen_logps``/``ref_rejected_logps`` (B,) when the rows have
    them, all three Python floats (``data.base.float_column``); ``width`` (an int), the longest prompt + response.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        responses = [r for e in examples for r in (e["chosen_ids"], e["rejected_ids"])]
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_token_id, "left")  # (B, P)
        response_ids, response_mask = pad_rows(responses, self.pad_token_id, "right")  # (2B, R)
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "p_chosen": [float(e["p_chosen"]) for e in examples],  # (B,) Python floats: data.base.float_column
            "width": max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples),
        }
        for col in REF_COLUMNS:
            if col in examples[0]:
                batch[col] = [float(e[col]) for e in examples]  # (B,) Python floats, never rounded to bf16
        return batch


def token_fingerprint(ds: datasets.Dataset, reference: dict) -> str:
    """SHA-256 of the reference's identity (weights, precision) and every row's token ids, in order."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "reference": reference}, sort_keys=True).encode())
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(json.dumps(list(ds[col]), separators=(",", ":")).encode())
    return h.hexdigest()


class DPODataModule(SplitDataModule):
    """Preference pairs for ``cai dpo``, with the reference log-probabilities of both responses.

    Args:
        train: ``cai label`` output (its ``pairs`` folder or ``records.jsonl``), a JSONL/JSON/Parquet file, or a hub
            dataset.
        val: Validation data in the same forms; None to hold out ``val_fraction`` of ``train``.
        tokenizer: Tokenizer location (linked to the model's by ``cai dpo``).
        max_length: Tokens of prompt + longer response at most (responses keep their start, prompts their end).
        max_prompt_length: Prompt tokens kept at most when a pair is longer than ``max_length``.
        batch_size: Pairs per batch (each pair is a prompt and two responses).
        val_fraction: Share of ``train`` held out when ``val`` is None.
        num_workers: DataLoader worker processes.
        seed: Seed of the hold-out split and shuffling.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``): the format SFT trained the policy in.
        ref_cache: Folder of the cached reference log-probabilities; None: ``<data>.ref_logps`` beside each split's
            data (beside ``trainer.default_root_dir`` for a hub dataset); ``off``: compute them on every run.
    """

    def __init__(
        self,
        train: str = "runs/tiny/label/pairs",
        val: str | None = None,
        tokenizer: str = "runs/tiny-llama",
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        prompt_format: str = "auto",
        ref_cache: str | None = None,
    ):
        super().__init__()
        check_split_settings(max_length, batch_size, num_workers, val_fraction, prompt_format)
        check_positive(max_prompt_length, "data.max_prompt_length")
        if max_prompt_length >= max_length:
            raise UserError(f"data.max_prompt_length={max_prompt_length}: must be below data.max_length={max_length}")
        self.save_hyperparameters()
        self.reference_source: dict[str, str] = {}
        """How each split's reference log-probabilities were obtained: ``computed`` or ``cache`` (for tests/logs)."""

    def prepare_split(self, path: str, train: bool) -> datasets.Dataset:
        from models import load_tokenizer

        h = self.hparams
        fmt = PromptFormat(load_tokenizer(h.tokenizer, padding_side="right"), h.prompt_format)
        ds = load_any_dataset(path, what="data.train" if train or not h.val else "data.val")
        out = ds.map(
            lambda e, i: tokenize_dpo_pair(e, fmt, h.max_length, h.max_prompt_length, path, i + 1),
            with_indices=True,
            remove_columns=ds.column_names,
            desc="tokenize",
        )
        n_cut = sum(out["cut"])
        if n_cut:
            rank_zero_warn(f"{path}: {n_cut} of {len(out)} pairs are longer than data.max_length and were cut")
        return out.remove_columns("cut")

    def collator(self) -> DPOCollator:
        return DPOCollator(self.pad_token_id)

    def cache_dir(self, split: str, root: str | None = None) -> Path | None:
        """Folder of the cached reference log-probabilities of ``split`` (``train_set``/``val_set``); None: off."""
        h = self.hparams
        if h.ref_cache == "off":
            return None
        if h.ref_cache:
            return Path(h.ref_cache)
        source = Path(h.val if split == "val_set" and h.val else h.train)
        if source.exists():
            return source.with_name(source.name + ".ref_logps")
        return Path(root or ".") / "ref_logps"  # a hub dataset

    def add_reference_logps(
        self,
        compute: Callable[[datasets.Dataset], list[tuple[float, float]]],
        reference: dict,
        strategy=None,
        root: str | None = None,
    ) -> None:
        """Give every row of both splits its reference log-probabilities, from the cache or by ``compute``.

        Distributed runs (``strategy`` with several processes): rank 0 looks in the cache and tells the others; when
        the values are not there, each rank computes every ``world``-th row, the ranks exchange their shares, and
        rank 0 writes the cache. Every rank ends with the same values, whatever the filesystem shares.

        Args:
            compute: (chosen, rejected) reference log-probs of each row of a dataset, in order.
            reference: JSON-able identity of the reference weights and precision (part of the cache key).
            strategy: The trainer's strategy (``broadcast``, ``barrier``, ``global_rank``, ``world_size``); None for one
                process.
            root: Folder for the cache of data without a local path (``trainer.default_root_dir``).
        """
        done: dict[int, datasets.Dataset] = {}
        by_key: dict[str, list[tuple[float, float]]] = {}  # a split with the same token ids (val = train) runs once
        for name in ("train_set", "val_set"):
            ds = getattr(self, name)
            if id(ds) in done or all(c in ds.column_names for c in REF_COLUMNS):
                setattr(self, name, done.get(id(ds), ds))
                continue
            key = token_fingerprint(ds, reference)
            if key in by_key:
                values = by_key[key]
                self.reference_source[name] = self.reference_source["train_set"]
            else:
                values = by_key[key] = self._reference_values(ds, key, compute, reference, strategy, root, name)
            ds = ds.add_column(REF_COLUMNS[0], [c for c, _ in values]).add_column(
                REF_COLUMNS[1], [r for _, r in values]
            )
            done[id(getattr(self, name))] = ds
            setattr(self, name, ds)

    def _reference_values(self, ds, key, compute, reference, strategy, root, name) -> list[tuple[float, float]]:
        world = strategy.world_size if strategy is not None else 1
        rank = strategy.global_rank if strategy is not None else 0
        folder = self.cache_dir(name, root)
        path = folder / f"{key}.json" if folder is not None else None
        cached = None
        if rank == 0 and path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                cached = [tuple(v) for v in data["logps"]] if len(data["logps"]) == len(ds) else None
            except (OSError, ValueError, KeyError, TypeError):
                cached = None  # a damaged file is computed again and replaced
        if world > 1:
            cached = strategy.broadcast(cached, src=0)
        if cached is not None:
            self.reference_source[name] = "cache"
            rank_zero_info(f"dpo: reference log-probs of {len(ds)} {name} pairs read from {path}")
            return cached
        mine = compute(ds.select(range(rank, len(ds), world)))  # rows rank, rank + world, ...
        if world > 1:
            shares: list = [None] * world
            torch.distributed.all_gather_object(shares, mine)
            values = [shares[i % world][i // world] for i in range(len(ds))]
        else:
            values = mine
        self.reference_source[name] = "computed"
        if rank == 0 and path is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"reference": reference, "rows": len(ds), "logps": values}) + "\n")
                os.replace(tmp, path)
                rank_zero_info(f"dpo: reference log-probs of {len(ds)} {name} pairs computed and cached in {path}")
            except OSError as err:
                rank_zero_warn(f"dpo: cannot cache the reference log-probs in {folder} ({err}); set data.ref_cache")
        if strategy is not None and world > 1:
            strategy.barrier("dpo_reference_cache")
        return values
