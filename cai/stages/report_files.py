"""Reading a run folder's files and writing Markdown cells: the small parts of ``cai report`` (``report.py``).

Every reader tolerates what a run cut short leaves behind: an absent file is empty, a cut last JSONL line is skipped,
and a damaged file is a warning, never the end of the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

CELL_CHARS = 600
"""Characters of a sample shown in a table cell."""


def last(scalars: dict, tag: str) -> float | None:
    """The value at the last step of ``tag``; None when the tag is absent."""
    return scalars[tag][-1][1] if scalars.get(tag) else None


def finals(scalars: dict, *tags: str) -> str:
    """'final tag value, tag value' for the given tags."""
    return "final " + ", ".join(f"{t} {fmt(last(scalars, t))}" for t in tags)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file (empty when the file is absent; a cut last line is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is absent."""
    return json.loads(path.read_text()) if path.exists() else None


def read_yaml(path: Path):
    """A YAML file's content, or None when it is absent."""
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _safe(fn, path: Path, default):
    """``fn(path)``, or ``default`` (with a warning) when the file cannot be read."""
    try:
        return fn(path)
    except Exception as e:  # a damaged log must not stop the report
        print(f"report: cannot read {path}: {e!r}", file=sys.stderr)
        return default


def cell(text: str | None, limit: int = CELL_CHARS) -> str:
    """Text made safe for a Markdown table cell: pipes escaped, newlines as <br>, long text cut."""
    text = (text or "").strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    text = "".join(c if c.isprintable() or c == "\n" else " " for c in text)  # tabs, control bytes of tiny models
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\n", "<br>") or "*(empty)*"


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for the report; '-' for None."""
    return "-" if x is None else f"{x:.{digits}f}"
