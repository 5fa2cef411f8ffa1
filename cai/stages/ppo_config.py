"""The settings of ``cai ppo`` (``model.ppo`` and ``model.lora``): typed, documented and checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.errors import UserError


@dataclass
class PPOConfig:
    """PPO hyperparameters (defaults follow TRL's PPOConfig and Ziegler et al. 2019 where they apply)."""

    total_rollouts: int = 100
    """Training steps (rollouts) to run; each makes ``ppo_epochs * num_minibatches`` optimizer steps."""
    max_new_tokens: int = 32
    """Response length at most. A response ends at EOS or the prompt format's end-of-turn token; generation stops
    once every row has ended (under FSDP all ranks keep stepping together until every rank is done)."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities are computed at the same temperature."""
    top_k: int = 0
    """Top-k sampling during rollouts (0 = off); keep it off for an unbiased on-policy ratio."""
    logprobs_from_generation: bool = True
    """With a separate critic: the rollout's policy log-probabilities come from the logits ``generate`` computed
    while sampling (as in TRL), so the policy is not run again over the rollout; only the critic is. They equal a
    fresh forward pass's up to float rounding (the KV cache adds in another order: about 1e-6 in float32, more in
    bf16). Memory: the logits of every step are kept until generation ends, (B, N, V) float32, about what the
    forward pass would hold afterwards. False: a fresh forward pass, exactly the numbers the reference and the PPO
    epochs compute (then the first rollout's KL is exactly 0). Without a critic the value head needs the policy's
    pass anyway, which gives them."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 2
    """Minibatches per pass (``batch_size`` must be divisible by it)."""
    clip_range: float = 0.2
    """Policy ratio clip ε."""
    vf_clip_range: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0 = off)."""
    gamma: float = 1.0
    """Discount (1: the only real reward is at the end)."""
    lam: float = 0.95
    """GAE λ."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator of the penalty: k1 = logp - ref_logp, k3 = (r - 1) - log r."""
    adaptive_kl: bool = False
    """Adapt β towards ``target_kl_penalty`` (Ziegler et al. 2019)."""
    target_kl_penalty: float = 6.0
    """Target of the adaptive controller: KL (summed over tokens) per response."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in episodes."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that never produce EOS (None = no penalty)."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout's response tokens."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs of a rollout early once the approximate KL to the rollout policy exceeds this."""

    def __post_init__(self):
        checks = [
            ("total_rollouts", self.total_rollouts >= 1, "at least 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "above 0 (log-probabilities are computed at it)"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("ppo_epochs", self.ppo_epochs >= 1, "at least 1"),
            ("num_minibatches", self.num_minibatches >= 1, "at least 1"),
            ("clip_range", self.clip_range > 0, "above 0"),
            ("vf_clip_range", self.vf_clip_range > 0, "above 0"),
            ("vf_coef", self.vf_coef >= 0, "0 or more"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("kl_coef", self.kl_coef >= 0, "0 or more"),
            ("kl_estimator", self.kl_estimator in ("k1", "k3"), "k1 or k3"),
            ("target_kl_penalty", self.target_kl_penalty > 0, "above 0"),
            ("kl_horizon", self.kl_horizon >= 1, "at least 1"),
            ("max_grad_norm", self.max_grad_norm > 0, "above 0"),
            ("target_kl", self.target_kl is None or self.target_kl >= 0, "None or 0 or more"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise UserError(f"ppo.{name}={getattr(self, name)!r}: must be {expected}")


@dataclass
class LoraConfig:
    """LoRA through peft: the reference policy becomes the base model with the adapter disabled (no second copy)."""

    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters."""

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"lora.r={self.r!r}: must be at least 1")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha={self.alpha!r}: must be above 0")
        if not self.target_modules:
            raise UserError("lora.target_modules: must name at least one module (or all-linear)")


torch.serialization.add_safe_globals([PPOConfig, LoraConfig])  # in PPOModule's hyperparameters (cai.training)
