"""Log-probabilities of given tokens under a causal LM, computing the LM head only where it is needed.

Used to score multiple-choice options for AI feedback (teacher forcing " (A)" and " (B)") and, in PPO, the response
tokens of a rollout. Rows are left-padded so that the tokens to score sit at the end of every row; the model then
only computes logits for the last ``n`` positions (``logits_to_keep``), not a (B, T, V) tensor for the whole prompt.

``choice_logprobs`` scores several options after the same context and reads the context once (KV cache shared by
the options); ``continuation_logprobs`` scores independent (context, continuation) pairs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from losses import logprobs_from_logits


def left_pad(rows: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask``, both (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, as ``generate`` uses with left padding. (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities (B, n) of the last ``n`` tokens of every left-padded row.

    Position t's logits predict token t + 1, so the logits of positions T-n-1 .. T-2 score tokens T-n .. T-1.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # (B, n, V)
    return logprobs_from_logits(logits, input_ids[:, -n:], temperature)  # (B, n)


@torch.no_grad()
def continuation_logprobs(
    model, contexts: list[list[int]], continuations: list[list[int]], pad_token_id: int, batch_size: int = 8
) -> list[float]:
    """Sum of log p(continuation | context) for each pair, by teacher forcing; rows batched by length."""
    device = next(model.parameters()).device
    rows = [c + k for c, k in zip(contexts, continuations)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    result = [0.0] * len(rows)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        ids, mask = left_pad([rows[i] for i in batch], pad_token_id, device)
        n = max(len(continuations[i]) for i in batch)
        logp = last_token_logprobs(model, ids, mask, n)  # (b, n)
        lengths = torch.tensor([len(continuations[i]) for i in batch], device=device)
        keep = torch.arange(n, device=device)[None, :] >= (n - lengths)[:, None]  # each row's own last tokens
        for i, total in zip(batch, (logp * keep).sum(-1).tolist()):  # one device sync per batch
            result[i] = total
    return result


def _cache_kwarg(model) -> str:
    """The KV-cache argument's name: ``cache`` in recent transformers (5.24), ``past_key_values`` in older ones."""
    forward = inspect.signature(model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


@torch.no_grad()
def choice_logprobs(
    model,
    contexts: list[list[int]],
    options: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Sum of log p(option | context) for every context and every option, reading each context once.

    ``continuation_logprobs`` scores a multiple-choice question by running context + option as one sequence per
    option, so the context (the long part) is read once per option. Here a left-padded batch of contexts runs once
    with the KV cache on; the logits of each row's last position score the options' first tokens. The cache is then
    repeated once per option (``Cache.batch_repeat_interleave``) and the rest of the option tokens are fed after it,
    right-padded to the longest option and masked, with positions that continue from each row's real length. The
    result equals ``continuation_logprobs`` of each (context, option) pair up to float rounding. Options of one
    token need no second pass and no cache.

    Memory: the repeated cache holds ``batch_size * len(options)`` copies of the batch's context keys and values;
    lower ``batch_size`` for long contexts or many options.

    Args:
        model: A Hugging Face causal LM that takes ``position_ids``, a KV cache and ``logits_to_keep``.
        contexts: Token ids of each context (non-empty).
        options: Token ids of each option (non-empty), the same options for every context.
        pad_token_id: Id written in padded positions (masked, never scored).
        batch_size: Contexts per forward pass.
        on_batch: Called with the number of contexts just scored, after each batch (e.g. a progress bar's update).

    Returns:
        ``result[i][j]``: log p(options[j] | contexts[i]), summed over the option's tokens.

    Raises:
        ValueError: if there is no option, or an option or a context is empty.
    """
    if not options or not all(options):
        raise ValueError("choice_logprobs: every option needs at least one token")
    if not all(contexts):
        raise ValueError("choice_logprobs: every context needs at least one token (it predicts the option)")
    device = next(model.parameters()).device
    k, width = len(options), max(len(o) for o in options)
    opt = torch.full((k, width), pad_token_id, dtype=torch.long)  # (K, W) options, right-padded
    opt_mask = torch.zeros((k, width), dtype=torch.long)  # (K, W) 1 on real option tokens
    for j, o in enumerate(options):
        opt[j, : len(o)], opt_mask[j, : len(o)] = torch.tensor(o), 1
    opt, opt_mask = opt.to(device), opt_mask.to(device)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # similar lengths share a batch
    result: list[list[float]] = [[] for _ in contexts]
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        b = len(batch)
        ids, mask = left_pad([contexts[i] for i in batch], pad_token_id, device)  # (b, T) each
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=width > 1,
            logits_to_keep=1,
        )
        # The last position predicts every option's first token.
        total = torch.log_softmax(out.logits[:, -1].float(), -1)[:, opt[:, 0]]  # (b, K)
        if width > 1:
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            cache.batch_repeat_interleave(k)  # (b*K, ...): row r*K + j is context r followed by option j
            feed = opt[:, :-1].repeat(b, 1)  # (b*K, W-1) option tokens that predict the next ones
            feed_mask = opt_mask[:, :-1].repeat(b, 1)  # (b*K, W-1)
            past_mask = mask.repeat_interleave(k, 0)  # (b*K, T)
            lengths = past_mask.sum(-1, keepdim=True)  # (b*K, 1) real context lengths
            out = model(
                input_ids=feed,
                attention_mask=torch.cat([past_mask, feed_mask], 1),  # (b*K, T+W-1)
                position_ids=lengths + torch.arange(width - 1, device=device),  # (b*K, W-1)
                use_cache=True,
                **{_cache_kwarg(model): cache},
            )
            target, keep = opt[:, 1:].repeat(b, 1), opt_mask[:, 1:].repeat(b, 1).bool()  # (b*K, W-1) each
            rest = logprobs_from_logits(out.logits, target)  # (b*K, W-1)
            total = total + torch.where(keep, rest, 0.0).sum(-1).view(b, k)  # (b, K)
            del cache, out
        for i, row in zip(batch, total.tolist()):  # one device sync per batch
            result[i] = row
        if on_batch is not None:
            on_batch(b)
    return result
