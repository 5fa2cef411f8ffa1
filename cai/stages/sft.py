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
from losses import sft_loss, sft_loss_sum
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

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, V) at the positions that predict a labelled token, and their targets (B, K).

        Only positions whose next token is a target need logits: the LM head (often the largest matrix product of a
        small model) and the (B, T, V) logits tensor shrink to the K positions that any row of the batch needs.
        """
        labels = batch["labels"]  # (B, T)
        wanted = (labels[:, 1:] != IGNORE_INDEX).any(0)  # (T-1,) position t predicts token t + 1
        keep = wanted.nonzero().squeeze(1)  # (K,)
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (B, K, V)
        return logits, labels[:, keep + 1]  # (B, K, V), (B, K): targets aligned with their logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, targets = self(batch)  # (B, K, V), (B, K)
        loss_sum, count = sft_loss_sum(logits, targets, aligned=True)  # (), ()
        # Every target token of the global batch weighs the same, whichever rank holds it (a mean of per-rank means
        # would weigh a rank with few target tokens more): divide by the token count summed over ranks, and multiply
        # by the world size because data-parallel strategies average the ranks' gradients.
        world = self.trainer.world_size
        total = self.trainer.strategy.reduce(count.float(), reduce_op="sum") if world > 1 else count.float()
        loss = loss_sum * world / total.clamp(min=1)
        global_mean = self.trainer.strategy.reduce(loss_sum.detach().clone(), reduce_op="sum") / total.clamp(min=1)
        self.log("loss/train", global_mean, prog_bar=True)  # the same value on every rank: no sync needed
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, targets = self(batch)  # (B, K, V), (B, K)
        self.val_loss.update(sft_loss(logits, targets, aligned=True), weight=(targets != IGNORE_INDEX).sum())
        self.val_ppl.update(logits.float(), targets)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/perplexity", self.val_ppl)


def cli_main(args: list[str] | None = None):
    """``cai sft``: LightningCLI over ``SFTModule`` and ``SFTDataModule``."""
    return run_cli(SFTModule, SFTDataModule, args, "cai sft")
