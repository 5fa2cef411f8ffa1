"""Reading a data source into a ``datasets.Dataset``: the one loader of every stage's data.

A source is a ``datasets`` folder (written by ``save_to_disk``), a JSONL/JSON/Parquet/CSV file, or a hub dataset
named ``owner/name`` or ``owner/name/data_dir``. SFT data, preference pairs, prompt sets and feedback evaluations
are all read by :func:`load_any_dataset`. Every problem is one :class:`DataError` whose one-line message names the
source: missing (with the stage that writes a default input), not a dataset folder, unreadable or malformed (the line
of a JSON file, the first line that is not UTF-8), no such split, or no rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from models.errors import UserError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffixes that ``datasets`` reads, and its builder for each."""


class DataError(UserError):
    """A data source is missing or malformed. The message is one line naming the source."""


def load_any_dataset(
    source: str | Path, split: str = "train", what: str | None = "data", cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """Load a ``datasets`` folder, a JSONL/JSON/Parquet/CSV file, or a hub dataset (``owner/name[/data_dir]``).

    Args:
        source: The folder, the file, or the hub name. A missing path that looks local (``runs/...``, ``./``,
            ``/``, ``~``, one part, or a data file's suffix) is reported missing, never looked up on the hub.
        split: The split of a saved ``DatasetDict`` or of a hub dataset (a file has one, ``train``).
        what: The setting that names the source (``data.train``), put before the path in the messages that are
            about the path (missing, no rows, cannot load from the hub); None: the path alone.
        cache_dir: Cache directory of ``datasets.load_dataset`` (its default cache if None).

    Raises:
        DataError: the source is missing, unreadable or malformed, has no such split, or has no rows.
    """
    path = Path(source)
    at = f"{what}: {path}" if what else str(path)
    if path.is_dir():
        ds = _load_folder(path, split)
    elif path.exists():
        ds = _load_file(path, cache_dir)
    elif is_hub_name(source):
        ds = _load_hub(str(source), split, cache_dir, at)
    else:
        missing = "no such file" if path.suffix.lower() in _BUILDERS else "no such file or folder"
        raise DataError(f"{at}: {missing}{_how_to_make(path)}")
    if len(ds) == 0:
        raise DataError(f"{at}: no rows (an empty file or dataset)")
    return ds


def is_hub_name(source: str | Path) -> bool:
    """Whether ``source`` names a hub dataset: no such local path, two or more parts, not a local-looking path."""
    path = Path(source)
    return (
        isinstance(source, str)
        and not path.exists()
        and len(path.parts) >= 2
        and path.suffix.lower() not in _BUILDERS
        and path.parts[0] != "runs"
        and not source.startswith((".", "/", "~"))
    )


def _how_to_make(p: Path) -> str:
    """A hint naming the stage that writes a missing default input (``runs/.../sl_data/sft``, ``label/pairs``)."""
    parts = p.parts
    if len(parts) >= 2 and parts[-2:] == ("sl_data", "sft"):
        return " (the output of cai sl-data: run it first, or cai pipeline)"
    if len(parts) >= 2 and parts[-2:] == ("label", "pairs"):
        return " (the output of cai label: run it first, or cai pipeline)"
    return ""


def _load_folder(path: str | Path, split: str = "train") -> datasets.Dataset:
    """A ``datasets`` folder written by ``save_to_disk`` (split ``split`` of a ``DatasetDict``).

    Raises:
        DataError: not a dataset folder, unreadable, no such split, or no rows (one line naming the folder).
    """
    path = Path(path)
    state = path / "state.json"
    if state.is_file():  # a 0-row dataset is saved with no data file, which load_from_disk cannot read back
        try:
            files = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
        except (OSError, ValueError):
            files = None
        if files == []:
            raise DataError(f"{path}: no rows (an empty dataset)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: not a dataset directory written by save_to_disk") from None
    except Exception as err:  # a damaged folder: arrow, JSON or index errors
        raise DataError(f"{path}: cannot load dataset folder: {' '.join(str(err).split())[:300]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path.name}: no split {split!r}; splits are: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_hub(source: str, split: str, cache_dir: str | Path | None, at: str) -> datasets.Dataset:
    """A hub dataset named ``owner/name`` or ``owner/name/data_dir`` (e.g. ``Anthropic/hh-rlhf/red-team-attempts``)."""
    parts = source.split("/")
    repo, data_dir = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        return datasets.load_dataset(
            repo, data_dir=data_dir, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as err:  # offline, unknown repo, missing split: all the user's to fix
        raise DataError(f"{at}: cannot load hub dataset: {' '.join(str(err).split())[:300]}") from None


def _load_file(path: Path, cache_dir: str | Path | None) -> datasets.Dataset:
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        expected = ", ".join(_BUILDERS)
        raise DataError(f"{path.name}: unsupported file type; expected a datasets folder or one of: {expected}")
    if builder in ("json", "csv"):  # pyarrow reads bad bytes into the table and fails only when a row is read
        where = _not_utf8(path)
        if where:
            raise DataError(where)
    try:
        cache = None if cache_dir is None else str(cache_dir)
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
    except Exception as err:  # datasets wraps parser failures in several exception types
        raise DataError(_diagnose(path, err)) from None


def _diagnose(path: Path, err: Exception) -> str:
    """Describe why ``datasets`` could not read ``path``, naming the bad line of a JSON file where possible."""
    if path.suffix.lower() in (".json", ".jsonl", ".csv"):
        where = _not_utf8(path)
        if where:
            return where
    if path.suffix.lower() in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            return f"{path.name}: the file is empty (no rows)"
        try:
            json.loads(text)
            return f"{path.name}: cannot load JSON: the file must hold a list of objects or one object per line"
        except json.JSONDecodeError as whole:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
            if not _is_json_object(lines[0][1]):  # one multi-line document rather than JSON Lines
                return f"{path.name}: line {whole.lineno}: invalid JSON: {whole.msg}"
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"{path.name}: line {number}: invalid JSON: {bad.msg}"
            if not isinstance(row, dict):
                return f"{path.name}: line {number}: expected a JSON object, got {type(row).__name__}"
    cause = err.__cause__ or err
    return f"{path.name}: cannot load {path.suffix.lstrip('.')} file: {' '.join(str(cause).split())[:300]}"


def _not_utf8(path: Path) -> str | None:
    """A one-line message naming the first line of ``path`` that is not UTF-8, or None when all of it is.

    Read line by line, so a large file is never held whole in memory.
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = line[err.start]
                return f"{path.name}: line {number}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8"
    return None


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False
