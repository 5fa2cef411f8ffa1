"""Guards of the method's distinctive parts: each test names, in a comment, the bug it catches.

Deliberately broken copies of the code showed behaviours that no other test guarded (issue 14, item 7): the wiring of
the chain-of-thought clamp in ``FeedbackScorer``, the Elo error bars and position bias of ``cai eval``. The
behaviours that need a training run (the KL penalty's effect, the preference model's calibration) are in
``test_guard_training.py``; the agreement of the distributed and bf16 strategies with one fp32 process in
``test_strategy_agreement.py``.
"""

from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager

import pytest

import cai.method.feedback as feedback_mod
from cai.method.compare import compare_all, summarize_set
from cai.method.constitution import load_constitution
from cai.method.elo import win_probability
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from cai.method.generation import Generation
from data.formats import OPTIONS
from data.jsonl import ResumableJsonl

# ----------------------------------------------------------------------------------- chain-of-thought clamp wiring

LOW, HIGH = 0.35, 0.7  # asymmetric bounds: a clamp with hard-coded 0.4/0.6, or with low and high swapped, misses them


def option_only_tokens(tok, option: str) -> list[int]:
    """Token ids of ``option`` (" (A)" or " (B)") that the other option does not contain."""
    mine, other = (tok(o, add_special_tokens=False)["input_ids"] for o in (option, OPTIONS[1 - OPTIONS.index(option)]))
    return [t for t in mine if t not in other]


@contextmanager
def judge_prefers(model, tok, option: str):
    """The tiny model's LM head pushed far towards ``option``: its label is near 0 or 1 unless something clamps it."""
    favoured = option_only_tokens(tok, option)

    def push(module, args, out):
        out = out.clone()
        out[..., favoured] += 30.0
        return out

    handle = model.get_output_embeddings().register_forward_hook(push)
    try:
        yield
    finally:
        handle.remove()


def scripted_reasoning(monkeypatch, finished: bool) -> None:
    """Replace the reasoning's generation: a finished reasoning is read, a cut-off one falls back to plain scoring."""

    class ScriptedGenerator:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts):
            text = "Response (A) answers the question. Therefore, option (A) is the best response."
            return [[Generation(text, [], [], finished)] for _ in prompts]

    monkeypatch.setattr(feedback_mod, "Generator", ScriptedGenerator)


def score_one(model, tok, **cfg) -> dict:
    const = load_constitution("default")
    scorer = FeedbackScorer(model, tok, const, FeedbackConfig(num_few_shot=0, **cfg))
    item = {"prompt": "Hi", "response_a": "Hello!", "response_b": "Go away.", "principles": [const.feedback[0].id]}
    return scorer.score([item])[0]


@pytest.mark.parametrize("finished", [True, False], ids=["parsed", "fallback"])
@pytest.mark.parametrize("option", OPTIONS)
def test_chain_of_thought_labels_are_clamped_parsed_or_fallen_back(
    tiny_model, tiny_tokenizer, monkeypatch, finished, option
):
    # Catches: FeedbackScorer skipping the clamp for answers read after the reasoning, or for fallbacks to plain
    # scoring.
    scripted_reasoning(monkeypatch, finished)
    with judge_prefers(tiny_model, tiny_tokenizer, option):
        res = score_one(tiny_model, tiny_tokenizer, chain_of_thought=True, clamp_low=LOW, clamp_high=HIGH)
    assert res["cot_fallbacks"] == (0 if finished else 1)  # the branch this case is about was taken
    assert res["p_a"] == pytest.approx(HIGH if option == OPTIONS[0] else LOW, abs=1e-6)


def test_chain_of_thought_clamps_each_order_before_averaging(tiny_model, tiny_tokenizer, monkeypatch):
    # Catches: the clamp applied to the wrong probability with both orders (e.g. to P(option (A)) of the swapped
    # order read as P(response_a)), which moves the average of a judge that always picks (A) away from 1/2.
    scripted_reasoning(monkeypatch, finished=True)
    with judge_prefers(tiny_model, tiny_tokenizer, OPTIONS[0]):
        res = score_one(
            tiny_model, tiny_tokenizer, chain_of_thought=True, both_orders=True, clamp_low=LOW, clamp_high=HIGH
        )
    # Shown first, response_a gets HIGH; shown second, option (A) (response_b) gets HIGH, so response_a gets 1 - HIGH.
    assert res["p_a"] == pytest.approx((HIGH + 1 - HIGH) / 2, abs=1e-6)
    assert [lp["swapped"] for lp in res["logprobs"]] == [False, True]


@pytest.mark.parametrize("option", OPTIONS)
def test_plain_labels_are_not_clamped(tiny_model, tiny_tokenizer, option):
    # Catches: the clamp applied without chain-of-thought (plain labels must keep the model's confidence).
    with judge_prefers(tiny_model, tiny_tokenizer, option):
        res = score_one(tiny_model, tiny_tokenizer, clamp_low=LOW, clamp_high=HIGH)
    assert res["cot_fallbacks"] == 0 and res["cot"] == [None]
    assert (res["p_a"] > 0.99) if option == OPTIONS[0] else (res["p_a"] < 0.01), res["p_a"]


# ----------------------------------------------------------------------------------- Elo error bars of ``cai eval``

LABELS = ["base", "sl-cai", "rl-cai"]
TRUE_ELO = [0.0, -120.0, 150.0]  # relative to the anchor, the first model


def bradley_terry_comparisons(n_prompts: int, seed: int) -> list[dict]:
    """Comparison records as ``cai eval`` writes them: every pair on every prompt, won by Bradley-Terry chance."""
    rng, comps = random.Random(seed), []
    for k in range(n_prompts):
        for i in range(len(LABELS)):
            for j in range(i + 1, len(LABELS)):
                won = float(rng.random() < win_probability(TRUE_ELO[i], TRUE_ELO[j]))
                comps.append({"id": str(k), "a": LABELS[i], "b": LABELS[j], "p_a": won})
                comps[-1] |= {"p_a_first": won, "p_a_second": won}
    return comps


def eval_summary(comps: list[dict], n_resamples: int, seed: int = 0) -> dict:
    responses = [{"label": m, "response": "x"} for m in LABELS]
    return summarize_set(LABELS, responses, None, comps, n_resamples=n_resamples, seed=seed)


def test_elo_error_bars_shrink_like_one_over_root_n():
    # Catches: a bootstrap whose spread does not come from resampling the prompts (a fixed number of draws, one
    # prompt's comparisons drawn alone, the spread in natural units): it would not fall as 1/sqrt(prompts).
    small = eval_summary(bradley_terry_comparisons(40, seed=1), n_resamples=100)["elo_std"]
    large = eval_summary(bradley_terry_comparisons(640, seed=2), n_resamples=100)["elo_std"]
    assert small["base"] == large["base"] == 0.0  # the anchor
    for m in LABELS[1:]:
        ratio = small[m] / large[m]  # 16x the prompts: sqrt(16) = 4
        assert 2.5 < ratio < 6.5, (m, small[m], large[m])


def test_elo_error_bars_cover_the_true_strengths():
    # Catches: error bars of the wrong size (too small: overconfident Elo; too large: e.g. natural units read as Elo
    # points, 174x) or centred on the wrong value (anchor or sign). Expected: 95% within 2 std, mean z^2 about 1.
    z = []
    for seed in range(30):
        s = eval_summary(bradley_terry_comparisons(60, seed=100 + seed), n_resamples=60, seed=seed)
        z += [(s["elo"][m] - t) / s["elo_std"][m] for m, t in zip(LABELS[1:], TRUE_ELO[1:])]
    covered = sum(abs(x) < 2 for x in z) / len(z)
    mean_z2 = sum(x * x for x in z) / len(z)
    print(f"elo bootstrap: {covered:.0%} of true strengths within 2 std; mean z^2 {mean_z2:.2f}")
    assert covered >= 0.8 and 0.4 < mean_z2 < 2.5, (covered, mean_z2)
    assert all(math.isfinite(x) for x in z)


# ----------------------------------------------------------------------------------- position bias of ``cai eval``


def judged(tok, tmp_path, monkeypatch, pick) -> dict:
    """``cai eval``'s judging and summary of 6 prompts x 2 models, by a judge whose answer ``pick`` gives.

    ``pick(text_a, text_b)`` returns the option the judge chooses, (A) or (B), seeing the two responses in the order
    shown. The responses of ``rl-cai`` say "GOOD", those of ``base`` "bad".
    """
    const = load_constitution("default")
    scorer = FeedbackScorer(None, tok, const, FeedbackConfig(num_few_shot=0, both_orders=True))

    def option_logprobs(contexts):
        shown = [re.findall(r"\(([AB])\) \[\[\[(.*?)\]\]\]", c) for c in contexts]
        picks = [pick(dict(s)["A"], dict(s)["B"]) for s in shown]
        return [(0.0, -20.0) if p == OPTIONS[0] else (-20.0, 0.0) for p in picks]

    monkeypatch.setattr(scorer, "_option_logprobs", option_logprobs)
    labels = ["base", "rl-cai"]
    pairs = [
        {"key": f"red_team/{k}/base/rl-cai", "set": "red_team", "id": str(k), "prompt": f"Question {k}?", "a": "base"}
        | {"b": "rl-cai", "response_a": f"bad {k}", "response_b": f"GOOD {k}", "principles": [const.feedback[0].id]}
        for k in range(6)
    ]
    store = ResumableJsonl(tmp_path / "comparisons.jsonl", key="key")
    compare_all(scorer, pairs, store, "judge", chunk=4, progress=False)
    responses = [{"label": m, "response": p[f"response_{ab}"]} for p in pairs for m, ab in zip(labels, "ab")]
    return summarize_set(labels, responses, None, store.read(), n_resamples=10, seed=0)


def test_a_judge_that_always_picks_a_gives_even_win_rates_and_full_position_bias(tiny_tokenizer, tmp_path, monkeypatch):
    # Catches: the orders not averaged (win rate 1 or 0 instead of 1/2), the swapped order read as if unswapped, or
    # the position bias computed from P(response_a) instead of P(option (A)) (0.5 instead of 1).
    s = judged(tiny_tokenizer, tmp_path, monkeypatch, lambda a, b: OPTIONS[0])
    assert s["win_rate"]["base"]["rl-cai"] == pytest.approx(0.5, abs=1e-6)
    assert s["hard_win_rate"]["base"]["rl-cai"] == 0.5  # every comparison an exact tie
    assert s["position_bias"] == pytest.approx(1.0, abs=1e-6)
    assert s["elo"]["rl-cai"] == pytest.approx(0.0, abs=1e-3) and s["elo_std"]["rl-cai"] == pytest.approx(0, abs=1e-3)


def test_a_judge_of_content_only_has_no_position_bias(tiny_tokenizer, tmp_path, monkeypatch):
    # Catches: a preference for one model counted as a preference for one position (bias must stay 0.5), or the
    # win rate read against the wrong model.
    s = judged(tiny_tokenizer, tmp_path, monkeypatch, lambda a, b: OPTIONS[0] if "GOOD" in a else OPTIONS[1])
    assert s["win_rate"]["rl-cai"]["base"] == pytest.approx(1.0, abs=1e-6)
    assert s["position_bias"] == pytest.approx(0.5, abs=1e-6)
    assert s["elo"]["rl-cai"] > 400
