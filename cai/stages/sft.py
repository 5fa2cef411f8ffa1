"""The SFT stage: fine-tune on (prompt, final revision) pairs to get the SL-CAI model (Bai et al. 2022, sec. 3).

Run as ``cai sft fit --config configs/sft/tiny.yaml`` (a LightningCLI program: ``--print_config`` shows every
setting, and the config used is saved in the run's log folder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from cai.training import HFModule, OptimConfig, run_cli
from data.sft import IGNORE_INDEX, SFTDataModule
from losses import sft_loss
from losses.sft import chunked_sft_loss_sum
from models import ModelConfig
from models.errors import UserError


class SFTModule(HFModule):
    """Supervised fine-tuning with the loss on response tokens only (``losses.sft.sft_loss``).

    Args:
        model: The network to fine-tune.
        optim: Optimizer and schedule.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        hf_out: Where the final model is saved in Hugging Face format; default ``<log_dir>/hf``.
        loss_chunk_size: Target tokens whose logits the training loss computes at a time (``chunked_sft_loss_sum``):
            it holds a few ``(loss_chunk_size, vocabulary)`` float32 tensors at once (logits, log-softmax, gradient),
            and its backward runs the head again. ``null``: all of them at once, kept for the backward, as TRL does
            (more memory, no second head pass).
    """

    def __init__(
        self,
        model: ModelConfig,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
        loss_chunk_size: int | None = 128,
    ):
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"model.loss_chunk_size: must be at least 1 (or null: no chunks), got {loss_chunk_size}")
        super().__init__(model, optim, gradient_checkpointing, hf_out)
        self.loss_chunk_size = loss_chunk_size
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

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss of the batch's target tokens and their count, without their (N, V) logits at once.

        A forward pre-hook on the network's head takes the final hidden states of the N positions that predict a
        target and lets the head run on no position; the head then runs on chunks of them (``chunked_sft_loss_sum``).
        The hook selects the positions itself rather than passing a boolean ``logits_to_keep`` mask, which only
        recent transformers releases accept (5.17 does not). Under FSDP2 the head's weight is still gathered
        then: the root unit (embeddings, final norm, head) keeps its parameters unsharded from its forward until the
        end of the backward (``fully_shard``'s default for the root).
        """
        labels = batch["labels"]  # (B, T)
        wanted = labels[:, 1:] != IGNORE_INDEX  # (B, T-1) position t predicts token t + 1
        keep = F.pad(wanted, (0, 1))  # (B, T) bool: keep position t if token t + 1 is a target
        head = self.hf_model.get_output_embeddings()
        taken: list[torch.Tensor] = []

        def take_hidden(module: torch.nn.Module, args: tuple) -> tuple:
            taken.append(args[0][keep])  # (B, T, H) -> (N, H) the final hidden states of the kept positions
            return (args[0][:, :0], *args[1:])  # (B, 0, H): no logits here

        handle = head.register_forward_pre_hook(take_hidden)
        try:
            self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                use_cache=False,
            )
        finally:
            handle.remove()
        loss_sum = chunked_sft_loss_sum(taken[0], labels[:, 1:][wanted], head, self.loss_chunk_size)  # ()
        return loss_sum, wanted.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.loss_sum(batch)  # (), ()
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
