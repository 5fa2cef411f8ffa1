"""Calibration of predicted preference probabilities against soft labels: a torchmetrics ``Metric``.

Shared by the stages that train on the feedback model's soft labels (the preference model, DPO).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


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

    def _apply(self, fn, exclude_state=()):
        """Move the running sums with the module, but keep them float64.

        ``bf16-true`` casts the whole module with ``.to(torch.bfloat16)``, metric states included; bin counts in
        bfloat16 stop growing at 256. Only the device of ``fn``'s result is taken over; the probe starts on the sums'
        own device, so a dtype-only ``fn`` (``set_dtype``) leaves them where they are (a CPU probe once sent them
        back to the CPU in the middle of a GPU run).
        """
        sums = ("pred_sum", "label_sum", "count")
        this = super()._apply(fn, exclude_state=(*sums, *exclude_state))
        device = fn(torch.zeros((), device=self.pred_sum.device)).device
        for name in sums:
            this._defaults[name] = this._defaults[name].to(device)
            setattr(this, name, getattr(this, name).to(device))
        return this

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
