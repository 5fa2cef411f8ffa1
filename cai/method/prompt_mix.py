"""The prompts a generation stage answers: red-team and helpful prompts, cleaned and mixed (``PromptSources``).

Shared by ``cai sl-data`` (red-team prompts mixed with helpful ones, as Bai et al. 2022 do to keep the SL-CAI model
helpful) and ``cai label`` (red-team prompts only by default). Also here: ``constitution_fingerprint``, what
identifies a constitution in a stage's ``settings.json`` (so that a resumed run refuses another constitution).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from cai.method.constitution import Constitution
from data.prompts import load_prompts_with_stats, mix_prompts
from models.errors import UserError


@dataclass
class PromptSources:
    """Which prompts to use."""

    red_team: str = "red_team"
    """Red-team prompts: a built-in set name (red_team), a JSONL/JSON/Parquet/CSV file or a datasets directory."""
    helpful: str | None = "helpful"
    """Helpful prompts answered without critique (built-in name, file or directory); None for none."""
    helpful_ratio: float = 0.25
    """Share of helpful prompts in the mix (0.25: one helpful prompt for every three red-team prompts)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, chat messages, or an hh-rlhf transcript)."""
    helpful_prompt_column: str | None = None
    """Prompt column of the helpful set when it differs from ``prompt_column``."""
    max_prompts: int | None = None
    """Use at most this many prompts in all (after mixing); None for all."""
    hold_out_last: int = 0
    """Leave out the last N prompts of each set (``cai eval`` takes its held-out prompts from the end)."""
    max_prompt_chars: int | None = 4000
    """Skip (and count) prompts longer than this many characters."""
    max_prompt_tokens: int | None = 1024
    """Skip (and count) prompts longer than this many tokens of the model's tokenizer (the bare prompt); whatever
    ``max_prompt_chars`` says, this bounds the memory a prompt can take."""
    seed: int = 0
    """Seed of the mixing and shuffling."""


def without(d: dict, *names: str) -> dict:
    """``d`` without the keys ``names``."""
    return {k: v for k, v in d.items() if k not in names}


def constitution_fingerprint(const: Constitution) -> dict:
    """What identifies a constitution in ``settings.json``: its name and a hash of its content (not its path)."""
    content = json.dumps(without(asdict(const), "source"), sort_keys=True, ensure_ascii=False)
    return {"name": const.name, "sha256": hashlib.sha256(content.encode()).hexdigest()}


def _drop_last(ds, n: int):
    return ds.select(range(max(0, len(ds) - n))) if n else ds


def load_prompt_mix(src: PromptSources, tokenizer=None) -> tuple[list[dict], dict]:
    """Load, clean and mix the red-team and helpful prompts. Returns the rows and the skip counters.

    With a ``tokenizer``, prompts longer than ``src.max_prompt_tokens`` tokens are skipped too (and counted), so
    memory stays bounded whatever the character limit says.
    """
    limits = {"max_chars": src.max_prompt_chars, "max_tokens": src.max_prompt_tokens, "tokenizer": tokenizer}
    if tokenizer is None:
        limits["max_tokens"] = None
    red, red_stats = load_prompts_with_stats(src.red_team, prompt_column=src.prompt_column, **limits)
    keys = ("skipped_empty", "skipped_too_long", "skipped_too_many_tokens")
    counts = {k: getattr(red_stats, k) for k in keys}
    red = _drop_last(red, src.hold_out_last)
    if src.helpful and src.helpful_ratio > 0:
        column = src.helpful_prompt_column or src.prompt_column
        helpful, h_stats = load_prompts_with_stats(src.helpful, prompt_column=column, **limits)
        counts = {k: counts[k] + getattr(h_stats, k) for k in keys}
        mixed = mix_prompts(red, _drop_last(helpful, src.hold_out_last), src.helpful_ratio, seed=src.seed)
    else:
        mixed = red.add_column("kind", ["red_team"] * len(red))
    rows = [{"id": str(r["id"]), "prompt": r["prompt"], "kind": r["kind"]} for r in mixed]
    if len(set(r["id"] for r in rows)) != len(rows):
        raise UserError("sl-data: red-team and helpful prompt ids overlap; give the two sets distinct ids")
    return rows[: src.max_prompts] if src.max_prompts else rows, counts
