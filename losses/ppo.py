"""PPO pieces for the RL-CAI stage (RL from AI feedback, Bai et al. 2022, arXiv:2212.08073, section 4).

Conventions: every per-token tensor is ``(B, T)`` over the response tokens; ``mask`` is 1 on response tokens and 0 on
padding. Values at masked positions never change any result (they are replaced by 0 before use, so even ``nan`` or
``inf`` padding is harmless, gradients included) and per-token outputs are 0 there. Everything is computed in float32,
whatever the input dtype. "Masked mean" is the mean over all unmasked elements of the batch (not a mean of per-sequence
means), as in TRL's ``PPOTrainer``.
"""

from __future__ import annotations

import torch

__all__ = [
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "value_loss",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x as float32 with 0 at masked positions, mask as bool)``."""
    m = mask.bool()
    x = x.float()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)), m


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the taken tokens.

    Formula: ``log pi(a_t | s_t) = log_softmax(z_t / tau)[a_t]`` where ``z_t`` are the logits that predict ``a_t``
    (the caller aligns them: for a causal LM, ``logits[:, :-1]`` predicts ``input_ids[:, 1:]``).

    Memory: the float32 upcast and the ``log_softmax`` output are each a full ``(B, T, V)`` float32 tensor (about
    ``4 * B * T * V`` bytes, e.g. 2 GiB for B*T = 4096 tokens and V = 128k); call it on slices of the batch when that
    is too much. Sampling temperature ``tau`` must match the one used to generate, or the PPO ratio is biased.

    Args:
        logits: ``(B, T, V)`` logits, any float dtype (upcast to float32).
        tokens: ``(B, T)`` int64 ids of the taken tokens.
        temperature: sampling temperature ``tau > 0``.

    Returns:
        ``(B, T)`` float32 log-probabilities.

    Raises:
        ValueError: if ``temperature <= 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()  # (B, T, V)
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (B, T, V)
    return logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution given by the logits.

    Formula: ``H(p) = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v`` (the form TRL's ``PPOTrainer``
    logs), evaluated on ``z - max(z)`` (H is shift-invariant): both terms are then small and of the same sign, so a
    peaked distribution does not lose its entropy to cancellation between two numbers of size ``max(z)``. Logits equal
    to ``-inf`` (tokens removed by top-k/top-p) contribute 0, not ``nan``. Memory as for ``logprobs_from_logits``.

    Args:
        logits: ``(B, T, V)`` logits, any float dtype (upcast to float32).

    Returns:
        ``(B, T)`` float32 entropies in nats.
    """
    z = logits.float()  # (B, T, V)
    z = z - z.amax(dim=-1, keepdim=True).detach()  # (B, T, V) max 0
    probs = torch.softmax(z, dim=-1)  # (B, T, V)
    z_finite = torch.where(torch.isneginf(z), torch.zeros((), device=z.device), z)  # (B, T, V) 0 * -inf -> 0
    return torch.logsumexp(z, dim=-1) - (probs * z_finite).sum(dim=-1)  # (B, T)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    Formulas (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html), with
    ``log r = ref_logp - logp``:

    - ``k1 = -log r = logp - ref_logp`` (unbiased, high variance, can be negative);
    - ``k2 = (log r)^2 / 2`` (biased, low variance, >= 0);
    - ``k3 = (r - 1) - log r`` (unbiased, low variance, >= 0).

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logp: ``(B, T)`` log-probs of the same tokens under the reference model.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        ``(B, T)`` float32 per-token KL estimates (no masking; see ``per_token_rewards``).

    Raises:
        ValueError: for an unknown estimator.
    """
    log_ratio = logp.float() - ref_logp.float()  # (B, T)  = -log r
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, expm1 for accuracy near r = 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the unmasked elements.

    Formula: ``sum(x * m) / sum(m)`` over the whole batch (``dim=None``) or along ``dim``. An empty mask gives 0
    (TRL's ``masked_mean`` gives ``nan``).

    Args:
        x: ``(B, T)`` values, any float dtype (float32 inside).
        mask: ``(B, T)`` 1 on counted elements, 0 on padding.
        dim: optional dimension to reduce; ``None`` reduces everything.

    Returns:
        Float32 scalar, or the tensor reduced along ``dim``.
    """
    xm, m = _masked(x, mask)  # (B, T), (B, T)
    if dim is None:
        return xm.sum() / m.sum().clamp(min=1)
    return xm.sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the unmasked elements of the whole batch.

    Formula: ``mean_m((x - mean_m(x))^2) * n / (n - 1)`` with ``n = sum(m)`` when ``unbiased`` (Bessel's correction,
    TRL's default) and without the factor otherwise. Unlike TRL, ``n <= 1`` gives 0 rather than raising or ``inf``.

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)`` 1 on counted elements.
        unbiased: apply Bessel's correction.

    Returns:
        Float32 scalar.
    """
    xm, m = _masked(x, mask)  # (B, T)
    mean = masked_mean(xm, m)  # ()
    var = masked_mean((xm - mean) ** 2, m)  # ()
    if unbiased:
        n = m.sum().float()  # ()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Standardise ``x`` with the masked mean and (unbiased) variance of the batch.

    Formula: ``(x - mu) / sqrt(sigma^2 + eps)``, plus ``mu`` back when ``shift_mean=False`` (rescale only), with
    ``mu = masked_mean(x)``, ``sigma^2 = masked_var(x, unbiased=True)`` as in TRL's ``masked_whiten``. Used for
    advantage normalisation (e.g. Huang et al. 2022, "The 37 implementation details of PPO", detail 7). Outputs at
    masked positions are 0 (TRL leaves whitened padding there and fills it with 0 afterwards).

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)`` 1 on counted elements.
        shift_mean: if False, keep the original mean (only rescale).
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)`` float32.
    """
    xm, m = _masked(x, mask)  # (B, T)
    mean = masked_mean(xm, m)  # ()
    var = masked_var(xm, m, unbiased=True)  # ()
    whitened = (xm - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), device=whitened.device))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens.

    Formula (Schulman et al. 2016, arXiv:1506.02438, eq. 16): ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t``. Only response tokens are time steps: masked
    positions are skipped (their rewards and values are ignored), so ``t+1`` is the next response token and the value
    after the last response token is 0 (the episode ends there). Right, left or interior padding all work. Vectorised
    over the batch, one reverse loop over ``T``. Returns are regression targets: call under ``torch.no_grad()``.

    Args:
        rewards: ``(B, T)`` per-token rewards (see ``per_token_rewards``).
        values: ``(B, T)`` value estimates ``V(s_t)``.
        mask: ``(B, T)`` 1 on response tokens.
        gamma: discount factor.
        lam: GAE ``lambda``; 1 gives Monte-Carlo returns minus values, 0 gives one-step TD errors.

    Returns:
        ``(advantages, returns)``, each ``(B, T)`` float32, 0 at masked positions.
    """
    r, m = _masked(rewards, mask)  # (B, T)
    v, _ = _masked(values, mask)  # (B, T)
    next_value = torch.zeros_like(v[:, 0])  # (B,) value of the next response token; 0 after the last one
    next_adv = torch.zeros_like(v[:, 0])  # (B,)
    advantages = []
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        adv_t = delta + gamma * lam * next_adv  # (B,)
        m_t = m[:, t]  # (B,)
        advantages.append(torch.where(m_t, adv_t, torch.zeros_like(adv_t)))
        next_value = torch.where(m_t, v[:, t], next_value)  # padding does not advance time
        next_adv = torch.where(m_t, adv_t, next_adv)
    adv = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return adv, adv + v


def per_token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-shaped per-token rewards for RLHF/RL-CAI.

    Formula: ``r_t = -beta KL_t + [t = last response token] * score`` with ``KL_t = kl_penalty(logp, ref_logp)``. The
    KL-regularised reward ``R = r_PM - beta KL(pi || pi_0)`` of Ziegler et al. 2019 (arXiv:1909.08593, eq. 2) and Bai
    et al. 2022 (arXiv:2204.05862, eq. 4.1), spread over tokens as TRL's ``PPOTrainer`` does. Difference from TRL
    by design: TRL adds the score one position *after* the last response token (at the first padding position, with
    that position's value kept) unless the response fills the whole length; here it goes on the last response token
    itself, and the value after it is 0 (see ``gae``).

    Args:
        score: ``(B,)`` preference-model score of each full response.
        logp: ``(B, T)`` policy log-probs of the response tokens.
        ref_logp: ``(B, T)`` reference-model log-probs of the same tokens.
        mask: ``(B, T)`` 1 on response tokens; the score goes on each row's last position with ``mask == 1``.
        kl_coef: ``beta``, a float or 0-dim tensor (e.g. ``AdaptiveKLController.value``).
        estimator: KL estimator, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, each ``(B, T)`` float32, 0 at masked positions. A row without response tokens gets no score.
    """
    m = mask.bool()  # (B, T)
    lp, _ = _masked(logp, m)  # (B, T)
    rlp, _ = _masked(ref_logp, m)  # (B, T)
    kl = torch.where(m, kl_penalty(lp, rlp, estimator), torch.zeros((), device=lp.device))  # (B, T)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, positions, -1).amax(dim=1, keepdim=True)  # (B, 1) -1 when the row is empty
    is_last = positions == last  # (B, T)
    rewards = -kl_coef * kl + torch.where(is_last, score.float().unsqueeze(1), torch.zeros((), device=lp.device))
    return rewards, kl


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate policy loss.

    Formula (Schulman et al. 2017, arXiv:1707.06347, eq. 7, as a loss): with ``rho_t = exp(logp_t - old_logp_t)``,
    ``L = masked_mean(max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)))``. ``old_logp`` and ``advantages`` are
    constants (detached).

    Stats (detached float32 scalars, masked means): ``clipfrac`` = fraction of tokens where the clipped term is the
    larger one; ``approx_kl`` = ``(logp - old_logp)^2 / 2`` (Schulman's k2, TRL ``PPOTrainer``'s ``approxkl``, though
    TRL averages over padding too); ``approx_kl_k3`` = ``(rho - 1) - log rho`` (CleanRL's ``approx_kl``);
    ``ratio_mean``; ``ratio_max``.

    Args:
        logp: ``(B, T)`` log-probs of the taken tokens under the current policy (with grad).
        old_logp: ``(B, T)`` log-probs under the policy that sampled them.
        advantages: ``(B, T)`` advantages (usually whitened).
        mask: ``(B, T)`` 1 on response tokens.
        clip_range: ``eps``.

    Returns:
        ``(loss, stats)``: float32 scalar loss and a dict of detached scalars.
    """
    lp, m = _masked(logp, mask)  # (B, T)
    old, _ = _masked(old_logp.detach(), m)  # (B, T)
    adv, _ = _masked(advantages.detach(), m)  # (B, T)
    log_ratio = lp - old  # (B, T) 0 on padding
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)  # ()
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio**2, m),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, torch.zeros((), device=ratio.device)).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss.

    Formula: ``L = 1/2 masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))``, the value clipping
    of OpenAI baselines' PPO2 (Huang et al. 2022, "The 37 implementation details of PPO", detail 9) as used by TRL's
    ``PPOTrainer``; ``clip_range=None`` gives the plain ``1/2 masked_mean((V - R)^2)`` (Schulman et al. 2017,
    arXiv:1707.06347, eq. 9 ``L^VF``). ``old_values`` and ``returns`` are constants (detached).

    Stats (detached float32 scalars): ``clipfrac`` (fraction of tokens where the clipped error is the larger),
    ``value_mean``, ``explained_variance`` (see ``explained_variance``).

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` value predictions at rollout time.
        returns: ``(B, T)`` regression targets (from ``gae``).
        mask: ``(B, T)`` 1 on response tokens.
        clip_range: ``eps``, or ``None`` to disable clipping.

    Returns:
        ``(loss, stats)``.
    """
    v, m = _masked(values, mask)  # (B, T)
    old, _ = _masked(old_values.detach(), m)  # (B, T)
    ret, _ = _masked(returns.detach(), m)  # (B, T)
    err = (v - ret) ** 2  # (B, T)
    if clip_range is None:
        per_token = err
        clipfrac = torch.zeros((), device=v.device)
    else:
        v_clipped = torch.clamp(v, old - clip_range, old + clip_range)  # (B, T)
        err_clipped = (v_clipped - ret) ** 2  # (B, T)
        per_token = torch.maximum(err, err_clipped)
        clipfrac = masked_mean((err_clipped > err).float(), m)
    loss = 0.5 * masked_mean(per_token, m)  # ()
    stats = {
        "clipfrac": clipfrac.detach(),
        "value_mean": masked_mean(v, m).detach(),
        "explained_variance": explained_variance(v, ret, m),
    }
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns that the value function explains.

    Formula: ``EV = 1 - Var_m(R - V) / Var_m(R)`` (masked, biased variances; 1 = perfect, 0 = no better than a
    constant, < 0 = worse), as logged by OpenAI baselines / Stable-Baselines3. ``nan`` when ``Var_m(R) = 0``.

    Args:
        values: ``(B, T)`` value predictions.
        returns: ``(B, T)`` returns.
        mask: ``(B, T)`` 1 on response tokens.

    Returns:
        Float32 scalar, detached.
    """
    with torch.no_grad():
        v, m = _masked(values.detach(), mask)  # (B, T)
        ret, _ = _masked(returns.detach(), m)  # (B, T)
        var_r = masked_var(ret, m, unbiased=False)  # ()
        var_err = masked_var(ret - v, m, unbiased=False)  # ()
        return torch.where(var_r > 0, 1.0 - var_err / var_r, torch.full_like(var_r, float("nan")))
