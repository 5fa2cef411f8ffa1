"""DPO on the AI feedback labels: an RL-CAI alternative to the preference model + PPO (``cai dpo fit``).

Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) trains the SL-CAI policy on the ``pairs/``
output of ``cai label`` directly, with the loss of ``losses.dpo``: by default against the feedback model's soft label
``p_chosen`` (the cross-entropy of the implied Bradley-Terry model, as the preference model is trained on it, Bai et
al. 2022, sec. 4.1), or hard labels, or conservative DPO's constant smoothing (``model.dpo.labels``).

No wasted passes: the reference model's log-probabilities are computed once, before training, and cached beside the
data (``data.dpo``); without a separate ``reference`` the policy computes them itself before its first step (its
starting weights are the reference), so no second copy of the model is loaded; and the policy reads each pair's
prompt once and both responses after its KV cache (``models.sequence_logprobs.pair_logprobs``).

Run as ``cai dpo fit --config configs/dpo/tiny.yaml``; the trained policy is saved in Hugging Face format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from cai.method.calibration import SoftCalibrationError
from cai.training import HFModule, OptimConfig, run_cli
from data.base import float_column
from data.dpo import REF_COLUMNS, DPOCollator, DPODataModule
from losses import dpo_implicit_rewards, dpo_loss
from models import ModelConfig, load_model
from models.errors import UserError, check_positive
from models.loading import resolve_model_source
from models.sequence_logprobs import is_sharded, pair_logprobs, share_prompt_on


@dataclass
class DPOConfig:
    """The DPO objective."""

    beta: float = 0.1
    """KL-regularisation strength β: implicit reward ``β (log π(y|x) - log π_ref(y|x))``."""
    labels: Literal["soft", "hard", "cdpo"] = "soft"
    """Target probability that ``chosen`` is better: ``soft``, the feedback model's ``p_chosen``; ``hard``, 1 when
    ``p_chosen >= 0.5`` else 0 (plain DPO); ``cdpo``, the hard label smoothed by ``label_smoothing`` (conservative
    DPO, Mitchell 2023)."""
    label_smoothing: float = 0.1
    """ε of ``cdpo``: the target is 1 - ε for the labelled winner (unused by ``soft`` and ``hard``)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise UserError(f"model.dpo.beta={self.beta}: must be above 0")
        if self.labels not in ("soft", "hard", "cdpo"):
            raise UserError(f"model.dpo.labels={self.labels!r}: must be soft, hard or cdpo")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"model.dpo.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")


torch.serialization.add_safe_globals([DPOConfig])  # in DPOModule's hyperparameters (resume with weights_only)


def target_probability(p_chosen: torch.Tensor, cfg: DPOConfig) -> torch.Tensor:
    """The probability (B,) the loss trains ``σ(β Δ)`` towards, from the soft labels (B,) and ``cfg.labels``."""
    if cfg.labels == "soft":
        return p_chosen
    hard = (p_chosen >= 0.5).float()  # (B,)
    if cfg.labels == "hard":
        return hard
    return hard * (1 - cfg.label_smoothing) + (1 - hard) * cfg.label_smoothing


def model_identity(cfg: ModelConfig, precision: str) -> dict:
    """What the reference log-probabilities depend on: the weights (files' sizes and times) and how they run."""
    source = resolve_model_source(cfg.name_or_path)
    ident = {
        "name_or_path": cfg.name_or_path,
        "revision": cfg.revision,
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "precision": str(precision),
    }
    folder = Path(source.path)
    if folder.is_dir():
        files = [folder / source.gguf_file] if source.gguf_file else sorted(folder.iterdir())
        ident["path"] = str(folder.resolve())
        ident["files"] = {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns]
            for f in files
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".json", ".pt")
        }
    return ident


class DPOModule(HFModule):
    """DPO of a causal LM policy on preference pairs with (soft) labels.

    Args:
        model: The policy to train, usually the SL-CAI model (``cai sft`` output); also the reference unless
            ``reference`` is set.
        reference: The frozen reference policy; None uses ``model``'s starting weights. It runs once, before
            training, and its log-probabilities are cached beside the data (``data.ref_cache``). It must share the
            policy's tokenizer.
        dpo: β and the labels (soft, hard or cDPO).
        optim: Optimizer and schedule (default: AdamW at 1e-6, a common DPO rate for real models).
        share_prompt: Run each pair's prompt once and both responses after its KV cache instead of two whole texts.
            Same result, less compute; it turns itself off where it cannot work (gradient checkpointing, FSDP,
            past a sliding window: ``models.sequence_logprobs.can_share_prompt``). ``null`` (the default): on a
            CPU, off on a GPU, where the preference model measured 2x slower with it (``share_prompt_on``).
        ref_batch_size: Pairs per forward pass of the reference model.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        hf_out: Where the final policy is saved in Hugging Face format; default ``<log_dir>/hf``.
    """

    def __init__(
        self,
        model: ModelConfig,
        reference: ModelConfig | None = None,
        dpo: DPOConfig | None = None,
        optim: OptimConfig | None = None,
        share_prompt: bool | None = None,
        ref_batch_size: int = 8,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
    ):
        super().__init__(model, optim or OptimConfig(lr=1e-6), gradient_checkpointing, hf_out)
        check_positive(ref_batch_size, "model.ref_batch_size")
        self.save_hyperparameters()
        self.ref_cfg, self.cfg = reference, dpo or DPOConfig()
        self.share_prompt, self.ref_batch_size = share_prompt, ref_batch_size
        self._reference_pending = False  # set by ``setup``: the policy computes them in ``on_fit_start``
        self.train_ece = SoftCalibrationError()
        self.val_ece = SoftCalibrationError()
        self.val_means = torch.nn.ModuleDict(
            {
                k.replace("/", "_"): MeanMetric()
                for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
                + ("logps/chosen", "logps/rejected")
            }
        )

    # ----------------------------------------------------------------------------------------- reference
    def setup(self, stage: str) -> None:
        """Give the data its reference log-probabilities, or leave them to ``on_fit_start`` (the policy's own).

        Fitting without a separate ``reference``: the policy's starting weights are the reference, so the policy
        itself computes them in ``on_fit_start`` (placed, sharded and cast by then, before the first optimizer step)
        and no second copy of the model is ever loaded. Otherwise (a ``reference``, or ``validate``) a frozen copy
        is loaded here; also under FSDP1 (``FSDPStrategy``).
        """
        self._reference_pending = False
        if not hasattr(getattr(self.trainer, "datamodule", None), "add_reference_logps"):
            return  # batches must then carry ref_chosen_logps / ref_rejected_logps themselves
        # Under FSDP1 the LightningModule itself is the root FSDP unit, so a forward of self.model outside a step
        # would meet its root-level weights still sharded: a frozen copy computes the reference there.
        if stage == "fit" and self.ref_cfg is None and not isinstance(self.trainer.strategy, FSDPStrategy):
            self._reference_pending = True
        else:
            self._add_reference(use_policy=False)

    def _add_reference(self, use_policy: bool) -> None:
        """Reference log-probs of every row: from the cache, or computed by the policy or a loaded frozen copy.

        Args:
            use_policy: Compute them with ``self.model`` (which must still hold the reference weights) in eval mode,
                without gradients; else load ``reference`` (or the policy's starting weights) once, on demand.
        """
        dm = self.trainer.datamodule
        cfg = self.ref_cfg or self.model_cfg
        strategy = self.trainer.strategy
        held: dict[str, torch.nn.Module] = {}
        plugin = self.trainer.precision_plugin

        def compute(ds) -> list[tuple[float, float]]:
            if use_policy:
                net = self.model
            elif "ref" not in held:
                net = plugin.convert_module(load_model(cfg))  # the policy's dtype
                held["ref"] = net = net.to(strategy.root_device).eval().requires_grad_(False)
            else:
                net = held["ref"]
            batches = -(-len(ds) // self.ref_batch_size)
            if self.trainer.world_size > 1 and is_sharded(net):  # every rank must run as many sharded forwards
                counts: list = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(counts, batches)
                batches = max(counts)
            training = net.training
            net.eval()
            try:
                return reference_logps(net, ds, dm.collator(), self.ref_batch_size, plugin, batches, self.share_prompt)
            finally:
                net.train(training)

        identity = model_identity(cfg, self.trainer.precision)
        several = strategy if self.trainer.world_size > 1 else None
        dm.add_reference_logps(compute, identity, several, root=self.trainer.default_root_dir)
        held.clear()

    def on_fit_start(self) -> None:
        """Compute the reference log-probs with the policy itself before the first step (see ``setup``).

        A resumed run holds trained weights by now: it reads the cache, and if there is none it loads the starting
        weights rather than compute the reference with trained ones.
        """
        super().on_fit_start()
        if self._reference_pending:
            self._reference_pending = False
            self._add_reference(use_policy=self.trainer.ckpt_path is None)

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy sequence log-probs (B,), (B,) of the chosen and rejected responses."""
        return pair_logprobs(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            share_prompt_on(self.share_prompt, self.device),
            batch.get("width"),
        )

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and the quantities DPO users read, for one batch."""
        if any(c not in batch for c in REF_COLUMNS):
            raise UserError("dpo: the batch has no reference log-probs (use DPODataModule, or give ref_*_logps)")
        pc, pr = self(batch)  # (B,), (B,)
        rc, rr, p = (float_column(batch[c], self.device) for c in (*REF_COLUMNS, "p_chosen"))  # (B,) float32 each
        beta = self.cfg.beta
        r_c, r_r = dpo_implicit_rewards(pc, pr, rc, rr, beta)  # (B,), (B,) detached
        margin = r_c - r_r  # (B,)
        return {
            "loss": dpo_loss(pc, pr, rc, rr, beta, p_chosen=target_probability(p, self.cfg)),
            "rewards/chosen": r_c,
            "rewards/rejected": r_r,
            "rewards/margin": margin,
            "rewards/accuracy": ((margin > 0) == (p >= 0.5)).float(),  # against the hard label
            "prob": torch.sigmoid(margin),  # the policy's implied P(chosen is better) = σ(β Δ)
            "p_chosen": p,
            "ref": (rc, rr),
            "logps/chosen": pc.detach().float(),
            "logps/rejected": pr.detach().float(),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        # sync_dist: every rank holds an equal share of the global batch, so the mean over ranks is the global mean.
        self.log("loss/dpo", out["loss"], prog_bar=True, sync_dist=True)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            self.log(name, out[name].mean(), prog_bar=name == "rewards/accuracy", sync_dist=True)
        self.log("logps/chosen", out["logps/chosen"].mean(), sync_dist=True)
        self.log("logps/rejected", out["logps/rejected"].mean(), sync_dist=True)
        self.train_ece(out["prob"], out["p_chosen"])
        self.log("calibration/ece", self.train_ece)
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        n = len(out["p_chosen"])
        # Validation measures every run against the soft labels (whatever model.dpo.labels trains on).
        logps = out["logps/chosen"], out["logps/rejected"]
        soft = dpo_loss(*logps, *out["ref"], self.cfg.beta, p_chosen=out["p_chosen"])
        self.val_means["loss"].update(soft, weight=n)
        for name, metric in self.val_means.items():
            if name != "loss":
                metric.update(out[name.replace("_", "/", 1)])
        self.val_ece.update(out["prob"], out["p_chosen"])
        for name, metric in self.val_means.items():
            self.log(f"val/{name.replace('_', '/', 1)}", metric, prog_bar=name in ("loss", "rewards_accuracy"))
        self.log("val/calibration/ece", self.val_ece)


@torch.no_grad()
def reference_logps(
    model,
    ds,
    collate: DPOCollator,
    batch_size: int,
    precision_plugin=None,
    min_batches: int = 0,
    share_prompt: bool | None = None,
) -> list[tuple[float, float]]:
    """(chosen, rejected) sequence log-probs of every row of ``ds`` under ``model``, in the rows' order.

    Rows are batched by length (less padding); each prompt runs once (``pair_logprobs``) where ``share_prompt``
    says so (``share_prompt_on``: by default on a CPU only). ``precision_plugin``:
    the trainer's, so that the reference runs in the precision the policy trains in (autocast under ``*-mixed``).
    ``min_batches``: forward passes to run at least (the last batch again, results unused), so that the ranks of a
    sharded model, each with its own share of rows, run the same number of collective forwards.
    """
    import contextlib

    device = next(model.parameters()).device
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    result: list[tuple[float, float]] = [(0.0, 0.0)] * len(ds)
    context = precision_plugin.forward_context() if precision_plugin is not None else contextlib.nullcontext()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if min_batches > len(batches) == 0:
        raise UserError("dpo: a process has no pairs for the reference pass (fewer pairs than processes)")
    with context:
        for n in range(max(len(batches), min_batches)):
            idx = batches[min(n, len(batches) - 1)]
            batch = collate([ds[i] for i in idx])
            tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            c, r = pair_logprobs(
                model,
                tensors["prompt_ids"],
                tensors["prompt_mask"],
                tensors["response_ids"],
                tensors["response_mask"],
                share_prompt_on(share_prompt, device),
                batch["width"],
            )
            if n < len(batches):
                for i, pair in zip(idx, zip(c.tolist(), r.tolist())):  # one device sync per batch
                    result[i] = pair
    return result


def cli_main(args: list[str] | None = None):
    """``cai dpo``: LightningCLI over ``DPOModule`` and ``DPODataModule``."""
    return run_cli(DPOModule, DPODataModule, args, "cai dpo")
