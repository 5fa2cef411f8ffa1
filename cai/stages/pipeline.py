"""The whole method as one command: ``cai pipeline --config configs/pipeline/tiny.yaml``.

Stages run in order, each writing into one run directory:

1. ``base_model``: a tiny random model when no ``base_model`` is given (the offline demo);
2. ``sl_data``: SL-CAI critique-revision data (``cai sl-data``);
3. ``sft``: the SL-CAI model (``cai sft fit``);
4. ``label``: response pairs of the SL-CAI model labelled by AI feedback (``cai label``);
5. ``eval_feedback``: the feedback model's accuracy and calibration on the paper's 438 HHH comparisons, when that
   file is given or found beside the checkout (``cai eval-feedback``);
6. ``pm``: the preference model on the soft labels (``cai pm fit``);
7. ``ppo``: the RL-CAI policy (``cai ppo fit``);
8. ``eval``: base vs SL-CAI vs RL-CAI (``cai eval``), then ``report.md``.

A stage whose finished output is already there is skipped, so an interrupted pipeline resumes by running the same
command again. A stage cut off mid-way continues too: generation stages continue their JSONL files, and training
stages restart from their last Lightning checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import yaml

from models import resolve_model_source
from models.gguf import import_model
from models.tiny import TinyModelConfig, make_tiny_model

HHH_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_file(data: dict) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    return f.name


def run_function_stage(fn, config: dict, prog: str):
    """Run a function-style stage through jsonargparse, so the pipeline's settings are validated like the CLI's."""
    from jsonargparse import CLI

    return CLI(fn, args=["--config", _yaml_file(config)], prog=prog)


def check_function_stage(fn, config: dict, prog: str, pending: frozenset[str] = frozenset()) -> None:
    """Parse and check a function stage's settings as ``run_function_stage`` would, without running it.

    Paths in ``pending`` are written by earlier stages, so they are not checked for existence.
    """
    import inspect

    from jsonargparse import ArgumentError, auto_parser

    from cai.cli import check_stage
    from models.errors import UserError

    parser = auto_parser(fn, prog=prog, exit_on_error=False)
    try:
        cfg = parser.instantiate(parser.parse_args(["--config", _yaml_file(config)]))
    except ArgumentError as err:
        raise UserError(" ".join(str(err).split())) from None
    kwargs = {k: cfg[k] for k in inspect.signature(fn).parameters if k in cfg}
    check_stage(prog.removeprefix("cai "), kwargs, pending)


def check_lightning_stage(module, datamodule, config: dict, prog: str) -> None:
    """Parse a training stage's config and build its model and data modules, without running anything.

    Cheap (no network is loaded, no data read), so that a typo or a value out of range fails before the first stage
    runs (``cai.training.check_cli``: the same parser as the stage's ``run_cli``; the trainer is not built).
    """
    from jsonargparse import ArgumentError

    from cai.training import check_cli
    from models.errors import UserError

    config = {k: v for k, v in config.items() if k != "ckpt_path"}  # a ``fit`` argument, not a module's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        try:
            check_cli(module, datamodule, ["--config", _yaml_file(config)], prog)
        except ArgumentError as err:
            raise UserError(" ".join(str(err).split())) from None


def _stage_config(config: dict, stage_dir: Path, model_fields: dict, data_fields: dict) -> dict:
    """A training stage's config with the pipeline's paths (logs, checkpoints and export under ``stage_dir``)."""
    fixed = {
        "trainer": {
            "default_root_dir": str(stage_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(stage_dir), "name": "tb", "version": 0},
            },
        },
        "model": {**model_fields, "hf_out": str(stage_dir / "hf")},
        "data": data_fields,
    }
    return _deep_merge(config, fixed)


def run_lightning_stage(cli_main, config: dict, stage_dir: Path) -> Path:
    """Run ``cai <stage> fit`` with ``config`` (from ``_stage_config``); resume from the stage's last checkpoint."""
    args = ["fit", "--config", _yaml_file(config)]
    last = stage_dir / "tb" / "version_0" / "checkpoints" / "last.ckpt"
    if last.exists():
        print(f"    resuming from {last}")
        args += ["--ckpt_path", str(last)]
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (the pipeline's own) is not what it parses
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli_main(args)
    return stage_dir / "hf"


def run(
    run_dir: str = "runs/demo",
    base_model: str | None = None,
    tiny: TinyModelConfig | None = None,
    sl_data: dict | None = None,
    sft: dict | None = None,
    label: dict | None = None,
    pm: dict | None = None,
    ppo: dict | None = None,
    evaluate: dict | None = None,
    hhh_evals: str | None = None,
    hhh_max_examples: int | None = None,
    prompt_format: str = "auto",
) -> Path:
    """Run every stage that is not done yet, write the report, and print where the outputs are.

    Args:
        run_dir: Folder that receives every stage's output.
        base_model: The model to align: a directory, a hub id, a ``.gguf`` file or ``package:NAME`` (a GGUF file
            shipped in a Python package, imported once into ``run_dir/base_model``); None builds a tiny random model
            (the offline demo).
        tiny: Tiny model settings, used when ``base_model`` is None.
        sl_data: Arguments of ``cai sl-data`` (as in configs/sl_data/*.yaml); paths are set here.
        sft: A LightningCLI config of ``cai sft fit`` (as in configs/sft/*.yaml); paths are set here.
        label: Arguments of ``cai label`` (as in configs/label/*.yaml); paths are set here.
        pm: A LightningCLI config of ``cai pm fit``; paths are set here.
        ppo: A LightningCLI config of ``cai ppo fit``; paths are set here.
        evaluate: Arguments of ``cai eval``; the models compared and paths are set here.
        hhh_evals: The paper's 438 HHH comparisons (JSONL) for the feedback model's accuracy; default: the copy in
            ``../shared/anthropic-cai`` beside the checkout when it exists; ``none`` to skip.
        hhh_max_examples: Evaluate only the first N HHH comparisons (each is scored in both orders); None for all.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``), set for every stage so that a
            conversation is laid out the same way in sampling, SFT, labelling, the preference model, PPO and eval.
    """
    from cai.stages import eval_feedback
    from cai.stages import label as label_stage
    from cai.stages import sl_data as sl_stage
    from cai.stages.pm import cli_main as pm_cli
    from cai.stages.ppo import cli_main as ppo_cli
    from cai.stages.sft import cli_main as sft_cli

    rd = Path(run_dir)
    tiny = tiny or TinyModelConfig()
    fmt = prompt_format
    hhh = None if hhh_evals == "none" else hhh_evals or (str(HHH_DEFAULT) if HHH_DEFAULT.exists() else None)

    # Every stage's arguments, built once: checked all together below, then run stage by stage.
    base = base_model or str(rd / "base_model")
    if base_model is not None and resolve_model_source(base_model).gguf_file is not None:
        # A GGUF file (or one shipped in a package) is de-quantized once into a plain HF folder: every later load
        # then takes a fraction of a second instead of ~10 s, and the stages' exports can copy its tokenizer.
        base = str(rd / "base_model")
    sl_cai, pm_hf, rl_cai = rd / "sft" / "hf", rd / "pm" / "hf", rd / "ppo" / "hf"
    sl_records, label_records = rd / "sl_data" / "records.jsonl", rd / "label" / "records.jsonl"
    sl_cfg = _deep_merge(
        sl_data or {}, {"out": str(rd / "sl_data"), "model": {"name_or_path": base}, "sampling": {"prompt_format": fmt}}
    )
    sft_cfg = _stage_config(
        sft or {},
        rd / "sft",
        {"model": {"name_or_path": base}},
        {"train": str(rd / "sl_data" / "sft"), "prompt_format": fmt},
    )
    label_cfg = _deep_merge(
        label or {},
        {"out": str(rd / "label"), "policy": {"name_or_path": str(sl_cai)}, "sampling": {"prompt_format": fmt}},
    )
    pm_cfg = _stage_config(
        pm or {},
        rd / "pm",
        {"model": {"name_or_path": str(sl_cai)}},
        {"train": str(rd / "label" / "pairs"), "prompt_format": fmt},
    )
    ppo_fields = {"model": {"name_or_path": str(sl_cai)}, "preference_model": {"name_or_path": str(pm_hf)}}
    ppo_cfg = _stage_config(ppo or {}, rd / "ppo", {**ppo_fields, "prompt_format": fmt}, {})
    models = {"base": base, "sl-cai": str(sl_cai), "rl-cai": str(rl_cai)}
    eval_cfg = None
    if evaluate is not None:
        eval_cfg = _deep_merge(
            evaluate,
            {
                "out": str(rd / "eval"),
                "models": models,
                "preference_model": str(pm_hf),
                "feedback_model": str(sl_cai),
                "hhh_evals": None,
                "sampling": {**evaluate.get("sampling", {}), "prompt_format": fmt},
                # A true hold-out: prompts any training stage saw are skipped.
                "exclude": [str(sl_records), str(label_records)],
            },
        )
    made_here = [sl_cai, pm_hf, rl_cai, sl_records, label_records] + ([rd / "base_model"] if base != base_model else [])
    _check_stages(
        base_model, tiny, sl_cfg, sft_cfg, label_cfg, pm_cfg, ppo_cfg, eval_cfg, hhh, hhh_max_examples, fmt, made_here
    )

    rd.mkdir(parents=True, exist_ok=True)
    settings = dict(
        run_dir=run_dir,
        base_model=base_model,
        tiny=asdict(tiny),
        sl_data=sl_data,
        sft=sft,
        label=label,
        pm=pm,
        ppo=ppo,
        evaluate=evaluate,
        hhh_evals=hhh_evals,
        hhh_max_examples=hhh_max_examples,
        prompt_format=prompt_format,
    )
    (rd / "pipeline.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    log: list[dict] = []
    start = time.time()

    def stage(name: str, done_marker: Path) -> bool:
        done = done_marker.exists()
        print(f"\n=== pipeline: {name}: {'skipped (already done)' if done else 'running'}", flush=True)
        log.append({"stage": name, "skipped": done, "started": time.time()})
        return not done

    if base_model is None and stage("base model (tiny, random)", rd / "base_model" / "config.json"):
        make_tiny_model(base, tiny)
    if base != base_model and base_model is not None:
        if stage(f"base model (imported from {base_model})", rd / "base_model" / "config.json"):
            import_model(base_model, base)

    if stage("SL-CAI critique-revision data", rd / "sl_data" / "summary.json"):
        run_function_stage(sl_stage.run, sl_cfg, "cai sl-data")

    if stage("SFT: the SL-CAI model", sl_cai / "model.safetensors"):
        run_lightning_stage(sft_cli, sft_cfg, rd / "sft")

    if stage("response pairs and AI preference labels", rd / "label" / "summary.json"):
        run_function_stage(label_stage.run, label_cfg, "cai label")

    if hhh and stage("feedback model on the 438 HHH comparisons", rd / "eval_feedback" / "metrics.json"):
        eval_feedback.run(
            model=_model(str(sl_cai)),
            evals=hhh,
            out=str(rd / "eval_feedback"),
            max_examples=hhh_max_examples,
            prompt_format=fmt,
        )

    if stage("preference model", pm_hf / "model.safetensors"):
        run_lightning_stage(pm_cli, pm_cfg, rd / "pm")

    if stage("PPO: the RL-CAI model", rl_cai / "model.safetensors"):
        run_lightning_stage(ppo_cli, ppo_cfg, rd / "ppo")

    # The HHH accuracy comes from the eval_feedback stage above (same model): not computed twice.
    if eval_cfg is not None and stage("evaluation: base vs SL-CAI vs RL-CAI", rd / "eval" / "eval.json"):
        from cai.stages.evaluate import run as eval_run

        run_function_stage(eval_run, eval_cfg, "cai eval")

    report = None
    if evaluate is not None:
        from cai.stages.report import write_report

        report = write_report(rd)
    summary = {
        "run_dir": str(rd),
        "models": models,
        "report": str(report) if report else None,
        "stages": log,
        "seconds": round(time.time() - start, 1),
    }
    (rd / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n=== pipeline done in {summary['seconds']}s. Outputs in {rd}/:")
    for name, path in [
        ("SL-CAI data", rd / "sl_data" / "records.jsonl"),
        ("SL-CAI model (HF)", sl_cai),
        ("AI preference labels", rd / "label" / "records.jsonl"),
        ("preference model (HF)", pm_hf),
        ("RL-CAI model (HF)", rl_cai),
        ("evaluation", rd / "eval" / "eval.json"),
        ("report", report),
    ]:
        if path is not None and Path(path).exists():
            print(f"  {name:22s} {path}")
    print(f"  {'training curves':22s} tensorboard --logdir {rd}")
    return rd


def _check_stages(
    base_model, tiny, sl_cfg, sft_cfg, label_cfg, pm_cfg, ppo_cfg, eval_cfg, hhh, hhh_max_examples, fmt, made_here
) -> None:
    """Check every stage's settings before the first stage runs.

    A typo in a late stage (``ppo:``) then fails at once rather than after the SL-CAI data and SFT ran. Paths that
    earlier stages write are not looked for.

    Raises:
        UserError: naming the stage (``pipeline: ppo: ...``) and the setting.
    """
    from cai.cli import check_stage
    from cai.stages import label as label_stage
    from cai.stages import sl_data as sl_stage
    from cai.stages.evaluate import run as eval_run
    from cai.stages.pm import PreferenceModule
    from cai.stages.ppo import PPOModule
    from cai.stages.sft import SFTModule
    from data.preference import PreferenceDataModule
    from data.prompt_data import PromptDataModule
    from data.sft import SFTDataModule
    from models.errors import UserError, check_input_file, check_positive

    pending = frozenset(str(p) for p in made_here)
    checks = [
        ("tiny", lambda: base_model is None and check_stage("tiny-model", asdict(tiny), pending)),
        ("sl_data", lambda: check_function_stage(sl_stage.run, sl_cfg, "cai sl-data", pending)),
        ("sft", lambda: check_lightning_stage(SFTModule, SFTDataModule, sft_cfg, "cai sft")),
        ("label", lambda: check_function_stage(label_stage.run, label_cfg, "cai label", pending)),
        ("pm", lambda: check_lightning_stage(PreferenceModule, PreferenceDataModule, pm_cfg, "cai pm")),
        ("ppo", lambda: check_lightning_stage(PPOModule, PromptDataModule, ppo_cfg, "cai ppo")),
        ("evaluate", lambda: eval_cfg is not None and check_function_stage(eval_run, eval_cfg, "cai eval", pending)),
        ("hhh_evals", lambda: hhh and check_input_file(hhh, "hhh_evals")),
        ("hhh_max_examples", lambda: check_positive(hhh_max_examples, "hhh_max_examples", allow_none=True)),
        ("prompt_format", lambda: _check_format(fmt)),
    ]
    for name, check in checks:
        try:
            check()
        except UserError as err:
            raise UserError(f"{name}: {err}") from err


def _check_format(fmt: str) -> None:
    from models.errors import UserError

    if fmt not in ("auto", "chat", "transcript"):
        raise UserError(f"prompt_format={fmt!r}: must be auto, chat or transcript")


def _model(path: str):
    from models import ModelConfig

    return ModelConfig(path)
