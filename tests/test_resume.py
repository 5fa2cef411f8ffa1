"""A killed and resumed run is the same run: every record equals the uninterrupted run's, whatever the chunking.

Every sample is keyed by (seed, prompt id, step, sample index) (``Generator.generate(keys=...)``), so neither the
chunk a prompt lands in, nor the batch, nor what a killed run had already written changes a record.
"""

import json
import math
import random
import signal
import sys

import pytest
import yaml

from cai.method.feedback import FeedbackConfig
from cai.method.generation import SamplingConfig
from cai.stages.label import run as label
from cai.stages.sl_data import CritiqueConfig, PromptSources
from cai.stages.sl_data import run as sl_data
from helpers import kill_after_lines
from models import ModelConfig

pytestmark = pytest.mark.slow  # kills and reruns the real CLI

SL_PROMPTS = 12
LABEL_PROMPTS = 10


def _records(out) -> list[dict]:
    return [json.loads(x) for x in open(out / "records.jsonl")]


def _sl_cfg(model_dir, out, chunk_size, batch_size) -> dict:
    return {
        "out": str(out),
        "model": {"name_or_path": str(model_dir)},
        "prompts": {"max_prompts": SL_PROMPTS, "helpful_ratio": 0.25},
        "critique": {"rounds": 2, "num_few_shot": 1, "keep_unfinished": True},
        "sampling": {"max_new_tokens": 8, "batch_size": batch_size, "top_p": 0.9, "repetition_penalty": 1.2},
        "chunk_size": chunk_size,
    }


def _label_cfg(model_dir, out, chunk_size, batch_size) -> dict:
    return {
        "out": str(out),
        "policy": {"name_or_path": str(model_dir)},
        "prompts": {"helpful": None, "max_prompts": LABEL_PROMPTS},
        "sampling": {"max_new_tokens": 8, "batch_size": batch_size, "top_k": 50},
        "feedback": {"num_few_shot": 1, "both_orders": True, "batch_size": batch_size},
        "chunk_size": chunk_size,
    }


def _in_process(stage, cfg: dict):
    """Run a stage in this process from the same settings the subprocess reads from YAML."""
    if stage == "sl-data":
        return sl_data(
            out=cfg["out"],
            model=ModelConfig(**cfg["model"]),
            prompts=PromptSources(**cfg["prompts"]),
            critique=CritiqueConfig(**cfg["critique"]),
            sampling=SamplingConfig(**cfg["sampling"]),
            chunk_size=cfg["chunk_size"],
        )
    return label(
        out=cfg["out"],
        policy=ModelConfig(**cfg["policy"]),
        prompts=PromptSources(**cfg["prompts"]),
        sampling=SamplingConfig(**cfg["sampling"]),
        feedback=FeedbackConfig(**cfg["feedback"]),
        chunk_size=cfg["chunk_size"],
    )


def _kill_and_resume(stage, make_cfg, total, model_dir, tmp_path):
    """Three kills at random record counts, each run with other chunk and batch sizes, then a run to completion
    (chunks of 3, which do not divide what is left); returns the records."""
    out = tmp_path / f"{stage}-resumed"
    rng = random.Random(f"{stage}-kills")
    written = 0
    for n, (chunk, batch) in enumerate([(3, 2), (2, 3), (2, 1)]):
        cfg_path = tmp_path / f"{stage}-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(make_cfg(model_dir, out, chunk, batch)))
        cmd = [sys.executable, "-m", "cai.cli", stage, "--config", str(cfg_path)]
        target = min(total - 1, written + rng.randint(1, 2))
        rc, written = kill_after_lines(cmd, out / "records.jsonl", target)
        assert rc == -signal.SIGKILL and written >= target, (stage, n, rc, written)
        if n == 1:  # a kill in the middle of a write, too: a partial last line (repaired on resume)
            with open(out / "records.jsonl", "a") as f:
                f.write('{"id": "rt-')
    assert written < total, "the kills should leave work to do"
    _in_process(stage, make_cfg(model_dir, out, 3, 2))
    return _records(out)


def test_sl_data_resumed_after_kills_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    ref = _records(_in_process("sl-data", _sl_cfg(tiny_model_dir, tmp_path / "ref", 3, 2)))
    assert len(ref) == SL_PROMPTS and {r["kind"] for r in ref} == {"red_team", "helpful"}
    resumed = _kill_and_resume("sl-data", _sl_cfg, SL_PROMPTS, tiny_model_dir, tmp_path)
    assert resumed == ref
    # Other chunk and batch sizes: the same records.
    assert _records(_in_process("sl-data", _sl_cfg(tiny_model_dir, tmp_path / "other", 7, 5))) == ref
    # Not the same text everywhere: the steps and prompts draw different samples.
    red = [r for r in ref if r["kind"] == "red_team"]
    assert len({r["initial_response"] for r in ref}) == len(ref)
    assert all(r["rounds"][0]["critique"] != r["rounds"][1]["critique"] for r in red)


def _same_labels(a: list[dict], b: list[dict]) -> None:
    """Equal records, up to the last float bits of the feedback scores.

    The sampled pairs are keyed and so exact; the feedback model's log-probabilities come from batches padded to
    their longest question, whose float sums differ in the last bits (about 1e-6 here) with the batch's make-up.
    ``chosen``/``rejected`` follow from ``p_a`` and could swap only for a ``p_a`` within that of 0.5.
    """

    def walk(x, y, where):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x.keys() - {"chosen", "rejected", "p_chosen"}:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, float):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (where, x, y)
        else:
            assert x == y, (where, x, y)

    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        walk(x, y, x["id"])


def test_label_resumed_after_kills_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    ref = _records(_in_process("label", _label_cfg(tiny_model_dir, tmp_path / "ref", 3, 2)))
    assert len(ref) == LABEL_PROMPTS and all(r["response_a"] != r["response_b"] for r in ref)
    resumed = _kill_and_resume("label", _label_cfg, LABEL_PROMPTS, tiny_model_dir, tmp_path)
    _same_labels(resumed, ref)
    _same_labels(_records(_in_process("label", _label_cfg(tiny_model_dir, tmp_path / "other", 8, 8))), ref)
