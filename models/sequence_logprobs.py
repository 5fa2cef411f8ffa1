"""Sequence log-probabilities of the two responses of preference pairs, each pair's prompt run once.

DPO (``cai dpo``) needs ``log pi(y | x)``, summed over the response tokens, for the chosen and the rejected response
of every pair, with gradients. Both responses follow the same prompt, so the prompt goes through the network once
and both responses attend to its cached keys and values (as ``PreferenceModel.forward_pairs`` reads each pair's
prefix once): a pair costs P + 2R token positions instead of 2(P + R). Causal attention makes this exact.

Batch layout (``data.dpo.DPOCollator``): ``prompt_ids``/``prompt_mask`` (B, P), left-padded, every row with at least
one real token; ``response_ids``/``response_mask`` (2B, R), right-padded, row 2i pair i's chosen response and row
2i + 1 its rejected one, every row with at least one real token.
"""

from __future__ import annotations

import torch

from losses import logprobs_from_logits
from models.logprobs import last_token_logprobs, position_ids_from_mask
from models.prefix_cache import cache_kwarg, output_cache


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP-sharded layers (FSDP2 ``fully_shard`` or FSDP1), whose forwards are collective."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def share_prompt_on(setting: bool | None, device: torch.device) -> bool:
    """Whether a stage's ``share_prompt`` setting runs shared prompts once: ``None`` (auto) means on a CPU only.

    Measured (docs/BENCHMARKS.md): on a CPU, where a step costs its arithmetic, running the prompt once makes the
    reward model 1.12-1.44x and DPO 1.5-2.4x TRL's speed. On an H200 (random Qwen2-0.5B, bf16-mixed, 8 pairs of 512
    tokens, a quarter of them prompt) the same reward model ran at 26.8 pairs/s with the shared prompt and 54.8
    without: the GPU is not bound by that arithmetic, and the extra passes and the cache (which keeps attention off
    its fused causal kernel) cost more than the saved prompt tokens.
    """
    return device.type == "cpu" if setting is None else setting


def can_share_prompt(model: torch.nn.Module, width: int) -> bool:
    """Whether ``pair_logprobs`` may run prompts once through a KV cache for texts ``width`` tokens wide.

    Shared by ``PreferenceModel.forward_pairs`` and DPO: not with gradient checkpointing (Hugging Face models turn the
    cache off under it), nor past a sliding attention window (the cache would keep only the window), nor with sharded
    (FSDP) layers, whose parameters FSDP would not gather again for the gradient that reaches them through the cache.
    """
    if is_sharded(model) or any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return False
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    return not (uses_window and width > window)


def pair_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    share_prompt: bool = True,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (B,), (B,) of the chosen and rejected responses of B pairs given their prompts.

    ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` over the real response tokens (the sum TRL's ``DPOTrainer``
    takes over its completion mask). With ``share_prompt`` (and when ``can_share_prompt`` allows it) the prompts go
    through the network once with the cache on; the last prompt position scores each response's first token, and
    the responses (without their last token, which predicts nothing) are run after the cache repeated twice.
    Otherwise every prompt + response is run as one left-padded text, the head only on the last R + 1 positions.

    Args:
        model: A Hugging Face causal LM (or one wrapped by FSDP) that takes ``position_ids``, a cache and
            ``logits_to_keep``.
        prompt_ids: (B, P) prompt tokens, left-padded.
        prompt_mask: (B, P) 1 on real prompt tokens; every row has at least one.
        response_ids: (2B, R) response tokens, right-padded, chosen and rejected rows interleaved.
        response_mask: (2B, R) 1 on real response tokens; every row has at least one.
        share_prompt: Run each prompt once through a KV cache when possible.
        width: Length of the longest prompt + response (the collator gives it); None reads it from the masks.

    Returns:
        Float32 ``(chosen, rejected)`` sequence log-probabilities, each (B,).
    """
    B, P = prompt_ids.shape
    R = response_ids.shape[1]
    prompt_mask2 = prompt_mask.repeat_interleave(2, dim=0)  # (2B, P)
    mask = torch.cat([prompt_mask2, response_mask], dim=1)  # (2B, P + R)
    if share_prompt and can_share_prompt(model, P + R):
        positions = position_ids_from_mask(mask)  # (2B, P + R): as if each text had no padding
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions[0::2, :P],
            use_cache=R > 1,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, V): the last prompt token predicts y_1
        total = first.repeat_interleave(2, dim=0).gather(1, response_ids[:, :1]).squeeze(1)  # (2B,)
        if R > 1:
            cache = output_cache(out)
            cache.batch_repeat_interleave(2)  # (2B, heads, P, d): rows 2i and 2i + 1 share prompt i
            logits = model(
                input_ids=response_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, P:-1],
                use_cache=True,
                **{cache_kwarg(model): cache},
            ).logits  # (2B, R - 1, V): response token t predicts t + 1
            rest = logprobs_from_logits(logits, response_ids[:, 1:])  # (2B, R - 1)
            total = total + torch.where(response_mask[:, 1:].bool(), rest, 0.0).sum(1)
    else:
        ids = torch.cat([prompt_ids.repeat_interleave(2, dim=0), response_ids], dim=1)  # (2B, P + R)
        scored = torch.cat([torch.zeros_like(prompt_mask2), response_mask], dim=1)  # (2B, P + R) response tokens
        # Move each row's real tokens to the end (a stable sort keeps their order): left-padded whole texts, so that
        # every response ends in the last column and the head runs on the last R + 1 positions only, not on all T
        # (a (2B, T, V) float32 log-softmax is tens of GB for a 150k vocabulary at T = 1024).
        order = torch.argsort(mask, dim=1, stable=True)  # (2B, P + R)
        width = width if width is not None else int(mask.sum(1).max())
        ids, scored = ids.gather(1, order)[:, -width:], scored.gather(1, order)[:, -width:]  # (2B, T)
        attn = mask.gather(1, order)[:, -width:]  # (2B, T)
        per_token = last_token_logprobs(model, ids, attn, R)  # (2B, R): the last R tokens of every row
        total = torch.where(scored[:, -R:].bool(), per_token, 0.0).sum(1)  # (2B,)
    total = total.view(B, 2)  # (B, 2): chosen, rejected
    return total[:, 0], total[:, 1]
