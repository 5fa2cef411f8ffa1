"""``scripts/bench_vs_trl.py``: a smoke run on the tiny preset, and the table logic on made-up results."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--stages", "sft,rm,ppo", "--repeats", "1"]
    cmd += ["--steps", "4", "--warmup", "1", "--n_rows", "32", "--retries", "0", "--out", str(out)]
    cmd += ["--ppo_steps", "2", "--ppo_warmup", "1", "--ppo_batch_size", "4", "--ppo_new_tokens", "8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    for label in ("SFT", "reward model (hard labels)", "PPO"):
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
    assert len(runs) == 3
    assert "training starts" not in runs[0]  # the fake runs carry no set-up memory

    for r in results["sft"]["cai"] + results["sft"]["trl"]:
        r["mem_at_train_start_bytes"] = 64 << 20
    table, runs = bench.build_table(stages[:1], results, parity, {"device": "cpu", "peak_tflops": None})
    assert "MFU" not in table  # no MFU row on a CPU unless a peak is given
    assert "when training starts (imports, model, data): this project 64 MiB, TRL 64 MiB" in runs[0]
