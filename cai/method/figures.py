"""The stages' figures, each drawn from data into a PNG file (on the one matplotlib set-up, ``cai.plotting``).

Training curves from TensorBoard logs and the AI labels' histogram (``cai report``), win-rate heatmaps with Elo bars
(``cai eval``, shown again by the report) and the reliability diagram of a feedback model (``cai eval-feedback``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cai.plotting import pyplot

KNOWN_TAGS = tuple(
    "loss/train val/loss val/perplexity train/accuracy val/accuracy val/calibration_error val/margin objective/scores "
    "objective/kl objective/rlhf_reward objective/entropy objective/kl_coef loss/policy loss/value policy/approxkl "
    "policy/clipfrac value/explained_variance value/clipfrac response/length loss/dpo rewards/margin "
    "rewards/accuracy calibration/ece logps/chosen logps/rejected rewards/chosen rewards/rejected val/rewards/margin "
    "val/rewards/accuracy val/calibration/ece val/logps/chosen val/logps/rejected".split()
)
"""Scalar tags plotted first, in this order (SFT, the preference model, PPO, DPO); other tags follow (up to
``MAX_PANELS``)."""
SKIPPED_TAGS = ("epoch", "hp_metric")
"""Scalar tags that are not curves."""
MAX_PANELS = 18
"""Panels of one training-curves figure at most."""


def read_scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files below ``stage_dir``, as sorted (step, value) lists.

    Event files of a resumed run overlap; for a step logged twice the later file's value is kept.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    files = sorted(stage_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag not in SKIPPED_TAGS:
                series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_curves(scalars: dict, title: str, path: Path) -> Path:
    """One subplot per scalar tag (known tags first), saved as a PNG."""
    tags = [t for t in KNOWN_TAGS if t in scalars] + sorted(t for t in scalars if t not in KNOWN_TAGS)
    tags = tags[:MAX_PANELS]
    cols = min(3, len(tags))
    rows = -(-len(tags) // cols)
    plt = pyplot()
    # The constrained layout keeps room for the suptitle; tight_layout let it run into the first row's titles.
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax, tag in zip(axes.flat, tags):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_label_histogram(records: list[dict], path: Path) -> Path:
    """Histograms of the AI labels: P(response_a better) and P(chosen better)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for ax, key, bins, note in (
        (axes[0], "p_a", [i / 20 for i in range(21)], "P(response A better); 0.5: no preference"),
        (axes[1], "p_chosen", [0.5 + i / 40 for i in range(21)], "P(chosen better) = max(p_a, 1 - p_a)"),
    ):
        values = [r[key] for r in records]
        ax.hist(values, bins=bins, edgecolor="k", alpha=0.75)
        ax.axvline(sum(values) / len(values), color="C3", lw=1.5, label=f"mean {sum(values) / len(values):.3f}")
        ax.set(xlabel=key, ylabel="pairs", title=note)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.suptitle(f"AI feedback labels ({len(records)} pairs)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_winrates(results: dict, path: str | Path) -> Path:
    """Win-rate heatmaps (row beats column) for each prompt set and an Elo bar chart; saved as a PNG."""
    import numpy as np

    plt = pyplot()

    labels, sets = results["labels"], results["sets"]
    # The constrained layout keeps each heatmap's model names clear of its neighbour (``rl-cai-dpo`` is long).
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4.4 * (len(sets) + 1), 4), squeeze=False, layout="constrained")
    for ax, (name, s) in zip(axes[0], sets.items()):
        m = np.array([[s["win_rate"][a].get(b, np.nan) if a != b else np.nan for b in labels] for a in labels], float)
        cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")  # grey: the diagonal, pairs never compared
        im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap=cmap)
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"{s['axis']} ({name}, n={s['prompts']}):\nP(row's response better)", fontsize=9)
    fig.colorbar(im, ax=axes[0, : len(sets)].tolist(), shrink=0.8)
    ax, width = axes[0, -1], 0.8 / max(1, len(sets))
    for k, s in enumerate(sets.values()):
        x = np.arange(len(labels)) + (k - (len(sets) - 1) / 2) * width
        elo = [s["elo"][m] for m in labels]
        ax.bar(x, elo, width, yerr=[s["elo_std"][m] for m in labels], capsize=3, label=s["axis"])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel=f"Elo (relative to {labels[0]})", title="Elo (bars: bootstrap std over prompts)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def reliability_diagram(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, path: Path, title: str) -> Path:
    """Plot accuracy against confidence per bin (with the bins' counts) and save it as a PNG."""
    plt = pyplot()

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
