"""Models compared pairwise by a feedback model, and the win rates and Elo scores of the comparisons.

The comparison of Bai et al. (2022, e.g. fig. 2) with an AI feedback model in place of crowdworkers: for every prompt
and every pair of models, the feedback model is asked the paper's multiple-choice question
(``data.formats.feedback_question``) in both orders, averaged to cancel position bias (``FeedbackScorer`` with
``both_orders``). ``summarize_set`` turns one prompt set's comparisons into win rates and Elo (``cai.method.elo``).
Used by ``cai eval``.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cai.method.constitution import Constitution, FeedbackPrinciple
from cai.method.elo import bootstrap_elo, fit_elo, win_rates
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from data.jsonl import ResumableJsonl
from losses import normalize_choice_logprobs
from models import ModelConfig, load_model, load_tokenizer
from models.errors import UserError, check_positive


def free_memory() -> None:
    """Return a deleted model's GPU memory to the device (on CPU its weights go with their last reference)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def check_same(records: list[dict], field: str, expected: str, path: Path) -> None:
    """Refuse to mix results of another model into a resumed run."""
    for r in records:
        if r.get(field) != expected:
            raise ValueError(f"{path}: {r['key']} has {field}={r.get(field)!r}, not {expected!r}; use a new out")


def resolve_principle(const, value: str | None, default: str, axis: str) -> FeedbackPrinciple:
    """A feedback principle id of ``const``, the principle's own text (anything that is not an id), or the default."""
    ids = {p.id: p for p in const.feedback}
    if value in ids:
        return ids[value]
    return FeedbackPrinciple(id=f"eval-{axis}", text=value or default)


@dataclass
class Judging:
    """How the feedback model judges the pairs of responses (``judge``)."""

    feedback_model: str
    """The judge: a model folder or hub id."""
    constitution: Constitution
    """Where the feedback few-shot examples come from; the principles below are added to its feedback principles."""
    principles: dict[str, FeedbackPrinciple]
    """Prompt set (``red_team``, ``helpful``) -> the principle its pairs are judged by."""
    num_few_shot: int | None = None
    """Labelled few-shot examples in front of each comparison; None for all of the constitution's."""
    batch_size: int = 8
    """Questions per forward pass."""
    dtype: str = "float32"
    """Weight dtype of the judge."""
    device: str = "cpu"
    """A resolved device (``cpu``, ``cuda``, ``cuda:1``)."""
    prompt_format: str = "auto"
    """How the judge reads the conversations (``data.formats``): ``auto``, ``chat`` or ``transcript``."""
    progress: bool = True
    """Show a progress bar over the pairs judged."""
    chunk: int = 16
    """Pairs judged and written together: the unit of resuming and of the progress bar's updates."""

    def __post_init__(self):
        check_positive(self.batch_size, "batch_size")
        check_positive(self.chunk, "chunk")
        if self.num_few_shot is not None and self.num_few_shot < 0:
            raise UserError(f"feedback_num_few_shot={self.num_few_shot}: must be None (all) or 0 or more")


def order_probabilities(details: dict) -> tuple[float, float]:
    """P(response_a better) read with a shown as (A), and with a shown as (B), from ``FeedbackScorer`` details."""
    first, second = [], []
    for lp in details["logprobs"]:
        p_option_a = normalize_choice_logprobs(lp["A"], lp["B"]).item()
        (second if lp["swapped"] else first).append(1 - p_option_a if lp["swapped"] else p_option_a)
    return sum(first) / len(first), sum(second) / len(second)


def compare_all(
    scorer: FeedbackScorer,
    pairs: list[dict],
    store: ResumableJsonl,
    feedback_model: str,
    chunk: int = 16,
    progress: bool = True,
) -> None:
    """Judge each pair {key, set, id, prompt, a, b, response_a, response_b, principles}; append to ``store``.

    Pairs are judged and written ``chunk`` at a time (the unit of resuming and of the progress bar's updates).
    """
    check_same(store.read(), "feedback_model", feedback_model, store.path)
    todo = [p for p in pairs if p["key"] not in store.done]
    print(f"eval: {len(pairs) - len(todo)} comparisons already there, {len(todo)} to judge")
    with tqdm(total=len(todo), desc="eval: judging pairs", unit="pair", disable=not progress) as bar:
        for s in range(0, len(todo), chunk):
            items = todo[s : s + chunk]
            out = []
            for it, res in zip(items, scorer.score(items)):
                first, second = order_probabilities(res)
                out.append({k: it[k] for k in ("key", "set", "id", "a", "b", "principles")} | {"p_a": res["p_a"]})
                out[-1] |= {"p_a_first": first, "p_a_second": second, "feedback_model": feedback_model}
            store.write(out)
            bar.update(len(items))


def pairs_to_judge(labels: list[str], rows: list[dict], by_key: dict, principles: dict) -> list[dict]:
    """Every pair of models on every prompt row ``{set, id, prompt}``, with both responses (``by_key``: label/set/id).

    The pair's key is ``set/id/a/b`` (a before b in ``labels``); its principle is the prompt set's.
    """
    pairs = []
    for r in rows:
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                pid = principles[r["set"]].id
                item = {"key": f"{r['set']}/{r['id']}/{a}/{b}", **r, "a": a, "b": b, "principles": [pid]}
                item["response_a"], item["response_b"] = (
                    by_key[f"{m}/{r['set']}/{r['id']}"]["response"] for m in (a, b)
                )
                pairs.append(item)
    return pairs


def judge(labels: list[str], rows: list[dict], by_key: dict, how: Judging, store: ResumableJsonl) -> list[dict]:
    """Compare every pair of models on every prompt with the feedback model; returns the comparison records.

    Pairs already in ``store`` are not judged again (the judge is not even loaded when none is left).
    """
    known = {p.id for p in how.constitution.feedback}
    extra = [p for p in how.principles.values() if p.id not in known]
    const = replace(how.constitution, feedback=how.constitution.feedback + extra)
    pairs = pairs_to_judge(labels, rows, by_key, how.principles)
    if any(p["key"] not in store.done for p in pairs):
        tok = load_tokenizer(how.feedback_model, padding_side="left")
        model = load_model(ModelConfig(how.feedback_model, dtype=how.dtype)).to(how.device).eval()
        fb = FeedbackConfig(num_few_shot=how.num_few_shot, both_orders=True, batch_size=how.batch_size)
        scorer = FeedbackScorer(model, tok, const, fb, prompt_format=how.prompt_format)
        compare_all(scorer, pairs, store, how.feedback_model, how.chunk, how.progress)
        del model, scorer  # the scorer holds the model too
        free_memory()
    done = {c["key"]: c for c in store.read()}
    return [done[p["key"]] for p in pairs]


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), "n": len(values)}


def _matrix(labels: list[str], m: list[list[float | None]]) -> dict:
    return {a: {b: m[i][j] for j, b in enumerate(labels) if j != i} for i, a in enumerate(labels)}


def summarize_set(labels: list[str], responses: list[dict], scores: list[float] | None, comps: list[dict], **boot):
    """PM score stats, win rates, Elo (with bootstrap spread) and position bias of one prompt set.

    Args:
        labels: The models, the first the Elo anchor.
        responses: The set's response records ``{label, response}``.
        scores: The preference model's score of each response; None when there is no preference model.
        comps: The set's comparison records ``{id, a, b, p_a, p_a_first, p_a_second}``.
        **boot: ``n_resamples`` and ``seed`` of ``bootstrap_elo`` (prompts are resampled).
    """
    idx = {m: k for k, m in enumerate(labels)}
    by_prompt: dict[str, list] = {}
    for c in comps:
        by_prompt.setdefault(c["id"], []).append((idx[c["a"]], idx[c["b"]], c["p_a"]))
    flat = [c for g in by_prompt.values() for c in g]
    soft, hard = win_rates(len(labels), flat)
    elo = fit_elo(len(labels), flat)
    spread = bootstrap_elo(len(labels), list(by_prompt.values()), **boot)
    per_label = {m: [r for r in responses if r["label"] == m] for m in labels}
    pm = None
    if scores is not None:
        pm = {m: _stats([s for r, s in zip(responses, scores) if r["label"] == m]) for m in labels}
    bias = [(c["p_a_first"] + 1 - c["p_a_second"]) / 2 for c in comps]
    return {
        "pm_scores": pm,
        "response_chars": {m: _stats([len(r["response"]) for r in rs])["mean"] for m, rs in per_label.items()},
        "empty_responses": {m: sum(not r["response"] for r in rs) for m, rs in per_label.items()},
        "comparisons": len(comps),
        "win_rate": _matrix(labels, soft),
        "hard_win_rate": _matrix(labels, hard),
        "elo": dict(zip(labels, elo)),
        "elo_std": dict(zip(labels, spread)),
        "position_bias": sum(bias) / len(bias) if bias else None,  # mean P(option (A) is picked); 0.5 = none
    }
