"""Supervised fine-tuning data: tokenized (prompt, response) pairs with the loss on response tokens only.

Accepted inputs: the ``sft/`` split written by ``cai sl-data``, or any dataset (a ``datasets`` directory, JSONL, JSON
or Parquet file) with a chat ``messages`` column (the last assistant turn is the target) or ``prompt`` /
``completion`` columns. Labels follow Hugging Face's convention: aligned with ``input_ids``, ``-100`` on prompt
tokens and padding (``losses.sft.sft_loss`` shifts them).

Two batching modes:

* padded: rows padded on the right to the longest row of the batch;
* packed (``packing=True``): several examples laid end to end in one row with ``position_ids`` restarting at 0 for
  each, and no attention mask. transformers detects the restarts and builds a block-diagonal causal mask (sdpa,
  eager, flash-attention), so examples never attend to each other and no compute goes to padding.
"""

from __future__ import annotations

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_warn

from data.base import SplitDataModule, check_split_settings
from data.formats import PromptFormat
from data.sources import load_any_dataset
from models import load_tokenizer
from models.errors import UserError
from models.padding import pad_rows

IGNORE_INDEX = -100


def tokenize_example(
    example: dict, fmt: PromptFormat, max_length: int, source: str = "dataset", row: int | None = None
) -> dict:
    """Tokenize one example into ``input_ids`` and ``labels`` (prompt tokens masked with -100).

    ``messages``: the conversation up to the last assistant turn is the prompt, that turn the target. ``prompt`` /
    ``completion``: a one-turn conversation. Both are laid out by ``fmt`` (``data.formats``), so the prompt is the
    text every other stage shows the model, and the target ends with the format's end-of-turn, which teaches the
    model to stop. Rows longer than ``max_length`` keep their first ``max_length`` tokens. ``row`` (1-based) names
    the row in error messages.
    """
    where = f"{source}: row {row if row is not None else example.get('id', '?')}"
    if example.get("messages"):
        msgs = example["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise UserError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's")
        prompt_text, completion_text = fmt.dialogue(msgs[:-1], msgs[-1]["content"])
    elif "prompt" in example and "completion" in example:
        for key in ("prompt", "completion"):
            if not isinstance(example[key], str):
                raise UserError(f"{where}: {key!r} must be a string, got {type(example[key]).__name__}")
        prompt_text, completion_text = fmt.dialogue(example["prompt"], example["completion"])
    else:
        columns = ", ".join(example)
        raise UserError(f"{source}: needs a 'messages' column or 'prompt' and 'completion' columns; columns: {columns}")
    tokenizer = fmt.tokenizer
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


class SFTCollator:
    """Turn tokenized examples into a batch, padded (right) or packed.

    Args:
        pad_token_id: Id used for padding ``input_ids``.
        packing: Lay examples end to end in one row with restarting ``position_ids`` instead of padding.
    """

    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            ids = [t for e in examples for t in e["input_ids"]]
            labels = []
            for e in examples:  # the first token of each example has no predecessor in it: never a target
                labels += [IGNORE_INDEX] + e["labels"][1:]
            pos = [p for e in examples for p in range(len(e["input_ids"]))]
            return {
                "input_ids": torch.tensor([ids]),
                "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]),
            }  # each (1, sum of lengths)
        ids, mask = pad_rows([e["input_ids"] for e in examples], self.pad_token_id)  # (B, T) each
        labels, _ = pad_rows([e["labels"] for e in examples], IGNORE_INDEX)  # (B, T)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class SFTDataModule(SplitDataModule):
    """Tokenized SFT data for ``cai sft``.

    Args:
        train: Training data: the ``sft/`` folder of ``cai sl-data``, a JSONL/JSON/Parquet file, or a hub dataset.
        val: Validation data in the same forms; None to hold out ``val_fraction`` of ``train``.
        tokenizer: Tokenizer location (linked to the model's ``name_or_path`` by ``cai sft``).
        max_length: Tokens per example at most (longer ones are cut, and counted).
        batch_size: Examples per batch (per device). With packing, the examples of a batch share one row.
        packing: Pack examples into one row per batch instead of padding.
        val_fraction: Share of ``train`` held out for validation when ``val`` is None.
        num_workers: DataLoader worker processes.
        seed: Seed of the hold-out split and of shuffling.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``); ``auto`` is the chat template when the
            tokenizer has one. Must match what the other stages use (``cai pipeline`` sets it for all).
    """

    def __init__(
        self,
        train: str = "runs/tiny/sl_data/sft",
        val: str | None = None,
        tokenizer: str = "runs/tiny-llama",
        max_length: int = 512,
        batch_size: int = 8,
        packing: bool = False,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        prompt_format: str = "auto",
    ):
        super().__init__()
        check_split_settings(max_length, batch_size, num_workers, val_fraction, prompt_format)
        self.save_hyperparameters()

    def prepare_split(self, path: str, train: bool) -> datasets.Dataset:
        fmt = PromptFormat(load_tokenizer(self.hparams.tokenizer, padding_side="right"), self.hparams.prompt_format)
        ds = load_any_dataset(path, what="data.train" if train or not self.hparams.val else "data.val")
        columns = set(ds.column_names)
        if "messages" not in columns and not {"prompt", "completion"} <= columns:
            raise UserError(
                f"{path}: needs a 'messages' column or 'prompt' and 'completion' columns; "
                f"columns are: {', '.join(ds.column_names)}"
            )
        out = ds.map(
            lambda e, i: tokenize_example(e, fmt, self.hparams.max_length + 1, path, i + 1),
            with_indices=True,
            remove_columns=ds.column_names,
            desc="tokenize",
        )
        # Tokenizing one token past max_length tells which rows were cut, without a second pass.
        n_cut = sum(len(x) > self.hparams.max_length for x in out["input_ids"])
        if n_cut:
            rank_zero_warn(f"{path}: {n_cut} of {len(out)} examples are longer than max_length and were cut")
        return out.map(lambda e: {k: v[: self.hparams.max_length] for k, v in e.items()})

    def collator(self) -> SFTCollator:
        return SFTCollator(self.pad_token_id, self.hparams.packing)
