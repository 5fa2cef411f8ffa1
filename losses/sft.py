"""Supervised fine-tuning (next-token cross-entropy) loss.

Used for the SL-CAI stage of Constitutional AI (Bai et al. 2022, arXiv:2212.08073, section 3): the model is
fine-tuned on its own revised responses, with the loss on response tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sft_loss", "sft_loss_sum"]


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
