"""A token prefix that every row of a batch shares, read once and its keys and values reused for every row.

The few-shot context of a critique, a revision or a feedback question is the same for every prompt of a call, and
usually runs to thousands of tokens while the part that differs is short. The plain path left-pads whole rows and
recomputes that prefix once per row; here it is read once (batch 1, no padding) and its KV cache repeated to the
batch. The rows then only feed their own suffixes, laid out as

    [ shared prefix (L columns, all real) | suffix, left-padded inside the suffix region ]

with an attention mask that hides the pads and positions that continue from the prefix (``positions``: the cumsum of
the mask, as ``generate`` computes them). Every real token sees the same tokens at the same positions as in the
unshared layout, so logits agree up to float rounding (the pads are masked out of every softmax).

The prefix is the longest common prefix of the rows' token ids, so it is exact for any prompt format; at least one
token of every row stays in its suffix (the last prompt token's logits predict the first new token).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from models.padding import pad_rows

MIN_SHARED = 16
"""Shorter common prefixes are not worth a separate forward pass; the rows are then laid out as usual."""


def cache_kwarg(model) -> str:
    """The KV-cache argument's name: ``cache`` in recent transformers (5.24), ``past_key_values`` in older ones."""
    forward = inspect.signature(model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def output_cache(out):
    """The KV cache a forward pass returned (``cache`` or ``past_key_values`` depending on the version)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def shared_prefix_length(rows: Sequence[Sequence[int]], min_length: int = MIN_SHARED) -> int:
    """Length of the longest common token prefix of ``rows``, leaving every row at least one token.

    0 when it is under ``min_length`` or when there is a single row (nothing to share).
    """
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= min_length else 0


class SharedPrefix:
    """The keys and values of one token prefix (batch 1), computed once and handed out repeated to a batch.

    Args:
        model: A Hugging Face causal LM that takes ``position_ids`` and a KV cache.
        tokens: The prefix's token ids.
        reuse: A prefix computed earlier (e.g. by an earlier round); when its tokens begin ``tokens``, only the rest
            is read, after a copy of its cache.
    """

    @torch.no_grad()
    def __init__(self, model, tokens: Sequence[int], reuse: SharedPrefix | None = None):
        self.tokens = list(tokens)
        device = next(model.parameters()).device
        done = 0
        cache = None
        if reuse is not None and self.tokens[: len(reuse.tokens)] == reuse.tokens and len(reuse.tokens) > 0:
            done, cache = len(reuse.tokens), copy.deepcopy(reuse.cache)
        if done == len(self.tokens):
            self.cache = cache
            return
        ids = torch.tensor([self.tokens[done:]], device=device)  # (1, L - done)
        kwargs = {} if cache is None else {cache_kwarg(model): cache}
        out = model(
            input_ids=ids,
            attention_mask=torch.ones(1, len(self.tokens), dtype=torch.long, device=device),
            position_ids=torch.arange(done, len(self.tokens), device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        self.cache = output_cache(out)

    def __len__(self) -> int:
        return len(self.tokens)

    def repeated(self, rows: int):
        """A copy of the cache with ``rows`` identical rows (the caller's forward passes then extend it)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def layout(
        self, rows: Sequence[Sequence[int]], pad_token_id: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' suffixes after the prefix: ``(suffix_ids, mask, positions)``.

        ``suffix_ids`` (B, S) are left-padded inside the suffix region; ``mask`` (B, L + S) covers the prefix (all
        ones) and the suffixes; ``positions`` (B, S) continue from the prefix on each row's real tokens.

        Raises:
            ValueError: if a row does not start with the prefix or has nothing after it.
        """
        n = len(self.tokens)
        if any(list(r[:n]) != self.tokens or len(r) <= n for r in rows):
            raise ValueError("SharedPrefix.layout: every row must start with the prefix and go on after it")
        suffix, suffix_mask = pad_rows([r[n:] for r in rows], pad_token_id, "left", device)  # (B, S) each
        mask = torch.cat([torch.ones(len(rows), n, dtype=torch.long, device=device), suffix_mask], 1)  # (B, L + S)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, n:]  # (B, S)
        return suffix, mask, positions
