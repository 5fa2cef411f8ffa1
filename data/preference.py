"""Preference data: (prompt, chosen, rejected) with a soft label, for the preference model.

Accepted inputs: the output of ``cai label`` (``prompt``, ``chosen``, ``rejected``, ``p_chosen``: the probability that
``chosen`` is the better response), TRL's preference form (``prompt``/``chosen``/``rejected``, hard labels), or
hh-rlhf (``chosen``/``rejected`` full transcripts, no ``prompt`` column). Without ``p_chosen`` the label is 1.

Each pair becomes two sequences, "\\n\\nHuman: prompt\\n\\nAssistant: response", that go through the network in
one forward pass: the chosen rows first, then the rejected rows.
"""

from __future__ import annotations

import torch

from data.base import SplitDataModule
from data.sft import load_any_dataset
from models import load_tokenizer


def transcript(prompt: str, response: str) -> str:
    """The text a preference model reads: "\n\nHuman: prompt\n\nAssistant: response"."""
    return f"\n\nHuman: {prompt.strip()}\n\nAssistant: {response.strip()}"


def pair_texts(example: dict, source: str = "dataset") -> tuple[str, str]:
    """The two full texts (chosen, rejected) of one row."""
    for col in ("chosen", "rejected"):
        if col not in example:
            raise ValueError(f"{source}: no column {col!r}; columns are: {', '.join(example)}")
    if example.get("prompt") is None:  # hh-rlhf: both columns are whole transcripts
        return example["chosen"], example["rejected"]
    return transcript(example["prompt"], example["chosen"]), transcript(example["prompt"], example["rejected"])


def tokenize_pair(example: dict, tokenizer, max_length: int, hard_labels: bool, source: str = "dataset") -> dict:
    """Token ids of both texts, cut from the left to ``max_length`` (the reward is read at the end), and the label."""
    chosen, rejected = pair_texts(example, source)
    ids_c = tokenizer(chosen, add_special_tokens=False)["input_ids"][-max_length:]
    ids_r = tokenizer(rejected, add_special_tokens=False)["input_ids"][-max_length:]
    p = example.get("p_chosen")
    p = 1.0 if hard_labels or p is None else float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{source}: row {example.get('id', '?')}: p_chosen={p} is not a probability")
    return {"chosen_ids": ids_c, "rejected_ids": ids_r, "p_chosen": p}


class PreferenceCollator:
    """Stack chosen then rejected rows into one right-padded batch (2B, T), with the labels (B,)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id)  # (2B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        p = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "p_chosen": p}


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
    ):
        super().__init__()
        self.save_hyperparameters()

    def prepare_split(self, path: str, train: bool):
        # Validation keeps the soft labels, so that soft- and hard-label runs are measured against the same thing.
        h = self.hparams
        tok = load_tokenizer(h.tokenizer, padding_side="right")
        ds = load_any_dataset(path)
        hard = h.hard_labels and train
        return ds.map(
            lambda e: tokenize_pair(e, tok, h.max_length, hard, path), remove_columns=ds.column_names, desc="tokenize"
        )

    def finish_train_split(self, ds):
        return ds.map(lambda e: {"p_chosen": 1.0}) if self.hparams.hard_labels else ds

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.pad_token_id)
