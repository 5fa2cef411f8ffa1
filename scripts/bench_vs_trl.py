"""This project's training stages against TRL 1.12.0, side by side: throughput, peak memory and loss parity.

For each stage both systems train the same model on the same data (identical token ids) with the same batch size,
sequence length, optimizer settings (AdamW, constant learning rate, betas 0.9/0.999, no weight decay, gradient
clipping at 1.0), precision, attention kernel and number of CPU threads:

* SFT: ``cai.stages.sft.SFTModule`` + ``data.sft.SFTDataModule`` on a ``lightning.Trainer`` against ``trl.SFTTrainer``
  (prompt/completion data, loss on completions only, TRL's default ``loss_type``);
* rm: ``cai.stages.pm.PreferenceModule`` with hard labels against ``trl.RewardTrainer``;
* PPO: ``cai.stages.ppo.PPOModule`` + ``data.prompt_data.PromptDataModule`` against ``trl.experimental.ppo.PPOTrainer``
  on the built-in red_team prompts, with a tiny preference model (started from the policy) as reward model (and as
  TRL's value model); throughput in episodes (responses) per second over whole rollouts. Per-token rewards,
  advantages, returns and losses are checked against TRL's ``PPOTrainer.train`` math (``trl_ppo_reference.py``) on
  identical random rollouts of the run's shape.

Every measured run is a fresh process, so that its peak memory belongs to one system. Runs of the two systems are
interleaved, the order flipping every repeat (cai-trl, trl-cai, cai-trl, ...), and each figure is the median of
``--repeats`` runs. A run during which other processes took the CPU the run left free is run again (``/proc/stat``).
Logging, checkpointing, evaluation and progress bars are off in both systems (each still does the per-step
bookkeeping it cannot switch off: ``self.log`` calls in this project's modules, TRL's per-step metrics). A parity
check (float32, one batch of the same rows) compares the two systems' losses in the same invocation.

Adding a stage: a ``Stage`` in ``STAGES``, workers ``{name}-cai`` (``bench_cai.py``) and ``{name}-trl``
(``bench_trl.py``) registered in ``bench_lib.workers`` that return ``WindowTimer.result()``, and a parity function
in ``bench_parity.PARITY``.

    python scripts/bench_vs_trl.py --preset tiny --out bench_vs_trl.md
    python scripts/bench_vs_trl.py --preset small         # compute-bound CPU model (3.2M parameters)
    python scripts/bench_vs_trl.py --preset 0.5b          # on a GPU: adds model FLOPs utilisation for SFT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lib beside this file
import bench_lib  # noqa: E402

# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, tied embeddings, 151936
# embedding rows), random weights. The tokenizer is still the tiny offline one (512 ids); the embedding and LM head
# are sized like the real model's so that the compute matches a 0.5B model (0.49B parameters).
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

PRESETS = {
    # CPU: the tiny offline llama (0.1M parameters, 512-token vocabulary). Small enough for CI; even so, most of a
    # step is the model's own kernels, which are the same in both systems.
    "tiny": dict(arch="llama", overrides={}, vocab_size=None, seq_len=128, batch_size=8, steps=100, warmup=10,
                 lr=1e-4, n_rows=256, bf16=False,
                 ppo=dict(batch_size=8, new_tokens=16, epochs=2, minibatches=2, warmup=2, steps=6, lr=1e-4)),
    # CPU, compute-bound: a wider and deeper llama (3.2M parameters) whose step is large matrix products rather than
    # per-operation overhead, as in real models; same tiny tokenizer.
    "small": dict(arch="llama", overrides=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=2),
                  vocab_size=None, seq_len=256, batch_size=4, steps=20, warmup=3, lr=1e-4, n_rows=128, bf16=False,
                  ppo=dict(batch_size=8, new_tokens=32, epochs=2, minibatches=2, warmup=1, steps=4, lr=1e-5)),
    # GPU: random Qwen2 0.5B in bf16 mixed precision.
    "0.5b": dict(arch="qwen2", overrides=QWEN2_05B, vocab_size=151936, seq_len=512, batch_size=8, steps=20, warmup=5,
                 lr=1e-5, n_rows=256, bf16=True,
                 ppo=dict(batch_size=16, new_tokens=64, epochs=2, minibatches=2, warmup=2, steps=6, lr=1e-6)),
}  # fmt: skip


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


STAGES = [
    Stage("sft", "SFT", "tokens/s", "tokens", 1.3),
    Stage("rm", "reward model (hard labels)", "pairs/s", "pairs", 1.3),
    Stage(
        "ppo",
        "PPO",
        "episodes/s",
        "episodes",
        2.0,
    ),
]


def throughput(stage: Stage, result: dict) -> float:
    """Throughput of one worker result in the stage's unit."""
    per = {"tokens": result["tokens"], "pairs": result["rows"] / 2, "episodes": result["rows"]}[stage.per_second]
    return per / result["seconds"]


def machine(device: str, cores: int) -> str:
    """The accelerator, or the CPU model and core count."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} ({cores} cores)"


def versions() -> str:
    """Versions of the packages that decide the figures."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "lightning", "trl", "accelerate"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} missing")
    return ", ".join(out)


def worker_env() -> dict[str, str]:
    """Environment of the worker processes: offline, no distributed leftovers, quiet TRL."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK")}
    env.pop("WORLD_SIZE", None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return env


def run_worker(name: str, spec_path: Path, log: Path) -> dict:
    """Run one worker in a fresh process; its output goes to ``log`` and its result line is returned."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_spec", str(spec_path)]
    t = time.perf_counter()
    env = {**worker_env(), "HF_DATASETS_CACHE": str(spec_path.parent / "hf_datasets")}  # removed with the work dir
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(bench_lib.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}); log in {log}:\n{tail}")
    result = json.loads(lines[-1][len(bench_lib.RESULT_PREFIX) :])
    result["wall_s"] = time.perf_counter() - t
    return result


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny (CPU, CI), small (CPU, compute-bound) or 0.5b (GPU, random Qwen2 0.5B)",
    )
    ap.add_argument("--stages", default="sft,rm,ppo", help="comma-separated subset of: sft, rm, ppo")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per system and stage (median reported)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per run (preset default)")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps before the timed ones (preset default)")
    ap.add_argument("--batch_size", type=int, help="sequences (SFT) or pairs (rm) per step (preset default)")
    ap.add_argument("--seq_len", type=int, help="tokens per sequence (preset default)")
    ap.add_argument("--n_rows", type=int, help="rows of each synthetic data set (preset default)")
    ap.add_argument("--ppo_steps", type=int, help="PPO: timed rollouts per run (preset default)")
    ap.add_argument("--ppo_warmup", type=int, help="PPO: untimed rollouts before the timed ones (preset default)")
    ap.add_argument("--ppo_batch_size", type=int, help="PPO: prompts per rollout (preset default)")
    ap.add_argument("--ppo_new_tokens", type=int, help="PPO: response length (preset default)")
    ap.add_argument(
        "--ppo_critic",
        action="store_true",
        help="PPO: this project with a separate critic started from the preference model (TRL's layout) instead of "
        "its default value head on the policy",
    )
    ap.add_argument(
        "--no_share_prompt",
        action="store_true",
        help="reward model: this project runs both whole texts of a pair (share_prompt=False), for the ablation",
    )
    ap.add_argument("--layers", type=int, help="decoder layers of the model (preset default), e.g. to fit a device")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of every run; default 1 on CPU (a shared 2-core machine then leaves each run a "
        "core of its own), torch's default on a GPU; 0 for torch's default",
    )
    ap.add_argument(
        "--max_other_load",
        type=float,
        help="a run during which other processes used more CPU cores than this (Linux /proc/stat) is run again; "
        "default: the cores the run leaves free, plus 0.25",
    )
    ap.add_argument("--retries", type=int, default=3, help="re-runs of a run spoiled by other load")
    ap.add_argument("--retry_wait", type=float, default=10.0, help="seconds to wait before such a re-run")
    ap.add_argument("--attn", default="sdpa", help="attention implementation of both systems")
    ap.add_argument(
        "--peak_tflops",
        type=float,
        help="peak of the device for the SFT model FLOPs utilisation row; default 989 (H100 bf16 dense) on a GPU, "
        "no MFU row on a CPU unless given",
    )
    ap.add_argument("--out", help="also write the Markdown table (and the single runs) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (model, data, worker logs)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        bench_lib.worker_main(args._worker, args._spec)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(names) - {s.name for s in STAGES}
    if unknown:
        sys.exit(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from sft, rm, ppo")
    stages = [s for s in STAGES if s.name in names]
    preset = dict(PRESETS[args.preset])
    if args.layers is not None:
        preset["overrides"] = {**preset["overrides"], "num_hidden_layers": args.layers}
    for key in ("steps", "warmup", "batch_size", "seq_len", "n_rows"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    ppo = dict(preset["ppo"], clip=0.2, vf_coef=0.1, kl_coef=0.05, critic=args.ppo_critic)
    for key in ("steps", "warmup", "batch_size", "new_tokens"):
        if getattr(args, f"ppo_{key}") is not None:
            ppo[key] = getattr(args, f"ppo_{key}")
    if ppo["batch_size"] % ppo["minibatches"]:
        sys.exit(f"--ppo_batch_size must be a multiple of {ppo['minibatches']} (minibatches)")
    if min(preset["steps"], preset["warmup"], ppo["steps"], ppo["warmup"], args.repeats) < 1:
        sys.exit("--steps, --warmup, --ppo_steps, --ppo_warmup and --repeats must be at least 1")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    cores = os.cpu_count() or 1
    used = threads or torch.get_num_threads()
    max_other = args.max_other_load if args.max_other_load is not None else max(0.0, cores - used) + 0.25
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    try:
        t0 = time.perf_counter()
        model = bench_lib.build_model(tmp / "model", preset["arch"], preset["overrides"], preset["vocab_size"])
        n_params = bench_lib.count_parameters(model)
        data = bench_lib.write_data(model, tmp / "data", preset["n_rows"], preset["seq_len"])
        pm = bench_lib.build_preference_model(model, tmp / "pm") if "ppo" in names else None
        spec = {
            **{k: preset[k] for k in ("seq_len", "batch_size", "steps", "warmup", "lr")},
            "model": str(model),
            "data": data,
            "pm": str(pm) if pm else None,
            "ppo": ppo,
            "tmp": str(tmp / "work"),
            "device": device,
            "bf16": preset["bf16"] and device == "cuda",
            "attn": args.attn,
            "max_grad_norm": 1.0,
            "seed": 0,
            "peak_tflops": args.peak_tflops if args.peak_tflops is not None else (989.0 if device == "cuda" else None),
            "threads": threads,
            "parity_stages": [s.name for s in stages if not s.pending],
            "share_prompt": not args.no_share_prompt,
            "parity_tol": 1e-5 if device == "cpu" else 1e-4,
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        header = (
            f"preset {args.preset}: {machine(device, cores)}, torch threads {used}; {versions()}; "
            f"random {preset['arch']} of {n_params / 1e6:,.1f}M parameters, seq_len {spec['seq_len']}, "
            f"batch {spec['batch_size']}, "
            f"{'bf16-mixed' if spec['bf16'] else 'fp32'}, {spec['warmup']} warm-up + {spec['steps']} timed steps, "
            f"{args.repeats} runs per system"
        )
        if "ppo" in names:
            header += (
                f"; PPO: {ppo['batch_size']} prompts per rollout, {ppo['new_tokens']} new tokens, {ppo['epochs']} "
                f"epochs x {ppo['minibatches']} minibatches, {ppo['warmup']} warm-up + {ppo['steps']} timed rollouts, "
                f"lr {ppo['lr']:g}, this project with "
                + ("a separate critic from the PM" if ppo["critic"] else "a value head on the policy")
            )
        if "rm" in names and args.no_share_prompt:
            header += "; reward model: this project without the shared prompt (share_prompt=False)"
        print(f"{header}; set-up {time.perf_counter() - t0:.1f}s; work dir {tmp}", flush=True)
        results: dict = {}
        discarded = 0
        for stage in stages:
            if stage.pending:
                continue
            results[stage.name] = {"cai": [], "trl": []}
            for r in range(args.repeats):
                for system in ("cai", "trl") if r % 2 == 0 else ("trl", "cai"):
                    name = f"{stage.name}-{system}"
                    for attempt in range(args.retries + 1):
                        res = run_worker(name, spec_path, tmp / f"{name}-{r}-{attempt}.log")
                        other = res.get("other_cpu_load")
                        busy = other is not None and other > max_other
                        print(
                            f"  {name} run {r + 1}: {fmt_num(throughput(stage, res))} {stage.metric}, "
                            f"peak {fmt_mem(res['peak_mem_bytes'])}, other processes "
                            f"{'?' if other is None else f'{other:.2f}'} cores ({res['wall_s']:.1f}s)"
                            + (" -> machine busy, run again" if busy and attempt < args.retries else ""),
                            flush=True,
                        )
                        if not busy:
                            break
                        res["busy"] = True
                        discarded += attempt < args.retries
                        time.sleep(args.retry_wait)
                    results[stage.name][system].append(res)
        parity = run_worker("parity", spec_path, tmp / "parity.log") if spec["parity_stages"] else {}
        parity.pop("wall_s", None)
        table, runs = build_table(stages, results, parity, spec)
        print()
        print(table)
        print()
        for name, p in parity.items():
            values = ", ".join(f"{k} {v:.6f}" for k, v in p["values"].items())
            runs.append(f"parity {name}: {values}; inputs {p['inputs']}")
        runs.append(f"runs repeated because other processes used more than {max_other:g} cores: {discarded}")
        print("single runs (in order; * = other load even after retries):\n" + "".join(f"- {r}\n" for r in runs))
        if args.out:
            single = "".join(f"- {r}\n" for r in runs)
            Path(args.out).write_text(f"{header}\n\n{table}\n\nSingle runs (in order):\n\n{single}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
