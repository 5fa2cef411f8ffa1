"""How ``cai pipeline`` calls a stage with a config dict: as its command would, or only to check the settings.

Function stages (``cai sl-data``, ``cai label``, ``cai eval``) are parsed by jsonargparse from the function's
signature, training stages (``cai sft|pm|ppo fit``) by the stage's LightningCLI, so that the pipeline's settings are
validated exactly like the command's. No stage is imported here: the pipeline passes the function or module.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import yaml


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in: nested dicts are merged key by key, any other value of ``extra`` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_file(data: dict) -> str:
    """``data`` in a temporary YAML file, keys in their order (``cai eval``'s models: the Elo anchor first)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f, sort_keys=False)
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


def stage_config(config: dict, stage_dir: Path, model_fields: dict, data_fields: dict) -> dict:
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
    return deep_merge(config, fixed)


def run_lightning_stage(cli_main, config: dict, stage_dir: Path) -> Path:
    """Run ``cai <stage> fit`` with ``config`` (from ``stage_config``); resume from the stage's last checkpoint."""
    args = ["fit", "--config", _yaml_file(config)]
    last = stage_dir / "tb" / "version_0" / "checkpoints" / "last.ckpt"
    if last.exists():
        print(f"    resuming from {last}")
        args += ["--ckpt_path", str(last)]
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (the pipeline's own) is not what it parses
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli_main(args)
    return stage_dir / "hf"
