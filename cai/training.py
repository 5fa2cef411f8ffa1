"""Machinery shared by the training stages (SFT, preference model, PPO): one LightningModule base class.

It loads the Hugging Face network in ``configure_model`` (so that sharding strategies see it being built), shards it
with FSDP2 when the trainer runs ``ModelParallelStrategy``, builds AdamW with a warmup + cosine schedule, and saves
the final weights in Hugging Face format with the tokenizer so that any tool can load the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from models import ModelConfig, load_model, load_tokenizer
from models.errors import UserError, check_output_dir
from models.loading import enable_activation_checkpointing


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    schedule: str = "cosine"
    """After warmup: ``cosine`` decay to ``min_lr_ratio * lr`` over ``trainer.max_steps``, or ``constant``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine schedule)."""
    fused: bool | None = None
    """Use PyTorch's fused AdamW kernel: one kernel per step instead of a loop over parameters, and no
    parameter-sized temporaries (measured on CPU: reward-model steps 3x faster, 25% less peak memory). None: fused
    except under ``*-mixed`` precision, where Lightning refuses gradient clipping with a fused optimizer."""

    def __post_init__(self):
        checks = [
            ("lr", self.lr > 0, "above 0"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("eps", self.eps > 0, "above 0"),
            ("warmup_steps", self.warmup_steps >= 0, "0 or more"),
            ("schedule", self.schedule in ("cosine", "constant"), "cosine or constant"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise UserError(f"optim.{name}={getattr(self, name)!r}: must be {expected}")


# The stages keep these configs in their hyperparameters, so checkpoints hold them; allowing them lets a run made
# from Python (not the CLI, which stores plain dicts) resume under torch.load(weights_only=True).
torch.serialization.add_safe_globals([ModelConfig, OptimConfig])


def make_adamw(params, cfg: OptimConfig, trainer=None) -> torch.optim.AdamW:
    """AdamW from ``cfg`` over ``params`` (``trainer`` decides ``fused=None``)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    fused = cfg.fused
    if fused is None:
        fused = not (trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision))
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def lr_lambda(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the learning rate at optimizer step ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The transformer block classes (``_no_split_modules`` of the HF models inside), the units that FSDP shards."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (_no_split_modules={names})")
    return tuple(classes)


def shard_fsdp2(model: torch.nn.Module, mesh) -> None:
    """Apply FSDP2 ``fully_shard`` to every decoder layer, to each outermost HF model inside, then to the root.

    Sharding an HF model inside a wrapper (the policy inside ``PolicyWithValue``) as its own unit lets code call it
    directly, as ``generate`` does: its own forward hook gathers its embeddings and head. Methods that a network
    lists in ``fsdp_forward_methods`` (``PreferenceModel.forward_pairs``) gather the root's parameters as ``forward``
    does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers import PreTrainedModel

    layers = decoder_layer_classes(model)
    for module in model.modules():
        if isinstance(module, layers):
            fully_shard(module, mesh=mesh)
    outer: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if module is model or not isinstance(module, PreTrainedModel) or any(name.startswith(o + ".") for o in outer):
            continue
        fully_shard(module, mesh=mesh)
        outer.append(name)
    fully_shard(model, mesh=mesh)
    for method in getattr(model, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, method)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2 data parallelism: every process holds one data shard.

    ``configs/strategies/fsdp2_*.yaml`` use it. Lightning's own ``"auto"`` sizes mean data-parallel = number of nodes
    and tensor-parallel = devices per node, a layout for tensor parallelism, which this project does not plan: on one
    node every device would train an unsharded copy on the same rows. Here ``"auto"`` means data-parallel = every
    process and tensor-parallel = 1.
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()


def _check_data_parallel(mesh, world_size: int) -> None:
    """Refuse a ``ModelParallelStrategy`` mesh whose data-parallel part is not every process (no tensor parallelism)."""
    size = mesh["data_parallel"].size() if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh.size()
    if size != world_size:
        raise UserError(
            f"trainer.strategy: ModelParallelStrategy shards over {size} of {world_size} processes (its 'auto' sizes "
            "mean tensor parallelism, which this project has no plan for); use cai.training.FSDP2Strategy "
            "(configs/strategies/fsdp2_*.yaml) or set data_parallel_size to the number of processes"
        )


class HFModule(L.LightningModule):
    """Base class of the training stages: a Hugging Face causal LM (``self.model``) plus common plumbing.

    Args:
        model: The network to train (a directory made by ``cai tiny-model`` or a previous stage, or a hub id).
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
        super().__init__()
        if hf_out:  # checked now: a bad folder found only after training would lose the export
            check_output_dir(hf_out, "model.hf_out")
        self.model_cfg, self.optim_cfg = model, optim or OptimConfig()
        self.gradient_checkpointing, self.hf_out = gradient_checkpointing, hf_out
        self.model: torch.nn.Module | None = None

    def build_network(self) -> torch.nn.Module:
        """Load the network to train. Subclasses override it to add heads."""
        return load_model(self.model_cfg)

    def configure_model(self) -> None:
        """Load the network once, enable checkpointing, and shard it under ``ModelParallelStrategy`` (FSDP2)."""
        if self.model is not None:
            return
        self.model = self.build_network()
        self.model.train()  # from_pretrained returns eval mode; dropout is off anyway (models.load_model)
        if self.gradient_checkpointing:
            hf = self.hf_model
            enable_activation_checkpointing(hf)
            hf.config.use_cache = False
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            mesh = self.device_mesh
            _check_data_parallel(mesh, strategy.world_size)
            shard_fsdp2(self.model, mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh)
        elif isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
            # FSDP1 (``strategy: fsdp``, GPU only): without a policy it would make the whole model one flat unit.
            # The strategy wraps the module after this hook, reading its kwargs then.
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(set(decoder_layer_classes(self.model)))

    def on_fit_start(self) -> None:
        self._keep_metrics_float32()

    def on_validation_start(self) -> None:
        self._keep_metrics_float32()

    def _keep_metrics_float32(self) -> None:
        """Undo ``bf16-true``'s cast of the torchmetrics states: running means and sums in bfloat16 stop growing.

        ``SoftCalibrationError`` keeps its own float64 sums whatever it is cast to.
        """
        from torchmetrics import Metric

        for metric in self.modules():
            states = metric.metric_state.values() if isinstance(metric, Metric) else ()
            if states and all(isinstance(s, torch.Tensor) and s.is_floating_point() for s in states):
                metric.set_dtype(torch.float32)  # counts (integer states) were never cast and stay as they are

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Step, then free the gradients at once (as ``transformers.Trainer`` does) rather than after the next forward.

        Lightning's closure zeroes the gradients between the next batch's forward and its backward, so the previous
        step's gradients (one float32 copy of the parameters) would stay alive through that forward: 1.10x TRL's peak
        memory for SFT on SmolLM2-135M before, 1.02x after (docs/BENCHMARKS.md). Manual optimization (PPO) skips it.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    @property
    def hf_model(self):
        """The Hugging Face ``PreTrainedModel`` inside ``self.model`` (the model itself unless a subclass wraps it)."""
        return self.model

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        opt = make_adamw(params, cfg, self.trainer)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def hf_output_dir(self) -> Path:
        """Folder of the final Hugging Face export."""
        if self.hf_out:
            return Path(self.hf_out)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "hf"

    def export_module(self) -> torch.nn.Module:
        """The network ``save_hf`` writes: anything with Hugging Face's ``save_pretrained(path, state_dict=...)``.

        ``hf_model`` here (the policy of SFT and PPO); the preference model stage exports the whole
        ``PreferenceModel`` (backbone and head, in ``ForSequenceClassification`` format). Called once, at export.
        """
        return self.hf_model

    def save_hf(self, path: str | Path, module: torch.nn.Module) -> Path:
        """Save ``module`` (``export_module()`` at the end of a fit) with ``save_pretrained``, and the tokenizer.

        The full (unsharded) state dict is gathered on CPU first, a collective call: every rank must call this;
        rank 0 writes.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = Path(path)
        if self.trainer.is_global_zero:
            path.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(path, state_dict=state)
            name = self.model_cfg.tokenizer or self.model_cfg.name_or_path
            load_tokenizer(name, trust_remote_code=self.model_cfg.trust_remote_code).save_pretrained(path)
        self.trainer.strategy.barrier("save_hf")
        return path

    def on_fit_end(self) -> None:
        path = self.save_hf(self.hf_output_dir(), self.export_module())
        if self.trainer.is_global_zero:
            print(f"saved the trained model in Hugging Face format to {path}")


def _stage_cli(module: type[L.LightningModule]):
    """The LightningCLI class of the training stages.

    The data's tokenizer (and PPO's prompt format) is linked to the model's; ``cai.progress.RunProgressBar`` is the
    progress bar unless the config names another bar or turns bars off.
    """
    import inspect

    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    class CAICLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # Only what the stage implements: `cai ppo validate` or `cai pm test` would otherwise get as far as
            # Lightning's "no test_step" after loading the models; now the parser names the choices at once.
            steps = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
            base = L.LightningModule
            return {
                name: skip
                for name, skip in LightningCLI.subcommands().items()
                if name not in steps or getattr(module, steps[name]) is not getattr(base, steps[name])
            }

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                ("model.model.name_or_path", "model.model.tokenizer"), "data.tokenizer", compute_fn=lambda n, t: t or n
            )
            if "prompt_format" in inspect.signature(module.__init__).parameters:  # PPO: the policy's format rules
                parser.link_arguments("model.prompt_format", "data.prompt_format")

        def _instantiate_trainer(self, config: dict, callbacks: list):
            # LightningCLI appends trainer_defaults' callbacks to the config's; ours gives way to the user's choice.
            own = config.get("callbacks") or []
            own = own if isinstance(own, list) else [own]
            if config.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in own + callbacks):
                self.trainer_defaults = {k: v for k, v in self.trainer_defaults.items() if k != "callbacks"}
            return super()._instantiate_trainer(config, callbacks)

    return CAICLI


def run_cli(module: type[L.LightningModule], datamodule: type[L.LightningDataModule], args, prog: str):
    """Run a training stage as a LightningCLI program (``fit``, ``validate``, ...; the config saved with the run).

    The data's tokenizer is linked to the model's, so it is written once in a config. The CLI (jsonargparse and its
    helpers) is imported here, not with this module, so that importing a stage costs only what training needs.
    The progress bar is ``cai.progress.RunProgressBar`` (steps or PPO rollouts out of the whole run, with an ETA),
    unless the config names another progress bar callback or sets ``trainer.enable_progress_bar: false``.
    """
    from cai.progress import RunProgressBar

    return _stage_cli(module)(
        module,
        datamodule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": prog},
        trainer_defaults={"callbacks": [RunProgressBar()]},
    )


def check_cli(module: type[L.LightningModule], datamodule: type[L.LightningDataModule], args, prog: str) -> None:
    """Parse a training stage's arguments as ``run_cli`` does and build its model and data modules, not the trainer.

    Cheap (no network is loaded, no data read): a typo or a value out of range fails here. Parse errors raise
    jsonargparse's ``ArgumentError`` instead of exiting.
    """

    class CheckCLI(_stage_cli(module)):
        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate(self.config)

    CheckCLI(
        module,
        datamodule,
        args=args,
        run=False,
        save_config_callback=None,
        parser_kwargs={"prog": prog, "exit_on_error": False},
    )
