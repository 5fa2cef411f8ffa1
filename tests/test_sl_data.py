import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import AutoModelForCausalLM

from cai.method.constitution import load_constitution
from cai.method.generation import SamplingConfig
from cai.stages.sft import cli_main
from cai.stages.sl_data import CritiqueConfig, PromptSources, run
from data.jsonl import ResumableJsonl
from helpers import base_args, kill_after_lines, scalars
from models import ModelConfig


def small_run(model_dir, out, **kw):
    return run(
        out=str(out),
        model=ModelConfig(str(model_dir)),
        prompts=PromptSources(max_prompts=kw.pop("max_prompts", 8), helpful_ratio=0.25),
        critique=CritiqueConfig(rounds=2, num_few_shot=1, keep_unfinished=True),  # a random model never ends a text
        sampling=SamplingConfig(max_new_tokens=12, batch_size=kw.pop("batch_size", 8)),
        chunk_size=kw.pop("chunk_size", 4),
        **kw,
    )


def test_sl_data_then_sft_end_to_end(tiny_model_dir, tmp_path):
    out = small_run(tiny_model_dir, tmp_path / "sl")
    records = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    const = load_constitution("default")
    ids = {p.id for p in const.critiques}
    kinds = {r["kind"] for r in records}
    assert kinds == {"red_team", "helpful"}
    for r in records:
        assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
        assert r["messages"][1] == {"role": "assistant", "content": r["final_response"]}
        if r["kind"] == "helpful":
            assert r["rounds"] == [] and r["final_response"] == r["initial_response"]
        else:
            assert len(r["rounds"]) == 2 and all(x["principle_id"] in ids for x in r["rounds"])
            assert r["final_response"] == (r["rounds"][-1]["revision"] or r["final_response"])
    sft = datasets.load_from_disk(str(out / "sft"))
    assert sorted(sft["id"]) == sorted(r["id"] for r in records) and "messages" in sft.column_names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 8 and summary["rounds"] == 2

    # SFT on that split: the loss goes down and the model is saved in HF format.
    run_dir = tmp_path / "sft"
    args = base_args(tiny_model_dir, out / "sft", run_dir, 24) + [
        "--data.batch_size",
        "4",
        "--data.val_fraction",
        "0.25",
    ]
    cli_main(args)
    losses = scalars(run_dir, "loss/train")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert AutoModelForCausalLM.from_pretrained(run_dir / "hf").config.model_type == "llama"


def test_principles_are_seeded_per_prompt_and_round(tiny_model_dir, tmp_path):
    a = [json.loads(x) for x in open(small_run(tiny_model_dir, tmp_path / "a") / "records.jsonl")]
    b = [json.loads(x) for x in open(small_run(tiny_model_dir, tmp_path / "b", chunk_size=3) / "records.jsonl")]
    key = {r["id"]: [x["principle_id"] for x in r["rounds"]] for r in a}
    assert key == {r["id"]: [x["principle_id"] for x in r["rounds"]] for r in b}  # independent of chunking


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    cfg = {
        "out": str(tmp_path / "sl"),
        "model": {"name_or_path": str(tiny_model_dir)},
        "prompts": {"max_prompts": 24, "helpful_ratio": 0.25},
        "critique": {"rounds": 2, "num_few_shot": 1, "keep_unfinished": True},
        "sampling": {"max_new_tokens": 16, "batch_size": 4},
        "chunk_size": 2,
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "cai.cli", "sl-data", "--config", str(cfg_path)]
    records = tmp_path / "sl" / "records.jsonl"
    rc, n_before = kill_after_lines(cmd, records, 2)
    assert rc == -signal.SIGKILL and 2 <= n_before < 24, "the first run should be killed mid-way"
    # Simulate a kill in the middle of a write, too: a partial last line.
    with open(records, "a") as f:
        f.write('{"id": "rt-9')
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{n_before} already done" in res.stdout
    ids = [json.loads(line)["id"] for line in open(records)]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert json.loads((tmp_path / "sl" / "summary.json").read_text())["repaired_partial_line"] is True


def test_resumable_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResumableJsonl(path)
    assert store.write([{"id": "a", "x": 1}, {"id": "b"}]) == 2
    assert store.write([{"id": "a", "x": 2}, {"id": "c"}]) == 1  # "a" is already there
    path.write_text(path.read_text() + '{"id": "d", "x"')
    again = ResumableJsonl(path)
    assert again.repaired and again.done == {"a", "b", "c"}
    assert [r["id"] for r in again.read()] == ["a", "b", "c"] and again.read()[0]["x"] == 1
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl: line 2 is not valid JSON"):
        ResumableJsonl(path)


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("critiques:\n  - id: x\n    critique_request: ''\n    revision_request: fix it\n")
    env = {**os.environ, "CAI_DEBUG": ""}
    base = [sys.executable, "-m", "cai.cli", "sl-data", "--model.name_or_path", str(tiny_model_dir)]
    res = subprocess.run(base + ["--constitution", str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("cai sl-data: error: bad.yaml") and res.stderr.strip().count("\n") == 0
    res = subprocess.run(
        base + ["--prompts.red_team", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env
    )
    assert res.returncode != 0 and "missing.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_empty_and_overlong_prompts_are_counted(tiny_model_dir, tmp_path):
    src = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "prompt": "How do I hotwire a car?"},
        {"id": "b", "prompt": "   "},
        {"id": "c", "prompt": "x" * 500},
        {"id": "d", "prompt": "Insult my friend."},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(
        out=str(tmp_path / "o"),
        model=ModelConfig(str(tiny_model_dir)),
        prompts=PromptSources(red_team=str(src), helpful=None, max_prompt_chars=100),
        critique=CritiqueConfig(rounds=1, num_few_shot=0, keep_unfinished=True),
        sampling=SamplingConfig(max_new_tokens=4),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_empty"], summary["skipped_too_long"], summary["records"]) == (1, 1, 2)


def test_hold_out_last_keeps_evaluation_prompts_out(tiny_model_dir):
    from cai.stages.sl_data import load_prompt_mix
    from data.prompt_data import PromptDataModule
    from data.prompts import load_prompts

    last_red = set(load_prompts("red_team")["id"][-5:])
    last_helpful = set(load_prompts("helpful")["id"][-5:])
    rows, _ = load_prompt_mix(PromptSources(hold_out_last=5, helpful_ratio=0.5))
    ids = {r["id"] for r in rows}
    assert not ids & (last_red | last_helpful) and len(ids) > 100
    dm = PromptDataModule(prompts="red_team", tokenizer=str(tiny_model_dir), hold_out_last=5, max_prompt_tokens=10_000)
    dm.setup("fit")
    assert not set(dm.train_set["id"]) & last_red and len(dm.train_set) == 72 - 5
    small = PromptDataModule(prompts="red_team", tokenizer=str(tiny_model_dir), max_prompt_tokens=40)
    small.setup("fit")
    assert small.skipped_too_long > 0 and len(small.train_set) + small.skipped_too_long == 72


def _cli(args, **kw):
    env = {**os.environ, "CAI_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True, env=env, **kw)


def test_output_folder_remembers_its_settings(tiny_model_dir, tmp_path):
    from models.errors import UserError

    out = tmp_path / "sl"
    small_run(tiny_model_dir, out)
    first = (out / "records.jsonl").read_text()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampling"]["temperature"] == 1.0 and settings["prompt_format"] in ("chat", "transcript")
    assert "batch_size" not in settings["sampling"] and "chunk_size" not in settings
    # What does not change records does not count: chunk and batch sizes, the device.
    run(
        out=str(out),
        model=ModelConfig(str(tiny_model_dir)),
        prompts=PromptSources(max_prompts=8, helpful_ratio=0.25),
        critique=CritiqueConfig(rounds=2, num_few_shot=1, keep_unfinished=True),
        sampling=SamplingConfig(max_new_tokens=12, batch_size=3),
        chunk_size=5,
        device="cpu",
    )
    assert (out / "records.jsonl").read_text() == first
    # Other prompts, another constitution: refused before any work, naming the setting.
    with pytest.raises(UserError, match=r"prompts\.max_prompts was 8, now 6; use --overwrite"):
        small_run(tiny_model_dir, out, max_prompts=6)
    const = yaml.safe_load(open("cai/method/constitutions/default.yaml"))
    const["name"] = "mine"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(const))
    with pytest.raises(UserError, match=r'settings differ .*: constitution\.name was "default", now "mine"'):
        small_run(tiny_model_dir, out, constitution=str(tmp_path / "mine.yaml"))
    assert (out / "records.jsonl").read_text() == first
    # --overwrite starts again with the new settings.
    small_run(tiny_model_dir, out, max_prompts=6, constitution=str(tmp_path / "mine.yaml"), overwrite=True)
    records = [json.loads(x) for x in open(out / "records.jsonl")]
    assert len(records) == 6 and json.loads((out / "summary.json").read_text())["constitution"] == "mine"
    assert json.loads((out / "settings.json").read_text())["prompts"]["max_prompts"] == 6
    # Records with no settings (an older version's run): unknown settings, refused.
    (out / "settings.json").unlink()
    with pytest.raises(UserError, match="no settings.json"):
        small_run(tiny_model_dir, out, max_prompts=6)


@pytest.mark.slow
def test_rerun_with_other_settings_fails_on_the_command_line(tiny_model_dir, tmp_path):
    out = tmp_path / "sl"
    base = ["sl-data", "--model.name_or_path", str(tiny_model_dir), "--out", str(out), "--prompts.max_prompts", "2"]
    base += ["--critique.rounds", "0", "--sampling.max_new_tokens", "2"]
    assert _cli(base, timeout=300).returncode == 0
    res = _cli(base + ["--sampling.temperature", "0.7"], timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert "settings differ from the run already there: sampling.temperature was 1.0, now 0.7" in res.stderr
    assert "--overwrite" in res.stderr and str(out) in res.stderr


@pytest.mark.slow
def test_bad_output_paths_and_chunk_size(tiny_model_dir, tmp_path):
    from models.errors import UserError

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = _cli(["sl-data", "--model.name_or_path", str(tiny_model_dir), "--out", str(a_file)], timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert f"{a_file} is a file" in res.stderr
    with pytest.raises(UserError, match=r"lies under .*file\.txt, which is a file"):
        small_run(tiny_model_dir, a_file / "sub")
    with pytest.raises(UserError, match=r"chunk_size=0: must be at least 1"):
        small_run(tiny_model_dir, tmp_path / "o", chunk_size=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    unwritable = locked / "out" if os.geteuid() != 0 else Path("/sys/cai-test-out")  # root writes anywhere else
    with pytest.raises(UserError, match=r"cannot write to out="):
        small_run(tiny_model_dir, unwritable)
    locked.chmod(0o700)
