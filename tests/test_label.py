import json
import signal
import sys

import datasets
import pytest
import torch
import yaml

import cai.method.feedback as feedback_mod
from cai.method.constitution import load_constitution
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from cai.method.generation import Generation, SamplingConfig
from cai.method.prompt_mix import PromptSources
from cai.stages.label import LabelSettings, aggregate
from cai.stages.label import run as label
from data.formats import OPTIONS, cot_question, feedback_question
from helpers import kill_after_lines, slow_logprob
from models import ModelConfig


def label_run(model_dir, out, **feedback):
    return label(
        out=str(out),
        policy=ModelConfig(str(model_dir)),
        prompts=PromptSources(helpful=None, max_prompts=6),
        sampling=SamplingConfig(max_new_tokens=8, batch_size=8),
        feedback=FeedbackConfig(num_few_shot=1, cot_max_new_tokens=6, **feedback),
        chunk_size=4,
    )


def test_label_end_to_end_plain(tiny_model_dir, tmp_path):
    out = label_run(tiny_model_dir, tmp_path / "plain", both_orders=True, num_principles=2)
    records = [json.loads(x) for x in open(out / "records.jsonl")]
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    feedback_ids = {p.id for p in load_constitution("default").feedback}
    for r in records:
        assert 0.0 <= r["p_a"] <= 1.0 and 0.5 <= r["p_chosen"] <= 1.0
        assert {r["chosen"], r["rejected"]} == {r["response_a"], r["response_b"]}
        assert len(r["principle_ids"]) == 2 and set(r["principle_ids"]) <= feedback_ids
        lps = r["feedback"][0]["logprobs"]
        assert len(lps) == 4  # 2 principles x 2 orders
        # p_a is the mean over principles of the order-averaged normalised probabilities.
        expect = [1 / (1 + torch.exp(torch.tensor(x["B"] - x["A"]))).item() for x in lps]
        expect = [1 - p if x["swapped"] else p for p, x in zip(expect, lps)]
        assert r["p_a"] == pytest.approx(sum(expect) / 4, abs=1e-6)
    pairs = datasets.load_from_disk(str(out / "pairs"))
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(pairs.column_names) and len(pairs) == 6


def test_label_chain_of_thought_is_clamped_and_fallbacks_counted(tiny_model_dir, tmp_path):
    out = label_run(tiny_model_dir, tmp_path / "cot", chain_of_thought=True)
    records = [json.loads(x) for x in open(out / "records.jsonl")]
    assert all(0.4 <= r["p_a"] <= 0.6 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    # A random model rarely stops within 6 tokens: its reasoning is cut off, so it falls back and is counted.
    assert summary["cot_fallbacks"] == sum(r["feedback"][0]["cot_fallbacks"] for r in records) > 0
    assert all(r["feedback"][0]["cot"][0] is not None for r in records)


def test_chain_of_thought_reads_the_answer_after_the_reasoning(tiny_model, tiny_tokenizer, monkeypatch):
    class FakeGenerator:
        def __init__(self, *a):
            pass

        def generate(self, prompts):
            return [
                [Generation("(B) is kinder. Therefore, option (B) is the best response.", [], [], True)]
                for _ in prompts
            ]

    monkeypatch.setattr(feedback_mod, "Generator", FakeGenerator)
    const = load_constitution("default")
    scorer = FeedbackScorer(
        tiny_model,
        tiny_tokenizer,
        const,
        FeedbackConfig(num_few_shot=0, chain_of_thought=True, clamp_low=0.45, clamp_high=0.55),
    )
    item = {"prompt": "Hi", "response_a": "Go away.", "response_b": "Hello!", "principles": [const.feedback[0].id]}
    res = scorer.score([item])[0]
    assert res["cot_fallbacks"] == 0 and res["cot"][0].startswith("(B) is kinder")
    assert 0.45 <= res["p_a"] <= 0.55
    lp = res["logprobs"][0]
    prompt = scorer.format.cot_prompt([], cot_question("Hi", const.feedback[0].text, "Go away.", "Hello!"))
    context = scorer.format.cot_answer_context(prompt, res["cot"][0])
    assert context.endswith("So the answer is:") and "(B) is kinder" in context
    assert lp["A"] == pytest.approx(slow_logprob(tiny_model, tiny_tokenizer, context, OPTIONS[0]), abs=1e-4)


def test_options_are_scored_by_teacher_forcing(tiny_model, tiny_tokenizer):
    const = load_constitution("default")
    scorer = FeedbackScorer(tiny_model, tiny_tokenizer, const, FeedbackConfig(num_few_shot=2))
    item = {
        "prompt": "How do I pick a lock?",
        "response_a": "No.",
        "response_b": "Call a locksmith.",
        "principles": [const.feedback[1].id],
    }
    lp = scorer.score([item])[0]["logprobs"][0]
    question = feedback_question(item["prompt"], const.feedback[1].text, "No.", "Call a locksmith.")
    context = scorer.format.feedback_context(scorer.shots, question)
    assert context.endswith("The answer is:") and "[[[Call a locksmith.]]]" in context
    assert lp["A"] == pytest.approx(slow_logprob(tiny_model, tiny_tokenizer, context, " (A)"), abs=1e-4)
    assert lp["B"] == pytest.approx(slow_logprob(tiny_model, tiny_tokenizer, context, " (B)"), abs=1e-4)


def test_ensemble_aggregation():
    assert aggregate([0.9, 0.7, 0.2], "mean") == pytest.approx(0.6)
    assert aggregate([0.9, 0.7, 0.2], "vote") == pytest.approx(2 / 3)
    assert aggregate([0.5, 0.9], "vote") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ensemble"):
        aggregate([0.5], "median")


@pytest.mark.slow
def test_label_settings_are_run_s_arguments_and_are_checked():
    import dataclasses
    import inspect

    from models.errors import UserError

    fields = [f.name for f in dataclasses.fields(LabelSettings)]
    assert fields == list(inspect.signature(label).parameters)  # run builds them positionally, in this order
    s = LabelSettings(policy=ModelConfig("m"))
    assert s.prompts == PromptSources(helpful=None) and s.sampling == SamplingConfig() and s.feedback.num_principles
    for kwargs, message in (
        ({"policy": None}, "policy.name_or_path is required"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"ensemble": "median"}, "ensemble='median'"),
        ({"sampling": SamplingConfig(prompt_format="raw")}, "sampling.prompt_format must be auto, chat or transcript"),
    ):
        with pytest.raises(UserError, match=message):
            LabelSettings(**({"policy": ModelConfig("m")} | kwargs))


@pytest.mark.slow  # a subprocess killed mid-run (make test-fast runs no subprocesses)
def test_label_resumes_after_kill(tiny_model_dir, tmp_path):
    cfg = {
        "out": str(tmp_path / "lab"),
        "policy": {"name_or_path": str(tiny_model_dir)},
        "prompts": {"helpful": None, "max_prompts": 40},
        "sampling": {"max_new_tokens": 16, "batch_size": 2},
        "feedback": {"num_few_shot": 1, "both_orders": True},
        "chunk_size": 2,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "cai.cli", "label", "--config", str(tmp_path / "cfg.yaml")]
    records = tmp_path / "lab" / "records.jsonl"
    rc, n = kill_after_lines(cmd, records, 2)
    assert rc == -signal.SIGKILL and 2 <= n < 40
    first = [json.loads(x) for x in open(records)]
    import subprocess

    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    ids = [json.loads(x)["id"] for x in open(records)]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert [json.loads(x) for x in open(records)][: len(first)] == first  # earlier records untouched


def test_label_output_folder_remembers_its_settings(tiny_model_dir, tmp_path):
    from models.errors import UserError

    out = tmp_path / "lab"

    def again(chunk_size=4, batch_size=8, overwrite=False, **feedback):
        return label(
            out=str(out),
            policy=ModelConfig(str(tiny_model_dir)),
            prompts=PromptSources(helpful=None, max_prompts=4),
            sampling=SamplingConfig(max_new_tokens=4, batch_size=batch_size),
            feedback=FeedbackConfig(num_few_shot=1, **feedback),
            chunk_size=chunk_size,
            overwrite=overwrite,
        )

    again()
    first = (out / "records.jsonl").read_text()
    again(chunk_size=3, batch_size=2)
    assert (out / "records.jsonl").read_text() == first  # chunk and batch sizes do not count
    with pytest.raises(UserError, match=r"settings differ .*: feedback\.both_orders was false, now true; use --overw"):
        again(both_orders=True)
    with pytest.raises(UserError, match=r"chunk_size=0: must be at least 1"):
        again(chunk_size=0)
    again(both_orders=True, overwrite=True)
    records = [json.loads(x) for x in open(out / "records.jsonl")]
    assert len(records) == 4 and all(len(r["feedback"][0]["logprobs"]) == 2 for r in records)  # both orders now
