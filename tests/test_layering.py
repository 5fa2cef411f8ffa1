"""The one-way layering of the code: losses <- models <- data <- cai <- scripts, and inside ``cai`` the stages on top.

Every ``import`` statement of every module is read (with ``ast``, imports inside functions included) and checked
against the layer order: a module may import its own layer and the layers below it, never one above. Inside ``cai``:
the building blocks (``cai/method/``) and the infrastructure at the top of ``cai/`` never import ``cai.stages``
(except ``cli.py``, which dispatches to the stages), and a stage imports no other stage (except ``pipeline.py``, which
runs them all).
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


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports; ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (c may be a
    module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def command_modules() -> set[str]:
    """The modules that a ``cai`` command runs: the ``module`` of every ``module:function`` in ``cai/cli.py``'s
    ``COMMANDS``."""
    tree = ast.parse((REPO / "cai" / "cli.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "COMMANDS":
            return {spec[0].split(":")[0] for spec in ast.literal_eval(node.value).values()}
    raise AssertionError("cai/cli.py has no COMMANDS")


def stage_edges() -> list[str]:
    """Imports of ``cai.stages`` that the layering inside ``cai`` forbids, as 'FILE imports MODULE'.

    A stage is a module that a ``cai`` command runs; a module of ``cai/stages/`` that no command runs is a part of
    the stage that imports it (e.g. its settings), and it imports no stage either.
    """
    stages = {m for m in command_modules() if m.startswith("cai.stages.")}
    edges = []
    for path in sorted((REPO / "cai").rglob("*.py")):
        rel = path.relative_to(REPO)
        # ``cai.stages.label.run`` (a name from a module) counts as its module, ``cai.stages.label``.
        used = {".".join(n.split(".")[:3]) for n in imported_modules(path) if n.split(".")[:2] == ["cai", "stages"]}
        if rel.parts[1] == "stages":
            bad = set() if path.name == "pipeline.py" else used & stages - {f"cai.stages.{path.stem}"}
        else:
            bad = set() if rel.as_posix() == "cai/cli.py" else used
        edges += [f"{rel.as_posix()} imports {name}" for name in sorted(bad)]
    return edges


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


def test_building_blocks_never_import_a_stage_and_no_stage_imports_another():
    assert stage_edges() == []


def test_the_check_sees_a_stage_import(tmp_path, monkeypatch):
    # The checker must be able to fail: each forbidden import is reported; the allowed ones are not.
    commands = {name: (f"cai.stages.{name}:run", "fn", "help") for name in ("label", "sl_data", "pipeline")}
    files = {
        "cai/cli.py": f"COMMANDS = {commands!r}\nfrom cai.stages import label\n",
        "cai/method/bad.py": "def f():\n    from cai.stages.label import run\n",
        "cai/training.py": "import cai.stages.sl_data as sl_data\n",
        "cai/stages/label.py": "from cai.stages import sl_data\nfrom cai.stages.label_settings import LabelSettings\n",
        "cai/stages/label_settings.py": "from cai.stages.sl_data import PromptSources\n",  # a part of a stage
        "cai/stages/pipeline.py": "from cai.stages import label, sl_data\n",  # allowed: the orchestrator
        "cai/stages/sl_data.py": "from cai.method.elo import fit_elo\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert stage_edges() == [
        "cai/method/bad.py imports cai.stages.label",
        "cai/stages/label.py imports cai.stages.sl_data",
        "cai/stages/label_settings.py imports cai.stages.sl_data",
        "cai/training.py imports cai.stages.sl_data",
    ]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_folder(layer):
    assert (REPO / layer).is_dir()
