"""The preference model stage: a scalar reward trained on AI soft labels (Bai et al. 2022, sec. 4.1).

Run as ``cai pm fit --config configs/pm/tiny.yaml``. The loss is ``losses.soft_preference_loss``: with a soft
label p (the feedback model's probability that ``chosen`` is better), -[p log σ(r_c - r_r) + (1-p) log σ(r_r - r_c)].
``--data.hard_labels true`` trains on p = 1 instead, for comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryAccuracy

from cai.training import HFModule, OptimConfig, run_cli
from data.preference import PreferenceDataModule
from losses import soft_preference_loss
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel


class SoftCalibrationError(Metric):
    """Expected calibration error of predicted probabilities against *soft* labels.

    Predictions are put into ``n_bins`` equal-width bins; the error is the count-weighted mean over bins of
    |mean prediction - mean label|. With hard 0/1 labels this is the usual ECE (Guo et al. 2017, arXiv:1706.04599).
    """

    full_state_update = False

    def __init__(self, n_bins: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.n_bins = n_bins
        for name in ("pred_sum", "label_sum", "count"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predicted probabilities (N,) and soft labels (N,)."""
        bins = (preds.detach().double() * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.pred_sum.index_add_(0, bins, preds.detach().double())
        self.label_sum.index_add_(0, bins, labels.detach().double())
        self.count.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        """The calibration error."""
        seen = self.count > 0
        gap = (self.pred_sum[seen] - self.label_sum[seen]).abs()  # = count * |mean pred - mean label| per bin
        return (gap.sum() / self.count.sum()).float()


class PreferenceModule(HFModule):
    """Preference (reward) model over a causal-LM backbone, reward read at the last real token.

    Args:
        model: Backbone to start from (usually the SL-CAI model), or a saved preference model to continue.
        optim: Optimizer and schedule.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        hf_out: Where the final model is saved (``ForSequenceClassification`` format); default ``<log_dir>/hf``.
        center_rewards_coef: Weight of the reward-centring term c·mean((r_c + r_r)²) (Eisenstein et al. 2023); 0 off.
        share_prompt: Run the tokens both texts of a pair start with once, through a KV cache, instead of once per
            text (``PreferenceModel.forward_pairs``). Same result, less compute; it turns itself off where it cannot
            work (gradient checkpointing, FSDP, past a sliding window: ``PreferenceModel.can_share_prompt``).
    """

    def __init__(
        self,
        model: ModelConfig,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
        center_rewards_coef: float = 0.0,
        share_prompt: bool = True,
    ):
        super().__init__(model, optim, gradient_checkpointing, hf_out)
        self.save_hyperparameters()
        self.center_rewards_coef = center_rewards_coef
        self.share_prompt = share_prompt
        self.val_loss, self.val_reward, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc, self.val_calibration = BinaryAccuracy(), SoftCalibrationError()
        self.train_acc = BinaryAccuracy()

    def build_network(self) -> PreferenceModel:
        return PreferenceModel.from_pretrained(self.model_cfg)

    @property
    def hf_model(self):
        return self.model.backbone

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_hf(self, path: str | Path) -> Path:
        state = self.full_state_dict()  # collective: every rank
        path = Path(path)
        if self.trainer.is_global_zero:
            self.model.save_pretrained(path, state_dict=state)
            load_tokenizer(self.model_cfg.tokenizer or self.model_cfg.name_or_path).save_pretrained(path)
        self.trainer.strategy.barrier("save_hf")
        return path

    def _step(self, batch: dict[str, torch.Tensor]):
        r_c, r_r = self.model.forward_pairs(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            self.share_prompt,
            batch["width"],
        )  # (B,), (B,)
        p = batch["p_chosen"]  # (B,)
        loss = soft_preference_loss(r_c, r_r, p, center_rewards_coef=self.center_rewards_coef or None)
        return loss, r_c, r_r, p

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, r_c, r_r, p = self._step(batch)
        self.train_acc(torch.sigmoid(r_c - r_r), (p >= 0.5).long())
        self.log("loss/train", loss, prog_bar=True)
        self.log("train/accuracy", self.train_acc)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, r_c, r_r, p = self._step(batch)
        prob = torch.sigmoid(r_c - r_r)  # the model's probability that chosen is better
        self.val_loss.update(loss, weight=len(p))
        self.val_acc.update(prob, (p >= 0.5).long())  # accuracy against the hard label
        self.val_calibration.update(prob, p)  # calibration against the soft label
        self.val_reward.update(torch.cat([r_c, r_r]))
        self.val_margin.update(r_c - r_r)
        for name, metric in [
            ("loss", self.val_loss),
            ("accuracy", self.val_acc),
            ("calibration_error", self.val_calibration),
            ("reward_mean", self.val_reward),
            ("margin", self.val_margin),
        ]:
            self.log(f"val/{name}", metric, prog_bar=name in ("loss", "accuracy"))


def cli_main(args: list[str] | None = None):
    """``cai pm``: LightningCLI over ``PreferenceModule`` and ``PreferenceDataModule``."""
    return run_cli(PreferenceModule, PreferenceDataModule, args, "cai pm")
