"""The whole method as one command: ``cai pipeline --config configs/pipeline/tiny.yaml``.

Stages run in order, each writing into one run directory:

1. ``base_model``: a tiny random model when no ``base_model`` is given (the offline demo);
2. ``sl_data``: SL-CAI critique-revision data (``cai sl-data``);
3. ``sft``: the SL-CAI model (``cai sft fit``);
4. ``label``: response pairs of the SL-CAI model labelled by AI feedback (``cai label``);
5. ``eval_feedback``: the feedback model's accuracy and calibration on the paper's 438 HHH comparisons, when that
   file is given or found beside the checkout (``cai eval-feedback``);
6. ``pm``: the preference model on the soft labels (``cai pm fit``), when ``rl`` is ``ppo`` or ``both``;
7. ``ppo``: the RL-CAI policy by PPO against it (``cai ppo fit``), when ``rl`` is ``ppo`` (the default) or ``both``;
8. ``dpo``: the RL-CAI policy by DPO on the soft labels (``cai dpo fit``), when ``rl`` is ``dpo`` or ``both``;
9. ``eval``: base vs SL-CAI vs RL-CAI (``rl-cai`` by PPO, ``rl-cai-dpo`` by DPO) (``cai eval``), then ``report.md``.

With ``rl: dpo`` no preference model is trained (DPO needs none), so the evaluation compares the models by the
feedback model alone (win rates and Elo, no PM scores); ``rl: both`` has both, and the PM scores every model.

A stage whose finished output is already there is skipped, so an interrupted pipeline resumes by running the same
command again; a finished evaluation of other models than this run's (``rl`` changed) runs again and adds only what
is missing (the answers and comparisons of a new model). A stage cut off mid-way continues too: generation stages
continue their JSONL files, and training stages restart from their last Lightning checkpoint.

The stages are data: ``stage_table`` lists them as ``Stage`` rows (name, done-marker file, how to run and check it,
what it reads and writes, the label of the model it makes for the evaluation). ``run`` checks the settings of every
pending row before any runs (``check_stages``), then runs the pending rows in order (``run_stages``). Another stage is
one more row and, when optional, one setting that enables it (``enabled``), as the DPO row and ``rl`` show; a row
with ``evaluated`` set is compared by the evaluation with the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cai.method.compare import free_memory
from cai.stages.pipeline_calls import (
    check_function_stage,
    check_lightning_stage,
    deep_merge,
    run_function_stage,
    run_lightning_stage,
    stage_config,
)
from models import ModelConfig, resolve_model_source
from models.gguf import import_model
from models.tiny import TinyModelConfig, make_tiny_model

HHH_DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"
"""The paper's 438 HHH comparisons in ``../shared/anthropic-cai`` beside the checkout (read when present)."""
RL_METHODS = ("ppo", "dpo", "both")
"""The values of ``rl``: how RL-CAI is trained on the AI labels."""


@dataclass
class PipelineSettings:
    """The settings of ``cai pipeline`` (the arguments of ``run``), checked when built."""

    run_dir: str = "runs/demo"
    """Folder that receives every stage's output."""
    base_model: str | None = None
    """The model to align: a folder, hub id, ``.gguf`` file or ``package:NAME`` (a GGUF file is imported once into
    ``run_dir/base_model``); None builds a tiny random model (the offline demo)."""
    tiny: TinyModelConfig | None = None
    """Tiny model settings, used when ``base_model`` is None; None: the defaults."""
    sl_data: dict | None = None
    """Arguments of ``cai sl-data`` (as in configs/sl_data/*.yaml); the paths are set by the pipeline."""
    sft: dict | None = None
    """A LightningCLI config of ``cai sft fit`` (as in configs/sft/*.yaml); the paths are set by the pipeline."""
    label: dict | None = None
    """Arguments of ``cai label`` (as in configs/label/*.yaml); the paths are set by the pipeline."""
    pm: dict | None = None
    """A LightningCLI config of ``cai pm fit``; the paths are set by the pipeline."""
    ppo: dict | None = None
    """A LightningCLI config of ``cai ppo fit``; the paths are set by the pipeline."""
    dpo: dict | None = None
    """A LightningCLI config of ``cai dpo fit`` (as in configs/dpo/*.yaml), used when ``rl`` is ``dpo`` or ``both``;
    the paths are set by the pipeline (the reference log-probs are cached in ``label/pairs.ref_logps/``)."""
    rl: str = "ppo"
    """How RL-CAI is trained on the AI labels: ``ppo`` (a preference model, then PPO against it, the paper's
    method), ``dpo`` (DPO on the labels; no preference model, so the evaluation has no PM scores) or ``both`` (side by
    side: evaluated as ``rl-cai`` and ``rl-cai-dpo``)."""
    evaluate: dict | None = None
    """Arguments of ``cai eval``; the models compared and the paths are set by the pipeline. None: no evaluation and
    no report."""
    hhh_evals: str | None = None
    """The paper's HHH comparisons (JSONL) for the feedback model's accuracy; None: the copy in
    ``../shared/anthropic-cai`` beside the checkout when it exists; ``none`` to skip."""
    hhh_max_examples: int | None = None
    """Evaluate only the first N HHH comparisons; None for all."""
    prompt_format: str = "auto"
    """``auto``, ``chat`` or ``transcript``, set for every stage."""

    def __post_init__(self):
        from models.errors import UserError, check_positive

        self.tiny = self.tiny or TinyModelConfig()
        check_positive(self.hhh_max_examples, "hhh_max_examples", allow_none=True)
        _check_format(self.prompt_format)
        if self.rl not in RL_METHODS:
            raise UserError(f"rl={self.rl!r}: must be one of {', '.join(RL_METHODS)}")

    @property
    def uses_ppo(self) -> bool:
        """Whether the preference model and PPO run (``rl`` is ``ppo`` or ``both``)."""
        return self.rl in ("ppo", "both")

    @property
    def uses_dpo(self) -> bool:
        """Whether DPO runs (``rl`` is ``dpo`` or ``both``)."""
        return self.rl in ("dpo", "both")

    @property
    def hhh(self) -> str | None:
        """The HHH comparisons the ``eval_feedback`` stage reads, or None to skip that stage."""
        if self.hhh_evals == "none":
            return None
        return self.hhh_evals or (str(HHH_DEFAULT) if HHH_DEFAULT.exists() else None)

    @property
    def imports_base(self) -> bool:
        """Whether ``base_model`` is a GGUF file (or one in a package), de-quantized once into ``run_dir/base_model``.

        Every later load then takes a fraction of a second instead of ~10 s, and the stages' exports can copy its
        tokenizer.
        """
        return self.base_model is not None and resolve_model_source(self.base_model).gguf_file is not None

    @property
    def base(self) -> str:
        """Where the stages read the base model: ``base_model``, or ``run_dir/base_model`` when made here."""
        made_here = self.base_model is None or self.imports_base
        return str(Path(self.run_dir) / "base_model") if made_here else self.base_model


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline's table: a stage, how to know it is done, and how to check and run it."""

    name: str
    """The stage's settings in the pipeline config (``sl_data``, ``sft``, ...); its errors are prefixed with it."""
    title: str
    """What the stage makes, as printed and logged."""
    done: Path
    """The file that exists once the stage has finished (written last); a stage whose file exists is skipped."""
    run: Callable[[], object]
    """Runs the stage; a cut-off run continues (JSONL files are continued, training resumes from ``last.ckpt``)."""
    check: Callable[[frozenset[str]], object]
    """Checks the stage's settings without running anything, given the paths that pending stages will write (these
    are not looked for); raises ``UserError``."""
    reads: tuple[Path, ...] = ()
    """Outputs of earlier stages that it reads."""
    writes: dict[str, Path] = field(default_factory=dict)
    """What it makes, by what it is (printed at the end when it exists)."""
    evaluated: str | None = None
    """The label under which ``cai eval`` compares the model the stage makes (its ``writes`` entry ``model``)."""
    enabled: bool = True
    """False leaves the row out of this run (e.g. ``eval_feedback`` without HHH comparisons)."""
    current: Callable[[], bool] | None = None
    """Whether the output of a done stage still matches this run's settings (None: it always does); a stage whose
    output does not runs again (e.g. an evaluation of other models, after ``rl`` changed)."""

    def finished(self) -> bool:
        """Whether the stage is done for this run: its ``done`` file exists and its output is ``current``."""
        return self.done.exists() and (self.current is None or self.current())


def _function_stage(fn, config: dict, prog: str) -> dict:
    """``run`` and ``check`` of a function stage (``cai sl-data``, ``cai label``, ``cai eval``)."""
    return {
        "run": lambda: run_function_stage(fn, config, prog),
        "check": lambda pending: check_function_stage(fn, config, prog, pending),
    }


def _training_stage(cli_main, module, datamodule, config: dict, stage_dir: Path) -> dict:
    """``run`` and ``check`` of a LightningCLI stage (``cai sft|pm|ppo|dpo fit``)."""
    return {
        "run": lambda: run_lightning_stage(cli_main, config, stage_dir),
        "check": lambda pending: check_lightning_stage(module, datamodule, config, f"cai {stage_dir.name}"),
    }


def stage_table(p: PipelineSettings) -> list[Stage]:
    """The enabled stages in the order they run, each with its settings for this run (paths and prompt format set).

    A new stage is one more row (and, when it is optional, the setting that enables it); a row that makes a model
    names its ``evaluated`` label, and the evaluation compares it with the others.
    """
    from cai.cli import check_stage
    from cai.stages import eval_feedback, sl_data
    from cai.stages import label as label_stage
    from cai.stages.dpo import DPOModule
    from cai.stages.dpo import cli_main as dpo_cli
    from cai.stages.evaluate import run as eval_run
    from cai.stages.pm import PreferenceModule
    from cai.stages.pm import cli_main as pm_cli
    from cai.stages.ppo import PPOModule
    from cai.stages.ppo import cli_main as ppo_cli
    from cai.stages.sft import SFTModule
    from cai.stages.sft import cli_main as sft_cli
    from data.dpo import DPODataModule
    from data.preference import PreferenceDataModule
    from data.prompt_data import PromptDataModule
    from data.sft import SFTDataModule
    from models.errors import check_input_file

    rd, fmt, base, hhh = Path(p.run_dir), p.prompt_format, p.base, p.hhh
    sl_cai, pm_hf, rl_cai, rl_dpo = rd / "sft" / "hf", rd / "pm" / "hf", rd / "ppo" / "hf", rd / "dpo" / "hf"
    pairs = rd / "label" / "pairs"
    sl_records, label_records = rd / "sl_data" / "records.jsonl", rd / "label" / "records.jsonl"
    sl_cfg = {"out": str(rd / "sl_data"), "model": {"name_or_path": base}, "sampling": {"prompt_format": fmt}}
    label_cfg = {"out": str(rd / "label"), "policy": {"name_or_path": str(sl_cai)}, "sampling": {"prompt_format": fmt}}
    sl, lab = deep_merge(p.sl_data or {}, sl_cfg), deep_merge(p.label or {}, label_cfg)
    sft = stage_config(
        p.sft or {},
        rd / "sft",
        {"model": {"name_or_path": base}},
        {"train": str(rd / "sl_data" / "sft"), "prompt_format": fmt},
    )
    pm = stage_config(
        p.pm or {},
        rd / "pm",
        {"model": {"name_or_path": str(sl_cai)}},
        {"train": str(pairs), "prompt_format": fmt},
    )
    ppo_model = {"model": {"name_or_path": str(sl_cai)}, "preference_model": {"name_or_path": str(pm_hf)}}
    ppo = stage_config(p.ppo or {}, rd / "ppo", {**ppo_model, "prompt_format": fmt}, {})
    dpo_model = {"model": {"name_or_path": str(sl_cai)}}  # the reference: its starting weights (model.reference)
    dpo = stage_config(p.dpo or {}, rd / "dpo", dpo_model, {"train": str(pairs), "prompt_format": fmt})
    hhh_out = rd / "eval_feedback"
    # fmt: off
    rows = [
        Stage("tiny", "base model (tiny, random)", rd / "base_model" / "config.json",
              run=lambda: make_tiny_model(base, p.tiny),
              check=lambda pending: check_stage("tiny-model", asdict(p.tiny), pending),
              writes={"model": Path(base)}, evaluated="base", enabled=p.base_model is None),
        Stage("base_model", f"base model (imported from {p.base_model})", rd / "base_model" / "config.json",
              run=lambda: import_model(p.base_model, base), check=lambda pending: None,
              writes={"model": Path(base)}, evaluated="base", enabled=p.imports_base),
        Stage("sl_data", "SL-CAI critique-revision data", rd / "sl_data" / "summary.json",
              **_function_stage(sl_data.run, sl, "cai sl-data"),
              reads=(Path(base),), writes={"SL-CAI data": sl_records, "SFT split": rd / "sl_data" / "sft"}),
        Stage("sft", "SFT: the SL-CAI model", sl_cai / "model.safetensors",
              **_training_stage(sft_cli, SFTModule, SFTDataModule, sft, rd / "sft"),
              reads=(Path(base), rd / "sl_data" / "sft"), writes={"model": sl_cai}, evaluated="sl-cai"),
        Stage("label", "response pairs and AI preference labels", rd / "label" / "summary.json",
              **_function_stage(label_stage.run, lab, "cai label"),
              reads=(sl_cai,), writes={"AI preference labels": label_records, "pairs": pairs}),
        Stage("eval_feedback", "feedback model on the 438 HHH comparisons", hhh_out / "metrics.json",
              run=lambda: eval_feedback.run(model=ModelConfig(str(sl_cai)), evals=hhh, out=str(hhh_out),
                                            max_examples=p.hhh_max_examples, prompt_format=fmt),
              check=lambda pending: check_input_file(hhh, "hhh_evals"),
              reads=(sl_cai,), writes={"feedback model on HHH": hhh_out / "metrics.json"}, enabled=hhh is not None),
        Stage("pm", "preference model", pm_hf / "model.safetensors",
              **_training_stage(pm_cli, PreferenceModule, PreferenceDataModule, pm, rd / "pm"),
              reads=(sl_cai, pairs), writes={"model": pm_hf}, enabled=p.uses_ppo),
        Stage("ppo", "PPO: the RL-CAI model", rl_cai / "model.safetensors",
              **_training_stage(ppo_cli, PPOModule, PromptDataModule, ppo, rd / "ppo"),
              reads=(sl_cai, pm_hf), writes={"model": rl_cai}, evaluated="rl-cai", enabled=p.uses_ppo),
        Stage("dpo", "DPO: the RL-CAI model by DPO", rl_dpo / "model.safetensors",
              **_training_stage(dpo_cli, DPOModule, DPODataModule, dpo, rd / "dpo"),
              reads=(sl_cai, pairs), writes={"model": rl_dpo}, evaluated="rl-cai-dpo", enabled=p.uses_dpo),
    ]
    # fmt: on
    rows = [r for r in rows if r.enabled]
    models = evaluated_models(p, rows)
    eval_cfg = deep_merge(
        p.evaluate or {},
        {
            "out": str(rd / "eval"),
            "models": models,
            "preference_model": str(pm_hf) if p.uses_ppo else None,  # rl: dpo trains no preference model
            "feedback_model": str(sl_cai),
            "hhh_evals": None,  # the eval_feedback stage measures the same model on them
            "sampling": {**(p.evaluate or {}).get("sampling", {}), "prompt_format": fmt},
            "exclude": [str(sl_records), str(label_records)],  # a true hold-out: no prompt a training stage saw
        },
    )
    if p.evaluate is not None:
        pm_read = (pm_hf,) if p.uses_ppo else ()
        rows.append(
            Stage(
                "evaluate", f"evaluation: {' vs '.join(models)}", rd / "eval" / "eval.json",
                **_function_stage(eval_run, eval_cfg, "cai eval"),
                reads=(*pm_read, sl_records, label_records, *map(Path, models.values())),
                writes={"evaluation": rd / "eval" / "eval.json"},
                # as sets: evaluations written before the models kept their order list them alphabetically
                current=lambda: set(evaluated_labels(rd / "eval" / "eval.json") or ()) == set(models),
            )
        )  # fmt: skip
    return rows


def evaluated_labels(eval_json: Path) -> list[str] | None:
    """The models (labels, in order) that a finished evaluation compared; None when ``eval.json`` cannot be read."""
    try:
        return json.loads(eval_json.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluated_models(p: PipelineSettings, stages: list[Stage]) -> dict[str, str]:
    """Label -> model folder of the models the evaluation compares: the base model, then each stage's, in order."""
    return {"base": p.base} | {s.evaluated: str(s.writes["model"]) for s in stages if s.evaluated}


def check_stages(stages: list[Stage]) -> None:
    """Check the settings of every stage that is not done, before any runs.

    A typo in a late stage (``ppo:``) then fails at once rather than after the SL-CAI data and SFT ran. Paths that
    pending stages write are not looked for.

    Raises:
        UserError: naming the stage (``pipeline: ppo: ...``) and the setting.
    """
    from models.errors import UserError

    pending = [s for s in stages if not s.finished()]
    coming = frozenset(str(path) for s in pending for path in s.writes.values())
    for s in pending:
        try:
            s.check(coming)
        except UserError as err:
            raise UserError(f"{s.name}: {err}") from err


def run_stages(stages: list[Stage]) -> list[dict]:
    """Run the stages in order, skipping those already done; returns the log (one entry per stage)."""
    log = []
    for s in stages:
        done = s.finished()
        print(f"\n=== pipeline: {s.title}: {'skipped (already done)' if done else 'running'}", flush=True)
        log.append({"stage": s.title, "name": s.name, "skipped": done, "started": time.time()})
        if not done:
            s.run()
            free_memory()  # every stage runs in this process: its trainer and model are cycles gc must collect
    return log


def run(
    run_dir: str = "runs/demo",
    base_model: str | None = None,
    tiny: TinyModelConfig | None = None,
    sl_data: dict | None = None,
    sft: dict | None = None,
    label: dict | None = None,
    pm: dict | None = None,
    ppo: dict | None = None,
    dpo: dict | None = None,
    rl: str = "ppo",
    evaluate: dict | None = None,
    hhh_evals: str | None = None,
    hhh_max_examples: int | None = None,
    prompt_format: str = "auto",
) -> Path:
    """Run every stage that is not done yet, write the report, and print where the outputs are.

    The stages are the rows of ``stage_table``: every pending one is checked first (``check_stages``), then they run
    in order (``run_stages``).

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
        dpo: A LightningCLI config of ``cai dpo fit`` (as in configs/dpo/*.yaml), used when ``rl`` is ``dpo`` or
            ``both``; paths are set here.
        rl: How RL-CAI is trained on the AI labels: ``ppo`` (preference model, then PPO; the default), ``dpo`` (DPO
            on the labels, no preference model: the evaluation then has no PM scores) or ``both`` (side by side,
            evaluated as ``rl-cai`` and ``rl-cai-dpo``).
        evaluate: Arguments of ``cai eval``; the models compared and paths are set here.
        hhh_evals: The paper's 438 HHH comparisons (JSONL) for the feedback model's accuracy; default: the copy in
            ``../shared/anthropic-cai`` beside the checkout when it exists; ``none`` to skip.
        hhh_max_examples: Evaluate only the first N HHH comparisons (each is scored in both orders); None for all.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``), set for every stage so that a
            conversation is laid out the same way in sampling, SFT, labelling, the preference model, PPO and eval.
    """
    p = PipelineSettings(
        run_dir, base_model, tiny, sl_data, sft, label, pm, ppo, dpo, rl, evaluate, hhh_evals, hhh_max_examples,
        prompt_format,
    )  # fmt: skip
    stages = stage_table(p)
    check_stages(stages)
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "pipeline.yaml").write_text(yaml.safe_dump(asdict(p), sort_keys=False))
    start = time.time()
    log = run_stages(stages)
    report = None
    if evaluate is not None:
        from cai.stages.report import write_report

        report = write_report(rd)
    models = evaluated_models(p, stages)
    summary = {
        "run_dir": str(rd),
        "models": models,
        "report": str(report) if report else None,
        "stages": log,
        "seconds": round(time.time() - start, 1),
    }
    (rd / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n=== pipeline done in {summary['seconds']}s. Outputs in {rd}/:")
    outputs = [
        (f"{s.name} {what}" if what == "model" else what, path) for s in stages for what, path in s.writes.items()
    ]
    for what, path in outputs + [("report", report)]:
        if path is not None and Path(path).exists():
            print(f"  {what:22s} {path}")
    print(f"  {'training curves':22s} tensorboard --logdir {rd}")
    return rd


def _check_format(fmt: str) -> None:
    from models.errors import UserError

    if fmt not in ("auto", "chat", "transcript"):
        raise UserError(f"prompt_format={fmt!r}: must be auto, chat or transcript")
