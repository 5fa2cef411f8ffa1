"""The GPU check: what no CPU can show, in one short run that writes one Markdown file.

Sections (each writes its part of the file as soon as it ends, so a run cut short keeps what it measured; each has
its own time limit, ``TIMEOUTS``):

* ``pipeline``: ``configs/pipeline/qwen2.5-0.5b_1gpu.yaml`` shortened to a few steps per stage, with both RL stages
  (``rl: both``: PPO and DPO), on the random weights and the built-in prompts (no hub), end to end;
* ``bench``: ``bench_vs_trl.py --preset 0.5b`` (one repeat, shortened): SFT, reward model and PPO against TRL on a
  random Qwen2.5-0.5B-shaped model in bf16, with SFT's model FLOPs utilisation;
* ``variants``: the same bench for SFT and the reward model with the settings the first GPU run questioned: SFT's
  loss without chunks (``loss_chunk_size: null``) and the reward model with the shared prompt forced on;
* ``ppo``: ``cai ppo fit`` under FSDP2 (``ModelParallelStrategy``) in ``bf16-true`` on the same model against a
  preference model started from it: seconds per rollout, peak memory, and the first rollout's KL (0 exactly: the
  policy starts as the reference, so anything else is a numerics or sharding bug);
* ``attention``: forward and backward of that model with ``sdpa``, ``eager`` and ``flash_attention_2`` (when
  ``flash-attn`` is installed; it is source-only and needs CUDA): tokens per second, peak memory and the largest
  logit difference from ``sdpa``.

The device allows 10 minutes per call and 15 per session, so the GPU run is two calls (docs/BENCHMARKS.md, "Running
the GPU check"): ``--sections bench,pipeline`` then ``--sections variants,ppo,attention``.

``--cpu-smoke`` runs the same code at tiny sizes on the CPU (CI runs it, so the script cannot rot unseen).

    scripts/gpu_check.sh --out gpu_check.md
    scripts/gpu_check.sh --cpu-smoke --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_lib and bench_presets beside this file
from gpu_check_sizes import CPU_SMOKE, GPU, Sizes  # noqa: E402

SECTIONS = ("pipeline", "bench", "variants", "ppo", "attention")
TIMEOUTS = {"pipeline": 300, "bench": 300, "variants": 200, "ppo": 150, "attention": 90}
"""Seconds allowed to each section's run on a GPU. Measured on an H200 (2026-11-30): pipeline reached its PM stage in
107 s; the bench's set-up, SFT and reward model took 26 + 58 + 75 s at 20 timed steps (now 10); ``ppo`` 58 s;
``attention`` 12 s."""


class Report:
    """The Markdown file, rewritten after every section."""

    def __init__(self, path: Path, sizes: Sizes):
        self.path, self.parts = path, [f"# GPU check: {sizes.name}\n", environment()]

    def add(self, title: str, body: str) -> None:
        self.parts.append(f"## {title}\n\n{body.strip()}\n")
        self.path.write_text("\n".join(self.parts))
        print(f"gpu_check: {title} done -> {self.path}", flush=True)


def environment() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = []
    for pkg in ("torch", "lightning", "transformers", "trl", "flash_attn"):
        spec = importlib.util.find_spec(pkg)
        versions.append(f"{pkg} {_version(pkg) if spec else 'missing'}")
    cpu = platform.processor() or platform.machine()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"- date: {date}\n- GPU: {gpu}; CPU: {cpu}, {os.cpu_count()} cores\n- {', '.join(versions)}\n"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return "?"


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    """Run ``cmd`` in the repository with its output in ``log``; (exit status, seconds). 124 on timeout."""
    t = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def failed(what: str, rc: int, log: Path, partial: Path | None = None) -> str:
    """The failure, the last lines of the log, and what the run wrote before it stopped (``partial``, if it exists)."""
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    limit = "; 124: the section's time limit" if rc == 124 else ""
    text = f"**{what} failed** (exit status {rc}{limit}). Last lines of its log:\n\n```\n{tail}\n```\n"
    if partial is not None and partial.exists():
        text += f"\nWhat it wrote before it stopped:\n\n{partial.read_text()}\n"
    return text


def random_model(work: Path, sizes: Sizes) -> Path:
    """The random model of the run's shape with the tiny offline tokenizer (built once per run)."""
    from bench_lib import build_model

    out = work / "model"
    if not (out / "config.json").exists():
        build_model(out, sizes.arch, sizes.overrides, sizes.vocab_size)
    return out


def section_bench(work: Path, sizes: Sizes, timeout: int) -> str:
    out, log = work / "bench.md", work / "bench.log"
    rc, secs = run([sys.executable, "scripts/bench_vs_trl.py", *sizes.bench_args, "--out", str(out)], log, timeout)
    if rc or not out.exists():
        return failed("bench_vs_trl.py", rc, log, out)
    return f"`bench_vs_trl.py {' '.join(sizes.bench_args)}` ({secs:.0f} s)\n\n{out.read_text()}"


VARIANT_ARGS = ["--stages", "sft,rm", "--loss_chunk_size", "0", "--share_prompt", "on"]


def section_variants(work: Path, sizes: Sizes, timeout: int) -> str:
    """SFT without loss chunks and the reward model with the shared prompt: compare with ``bench``'s rows."""
    out, log = work / "variants.md", work / "variants.log"
    args = [*sizes.bench_args, *VARIANT_ARGS, "--out", str(out)]
    rc, secs = run([sys.executable, "scripts/bench_vs_trl.py", *args], log, timeout)
    if rc or not out.exists():
        return failed("bench_vs_trl.py (variants)", rc, log, out)
    return (
        f"`bench_vs_trl.py {' '.join(args[:-2])}` ({secs:.0f} s). Against the `bench` section's rows: SFT's loss "
        "without chunks (more memory, no second head pass) and the reward model with each pair's prompt run once "
        f"(the GPU default is off).\n\n{out.read_text()}"
    )


def _yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of the TensorBoard logs under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[float]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return series


def section_ppo(work: Path, sizes: Sizes, timeout: int) -> str:
    import yaml
    from bench_lib import build_preference_model

    model = random_model(work, sizes)
    pm = work / "pm"
    if not (pm / "config.json").exists():
        build_preference_model(model, pm)
    cfg = yaml.safe_load((REPO / "configs/ppo/tiny.yaml").read_text())
    strategy = yaml.safe_load((REPO / sizes.ppo_strategy).read_text())["trainer"]
    run_dir = work / "ppo"
    cfg["trainer"].update(strategy, precision="bf16-true", default_root_dir=str(run_dir), enable_checkpointing=False)
    cfg["trainer"]["callbacks"] = []
    if sizes.accelerator == "gpu":  # peak memory in the logs (allocated bytes, per device)
        cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.DeviceStatsMonitor"})
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    ppo = dict(sizes.ppo)
    cfg["data"]["batch_size"] = ppo.pop("batch_size")
    cfg["model"]["ppo"].update(ppo)
    cfg["model"]["model"]["name_or_path"] = str(model)
    cfg["model"]["preference_model"]["name_or_path"] = str(pm)
    cfg["model"]["hf_out"] = None
    cfg["model"]["optim"]["lr"] = sizes.ppo_lr
    config = _yaml(work / "ppo.yaml", cfg)
    log = work / "ppo.log"
    rc, secs = run([sys.executable, "-m", "cai", "ppo", "fit", "--config", str(config)], log, timeout)
    if rc:
        return failed("cai ppo fit (FSDP2, bf16-true)", rc, log)
    s = scalars(run_dir)
    kl = s.get("objective/kl", [float("nan")])
    peak = max((max(v) for k, v in s.items() if "allocated_bytes.all.peak" in k), default=None)
    rows = [
        "| figure | value |",
        "|---|---|",
        f"| strategy, precision | `{sizes.ppo_strategy}`, bf16-true |",
        f"| rollouts x prompts x new tokens | {sizes.ppo['total_rollouts']} x {sizes.ppo['batch_size']} x "
        f"{sizes.ppo['max_new_tokens']} |",
        f"| learning rate | {sizes.ppo_lr:g} |",
        f"| wall time (process start to end) | {secs:.1f} s |",
        f"| first rollout KL (must be 0) | {kl[0]:.3g} |",
        f"| last rollout KL | {kl[-1]:.3g} |",
        f"| scores (first, last) | {_first_last(s.get('objective/scores'))} |",
        f"| policy/clipfrac (last) | {_first_last(s.get('policy/clipfrac'), last_only=True)} |",
        f"| peak allocated memory | {f'{peak / 2**30:.1f} GiB' if peak else 'n/a (CPU)'} |",
    ]
    verdict = "" if kl[0] == 0 else "\n**The first rollout's KL is not 0: the policy and reference disagree.**\n"
    return "\n".join(rows) + "\n" + verdict


def _first_last(values: list[float] | None, last_only: bool = False) -> str:
    if not values:
        return "n/a"
    return f"{values[-1]:.3g}" if last_only else f"{values[0]:.3g}, {values[-1]:.3g}"


def section_attention(work: Path, sizes: Sizes, timeout: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = random_model(work, sizes)
    cuda = sizes.accelerator == "gpu"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch, seq = sizes.attention["batch"], sizes.attention["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (batch, seq), generator=g).to(device)  # inside the tiny tokenizer's ids
    kinds = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and cuda else [])
    rows = ["| attention | tokens/s (fwd+bwd) | peak memory | max abs logit diff vs sdpa |", "|---|---|---|---|"]
    reference = None
    for kind in kinds:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=kind).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step(model=model):
            out = model(input_ids=ids).logits
            out.float().pow(2).mean().backward()
            return out

        for _ in range(2):  # warm-up: kernels chosen, memory pools grown
            step()
        n, t = 5, time.perf_counter()
        for _ in range(n):
            logits = step()
        if cuda:
            torch.cuda.synchronize()
        secs = (time.perf_counter() - t) / n
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (CPU)"
        logits = logits.detach().float().cpu()
        reference = logits if reference is None else reference
        diff = (logits - reference).abs().max().item()
        rows.append(f"| {kind} | {batch * seq / secs:,.0f} | {peak} | {diff:.3g} |")
        del model, logits
        if cuda:
            torch.cuda.empty_cache()
    note = "" if "flash_attention_2" in kinds else "\nflash-attn is not installed here (source-only, CUDA-only).\n"
    return f"{batch} x {seq} tokens, {dtype}, {device}.\n\n" + "\n".join(rows) + "\n" + note


def shortened_pipeline(work: Path, sizes: Sizes, model: Path) -> dict:
    """``configs/pipeline/qwen2.5-0.5b_1gpu.yaml`` with a few steps per stage, built-in prompts and ``model``."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/pipeline/qwen2.5-0.5b_1gpu.yaml").read_text())
    p = sizes.pipeline
    cfg.update(run_dir=str(work / "pipeline"), base_model=str(model), hhh_evals=None, hhh_max_examples=p["prompts"])
    builtin = dict(red_team="red_team", helpful="helpful", max_prompts=p["prompts"], hold_out_last=p["prompts"])
    sl = cfg["sl_data"]
    sl["prompts"] = builtin
    sl["critique"].update(rounds=1, num_few_shot=1, keep_unfinished=True)  # random weights never end a text
    sl["sampling"].update(max_new_tokens=p["new_tokens"], batch_size=p["batch_size"])
    sl["chunk_size"] = p["prompts"]
    label = cfg["label"]
    label["prompts"] = dict(builtin, helpful=None)
    label["sampling"].update(max_new_tokens=p["new_tokens"], batch_size=p["batch_size"])
    label["feedback"].update(num_few_shot=1, batch_size=p["batch_size"])
    label["chunk_size"] = p["prompts"]
    cfg["rl"] = "both"  # PPO and DPO: every stage of the recipe
    for stage in ("sft", "pm", "ppo", "dpo"):
        trainer = cfg[stage]["trainer"]
        trainer["accelerator"] = sizes.accelerator
        trainer.pop("val_check_interval", None)
        trainer.pop("check_val_every_n_epoch", None)
        if stage != "ppo":
            trainer["max_steps"] = p["steps"]
        cfg[stage]["data"].update(batch_size=p["batch_size"])
    cfg["sft"]["data"]["max_length"] = cfg["pm"]["data"]["max_length"] = cfg["dpo"]["data"]["max_length"] = 256
    cfg["dpo"]["data"]["max_prompt_length"] = 128
    cfg["ppo"]["model"]["ppo"].update(total_rollouts=2, max_new_tokens=p["new_tokens"], ppo_epochs=1, num_minibatches=1)
    cfg["ppo"]["data"] = dict(prompts="red_team", batch_size=p["batch_size"], max_prompt_tokens=128)
    cfg["evaluate"] = dict(num_prompts=p["prompts"], batch_size=p["batch_size"])
    return cfg


def section_pipeline(work: Path, sizes: Sizes, timeout: int) -> str:
    model = random_model(work, sizes)
    config = _yaml(work / "pipeline.yaml", shortened_pipeline(work, sizes, model))
    log = work / "pipeline.log"
    rc, secs = run([sys.executable, "-m", "cai", "pipeline", "--config", str(config)], log, timeout)
    if rc:
        return failed("cai pipeline (shortened qwen2.5-0.5b_1gpu.yaml)", rc, log)
    run_dir = work / "pipeline"
    made = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    evaluation = run_dir / "eval" / "eval.json"
    elo = json.loads(evaluation.read_text()).get("elo") if evaluation.exists() else None
    return (
        f"`configs/pipeline/qwen2.5-0.5b_1gpu.yaml` shortened ({sizes.pipeline}), random weights: every stage ran "
        f"in {secs:.0f} s.\n\n- stage folders: {', '.join(made)}\n- Elo (meaningless on random weights, shows the "
        f"evaluation ran): {json.dumps(elo)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--out", default="gpu_check.md", help="the Markdown file of results")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--timeout", type=int, help="seconds allowed to every section's run (default: TIMEOUTS)")
    ap.add_argument("--work", help="folder for models and runs (default: a temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        ap.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --cpu-smoke on a CPU")
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    report = Report(Path(args.out).resolve(), sizes)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in sections:
            t = time.perf_counter()
            try:
                timeout = args.timeout or (TIMEOUTS[name] if not args.cpu_smoke else 600)
                body = globals()[f"section_{name}"](work, sizes, timeout)
            except Exception as err:  # one section's failure must not lose the others' figures
                body = f"**failed**: {type(err).__name__}: {err}"
            report.add(f"{name} ({time.perf_counter() - t:.0f} s)", body)
    failures = sum("failed" in part for part in report.parts)
    print(f"gpu_check: wrote {report.path}; {failures} section(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
