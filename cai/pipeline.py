"""The whole method as one command: ``cai pipeline --config configs/pipeline/tiny.yaml``.

Stages run in order, each writing into one run directory. A stage whose finished output is already there is skipped,
so an interrupted pipeline resumes by running the same command again (and a stage that was cut off mid-way resumes
on its own: ``sl-data`` continues its JSONL file).

Stages so far: the base model (a tiny random model when none is given), SL-CAI critique-revision data, and SFT.
The RL-CAI stages (AI preference labels, preference model, PPO) and the evaluation join here as they land.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import yaml

from models.tiny import TinyModelConfig, make_tiny_model


def _stage(name: str, done: bool, log: list) -> bool:
    state = "skipped (already done)" if done else "running"
    print(f"\n=== pipeline: {name}: {state}", flush=True)
    log.append({"stage": name, "skipped": done, "time": time.time()})
    return not done


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_sft(config: dict, run_dir: Path, model: str, train: Path) -> Path:
    """Run ``cai sft fit`` with ``config`` and the pipeline's paths; returns the Hugging Face output folder."""
    from cai.sft import cli_main

    sft_dir = run_dir / "sft"
    fixed = {
        "trainer": {
            "default_root_dir": str(sft_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(sft_dir), "name": "tb", "version": 0},
            },
        },
        "model": {"model": {"name_or_path": model}, "hf_out": str(sft_dir / "hf")},
        "data": {"train": str(train)},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(_deep_merge(config, fixed), f)
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (the pipeline's own) is not what it parses
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli_main(["fit", "--config", f.name])
    return sft_dir / "hf"


def run(
    run_dir: str = "runs/demo",
    base_model: str | None = None,
    tiny: TinyModelConfig | None = None,
    sl_data: dict | None = None,
    sft: dict | None = None,
) -> Path:
    """Run every stage that is not done yet and print where the outputs are.

    Args:
        run_dir: Folder that receives every stage's output.
        base_model: The model to align (directory or hub id); None builds a tiny random model (offline demo).
        tiny: Tiny model settings, used when ``base_model`` is None.
        sl_data: Arguments of ``cai sl-data`` (as in configs/sl_data/*.yaml); ``out`` and the model path are set here.
        sft: A LightningCLI config of ``cai sft fit`` (as in configs/sft/*.yaml); paths are set here.
    """
    from cai import sl_data as sl_stage

    cfg = SimpleNamespace(
        run_dir=run_dir, base_model=base_model, tiny=tiny or TinyModelConfig(), sl_data=sl_data or {}, sft=sft or {}
    )
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = {**vars(cfg), "tiny": asdict(cfg.tiny)}
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    log: list[dict] = []
    start = time.time()

    base = cfg.base_model
    if base is None:
        base = str(run_dir / "base_model")
        if _stage("base model (tiny, random)", (Path(base) / "config.json").exists(), log):
            make_tiny_model(base, cfg.tiny)

    sl_dir = run_dir / "sl_data"
    if _stage("SL-CAI critique-revision data", (sl_dir / "summary.json").exists(), log):
        args = {**cfg.sl_data, "out": str(sl_dir)}
        args["model"] = {**args.get("model", {}), "name_or_path": base}
        from jsonargparse import CLI

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(args, f)
        CLI(sl_stage.run, args=["--config", f.name], prog="cai sl-data")

    sft_hf = run_dir / "sft" / "hf"
    if _stage("SFT (the SL-CAI model)", (sft_hf / "model.safetensors").exists(), log):
        run_sft(cfg.sft, run_dir, base, sl_dir / "sft")

    summary = {
        "run_dir": str(run_dir),
        "base_model": base,
        "sl_data": str(sl_dir / "records.jsonl"),
        "sl_cai_model": str(sft_hf),
        "stages": log,
        "seconds": round(time.time() - start, 1),
    }
    (run_dir / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n=== pipeline done in {summary['seconds']}s. Outputs in {run_dir}/:")
    print(f"  base model         {base}")
    print(f"  SL-CAI data        {sl_dir / 'records.jsonl'}  (datasets split: {sl_dir / 'sft'})")
    print(f"  SL-CAI model (HF)  {sft_hf}")
    print(f"  SFT curves         tensorboard --logdir {run_dir / 'sft'}")
    return run_dir
