"""Accuracy and calibration of a feedback model on multiple-choice evaluations: ``cai eval-feedback``.

The input is JSONL rows ``{prompt, corrects, incorrects}`` such as the paper's 438 HHH comparisons
(``438HHHEvaluations.jsonl``; Bai et al. 2022 report feedback-model accuracy on them, fig. 4) or its harmfulness
classification set. Every candidate answer is scored by teacher forcing, log p(candidate | prompt); the softmax over
a row's candidates gives the model's probabilities. The prediction is the most likely candidate, its probability the
confidence. Reported: accuracy, expected calibration error of the confidence (torchmetrics), and a reliability
diagram (PNG).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchmetrics.classification import BinaryCalibrationError

from data.sft import load_any_dataset
from models import ModelConfig, load_model, load_tokenizer, resolve_device
from models.logprobs import continuation_logprobs


def read_evals(path: str, max_examples: int | None = None) -> list[dict]:
    """Rows with ``prompt`` (str), ``corrects`` and ``incorrects`` (lists of str); a bad row is a one-line error."""
    rows = load_any_dataset(path).to_list()[:max_examples]
    for i, r in enumerate(rows):
        for key, kind in (("prompt", str), ("corrects", list), ("incorrects", list)):
            if not isinstance(r.get(key), kind):
                raise ValueError(f"{path}: row {i}: {key!r} must be a {kind.__name__}")
        if not r["corrects"] or not r["corrects"] + r["incorrects"]:
            raise ValueError(f"{path}: row {i}: no correct answer given")
    return rows


def reliability_diagram(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, path: Path, title: str) -> Path:
    """Plot accuracy against confidence per bin (with the bins' counts) and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = torch.linspace(0, 1, n_bins + 1)
    bins = torch.bucketize(conf, edges[1:-1])
    centers, means, accs, counts = [], [], [], []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            centers.append((edges[b] + edges[b + 1]).item() / 2)
            means.append(conf[sel].mean().item())
            accs.append(correct[sel].float().mean().item())
            counts.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centers, accs, width=1 / n_bins * 0.9, alpha=0.7, edgecolor="k", label="accuracy per bin")
    ax.plot(means, accs, "o", color="C3", ms=4, label="mean confidence of the bin")
    for x, y, n in zip(centers, accs, counts):
        ax.annotate(str(n), (x, y), ha="center", va="bottom", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (probability of the chosen answer)", ylabel="accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 8, max_length: int | None = None) -> dict:
    """Score every candidate of every row; returns probabilities, predictions and correctness per row."""
    contexts, conts, owner = [], [], []
    for i, r in enumerate(rows):
        ctx = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        for cand in r["corrects"] + r["incorrects"]:
            cont = tokenizer(cand, add_special_tokens=False)["input_ids"]
            keep = len(ctx) if max_length is None else max(1, max_length - len(cont))
            contexts.append(ctx[-keep:])  # long conversations lose their beginning, never the question
            conts.append(cont)
            owner.append(i)
    logps = continuation_logprobs(model, contexts, conts, tokenizer.pad_token_id, batch_size)
    per_row: list[list[float]] = [[] for _ in rows]
    for i, lp in zip(owner, logps):
        per_row[i].append(lp)
    results = []
    for r, lps in zip(rows, per_row):
        probs = torch.softmax(torch.tensor(lps), 0)
        k = int(probs.argmax())
        results.append(
            {
                "probs": probs.tolist(),
                "pred": k,
                "correct": k < len(r["corrects"]),
                "confidence": probs[k].item(),
                "p_correct": probs[: len(r["corrects"])].sum().item(),
            }
        )
    return {"rows": results}


def run(
    model: ModelConfig | None = None,
    evals: str = "../shared/anthropic-cai/evals/438HHHEvaluations.jsonl",
    out: str = "runs/eval_feedback",
    max_examples: int | None = None,
    batch_size: int = 8,
    n_bins: int = 10,
    device: str = "auto",
) -> dict:
    """Measure a feedback model's accuracy and calibration on multiple-choice comparisons.

    Args:
        model: The feedback model.
        evals: JSONL/JSON/Parquet rows {prompt, corrects, incorrects}.
        out: Output folder: metrics.json, predictions.jsonl, reliability.png.
        max_examples: Evaluate the first N rows only.
        batch_size: Rows per forward pass.
        n_bins: Confidence bins of the calibration error and the diagram.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    """
    if model is None:
        raise ValueError("eval-feedback: model.name_or_path is required")
    if not Path(evals).exists():
        raise FileNotFoundError(f"eval-feedback: {evals}: no such file")
    rows = read_evals(evals, max_examples)
    dev = resolve_device(device)
    net = load_model(model).to(dev).eval()
    tok = load_tokenizer(model.tokenizer or model.name_or_path)
    limit = getattr(net.config, "max_position_embeddings", None)
    res = evaluate(net, tok, rows, batch_size, limit)["rows"]
    conf = torch.tensor([r["confidence"] for r in res])
    correct = torch.tensor([r["correct"] for r in res])
    ece = BinaryCalibrationError(n_bins=n_bins, norm="l1")(conf, correct.long()).item()
    metrics = {
        "evals": evals,
        "model": model.name_or_path,
        "examples": len(res),
        "accuracy": correct.float().mean().item(),
        "expected_calibration_error": ece,
        "mean_confidence": conf.mean().item(),
        "chance_accuracy": sum(1 / len(r["corrects"] + r["incorrects"]) for r in rows) / len(rows),
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for r in res:
            f.write(json.dumps(r) + "\n")
    title = f"{Path(evals).name}: accuracy {metrics['accuracy']:.3f}, ECE {ece:.3f} (n={len(res)})"
    reliability_diagram(conf, correct, n_bins, out_dir / "reliability.png", title)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"eval-feedback: {title}\n  chance accuracy {metrics['chance_accuracy']:.3f}; wrote {out_dir}/")
    return metrics
