"""The one error type for mistakes a user can fix: a bad setting, a missing or malformed file, a bad row.

Every layer raises it (``models``, ``data`` and ``cai`` all import it from here, the lowest layer that reads user
input), and the ``cai`` command catches it once: one line naming the file and the field, row or line, exit status 2,
no traceback unless ``CAI_DEBUG=1``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's input. The message is one line that names the culprit (file, field, row or line)."""


def check_output_dir(path: str | Path, what: str = "out") -> Path:
    """Refuse an output folder that cannot be one: an existing file, a path under a file, or an unwritable folder.

    Nothing is created; the check only looks. Returns the path.

    Raises:
        UserError: naming ``what`` and the path.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what}: {path} lies under {probe}, which is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {path}: folder {probe} is not writable")
    return path


def check_input_file(path: str | Path, what: str) -> Path:
    """Refuse an input that is missing or unreadable. Returns the path.

    Raises:
        UserError: naming ``what`` and the path.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what}: {path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what}: {path}: not readable")
    return path


def check_positive(value: int | float | None, name: str, allow_none: bool = False) -> None:
    """Refuse a count or size that is not at least 1 (``None`` too unless ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or value < 1:
        raise UserError(f"{name}={value!r}: must be at least 1")
