r"""Prompt sets for SL-CAI and RL-CAI: built-in sets, local files and saved datasets, as ``datasets.Dataset``.

Every loader returns a dataset with the string columns ``id``, ``prompt`` and ``source``. Ids are unique so that
long jobs can be resumed by id. Three prompt forms are understood:

- plain text;
- chat messages (a list of ``{"role", "content"}`` dicts): the prompt is the content of the first ``user`` turn;
- an hh-rlhf transcript (``"\n\nHuman: ...\n\nAssistant: ..."``): the prompt is the first human turn, i.e. the text
  between the first ``Human:`` and the next ``"\n\nAssistant:"``.

The files, folders and hub datasets are read by ``data.sources.load_any_dataset``, the loader of every stage's data.
Problems with the data are reported as one :class:`PromptDataError` with a one-line message naming the file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from data.sources import DataError, is_hub_name, load_any_dataset

log = logging.getLogger(__name__)

BUILTIN_SETS = ("red_team", "helpful")
"""Names of the prompt sets shipped in ``data/builtin`` (see its README)."""

FORMATS = ("auto", "text", "messages", "hh")
"""Prompt column forms: ``auto`` detects per row (a list is chat messages, text starting with ``Human:`` is hh)."""

HARD_MAX_CHARS = 50_000
"""Prompts longer than this many characters are skipped (and counted) whatever ``max_chars`` says, unless a token
limit is given: one huge prompt would otherwise make every later step (tokenizing, sampling) grow without bound."""

CHARS_PER_TOKEN_CAP = 32
"""With a token limit, prompts longer than ``max_tokens * CHARS_PER_TOKEN_CAP`` characters are skipped without being
tokenized (no tokenizer makes tokens that long on average), so counting the tokens of a prompt is bounded too."""

_STRING = datasets.Value("string")


PromptDataError = DataError
"""A prompt source is missing or malformed (``data.sources.DataError``, the error of every data loader)."""


@dataclass
class PromptStats:
    """What happened to the rows of a prompt source."""

    source: str
    """Built-in name or file name."""
    total: int = 0
    """Rows in the source."""
    kept: int = 0
    """Prompts returned."""
    skipped_empty: int = 0
    """Rows whose prompt was missing, empty or whitespace."""
    skipped_too_long: int = 0
    """Rows whose prompt was too long: over ``max_chars`` characters (or the hard cap) or ``max_tokens`` tokens."""
    skipped_too_many_tokens: int = 0
    """Of ``skipped_too_long``, the rows skipped for their token count (or for characters past the token cap)."""
    not_read: int = 0
    """Rows left unread once ``max_prompts`` prompts were kept."""


def load_prompts(source: str | Path, **options) -> datasets.Dataset:
    """Load prompts as a dataset with columns ``id``, ``prompt`` and ``source``, logging how many were skipped.

    ``options`` are the keyword arguments of :func:`load_prompts_with_stats`.
    """
    dataset, stats = load_prompts_with_stats(source, **options)
    if stats.skipped_empty or stats.skipped_too_long:
        log.warning(
            "%s: skipped %d empty and %d over-long prompts", stats.source, stats.skipped_empty, stats.skipped_too_long
        )
    return dataset


def load_prompts_with_stats(
    source: str | Path,
    *,
    prompt_column: str = "prompt",
    split: str = "train",
    id_column: str = "id",
    max_prompts: int | None = None,
    format: str = "auto",
    max_chars: int | None = None,
    keep_columns: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    max_tokens: int | None = None,
    tokenizer: Any = None,
) -> tuple[datasets.Dataset, PromptStats]:
    """Load prompts and report how many rows were kept and skipped.

    Args:
        source: A built-in set name (:data:`BUILTIN_SETS`), or what ``data.sources.load_any_dataset`` reads: a
            ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory written by ``save_to_disk``, or a hub
            dataset (``owner/name[/data_dir]``).
        prompt_column: Column holding the prompt. If the default ``"prompt"`` is absent, a ``messages`` column (chat
            form) or a ``chosen`` column (hh-rlhf transcripts) is used instead, as ``format`` allows.
        split: Split to take when ``source`` is a saved ``DatasetDict`` or a hub dataset.
        id_column: Column holding unique ids; without it ids are ``f"{stem}-{row:06d}"`` (row counted from 0).
        max_prompts: Keep at most this many prompts (the first ones in file order).
        format: One of :data:`FORMATS`.
        max_chars: Skip prompts longer than this many characters. Whatever it says, prompts over
            :data:`HARD_MAX_CHARS` characters are skipped too when no token limit is given.
        keep_columns: Further columns to copy to the result (e.g. ``"category"``).
        cache_dir: Cache directory for ``datasets.load_dataset`` (its default cache if ``None``).
        max_tokens: Skip prompts of more than this many tokens of ``tokenizer`` (the bare prompt, no template).
            Prompts over ``max_tokens * CHARS_PER_TOKEN_CAP`` characters are skipped without tokenizing them.
        tokenizer: The tokenizer that counts ``max_tokens`` (required with it).

    Returns:
        The prompts (columns ``id``, ``prompt``, ``source`` and ``keep_columns``) and the counts.

    Raises:
        PromptDataError: missing source, unknown built-in, unreadable file, missing column, bad row or duplicate id.
    """
    if format not in FORMATS:
        raise PromptDataError(f"unknown prompt format {format!r}; expected one of: {', '.join(FORMATS)}")
    for name, value in (("max_prompts", max_prompts), ("max_chars", max_chars), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or value < (0 if name == "max_prompts" else 1)):
            raise PromptDataError(f"{name}={value!r}: must be at least {0 if name == 'max_prompts' else 1} or None")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("load_prompts_with_stats: max_tokens needs the tokenizer that counts them")
    hard_chars = HARD_MAX_CHARS if max_tokens is None else max_tokens * CHARS_PER_TOKEN_CAP
    table, label, stem = _open(source, split, cache_dir)
    columns = table.column_names
    column = _prompt_column(columns, prompt_column, format, label)
    if format == "auto" and column == "chosen" and prompt_column != "chosen":
        format = "hh"
    for name in keep_columns:
        if name not in columns:
            raise PromptDataError(f"{label}: no column {name!r}; columns are: {', '.join(columns)}")
    ids = list(table[id_column]) if id_column in columns else None
    extras = {name: list(table[name]) for name in keep_columns}
    stats = PromptStats(source=label, total=len(table))
    rows: list[int] = []
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(table[column]):
        if max_prompts is not None and len(prompts) >= max_prompts:
            stats.not_read = stats.total - i
            break
        prompt = _extract(value, format, f"{label}: row {i + 1}")
        if prompt is None or not prompt.strip():
            stats.skipped_empty += 1
            continue
        if max_chars is not None and len(prompt) > max_chars:
            stats.skipped_too_long += 1
            continue
        if len(prompt) > hard_chars or (
            max_tokens is not None and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_tokens
        ):
            stats.skipped_too_long += 1
            stats.skipped_too_many_tokens += 1
            continue
        pid = f"{stem}-{i:06d}" if ids is None else _id(ids[i], f"{label}: row {i + 1}")
        if pid in seen:
            raise PromptDataError(f"{label}: duplicate id {pid!r} (rows {seen[pid] + 1} and {i + 1})")
        seen[pid] = i
        rows.append(i)
        prompts.append(prompt)
    stats.kept = len(prompts)
    data = {"id": list(seen), "prompt": prompts, "source": [label] * len(prompts)}
    data |= {name: [values[i] for i in rows] for name, values in extras.items()}
    features = datasets.Features({"id": _STRING, "prompt": _STRING, "source": _STRING})
    features.update({name: table.features[name] for name in keep_columns})
    return datasets.Dataset.from_dict(data, features=features), stats


def mix_prompts(
    red_team: datasets.Dataset, helpful: datasets.Dataset, helpful_ratio: float, seed: int = 0
) -> datasets.Dataset:
    """Mix red-team and helpful prompts so that a fraction ``helpful_ratio`` of the result is helpful.

    All ``n`` red-team prompts are used, plus ``round(n * helpful_ratio / (1 - helpful_ratio))`` helpful prompts drawn
    at random (0.25 gives one helpful prompt per three red-team prompts). If ``helpful`` is too small for that, all
    of it is used and ``round(len(helpful) * (1 - helpful_ratio) / helpful_ratio)`` red-team prompts are drawn instead.
    The mix is shuffled; the same inputs and ``seed`` always give the same result.

    Args:
        red_team: Prompts with ``id`` and ``prompt`` columns (as from :func:`load_prompts`).
        helpful: Likewise.
        helpful_ratio: Fraction of the mix that is helpful, in ``[0, 1)``.
        seed: Seed for the draws and the shuffle.

    Returns:
        Columns ``id``, ``prompt``, ``source`` (where both inputs have it) and ``kind`` (``"red_team"``/``"helpful"``).

    Raises:
        PromptDataError: ``helpful_ratio`` is outside ``[0, 1)``, a column is missing, or an id occurs twice.
    """
    if not 0 <= helpful_ratio < 1:
        raise PromptDataError(f"helpful_ratio must be in [0, 1), got {helpful_ratio}")
    n_red, n_helpful = len(red_team), round(len(red_team) * helpful_ratio / (1 - helpful_ratio))
    if n_helpful > len(helpful):
        n_red, n_helpful = round(len(helpful) * (1 - helpful_ratio) / helpful_ratio), len(helpful)
    both = set(red_team.column_names) & set(helpful.column_names)
    columns = ["id", "prompt"] + (["source"] if "source" in both else [])
    for name, ds in (("red_team", red_team), ("helpful", helpful)):
        for column in ("id", "prompt"):
            if column not in ds.column_names:
                columns_list = ", ".join(ds.column_names)
                raise PromptDataError(f"mix_prompts: {name} has no column {column!r}; columns are: {columns_list}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for kind, ds, n in (("red_team", red_team, n_red), ("helpful", helpful, n_helpful)):
        picked = ds.select(sorted(rng.sample(range(len(ds)), n)))
        for row in picked:
            rows.append({c: row[c] for c in columns} | {"kind": kind})
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise PromptDataError(f"mix_prompts: id {row['id']!r} occurs in more than one prompt")
        seen.add(row["id"])
    rng.shuffle(rows)
    features = datasets.Features({c: _STRING for c in [*columns, "kind"]})
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in features}, features=features)


def first_human_turn(text: str) -> str:
    r"""Return the first human turn of an hh-rlhf transcript (text between ``Human:`` and ``"\n\nAssistant:"``)."""
    start = text.find("Human:")
    if start < 0:
        raise ValueError("no 'Human:' turn in the transcript")
    end = text.find("\n\nAssistant:", start)
    return text[start + len("Human:") : end if end >= 0 else len(text)].strip()


def first_user_message(messages: list) -> str:
    """Return the content of the first ``user`` (or ``human``) message; ``""`` if there is none."""
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"expected {{'role': ..., 'content': ...}} messages, got {message!r:.80}")
        if message["role"] in ("user", "human"):
            content = message["content"]
            if isinstance(content, list):  # multimodal form: [{"type": "text", "text": ...}, ...]
                content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
            return content or ""
    return ""


def _extract(value: Any, format: str, where: str) -> str | None:
    """Return the prompt in ``value`` (``None`` when it is missing)."""
    if value is None:
        return None
    try:
        if format == "messages" or (format == "auto" and isinstance(value, list)):
            if not isinstance(value, list):
                raise ValueError(f"expected a list of messages, got {type(value).__name__}")
            return first_user_message(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string prompt, got {type(value).__name__}")
        if format == "hh" or (format == "auto" and value.lstrip().startswith("Human:")):
            return first_human_turn(value)
        return value
    except ValueError as err:
        raise PromptDataError(f"{where}: {err}") from None


def _id(value: Any, where: str) -> str:
    if value is None or not str(value).strip():
        raise PromptDataError(f"{where}: empty id")
    return str(value)


def _prompt_column(columns: list[str], prompt_column: str, format: str, label: str) -> str:
    if prompt_column in columns:
        return prompt_column
    if prompt_column == "prompt":
        fallbacks = {"auto": ("messages", "chosen"), "messages": ("messages",), "hh": ("chosen",), "text": ()}
        for name in fallbacks[format]:
            if name in columns:
                return name
    raise PromptDataError(f"{label}: no column {prompt_column!r}; columns are: {', '.join(columns)}")


def _open(source: str | Path, split: str, cache_dir: str | Path | None) -> tuple[datasets.Dataset, str, str]:
    """Return the source as a dataset, with its label (for messages and the source column) and stem (for ids)."""
    if isinstance(source, str) and source in BUILTIN_SETS:
        with resources.as_file(resources.files("data").joinpath("builtin", f"{source}.jsonl")) as path:
            return load_any_dataset(path, what=None, cache_dir=cache_dir), source, source
    path = Path(source)
    if isinstance(source, str) and not path.exists() and not path.suffix and len(path.parts) == 1:
        raise PromptDataError(f"unknown built-in prompt set {source!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
    table = load_any_dataset(source, split, what=None, cache_dir=cache_dir)
    if is_hub_name(source):
        return table, str(source), path.parts[1]
    return table, path.name, path.name if path.is_dir() else path.stem
