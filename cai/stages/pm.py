"""The preference model stage: a scalar reward trained on AI soft labels (Bai et al. 2022, sec. 4.1).

Run as ``cai pm fit --config configs/pm/tiny.yaml``. The loss is ``losses.soft_preference_loss``: with a soft
label p (the feedback model's probability that ``chosen`` is better), -[p log σ(r_c - r_r) + (1-p) log σ(r_r - r_c)].
``--data.hard_labels true`` trains on p = 1 instead, for comparison.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from cai.method.calibration import SoftCalibrationError
from cai.training import HFModule, OptimConfig, run_cli
from data.base import float_column
from data.preference import PreferenceDataModule
from losses import soft_preference_loss
from models import ModelConfig
from models.heads import PreferenceModel
from models.sequence_logprobs import share_prompt_on


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
            ``null`` (the default): on a CPU, off on a GPU, where it measured 2x slower (``share_prompt_on``).
    """

    def __init__(
        self,
        model: ModelConfig,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
        center_rewards_coef: float = 0.0,
        share_prompt: bool | None = None,
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

    def export_module(self) -> PreferenceModel:
        """The whole preference model, backbone and head (``save_hf`` writes it as ``ForSequenceClassification``)."""
        return self.model

    def _step(self, batch: dict[str, torch.Tensor]):
        r_c, r_r = self.model.forward_pairs(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            share_prompt_on(self.share_prompt, self.device),
            batch["width"],
        )  # (B,), (B,)
        p = float_column(batch["p_chosen"], self.device)  # (B,) float32
        loss = soft_preference_loss(r_c, r_r, p, center_rewards_coef=self.center_rewards_coef or None)
        return loss, r_c, r_r, p

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, r_c, r_r, p = self._step(batch)
        self.train_acc(torch.sigmoid(r_c - r_r), (p >= 0.5).long())
        self.log("loss/train", loss, prog_bar=True, sync_dist=True)  # equal shares per rank: the global mean
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
