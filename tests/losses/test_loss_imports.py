"""``losses`` must stay pure torch: importing it may not pull in Lightning or transformers."""

from __future__ import annotations

import subprocess
import sys

import losses


def test_losses_imports_neither_lightning_nor_transformers():
    code = (
        "import losses, sys; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'trl') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_all_is_complete_and_importable():
    assert sorted(losses.__all__) == sorted(set(losses.__all__))
    for name in losses.__all__:
        assert callable(getattr(losses, name)), name
