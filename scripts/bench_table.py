"""The table of ``scripts/bench_vs_trl.py``: its stages, and the Markdown table of medians, ratios and parity."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Stage:
    """One row group of the table: a stage measured in both systems."""

    name: str
    """Key used by ``--stages`` and worker names (``{name}-cai``, ``{name}-trl``)."""
    label: str
    """Name in the table."""
    metric: str
    """Throughput unit shown in the table."""
    per_second: str
    """How a worker result becomes the throughput: ``tokens``, ``pairs`` (rows / 2) or ``episodes`` (rows)."""
    goal: float
    """Speed-up over TRL the issue asks for (with no more peak memory)."""
    pending: str | None = None
    """Why the stage is not measured yet (None when it is)."""
    same_trl_as: str | None = None
    """A stage whose TRL runs are this stage's too (TRL has one PPO layout): measured once when both run."""
    same_cai_as: str | None = None
    """A stage whose runs of this project are this stage's too (one DPO against two TRL settings)."""


STAGES = [
    Stage("sft", "SFT", "tokens/s", "tokens", 1.3),
    Stage("rm", "reward model (hard labels)", "pairs/s", "pairs", 1.3),
    Stage("dpo", "DPO (hard labels) vs TRL defaults", "pairs/s", "pairs", 1.5),
    Stage("dpo_precompute", "DPO vs TRL precompute_ref_log_probs", "pairs/s", "pairs", 1.5, same_cai_as="dpo"),
    Stage("ppo", "PPO", "episodes/s", "episodes", 2.0),
    Stage("ppo_critic", "PPO, separate critic", "episodes/s", "episodes", 2.0, same_trl_as="ppo"),
]


def throughput(stage: Stage, result: dict) -> float:
    """Throughput of one worker result in the stage's unit."""
    per = {"tokens": result["tokens"], "pairs": result["rows"] / 2, "episodes": result["rows"]}[stage.per_second]
    return per / result["seconds"]


def fmt_num(x: float) -> str:
    """A throughput for the table: 3 significant figures, thousands separated."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_mem(n: float) -> str:
    """Bytes as MiB or GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def parity_cell(p: dict | None) -> str:
    """The table's parity cell of one stage."""
    if p is None:
        return "not checked"
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in p["diffs"].items())
    if not p["equal"]:
        what = f"inputs: {p['inputs']}" if p["inputs"] != "identical" else f"max abs diff {diffs}"
        return f"**differs** ({what})"
    text = f"equal ({p.get('what', 'identical token ids')}; max abs diff: {diffs})"
    return f"{text}; {p['note']}" if p.get("note") else text


def run_list(stage: Stage, runs: list[dict]) -> str:
    """Single-run throughputs, in run order; a run spoiled by other load (kept after all retries) gets a star."""
    return ", ".join(fmt_num(throughput(stage, r)) + ("*" if r.get("busy") else "") for r in runs)


def at_start(runs: list[dict]) -> float:
    """Median memory held when training starts (imports, model, data)."""
    return statistics.median(r["mem_at_train_start_bytes"] for r in runs)


def build_table(stages: list[Stage], results: dict, parity: dict, spec: dict) -> tuple[str, list[str]]:
    """The Markdown table, and one line per stage with the single runs."""
    head = "| stage | metric | this project | TRL | ratio | peak mem cai | peak mem TRL | mem ratio | goal | parity |"
    rows, runs = [head, "|" + "---|" * 10], []
    for stage in stages:
        if stage.pending:
            rows.append(f"| {stage.label} | {stage.metric} | pending | pending | | | | | "
                        f"{stage.goal:g}x, mem <= 1x: pending | {stage.pending} |")  # fmt: skip
            continue
        cai, trl = results[stage.name]["cai"], results[stage.name]["trl"]
        speed_c = statistics.median(throughput(stage, r) for r in cai)
        speed_t = statistics.median(throughput(stage, r) for r in trl)
        mem_c = statistics.median(r["peak_mem_bytes"] for r in cai)
        mem_t = statistics.median(r["peak_mem_bytes"] for r in trl)
        ratio, mem_ratio = speed_c / speed_t, mem_c / mem_t
        met = [f"speed {'met' if ratio >= stage.goal else 'missed'}", f"memory {'met' if mem_ratio <= 1 else 'missed'}"]
        rows.append(
            f"| {stage.label} | {stage.metric} | {fmt_num(speed_c)} | {fmt_num(speed_t)} | **{ratio:.2f}x** | "
            f"{fmt_mem(mem_c)} | {fmt_mem(mem_t)} | {mem_ratio:.2f}x | >= {stage.goal:g}x: {', '.join(met)} | "
            f"{parity_cell(parity.get(stage.name))} |"
        )
        if stage.name == "sft" and spec.get("peak_tflops"):
            peak = spec["peak_tflops"] * 1e12
            mfu_c = 6 * cai[0]["n_params"] * speed_c / peak
            mfu_t = 6 * trl[0]["n_params"] * speed_t / peak
            rows.append(
                f"| SFT | MFU (6N x tokens/s / {spec['peak_tflops']:g} TFLOPS) | {mfu_c:.1%} | {mfu_t:.1%} | "
                f"{mfu_c / mfu_t:.2f}x | | | | | |"
            )
        runs.append(
            f"{stage.label} {stage.metric}: this project {run_list(stage, cai)}; TRL {run_list(stage, trl)}; "
            f"{cai[0]['mem_kind']}: this project {', '.join(fmt_mem(r['peak_mem_bytes']) for r in cai)}; "
            f"TRL {', '.join(fmt_mem(r['peak_mem_bytes']) for r in trl)}"
            + (
                f"; memory held when training starts (imports, model, data): this project {fmt_mem(at_start(cai))}, "
                f"TRL {fmt_mem(at_start(trl))} (medians)"
                if all(r.get("mem_at_train_start_bytes") for r in cai + trl)
                else ""
            )
        )
    return "\n".join(rows), runs
