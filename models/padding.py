"""The one padding helper: token rows of different lengths into a (rows, width) batch and its attention mask.

Every collator (SFT, preference pairs) and every batched forward pass over token lists (rollouts, log-probabilities,
generation, preference scores) pads through :func:`pad_rows`, so left and right padding mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn.utils.rnn import pad_sequence


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor],
    pad_value: int,
    side: Literal["left", "right"] = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows to the longest one: ``ids`` and ``mask``, both (N, W) int64, ``mask`` 1 on real tokens.

    Args:
        rows: Token ids of each row (lists or 1-D tensors); a row may be empty.
        pad_value: Written in the padded positions of ``ids`` (a pad token id, or -100 for labels).
        side: ``left`` puts every row's last token in the last column (generation, scoring the last tokens);
            ``right`` puts every row's first token in the first column (training batches).
        device: Where the tensors go; None leaves them on the CPU.
    """
    seqs = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    ids = pad_sequence(seqs, batch_first=True, padding_value=pad_value, padding_side=side)  # (N, W)
    ones = [torch.ones(len(s), dtype=torch.long) for s in seqs]
    mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side=side)  # (N, W)
    return ids.to(device), mask.to(device)
