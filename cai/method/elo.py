"""Win rates and Elo scores from pairwise comparisons, the evaluation of Bai et al. 2022 (arXiv:2212.08073).

The paper reports helpfulness and harmlessness as Elo scores fitted to pairwise preferences between models (e.g. its
fig. 2), on the standard Elo scale also used by Bai et al. 2022a (arXiv:2204.05862): an Elo difference of Δ means the
higher model's response is preferred with probability 1 / (1 + 10^(-Δ/400)), so +200 Elo is a 76% win rate. Only
differences are meaningful, hence the anchor.

Here the comparisons are soft: each is P(model i's response is better than model j's) from the feedback model. The
scores are the maximum-likelihood fit of a Bradley-Terry model, P(i beats j) = σ(r_i - r_j), to those soft outcomes,
i.e. they maximise Σ p log σ(r_i - r_j) + (1 - p) log σ(r_j - r_i). Natural units are converted to Elo by
400 / ln 10, and the anchor model (the first by default) is set to 0. A tiny ridge term keeps the fit finite when a
model wins every comparison outright. ``elo_table`` renders an evaluation's scores as the Markdown table that both
``cai eval`` and ``cai report`` show.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

ELO_SCALE = 400 / math.log(10)
"""Elo points per natural-log unit of the Bradley-Terry odds (≈ 173.7)."""

Comparison = tuple[int, int, float]
"""(i, j, p): model ``i`` against model ``j``, with p = P(i's response is better)."""


def win_probability(elo_i: float, elo_j: float) -> float:
    """P(i beats j) implied by two Elo scores."""
    return 1.0 / (1.0 + 10 ** ((elo_j - elo_i) / 400))


def _log_likelihood(r: np.ndarray, i: np.ndarray, j: np.ndarray, p: np.ndarray, l2: float) -> float:
    d = r[i] - r[j]
    # log σ(d) = -log(1 + e^-d), computed stably with logaddexp.
    return float(-(p * np.logaddexp(0, -d) + (1 - p) * np.logaddexp(0, d)).sum() - 0.5 * l2 * (r**2).sum())


def fit_elo(
    n_models: int,
    comparisons: Sequence[Comparison],
    anchor: int = 0,
    l2: float = 1e-4,
    max_steps: int = 100,
    tol: float = 1e-10,
) -> list[float]:
    """Elo scores of ``n_models`` models fitted by maximum likelihood to (soft) pairwise outcomes.

    Newton's method with step halving on the concave Bradley-Terry log-likelihood (plus the ridge term); it converges
    in a handful of steps for the few models an evaluation compares.

    Args:
        n_models: Number of models; indices in ``comparisons`` are below it.
        comparisons: (i, j, p) triples, p = P(model i is better than model j) in [0, 1]. Repeats are separate
            observations (e.g. one per prompt).
        anchor: The model whose score is fixed at 0.
        l2: Ridge weight on the natural-unit ratings; keeps the fit finite when one model always wins.
        max_steps: Newton steps at most.
        tol: Stop when the log-likelihood gains less than this.

    Returns:
        One Elo score per model, ``anchor``'s being 0. A model without comparisons stays at the ridge's centre.
    """
    if not 0 <= anchor < n_models:
        raise ValueError(f"fit_elo: anchor {anchor} is not a model index below {n_models}")
    r = np.zeros(n_models)
    if comparisons:
        i, j, p = (np.asarray(x) for x in zip(*comparisons))
        i, j, p = i.astype(int), j.astype(int), p.astype(float)
        if ((i < 0) | (i >= n_models) | (j < 0) | (j >= n_models) | (i == j)).any():
            raise ValueError(f"fit_elo: comparisons must name two different models below {n_models}")
        if ((p < 0) | (p > 1)).any():
            raise ValueError("fit_elo: outcomes must be probabilities in [0, 1]")
        r = _newton(r, i, j, p, l2, max_steps, tol)
    return [float(x) for x in (r - r[anchor]) * ELO_SCALE]


def _newton(r, i, j, p, l2, max_steps, tol) -> np.ndarray:
    n = len(r)
    ll = _log_likelihood(r, i, j, p, l2)
    for _ in range(max_steps):
        s = 1 / (1 + np.exp(-(r[i] - r[j])))  # σ(r_i - r_j)
        resid, w = p - s, s * (1 - s)
        grad = np.bincount(i, resid, n) - np.bincount(j, resid, n) - l2 * r
        # Negative Hessian: the weighted graph Laplacian of the comparisons plus the ridge (positive definite).
        hess = np.diag(np.bincount(i, w, n) + np.bincount(j, w, n) + l2)
        np.add.at(hess, (i, j), -w)
        np.add.at(hess, (j, i), -w)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # step halving: Newton can overshoot far from the optimum
            new_ll = _log_likelihood(r + t * step, i, j, p, l2)
            if new_ll >= ll:
                break
            t /= 2
        else:
            break
        r, gain, ll = r + t * step, new_ll - ll, new_ll
        if gain < tol:
            break
    return r


def bootstrap_elo(
    n_models: int, groups: Sequence[Sequence[Comparison]], n_resamples: int = 200, seed: int = 0, anchor: int = 0
) -> list[float]:
    """Standard deviation of each model's Elo over bootstrap resamples of the prompts.

    Args:
        n_models: Number of models.
        groups: The comparisons of each prompt (resampled together, since they share the prompt).
        n_resamples: Bootstrap resamples; 0 gives zeros.
        seed: Seed of the resampling.
        anchor: The model fixed at 0 (its spread is 0 by construction).

    Returns:
        One standard deviation per model, in Elo points.
    """
    if n_resamples <= 0 or not groups:
        return [0.0] * n_models
    rng = random.Random(seed)
    fits = []
    for _ in range(n_resamples):
        sample = [c for g in rng.choices(groups, k=len(groups)) for c in g]
        fits.append(fit_elo(n_models, sample, anchor=anchor))
    return [float(x) for x in np.std(np.array(fits), axis=0)]


def win_rates(n_models: int, comparisons: Sequence[Comparison]) -> tuple[list[list[float | None]], list[list]]:
    """Soft and hard win-rate matrices: entry [i][j] is how often model i beats model j.

    The soft rate is the mean of P(i beats j); the hard rate the share of comparisons with P > 0.5 (a tie, P = 0.5,
    counts half). Each comparison (i, j, p) also counts as (j, i, 1 - p), so [i][j] + [j][i] = 1. Pairs never
    compared, and the diagonal, are None.
    """
    soft: list[list[list[float]]] = [[[] for _ in range(n_models)] for _ in range(n_models)]
    for i, j, p in comparisons:
        soft[i][j].append(p)
        soft[j][i].append(1 - p)

    def hard(p: float) -> float:
        return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0

    mean = [[sum(c) / len(c) if c else None for c in row] for row in soft]
    hard_mean = [[sum(map(hard, c)) / len(c) if c else None for c in row] for row in soft]
    return mean, hard_mean


def elo_table(results: dict, pm_scores: bool = False) -> str:
    """The Elo table of an evaluation (``cai eval``'s ``eval.json``), the one that ``cai eval`` and ``cai report`` show.

    Args:
        results: ``{"labels": [...], "sets": {name: {"axis", "elo", "elo_std", "pm_scores"}}}``.
        pm_scores: Put the preference model's mean ± std score per prompt set in front of the Elo columns (``-``
            where no preference model scored the responses).

    Returns:
        Markdown: one row per model, its Elo per axis ± bootstrap std (rounded), then a line naming the anchor.
    """
    sets, labels = results["sets"], results["labels"]
    head = ["model"] + ([f"PM score ({n})" for n in sets] if pm_scores else [])
    head += [f"Elo {s['axis']}" for s in sets.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in labels:
        cells = [m]
        if pm_scores:
            cells += [
                f"{s['pm_scores'][m]['mean']:.3f} ± {s['pm_scores'][m]['std']:.3f}" if s.get("pm_scores") else "-"
                for s in sets.values()
            ]
        cells += [f"{round(s['elo'][m])} ± {round(s['elo_std'][m])}" for s in sets.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nElo relative to {labels[0]} (0); +200 Elo is a 76% win rate."


def head_to_head(results: dict, a: str, b: str) -> list[str]:
    """Model ``a`` against model ``b`` in an evaluation (``eval.json``), one Markdown list item per prompt set.

    Each gives the soft and hard win rate of ``a`` over ``b``, their Elo difference and, when the preference model
    scored the answers, both models' mean PM scores.
    """

    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = []
    for name, s in results["sets"].items():
        elo = round(s["elo"][a] - s["elo"][b])  # an int: no "-0"
        pm = s.get("pm_scores")
        scores = f", PM score {num(pm[a]['mean'], 3)} vs {num(pm[b]['mean'], 3)}" if pm else ""
        lines.append(
            f"- {s['axis']} ({name}): P({a}'s answer better than {b}'s) {num(s['win_rate'][a][b], 2)} "
            f"(hard {num(s['hard_win_rate'][a][b], 2)}), Elo difference {elo:+d}{scores}."
        )
    return lines
