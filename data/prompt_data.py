"""Prompts for PPO rollouts: a DataModule that yields batches of prompt strings.

Prompts longer than ``max_prompt_tokens`` (after formatting) are skipped and counted at setup rather than cut: a cut
prompt could lose the request the policy is asked to answer. Empty prompts are skipped by ``data.prompts``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from data.base import check_loader_settings, resumable_loader
from data.formats import PromptFormat
from data.prompts import load_prompts_with_stats
from models import load_tokenizer
from models.errors import UserError, check_positive


def collate_prompts(rows: list[dict]) -> dict[str, list]:
    """Rows {id, prompt} -> {"id": [...], "prompt": [...]}."""
    return {"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows]}


class PromptDataModule(L.LightningDataModule):
    """Batches of ``{"id": [...], "prompt": [...]}`` for ``cai ppo``.

    Args:
        prompts: A built-in set name (red_team, helpful), a JSONL/JSON/Parquet/CSV file, a datasets folder, or a
            hub dataset (``owner/name[/data_dir]``).
        prompt_column: Column with the prompt (string, chat messages or hh-rlhf transcript).
        tokenizer: Tokenizer location (linked to the policy's by ``cai ppo``).
        batch_size: Prompts per rollout on each device.
        max_prompt_tokens: Skip (and count) prompts longer than this many tokens once laid out in ``prompt_format``.
        max_prompts: Use at most this many prompts.
        hold_out_last: Leave out the last N prompts (``cai eval`` takes its held-out prompts from the end).
        num_workers: DataLoader worker processes.
        seed: Seed of the prompt order (``data.base.resumable_loader``: a resumed run continues it).
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``; linked to the policy's by ``cai ppo``).
    """

    def __init__(
        self,
        prompts: str = "red_team",
        prompt_column: str = "prompt",
        tokenizer: str = "runs/tiny-llama",
        batch_size: int = 8,
        max_prompt_tokens: int = 256,
        max_prompts: int | None = None,
        hold_out_last: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        prompt_format: str = "auto",
    ):
        super().__init__()
        check_loader_settings(batch_size, num_workers, prompt_format)
        check_positive(max_prompt_tokens, "data.max_prompt_tokens")
        check_positive(max_prompts, "data.max_prompts", allow_none=True)
        if hold_out_last < 0:
            raise UserError(f"data.hold_out_last={hold_out_last}: must be 0 or more")
        self.save_hyperparameters()
        self.skipped_too_long = 0

    def setup(self, stage: str) -> None:
        if hasattr(self, "train_set"):
            return
        h = self.hparams
        fmt = PromptFormat(load_tokenizer(h.tokenizer), h.prompt_format)
        # Prompts over data.prompts.HARD_MAX_CHARS characters are skipped unread, so tokenizing below is bounded.
        ds, stats = load_prompts_with_stats(h.prompts, prompt_column=h.prompt_column)
        ds = ds.select(range(max(0, len(ds) - h.hold_out_last)))
        ds = ds.select(range(min(len(ds), h.max_prompts or len(ds))))
        texts = [fmt.prompt(p) for p in ds["prompt"]]
        lengths = [len(x) for x in fmt.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        keep = [i for i, n in enumerate(lengths) if n <= h.max_prompt_tokens]
        self.skipped_too_long = len(ds) - len(keep) + stats.skipped_too_long
        self.skipped_empty = stats.skipped_empty
        self.train_set = ds.select(keep)
        if not len(self.train_set):
            raise UserError(f"{h.prompts}: no prompt fits max_prompt_tokens={h.max_prompt_tokens}")
        rank_zero_info(
            f"ppo prompts: {len(keep)} used, {self.skipped_too_long} longer than {h.max_prompt_tokens} "
            f"tokens and {stats.skipped_empty} empty skipped"
        )

    def train_dataloader(self):
        h = self.hparams
        ds = self.train_set.select_columns(["id", "prompt"])
        # drop_last: every rank and step sees a full batch: fixed shapes, equal work across ranks
        return resumable_loader(self, ds, h.batch_size, True, h.seed, h.num_workers, collate_prompts, drop_last=True)
