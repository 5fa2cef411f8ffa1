"""Append-only JSONL files that survive being killed: the output format of every long generation job.

A job writes each record as soon as it is finished and flushes it to disk. When the job is started again with the
same output file, it reads the ids already written and skips them, so no record is lost or written twice. A line
cut short by a kill (no trailing newline, or not valid JSON) is removed before appending resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


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
                    raise ValueError(f"{self.path}: line {n} is not valid JSON ({e.msg})") from None
                if self.key not in rec:
                    raise ValueError(f"{self.path}: line {n} has no {self.key!r} field")
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
