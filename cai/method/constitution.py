r"""The constitution: the principles that steer SL-CAI critiques/revisions and RL-CAI AI feedback.

A constitution comes from one of three places (see :func:`load_constitution`):

- ``"default"``: the project's own constitution shipped as ``cai/method/constitutions/default.yaml``;
- a ``.yaml``/``.yml`` file in the project format (:meth:`Constitution.to_yaml` writes one);
- a directory holding the JSON files published with Bai et al. (2022), read as they are
  (:func:`cai.method.constitution_files.load_paper_constitution`).

Requests and principles are held as *bare text*. The paper's files frame each critique request as
``"\n\nCritiqueRequest: <text>\n\nCritique:"``, each revision request as ``"\n\nRevisionRequest: <text>\n\nRevision:"``
and each feedback principle as ``"\n<text> Options:"``; loading strips that framing (from the project's YAML too) and
:func:`data.formats.frame_critique_request` and its siblings put it back exactly.
Few-shot transcripts are kept verbatim.

This module holds the constitution and the drawing of principles; ``cai.method.constitution_files`` reads and checks
the files. Every problem with a file is reported as one :class:`ConstitutionError` whose message is a single line
naming the file and the entry, e.g. ``default.yaml: critiques[3]: missing key 'revision_request'``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

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
    # The readers build this module's classes, so they are imported when called, not with this module.
    from cai.method.constitution_files import load_paper_constitution, load_yaml_constitution

    if path_or_name is None or (isinstance(path_or_name, str) and path_or_name in shipped_constitutions()):
        name = path_or_name or "default"
        folder = resources.files("cai.method").joinpath("constitutions")
        resource = next(p for p in folder.iterdir() if p.name in (f"{name}.yaml", f"{name}.yml"))
        with resources.as_file(resource) as path:
            return load_yaml_constitution(path)
    path = Path(path_or_name)
    if path.is_dir():
        return load_paper_constitution(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_yaml_constitution(path)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        raise ConstitutionError(f"unknown constitution {str(path)!r}; shipped: {', '.join(shipped_constitutions())}")
    if not path.exists():
        raise ConstitutionError(f"{path}: no such file or directory")
    raise ConstitutionError(f"{path}: expected a .yaml/.yml file or a directory of the paper's JSON files")


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
