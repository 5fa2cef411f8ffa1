"""The one-way layering of the code: losses <- models <- data <- cai <- scripts.

Every ``import`` statement of every module is read (with ``ast``, imports inside functions included) and checked
against the layer order: a module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["losses", "models", "data", "cai", "scripts"]
"""Lowest first: a layer may import the layers before it."""


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports only; the project uses no relative ones)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def back_edges() -> list[str]:
    edges = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((REPO / layer).rglob("*.py")):
            above = imported_packages(path) & set(LAYERS[rank + 1 :])
            edges += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(above)]
    return edges


def test_no_module_imports_a_layer_above_its_own():
    assert back_edges() == []


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    # The checker must be able to fail: a models/ module that imports cai is reported.
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from cai.method.feedback import FeedbackConfig\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for layer in LAYERS:
        (tmp_path / layer).mkdir(exist_ok=True)
    assert back_edges() == ["models/bad.py imports cai"]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_folder(layer):
    assert (REPO / layer).is_dir()
