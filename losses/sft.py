"""Supervised fine-tuning (next-token cross-entropy) loss.

Used for the SL-CAI stage of Constitutional AI (Bai et al. 2022, arXiv:2212.08073, section 3): the model is
fine-tuned on its own revised responses, with the loss on response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_sft_loss_sum", "sft_loss", "sft_loss_sum"]


def sft_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, aligned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it counts.

    Formula: ``S = sum_{b,t : y_{b,t+1} != ignore} -log softmax(z_{b,t})[y_{b,t+1}]`` and
    ``N = #{(b, t) : y_{b,t+1} != ignore}``. Labels follow the Hugging Face causal-LM convention (``labels`` aligned
    with ``input_ids``; the shift by one happens here; prompt and padding tokens carry ``ignore_index``), as in
    ``transformers``' ``ForCausalLMLoss``.

    A data-parallel caller should all-reduce both the sum and the count and divide once, so that every token weighs
    the same whatever its rank or micro-batch (a mean of per-rank means weighs short batches too much).

    Args:
        logits: ``(B, T, V)`` next-token logits, any float dtype; upcast to float32.
        labels: ``(B, T)`` target token ids aligned with the inputs, ``ignore_index`` where not trained on.
        ignore_index: label value that is not counted.
        aligned: ``labels[:, t]`` is already the target of ``logits[:, t]`` (no shift), e.g. when logits were
            computed only at the positions that predict a target.

    Returns:
        ``(loss_sum, count)``: float32 scalar sum of the per-token losses and int64 scalar count of counted tokens.
    """
    shift_logits = (logits if aligned else logits[:, :-1, :]).float()  # (B, T-1, V) prediction for t+1 made at t
    shift_labels = labels if aligned else labels[:, 1:]  # (B, T-1)
    vocab = shift_logits.shape[-1]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )  # () 0 with grad when everything is ignored
    count = (shift_labels != ignore_index).sum()  # ()
    return loss_sum, count


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, aligned: bool = False
) -> torch.Tensor:
    """Mean next-token cross-entropy over the counted (non-ignored) tokens of the batch.

    Formula: ``L = (1 / N) sum_{b,t : y_{b,t+1} != ignore} -log p_theta(y_{b,t+1} | y_{b,<=t})`` with ``N`` the
    number of counted tokens; identical to the ``.loss`` a Hugging Face causal LM returns for the same ``labels``.
    Source: maximum-likelihood fine-tuning, used for SL-CAI in Bai et al. 2022 (arXiv:2212.08073, section 3).

    A batch in which every label is ``ignore_index`` gives ``0`` (connected to the graph, so ``backward`` works) instead
    of the ``nan`` that ``F.cross_entropy(reduction="mean")`` gives.

    Args:
        logits: ``(B, T, V)`` next-token logits, any float dtype; computed in float32.
        labels: ``(B, T)`` target ids aligned with the inputs (shifted inside), ``ignore_index`` on prompt/padding.
        ignore_index: label value that is not counted.
        aligned: targets already aligned with the logits (see ``sft_loss_sum``).

    Returns:
        Float32 scalar loss.
    """
    loss_sum, count = sft_loss_sum(logits, labels, ignore_index=ignore_index, aligned=aligned)  # (), ()
    return loss_sum / count.clamp(min=1)


def _chunk_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]):
    """Summed cross-entropy of one chunk: ``hidden`` (n, H) -> float32 logits (n, V) -> scalar."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # () from (n, V) logits, (n,) targets


def chunked_sft_loss_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """``sft_loss_sum`` from the hidden states of the target positions, never holding all their logits at once.

    Formula: ``S = sum_i -log softmax(W h_i)[y_i]`` over the ``N`` selected positions (one target each), summed over
    chunks of ``chunk_size`` positions; equal to ``sft_loss_sum`` of the full logits up to float summation order.
    Each chunk's ``(chunk_size, V)`` logits live only during its own forward and backward (activation
    checkpointing: the backward recomputes them), so the peak is ``O(chunk_size * V)`` rather than ``O(N * V)``
    (the idea of TRL's ``loss_type="chunked_nll"`` and of fused linear cross-entropy kernels, e.g. Liger-Kernel).

    Args:
        hidden: ``(N, H)`` final hidden states of the positions that predict a target.
        targets: ``(N,)`` the target token of each position (no ``ignore_index`` needed: select positions instead).
        head: the output projection, ``(n, H) -> (n, V)`` logits (e.g. the model's ``lm_head`` module).
        chunk_size: positions per chunk; ``None``: all ``N`` at once, no recomputation, the ``(N, V)`` logits kept for
            the backward (what TRL and ``transformers`` do; more memory, one head pass fewer).

    Returns:
        Float32 scalar sum of the per-token losses (``0``, connected to ``head``, when ``N == 0``).
    """
    if chunk_size is None:
        return _chunk_nll_sum(hidden, targets, head)  # () from (N, V) float32 logits
    parts = [
        checkpoint(_chunk_nll_sum, hidden[i : i + chunk_size], targets[i : i + chunk_size], head, use_reentrant=False)
        for i in range(0, max(hidden.shape[0], 1), chunk_size)  # one empty chunk when N == 0: 0 with a graph
    ]  # [()] each chunk's (<= chunk_size, V) logits are freed before the next chunk's are made
    return torch.stack(parts).sum()
