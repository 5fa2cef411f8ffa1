"""A progress bar over the whole training run, with an ETA, for the training stages (``cai sft|pm|ppo fit``).

Lightning's own bars count batches of the current epoch ("Epoch 9/-2" when ``max_epochs`` is -1), so a run stopped
by ``max_steps`` or by PPO's ``total_rollouts`` never says how far it is or when it will end. ``RunProgressBar``
counts the run instead:

* SFT and the preference model: optimizer steps (``trainer.global_step``) out of ``trainer.max_steps``, or out of
  ``trainer.estimated_stepping_batches`` when only epochs bound the run;
* PPO: rollouts out of ``model.ppo.total_rollouts`` (any module can say what it counts with a ``run_progress()``
  method returning ``(done, total, unit)``).

A resumed run starts the bar where the checkpoint left off, and the ETA counts only the steps made since. The
validation bar is Lightning's. ``cai.training.run_cli`` adds the bar by default; a config that names another
progress bar callback, or sets ``trainer.enable_progress_bar: false``, gets that instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def run_progress(trainer: L.Trainer, module: L.LightningModule) -> tuple[int, int | None, str]:
    """(done, total, unit) of the whole run: the module's own ``run_progress()``, else optimizer steps.

    ``total`` is None when nothing bounds the run (no ``max_steps``, ``max_epochs=-1``).
    """
    hook = getattr(module, "run_progress", None)
    if callable(hook):
        return hook()
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    total = convert_inf(total)
    return trainer.global_step, None if total is None else int(total), "step"


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the training bar spanning the whole run (steps or rollouts) instead of one epoch.

    Args:
        refresh_rate: Redraw every this many training batches (1: every batch).
        process_position: Line offset of the bars (for several trainers at once).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.unit = "step"

    def _description(self, trainer: L.Trainer) -> str:
        return f"{self.unit}s (epoch {trainer.current_epoch})"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done, total, self.unit = run_progress(trainer, pl_module)
        bar = self.init_train_tqdm()
        bar.reset(total=total)
        bar.initial = bar.n = done  # a resumed run: the rate and ETA count only the steps made since
        bar.unit = self.unit
        bar.set_description(self._description(trainer))
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(self._description(trainer), refresh=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        done, _, _ = run_progress(trainer, pl_module)
        if self._should_update(batch_idx + 1, None) or done == bar.total:
            bar.n = done
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = run_progress(trainer, pl_module)[0]
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
