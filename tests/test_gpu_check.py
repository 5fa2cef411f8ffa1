"""``scripts/gpu_check.sh --cpu-smoke``: the GPU check's every section runs at tiny sizes, so it cannot rot unseen."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for section in ("pipeline", "bench", "variants", "ppo", "attention"):
        assert re.search(rf"^## {section} \(\d+ s\)$", text, re.M), f"section {section} missing:\n{text}"
    assert "failed" not in text
    # The benchmark table has all three stages with a measured ratio each.
    for stage in ("SFT", "reward model", "PPO"):
        assert re.search(rf"^\| {stage}.*\*\*\d+\.\d+x\*\*", text, re.M), stage
    # The variants section measured SFT without loss chunks and the reward model with the shared prompt.
    variants = text.split("## variants", 1)[1].split("\n## ", 1)[0]
    assert "SFT: this project's loss_chunk_size null (no chunks)" in variants
    assert "reward model and DPO: this project with the shared prompt" in variants
    for stage in ("SFT", "reward model"):
        assert re.search(rf"^\| {stage}.*\*\*\d+\.\d+x\*\*", variants, re.M), stage
    # FSDP2 + bf16-true PPO: the policy starts as the reference, so the first rollout's KL is exactly 0.
    assert re.search(r"^\| first rollout KL \(must be 0\) \| 0 \|$", text, re.M), text
    # Attention kernels agree with sdpa (fp32 on a CPU).
    eager = re.search(r"^\| eager \| [\d,]+ \| .* \| ([\d.e+-]+) \|$", text, re.M)
    assert eager and float(eager.group(1)) < 1e-4
    # The shortened one-GPU recipe ran every stage, both RL stages included.
    folders = re.search(r"^- stage folders: (.*)$", text, re.M)
    assert "every stage ran" in text and folders, text
    assert {"sl_data", "sft", "label", "pm", "ppo", "dpo", "eval", "report"} <= set(folders.group(1).split(", "))


def test_gpu_check_refuses_unknown_sections(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu-smoke", "--sections", "bench,warp", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown warp" in proc.stderr


def test_a_section_cut_off_keeps_what_its_run_wrote(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    log, out = tmp_path / "bench.log", tmp_path / "bench.md"
    log.write_text("  sft-cai run 1: 100 tokens/s\n")
    out.write_text("**Partial**: still to run: ppo\n\n| SFT | tokens/s |\n")
    text = gpu_check.failed("bench_vs_trl.py", 124, log, out)
    assert "exit status 124; 124: the section's time limit" in text and "sft-cai run 1" in text
    assert text.endswith("What it wrote before it stopped:\n\n**Partial**: still to run: ppo\n\n| SFT | tokens/s |\n\n")
    assert "wrote before" not in gpu_check.failed("bench_vs_trl.py", 1, log, tmp_path / "missing.md")
