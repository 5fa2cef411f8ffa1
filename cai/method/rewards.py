"""Synthetic reward functions for ``cai ppo --model.reward_function module:function``.

They stand in for a preference model in tests and demos: each favours a property that even a tiny random policy
can learn quickly, so a rising score shows that the PPO loop works end to end. Signature: (prompts, responses) ->
one float per response.
"""

from __future__ import annotations


def letter_share(prompts: list[str], responses: list[str], letter: str = "e") -> list[float]:
    """Share of the response's characters that are ``letter`` (0 for an empty response), scaled to [0, 10]."""
    return [10.0 * r.count(letter) / len(r) if r else 0.0 for r in responses]


def nan_after_two_calls(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken reward for testing the NaN stop: finite twice, then NaN."""
    nan_after_two_calls.calls = getattr(nan_after_two_calls, "calls", 0) + 1
    return [float("nan") if nan_after_two_calls.calls > 2 else 0.0 for _ in responses]
