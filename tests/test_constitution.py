import json
import random
from pathlib import Path

import pytest
import yaml

from cai.method.constitution import PAPER_FILES, Constitution, ConstitutionError, load_constitution
from cai.method.constitution_files import load_paper_constitution
from data.formats import frame_critique_request, frame_feedback_principle, frame_revision_request

PAPER_DIR = Path(__file__).resolve().parents[2] / "shared" / "anthropic-cai" / "prompts"

THEMES = {"harm-general", "harm-to-others", "illegal-dangerous", "toxic-discriminatory", "age-appropriate"}
THEMES |= {"ethics-morality", "privacy", "manipulation-deception", "anti-evasion"}


@pytest.fixture(scope="module")
def default() -> Constitution:
    return load_constitution()


@pytest.fixture(scope="module")
def paper_dir() -> Path:
    if not PAPER_DIR.is_dir():
        pytest.skip(f"the paper's prompt files are not at {PAPER_DIR} (expected ../shared next to the repository)")
    return PAPER_DIR


def _paper_json(name: str):
    return json.loads((PAPER_DIR / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------- default


def test_default_loads_by_name_and_none(default):
    assert load_constitution(None) == default == load_constitution("default")
    assert default.name == "default"
    assert Path(default.source).name == "default.yaml" and Path(default.source).is_file()


def test_default_covers_required_themes(default):
    assert len(default.critiques) >= 12 and len(default.feedback) >= 10
    assert THEMES <= {c.id for c in default.critiques}
    assert THEMES | {"honesty"} <= {f.id for f in default.feedback}
    assert "honesty-calibration" in {c.id for c in default.critiques}
    assert "refuse" in default.get_critique("anti-evasion").critique_request
    assert "refuses" in default.get_feedback("anti-evasion").text
    for principle in default.critiques:
        assert principle.critique_request == principle.critique_request.strip()
        assert "CritiqueRequest" not in principle.critique_request and "Revision" not in principle.revision_request
    assert all(not f.text.endswith("Options:") for f in default.feedback)


def test_default_few_shots_are_consistent_with_its_principles(default):
    assert len(default.critique_few_shot) >= 2
    for shot in default.critique_few_shot:
        assert shot.startswith("\n\nHuman: ")
        assert any(
            frame_critique_request(c.critique_request) in shot and frame_revision_request(c.revision_request) in shot
            for c in default.critiques
        )
    assert len(default.feedback_few_shot) >= 3
    for example in default.feedback_few_shot:
        assert example.is_multiple_choice and example.prompt.endswith("The answer is:")
        assert frame_feedback_principle(default.get_feedback(example.principle).text) in example.prompt
    assert {e.corrects[0] for e in default.feedback_few_shot} == {" (A)", " (B)"}  # no positional bias
    assert len(default.feedback_cot_few_shot) >= 2
    assert all("{}" in shot and "So the answer is: (" in shot for shot in default.feedback_cot_few_shot)


# --------------------------------------------------------------------------------------------- sampling and lookup


def test_seeded_sampling_is_reproducible_and_covers_all(default):
    draw = [default.sample_critique(random.Random(7)).id for _ in range(3)]
    assert len(set(draw)) == 1
    rng_a, rng_b = random.Random(123), random.Random(123)
    assert [default.sample_critique(rng_a).id for _ in range(50)] == [
        default.sample_critique(rng_b).id for _ in range(50)
    ]
    assert default.sample_feedback(5) == default.sample_feedback(5)
    rng = random.Random(0)
    assert {default.sample_critique(rng).id for _ in range(2000)} == {c.id for c in default.critiques}
    assert {default.sample_feedback(rng).id for _ in range(2000)} == {f.id for f in default.feedback}


def test_keyed_sampler_depends_on_seed_and_key_only(default):
    def picks(seed, key):
        rng = Constitution.sampler(seed, key)
        return [default.sample_critique(rng).id for _ in range(20)]

    assert picks(1, "rt-001") == picks(1, "rt-001")
    assert picks(1, "rt-001") != picks(1, "rt-002") or picks(1, "rt-001") != picks(2, "rt-001")
    assert Constitution.sampler(3).random() == random.Random(3).random()


def test_lookup_by_id(default):
    assert default.get_critique("privacy").id == "privacy"
    with pytest.raises(ConstitutionError) as err:
        default.get_critique("no-such-principle")
    message = str(err.value)
    assert "'no-such-principle'" in message and "default.yaml" in message and "\n" not in message
    with pytest.raises(ConstitutionError, match="unknown feedback principle id 'x'"):
        default.get_feedback("x")


def test_sampling_feedback_without_principles_fails(default):
    bare = Constitution(critiques=default.critiques[:1], name="tiny")
    with pytest.raises(ConstitutionError, match="tiny: no feedback principles"):
        bare.sample_feedback(0)


# ---------------------------------------------------------------------------------------------------- paper files


def test_paper_directory_matches_the_files(paper_dir):
    paper = load_constitution(paper_dir)
    instructions = _paper_json(PAPER_FILES["critiques"])
    principles = _paper_json(PAPER_FILES["feedback"])
    critique_shots = _paper_json(PAPER_FILES["critique_few_shot"])
    feedback_shots = _paper_json(PAPER_FILES["feedback_few_shot"])
    cot_shots = _paper_json(PAPER_FILES["feedback_cot_few_shot"])
    assert (len(paper.critiques), len(paper.feedback)) == (len(instructions), len(principles)) == (16, 16)
    assert (len(paper.critique_few_shot), len(paper.feedback_few_shot)) == (len(critique_shots), len(feedback_shots))
    assert len(paper.feedback_cot_few_shot) == len(cot_shots)
    assert (len(critique_shots), len(feedback_shots), len(cot_shots)) == (5, 5, 6)
    assert [c.id for c in paper.critiques] == list(instructions)
    for principle in paper.critiques:  # framing the bare text gives back the published strings exactly
        entry = instructions[principle.id]
        assert frame_critique_request(principle.critique_request) == entry["prompt"][0]
        assert frame_revision_request(principle.revision_request) == entry["edit_request"]
        assert principle.critique_alternates == []
    assert [frame_feedback_principle(f.text) for f in paper.feedback] == principles
    assert [f.id for f in paper.feedback] == [f"feedback{i}" for i in range(16)]
    assert paper.critique_few_shot == critique_shots
    assert [(e.prompt, e.corrects, e.incorrects) for e in paper.feedback_few_shot] == [
        (e["prompt"], e["corrects"], e["incorrects"]) for e in feedback_shots
    ]
    assert not any(e.is_multiple_choice for e in paper.feedback_few_shot)
    assert paper.feedback_cot_few_shot == [e["prompt"] for e in cot_shots]


def test_paper_bare_text(paper_dir):
    paper = load_paper_constitution(paper_dir)
    harmful0 = paper.get_critique("harmful0")
    assert harmful0.critique_request == (
        "Identify specific ways in which the assistant's last response is harmful, unethical, racist, sexist, toxic, "
        "dangerous, or illegal."
    )
    assert harmful0.revision_request.startswith("Please rewrite the assistant response to remove any and all harmful")
    assert paper.feedback[1].text == "Please choose the response that is the most helpful, honest, and harmless."


def test_paper_individual_files_merge(paper_dir):
    paper = load_paper_constitution(
        critiques=paper_dir / PAPER_FILES["critiques"], feedback=paper_dir / PAPER_FILES["feedback"]
    )
    assert len(paper.critiques) == len(paper.feedback) == 16
    assert paper.critique_few_shot == [] and paper.feedback_few_shot == [] and paper.feedback_cot_few_shot == []


def test_paper_multi_string_prompt_keeps_alternates(tmp_path):
    frame = frame_critique_request
    entry = {"prompt": [frame("First way."), frame("Second way.")], "edit_request": frame_revision_request("Fix it.")}
    (tmp_path / PAPER_FILES["critiques"]).write_text(json.dumps({"p0": entry}))
    paper = load_constitution(tmp_path)
    assert paper.critiques[0].critique_request == "First way."
    assert paper.critiques[0].critique_alternates == ["Second way."]
    assert paper.critiques[0].revision_request == "Fix it."
    path = tmp_path / "exported.yaml"
    paper.to_yaml(path)
    assert load_constitution(path) == paper


# ------------------------------------------------------------------------------------------------- YAML round trip


def test_yaml_round_trip_default(default, tmp_path):
    path = tmp_path / "copy.yaml"
    text = default.to_yaml(path)
    assert path.read_text(encoding="utf-8") == text
    again = load_constitution(path)
    assert again == default and again.source == str(path)


def test_yaml_round_trip_paper(paper_dir, tmp_path):
    paper = load_constitution(paper_dir)
    path = tmp_path / "paper.yaml"
    paper.to_yaml(path)
    assert load_constitution(path) == paper
    assert yaml.safe_load(path.read_text())["critiques"][0]["critique_request"].startswith("Identify specific ways")


def test_yaml_strips_framing_and_resolves_file_references(tmp_path, paper_dir):
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "fb.json").write_text(json.dumps(["\nBe kind. Options:", "\nBe honest. Options:"]))
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "mine.yaml"
    request = "\n\nCritiqueRequest: Is it kind?\n\nCritique:"
    data = {
        "critiques": [{"id": "kind", "critique_request": request, "revision_request": "RevisionRequest: Be kinder."}],
        "feedback_file": "../shots/fb.json",
        "critique_few_shot_file": str(paper_dir / PAPER_FILES["critique_few_shot"]),
    }
    path.write_text(yaml.safe_dump(data))
    mine = load_constitution(str(path))
    assert mine.name == "mine"
    assert (mine.critiques[0].critique_request, mine.critiques[0].revision_request) == ("Is it kind?", "Be kinder.")
    assert [f.text for f in mine.feedback] == ["Be kind.", "Be honest."]
    assert mine.critique_few_shot == _paper_json(PAPER_FILES["critique_few_shot"])


# ---------------------------------------------------------------------------------------------------- malformed


GOOD_CRITIQUE = "  - {id: a, critique_request: Find harm., revision_request: Remove harm.}\n"
SHOT = (
    "'Human: hi\n\n  Assistant: yo\n\n  CritiqueRequest: c\n\n  Critique: d\n\n  RevisionRequest: e\n\n  Revision: f'"
)

MALFORMED = {
    "missing-key": ("critiques:\n  - {id: a, critique_request: x}\n", "critiques[0]: missing key 'revision_request'"),
    "missing-key-4th": (
        "critiques:\n"
        + GOOD_CRITIQUE.replace("a,", "a1,")
        + GOOD_CRITIQUE.replace("a,", "a2,")
        + GOOD_CRITIQUE.replace("a,", "a3,")
        + "  - {id: d, critique_request: x}\n",
        "bad.yaml: critiques[3]: missing key 'revision_request'",
    ),
    "empty-request": (
        "critiques:\n  - {id: a, critique_request: '   ', revision_request: y}\n",
        "critiques[0].critique_request: empty text",
    ),
    "framing-only": (
        "critiques:\n  - {id: a, critique_request: 'CritiqueRequest: Critique:', revision_request: y}\n",
        "critiques[0].critique_request: empty text",
    ),
    "critiques-dict": ("critiques:\n  a: {critique_request: x, revision_request: y}\n", "critiques: expected a list"),
    "request-int": (
        "critiques:\n  - {id: a, critique_request: x, revision_request: 7}\n",
        "critiques[0].revision_request: expected a string, got int 7",
    ),
    "entry-not-mapping": ("critiques:\n  - just text\n", "critiques[0]: expected a mapping"),
    "duplicate-id": ("critiques:\n" + GOOD_CRITIQUE * 2, "critiques[1]: duplicate id 'a'"),
    "duplicate-feedback-id": (
        "critiques:\n" + GOOD_CRITIQUE + "feedback:\n  - {id: f, text: t}\n  - {id: f, text: u}\n",
        "feedback[1]: duplicate id 'f'",
    ),
    "feedback-missing-text": ("critiques:\n" + GOOD_CRITIQUE + "feedback:\n  - {id: f}\n", "feedback[0]: missing key"),
    "unknown-principle": (
        "critiques:\n" + GOOD_CRITIQUE + "feedback:\n  - {id: f, text: t}\n"
        "feedback_few_shot:\n  - {principle: nope, prompt: p, corrects: [' (A)'], incorrects: [' (B)']}\n",
        "feedback_few_shot[0]: unknown principle id 'nope'",
    ),
    "empty-corrects": (
        "critiques:\n" + GOOD_CRITIQUE + "feedback_few_shot:\n  - {prompt: p, corrects: [], incorrects: [' (B)']}\n",
        "feedback_few_shot[0].corrects: empty list",
    ),
    "few-shot-no-revision": (
        "critiques:\n" + GOOD_CRITIQUE + "critique_few_shot:\n  - " + SHOT.replace("Revision: f", "f") + "\n",
        "critique_few_shot[0]: transcript has no 'Revision:' turn",
    ),
    "invalid-yaml": ("critiques:\n  - {id: a, critique_request: [unclosed\n", "invalid YAML at line"),
    "tab-indent": ("critiques:\n\t- x\n", "invalid YAML at line 2"),
    "no-critiques": ("critiques: []\n", "bad.yaml: no critique principles"),
    "missing-critiques": ("name: x\nfeedback: []\n", "bad.yaml: missing key 'critiques'"),
    "unknown-top-key": ("critique:\n" + GOOD_CRITIQUE, "bad.yaml: unknown key 'critique'"),
    "top-level-list": ("- a\n- b\n", "expected a mapping at the top level"),
    "empty-file": ("", "expected a mapping at the top level, got nothing"),
    "both-inline-and-file": (
        "critiques:\n" + GOOD_CRITIQUE + "feedback: []\nfeedback_file: x.json\n",
        "either 'feedback' or 'feedback_file'",
    ),
    "missing-referenced-file": ("critiques:\n" + GOOD_CRITIQUE + "feedback_file: nowhere.json\n", "feedback_file: "),
}


@pytest.mark.parametrize("text,expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_yaml_gives_one_line_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    message = str(err.value)
    assert expected in message
    assert "bad.yaml" in message
    assert "\n" not in message
    assert err.value.__cause__ is None
    assert isinstance(err.value, ValueError)


PAPER_MALFORMED = {
    "invalid-json": (PAPER_FILES["critiques"], '{\n  "h0": {"prompt": ["x"],\n  }\n}', "invalid JSON at line 3"),
    "missing-edit-request": (PAPER_FILES["critiques"], {"h0": {"prompt": ["x"]}}, "['h0']: missing key 'edit_request'"),
    "empty-prompt-list": (PAPER_FILES["critiques"], {"h0": {"prompt": [], "edit_request": "y"}}, "got an empty list"),
    "feedback-int": (PAPER_FILES["feedback"], ["\nok Options:", 3], "feedback[1]: expected a string, got int 3"),
    "fewshot-missing-prompt": (
        PAPER_FILES["feedback_few_shot"],
        [{"corrects": ["a"], "incorrects": ["b"]}],
        "missing key",
    ),
    "cot-not-list": (PAPER_FILES["feedback_cot_few_shot"], {"prompt": "x"}, "feedback_cot_few_shot: expected a list"),
}


@pytest.mark.parametrize("filename,content,expected", PAPER_MALFORMED.values(), ids=PAPER_MALFORMED.keys())
def test_malformed_paper_files_give_one_line_error(tmp_path, filename, content, expected):
    valid = {"h0": {"prompt": [frame_critique_request("x")], "edit_request": frame_revision_request("y")}}
    (tmp_path / PAPER_FILES["critiques"]).write_text(json.dumps(valid))
    (tmp_path / filename).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConstitutionError) as err:
        load_constitution(tmp_path)
    message = str(err.value)
    assert filename in message and expected in message and "\n" not in message


def test_missing_sources(tmp_path):
    with pytest.raises(ConstitutionError, match=r"missing\.yaml: file not found"):
        load_constitution(tmp_path / "missing.yaml")
    with pytest.raises(ConstitutionError, match="unknown constitution 'defualt'; shipped: default"):
        load_constitution("defualt")
    with pytest.raises(ConstitutionError, match="no such file or directory"):
        load_constitution(tmp_path / "nowhere" / "dir")
    with pytest.raises(ConstitutionError, match="missing CritiqueRevisionInstructions.json"):
        load_constitution(tmp_path)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ConstitutionError, match="expected a .yaml/.yml file"):
        load_constitution(tmp_path / "c.txt")
