r"""The constitution: the principles that steer SL-CAI critiques/revisions and RL-CAI AI feedback.

A constitution comes from one of three places (see :func:`load_constitution`):

- ``"default"``: the project's own constitution shipped as ``cai/method/constitutions/default.yaml``;
- a ``.yaml``/``.yml`` file in the project format (:meth:`Constitution.to_yaml` writes one);
- a directory holding the JSON files published with Bai et al. (2022), read as they are
  (:func:`load_paper_constitution`).

Requests and principles are held as *bare text*. The paper's files frame each critique request as
``"\n\nCritiqueRequest: <text>\n\nCritique:"``, each revision request as ``"\n\nRevisionRequest: <text>\n\nRevision:"``
and each feedback principle as ``"\n<text> Options:"``; loading strips that framing (from the project's YAML too) and
:func:`data.formats.frame_critique_request` and its siblings put it back exactly.
Few-shot transcripts are kept verbatim.

Every problem with a file is reported as one :class:`ConstitutionError` whose message is a single line naming the file
and the entry, e.g. ``default.yaml: critiques[3]: missing key 'revision_request'``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from data.formats import CRITIQUE, CRITIQUE_REQUEST, HUMAN, REVISION, REVISION_REQUEST
from models.errors import UserError

PAPER_FILES = {
    "critiques": "CritiqueRevisionInstructions.json",
    "critique_few_shot": "CritiqueRevisionFewShotPrompts.json",
    "feedback": "RLMadisonInstructions.json",
    "feedback_few_shot": "RLMadisonFewShotPrompts.json",
    "feedback_cot_few_shot": "RLMadisonPrecogFewShotPrompts.json",
}
"""Section of a :class:`Constitution` -> the name of the paper's JSON file that holds it."""

SECTIONS = tuple(PAPER_FILES)
"""The list-valued sections of a constitution, in file order."""

COT_PLACEHOLDER = "{}"
"""Marks where the framed feedback principle goes in a chain-of-thought few-shot (the paper's convention)."""


class ConstitutionError(UserError):
    """A constitution file is missing or malformed, or a principle id is unknown. The message is one line."""


@dataclass
class CritiquePrinciple:
    """One SL-CAI principle: a critique request and the matching revision request."""

    id: str
    """Unique slug, e.g. ``"harm-general"`` (the paper's principles keep their keys ``"harmful0"`` ...)."""
    critique_request: str
    """Bare critique request, e.g. ``"Identify specific ways in which the assistant's last response is harmful..."``."""
    revision_request: str
    """Bare revision request, e.g. ``"Please rewrite the assistant response to remove any and all harmful..."``."""
    critique_alternates: list[str] = field(default_factory=list)
    """Further phrasings of the critique request. The paper stores each critique request as a list; the first entry
    becomes ``critique_request`` and any others land here (all 16 published principles have exactly one)."""


@dataclass
class FeedbackPrinciple:
    """One RL-CAI principle for the multiple-choice preference query."""

    id: str
    """Unique slug, e.g. ``"anti-evasion"`` (the paper's principles get ``"feedback0"`` ... in file order)."""
    text: str
    """Bare principle, without the trailing ``"Options:"``."""


@dataclass
class FeedbackExample:
    """A few-shot preference-labelling example.

    Two shapes occur. The project's examples are complete multiple-choice queries ending ``"The answer is:"`` with
    option labels as targets (``corrects=[" (B)"]``). The paper's ``RLMadisonFewShotPrompts.json`` instead holds a
    conversation ending ``"Assistant:"`` with whole responses as targets; :attr:`is_multiple_choice` tells them apart.
    """

    prompt: str
    """The query (or conversation) shown to the feedback model."""
    corrects: list[str]
    """Completions that are the right answer."""
    incorrects: list[str]
    """Completions that are the wrong answer."""
    principle: str | None = None
    """Id of the feedback principle the query uses, if it uses one; checked against the constitution on load."""

    @property
    def is_multiple_choice(self) -> bool:
        """Whether every target is an option label such as ``" (A)"``."""
        return all(re.fullmatch(r"\s*\([A-Z]\)\s*", t) for t in self.corrects + self.incorrects)


@dataclass
class Constitution:
    """A named set of critique/revision principles, feedback principles and few-shot examples."""

    critiques: list[CritiquePrinciple]
    """SL-CAI critique/revision principles (at least one)."""
    feedback: list[FeedbackPrinciple] = field(default_factory=list)
    """RL-CAI feedback principles."""
    critique_few_shot: list[str] = field(default_factory=list)
    """Complete ``Human: / Assistant: / CritiqueRequest: / Critique: / RevisionRequest: / Revision:`` transcripts."""
    feedback_few_shot: list[FeedbackExample] = field(default_factory=list)
    """Preference-labelling examples."""
    feedback_cot_few_shot: list[str] = field(default_factory=list)
    """Chain-of-thought labelling transcripts; :data:`COT_PLACEHOLDER` marks where the framed principle goes."""
    name: str = "constitution"
    """Human-readable name (the YAML ``name`` key, else the file's stem)."""
    source: str | None = field(default=None, compare=False)
    """Path the constitution was loaded from; not part of equality."""

    def get_critique(self, id: str) -> CritiquePrinciple:
        """Return the critique principle ``id``; an unknown id raises :class:`ConstitutionError`."""
        return _lookup(self.critiques, id, "critique", self._label)

    def get_feedback(self, id: str) -> FeedbackPrinciple:
        """Return the feedback principle ``id``; an unknown id raises :class:`ConstitutionError`."""
        return _lookup(self.feedback, id, "feedback", self._label)

    def require_feedback(self, command: str = "label") -> list[FeedbackPrinciple]:
        """The feedback principles, or a :class:`ConstitutionError` naming what is missing (for ``command``).

        A folder of the paper's files without ``RLMadisonInstructions.json`` is named as such.
        """
        if not self.feedback:
            if self.source and Path(self.source).is_dir():
                raise ConstitutionError(
                    f"{self.source}: missing {PAPER_FILES['feedback']} (the feedback principles {command} needs)"
                )
            raise ConstitutionError(f"{self._label}: no feedback principles ({command} needs them)")
        return self.feedback

    def sample_critique(self, rng: random.Random | int) -> CritiquePrinciple:
        """Draw a critique principle uniformly; ``rng`` is a ``random.Random`` or a seed."""
        return _as_rng(rng).choice(self.critiques)

    def sample_feedback(self, rng: random.Random | int) -> FeedbackPrinciple:
        """Draw a feedback principle uniformly; ``rng`` is a ``random.Random`` or a seed."""
        if not self.feedback:
            raise ConstitutionError(f"{self._label}: no feedback principles to sample from")
        return _as_rng(rng).choice(self.feedback)

    @staticmethod
    def sampler(seed: int, key: str | int | None = None) -> random.Random:
        """Return a generator for ``seed``, optionally keyed (e.g. by prompt id).

        A keyed generator draws the same principles for an item whatever order items are processed in, which keeps
        resumed jobs reproducible. String seeds are hashed with SHA-512, so this does not depend on ``PYTHONHASHSEED``.
        """
        return random.Random(seed if key is None else f"{seed}:{key}")

    def to_dict(self) -> dict[str, Any]:
        """Return the constitution in the project's YAML layout (empty optional fields left out)."""
        unset = ([], None)
        return {"name": self.name} | {
            key: [{k: v for k, v in asdict(x).items() if v not in unset} if is_dataclass(x) else x for x in items]
            for key, items in ((key, getattr(self, key)) for key in SECTIONS)
        }

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise to the project YAML format (written to ``path`` if given); reloading gives an equal object."""
        text = yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @property
    def _label(self) -> str:
        return Path(self.source).name if self.source else self.name


def shipped_constitutions() -> list[str]:
    """Names of the constitutions shipped in ``cai/method/constitutions`` (``"default"`` among them)."""
    folder = resources.files("cai.method").joinpath("constitutions")
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def load_constitution(path_or_name: str | Path | None = "default") -> Constitution:
    """Load a constitution.

    Args:
        path_or_name: ``None`` or ``"default"`` (or another name from :func:`shipped_constitutions`) for a shipped
            constitution, a ``.yaml``/``.yml`` file in the project format, or a directory of the paper's JSON files.

    Raises:
        ConstitutionError: the file is missing or malformed (one-line message naming the file and the entry).
    """
    if path_or_name is None or (isinstance(path_or_name, str) and path_or_name in shipped_constitutions()):
        name = path_or_name or "default"
        folder = resources.files("cai.method").joinpath("constitutions")
        resource = next(p for p in folder.iterdir() if p.name in (f"{name}.yaml", f"{name}.yml"))
        with resources.as_file(resource) as path:
            return _load_yaml(path)
    path = Path(path_or_name)
    if path.is_dir():
        return load_paper_constitution(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return _load_yaml(path)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        raise ConstitutionError(f"unknown constitution {str(path)!r}; shipped: {', '.join(shipped_constitutions())}")
    if not path.exists():
        raise ConstitutionError(f"{path}: no such file or directory")
    raise ConstitutionError(f"{path}: expected a .yaml/.yml file or a directory of the paper's JSON files")


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


# ----------------------------------------------------------------------------------------------------- file parsing

_TOP_KEYS = {"name", *SECTIONS, *(f"{key}_file" for key in SECTIONS)}
_CRITIQUE, _REVISION, _OPTIONS = (CRITIQUE_REQUEST, CRITIQUE), (REVISION_REQUEST, REVISION), ("", "Options:")


def _load_yaml(path: Path) -> Constitution:
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


def _lookup(principles: list, id: str, kind: str, label: str) -> Any:
    for principle in principles:
        if principle.id == id:
            return principle
    known = ", ".join(p.id for p in principles) or "none"
    raise ConstitutionError(f"{label}: unknown {kind} principle id {id!r}; known ids: {known}")


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks so that transcripts stay readable."""


_Dumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)
