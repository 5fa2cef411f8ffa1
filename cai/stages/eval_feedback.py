"""Accuracy, calibration and position bias of a feedback model on multiple-choice evaluations: ``cai eval-feedback``.

The input is JSONL rows ``{prompt, corrects, incorrects}`` such as the paper's 438 HHH comparisons
(``438HHHEvaluations.jsonl``; Bai et al. 2022, fig. 4). The measurement itself (scoring by teacher forcing, both option
orders, calibration error, position bias, the reliability diagram) is ``cai.method.choice_eval``, which ``cai eval``
runs too; this stage checks the settings, then runs it.
"""

from __future__ import annotations

from cai.method.choice_eval import EvalDataError, evaluate, measure, read_evals, summarize, swap_options
from models import ModelConfig, resolve_device
from models.errors import UserError, check_input_file, check_output_dir, check_positive

# The building blocks stay importable from here, where they were before they moved to ``cai.method.choice_eval``.
__all__ = ["EvalDataError", "evaluate", "read_evals", "run", "summarize", "swap_options"]


def run(
    model: ModelConfig | None = None,
    evals: str = "../shared/anthropic-cai/evals/438HHHEvaluations.jsonl",
    out: str = "runs/eval_feedback",
    max_examples: int | None = None,
    batch_size: int = 8,
    n_bins: int = 10,
    device: str = "auto",
    both_orders: bool = True,
    prompt_format: str = "auto",
) -> dict:
    """Measure a feedback model's accuracy, calibration and position bias on multiple-choice comparisons.

    Args:
        model: The feedback model.
        evals: JSONL/JSON/Parquet rows {prompt, corrects, incorrects}.
        out: Output folder: metrics.json, predictions.jsonl, reliability.png.
        max_examples: Evaluate the first N rows only.
        batch_size: Prompts per forward pass.
        n_bins: Confidence bins of the calibration error and the diagram.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        both_orders: Score two-option rows with (A) and (B) in both orders and average, cancelling position bias.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``). In chat form each row's question
            becomes a user turn and the answer an assistant turn opened with "The answer is:"; in transcript form the
            row's prompt is read as it is (the paper's format).
    """
    if model is None:
        raise UserError("model.name_or_path is required (the feedback model)")
    for name, value in (("batch_size", batch_size), ("n_bins", n_bins)):
        check_positive(value, name)
    check_positive(max_examples, "max_examples", allow_none=True)
    if prompt_format not in ("auto", "chat", "transcript"):
        raise UserError(f"prompt_format={prompt_format!r}: must be auto, chat or transcript")
    check_input_file(evals, "evals")
    check_output_dir(out, "out")
    return measure(
        model, evals, out, max_examples, batch_size, n_bins, resolve_device(device), both_orders, prompt_format
    )
