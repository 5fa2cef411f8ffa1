"""``scripts/bench_vs_trl.py``: a smoke run on the tiny preset, and the table logic on made-up results."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import clean_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_vs_trl.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (stage label)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| stage"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


def number(cell: str) -> float:
    return float(cell.replace("*", "").replace(",", "").rstrip("x").split()[0])


def parity_ok(cell: str) -> bool:
    return cell.startswith("equal") or "by design" in cell


@pytest.mark.slow
def test_smoke_tiny_preset(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[bench]'): nothing to compare against")
    env = clean_env()
    env["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--stages", "sft,rm,ppo,dpo,dpo_precompute"]
    cmd += ["--repeats", "1"]
    cmd += ["--steps", "4", "--warmup", "1", "--n_rows", "32", "--retries", "0", "--out", str(out)]
    cmd += ["--ppo_steps", "2", "--ppo_warmup", "1", "--ppo_batch_size", "4", "--ppo_new_tokens", "8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    dpo = ("DPO (hard labels) vs TRL defaults", "DPO vs TRL precompute_ref_log_probs")
    for label in ("SFT", "reward model (hard labels)", "PPO", *dpo):
        cells = rows[label]
        for i in (2, 3, 4, 7):  # this project, TRL, ratio, memory ratio
            assert number(cells[i]) > 0, (label, cells)
        for i in (5, 6):  # peak memory of each system
            assert cells[i].endswith(("MiB", "GiB")) and number(cells[i]) > 0, (label, cells)
        assert parity_ok(cells[9]), (label, cells[9])
    assert out.read_text().split("\n\n")[0] in proc.stdout  # the same table on stdout


def fake_run(tokens: int, seconds: float, mem: int) -> dict:
    return {
        "tokens": tokens,
        "rows": 16,
        "seconds": seconds,
        "peak_mem_bytes": mem,
        "mem_kind": "peak RSS",
        "n_params": 1000,
    }


def test_table_medians_ratios_and_parity_cells():
    bench = load_script()
    stages = list(bench.STAGES)
    results = {
        "sft": {
            "cai": [fake_run(200, 1.0, 100 << 20), fake_run(300, 1.0, 90 << 20), fake_run(100, 1.0, 95 << 20)],
            "trl": [fake_run(100, 1.0, 100 << 20)] * 3,
        },
        "rm": {"cai": [fake_run(0, 1.0, 1 << 30)], "trl": [fake_run(0, 2.0, 2 << 30)]},
        "ppo": {"cai": [fake_run(0, 0.5, 1 << 30)], "trl": [fake_run(0, 2.0, 1 << 30)]},
        "ppo_critic": {"cai": [fake_run(0, 1.0, 1 << 30)], "trl": [fake_run(0, 2.0, 1 << 30)]},
        "dpo": {"cai": [fake_run(0, 1.0, 1 << 30)], "trl": [fake_run(0, 1.0, 2 << 30)]},
        "dpo_precompute": {"cai": [fake_run(0, 1.0, 1 << 30)], "trl": [fake_run(0, 2.0, 1 << 29)]},
    }
    parity = {
        "sft": {"equal": True, "diffs": {"loss": 1e-8}, "values": {}, "inputs": "identical", "note": ""},
        "rm": {"equal": False, "diffs": {"loss": 0.5}, "values": {}, "inputs": "identical", "note": ""},
        "ppo": {"equal": True, "diffs": {"advantages": 1e-7}, "values": {}, "inputs": "identical", "note": "by design",
                "what": "identical rollouts"},
    }  # fmt: skip
    spec = {"device": "cuda", "peak_tflops": 1e-9}
    table, runs = bench.build_table(stages, results, parity, spec)
    rows = table_rows(table)
    sft = rows["SFT"]
    assert sft[2] == "200" and sft[3] == "100" and sft[4] == "**2.00x**"  # medians, then their ratio
    assert sft[7] == "0.95x" and "speed met" in sft[8] and "memory met" in sft[8]
    assert parity_ok(sft[9])
    rm = rows["reward model (hard labels)"]
    assert rm[2] == "8" and rm[3] == "4" and rm[5] == "1.00 GiB" and rm[7] == "0.50x"  # pairs/s = rows / 2 / s
    assert not parity_ok(rm[9]) and "differs" in rm[9]
    assert "MFU" in table  # on a GPU the SFT row has an MFU row below it
    ppo = rows["PPO"]  # episodes/s = rows / s
    assert ppo[2] == "32" and ppo[3] == "8" and ppo[4] == "**4.00x**" and "speed met" in ppo[8]
    assert parity_ok(ppo[9]) and ppo[9].startswith("equal (identical rollouts; max abs diff: advantages 1.0e-07)")
    critic = rows["PPO, separate critic"]  # no parity result for it here
    assert critic[2] == "16" and critic[4] == "**2.00x**" and "speed met" in critic[8] and critic[9] == "not checked"
    dpo = rows["DPO (hard labels) vs TRL defaults"]  # pairs/s, like the reward model
    assert dpo[2] == "8" and dpo[4] == "**1.00x**" and "speed missed, memory met" in dpo[8] and dpo[7] == "0.50x"
    assert dpo[8].startswith(">= 1.5x")
    pre = rows["DPO vs TRL precompute_ref_log_probs"]
    assert pre[3] == "4" and pre[4] == "**2.00x**" and "speed met, memory missed" in pre[8] and pre[7] == "2.00x"
    assert len(runs) == 6
    assert "training starts" not in runs[0]  # the fake runs carry no set-up memory

    for r in results["sft"]["cai"] + results["sft"]["trl"]:
        r["mem_at_train_start_bytes"] = 64 << 20
    table, runs = bench.build_table(stages[:1], results, parity, {"device": "cpu", "peak_tflops": None})
    assert "MFU" not in table  # no MFU row on a CPU unless a peak is given
    assert "when training starts (imports, model, data): this project 64 MiB, TRL 64 MiB" in runs[0]


def test_shared_runs_are_interleaved_with_their_partner_stage():
    bench = load_script()
    by_name = {s.name: s for s in bench.STAGES}
    pick = [by_name[n] for n in ("rm", "dpo", "dpo_precompute", "ppo", "ppo_critic")]
    groups = [[f"{stage.name}-{system}" for stage, system in jobs] for jobs in bench.run_groups(pick)]
    assert groups == [
        ["rm-cai", "rm-trl"],
        ["dpo-cai", "dpo-trl", "dpo_precompute-trl"],
        ["ppo-cai", "ppo-trl", "ppo_critic-cai"],
    ]
    alone = [[f"{s.name}-{x}" for s, x in jobs] for jobs in bench.run_groups([by_name["dpo_precompute"]])]
    assert alone == [["dpo_precompute-cai", "dpo_precompute-trl"]]  # without dpo it runs both systems itself


def load_presets():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_presets

    return bench_presets


def test_hhh_row_parses_into_conversation_and_both_options():
    from data.formats import DEFAULT_PRINCIPLE, feedback_question

    presets = load_presets()
    question = feedback_question(
        "Can you help me? [[[not an option]]]", DEFAULT_PRINCIPLE, " good ", "bad\n\nsecond line"
    )
    row = {"prompt": "\n\n" + question + "\n\nThe answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}
    pair = presets.parse_hhh_row(row)
    assert pair == {
        "prompt": [{"role": "user", "content": "Can you help me? [[[not an option]]]"}],
        "chosen": "good",
        "rejected": "bad\n\nsecond line",
    }
    swapped = presets.parse_hhh_row({**row, "corrects": [" (B)"], "incorrects": [" (A)"]})
    assert (swapped["chosen"], swapped["rejected"]) == ("bad\n\nsecond line", "good")
    assert presets.parse_hhh_row({**row, "corrects": [" (A)"], "incorrects": [" (C)"]}) is None


def test_real_text_rows_give_both_systems_the_same_ids(smollm2_dir, shared_cai, tmp_path):
    """On HHH rows and SL-CAI samples, this project's rows and TRL's conversational rows tokenize to the same ids.

    TRL's side runs TRL's own tokenization step (``trl.data_utils._tokenize``, what ``SFTTrainer`` and
    ``RewardTrainer`` call on conversational rows); the parsed options must be the file's own transcripts.
    """
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[bench]'): nothing to compare against")
    import json

    from trl.data_utils import _tokenize

    from data.formats import PromptFormat
    from data.preference import pair_texts, tokenize_pair
    from data.sft import tokenize_example
    from models import load_tokenizer

    presets = load_presets()
    lines = (shared_cai / presets.HHH_FILE).read_text().splitlines()[:40]
    hhh = tmp_path / "hhh.jsonl"
    hhh.write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(str(smollm2_dir), padding_side="right")
    fmt = PromptFormat(tok, "chat")
    for line in lines:  # the options parsed from the question are the row's own transcripts
        row = json.loads(line)
        pair = presets.parse_hhh_row(row)
        whole = pair_texts({"chosen": row["text_correct"], "rejected": row["text_incorrect"]}, fmt)
        assert pair_texts(pair, fmt) == whole

    sl = str(shared_cai / presets.SL_SAMPLES)
    paths, notes = presets.write_real_data(smollm2_dir, tmp_path / "data", 512, 40, 4, sl, str(hhh))
    rows = {name: [json.loads(r) for r in open(path)] for name, path in paths.items()}
    assert len(rows["rm_cai"]) >= 32 and len(rows["sft_cai"]) >= 20, notes
    assert all(" 0 with ids that differ" in n for n in notes), notes
    for ours, theirs in zip(rows["rm_cai"], rows["rm_trl"], strict=True):
        ids = tokenize_pair(ours, fmt, 512, True)
        assert ids["chosen_ids"] == _tokenize(tok, theirs["prompt"] + theirs["chosen"])["input_ids"]
        assert ids["rejected_ids"] == _tokenize(tok, theirs["prompt"] + theirs["rejected"])["input_ids"]
        assert tok.decode(ids["chosen_ids"]).endswith("<|im_end|>\n")
    for ours, theirs in zip(rows["sft_cai"], rows["sft_trl"], strict=True):
        ids = tokenize_example(ours, fmt, 512)
        n_prompt = len(_tokenize(tok, theirs["prompt"], add_generation_prompt=True)["input_ids"])
        assert ids["input_ids"] == _tokenize(tok, theirs["prompt"] + theirs["completion"])["input_ids"]
        assert ids["labels"][:n_prompt] == [-100] * n_prompt and -100 not in ids["labels"][n_prompt:]


def test_real_preset_without_shared_material_exits_with_one_line(monkeypatch, tmp_path):
    presets = load_presets()
    monkeypatch.setattr(presets, "SHARED", tmp_path / "absent")
    with pytest.raises(SystemExit) as exc:
        presets.source_paths(None, None, ["sft", "dpo"])
    message = str(exc.value)
    assert "\n" not in message and "absent is missing" in message and "--sft_data and --hhh" in message
    assert presets.source_paths("sl.jsonl", "hhh.jsonl", ["sft", "rm", "ppo"]) == ("sl.jsonl", "hhh.jsonl")
    assert presets.source_paths(None, None, ["ppo"]) == (None, None)  # PPO reads the built-in prompts


@pytest.mark.slow
def test_sft_floor_runs_the_bare_loop_on_the_real_model(smollm2_dir, shared_cai):
    """``scripts/bench_sft_floor.py``: one timed step of the bare PyTorch SFT loop on the paper's samples."""
    script = REPO / "scripts" / "bench_sft_floor.py"
    args = ["--model", str(smollm2_dir), "--n_rows", "4", "--warmup", "1", "--steps", "1", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rate = re.search(r"median ([\d.]+) tokens/s over 1 runs", proc.stdout)
    assert rate and float(rate.group(1)) > 0, proc.stdout
    too_few = subprocess.run(
        [sys.executable, str(script), *args[:-4], "--steps", "5", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert too_few.returncode != 0 and "fewer than 6 batches" in too_few.stderr


def test_a_run_cut_short_keeps_the_stages_it_measured(tmp_path, monkeypatch):
    # A worker that fails (or a time limit) after the first group must not lose that group's figures: --out holds
    # the table so far, marked partial.
    bench = load_script()
    by_name = {s.name: s for s in bench.STAGES}
    stages = [by_name["sft"], by_name["rm"], by_name["ppo"]]
    calls = []

    def fake_worker(name, spec_path, log):
        calls.append(name)
        if name.startswith("rm-"):
            raise RuntimeError("worker rm-cai failed (exit 1)")
        return {**fake_run(100 if name.endswith("cai") else 50, 1.0, 1 << 20), "wall_s": 1.0}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    args = SimpleNamespace(repeats=2, retries=0, retry_wait=0.0)
    out = tmp_path / "table.md"

    def partial(done, results):
        bench.write_partial(out, "header line", stages, done, results, {"device": "cpu"})

    with pytest.raises(RuntimeError, match="rm-cai"):
        bench.measure(stages, args, tmp_path / "spec.json", tmp_path, 10.0, on_group=partial)
    assert calls == ["sft-cai", "sft-trl", "sft-trl", "sft-cai", "rm-cai"]
    text = out.read_text()
    assert text.startswith("header line") and "**Partial**: still to run: rm, ppo" in text
    rows = table_rows(text)
    assert set(rows) == {"SFT"} and rows["SFT"][4] == "**2.00x**" and rows["SFT"][9] == "not checked"
