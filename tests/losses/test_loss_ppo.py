"""Tests for losses.ppo against hand-computed values and slow, obviously-correct Python loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import (
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

FAST = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**31 - 1)
batch = st.integers(1, 4)
length = st.integers(1, 8)


def right_padded_mask(gen: torch.Generator, b: int, t: int, min_len: int = 1) -> torch.Tensor:
    """(B, T) bool mask: each row a response of random length in [min_len, T], then padding."""
    lengths = torch.randint(min_len, t + 1, (b,), generator=gen)
    return torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)


def junk_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Large random values to put at padding positions."""
    return torch.randn(x.shape, generator=gen) * 1e4 + 123.0


def with_padding(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, fill)


def close(actual, expected, atol=1e-6, rtol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float64).to(torch.float32)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def rows(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """Unpadded rows of x as python float lists."""
    return [[float(v) for v, keep in zip(xr, mr) if keep] for xr, mr in zip(x.double(), mask.bool())]


# ----------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_from_logits_matches_python_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen) * 3
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    for temperature in (1.0, 0.7, 2.0):
        out = logprobs_from_logits(logits, tokens, temperature=temperature)
        expected = []
        for b in range(3):
            row = []
            for t in range(5):
                z = [float(v) / temperature for v in logits[b, t].double()]
                lse = math.log(sum(math.exp(v) for v in z))
                row.append(z[int(tokens[b, t])] - lse)
            expected.append(row)
        close(out, expected)
        assert out.dtype == torch.float32 and out.shape == (3, 5)


def test_logprobs_from_logits_by_hand():
    # two equal logits -> each token has probability 1/2
    logits = torch.zeros(1, 1, 2)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.5))


def test_logprobs_from_logits_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_from_logits_matches_python_loop_and_uniform():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=gen) * 2
    expected = []
    for b in range(2):
        row = []
        for t in range(3):
            z = [float(v) for v in logits[b, t].double()]
            s = sum(math.exp(v) for v in z)
            row.append(-sum((math.exp(v) / s) * math.log(math.exp(v) / s) for v in z))
        expected.append(row)
    close(entropy_from_logits(logits), expected)
    # uniform over 8 tokens: entropy log 8
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8), abs=1e-6)
    # -inf logits (filtered tokens) contribute nothing: two live tokens of equal logit -> log 2, no nan
    z = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert entropy_from_logits(z).item() == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_penalty_by_hand():
    # policy prob 0.5, reference prob 0.25 -> log ratio log 2, r = pi_ref / pi = 0.5
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx((0.5 - 1) - math.log(0.5))


def test_kl_estimators_k1_k3_are_unbiased_exactly():
    # E_{x ~ pi}[k(x)] summed over the whole support must equal KL(pi || pi_ref) for k1 and k3 (Schulman 2020)
    gen = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(1, 10, generator=gen), -1)
    ref = torch.log_softmax(torch.randn(1, 10, generator=gen), -1)
    p = logp.exp()
    true_kl = float((p * (logp - ref)).sum())
    for est in ("k1", "k3"):
        assert float((p * kl_penalty(logp, ref, est)).sum()) == pytest.approx(true_kl, rel=1e-5)
    assert (kl_penalty(logp, ref, "k2") >= 0).all() and (kl_penalty(logp, ref, "k3") >= 0).all()


def test_kl_penalty_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ----------------------------------------------------------------------------- masked statistics


@FAST
@given(seed=seeds, b=batch, t=length)
def test_masked_stats_match_statistics_module(seed, b, t):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=gen) * 3 + 1
    mask = right_padded_mask(gen, b, t)
    flat = [v for r in rows(x, mask) for v in r]
    close(masked_mean(x, mask), statistics.fmean(flat))
    close(masked_var(x, mask, unbiased=False), statistics.pvariance(flat), atol=1e-5)
    if len(flat) > 1:
        close(masked_var(x, mask), statistics.variance(flat), atol=1e-5)
        mean, var = statistics.fmean(flat), statistics.variance(flat)
        white = masked_whiten(x, mask)
        expected = [
            [(v - mean) / math.sqrt(var + 1e-8) if k else 0.0 for v, k in zip(xr, mr)] for xr, mr in zip(x, mask)
        ]
        close(white, expected, atol=1e-4)
        kept = masked_whiten(x, mask, shift_mean=False)
        close(kept, [[e + mean if k else 0.0 for e, k in zip(er, mr)] for er, mr in zip(expected, mask)], atol=1e-4)
    per_row = masked_mean(x, mask, dim=1)
    close(per_row, [statistics.fmean(r) for r in rows(x, mask)])


def test_masked_mean_is_batch_mean_not_mean_of_row_means():
    # rows [1, 3] and [10, pad]: token mean (1 + 3 + 10) / 3, not ((1 + 3)/2 + 10)/2
    x = torch.tensor([[1.0, 3.0], [10.0, -5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(14 / 3)


def test_masked_edge_cases():
    x = torch.tensor([[2.0, 7.0]])
    assert masked_mean(x, torch.zeros(1, 2)).item() == 0.0  # empty mask: 0, not nan
    assert masked_var(x, torch.tensor([[1, 0]])).item() == 0.0  # one element: 0, not inf


@FAST
@given(seed=seeds, b=batch, t=length, nan_pad=st.booleans())
def test_masked_stats_ignore_padding_values(seed, b, t, nan_pad):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=gen)
    mask = right_padded_mask(gen, b, t)
    fill = torch.full_like(x, float("nan")) if nan_pad else junk_like(x, gen)
    x2 = with_padding(x, mask, fill)
    for fn in (masked_mean, masked_var, masked_whiten):
        torch.testing.assert_close(fn(x2, mask), fn(x, mask), rtol=0, atol=0)


# ----------------------------------------------------------------------------- GAE


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    """Textbook GAE on one unpadded episode; the value after the last step is 0."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def pad_rows(rows_: list[list[float]], t: int) -> list[list[float]]:
    return [r + [0.0] * (t - len(r)) for r in rows_]


@FAST
@given(seed=seeds, b=batch, t=length, gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0), nan_pad=st.booleans())
def test_gae_matches_per_sample_loop_with_random_right_padding(seed, b, t, gamma, lam, nan_pad):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=gen)
    values = torch.randn(b, t, generator=gen)
    mask = right_padded_mask(gen, b, t)
    fill = torch.full_like(rewards, float("nan")) if nan_pad else junk_like(rewards, gen)
    adv, ret = gae(with_padding(rewards, mask, fill), with_padding(values, mask, fill), mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = [], []
    for r, v in zip(rows(rewards, mask), rows(values, mask)):
        a, g = gae_reference(r, v, gamma, lam)
        exp_adv.append(a)
        exp_ret.append(g)
    close(adv, pad_rows(exp_adv, t), atol=1e-5)
    close(ret, pad_rows(exp_ret, t), atol=1e-5)
    # padding never changes the result, bit for bit
    adv0, ret0 = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, adv0, rtol=0, atol=0)
    torch.testing.assert_close(ret, ret0, rtol=0, atol=0)


def test_gae_by_hand():
    # rewards [0, 0, 1], values 0.5 each, gamma = lam = 1:
    # A_2 = 1 + 0 - 0.5 = 0.5; A_1 = (0 + 0.5 - 0.5) + 0.5 = 0.5; A_0 = 0.5; returns = A + V = 1
    adv, ret = gae(
        torch.tensor([[0.0, 0.0, 1.0, 9.0]]),
        torch.tensor([[0.5, 0.5, 0.5, 9.0]]),
        torch.tensor([[1, 1, 1, 0]]),
        gamma=1.0,
        lam=1.0,
    )
    close(adv, [[0.5, 0.5, 0.5, 0.0]])
    close(ret, [[1.0, 1.0, 1.0, 0.0]])


@FAST
@given(seed=seeds, b=batch, t=length, gamma=st.floats(0.5, 1.0))
def test_gae_lambda_limits(seed, b, t, gamma):
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(b, t, generator=gen), torch.randn(b, t, generator=gen)
    mask = right_padded_mask(gen, b, t)
    m = mask.float()
    # gamma = lam = 1: advantage = sum of future rewards - value
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    future = (rewards * m).flip(1).cumsum(1).flip(1)
    close(adv, (future - values) * m, atol=1e-5)
    # lam = 0: one-step TD error r_t + gamma V_{t+1} - V_t, with V after the last token = 0
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_v = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros(b, 1)], dim=1)
    close(adv, (rewards + gamma * next_v - values) * m, atol=1e-5)


def test_gae_left_padding_equals_right_padding():
    gen = torch.Generator().manual_seed(3)
    r, v = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    right = gae(
        torch.cat([r, torch.ones(1, 2)], 1), torch.cat([v, torch.ones(1, 2)], 1), torch.tensor([[1, 1, 1, 0, 0]])
    )
    left = gae(
        torch.cat([torch.ones(1, 2), r], 1), torch.cat([torch.ones(1, 2), v], 1), torch.tensor([[0, 0, 1, 1, 1]])
    )
    torch.testing.assert_close(right[0][:, :3], left[0][:, 2:])
    torch.testing.assert_close(right[1][:, :3], left[1][:, 2:])


@FAST
@given(seed=seeds, t=st.integers(2, 8), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_skips_interior_padding(seed, t, gamma, lam):
    # masked positions inside a row are not time steps: the result equals GAE on the compacted response
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(1, t, generator=gen), torch.randn(1, t, generator=gen)
    mask = torch.rand(1, t, generator=gen) < 0.6
    mask[0, 0] = True
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = gae_reference(rows(rewards, mask)[0], rows(values, mask)[0], gamma, lam)
    close(adv[mask], exp_adv, atol=1e-5)
    close(ret[mask], exp_ret, atol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


# ----------------------------------------------------------------------------- reward shaping


def test_per_token_rewards_by_hand():
    # row 0: 3 response tokens, row 1: 1 token, row 2: empty. kl_coef 0.5, k1 KL = logp - ref
    logp = torch.tensor([[-1.0, -2.0, -3.0, 5.0], [-1.0, 7.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    score = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = per_token_rewards(score, logp, ref, mask, kl_coef=0.5)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # -0.5 * kl, plus the score on the last response token; the empty row gets nothing
    close(rewards, [[-0.25, 0.5, 10.0, 0.0], [-0.5 + 20.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@FAST
@given(seed=seeds, b=batch, t=length, beta=st.floats(0.0, 1.0), est=st.sampled_from(["k1", "k2", "k3"]))
def test_per_token_rewards_matches_loop(seed, b, t, beta, est):
    gen = torch.Generator().manual_seed(seed)
    logp, ref = -torch.rand(b, t, generator=gen) * 3, -torch.rand(b, t, generator=gen) * 3
    mask = right_padded_mask(gen, b, t)
    score = torch.randn(b, generator=gen)
    rewards, kl = per_token_rewards(score, with_padding(logp, mask, junk_like(logp, gen)), ref, mask, beta, est)
    for i in range(b):
        n = int(mask[i].sum())
        for j in range(t):
            lr = float(logp[i, j]) - float(ref[i, j])
            k = {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) - 1 + lr}[est] if j < n else 0.0
            expected = -beta * k + (float(score[i]) if j == n - 1 else 0.0)
            assert kl[i, j].item() == pytest.approx(k, abs=1e-5)
            assert rewards[i, j].item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- policy / value losses


def test_policy_loss_by_hand():
    eps = 0.2
    mask = torch.ones(1, 1)
    # ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), mask, eps)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0
    # ratio 1.5, A = -1: max(1.5, 1.2) = 1.5 (unclipped); d/dlogp (-A * exp(logp - old)) = ratio = 1.5
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), mask, eps)
    assert loss.item() == pytest.approx(1.5) and stats["clipfrac"].item() == 0.0
    loss.backward()
    assert logp.grad.item() == pytest.approx(1.5)
    # approx_kl = (log 1.5)^2 / 2; k3 = (1.5 - 1) - log 1.5
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    assert stats["approx_kl_k3"].item() == pytest.approx(0.5 - math.log(1.5))
    assert stats["ratio_mean"].item() == pytest.approx(1.5)


@FAST
@given(seed=seeds, b=batch, t=length, eps=st.floats(0.05, 0.5), nan_pad=st.booleans())
def test_policy_loss_matches_loop_and_ignores_padding(seed, b, t, eps, nan_pad):
    gen = torch.Generator().manual_seed(seed)
    logp, old = -torch.rand(b, t, generator=gen) * 2, -torch.rand(b, t, generator=gen) * 2
    adv = torch.randn(b, t, generator=gen)
    mask = right_padded_mask(gen, b, t)
    fill = torch.full_like(logp, float("nan")) if nan_pad else junk_like(logp, gen)
    lp = with_padding(logp, mask, fill).requires_grad_(True)
    loss, stats = policy_loss(lp, with_padding(old, mask, fill), with_padding(adv, mask, fill), mask, eps)
    terms, clipped, kls = [], [], []
    for lr, o, a in zip(rows(logp, mask), rows(old, mask), rows(adv, mask)):
        for x, y, z in zip(lr, o, a):
            ratio = math.exp(x - y)
            u, c = -z * ratio, -z * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(u, c))
            clipped.append(1.0 if c > u else 0.0)
            kls.append(0.5 * (x - y) ** 2)
    assert loss.item() == pytest.approx(statistics.fmean(terms), abs=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(statistics.fmean(clipped), abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(statistics.fmean(kls), abs=1e-5)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()  # padding gets no (and no nan) gradient
    ref_loss, ref_stats = policy_loss(logp, old, adv, mask, eps)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    for k in ref_stats:
        torch.testing.assert_close(stats[k], ref_stats[k], rtol=0, atol=0)


def test_value_loss_by_hand():
    # v = 1.0, v_old = 0.0, R = 2.0, eps = 0.2: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    v, old, ret, m = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1)
    loss, stats = value_loss(v, old, ret, m, 0.2)
    assert loss.item() == pytest.approx(1.62) and stats["clipfrac"].item() == 1.0
    loss, stats = value_loss(v, old, ret, m, None)  # plain 0.5 * (1 - 2)^2
    assert loss.item() == pytest.approx(0.5) and stats["clipfrac"].item() == 0.0


@FAST
@given(seed=seeds, b=batch, t=length, eps=st.floats(0.05, 0.5), nan_pad=st.booleans())
def test_value_loss_matches_loop_and_ignores_padding(seed, b, t, eps, nan_pad):
    gen = torch.Generator().manual_seed(seed)
    v, old, ret = (torch.randn(b, t, generator=gen) for _ in range(3))
    mask = right_padded_mask(gen, b, t)
    fill = torch.full_like(v, float("nan")) if nan_pad else junk_like(v, gen)
    vp = with_padding(v, mask, fill).requires_grad_(True)
    loss, stats = value_loss(vp, with_padding(old, mask, fill), with_padding(ret, mask, fill), mask, eps)
    terms, clipped = [], []
    for a, o, r in zip(rows(v, mask), rows(old, mask), rows(ret, mask)):
        for x, y, z in zip(a, o, r):
            e1, e2 = (x - z) ** 2, (min(max(x, y - eps), y + eps) - z) ** 2
            terms.append(max(e1, e2))
            clipped.append(1.0 if e2 > e1 else 0.0)
    assert loss.item() == pytest.approx(0.5 * statistics.fmean(terms), abs=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(statistics.fmean(clipped), abs=1e-6)
    assert stats["value_mean"].item() == pytest.approx(statistics.fmean(x for r in rows(v, mask) for x in r), abs=1e-5)
    loss.backward()
    assert torch.isfinite(vp.grad).all() and (vp.grad[~mask] == 0).all()
    ref_loss, _ = value_loss(v, old, ret, mask, eps)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)  # perfect predictions
    const = torch.full_like(ret, 7.0)  # a constant explains nothing: Var(R - c) = Var(R)
    assert explained_variance(const, ret, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask).item())  # constant returns


# ----------------------------------------------------------------------------- bf16 inputs


@FAST
@given(seed=seeds, b=batch, t=length)
def test_bf16_inputs_give_the_float32_result(seed, b, t):
    gen = torch.Generator().manual_seed(seed)
    mask = right_padded_mask(gen, b, t)
    x, y, z = (torch.randn(b, t, generator=gen) for _ in range(3))
    logits = torch.randn(b, t, 11, generator=gen) * 4
    tokens = torch.randint(0, 11, (b, t), generator=gen)
    x16, y16, z16 = x.bfloat16(), y.bfloat16(), z.bfloat16()
    xf, yf, zf = x16.float(), y16.float(), z16.float()
    pairs = [
        (logprobs_from_logits(logits.bfloat16(), tokens), logprobs_from_logits(logits.bfloat16().float(), tokens)),
        (entropy_from_logits(logits.bfloat16()), entropy_from_logits(logits.bfloat16().float())),
        (kl_penalty(x16, y16, "k3"), kl_penalty(xf, yf, "k3")),
        (masked_mean(x16, mask), masked_mean(xf, mask)),
        (masked_var(x16, mask), masked_var(xf, mask)),
        (masked_whiten(x16, mask), masked_whiten(xf, mask)),
        (gae(x16, y16, mask)[0], gae(xf, yf, mask)[0]),
        (per_token_rewards(z16[:, 0], x16, y16, mask, 0.1)[0], per_token_rewards(zf[:, 0], xf, yf, mask, 0.1)[0]),
        (policy_loss(x16, y16, z16, mask)[0], policy_loss(xf, yf, zf, mask)[0]),
        (value_loss(x16, y16, z16, mask)[0], value_loss(xf, yf, zf, mask)[0]),
    ]
    for got, want in pairs:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
