"""SFT under data parallelism: the loss is the mean over every target token of the global batch.

Two processes holding batches with different numbers of target tokens must produce the gradient and the logged loss
of one process holding all of it. A mean of per-rank means (what a plain ``sft_loss`` per rank gives) would weigh the
rank with fewer target tokens more; with these lengths every split into two pairs is uneven, so it would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import base_args, clean_env

TESTS = Path(__file__).resolve().parent
WORDS = [1, 2, 4, 40]  # completion lengths: any two-and-two split gives the ranks different token counts


def run_one_step(model_dir, data, val, out: Path, devices: int, batch_size: int) -> dict:
    dump = out / "grads.pt"
    args = base_args(model_dir, data, out, 1) + ["--data.val", str(val), "--data.batch_size", str(batch_size)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.limit_val_batches", "0"]
    args += ["--trainer.callbacks+=helpers.GradDump", f"--trainer.callbacks.path={dump}"]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    env = clean_env() | {"PYTHONPATH": str(TESTS)}
    res = subprocess.run([sys.executable, "-m", "cai.cli", "sft", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(dump, weights_only=False)


@pytest.mark.slow
def test_two_processes_with_uneven_token_counts_give_the_one_process_gradient(tiny_model_dir, tmp_path):
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": " ".join(["word"] * n)} for i, n in enumerate(WORDS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text(json.dumps(rows[0]) + "\n")
    one = run_one_step(tiny_model_dir, data, val, tmp_path / "one", devices=1, batch_size=4)
    two = run_one_step(tiny_model_dir, data, val, tmp_path / "two", devices=2, batch_size=2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
