import json
import math
import re

import pytest

import cai.stages.evaluate as evaluate
from cai.method.constitution import load_constitution
from cai.method.elo import ELO_SCALE, bootstrap_elo, elo_table, fit_elo, head_to_head, win_probability, win_rates
from cai.method.feedback import FeedbackScorer
from cai.method.generation import SamplingConfig
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel
from models.tiny import TinyModelConfig, make_tiny_model


def test_equal_models_get_equal_elo():
    elo = fit_elo(2, [(0, 1, 0.5)] * 5)
    assert elo == pytest.approx([0.0, 0.0], abs=1e-6)
    # Symmetric outcomes cancel whichever way round they are written.
    assert fit_elo(2, [(0, 1, 0.7), (1, 0, 0.7)]) == pytest.approx([0.0, 0.0], abs=1e-6)


def test_76_percent_win_is_200_elo():
    elo = fit_elo(2, [(0, 1, 0.76)])
    assert elo[0] == 0.0  # the first model is the anchor
    assert elo[0] - elo[1] == pytest.approx(200, abs=1)
    assert elo[0] - elo[1] == pytest.approx(ELO_SCALE * math.log(0.76 / 0.24), abs=0.1)
    assert win_probability(200, 0) == pytest.approx(0.76, abs=0.001)
    assert fit_elo(2, [(0, 1, 0.76)], anchor=1) == pytest.approx([200.2, 0.0], abs=0.5)


def test_three_models_transitive_and_recovered():
    true = [0.0, -100.0, -250.0]
    comps = [(i, j, win_probability(true[i], true[j])) for i in range(3) for j in range(3) if i < j]
    elo = fit_elo(3, comps * 4)
    assert elo[0] > elo[1] > elo[2]
    assert elo == pytest.approx(true, abs=1.0)


def test_a_model_that_always_wins_stays_finite():
    elo = fit_elo(3, [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0)] * 3)
    assert all(math.isfinite(x) for x in elo) and elo[0] > elo[1] > elo[2]


def test_fit_elo_rejects_bad_input():
    with pytest.raises(ValueError):
        fit_elo(2, [(0, 0, 0.5)])
    with pytest.raises(ValueError):
        fit_elo(2, [(0, 1, 1.5)])


def test_win_rates_are_complementary():
    soft, hard = win_rates(3, [(0, 1, 0.8), (0, 1, 0.4), (2, 1, 0.5)])
    assert soft[0][1] == pytest.approx(0.6) and soft[1][0] == pytest.approx(0.4)
    assert hard[0][1] == 0.5 and hard[1][0] == 0.5
    assert hard[2][1] == hard[1][2] == 0.5  # a tie counts half
    assert soft[0][2] is None and soft[0][0] is None


def test_bootstrap_spread():
    same = [[(0, 1, 0.7)]] * 6
    assert bootstrap_elo(2, same, 30) == pytest.approx([0.0, 0.0], abs=1e-6)
    mixed = [[(0, 1, 0.9)], [(0, 1, 0.2)]] * 3
    assert bootstrap_elo(2, mixed, 30)[1] > 10


def test_the_one_elo_table_with_and_without_pm_scores():
    sets = {
        "red_team": {
            "axis": "harmlessness",
            "elo": {"base": 0.0, "rl-cai": 123.4},
            "elo_std": {"base": 0.0, "rl-cai": 9.6},
            "pm_scores": {"base": {"mean": 0.25, "std": 0.5}, "rl-cai": {"mean": 1.0, "std": 0.125}},
        },
        "helpful": {
            "axis": "helpfulness",
            "elo": {"base": 0.0, "rl-cai": -50.2},
            "elo_std": {"base": 0.0, "rl-cai": 3.0},
        },
    }
    results = {"labels": ["base", "rl-cai"], "sets": sets}
    plain = elo_table(results).splitlines()
    assert plain[:4] == [
        "| model | Elo harmlessness | Elo helpfulness |",
        "|---|---|---|",
        "| base | 0 ± 0 | 0 ± 0 |",
        "| rl-cai | 123 ± 10 | -50 ± 3 |",
    ]
    assert plain[-1] == "Elo relative to base (0); +200 Elo is a 76% win rate."
    pm = elo_table(results, pm_scores=True).splitlines()
    assert pm[0] == "| model | PM score (red_team) | PM score (helpful) | Elo harmlessness | Elo helpfulness |"
    assert pm[3] == "| rl-cai | 1.000 ± 0.125 | - | 123 ± 10 | -50 ± 3 |"  # helpful: no preference model scores


def test_head_to_head_of_two_models():
    def prompt_set(axis, elo, pm):
        rates = {"a": {"b": 0.625}, "b": {"a": 0.375}}
        return {"axis": axis, "elo": elo, "win_rate": rates, "hard_win_rate": rates, "pm_scores": pm}

    sets = {
        "red_team": prompt_set("harmlessness", {"a": 88.9, "b": 0.0}, {"a": {"mean": 0.5}, "b": {"mean": -0.25}}),
        "helpful": prompt_set("helpfulness", {"a": -0.3, "b": 0.0}, None),  # no preference model
    }
    assert head_to_head({"labels": ["a", "b"], "sets": sets}, "a", "b") == [
        "- harmlessness (red_team): P(a's answer better than b's) 0.62 (hard 0.62), Elo difference +89, "
        "PM score 0.500 vs -0.250.",
        "- helpfulness (helpful): P(a's answer better than b's) 0.62 (hard 0.62), Elo difference +0.",  # not -0
    ]


def test_eval_settings_are_run_s_arguments_and_are_checked():
    import dataclasses
    import inspect

    from models.errors import UserError

    fields = [f.name for f in dataclasses.fields(evaluate.EvalSettings)]
    assert fields == list(inspect.signature(evaluate.run).parameters)  # run builds them positionally, in this order
    s = evaluate.EvalSettings(models={"a": "x", "b": "y"}, helpful=None, sampling=SamplingConfig(num_samples=3))
    assert s.feedback_model == "x" and s.sampling.num_samples == 1 and s.sources == {"red_team": "red_team"}
    for kwargs, message in (
        ({"models": None}, "models is required"),
        ({"red_team": None, "helpful": None}, "give red_team or helpful"),
        ({"num_prompts": 0}, "num_prompts=0"),
        ({"bootstrap": -1}, "bootstrap=-1"),
    ):
        with pytest.raises(UserError, match=message):
            evaluate.EvalSettings(**({"models": {"a": "x"}} | kwargs))


def test_principles_by_id_text_or_default():
    const = load_constitution("default")
    assert evaluate.resolve_principle(const, "harm-general", "x", "harmlessness").id == "harm-general"
    assert evaluate.resolve_principle(const, None, "default text", "helpfulness").text == "default text"
    custom = evaluate.resolve_principle(const, "Which response is kinder?", "x", "helpfulness")
    assert custom.text == "Which response is kinder?" and custom.id == "eval-helpfulness"


def test_held_out_prompts_are_the_last_unseen_ones(tmp_path):
    assert [r["id"] for r in evaluate.held_out_prompts("red_team", 3)] == ["rt-069", "rt-070", "rt-071"]
    last = evaluate.held_out_prompts("red_team", 1)[0]
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "x", "prompt": last["prompt"] + "  "}) + "\n")
    seen = evaluate.seen_prompts([str(records)])
    assert [r["id"] for r in evaluate.held_out_prompts("red_team", 3, seen)] == ["rt-068", "rt-069", "rt-070"]
    with pytest.raises(FileNotFoundError):
        evaluate.seen_prompts([str(tmp_path / "missing.jsonl")])


@pytest.fixture(scope="module")
def eval_models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    other = make_tiny_model(root / "other", TinyModelConfig(seed=1))
    pm_dir = root / "pm"
    PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir))).save_pretrained(pm_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(pm_dir)
    return {"base": str(tiny_model_dir), "rl-cai": str(other)}, str(pm_dir)


def eval_run(models, pm, out, **kw):
    return evaluate.run(
        models=models,
        preference_model=pm,
        num_prompts=4,
        sampling=SamplingConfig(max_new_tokens=6, batch_size=8),
        feedback_num_few_shot=0,  # short queries keep the test fast
        bootstrap=20,
        out=str(out),
        device="cpu",
        **kw,
    )


def test_eval_end_to_end(eval_models, tmp_path, monkeypatch, capfd):
    models, pm = eval_models
    res = eval_run(models, pm, tmp_path)
    # Progress bars with an ETA over each model's answers and over the pairs judged.
    err = capfd.readouterr().err
    for bar in ("eval: base answers", "eval: rl-cai answers", "eval: judging pairs"):
        assert re.search(rf"{bar}: 100%.* 8/8 \[\d", err), bar
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["labels"] == ["base", "rl-cai"] and set(saved["sets"]) == {"red_team", "helpful"}
    assert set(saved["elo"]) == {"harmlessness", "helpfulness"}
    for s in saved["sets"].values():
        assert s["prompts"] == 4 and s["comparisons"] == 4
        w = s["win_rate"]
        assert 0 <= w["base"]["rl-cai"] <= 1 and w["base"]["rl-cai"] + w["rl-cai"]["base"] == pytest.approx(1)
        h = s["hard_win_rate"]
        assert h["base"]["rl-cai"] + h["rl-cai"]["base"] == pytest.approx(1)
        assert s["elo"]["base"] == 0.0 and math.isfinite(s["elo"]["rl-cai"])
        assert set(s["pm_scores"]) == {"base", "rl-cai"} and s["pm_scores"]["base"]["n"] == 4
        assert s["hard_win_rate"]["base"]["rl-cai"] in (0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1)
    assert saved["hhh"] is None and saved["settings"]["elo_anchor"] == "base"

    responses = [json.loads(x) for x in open(tmp_path / "responses.jsonl")]
    assert len(responses) == 16 and len({r["key"] for r in responses}) == 16
    red_ids = sorted(r["id"] for r in responses if r["set"] == "red_team" and r["label"] == "base")
    assert red_ids == ["rt-068", "rt-069", "rt-070", "rt-071"]  # the last four: held out
    # The PM statistics are those of the preference model's rewards of the saved responses.
    scores = evaluate.pm_scores(
        pm, [r for r in responses if r["label"] == "base" and r["set"] == "helpful"], 4, "cpu", "float32"
    )
    assert saved["sets"]["helpful"]["pm_scores"]["base"]["mean"] == pytest.approx(sum(scores) / 4, abs=1e-4)

    comps = [json.loads(x) for x in open(tmp_path / "comparisons.jsonl")]
    assert len(comps) == 8
    for c in comps:  # both orders, averaged
        assert c["p_a"] == pytest.approx((c["p_a_first"] + c["p_a_second"]) / 2, abs=1e-5)
    red = [c["p_a"] for c in comps if c["set"] == "red_team"]
    assert saved["sets"]["red_team"]["win_rate"]["base"]["rl-cai"] == pytest.approx(sum(red) / 4)

    png = (tmp_path / "winrates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Resuming generates and judges nothing again, and gives the same results.
    def boom(*a, **k):
        raise AssertionError("nothing should be generated or judged on resume")

    monkeypatch.setattr(evaluate.Generator, "generate", boom)
    monkeypatch.setattr(FeedbackScorer, "score", boom)
    again = eval_run(models, pm, tmp_path)
    assert again["sets"]["red_team"]["win_rate"] == res["sets"]["red_team"]["win_rate"]
    # A different model under a label already evaluated is refused rather than mixed in.
    with pytest.raises(ValueError, match="base"):
        eval_run({"base": models["rl-cai"], "rl-cai": models["base"]}, pm, tmp_path)


def test_eval_reports_hhh_accuracy(eval_models, tmp_path, shared_cai):
    models, _ = eval_models
    hhh = shared_cai / "evals" / "438HHHEvaluations.jsonl"
    res = evaluate.run(
        models={"base": models["base"]},
        helpful=None,
        num_prompts=2,
        sampling=SamplingConfig(max_new_tokens=4),
        hhh_evals=str(hhh),
        hhh_max_examples=6,
        bootstrap=0,
        out=str(tmp_path),
        device="cpu",
    )
    assert res["hhh"]["examples"] == 6 and 0 <= res["hhh"]["accuracy"] <= 1
    assert res["sets"]["red_team"]["pm_scores"] is None and res["sets"]["red_team"]["comparisons"] == 0
    assert json.loads((tmp_path / "eval.json").read_text())["hhh"]["accuracy"] == res["hhh"]["accuracy"]
    assert (tmp_path / "hhh" / "reliability.png").stat().st_size > 5_000


def test_eval_needs_models():
    with pytest.raises(ValueError, match="models"):
        evaluate.run(models=None)
