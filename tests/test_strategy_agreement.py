"""The distributed and bf16 strategies against one fp32 process, where they must agree (issue 14, item 7).

The other strategy tests (``test_sft.py``, ``test_pm.py``, ``test_ppo.py``) check that a 2-process DDP or FSDP2 run,
or a bf16-true run, finishes. Here the same data and seed run under each strategy and the results are compared with
one fp32 process:

- SFT and the preference model: the first optimizer step's loss and gradients. Every test's data is one global batch
  (8 rows: 8 on one process, 4 on each of two), so every strategy sees the same rows in the first step.
- PPO: at the first rollout the policy *is* the reference, so the log-probability difference of every response token
  is exactly 0, on every rank, under every strategy and precision.
- DDP resumed mid-epoch: the batches and final weights of an uninterrupted 2-process run.

The 2-process runs are subprocesses of the ``cai`` command (never ``strategy=ddp`` inside pytest); the one-process
runs go through the same command in this process. ``tests/helpers.py`` holds the callbacks that record the results.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pm import synthetic_pairs
from test_ppo import ppo_args

from cai.stages.pm import cli_main as pm_main
from cai.stages.sft import cli_main as sft_main
from helpers import base_args, clean_env, run_args, scalars

TESTS = Path(__file__).resolve().parent
TWO_PROCESSES = {
    "ddp": ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "fsdp2": ["--config", "configs/strategies/fsdp2_cpu.yaml"],  # FSDP2Strategy: fully_shard per layer, 2 data shards
}
ONE_PROCESS = {"fp32": [], "bf16-true": ["--trainer.precision", "bf16-true"]}
GLOBAL_BATCH = 8


def two(strategy: str, *marks):
    return pytest.param(strategy, marks=[pytest.mark.slow, *marks])


def run(stage: str, main, args: list[str], strategy: str) -> None:
    """``cai <stage> fit`` under ``strategy``: in this process (fp32, bf16-true) or as 2 CPU processes (ddp, fsdp2)."""
    if strategy in ONE_PROCESS:
        main(args + ONE_PROCESS[strategy])
        return
    env = clean_env() | {"PYTHONPATH": str(TESTS)}  # the subprocesses import the callbacks of helpers.py
    cmd = [sys.executable, "-m", "cai.cli", stage, *args, *TWO_PROCESSES[strategy]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode:  # pytest.fail: a crash is reported with its stderr
        pytest.fail(f"cai {stage} under {strategy} exited with {res.returncode}:\n{res.stderr[-3000:]}")


def first_step(stage: str, main, args: list[str], strategy: str, out: Path) -> dict:
    """The first optimizer step's loss and full gradients (``helpers.FirstStepDump``) of one global batch."""
    per_rank = GLOBAL_BATCH // (2 if strategy in TWO_PROCESSES else 1)
    dump = out / "first_step.pt"
    args = args + ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--data.batch_size", str(per_rank)]
    args += ["--trainer.callbacks+=helpers.FirstStepDump", f"--trainer.callbacks.path={dump}"]
    run(stage, main, args, strategy)
    return torch.load(dump, weights_only=False)


def assert_agree(got: dict, ref: dict, strategy: str) -> None:
    """Equal to fp32 rounding for fp32 strategies; to bf16's resolution (8 mantissa bits) for bf16-true."""
    assert got["grads"].keys() == ref["grads"].keys()
    if strategy == "bf16-true":
        # Measured: SFT loss within 0.01%, PM 0.1%; gradients off by 0.9% and 1.2% of their norm. An unscaled or
        # half-applied gradient, another batch, or token ids rounded to bf16 (ids above 256) are off by far more.
        g = torch.cat([got["grads"][n].flatten() for n in ref["grads"]])
        r = torch.cat([ref["grads"][n].flatten() for n in ref["grads"]])
        error = float((g - r).norm() / r.norm())
        print(f"bf16-true vs fp32: loss {got['loss']:.4f} vs {ref['loss']:.4f}; gradient off by {error:.1%} of norm")
        assert got["loss"] == pytest.approx(ref["loss"], rel=2e-2)
        assert error < 0.1, error
        return
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    """8 rows whose completions have different lengths: any split over two ranks gives them unequal token counts."""
    root = tmp_path_factory.mktemp("sft_agree")
    rows = [{"prompt": f"Question {i}?", "completion": " ".join(["word"] * (1 + 3 * i))} for i in range(GLOBAL_BATCH)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "val.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return root / "train.jsonl", root / "val.jsonl"


def sft_first_step(model_dir, data, strategy, out):
    args = base_args(model_dir, data[0], out, 1) + ["--data.val", str(data[1])]
    return first_step("sft", sft_main, args, strategy, out)


@pytest.fixture(scope="module")
def sft_fp32(tiny_model_dir, sft_data, tmp_path_factory) -> dict:
    return sft_first_step(tiny_model_dir, sft_data, "fp32", tmp_path_factory.mktemp("sft_fp32"))


# DDP is compared in test_sft_token_weighting.py (same data shape, same tolerances).
@pytest.mark.parametrize("strategy", [two("fsdp2"), "bf16-true"])
def test_sft_first_step_agrees_with_one_fp32_process(tiny_model_dir, sft_data, sft_fp32, tmp_path, strategy):
    # Catches: FSDP2's loss or gradient not the global batch's (the per-token loss weighed per rank, a missing or
    # double world-size factor, a shard saved or reduced as the whole), and bf16-true computing another objective.
    got = sft_first_step(tiny_model_dir, sft_data, strategy, tmp_path)
    assert_agree(got, sft_fp32, strategy)


# ----------------------------------------------------------------------------------- preference model


@pytest.fixture(scope="module")
def pm_data(tmp_path_factory) -> Path:
    """One global batch of soft-labelled pairs."""
    return synthetic_pairs(tmp_path_factory.mktemp("pm_agree") / "pairs.jsonl", GLOBAL_BATCH, 0, lambda r: 0.8)


def pm_first_step(model_dir, data, strategy, out):
    args = run_args("configs/pm/tiny.yaml", model_dir, out) + ["--data.train", str(data), "--data.val", str(data)]
    return first_step("pm", pm_main, args, strategy, out)


@pytest.fixture(scope="module")
def pm_fp32(tiny_model_dir, pm_data, tmp_path_factory) -> dict:
    return pm_first_step(tiny_model_dir, pm_data, "fp32", tmp_path_factory.mktemp("pm_fp32"))


@pytest.mark.parametrize("strategy", [two("ddp"), two("fsdp2"), "bf16-true"])
def test_pm_first_step_agrees_with_one_fp32_process(tiny_model_dir, pm_data, pm_fp32, tmp_path, strategy):
    # Catches: a preference loss or gradient that is not the global batch mean under DDP/FSDP2 (FSDP2 also turns the
    # shared-prompt forward off: it must give the same result), a score head initialised differently per strategy,
    # and bf16-true computing another objective.
    got = pm_first_step(tiny_model_dir, pm_data, strategy, tmp_path)
    assert_agree(got, pm_fp32, strategy)


# ----------------------------------------------------------------------------------- PPO


@pytest.mark.parametrize("strategy", ["fp32", "bf16-true", two("ddp"), two("fsdp2")])
def test_ppo_first_rollout_kl_is_exactly_zero(tiny_model_dir, tmp_path, strategy):
    # Catches: the policy's and the reference's log-probabilities computed differently (another temperature, other
    # positions or masks, a reference in another dtype or sharded differently, the value head's trunk diverging),
    # which would put a spurious KL penalty on the very first rollout.
    from cai.stages.ppo import cli_main as ppo_main

    record = tmp_path / "kl"
    args = ppo_args(tiny_model_dir, tmp_path, 1, "--model.ppo.ppo_epochs", "1", "--model.log_samples_every", "0")
    args += ["--trainer.callbacks+=helpers.FirstRolloutKL", f"--trainer.callbacks.path={record}"]
    run("ppo", ppo_main, args, strategy)
    ranks = sorted(tmp_path.glob("kl.*"))
    assert len(ranks) == (2 if strategy in TWO_PROCESSES else 1)
    for path in ranks:
        r = json.loads(path.read_text())
        assert r["tokens"] > 0 and r["max_abs_diff"] == 0.0, (path.name, r)


# ----------------------------------------------------------------------------------- DDP resumed mid-epoch


def batches(path_prefix: Path, rank: int) -> dict[int, list]:
    lines = Path(f"{path_prefix}.{rank}").read_text().splitlines()
    return {(r := json.loads(x))["step"]: r["input_ids"] for x in lines}


@pytest.mark.slow
def test_ddp_resumed_mid_epoch_continues_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    # Catches: a 2-process run resumed from a mid-epoch checkpoint restarting its epoch or drawing another order (the
    # sampler's position or permutation not restored: rows trained twice, others skipped), or optimizer, schedule or
    # weights not restored on every rank.
    # 24 rows, 4 per rank per step: 3 steps an epoch; the checkpoint at step 2 is mid-epoch, steps 3-6 cross its end.
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rows = [{"prompt": f"Tell me about item {i}.", "completion": f"Item {i} is safe."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text(json.dumps(rows[0]) + "\n")

    def fit(out: Path, *extra: str) -> dict:
        """Batches per rank; the step-6 checkpoint's weights (with --ckpt_path, LightningCLI takes model.hf_out from
        the checkpoint, so the HF exports of both runs would land in one folder)."""
        callbacks = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
            | {"init_args": {"every_n_train_steps": 2, "save_top_k": -1}},
            {"class_path": "helpers.BatchLog", "init_args": {"path": str(out / "batches")}},
        ]
        args = base_args(tiny_model_dir, data, out, 6) + ["--data.val", str(val), "--data.batch_size", "4"]
        args += ["--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(callbacks), *extra]
        out.mkdir()
        run("sft", None, args, "ddp")
        weights = torch.load(next(out.rglob("*step=6.ckpt")), weights_only=False)["state_dict"]
        return {"batches": [batches(out / "batches", rank) for rank in (0, 1)], "weights": weights}

    whole = fit(tmp_path / "whole")
    resumed = fit(tmp_path / "resumed", "--ckpt_path", str(next((tmp_path / "whole").rglob("*step=2.ckpt"))))
    for rank in (0, 1):
        a, b = whole["batches"][rank], resumed["batches"][rank]
        assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [3, 4, 5, 6]
        for step in b:
            assert b[step] == a[step], f"rank {rank}, step {step}: the resumed run trained on other rows"
    assert scalars(tmp_path / "resumed", "loss/train")[-1] == scalars(tmp_path / "whole", "loss/train")[-1]
    for name, w in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], w, rtol=0, atol=0, msg=name)


class _Mesh:
    """A stand-in for a torch ``DeviceMesh``: named dimensions and their sizes."""

    def __init__(self, **sizes):
        self.mesh_dim_names, self.sizes = tuple(sizes), sizes

    def __getitem__(self, name):
        return _Mesh(**{name: self.sizes[name]})

    def size(self):
        return math.prod(self.sizes.values())


def test_a_tensor_parallel_mesh_is_refused_with_its_fix():
    # Catches: Lightning's own ModelParallelStrategy sizes ("auto": data-parallel = nodes, tensor-parallel = devices)
    # silently training an unsharded replica per device on the same rows.
    from cai.training import _check_data_parallel
    from models.errors import UserError

    _check_data_parallel(_Mesh(data_parallel=2, tensor_parallel=1), world_size=2)  # FSDP2Strategy's layout
    with pytest.raises(UserError, match="shards over 1 of 2 processes.*FSDP2Strategy"):
        _check_data_parallel(_Mesh(data_parallel=1, tensor_parallel=2), world_size=2)
