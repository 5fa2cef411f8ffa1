"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290).

An alternative to the PPO stage of RL-CAI: optimise the policy directly on (soft) AI-feedback preference labels.
All log-probabilities here are sequence log-probabilities (sum of per-token log-probs over the response).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.preference import soft_logistic_loss

__all__ = ["dpo_implicit_rewards", "dpo_loss"]


def dpo_implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards of the chosen and rejected responses (for logging; detached).

    Formula: ``r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, arXiv:2305.18290,
    eq. 5, without the prompt-only ``beta log Z(x)`` term, which cancels in every comparison). Matches the
    ``rewards/chosen`` and ``rewards/rejected`` metrics of TRL's ``DPOTrainer``.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected responses.
        ref_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the reference model.
        ref_rejected_logps: ``(B,)`` same for the rejected responses.
        beta: KL-regularisation strength ``beta``.

    Returns:
        ``(chosen_rewards, rejected_rewards)``, each ``(B,)`` float32, detached.
    """
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())  # (B,)
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())  # (B,)
    return chosen.detach(), rejected.detach()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    p_chosen: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """DPO loss, optionally against soft preference labels.

    Formula: with ``Delta = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))``,
    ``L = mean_b -log sigmoid(beta Delta)`` (Rafailov et al. 2023, arXiv:2305.18290, eq. 7). With ``p_chosen = p``,
    ``L = mean_b -[p log sigmoid(beta Delta) + (1 - p) log sigmoid(-beta Delta)]``: the cross-entropy of the implied
    Bradley-Terry model against soft labels (e.g. RL-CAI feedback probabilities, Bai et al. 2022, arXiv:2212.08073,
    section 4.1). It equals the label-smoothed "conservative DPO" loss (Mitchell 2023, "A note on DPO with noisy
    preferences") with ``epsilon = 1 - p``; ``p = 1`` gives plain DPO.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected responses.
        ref_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the reference model.
        ref_rejected_logps: ``(B,)`` same for the rejected responses.
        beta: KL-regularisation strength ``beta``.
        p_chosen: optional ``(B,)`` or scalar probability that the "chosen" response is preferred.

    Returns:
        Float32 scalar loss.
    """
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    if p_chosen is None:
        return -F.logsigmoid(logits).mean()
    return soft_logistic_loss(logits, p_chosen).mean()
