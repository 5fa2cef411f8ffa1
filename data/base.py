"""A DataModule base for tokenized train/validation splits (SFT and preference data share it)."""

from __future__ import annotations

import warnings

import datasets
import lightning as L
import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from models import load_tokenizer
from models.errors import UserError, check_positive


def float_column(values: list[float], device: torch.device | str) -> torch.Tensor:
    """A batch's per-pair floats (soft labels, reference log-probs) as a float32 tensor (B,) on ``device``.

    Collators hand these over as Python floats, not tensors: Lightning's half-precision plugins (``bf16-true``)
    cast every floating tensor of a batch to bf16 before the step, and bf16 keeps 8 significant bits, so a reference
    log-probability of -300 would land on a multiple of 2 and shift every DPO margin by up to a nat.
    """
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def check_loader_settings(batch_size: int, num_workers: int, prompt_format: str) -> None:
    """Refuse out-of-range settings that every DataModule has (SFT, preference, PPO prompts)."""
    check_positive(batch_size, "data.batch_size")
    if prompt_format not in ("auto", "chat", "transcript"):
        raise UserError(f"data.prompt_format={prompt_format!r}: must be auto, chat or transcript")
    check_positive(num_workers + 1, "data.num_workers + 1")


def check_split_settings(max_length: int, batch_size: int, num_workers: int, val_fraction: float, prompt_format: str):
    """Refuse out-of-range settings of a tokenized-split DataModule (SFT, preference) before any data is read."""
    check_positive(max_length, "data.max_length")
    check_loader_settings(batch_size, num_workers, prompt_format)
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction}: must be in [0, 1)")


# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates, once per epoch; nothing for a user to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def resumable_loader(
    datamodule: L.LightningDataModule,
    ds: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    collate_fn,
    drop_last: bool = False,
) -> StatefulDataLoader:
    """A DataLoader that a run resumed mid-epoch continues where it stopped, in the same order.

    torchdata's ``StatefulDataLoader`` has ``state_dict``/``load_state_dict``, which Lightning saves in every
    checkpoint, so a resumed run does not start its epoch again. On one process the shuffle is torchdata's stateful
    ``RandomSampler`` with its own generator seeded by ``seed``, so the epochs after a resumption are also in the
    uninterrupted run's order (a generator shared with the loader would also be drawn from for worker seeds, once more
    per resumption). Across processes the shuffle is a ``DistributedSampler`` seeded by ``seed``, whose order
    depends only on the seed and the epoch (``tests/test_strategy_agreement.py`` resumes a 2-process run mid-epoch).
    """
    ds = ds.with_format(None)
    trainer = getattr(datamodule, "trainer", None)
    distributed = trainer is not None and trainer.world_size > 1
    sampler = None
    if shuffle and not distributed:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    elif shuffle:
        # Our own seeded DistributedSampler: Lightning keeps it (and calls set_epoch). Left to itself, Lightning
        # would wrap the loader's torchdata sampler, whose generator no checkpoint saves, in a
        # DistributedSamplerWrapper: a run resumed mid-epoch would then see other rows than an uninterrupted one.
        sampler = DistributedSampler(ds, shuffle=True, seed=seed, **trainer.distributed_sampler_kwargs)
    return StatefulDataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )


class SplitDataModule(L.LightningDataModule):
    """Loads ``hparams.train`` (and ``hparams.val`` or a held-out share of train) through ``prepare_split``.

    Subclasses call ``save_hyperparameters()`` with at least ``train``, ``val``, ``tokenizer``, ``batch_size``,
    ``val_fraction``, ``num_workers`` and ``seed``, and implement ``prepare_split`` and ``collator``.
    """

    def prepare_split(self, path: str, train: bool) -> datasets.Dataset:
        """Load and tokenize one split (``train``: whether it is the training split)."""
        raise NotImplementedError

    def collator(self):
        """The batch collate function."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if hasattr(self, "train_set"):
            return
        self.pad_token_id = load_tokenizer(self.hparams.tokenizer).pad_token_id
        # Without a val split, training rows are only known after the hold-out: finish_train_split handles them.
        data = self.prepare_split(self.hparams.train, train=bool(self.hparams.val))
        if self.hparams.val:
            self.train_set, self.val_set = data, self.prepare_split(self.hparams.val, train=False)
        elif len(data) < 2:
            self.train_set = self.val_set = data  # nothing to hold out
        else:
            n_val = max(1, int(len(data) * self.hparams.val_fraction))
            split = data.train_test_split(test_size=n_val, seed=self.hparams.seed)
            self.train_set, self.val_set = self.finish_train_split(split["train"]), split["test"]

    def finish_train_split(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Hook for changes that apply to training rows only, after a hold-out split."""
        return ds

    def _loader(self, ds: datasets.Dataset, shuffle: bool) -> StatefulDataLoader:
        h = self.hparams
        return resumable_loader(self, ds, h.batch_size, shuffle, h.seed, h.num_workers, self.collator())

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)
