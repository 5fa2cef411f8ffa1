"""The ``cai`` command: one subcommand per stage of Constitutional AI.

Function-style stages are parsed by jsonargparse (``cai tiny-model --help``); training stages are LightningCLI
programs (``cai sft fit --config configs/sft/tiny.yaml``). Every subcommand accepts ``--config FILE``.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module:function", kind, one-line help). kind "fn" is parsed by jsonargparse.CLI from the function's
# signature and docstring; kind "argv" receives the remaining arguments itself (LightningCLI programs).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pipeline": ("cai.pipeline:run", "fn", "the whole method, stage by stage, resumable (the main job)"),
    "tiny-model": ("models.tiny:main", "fn", "build a tiny random HF model and tokenizer for offline runs"),
    "import-model": ("models.gguf:import_model", "fn", "write a GGUF (or any) model as a safetensors HF folder"),
    "sl-data": ("cai.sl_data:run", "fn", "SL-CAI: critique-revision data from red-team and helpful prompts"),
    "sft": ("cai.sft:cli_main", "argv", "SL-CAI: supervised fine-tuning (LightningCLI: cai sft fit ...)"),
    "label": ("cai.label:run", "fn", "RL-CAI: response pairs labelled by AI feedback (soft labels)"),
    "eval-feedback": ("cai.eval_feedback:run", "fn", "accuracy and calibration of a feedback model"),
    "pm": ("cai.pm:cli_main", "argv", "RL-CAI: preference model (LightningCLI: cai pm fit ...)"),
    "ppo": ("cai.ppo:cli_main", "argv", "RL-CAI: PPO against the preference model (cai ppo fit ...)"),
    "eval": ("cai.evaluate:run", "fn", "compare checkpoints: PM scores, win rates and Elo by the feedback model"),
    "report": ("cai.report:main", "fn", "write report.md (curves, labels, Elo, samples, config) for a run folder"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: cai COMMAND [ARGS]   (cai COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _input_errors() -> tuple[type[BaseException], ...]:
    from cai.constitution import ConstitutionError
    from data.prompts import PromptDataError

    return (ConstitutionError, PromptDataError, FileNotFoundError, FloatingPointError)


def _quiet_libraries() -> None:
    """Hide per-file progress bars of transformers (weight loading) so the job's own bar stays readable."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cai`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"cai: unknown command {name!r}\n\n{_usage()}")
    target, kind, _ = COMMANDS[name]
    module, func = target.split(":")
    _quiet_libraries()
    fn = getattr(importlib.import_module(module), func)
    try:
        if kind == "fn":
            from jsonargparse import CLI

            CLI(fn, args=rest, prog=f"cai {name}")
        else:
            fn(rest)
    except _input_errors() as e:
        # Bad input (a file, a field, a row) is the user's to fix: one line, no traceback. CAI_DEBUG=1 shows it.
        if os.environ.get("CAI_DEBUG"):
            raise
        sys.exit(f"cai {name}: error: {e}")


if __name__ == "__main__":
    main()
