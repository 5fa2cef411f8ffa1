"""Shared few-shot prefixes read once (``models.prefix_cache``) against every query read whole, on the real model.

Three workloads with the paper's few-shot files (``--constitution``, ``../shared/anthropic-cai/prompts``):

* ``sl-data``: ``critique_revise`` on red-team prompts (initial answer, then ``--rounds`` critique-revision rounds,
  every critique and revision request after the paper's critique few-shot dialogues); generated tokens per second.
* ``eval-feedback``: ``score_rows`` on the paper's HHH comparisons, each question after the paper's feedback few-shot
  comparisons (``PromptFormat.feedback_context``, as a few-shot evaluation lays it out); rows per second.
* ``label``: ``FeedbackScorer.score`` on the HHH comparisons taken apart into (conversation, response A, response
  B), under the paper's feedback principles and few-shot comparisons; items (comparisons) per second.

Each workload runs unshared (``before``) then shared (``after``), alternating ``--repeats`` times so that load on the
machine hits both alike; figures are medians. Every run also checks that both paths give the same results (texts
and log-probabilities), so the speed-up is of the same work.

    OMP_NUM_THREADS=1 python scripts/bench_prefix.py --model runs/smollm2/base_model
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import time

import torch

from cai.method import choice_eval
from cai.method.constitution import load_constitution
from cai.method.feedback import FeedbackConfig, FeedbackScorer, few_shot_pair
from cai.method.generation import Generator, SamplingConfig
from cai.stages.sl_data import CritiqueConfig, critique_revise
from data.formats import PromptFormat, question_body
from data.prompts import load_prompts
from models import ModelConfig, load_model, load_tokenizer
from models.logprobs import choice_logprobs
from models.prefix_cache import shared_prefix_length

BRACKETED = re.compile(r"\[\[\[(.*?)\]\]\]", re.DOTALL)


def sl_data(args, model, tok, const, share: bool) -> tuple[float, list]:
    """Generated tokens per second of critique-revision, and the records."""
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompt_format=args.prompt_format
    )
    gen = Generator(model, tok, sampling, share_prefix=share)
    counted = []
    plain_generate = gen.generate

    def counting(*a, **kw):
        out = plain_generate(*a, **kw)
        counted.append(sum(len(g.response_ids) for gs in out for g in gs))
        return out

    gen.generate = counting
    rows = [
        {"id": r["id"], "prompt": r["prompt"], "kind": "red_team"}
        for r in load_prompts("red_team").select(range(args.sl_prompts))
    ]
    cfg = CritiqueConfig(rounds=args.rounds, num_few_shot=args.num_few_shot)
    t = time.perf_counter()
    records = critique_revise(gen, const, rows, cfg, sampling, {})
    return sum(counted) / (time.perf_counter() - t), [r["rounds"] for r in records]


def eval_feedback(args, model, tok, const, rows, share: bool) -> tuple[float, list]:
    """HHH rows per second with few-shot comparisons in front of each question, and the log-probabilities."""
    fmt = PromptFormat(tok, args.prompt_format)
    shots = [few_shot_pair(ex, i) for i, ex in enumerate(const.feedback_few_shot[: args.num_few_shot])]
    t = time.perf_counter()
    render = lambda q: fmt.feedback_context(shots, question_body(q))  # noqa: E731
    # score_rows scores through choice_logprobs; the unshared run sets its share_prefix off
    choice_eval.choice_logprobs = functools.partial(choice_logprobs, share_prefix=share)
    try:
        logps = choice_eval.score_rows(model, tok, rows, args.feedback_batch, render=render)
    finally:
        choice_eval.choice_logprobs = choice_logprobs
    return len(rows) / (time.perf_counter() - t), logps


def label(args, model, tok, const, items, share: bool) -> tuple[float, list]:
    """Comparisons per second of the feedback scorer (the scoring of ``cai label``), and the label details."""
    cfg = FeedbackConfig(num_few_shot=args.num_few_shot, batch_size=args.feedback_batch)
    scorer = FeedbackScorer(model, tok, const, cfg, prompt_format=args.prompt_format, share_prefix=share)
    t = time.perf_counter()
    out = scorer.score(items)
    return len(items) / (time.perf_counter() - t), [o["logprobs"] for o in out]


def label_items(rows: list[dict], principle: str) -> list[dict]:
    """(conversation, response A, response B) of HHH rows with two bracketed options."""
    items = []
    for r in rows:
        options = BRACKETED.findall(r["prompt"])
        if len(options) == 2 and "Please choose" in r["prompt"]:
            conversation = r["prompt"].split("Please choose")[0].split("assistant:", 1)[-1].strip()
            items.append({"prompt": conversation, "response_a": options[0], "response_b": options[1]})
    return [{**it, "principles": [principle]} for it in items]


def close(a, b) -> bool:
    """Same texts and log-probabilities within 1e-4 (nested lists and dicts of records)."""
    if isinstance(a, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/smollm2/base_model")
    ap.add_argument("--constitution", default="../shared/anthropic-cai/prompts")
    ap.add_argument("--evals", default="../shared/anthropic-cai/evals/438HHHEvaluations.jsonl")
    ap.add_argument("--prompt_format", default="auto")
    ap.add_argument("--only", nargs="*", default=["sl-data", "eval-feedback", "label"])
    ap.add_argument("--num_few_shot", type=int, default=None, help="few-shot examples (default: all of the files')")
    ap.add_argument("--sl_prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8, help="sl-data prompts per generation batch")
    ap.add_argument("--items", type=int, default=32, help="HHH rows for eval-feedback and label")
    ap.add_argument("--feedback_batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(args.model, padding_side="left")
    model = load_model(ModelConfig(args.model)).eval()
    const = load_constitution(args.constitution)
    rows = choice_eval.read_evals(args.evals, args.items)
    items = label_items(rows, const.feedback[0].id)
    fmt = PromptFormat(tok, args.prompt_format)
    shots = [few_shot_pair(ex, i) for i, ex in enumerate(const.feedback_few_shot[: args.num_few_shot])]
    few = len(tok(fmt.feedback_context(shots, "x"))["input_ids"])
    whole = statistics.mean(
        len(tok(fmt.feedback_context(shots, question_body(r["prompt"])))["input_ids"]) for r in rows
    )
    critique_shots = const.critique_few_shot[: args.num_few_shot]
    principle = const.critiques[0].critique_request
    critiques = [
        tok(fmt.critique_prompt(critique_shots, r["prompt"], "A response.", principle))["input_ids"]
        for r in load_prompts("red_team").select(range(args.sl_prompts))
    ]
    print(
        f"model {args.model}, {fmt.kind} format, torch threads={torch.get_num_threads()}; critique request: "
        f"{shared_prefix_length(critiques)} shared tokens of {statistics.mean(map(len, critiques)):.0f} on average "
        f"(before the response); feedback query: {few} few-shot tokens of {whole:.0f} on average"
    )
    workloads = {
        "sl-data": ("tokens/s", lambda share: sl_data(args, model, tok, const, share)),
        "eval-feedback": ("rows/s", lambda share: eval_feedback(args, model, tok, const, rows, share)),
        "label": ("items/s", lambda share: label(args, model, tok, const, items, share)),
    }
    print("| workload | unit | before (every query whole) | after (prefix shared) | speed-up | same results |")
    print("|---|---|---|---|---|---|")
    for name in args.only:
        unit, work = workloads[name]
        runs, same = {False: [], True: []}, True
        for _ in range(args.repeats):  # before, after, before, after, ...
            rate_before, out_before = work(False)
            rate_after, out_after = work(True)
            runs[False].append(rate_before)
            runs[True].append(rate_after)
            same = same and close(out_before, out_after)
        b, a = statistics.median(runs[False]), statistics.median(runs[True])
        cells = [", ".join(f"{x:.2f}" for x in runs[s]) for s in (False, True)]
        print(f"| {name} | {unit} | {b:.2f} ({cells[0]}) | {a:.2f} ({cells[1]}) | {a / b:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
