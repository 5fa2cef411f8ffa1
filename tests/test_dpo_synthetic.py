"""Does DPO learn a preference, and do soft labels beat hard ones? A synthetic task with known probabilities.

The better response of each pair holds "safely" k = 1, 2 or 3 times and is preferred with known probability 0.65,
0.8 or 0.95 (``test_dpo.P_TRUE``). The training labels are noisy soft labels (the true probability plus Gaussian
noise, ordered as ``cai label`` orders pairs, so some pairs are flipped); the held-out pairs carry the true
probability with the better response as ``chosen``. So ``val/rewards/accuracy`` is the implicit reward's accuracy
against the truth, and ``val/calibration/ece`` the calibration of σ(β·margin) against the true probabilities.

``compare_labels`` makes the tables of docs/results.md ("Soft, hard and cDPO labels on a synthetic task"):
``python -c "import sys; sys.path[:0] = ['.', 'tests']; from test_dpo_synthetic import main; main(0.2, 60)"``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from test_dpo import dpo_args, synthetic_pairs

from cai.stages.dpo import cli_main

MODES = ("soft", "hard", "cdpo")


def fit(model_dir, out: Path, seed: int, noise: float, steps: int, labels: str) -> dict[str, float]:
    """One run on the synthetic task; the held-out accuracy, calibration error and loss against the truth."""
    data = out / f"data{seed}"
    data.mkdir(parents=True, exist_ok=True)
    train = synthetic_pairs(data / "train.jsonl", 256, seed, noise)
    val = synthetic_pairs(data / "val.jsonl", 128, 1000 + seed, None)
    extra = ["--model.dpo.labels", labels, "--seed_everything", str(seed), "--data.seed", str(seed)]
    cli = cli_main(dpo_args(model_dir, train, val, out / f"{labels}{seed}", steps, *extra))
    m = cli.trainer.callback_metrics
    return {k: m[f"val/{k}"].item() for k in ("rewards/accuracy", "calibration/ece", "loss")}


def compare_labels(model_dir, out: Path, noise: float, steps: int, seeds=(0, 1, 2)) -> dict[str, dict[str, list]]:
    """Held-out metrics of soft, hard and cDPO (ε = 0.1) training, per mode, one value per seed."""
    runs = {mode: [fit(model_dir, out, s, noise, steps, mode) for s in seeds] for mode in MODES}
    return {mode: {k: [r[k] for r in rs] for k in rs[0]} for mode, rs in runs.items()}


def table(results: dict[str, dict[str, list]]) -> str:
    """A markdown table: mean ± spread (population standard deviation) over seeds."""
    lines = ["| labels | held-out accuracy | ECE vs true p | loss vs true p |", "|---|---|---|---|"]
    for mode, metrics in results.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in metrics.values()]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_dpo_learns_the_synthetic_preference(tiny_model_dir, tmp_path):
    """Soft labels with noise: the implicit reward ranks held-out pairs right at least 90% of the time."""
    metrics = fit(tiny_model_dir, tmp_path, 0, 0.2, 40, "soft")
    print(f"DPO on the synthetic task: held-out implicit-reward accuracy {metrics['rewards/accuracy']:.3f}")
    assert metrics["rewards/accuracy"] >= 0.9, metrics


@pytest.mark.slow
def test_soft_labels_beat_hard_labels_on_noisy_feedback(tiny_model_dir, tmp_path):
    results = compare_labels(tiny_model_dir, tmp_path, 0.2, 60)
    print("\n" + table(results))
    mean = {m: {k: statistics.mean(v) for k, v in r.items()} for m, r in results.items()}
    assert mean["soft"]["calibration/ece"] < mean["hard"]["calibration/ece"]
    assert mean["soft"]["rewards/accuracy"] >= mean["hard"]["rewards/accuracy"] - 0.01
    assert min(results["soft"]["rewards/accuracy"]) >= 0.9


def main(noise: float = 0.2, steps: int = 60) -> None:
    """Print the comparison table on a fresh tiny model (for docs/results.md)."""
    import tempfile

    from models.tiny import TinyModelConfig, make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", TinyModelConfig(arch="llama", seed=0))
        print(table(compare_labels(model, Path(tmp), noise, steps)))
