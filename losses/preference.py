"""Preference-model (reward-model) losses and AI-feedback label helpers.

In RL-CAI (Bai et al. 2022, arXiv:2212.08073, section 4.1) a feedback model is asked which of two responses better
follows a constitutional principle; the normalised log-probabilities of the options "(A)" and "(B)" become soft
preference labels on which a preference model is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clamp_probabilities", "normalize_choice_logprobs", "soft_logistic_loss", "soft_preference_loss"]


def normalize_choice_logprobs(logp_a: torch.Tensor | float, logp_b: torch.Tensor | float) -> torch.Tensor:
    """Probability that option A is preferred, from the feedback model's log-probabilities of "(A)" and "(B)".

    Formula: ``p_A = exp(l_A) / (exp(l_A) + exp(l_B)) = sigmoid(l_A - l_B)``; the sigmoid form never underflows, so
    log-probabilities such as ``-1e4`` stay well defined. Source: Bai et al. 2022 (arXiv:2212.08073, section 4.1,
    "we compute the log probability of the responses (A) and (B) ... normalized").

    Args:
        logp_a: log-probability of choosing A, any shape, any float dtype (computed in float32).
        logp_b: log-probability of choosing B, broadcastable to ``logp_a``.

    Returns:
        Float32 tensor of ``P(A preferred)`` with the broadcast shape; ``p(a, b) = 1 - p(b, a)``.
    """
    logp_a = torch.as_tensor(logp_a).float()  # (...)
    logp_b = torch.as_tensor(logp_b).float()  # (...)
    return torch.sigmoid(logp_a - logp_b)


def clamp_probabilities(p: torch.Tensor | float, low: float = 0.4, high: float = 0.6) -> torch.Tensor:
    """Clamp preference probabilities into ``[low, high]``.

    Formula: ``p' = min(max(p, low), high)``. Source: Bai et al. 2022 (arXiv:2212.08073, section 4.1 and 4.3):
    chain-of-thought feedback labels are over-confident (near 0 or 1), and clamping them to 40-60% gave better and
    more robust RL-CAI policies. Idempotent, and the identity on ``[low, high]``.

    Args:
        p: probabilities, any shape (computed in float32).
        low: lower bound, ``0 <= low``.
        high: upper bound, ``low <= high <= 1``.

    Returns:
        Float32 tensor, same shape as ``p``.

    Raises:
        ValueError: if not ``0 <= low <= high <= 1``.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    return torch.as_tensor(p).float().clamp(min=low, max=high)


def soft_logistic_loss(logit: torch.Tensor, p: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-element logistic loss against a soft target: binary cross-entropy with logits, unreduced.

    Formula: ``l = -[p log sigmoid(z) + (1 - p) log sigmoid(-z)]``, written with ``logsigmoid`` for stability. With
    ``p = 1`` it is exactly ``-log sigmoid(z)``. Shared by ``soft_preference_loss`` and ``dpo_loss``.

    Args:
        logit: ``z``, any shape (computed in float32).
        p: target probability that the first item wins, broadcastable to ``logit``.

    Returns:
        Float32 tensor with the broadcast shape.
    """
    z = logit.float()  # (B,)
    p = torch.as_tensor(p, device=z.device).float()  # (B,) or ()
    return -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z))


def soft_preference_loss(
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    p_a: torch.Tensor | float,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float | None = None,
) -> torch.Tensor:
    """Preference-model loss with soft labels (cross-entropy of a Bradley-Terry model against ``p_a``).

    Formula: with ``d = r_A - r_B - m``, ``L = mean_b -[p_A log sigmoid(d) + (1 - p_A) log sigmoid(-d)]``, plus
    ``c * mean_b (r_A + r_B)^2`` when ``center_rewards_coef = c`` is set. With ``p_A = 1`` (and no margin, no centering)
    this is the Bradley-Terry preference-model loss ``-log sigmoid(r_chosen - r_rejected)`` (Askell et al. 2021,
    arXiv:2112.00861, ``L_PM = log(1 + exp(r_bad - r_good))``) used by TRL's ``RewardTrainer``. The soft labels are
    the AI-feedback probabilities of Bai et al. 2022 (arXiv:2212.08073, section 4.1). ``margin`` is Llama 2's
    (arXiv:2307.09288, eq. 2) offset of the logit and ``center_rewards_coef`` is the centering term of Eisenstein et
    al. 2023 (arXiv:2312.09244, eq. 2), both as in TRL. With a soft label the margin shifts the decision boundary in
    A's favour for both terms.

    Args:
        reward_a: ``(B,)`` scalar rewards of response A (any float dtype; float32 inside).
        reward_b: ``(B,)`` scalar rewards of response B.
        p_a: ``(B,)`` or scalar probability that A is preferred (1.0 = A is the chosen response).
        margin: optional ``(B,)`` or scalar margin ``m``; ``None`` means 0.
        center_rewards_coef: optional coefficient of the reward-centering penalty; ``None`` disables it.

    Returns:
        Float32 scalar loss.
    """
    r_a = reward_a.float()  # (B,)
    r_b = reward_b.float()  # (B,)
    logit = r_a - r_b  # (B,)
    if margin is not None:
        logit = logit - torch.as_tensor(margin, device=logit.device).float()
    loss = soft_logistic_loss(logit, p_a).mean()  # ()
    if center_rewards_coef is not None:
        loss = loss + center_rewards_coef * torch.mean((r_a + r_b) ** 2)
    return loss
