"""The sizes of ``scripts/gpu_check.py``'s two modes.

``GPU``: a random Qwen2.5-0.5B shape in bf16, sized to the device's limits; ``CPU_SMOKE``: tiny sizes, so that CI
proves the script still works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench_presets import QWEN2_05B


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    name: str
    """Shown in the report's title."""
    arch: str
    """Hugging Face ``model_type`` of the random model."""
    overrides: dict
    """Config fields of the random model (its shape)."""
    vocab_size: int | None
    """Embedding rows (the real model's vocabulary); None: the tiny tokenizer's."""
    accelerator: str
    """Lightning accelerator of every run."""
    bench_args: list[str]
    """Arguments of ``bench_vs_trl.py``."""
    ppo_lr: float
    """Learning rate of the FSDP2 PPO run (a real model's PPO rate on the GPU, so its KL stays meaningful)."""
    ppo_strategy: str
    """Strategy config of the FSDP2 PPO run."""
    ppo: dict = field(default_factory=dict)
    """``model.ppo`` settings and ``data.batch_size`` (``batch_size``) of the PPO run."""
    attention: dict = field(default_factory=dict)
    """``batch`` and ``seq`` of the attention comparison."""
    pipeline: dict = field(default_factory=dict)
    """Sizes of the shortened pipeline: prompts, new tokens, steps, batch size."""


GPU = Sizes(
    name="GPU",
    arch="qwen2",
    overrides=QWEN2_05B,
    vocab_size=151936,
    accelerator="gpu",
    bench_args=[
        "--preset",
        "0.5b",
        "--repeats",
        "1",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--ppo_steps",
        "3",
        "--ppo_warmup",
        "1",
    ],  # fmt: skip
    ppo_lr=1e-6,
    ppo_strategy="configs/strategies/fsdp2_gpu.yaml",
    ppo=dict(total_rollouts=4, max_new_tokens=64, batch_size=16),
    attention=dict(batch=4, seq=2048),
    pipeline=dict(prompts=16, new_tokens=32, steps=4, batch_size=8),
)
CPU_SMOKE = Sizes(
    name="CPU smoke (tiny sizes: the figures mean nothing, the run proves the script works)",
    arch="llama",
    overrides={},
    vocab_size=None,
    accelerator="cpu",
    bench_args=[
        "--preset",
        "tiny",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--ppo_steps",
        "1",
        "--ppo_warmup",
        "1",
        "--n_rows",
        "32",
        "--retries",
        "0",
    ],  # fmt: skip
    ppo_lr=1e-4,
    ppo_strategy="configs/strategies/fsdp2_cpu.yaml",
    ppo=dict(total_rollouts=2, max_new_tokens=8, batch_size=4),
    attention=dict(batch=2, seq=64),
    pipeline=dict(prompts=8, new_tokens=8, steps=2, batch_size=4),
)
