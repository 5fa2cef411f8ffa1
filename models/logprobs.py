"""Log-probabilities of given tokens under a causal LM, computing the LM head only where it is needed.

Used to score multiple-choice options for AI feedback (teacher forcing " (A)" and " (B)") and, in PPO, the response
tokens of a rollout. Rows are left-padded so that the tokens to score sit at the end of every row; the model then
only computes logits for the last ``n`` positions (``logits_to_keep``), not a (B, T, V) tensor for the whole prompt.

``choice_logprobs`` scores several options after the same context and reads the context once (KV cache shared by
the options); ``continuation_logprobs`` scores independent (context, continuation) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from losses import logprobs_from_logits
from models.padding import pad_rows
from models.prefix_cache import SharedPrefix, cache_kwarg, output_cache, shared_prefix_length


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
        ids, mask = pad_rows([rows[i] for i in batch], pad_token_id, "left", device)  # (b, T) each
        n = max(len(continuations[i]) for i in batch)
        logp = last_token_logprobs(model, ids, mask, n)  # (b, n)
        lengths = torch.tensor([len(continuations[i]) for i in batch], device=device)
        keep = torch.arange(n, device=device)[None, :] >= (n - lengths)[:, None]  # each row's own last tokens
        for i, total in zip(batch, (logp * keep).sum(-1).tolist()):  # one device sync per batch
            result[i] = total
    return result


@torch.no_grad()
def choice_logprobs(
    model,
    contexts: list[list[int]],
    options: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Sum of log p(option | context) for every context and every option, reading each context once.

    ``continuation_logprobs`` scores a multiple-choice question by running context + option as one sequence per
    option, so the context (the long part) is read once per option. Here a left-padded batch of contexts runs once
    with the KV cache on; the logits of each row's last position score the options' first tokens. The cache is then
    repeated once per option (``Cache.batch_repeat_interleave``) and the rest of the option tokens are fed after it,
    right-padded to the longest option and masked, with positions that continue from each row's real length. The
    result equals ``continuation_logprobs`` of each (context, option) pair up to float rounding. Options of one
    token need no second pass and no cache.

    A prefix that every context shares (the few-shot examples in front of every question) is read once for the
    whole call and its keys and values repeated to each batch (``models.prefix_cache``); the contexts then only feed
    what follows it. The result is the same up to float rounding.

    Memory: the repeated cache holds ``batch_size * len(options)`` copies of the batch's context keys and values;
    lower ``batch_size`` for long contexts or many options.

    Args:
        model: A Hugging Face causal LM that takes ``position_ids``, a KV cache and ``logits_to_keep``.
        contexts: Token ids of each context (non-empty).
        options: Token ids of each option (non-empty), the same options for every context.
        pad_token_id: Id written in padded positions (masked, never scored).
        batch_size: Contexts per forward pass.
        on_batch: Called with the number of contexts just scored, after each batch (e.g. a progress bar's update).
        share_prefix: Read the contexts' longest common token prefix once (when it is at least
            ``models.prefix_cache.MIN_SHARED`` tokens); False runs every context whole (the reference path).

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
    opt, opt_mask = pad_rows(options, pad_token_id, "right", device)  # (K, W) options and 1 on their real tokens
    k, width = opt.shape
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # similar lengths share a batch
    result: list[list[float]] = [[] for _ in contexts]
    shared = shared_prefix_length(contexts) if share_prefix else 0
    prefix = SharedPrefix(model, contexts[0][:shared]) if shared else None
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        b = len(batch)
        if prefix is None:
            ids, mask = pad_rows([contexts[i] for i in batch], pad_token_id, "left", device)  # (b, T) each
            positions, past = position_ids_from_mask(mask), {}
        else:  # the suffixes after the shared prefix's cached keys and values; mask (b, L + S) covers both
            ids, mask, positions = prefix.layout([contexts[i] for i in batch], pad_token_id, device)
            past = {cache_kwarg(model): prefix.repeated(b)}
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=width > 1 or prefix is not None,
            logits_to_keep=1,
            **past,
        )
        # The last position predicts every option's first token.
        total = torch.log_softmax(out.logits[:, -1].float(), -1)[:, opt[:, 0]]  # (b, K)
        if width > 1:
            cache = output_cache(out)
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
                **{cache_kwarg(model): cache},
            )
            target, keep = opt[:, 1:].repeat(b, 1), opt_mask[:, 1:].repeat(b, 1).bool()  # (b*K, W-1) each
            rest = logprobs_from_logits(out.logits, target)  # (b*K, W-1)
            total = total + torch.where(keep, rest, 0.0).sum(-1).view(b, k)  # (b, K)
            del cache
        del out, past
        for i, row in zip(batch, total.tolist()):  # one device sync per batch
            result[i] = row
        if on_batch is not None:
            on_batch(b)
    return result
