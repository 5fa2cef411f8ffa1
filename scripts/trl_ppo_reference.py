"""TRL 1.12.0's PPO rollout post-processing and losses, transcribed, for parity checks.

``trl.experimental.ppo.PPOTrainer.train`` computes the KL reward shaping, GAE, advantage whitening and the clipped
policy and value losses inline, so they cannot be called. ``trl_rollout`` and ``trl_losses`` transcribe those lines
(cited in each function) and call TRL's own ``masked_mean``, ``masked_whiten`` and ``INVALID_LOGPROB``.
``random_rollout`` makes inputs in TRL's layout (right-padded responses, TRL's ``first_true_indices`` lengths). Used
by ``tests/losses/test_loss_trl_parity.py`` and by ``scripts/bench_parity.py``. Needs the ``bench`` extra (TRL).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from trl.experimental.ppo import ppo_trainer as trl_ppo
from trl.experimental.utils import first_true_indices


def trl_rollout(logprobs, ref_logprobs, values, scores, sequence_lengths, kl_coef, kl_estimator, gamma, lam, whiten):
    """Rewards, advantages and returns exactly as TRL's PPOTrainer computes them."""
    # transcription of trl/experimental/ppo/ppo_trainer.py lines 762-798 (TRL 1.12.0), PPOTrainer.train: padding
    # masks, "4. compute rewards", "5. whiten rewards", "6. compute advantages and returns". Changes: ``args.*`` are
    # arguments, ``responses.shape`` is ``logprobs.shape``, ``device=`` and ``empty_cache()`` dropped (CPU only).
    # masked_whiten and INVALID_LOGPROB are TRL's own objects.
    inv = trl_ppo.INVALID_LOGPROB
    responses_shape = logprobs.shape
    response_idxs = torch.arange(responses_shape[1]).repeat(responses_shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, inv)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, inv)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    if whiten:
        rewards = trl_ppo.masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses_shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_ppo.masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return SimpleNamespace(
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        padding_mask=padding_mask,
        padding_mask_p1=padding_mask_p1,
    )


def trl_losses(new_logprobs, vpred, roll, cliprange, cliprange_value):
    """Policy and value losses and stats exactly as TRL's PPOTrainer computes them."""
    # transcription of trl/experimental/ppo/ppo_trainer.py lines 824-857 (TRL 1.12.0), PPOTrainer.train inner loop,
    # for one micro-batch holding the whole batch (``mb_*[micro_batch_inds]`` -> the full tensors, ``args.*`` ->
    # arguments; the optimizer step and stats buffers dropped). masked_mean and INVALID_LOGPROB are TRL's own objects.
    mm = trl_ppo.masked_mean
    new_logprobs = torch.masked_fill(new_logprobs, roll.padding_mask, trl_ppo.INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, roll.padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, roll.values - cliprange_value, roll.values + cliprange_value)
    vf_losses1 = torch.square(vpred - roll.returns)
    vf_losses2 = torch.square(vpredclipped - roll.returns)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * mm(vf_loss_max, ~roll.padding_mask_p1)
    vf_clipfrac = mm((vf_losses2 > vf_losses1).float(), ~roll.padding_mask_p1)
    logprobs_diff = new_logprobs - roll.logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -roll.advantages * ratio
    pg_losses2 = -roll.advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = mm(pg_loss_max, ~roll.padding_mask)
    pg_clipfrac = mm((pg_losses2 > pg_losses).float(), ~roll.padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return SimpleNamespace(
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        pg_clipfrac=pg_clipfrac,
        vf_clipfrac=vf_clipfrac,
        approxkl=approxkl,
        ratio_mean=ratio.mean(),
    )


def random_rollout(seed: int, b: int, t: int):
    gen = torch.Generator().manual_seed(seed)
    pad = 0
    # responses of length >= 1, right-padded with pad; sequence_lengths = index of the last real token, computed by
    # TRL's own first_true_indices as in PPOTrainer.train
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = max(int(lengths[0]), 2)  # TRL's unbiased whitening needs >= 2 tokens in the batch (else nan)
    responses = torch.randint(1, 50, (b, t), generator=gen)
    responses = torch.where(torch.arange(t) < lengths.unsqueeze(1), responses, pad)
    sequence_lengths = first_true_indices(responses == pad) - 1
    logprobs = -torch.rand(b, t, generator=gen) * 4
    ref_logprobs = logprobs + torch.randn(b, t, generator=gen) * 0.3
    values = torch.randn(b, t, generator=gen)
    scores = torch.randn(b, generator=gen) * 2
    new_logprobs = logprobs + torch.randn(b, t, generator=gen) * 0.3
    vpred = values + torch.randn(b, t, generator=gen) * 0.5
    return SimpleNamespace(
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        sequence_lengths=sequence_lengths,
        new_logprobs=new_logprobs,
        vpred=vpred,
    )
