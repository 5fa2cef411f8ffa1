"""Reading constitution files: the project's YAML and the paper's JSON, checked entry by entry.

``cai.method.constitution.load_constitution`` is the entry point; it reads a file or a folder through
:func:`load_yaml_constitution` or :func:`load_paper_constitution`. Every problem is one
:class:`~cai.method.constitution.ConstitutionError` whose message is a single line naming the file and the entry,
e.g. ``default.yaml: critiques[3]: missing key 'revision_request'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import yaml

from cai.method.constitution import (
    PAPER_FILES,
    SECTIONS,
    Constitution,
    ConstitutionError,
    CritiquePrinciple,
    FeedbackExample,
    FeedbackPrinciple,
)
from data.formats import CRITIQUE, CRITIQUE_REQUEST, HUMAN, REVISION, REVISION_REQUEST


def load_paper_constitution(
    directory: str | Path | None = None,
    *,
    critiques: str | Path | None = None,
    critique_few_shot: str | Path | None = None,
    feedback: str | Path | None = None,
    feedback_few_shot: str | Path | None = None,
    feedback_cot_few_shot: str | Path | None = None,
    name: str = "anthropic-cai-paper",
) -> Constitution:
    """Load the paper's published JSON files as they are, merged into one constitution.

    Each file is taken from its keyword argument if given, else from ``directory`` under its published name
    (:data:`PAPER_FILES`). ``CritiqueRevisionInstructions.json`` is required; the other files are optional.

    Raises:
        ConstitutionError: a file is missing or malformed.
    """
    given = dict(zip(SECTIONS, (critiques, critique_few_shot, feedback, feedback_few_shot, feedback_cot_few_shot)))
    if directory is not None and not Path(directory).is_dir():
        raise ConstitutionError(f"{directory}: not a directory")
    paths = {}
    for key, filename in PAPER_FILES.items():
        if given[key] is not None:
            paths[key] = Path(given[key])
        elif directory is not None and (Path(directory) / filename).is_file():
            paths[key] = Path(directory) / filename
    if "critiques" not in paths:
        raise ConstitutionError(f"{directory}: missing {PAPER_FILES['critiques']}")
    sections = {key: _PARSERS[key](_read(path), path.name, True) for key, path in paths.items()}
    source = str(directory) if directory is not None else str(paths["critiques"])
    return _build(sections, name=name, source=source, label=Path(source).name)


_TOP_KEYS = {"name", *SECTIONS, *(f"{key}_file" for key in SECTIONS)}
_CRITIQUE, _REVISION, _OPTIONS = (CRITIQUE_REQUEST, CRITIQUE), (REVISION_REQUEST, REVISION), ("", "Options:")


def load_yaml_constitution(path: Path) -> Constitution:
    """A constitution in the project's YAML format (sections inline or in ``<section>_file`` files beside it)."""
    label = path.name
    data = _read(path)
    if not isinstance(data, dict):
        _fail(label, f"expected a mapping at the top level, got {_kind(data)}")
    for key in data:
        if key not in _TOP_KEYS:
            _fail(label, f"unknown key {key!r}; expected one of: {', '.join(sorted(_TOP_KEYS))}")
    if "critiques" not in data and "critiques_file" not in data:
        _fail(label, "missing key 'critiques'")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        _fail(f"{label}: name", "expected a non-empty string")
    sections = {}
    for key in SECTIONS:
        if f"{key}_file" in data:
            if key in data:
                _fail(label, f"give either {key!r} or {key + '_file'!r}, not both")
            ref = data[f"{key}_file"]
            if not isinstance(ref, str) or not ref.strip():
                _fail(f"{label}: {key}_file", f"expected a path, got {_kind(ref)}")
            ref_path = path.parent / ref
            if not ref_path.is_file():
                _fail(f"{label}: {key}_file", f"{ref_path}: file not found")
            sections[key] = _PARSERS[key](_read(ref_path), ref_path.name, True)
        else:
            sections[key] = _PARSERS[key](data.get(key, []), label, False)
    return _build(sections, name=name, source=str(path), label=label)


def _build(sections: dict[str, list], *, name: str, source: str, label: str) -> Constitution:
    constitution = Constitution(name=name, source=source, **sections)
    if not constitution.critiques:
        _fail(label, "no critique principles")
    feedback_ids = {f.id for f in constitution.feedback}
    for i, example in enumerate(constitution.feedback_few_shot):
        if example.principle is not None and example.principle not in feedback_ids:
            _fail(f"{label}: feedback_few_shot[{i}]", f"unknown principle id {example.principle!r}")
    return constitution


def _parse_critiques(data: Any, label: str, paper_ok: bool) -> list[CritiquePrinciple]:
    out = []
    if paper_ok and isinstance(data, dict):  # the paper's {"harmful0": {"prompt": [...], "edit_request": ...}}
        for key, value in data.items():
            where = f"{label}: critiques[{key!r}]"
            entry = _mapping(value, where, ("prompt", "edit_request"))
            requests = [entry["prompt"]] if isinstance(entry["prompt"], str) else entry["prompt"]
            if not isinstance(requests, list) or not requests:
                got = "an empty list" if requests == [] else _kind(requests)
                _fail(f"{where}.prompt", f"expected a non-empty list of strings, got {got}")
            critique = [_bare(r, f"{where}.prompt[{j}]", _CRITIQUE) for j, r in enumerate(requests)]
            revision = _bare(entry["edit_request"], f"{where}.edit_request", _REVISION)
            out.append(CritiquePrinciple(_text(key, where), critique[0], revision, critique[1:]))
        return out
    for i, value in enumerate(_list(data, f"{label}: critiques")):
        where = f"{label}: critiques[{i}]"
        entry = _mapping(value, where, ("id", "critique_request", "revision_request"), ("critique_alternates",))
        alternates = _list(entry.get("critique_alternates", []), f"{where}.critique_alternates")
        critique = _bare(entry["critique_request"], f"{where}.critique_request", _CRITIQUE)
        revision = _bare(entry["revision_request"], f"{where}.revision_request", _REVISION)
        alternates = [_bare(a, f"{where}.critique_alternates[{j}]", _CRITIQUE) for j, a in enumerate(alternates)]
        out.append(CritiquePrinciple(_text(entry["id"], f"{where}.id"), critique, revision, alternates))
    _check_unique(out, label, "critiques")
    return out


def _parse_feedback(data: Any, label: str, paper_ok: bool) -> list[FeedbackPrinciple]:
    out = []
    for i, value in enumerate(_list(data, f"{label}: feedback")):
        where = f"{label}: feedback[{i}]"
        if paper_ok and not isinstance(value, dict):  # the paper's list of principle strings
            out.append(FeedbackPrinciple(f"feedback{i}", _bare(value, where, _OPTIONS)))
        else:
            entry = _mapping(value, where, ("id", "text"))
            out.append(
                FeedbackPrinciple(_text(entry["id"], f"{where}.id"), _bare(entry["text"], f"{where}.text", _OPTIONS))
            )
    _check_unique(out, label, "feedback")
    return out


def _parse_critique_few_shot(data: Any, label: str, paper_ok: bool) -> list[str]:
    out = []
    for i, value in enumerate(_list(data, f"{label}: critique_few_shot")):
        text = _text(value, f"{label}: critique_few_shot[{i}]")
        for marker in (HUMAN, CRITIQUE_REQUEST, CRITIQUE, REVISION_REQUEST, REVISION):
            if marker not in text:
                _fail(f"{label}: critique_few_shot[{i}]", f"transcript has no {marker!r} turn")
        out.append(text)
    return out


def _parse_feedback_few_shot(data: Any, label: str, paper_ok: bool) -> list[FeedbackExample]:
    out = []
    for i, value in enumerate(_list(data, f"{label}: feedback_few_shot")):
        where = f"{label}: feedback_few_shot[{i}]"
        entry = _mapping(value, where, ("prompt", "corrects", "incorrects"), ("principle",))
        targets = {}
        for key in ("corrects", "incorrects"):
            items = _list(entry[key], f"{where}.{key}")
            if not items:
                _fail(f"{where}.{key}", "empty list")
            targets[key] = [_text(t, f"{where}.{key}[{j}]") for j, t in enumerate(items)]
        principle = entry.get("principle")
        principle = None if principle is None else _text(principle, f"{where}.principle")
        out.append(FeedbackExample(_text(entry["prompt"], f"{where}.prompt"), principle=principle, **targets))
    return out


def _parse_cot_few_shot(data: Any, label: str, paper_ok: bool) -> list[str]:
    out = []
    for i, value in enumerate(_list(data, f"{label}: feedback_cot_few_shot")):
        where = f"{label}: feedback_cot_few_shot[{i}]"
        if isinstance(value, dict):  # the paper's {"prompt": ...}
            value = _mapping(value, where, ("prompt",))["prompt"]
            where += ".prompt"
        out.append(_text(value, where))
    return out


_PARSERS = {
    "critiques": _parse_critiques,
    "feedback": _parse_feedback,
    "critique_few_shot": _parse_critique_few_shot,
    "feedback_few_shot": _parse_feedback_few_shot,
    "feedback_cot_few_shot": _parse_cot_few_shot,
}


def _fail(where: str, message: str) -> NoReturn:
    raise ConstitutionError(f"{where}: {message}")


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}
    return names.get(type(value), f"{type(value).__name__} {value!r}")


def _read(path: Path) -> Any:
    """Parse a JSON (``.json``) or YAML file; every failure becomes a one-line :class:`ConstitutionError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConstitutionError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConstitutionError(f"{path}: cannot read file: {_one_line(str(err))}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConstitutionError(
                f"{path.name}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConstitutionError(f"{path.name}: invalid YAML{at}: {_one_line(problem)}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {_kind(value)}")
    return value


def _mapping(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping, got {_kind(value)}")
    for key in required:
        if key not in value:
            _fail(where, f"missing key {key!r}")
    for key in value:
        if key not in required and key not in optional:
            _fail(where, f"unknown key {key!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {_kind(value)}")
    if not value.strip():
        _fail(where, "empty text")
    return value


def _bare(value: Any, where: str, frame: tuple[str, str]) -> str:
    """Strip the paper's ``head ... tail`` framing and surrounding whitespace from a request or principle."""
    (head, tail), text = frame, _text(value, where).strip()
    if head and text.startswith(head):
        text = text[len(head) :].strip()
    if text.endswith(tail):
        text = text[: -len(tail)].strip()
    if not text:
        _fail(where, "empty text")
    return text


def _check_unique(principles: list, label: str, section: str) -> None:
    seen = set()
    for i, principle in enumerate(principles):
        if principle.id in seen:
            _fail(f"{label}: {section}[{i}]", f"duplicate id {principle.id!r}")
        seen.add(principle.id)
