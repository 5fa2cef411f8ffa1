"""Tests for the KL-coefficient controllers (Ziegler et al. 2019, arXiv:1909.08593, section 2.2)."""

from __future__ import annotations

import pytest

from losses import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_by_hand():
    # KL 7.2 vs target 6: e = 0.2 (exactly at the clip); K = 64 / 10000 -> beta *= 1 + 0.2 * 0.0064
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.2, 64)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.0064))
    # KL 4.5 vs 6: e = -0.25 clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(4.5, 64)
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 0.0064))
    # KL 6.6: e = 0.1, not clipped
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(6.6, 10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))


def test_adaptive_controller_direction_and_clipping():
    up, down, same = (AdaptiveKLController(0.2, target=1.0, horizon=100) for _ in range(3))
    up.update(3.0, 10)
    down.update(0.1, 10)
    same.update(1.0, 10)
    assert up.value > 0.2 > down.value and same.value == pytest.approx(0.2)
    # the error is clipped at +-0.2, so a huge KL moves beta no more than a KL of 1.2 x target
    huge, edge = AdaptiveKLController(0.2, 1.0, 100), AdaptiveKLController(0.2, 1.0, 100)
    huge.update(1e6, 10)
    edge.update(1.2, 10)
    assert huge.value == pytest.approx(edge.value)


def test_adaptive_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for kl in (8.0, 3.0, 7.0):
        ctl.update(kl, 32)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    ctl.update(9.0, 32)
    restored.update(9.0, 32)
    assert restored.value == ctl.value


def test_adaptive_controller_validates():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=-1)
