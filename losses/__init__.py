"""Loss functions for the Constitutional AI pipeline (Bai et al. 2022, arXiv:2212.08073). Pure torch."""

from losses.dpo import dpo_implicit_rewards, dpo_loss
from losses.kl_control import AdaptiveKLController, FixedKLController
from losses.ppo import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from losses.preference import clamp_probabilities, normalize_choice_logprobs, soft_logistic_loss, soft_preference_loss
from losses.sft import sft_loss, sft_loss_sum

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "clamp_probabilities",
    "dpo_implicit_rewards",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "normalize_choice_logprobs",
    "per_token_rewards",
    "policy_loss",
    "sft_loss",
    "sft_loss_sum",
    "soft_logistic_loss",
    "soft_preference_loss",
    "value_loss",
]
