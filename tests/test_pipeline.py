"""The main job end to end on the embedded default with small settings, then again with every stage skipped."""

import json

import pytest
import yaml

from cai.stages.pipeline import run
from models.tiny import TinyModelConfig


def small_config(run_dir):
    cfg = yaml.safe_load(open("configs/pipeline/tiny.yaml"))
    cfg["run_dir"] = str(run_dir)
    cfg["tiny"] = TinyModelConfig(**cfg["tiny"])
    cfg["sl_data"]["prompts"]["max_prompts"] = 8
    cfg["sl_data"]["sampling"]["max_new_tokens"] = 12
    cfg["sft"]["trainer"]["max_steps"] = 6
    cfg["label"]["prompts"]["max_prompts"] = 16
    cfg["label"]["sampling"]["max_new_tokens"] = 12
    cfg["pm"]["trainer"]["max_steps"] = 6
    cfg["ppo"]["model"]["ppo"]["total_rollouts"] = 3
    cfg["evaluate"]["num_prompts"] = 4
    cfg["evaluate"]["sampling"]["max_new_tokens"] = 8
    cfg["evaluate"]["bootstrap"] = 20
    return cfg


@pytest.mark.slow
def test_pipeline_runs_then_skips_every_stage(tmp_path, capsys, shared_cai):
    rd = run(**small_config(tmp_path / "run"))
    first = json.loads((rd / "pipeline_summary.json").read_text())
    assert [s["skipped"] for s in first["stages"]] == [False] * len(first["stages"])
    assert len(first["stages"]) == 8  # base, sl-data, sft, label, eval-feedback, pm, ppo, eval (+ the report)
    for path in (
        "sl_data/records.jsonl",
        "sft/hf/model.safetensors",
        "label/pairs",
        "pm/hf/model.safetensors",
        "ppo/hf/model.safetensors",
        "eval/eval.json",
        "eval_feedback/metrics.json",
        "report.md",
    ):
        assert (rd / path).exists(), path
    report = (rd / "report.md").read_text()
    images = list((rd / "report").glob("*.png"))
    assert len(images) >= 3 and all(p.stat().st_size > 5000 for p in images)
    assert all(p.name in report for p in images)
    ppo_scores = json.loads((rd / "eval" / "eval.json").read_text())
    assert "rl-cai" in json.dumps(ppo_scores)
    out = capsys.readouterr().out
    assert "report" in out and str(rd) in out

    again = run(**small_config(tmp_path / "run"))
    second = json.loads((again / "pipeline_summary.json").read_text())
    assert len(second["stages"]) == 8 and all(s["skipped"] for s in second["stages"])
