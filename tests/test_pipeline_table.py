"""``cai pipeline`` as data: the table of stages, and the loop that checks every pending stage, then runs them."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml

import cai.stages.pipeline as pipeline
from cai.stages.pipeline import HHH_DEFAULT, PipelineSettings, Stage, stage_table
from models.errors import UserError
from models.tiny import TinyModelConfig


def tiny_settings(run_dir: Path, **overrides) -> PipelineSettings:
    cfg = yaml.safe_load(open("configs/pipeline/tiny.yaml"))
    cfg |= {"run_dir": str(run_dir), "tiny": TinyModelConfig(**cfg["tiny"]), "hhh_evals": "none"} | overrides
    return PipelineSettings(**cfg)


def test_the_settings_are_run_s_arguments():
    # run builds PipelineSettings positionally: a field out of order would take another argument's value.
    assert [f.name for f in dataclasses.fields(PipelineSettings)] == list(inspect.signature(pipeline.run).parameters)
    with pytest.raises(UserError, match="prompt_format='markdown'"):
        PipelineSettings(prompt_format="markdown")
    with pytest.raises(UserError, match="hhh_max_examples=0"):
        PipelineSettings(hhh_max_examples=0)


def test_the_table_of_the_tiny_config(tmp_path):
    rows = stage_table(tiny_settings(tmp_path))
    assert [r.name for r in rows] == ["tiny", "sl_data", "sft", "label", "pm", "ppo", "evaluate"]
    assert len({r.done for r in rows}) == len(rows) and all(r.done.is_relative_to(tmp_path) for r in rows)
    # Every input of a stage is made by an earlier stage: the order is one the stages can run in.
    made: set[Path] = set()
    for r in rows:
        assert set(r.reads) <= made, (r.name, set(r.reads) - made)
        made |= set(r.writes.values())
    assert pipeline.evaluated_models(tiny_settings(tmp_path), rows) == {
        "base": str(tmp_path / "base_model"),
        "sl-cai": str(tmp_path / "sft" / "hf"),
        "rl-cai": str(tmp_path / "ppo" / "hf"),
    }


def test_optional_rows(tmp_path):
    hhh = tmp_path / "hhh.jsonl"
    hhh.write_text("{}\n")
    names = [r.name for r in stage_table(tiny_settings(tmp_path, hhh_evals=str(hhh), evaluate=None))]
    assert names == ["tiny", "sl_data", "sft", "label", "eval_feedback", "pm", "ppo"]  # no evaluation


def test_the_hhh_comparisons_beside_the_checkout_are_found(tmp_path, shared_cai):
    assert HHH_DEFAULT == shared_cai / "evals" / "438HHHEvaluations.jsonl"
    rows = stage_table(tiny_settings(tmp_path, hhh_evals=None))
    (row,) = [r for r in rows if r.name == "eval_feedback"]
    row.check(frozenset())  # the file is there


def fake_rows(root: Path, ran: list[str], bad: str | None = None) -> list[Stage]:
    """Three stages that record that they ran and write their done marker; ``bad``'s check refuses its settings."""

    def make(name: str) -> Stage:
        done = root / name / "done"

        def run():
            ran.append(name)
            done.parent.mkdir(parents=True)
            done.write_text("ok")

        def check(pending):
            if name == bad:
                raise UserError("chunk_size=0: must be at least 1")
            assert str(done.parent) in pending or done.exists()  # pending stages' outputs are not looked for

        return Stage(name, f"stage {name}", done, run, check, writes={"out": done.parent})

    return [make("a"), make("b"), make("c")]


def test_every_pending_stage_is_checked_before_any_runs(tmp_path, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(pipeline, "stage_table", lambda p: fake_rows(tmp_path / "run", ran, bad="c"))
    with pytest.raises(UserError, match="^c: chunk_size=0: must be at least 1$"):
        pipeline.run(run_dir=str(tmp_path / "run"))
    assert ran == [] and not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_pending_stages_run_in_order_and_done_ones_are_skipped(tmp_path, monkeypatch):
    ran: list[str] = []
    rd = tmp_path / "run"
    monkeypatch.setattr(pipeline, "stage_table", lambda p: fake_rows(rd, ran))
    (rd / "b").mkdir(parents=True)
    (rd / "b" / "done").write_text("ok")  # b finished in an earlier run
    pipeline.run(run_dir=str(rd))
    assert ran == ["a", "c"]
    log = json.loads((rd / "pipeline_summary.json").read_text())["stages"]
    assert [(s["name"], s["skipped"]) for s in log] == [("a", False), ("b", True), ("c", False)]
    pipeline.run(run_dir=str(rd))  # everything is done now: resumable, nothing runs twice
    assert ran == ["a", "c"]
    assert yaml.safe_load((rd / "pipeline.yaml").read_text())["run_dir"] == str(rd)


def test_rl_is_checked_with_one_line_naming_it(tmp_path, capsys):
    from cai.cli import main

    with pytest.raises(UserError, match=r"^rl='sac': must be one of ppo, dpo, both$"):
        PipelineSettings(rl="sac")
    args = ["pipeline", "--config", "configs/pipeline/tiny.yaml", "--run_dir", str(tmp_path / "run"), "--rl", "sac"]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err == "cai pipeline: error: rl='sac': must be one of ppo, dpo, both"
    assert not (tmp_path / "run").exists()


def captured_configs(rows: list[Stage], monkeypatch) -> dict[str, dict]:
    """Each row's config as the pipeline would pass it to the stage's command (nothing runs)."""
    seen: dict[str, dict] = {}
    monkeypatch.setattr(
        pipeline, "run_lightning_stage", lambda cli, config, stage_dir: seen.update({stage_dir.name: config})
    )
    monkeypatch.setattr(pipeline, "run_function_stage", lambda fn, config, prog: seen.update({prog: config}))
    for r in rows:
        if r.name not in ("tiny", "eval_feedback"):
            r.run()
    return seen


def test_rl_both_and_rl_dpo_rows(tmp_path, monkeypatch):
    both = stage_table(tiny_settings(tmp_path, rl="both"))
    assert [r.name for r in both] == ["tiny", "sl_data", "sft", "label", "pm", "ppo", "dpo", "evaluate"]
    made: set[Path] = set()
    for r in both:  # the order is one the stages can run in
        assert set(r.reads) <= made, (r.name, set(r.reads) - made)
        made |= set(r.writes.values())
    assert pipeline.evaluated_models(tiny_settings(tmp_path, rl="both"), both) == {
        "base": str(tmp_path / "base_model"),
        "sl-cai": str(tmp_path / "sft" / "hf"),
        "rl-cai": str(tmp_path / "ppo" / "hf"),
        "rl-cai-dpo": str(tmp_path / "dpo" / "hf"),
    }
    configs = captured_configs(both, monkeypatch)
    dpo = configs["dpo"]  # the tiny config's dpo section, with the run's paths
    assert dpo["model"]["model"]["name_or_path"] == str(tmp_path / "sft" / "hf")
    assert dpo["model"]["hf_out"] == str(tmp_path / "dpo" / "hf") and dpo["model"]["optim"]["lr"] == 1e-3
    assert dpo["data"]["train"] == str(tmp_path / "label" / "pairs") and dpo["data"]["prompt_format"] == "auto"
    assert dpo["trainer"]["default_root_dir"] == str(tmp_path / "dpo")
    assert list(configs["cai eval"]["models"]) == ["base", "sl-cai", "rl-cai", "rl-cai-dpo"]
    assert configs["cai eval"]["preference_model"] == str(tmp_path / "pm" / "hf")

    # rl: dpo: no preference model, no PPO; the evaluation compares by the feedback model alone.
    only = stage_table(tiny_settings(tmp_path, rl="dpo"))
    assert [r.name for r in only] == ["tiny", "sl_data", "sft", "label", "dpo", "evaluate"]
    assert not any("pm" in p.parts for r in only for p in r.reads)
    configs = captured_configs(only, monkeypatch)
    assert list(configs["cai eval"]["models"]) == ["base", "sl-cai", "rl-cai-dpo"]
    assert configs["cai eval"]["preference_model"] is None
    only[-1].check(frozenset(str(p) for r in only for p in r.writes.values()))  # cai eval accepts it


def test_an_evaluation_of_other_models_runs_again(tmp_path):
    def evaluation(rl: str) -> Stage:
        return stage_table(tiny_settings(tmp_path, rl=rl))[-1]

    out = tmp_path / "eval" / "eval.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"labels": ["base", "rl-cai", "sl-cai"]}))  # a finished rl: ppo run (of before)
    assert evaluation("ppo").finished()  # stays finished
    assert not evaluation("both").finished() and not evaluation("dpo").finished()  # rl changed: the models differ
    out.write_text("{cut")
    assert not evaluation("ppo").finished()


@pytest.mark.parametrize("path", sorted(Path("configs/pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_training_section_of_the_shipped_configs_parses(path, tmp_path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg.get("rl", "ppo") == "ppo" and "dpo" in cfg  # PPO by default; DPO ready for rl: dpo | both
    cfg |= {"run_dir": str(tmp_path), "rl": "both", "hhh_evals": "none"}
    if "tiny" in cfg:
        cfg["tiny"] = TinyModelConfig(**cfg["tiny"])
    rows = stage_table(PipelineSettings(**cfg))
    training = [r for r in rows if r.name in ("sft", "pm", "ppo", "dpo")]
    assert [r.name for r in training] == ["sft", "pm", "ppo", "dpo"]
    for r in training:
        r.check(frozenset())  # parsed by the stage's LightningCLI and its modules built (no model is loaded)


def test_memory_is_freed_after_every_stage_that_ran(tmp_path, monkeypatch, capsys):
    # Every stage runs in the pipeline's process: without a collection its trainer and model (reference cycles) would
    # keep their GPU memory while the next stage loads its own.
    events = []
    monkeypatch.setattr(pipeline, "free_memory", lambda: events.append("free"))
    (tmp_path / "a.done").touch()

    def stage(name: str) -> Stage:
        return Stage(name, name, tmp_path / f"{name}.done", lambda: events.append(name), lambda paths: None)

    log = pipeline.run_stages([stage("a"), stage("b"), stage("c")])
    assert events == ["b", "free", "c", "free"] and [e["skipped"] for e in log] == [True, False, False]
