"""A DataModule base for tokenized train/validation splits (SFT and preference data share it)."""

from __future__ import annotations

import datasets
import lightning as L
from torch.utils.data import DataLoader

from models import load_tokenizer


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

    def _loader(self, ds: datasets.Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds.with_format(None),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
