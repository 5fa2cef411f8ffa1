"""Log-probabilities of given tokens under a causal LM, computing the LM head only where it is needed.

Used to score multiple-choice options for AI feedback (teacher forcing " (A)" and " (B)") and, in PPO, the response
tokens of a rollout. Rows are left-padded so that the tokens to score sit at the end of every row; the model then
only computes logits for the last ``n`` positions (``logits_to_keep``), not a (B, T, V) tensor for the whole prompt.
"""

from __future__ import annotations

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
