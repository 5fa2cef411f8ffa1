"""Append-only JSONL files that survive being killed: the output format of every long generation job.

A job writes each record as soon as it is finished and flushes it to disk. When the job is started again with the
same output file, it reads the ids already written and skips them, so no record is lost or written twice. A line
cut short by a kill (no trailing newline, or not valid JSON) is removed before appending resumes.

A job's output folder also remembers the settings that determine its records (``settings.json``, written by
:func:`claim_out_dir` before the first record): a rerun with other settings stops before any work instead of mixing
records of two runs in one file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from models.errors import UserError, check_output_dir

SETTINGS = "settings.json"


def check_out_dir(out: str | Path, stage: str) -> Path:
    """Make ``out`` a folder the job can write to, or stop with a one-line :class:`UserError` naming it.

    Refused (:func:`models.errors.check_output_dir`): an existing file, a path under a file, an unwritable folder;
    and, since permission bits do not stop root, any folder where making it or writing a file in it fails.
    """
    out = check_output_dir(out, "out")
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{stage}: cannot write to out={out} ({e.strerror or e})") from None
    return out


def first_difference(old: Any, new: Any, name: str = "") -> str | None:
    """The first setting that differs between two JSON values, as ``"name was X, now Y"``; None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            sub = f"{name}.{key}" if name else str(key)
            if key not in old:
                return f"{sub} was not set, now {json.dumps(new[key])}"
            if key not in new:
                return f"{sub} was {json.dumps(old[key])}, now not set"
            diff = first_difference(old[key], new[key], sub)
            if diff:
                return diff
        return None
    if old != new or type(old) is not type(new) and not (_number(old) and _number(new)):
        return f"{name or 'settings'} was {json.dumps(old)}, now {json.dumps(new)}"
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def claim_out_dir(out: str | Path, settings: dict, stage: str, overwrite: bool, outputs: Iterable[str]) -> Path:
    """Check (or write) the settings of the run that owns ``out``, before any record is written.

    Args:
        out: The output folder (made if missing; see :func:`check_out_dir`).
        settings: JSON-able settings that determine the records (not chunk sizes, devices or batch sizes).
        stage: The command's name, for messages.
        overwrite: Remove ``outputs`` and the old settings first, and start again.
        outputs: Files and folders of ``out`` that hold results (``records.jsonl``, ``summary.json``, ...).

    Raises:
        UserError: ``out`` holds a run with other settings (naming the first that differs), or records with no
            settings (an older version's run).
    """
    out = check_out_dir(out, stage)
    path = out / SETTINGS
    new = json.loads(json.dumps(settings))  # as it reads back: tuples become lists, keys strings
    if overwrite:
        for name in [*outputs, SETTINGS]:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    elif path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e}); use --overwrite to start again") from None
        diff = first_difference(old, new)
        if diff:
            raise UserError(
                f"{out}: settings differ from the run already there: {diff}; use --overwrite to start again"
            )
        return out
    elif any((out / name).exists() for name in outputs):
        raise UserError(
            f"{out}: holds results but no {SETTINGS} (a run by an older version), so its settings are unknown; "
            "use --overwrite to start again"
        )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return out


class ResumableJsonl:
    """An append-only JSONL file of records keyed by a unique id.

    Args:
        path: The file; created with its parent folders when missing.
        key: Name of the id field of every record.
    """

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = self._repair()
        self.done: set[str] = {str(r[key]) for r in self.read()}

    def _repair(self) -> bool:
        """Drop a trailing partial line left by a killed writer. Returns True when one was dropped."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
        lines = data[:keep].splitlines(keepends=True)
        # A line can also be complete but corrupt if the kill hit between write and flush of a later buffer.
        while lines:
            try:
                json.loads(lines[-1])
                break
            except json.JSONDecodeError:
                keep -= len(lines.pop())
        if keep == len(data):
            return False
        with open(self.path, "r+b") as f:
            f.truncate(keep)
        return True

    def read(self) -> list[dict]:
        """All records in the file, in the order written. A corrupt line inside the file is an error naming it."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{self.path}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or self.key not in rec:
                    raise UserError(f"{self.path}: line {n} has no {self.key!r} field")
                records.append(rec)
        return records

    def write(self, records: Iterable[dict]) -> int:
        """Append records whose id is not written yet; flush them to disk. Returns how many were written."""
        new = [r for r in records if str(r[self.key]) not in self.done]
        if not new:
            return 0
        with open(self.path, "a", encoding="utf-8") as f:
            for r in new:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(str(r[self.key]) for r in new)
        return len(new)
