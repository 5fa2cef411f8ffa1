"""Tests for losses.dpo."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import dpo_implicit_rewards, dpo_loss

FAST = settings(max_examples=50, deadline=None)


def random_logps(seed: int, b: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(b, generator=gen) * 50 for _ in range(4)]


def test_dpo_loss_by_hand():
    # policy gains log 3 on chosen and loses nothing on rejected; beta = 1 -> Delta = log 3, sigma = 3/4
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0 + math.log(3), -20.0, -10.0, -20.0))
    assert dpo_loss(pc, pr, rc, rr, beta=1.0).item() == pytest.approx(-math.log(0.75))
    # soft label 0.6 -> -(0.6 log 3/4 + 0.4 log 1/4)
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, p_chosen=0.6).item() == pytest.approx(
        -(0.6 * math.log(0.75) + 0.4 * math.log(0.25))
    )
    # policy == reference -> loss log 2 whatever beta
    assert dpo_loss(rc, rr, rc, rr, beta=0.3).item() == pytest.approx(math.log(2))
    chosen, rejected = dpo_implicit_rewards(pc, pr, rc, rr, beta=0.5)
    assert chosen.item() == pytest.approx(0.5 * math.log(3)) and rejected.item() == pytest.approx(0.0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), beta=st.floats(0.01, 2.0))
def test_dpo_soft_p_one_equals_plain_and_matches_loop(seed, b, beta):
    pc, pr, rc, rr = random_logps(seed, b)
    plain = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, p_chosen=1.0), plain, rtol=0, atol=0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, p_chosen=torch.ones(b)), plain, rtol=0, atol=0)
    expected = 0.0
    for a, c, d, e in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - d) - (c - e))
        expected += max(-z, 0) + math.log1p(math.exp(-abs(z)))  # -log sigmoid(z)
    assert plain.item() == pytest.approx(expected / b, rel=1e-5, abs=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), eps=st.floats(0.0, 0.5))
def test_dpo_soft_equals_conservative_label_smoothing(seed, b, eps):
    # cDPO: (1 - eps) * L(Delta) + eps * L(-Delta) == soft form with p = 1 - eps
    pc, pr, rc, rr = random_logps(seed, b)
    cdpo = (1 - eps) * dpo_loss(pc, pr, rc, rr) + eps * dpo_loss(pr, pc, rr, rc)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, p_chosen=1 - eps), cdpo, rtol=1e-5, atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8))
def test_dpo_bf16_inputs_give_float32_result(seed, b):
    logps = random_logps(seed, b)
    got = dpo_loss(*(x.bfloat16() for x in logps), p_chosen=0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, dpo_loss(*(x.bfloat16().float() for x in logps), p_chosen=0.7), rtol=1e-6, atol=1e-6
    )


def test_dpo_gradient_direction():
    pc, pr, rc, rr = random_logps(1, 4)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
