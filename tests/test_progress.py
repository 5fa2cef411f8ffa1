"""The whole-run progress bar of the training stages (cai.progress)."""

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cai.progress import RunProgressBar, run_progress
from cai.stages.sft import cli_main
from helpers import base_args


class Steps(L.LightningModule):
    """A linear model on random data: 4 batches per epoch, so a run of 6 steps spans two epochs."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(16, 4), batch_size=4)


class Rollouts(Steps):
    """Counts rollouts the way PPOModule does and stops itself after ``total``."""

    def __init__(self, total):
        super().__init__()
        self.total, self.rollouts_done = total, 0

    def training_step(self, batch, batch_idx):
        self.rollouts_done += 1
        if self.rollouts_done >= self.total:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)

    def run_progress(self):
        return self.rollouts_done, self.total, "rollout"


def fit(module, **trainer_kwargs):
    bar = RunProgressBar()
    trainer = L.Trainer(
        callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False, **trainer_kwargs
    )
    trainer.fit(module)
    return bar.train_progress_bar


def test_run_progress_counts_steps_or_the_modules_own_unit():
    trainer = SimpleNamespace(max_steps=30, global_step=7, estimated_stepping_batches=99)
    assert run_progress(trainer, object()) == (7, 30, "step")
    trainer.max_steps = -1
    assert run_progress(trainer, object()) == (7, 99, "step")
    trainer.estimated_stepping_batches = float("inf")  # max_epochs=-1 and no max_steps: no total, no ETA
    assert run_progress(trainer, object()) == (7, None, "step")
    assert run_progress(trainer, SimpleNamespace(run_progress=lambda: (3, 20, "rollout"))) == (3, 20, "rollout")


def test_bar_spans_max_steps_across_epochs():
    bar = fit(Steps(), max_steps=6, max_epochs=-1)
    assert (bar.total, bar.n, bar.unit) == (6, 6, "step")  # not 4 batches of one epoch
    assert "epoch 1" in bar.desc


def test_bar_spans_estimated_steps_when_epochs_bound_the_run():
    bar = fit(Steps(), max_epochs=2, accumulate_grad_batches=2)
    assert (bar.total, bar.n) == (4, 4)  # 2 epochs x 4 batches / 2 accumulated


def test_bar_counts_rollouts_out_of_the_total():
    bar = fit(Rollouts(total=5), max_epochs=1000)
    assert (bar.total, bar.n, bar.unit) == (5, 5, "rollout")


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Item {i}?", "completion": "Safe."}) + "\n" for i in range(16)))
    return path


@pytest.mark.slow
def test_cli_uses_the_run_bar_unless_the_config_says_otherwise(tiny_model_dir, sft_file, tmp_path):
    args = base_args(tiny_model_dir, sft_file, tmp_path / "a", 2)
    quiet = args.index("--trainer.enable_progress_bar")
    del args[quiet : quiet + 2]
    cli = cli_main(args + ["--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]"])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar) and bar.train_progress_bar.total == 2
    # The user's own progress bar, or none, replaces it (two bars would stop Lightning).
    own = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = cli_main(args + ["--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]", *own])
    assert type(cli.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"
    off = base_args(tiny_model_dir, sft_file, tmp_path / "b", 2)  # enable_progress_bar false
    assert cli_main(off).trainer.progress_bar_callback is None
