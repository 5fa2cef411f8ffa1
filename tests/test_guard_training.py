"""Guards of the method's training objectives: the *effect* of PPO's KL penalty and the preference model's calibration.

The other training tests bound what a run reaches (a rising score, ``max KL < 100``, soft labels calibrating better
than hard ones), bounds that also held with the KL penalty switched off or with the soft labels misapplied (issue 14,
item 7). These compare against absolute or paired baselines instead. Each test names, in a comment, the bug it
catches.
"""

from __future__ import annotations

import pytest
from test_pm import pm_args, synthetic_pairs
from test_ppo import ppo_args

from cai.stages.pm import cli_main as pm_main
from cai.stages.ppo import cli_main as ppo_main
from helpers import scalars


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow  # two PPO runs (5 s): kept out of make test-fast's minute
def test_kl_penalty_keeps_the_policy_near_the_reference(tiny_model_dir, tmp_path):
    # Catches: the -β·KL reward not applied (β ignored, or the KL computed against the moving policy instead of the
    # frozen reference), or applied with the wrong sign: the penalised run would drift as far as the free one.
    kl = {}
    for beta in ("0.0", "1.0"):
        out = tmp_path / f"beta{beta}"
        extra = ["--model.optim.lr", "3e-3", "--model.ppo.ppo_epochs", "4", "--model.ppo.kl_coef", beta]
        ppo_main(
            ppo_args(tiny_model_dir, out, 20, *extra, "--trainer.callbacks", "[]", "--model.log_samples_every", "0")
        )
        kl[beta] = scalars(out, "objective/kl")
    free, penalised = mean(kl["0.0"][-5:]), mean(kl["1.0"][-5:])
    print(f"KL to the reference over the last 5 of 20 rollouts: β=0 {free:.1f}, β=1 {penalised:.1f}")
    # Measured (seed 0): β=0 drifts to 15 (70 after 40 rollouts), β=1 stays near 2.5.
    assert kl["0.0"][0] == kl["1.0"][0] == 0.0  # the first rollout samples the reference policy itself
    assert free > 8, f"without a penalty the policy should drift from the reference (KL {free:.1f})"
    assert penalised < free / 3, f"β=1 KL {penalised:.1f} vs β=0 KL {free:.1f}"


def test_soft_labels_give_a_calibrated_preference_model(tiny_model_dir, tmp_path):
    # Catches: soft labels misapplied in the loss (flipped to 1 - p, or hardened to 1) or in the data. The relative
    # test (test_pm.py: soft beats hard) passes with a flip, since hard labels flipped are worse still.
    def noisy(r):
        return min(1.0, max(0.5, r.gauss(0.7, 0.08)))

    train = synthetic_pairs(tmp_path / "train.jsonl", 256, 0, noisy)
    val = synthetic_pairs(tmp_path / "val.jsonl", 64, 1, noisy)
    cli = pm_main(pm_args(tiny_model_dir, train, val, tmp_path, 60, "--trainer.callbacks", "[]"))
    error = cli.trainer.callback_metrics["val/calibration_error"].item()
    print(f"calibration error of soft-label training against the soft labels: {error:.3f}")
    # Measured 0.030 (seed 0). For scale: predicting 0.5 everywhere scores 0.2, hard-label training 0.30, labels
    # flipped in the loss 0.4; 0.1 leaves a 3x margin over the measured value.
    assert error < 0.1, f"calibration error {error:.3f}"
