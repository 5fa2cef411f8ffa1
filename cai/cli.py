"""The ``cai`` command: one subcommand per stage of Constitutional AI.

Function-style stages are parsed by jsonargparse (``cai tiny-model --help``); training stages are LightningCLI
programs (``cai sft fit --config configs/sft/tiny.yaml``). Every subcommand accepts ``--config FILE``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings

# name -> ("module:function", kind, one-line help). kind "fn" is parsed by jsonargparse.CLI from the function's
# signature and docstring; kind "argv" receives the remaining arguments itself (LightningCLI programs).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pipeline": ("cai.stages.pipeline:run", "fn", "the whole method, stage by stage, resumable (the main job)"),
    "tiny-model": ("models.tiny:main", "fn", "build a tiny random HF model and tokenizer for offline runs"),
    "import-model": ("models.gguf:import_model", "fn", "write a GGUF (or any) model as a safetensors HF folder"),
    "sl-data": ("cai.stages.sl_data:run", "fn", "SL-CAI: critique-revision data from red-team and helpful prompts"),
    "sft": ("cai.stages.sft:cli_main", "argv", "SL-CAI: supervised fine-tuning (LightningCLI: cai sft fit ...)"),
    "label": ("cai.stages.label:run", "fn", "RL-CAI: response pairs labelled by AI feedback (soft labels)"),
    "eval-feedback": ("cai.stages.eval_feedback:run", "fn", "accuracy and calibration of a feedback model"),
    "pm": ("cai.stages.pm:cli_main", "argv", "RL-CAI: preference model (LightningCLI: cai pm fit ...)"),
    "ppo": ("cai.stages.ppo:cli_main", "argv", "RL-CAI: PPO against the preference model (cai ppo fit ...)"),
    "dpo": ("cai.stages.dpo:cli_main", "argv", "RL-CAI alternative: DPO on the soft AI labels (cai dpo fit ...)"),
    "eval": (
        "cai.stages.evaluate:run",
        "fn",
        "compare models: PM scores, win rates and Elo by the feedback model",
    ),
    "report": (
        "cai.stages.report:main",
        "fn",
        "write report.md (curves, labels, Elo, samples) for a run folder",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: cai COMMAND [ARGS]   (cai COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _input_errors(kind: str = "fn") -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's mistake, shown as one line.

    ``UserError`` and bad paths; for training stages also Lightning's refusals of trainer settings
    (``MisconfigurationException``: ``trainer.accelerator gpu`` without one, ``max_steps -5``).
    """
    from models.errors import UserError

    if kind == "argv":
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        return (*_input_errors(), MisconfigurationException)

    # Missing files, files where folders should be (and back), and permissions are the user's paths to fix.
    return (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FloatingPointError)


class UserExit(SystemExit):
    """Exit status 2 after a user mistake; ``str()`` is the one-line message already printed on stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fail(name: str, message: str):
    """Print ``cai NAME: error: MESSAGE`` as one line on stderr and exit with status 2."""
    line = f"cai {name}: error: {_one_line(message)}"
    print(line, file=sys.stderr)
    raise UserExit(line)


def _one_line(text: str) -> str:
    """``text`` on one line.

    jsonargparse's "does not validate against any of the Union subtypes" report of an optional setting is shortened
    to the error of the setting's own type.
    """
    text = " ".join(str(text).split())
    union = re.search(r"Does not validate against any of the Union subtypes .*?Errors: - (.*?) - Expected a", text)
    if union:
        text = text[: union.start()] + union.group(1)
    return text


def _innermost(err: BaseException) -> BaseException:
    """The exception at the bottom of ``err``'s ``raise ... from`` chain (what jsonargparse wraps)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


_COMMAND = ["cai"]
"""The command being run, for parse errors (jsonargparse's parser class is patched once per process)."""


def _one_line_parsing(name: str) -> None:
    """Make jsonargparse's (and LightningCLI's) argument errors one line: ``cai NAME: error: ...``, exit status 2.

    Parse errors print the whole usage by default; a value refused by a settings dataclass (``__post_init__``) while
    the parsed config is instantiated escapes as a ``ValueError`` wrapped in jsonargparse's own. Both become one line.
    A parser made with ``exit_on_error=False`` (jsonargparse's nested parsing) keeps raising as before.
    """
    from jsonargparse import ArgumentParser

    from models.errors import UserError

    _COMMAND[0] = name
    if getattr(ArgumentParser, "_cai_one_line", False):
        return
    error, instantiate = ArgumentParser.error, ArgumentParser.instantiate

    def one_line_error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("CAI_DEBUG"):
            return error(self, message, ex)
        _fail(_COMMAND[0], message)

    def checked_instantiate(self, *args, **kwargs):
        try:
            return instantiate(self, *args, **kwargs)
        except UserError:
            raise
        except ValueError as err:  # a settings class or module refused a value it was given
            if os.environ.get("CAI_DEBUG"):
                raise
            inner = _innermost(err)
            raise UserError(_one_line(inner if isinstance(inner, ValueError) else err)) from err

    ArgumentParser.error = one_line_error
    ArgumentParser.instantiate = checked_instantiate
    ArgumentParser._cai_one_line = True


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
        print(f"{_usage()}\n\ncai: error: unknown command {name!r}", file=sys.stderr)
        sys.exit(2)
    target, kind, _ = COMMANDS[name]
    module, func = target.split(":")
    from cai.threads import apply_thread_policy

    _quiet_libraries()
    fn = getattr(importlib.import_module(module), func)
    _one_line_parsing(name)
    warnings.filterwarnings("ignore", message=".*args parameter is intended")  # LightningCLI: args vs sys.argv
    try:
        apply_thread_policy()  # one torch thread on a CPU unless OMP_NUM_THREADS or CAI_THREADS says otherwise
        if kind == "fn":
            _run_function(fn, rest, name)
        else:
            fn(rest)
    except _input_errors(kind) as e:
        # Bad input (a file, a field, a row) is the user's to fix: one line, no traceback. CAI_DEBUG=1 shows it.
        if os.environ.get("CAI_DEBUG"):
            raise
        _fail(name, str(e))


def _run_function(fn, args: list[str], name: str):
    """Parse ``args`` for ``fn`` with jsonargparse, check its output folder, then call it."""
    import inspect

    from jsonargparse import auto_parser

    parser = auto_parser(fn, prog=f"cai {name}")
    cfg = parser.instantiate(parser.parse_args(_nested_overrides(fn, parser, args)))
    params = inspect.signature(fn).parameters
    kwargs = {k: cfg[k] for k in params if k in cfg}
    check_stage(name, kwargs)
    return fn(**kwargs)


def _nested_overrides(fn, parser, args: list[str]) -> list[str]:
    """``args`` with every override of a key inside a ``dict`` option merged into that option.

    jsonargparse updates a ``dict`` option one key deep, and keeps the value a string: ``--sl_data.critique.rounds 4``
    replaces the config's whole ``critique`` with ``{rounds: '4'}``, silently dropping its other keys. Here such
    overrides are taken out, the rest is parsed (the config files included), each override is set at its path in the
    parsed dict (its value read as YAML, as a config file's would be), and the merged dict is passed on as the
    option's value, last, so that it wins as a command-line value should.
    """
    import typing

    import yaml

    from cai.stages.pipeline_calls import deep_merge

    hints = typing.get_type_hints(fn)
    dict_options = {k for k, t in hints.items() if t is dict or dict in typing.get_args(t)}
    rest, nested = [], []  # nested: (option, [key, ...], value)
    i = 0
    while i < len(args):
        m = re.fullmatch(r"--(\w+)\.(\w+(?:\.\w+)*)(?:=(.*))?", args[i], re.DOTALL)
        if not (m and m.group(1) in dict_options):
            rest.append(args[i])
            i += 1
            continue
        if m.group(3) is None and i + 1 == len(args):
            parser.error(f"{args[i]}: expected a value")
        value = m.group(3) if m.group(3) is not None else args[i + 1]
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass  # not YAML (e.g. "a: b: c"): the stage's own parser reads the string
        nested.append((m.group(1), m.group(2).split("."), value))
        i += 1 if m.group(3) is not None else 2
    if not nested:
        return args
    shown = [a for a in rest if a.split("=")[0] not in ("--print_config", "-h", "--help")]
    base = parser.parse_args(shown)  # the config files and flat overrides, without printing and exiting
    merged: dict[str, dict] = {}
    for option, keys, value in nested:
        for key in reversed(keys):  # a.b.c = v -> {a: {b: {c: v}}}
            value = {key: value}
        merged[option] = deep_merge(merged.get(option, base[option] or {}), value)
    return rest + [arg for option, d in merged.items() for arg in (f"--{option}", json.dumps(d, default=str))]


def check_stage(name: str, kwargs: dict, pending: frozenset[str] = frozenset()) -> None:
    """Check a function stage's parsed arguments before it does any work (files, folders, models, numbers).

    Args:
        name: The command (``sl-data``, ``label``, ...).
        kwargs: Its arguments, as parsed and instantiated by jsonargparse.
        pending: Paths that an earlier stage of ``cai pipeline`` will write: not checked for existence.

    Raises:
        UserError: one line naming the setting and the culprit.
    """
    from models.errors import UserError, check_output_dir, check_positive
    from models.loading import check_model_folder

    def model(cfg, what: str) -> None:
        if cfg is None:
            raise UserError(f"{what}.name_or_path is required (a model folder, .gguf file or hub id)")
        path = cfg if isinstance(cfg, str) else cfg.name_or_path
        if str(path) not in pending:
            check_model_folder(str(path), need_tokenizer=isinstance(cfg, str) or not cfg.tokenizer)
        if not isinstance(cfg, str) and cfg.tokenizer and cfg.tokenizer not in pending:
            check_model_folder(cfg.tokenizer, need_weights=False)

    def prompts(src) -> None:
        if src is None:
            return
        check_positive(src.max_prompts, "prompts.max_prompts", allow_none=True)
        check_positive(src.max_prompt_chars, "prompts.max_prompt_chars", allow_none=True)
        if src.hold_out_last < 0:
            raise UserError(f"prompts.hold_out_last={src.hold_out_last}: must be 0 or more")
        if not 0 <= src.helpful_ratio < 1:
            raise UserError(f"prompts.helpful_ratio={src.helpful_ratio}: must be in [0, 1)")

    def constitution(value: str, feedback: bool = False) -> None:
        from cai.method.constitution import load_constitution

        const = load_constitution(value)
        if feedback:
            const.require_feedback(name)

    for key in ("out", "run_dir"):
        if isinstance(kwargs.get(key), str):
            check_output_dir(kwargs[key], key)
    if "chunk_size" in kwargs:
        check_positive(kwargs["chunk_size"], "chunk_size")
    if str(kwargs.get("device", "auto")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={kwargs['device']!r}: no CUDA GPU here; use auto or cpu")
    if name == "tiny-model":
        from models.tiny import ARCHITECTURES

        if kwargs["arch"] not in ARCHITECTURES:
            raise UserError(f"arch={kwargs['arch']!r}: unknown; choose one of {', '.join(ARCHITECTURES)}")
        if kwargs["vocab_size"] < 260:
            raise UserError(f"vocab_size={kwargs['vocab_size']}: must be at least 260 (256 bytes + special tokens)")
        if kwargs.get("corpus"):
            _check_text_file(kwargs["corpus"], "corpus")
    elif name == "import-model":
        from models.loading import resolve_dtype, resolve_model_source

        resolve_model_source(kwargs["source"])
        resolve_dtype(kwargs["dtype"])
    elif name == "sl-data":
        prompts(kwargs.get("prompts"))
        constitution(kwargs["constitution"])
        model(kwargs.get("model"), "model")
    elif name == "label":
        prompts(kwargs.get("prompts"))
        constitution(kwargs["constitution"], feedback=True)
        model(kwargs.get("policy"), "policy")
        for i, fm in enumerate(kwargs.get("feedback_models") or []):
            model(fm, f"feedback_models[{i}]")
    elif name == "eval":
        models = kwargs.get("models")
        if not models:
            raise UserError("models is required: {label: model folder or hub id, ...}")
        for label, path in models.items():
            model(path, f"models.{label}")
        for key in ("preference_model", "feedback_model"):
            if kwargs.get(key):
                model(kwargs[key], key)
        for path in kwargs.get("exclude") or []:
            if path not in pending:
                _check_text_file(path, "exclude")
        if kwargs.get("hhh_evals"):
            _check_text_file(kwargs["hhh_evals"], "hhh_evals")
        check_positive(kwargs["num_prompts"], "num_prompts")
        check_positive(kwargs["batch_size"], "batch_size")
        if kwargs["bootstrap"] < 0:
            raise UserError(f"bootstrap={kwargs['bootstrap']}: must be 0 or more")
        constitution(kwargs["constitution"])


def _check_text_file(path: str, what: str) -> None:
    """Refuse an input file that is missing, a folder, or unreadable."""
    from pathlib import Path

    from models.errors import UserError, check_input_file

    check_input_file(path, what)
    if Path(path).is_dir():
        raise UserError(f"{what}: {path} is a folder, not a file")


if __name__ == "__main__":
    main()
