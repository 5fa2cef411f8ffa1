"""``scripts/bench_shared_prompt.py`` on the paper's HHH comparisons, with the tiny model (a quick run)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_shared_prompt.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_shared_prompt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_shared_prompt"] = module
    spec.loader.exec_module(module)
    return module


def test_shared_prompt_figures_on_the_hhh_comparisons(shared_cai, tiny_model_dir, capsys):
    bench = load_script()
    hhh = shared_cai / "evals" / "438HHHEvaluations.jsonl"
    bench.main(["--hhh", str(hhh), "--model", str(tiny_model_dir), "--max_length", "256", "--n_batches", "1",
                "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "438 pairs" in out
    common, batched = (float(x) for x in re.findall(r"([\d.]+)%", out)[:2])
    assert 0 < batched <= common < 100  # the transcripts share their conversation; capping only lowers the share
    fewer = float(re.search(r"\(([\d.]+)x fewer\)", out).group(1))
    assert fewer >= 1.0  # a split batch never costs more token positions than the whole texts
    assert re.search(r"whole texts [\d.]+ s, shared prompt [\d.]+ s", out)
