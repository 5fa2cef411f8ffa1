"""Settings are checked when the config is built, before any model is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cai.method.feedback import FeedbackConfig
from cai.method.generation import SamplingConfig
from cai.stages.ppo import PPOConfig
from cai.stages.sl_data import CritiqueConfig
from helpers import clean_env


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SamplingConfig(max_new_tokens=0), "sampling.max_new_tokens=0: must be at least 1"),
        (lambda: SamplingConfig(batch_size=-1), "sampling.batch_size=-1"),
        (lambda: SamplingConfig(top_p=0.0), "sampling.top_p"),
        (lambda: SamplingConfig(prompt_format="markdown"), "sampling.prompt_format"),
        (lambda: FeedbackConfig(clamp_low=0.7, clamp_high=0.6), "feedback.clamp_low=0.7: must be at most clamp_high"),
        (lambda: FeedbackConfig(num_principles=0), "feedback.num_principles=0"),
        (lambda: CritiqueConfig(rounds=-1), "critique.rounds=-1"),
        (lambda: PPOConfig(num_minibatches=0), "ppo.num_minibatches=0"),
        (lambda: PPOConfig(temperature=0.0), "ppo.temperature=0.0"),
    ],
)
def test_out_of_range_settings_are_refused_with_their_name(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_defaults_and_edge_values_pass_their_own_checks():
    # Boundary values that are valid must not be refused: greedy decoding, no few-shot, zero rounds, target_kl 0.
    assert SamplingConfig(temperature=0.0, top_k=0).temperature == 0.0
    assert FeedbackConfig(num_few_shot=0, clamp_low=0.5, clamp_high=0.5).clamp_low == 0.5
    assert CritiqueConfig(rounds=0, num_few_shot=None).rounds == 0
    assert PPOConfig(target_kl=0.0, kl_coef=0.0).target_kl == 0.0
    assert SamplingConfig().prompt_format == "auto" and PPOConfig().num_minibatches == 2


@pytest.mark.slow
def test_the_cli_refuses_a_bad_setting_before_loading_anything(tmp_path):
    # The model folder does not exist: had the setting passed, loading would fail with another message.
    cmd = [sys.executable, "-m", "cai.cli", "sl-data", "--model.name_or_path", str(tmp_path / "none")]
    res = subprocess.run(cmd + ["--sampling.max_new_tokens", "0"], capture_output=True, text=True, env=clean_env())
    assert res.returncode != 0 and "sampling.max_new_tokens=0: must be at least 1" in res.stderr


def test_ppo_refuses_minibatches_that_do_not_divide_the_batch(tiny_model_dir, tmp_path):
    from cai.stages.ppo import cli_main
    from helpers import run_args

    args = run_args("configs/ppo/tiny.yaml", tiny_model_dir, tmp_path) + ["--model.preference_model", "null"]
    args += ["--model.reward_function", "cai.method.rewards:letter_share", "--data.batch_size", "8"]
    with pytest.raises(ValueError, match="data.batch_size=8 is not divisible by model.ppo.num_minibatches=3"):
        cli_main(args + ["--model.ppo.num_minibatches", "3"])
