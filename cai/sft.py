"""The SFT stage: fine-tune on (prompt, final revision) pairs to get the SL-CAI model (Bai et al. 2022, sec. 3).

Run as ``cai sft fit --config configs/sft/tiny.yaml`` (a LightningCLI program: ``--print_config`` shows every
setting, and the config used is saved in the run's log folder).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from cai.training import HFModule, OptimConfig, run_cli
from data.sft import IGNORE_INDEX, SFTDataModule
from losses import sft_loss
from models import ModelConfig


class SFTModule(HFModule):
    """Supervised fine-tuning with the loss on response tokens only (``losses.sft.sft_loss``).

    Args:
        model: The network to fine-tune.
        optim: Optimizer and schedule.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        hf_out: Where the final model is saved in Hugging Face format; default ``<log_dir>/hf``.
    """

    def __init__(
        self,
        model: ModelConfig,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
    ):
        super().__init__(model, optim, gradient_checkpointing, hf_out)
        self.save_hyperparameters()
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, T, V) of a padded or packed batch."""
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)  # (B, T, V)
        loss = sft_loss(logits, batch["labels"])
        n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.log("loss/train", loss, prog_bar=True)
        self.log("train/response_tokens", n_tokens.float(), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        self.val_loss.update(sft_loss(logits, labels), weight=(labels[:, 1:] != IGNORE_INDEX).sum())
        self.val_ppl.update(logits[:, :-1].float(), labels[:, 1:])  # position t predicts token t + 1
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/perplexity", self.val_ppl)


def cli_main(args: list[str] | None = None):
    """``cai sft``: LightningCLI over ``SFTModule`` and ``SFTDataModule``."""
    return run_cli(SFTModule, SFTDataModule, args, "cai sft")
