"""Tests for losses.preference: choice normalisation, clamping and the soft preference-model loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import clamp_probabilities, normalize_choice_logprobs, soft_logistic_loss, soft_preference_loss

FAST = settings(max_examples=50, deadline=None)
logprobs = st.floats(-1e4, 0.0, allow_nan=False)
rewards = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=8)


def neg_log_sigmoid(d: float) -> float:
    """-log sigmoid(d) = log(1 + exp(-d)), written stably."""
    return max(-d, 0.0) + math.log1p(math.exp(-abs(d)))


def test_normalize_choice_logprobs_by_hand():
    # P(A) = 0.2, P(B) = 0.6 (the rest of the mass on other tokens) -> 0.2 / 0.8 = 0.25
    p = normalize_choice_logprobs(torch.tensor(math.log(0.2)), torch.tensor(math.log(0.6)))
    assert p.item() == pytest.approx(0.25)
    assert normalize_choice_logprobs(-3.0, -3.0).item() == 0.5


@FAST
@given(a=logprobs, b=logprobs)
def test_normalize_choice_logprobs_stable_and_symmetric(a, b):
    p_ab = normalize_choice_logprobs(torch.tensor(a), torch.tensor(b))
    p_ba = normalize_choice_logprobs(torch.tensor(b), torch.tensor(a))
    assert torch.isfinite(p_ab) and 0.0 <= p_ab.item() <= 1.0
    assert p_ab.item() == pytest.approx(1.0 - p_ba.item(), abs=1e-6)
    # slow reference in float64 using the shift-by-max trick
    m = max(a, b)
    assert p_ab.item() == pytest.approx(math.exp(a - m) / (math.exp(a - m) + math.exp(b - m)), abs=1e-6)


def test_normalize_choice_logprobs_very_negative():
    # exp(-1e4) underflows to 0 in float32/64; the naive ratio would be 0/0 = nan
    p = normalize_choice_logprobs(torch.tensor([-1e4, -1e4]), torch.tensor([-1e4, -1e4 - math.log(3)]))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.75]))  # second: P(A) = 3 P(B) -> 3/4
    p16 = normalize_choice_logprobs(torch.tensor([-1e4]).bfloat16(), torch.tensor([-1e4]).bfloat16())
    assert p16.dtype == torch.float32 and p16.item() == 0.5


@FAST
@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_clamp_idempotent_and_bounded(p):
    x = torch.tensor(p)
    once = clamp_probabilities(x)
    assert ((once >= 0.4) & (once <= 0.6)).all()
    torch.testing.assert_close(clamp_probabilities(once), once, rtol=0, atol=0)
    inside = (x >= 0.4) & (x <= 0.6)
    torch.testing.assert_close(once[inside], x[inside], rtol=0, atol=0)


def test_clamp_by_hand_and_validation():
    torch.testing.assert_close(clamp_probabilities(torch.tensor([0.0, 0.45, 0.99])), torch.tensor([0.4, 0.45, 0.6]))
    torch.testing.assert_close(clamp_probabilities(torch.tensor([0.05]), 0.1, 0.9), torch.tensor([0.1]))
    with pytest.raises(ValueError):
        clamp_probabilities(torch.tensor([0.5]), low=0.7, high=0.3)


def test_soft_preference_loss_by_hand():
    # r_a - r_b = log 3 -> sigma = 3/4; p = 0.8: -(0.8 log 0.75 + 0.2 log 0.25)
    loss = soft_preference_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]), torch.tensor([0.8]))
    assert loss.item() == pytest.approx(-(0.8 * math.log(0.75) + 0.2 * math.log(0.25)))
    # margin 1, centering 0.5: logit log 3 - 1; centering 0.5 * (log 3 + 0)^2
    loss = soft_preference_loss(
        torch.tensor([math.log(3)]), torch.tensor([0.0]), 1.0, margin=1.0, center_rewards_coef=0.5
    )
    d = math.log(3) - 1.0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-d)) + 0.5 * math.log(3) ** 2)


@FAST
@given(ra=rewards, seed=st.integers(0, 1000))
def test_soft_loss_with_p_one_is_bradley_terry(ra, seed):
    r_a = torch.tensor(ra)
    r_b = torch.randn(len(ra), generator=torch.Generator().manual_seed(seed)) * 5
    bt = -torch.nn.functional.logsigmoid(r_a - r_b).mean()
    torch.testing.assert_close(soft_preference_loss(r_a, r_b, 1.0), bt, rtol=0, atol=0)
    torch.testing.assert_close(soft_preference_loss(r_a, r_b, torch.ones(len(ra))), bt, rtol=0, atol=0)
    # p = 0 is Bradley-Terry with the roles swapped
    torch.testing.assert_close(soft_preference_loss(r_a, r_b, 0.0), soft_preference_loss(r_b, r_a, 1.0))


@FAST
@given(r=rewards)
def test_soft_loss_half_label_equal_rewards_zero_grad(r):
    r_a = torch.tensor(r, requires_grad=True)
    r_b = torch.tensor(r, requires_grad=True)
    loss = soft_preference_loss(r_a, r_b, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))  # -(0.5 log 0.5 + 0.5 log 0.5)
    assert torch.equal(r_a.grad, torch.zeros_like(r_a)) and torch.equal(r_b.grad, torch.zeros_like(r_b))


@FAST
@given(ra=rewards, p=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_soft_loss_matches_python_and_bf16(ra, p, seed):
    r_a = torch.tensor(ra)
    r_b = torch.randn(len(ra), generator=torch.Generator().manual_seed(seed)) * 5
    expected = 0.0
    for x, y in zip(ra, r_b.tolist()):
        d = x - y
        expected += p * neg_log_sigmoid(d) + (1 - p) * neg_log_sigmoid(-d)
    assert soft_preference_loss(r_a, r_b, p).item() == pytest.approx(expected / len(ra), rel=1e-5, abs=1e-5)
    got = soft_preference_loss(r_a.bfloat16(), r_b.bfloat16(), p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, soft_preference_loss(r_a.bfloat16().float(), r_b.bfloat16().float(), p))


def test_soft_logistic_loss_is_bce_with_logits():
    gen = torch.Generator().manual_seed(0)
    z, p = torch.randn(16, generator=gen) * 4, torch.rand(16, generator=gen)
    torch.testing.assert_close(
        soft_logistic_loss(z, p), torch.nn.functional.binary_cross_entropy_with_logits(z, p, reduction="none")
    )
