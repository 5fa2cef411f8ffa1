"""A feedback model on multiple-choice evaluations: accuracy, calibration and position bias.

The measurement of ``cai eval-feedback``, which ``cai eval`` runs too (``hhh_evals``). The input is JSONL rows
``{prompt, corrects, incorrects}`` such as the paper's 438 HHH comparisons
(``438HHHEvaluations.jsonl``; Bai et al. 2022 report feedback-model accuracy on them, fig. 4) or its harmfulness
classification set. Every candidate answer is scored by teacher forcing, log p(candidate | prompt), with the prompt read
once for all of a row's candidates (``models.logprobs.choice_logprobs``); the softmax over a row's candidates gives
the model's probabilities. The prediction is the most likely candidate, its probability the confidence. Reported:
accuracy, expected calibration error of the confidence (torchmetrics), position bias, and a reliability diagram (PNG).

**Position bias.** A model may prefer an answer for its place rather than its content: a small instruct model asked
"(A) or (B)?" can answer "(A)" almost every time. On the HHH set, whose correct answer is (A) in 228 of 438 rows, such
a model scores 0.52 while telling the responses apart no better than chance. The position bias reported is the share
of predictions that are "(A)": 1.0 for a model that always answers "(A)", 0.5 for one that answers by content on a
set balanced between (A) and (B); the mean probability the model gives "(A)" is reported with it.

**Both orders.** With ``both_orders`` (the default) a row whose prompt holds exactly two bracketed options,
`` (A) [[[...]]]`` then `` (B) [[[...]]]``, and whose answers are " (A)" and " (B)" is scored a second time with
the two contents exchanged and the answers relabelled. The row's probability of each answer is the mean of the two
orders' probabilities, so a preference for a place is given to both answers alike and cancels: a model that always
answers "(A)" gets 0.5 for every such row, and its accuracy is chance instead of the share of rows whose correct answer
happens to be (A). Accuracy, calibration error and confidence come from the averaged probabilities; each order's own
accuracy, position bias and mean P("(A)") are reported too (``metrics.json``, ``orders``). Feedback labels are
averaged over both orders the same way (``FeedbackConfig.both_orders``). Rows that cannot be swapped are scored once
and counted (``unswappable_rows``).

An exact tie (two answers at the same probability, as an always-"(A)" model gives after averaging) counts as half a
correct answer, the expected accuracy of breaking the tie at random; likewise half an "(A)" in the position bias.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torchmetrics.classification import BinaryCalibrationError
from tqdm.auto import tqdm

from cai.method.figures import reliability_diagram
from data.formats import PromptFormat
from data.prompts import PromptDataError
from data.sft import load_any_dataset
from models import ModelConfig, load_model, load_tokenizer
from models.logprobs import choice_logprobs

ORDERS = ("original", "swapped")
_BRACKETED = re.compile(r"\[\[\[(.*?)\]\]\]", re.DOTALL)


class EvalDataError(PromptDataError):
    """A malformed evaluation file or row; the message is one line naming the file and the row."""


def read_evals(path: str, max_examples: int | None = None) -> list[dict]:
    """Rows with ``prompt`` (str), ``corrects`` and ``incorrects`` (lists of str); a bad row is a one-line error.

    JSONL files are read line by line, so that a row of the wrong shape is reported as such (``datasets`` would fail
    on the mixed column types first); other formats go through ``load_any_dataset``.

    Raises:
        EvalDataError: naming the file and the 1-based line (JSONL) or row (other formats).
    """
    if Path(path).suffix == ".jsonl":
        rows, where = [], []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if max_examples is not None and len(rows) >= max_examples:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise EvalDataError(f"{path}: line {number}: not UTF-8 text; save the file as UTF-8") from None
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise EvalDataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
                    where.append(f"line {number}")
    else:
        rows = load_any_dataset(path, what="evals").to_list()[:max_examples]
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise EvalDataError(f"{path}: no rows to evaluate")
    for at, r in zip(where, rows):
        if not isinstance(r, dict):
            raise EvalDataError(f"{path}: {at}: not a JSON object")
        for key, kind in (("prompt", str), ("corrects", list), ("incorrects", list)):
            if not isinstance(r.get(key), kind):
                raise EvalDataError(
                    f"{path}: {at}: {key!r} must be a {kind.__name__} (rows are {{prompt, corrects, incorrects}})"
                )
        if not r["corrects"]:
            raise EvalDataError(f"{path}: {at}: no correct answer given")
        if not all(isinstance(c, str) and c for c in r["corrects"] + r["incorrects"]):
            raise EvalDataError(f"{path}: {at}: every answer must be a non-empty string")
    return rows


def _relabel(answer: str) -> str:
    """Swap the letters of an answer: " (A)" becomes " (B)" and " (B)" becomes " (A)"."""
    return answer.replace("(A)", "(B)") if "(A)" in answer else answer.replace("(B)", "(A)")


def swap_options(row: dict) -> dict | None:
    """The row with the contents of options (A) and (B) exchanged and its answers relabelled, or None.

    A row can be swapped when its prompt holds exactly two bracketed options, `` (A) [[[...]]]`` then
    `` (B) [[[...]]]``, and one of the answers " (A)", " (B)" is correct and the other incorrect. Everything else in
    the prompt and the row's other fields are kept.
    """
    answers = row["corrects"] + row["incorrects"]
    if len(row["corrects"]) != 1 or sorted(a.strip() for a in answers) != ["(A)", "(B)"]:
        return None
    p = row["prompt"]
    spans = list(_BRACKETED.finditer(p))
    if len(spans) != 2 or p.count("[[[") != 2 or p.count("]]]") != 2:
        return None
    a, b = spans
    if not (p[: a.start()].endswith(" (A) ") and p[: b.start()].endswith(" (B) ")):
        return None
    prompt = p[: a.start(1)] + b.group(1) + p[a.end(1) : b.start(1)] + a.group(1) + p[b.end(1) :]
    return {
        **row,
        "prompt": prompt,
        "corrects": [_relabel(c) for c in row["corrects"]],
        "incorrects": [_relabel(c) for c in row["incorrects"]],
    }


def score_rows(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 8,
    max_length: int | None = None,
    render: Callable[[str], str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probabilities log p(answer | prompt) of every answer of every row, each prompt read once.

    Rows are grouped by their set of answers, and each group is scored with ``choice_logprobs`` (all the HHH rows
    share " (A)", " (B)", so they form one group).

    Args:
        model: The feedback model.
        tokenizer: Its tokenizer.
        rows: Rows ``{prompt, corrects, incorrects}``.
        batch_size: Prompts per forward pass.
        max_length: The model's length limit: a longer prompt is cut from the left, so that it loses the beginning of
            its conversation, never the question, and the longest answer still fits.
        render: Turns a row's prompt into the text the model reads (e.g. a chat format); None reads it as it is.
        on_batch: Called with the number of prompts just scored, after each forward batch.

    Returns:
        Per row, the summed log-probabilities of ``corrects + incorrects``, in that order.
    """
    render = render or (lambda text: text)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(sorted(set(r["corrects"] + r["incorrects"]))), []).append(i)
    result: list[list[float]] = [[] for _ in rows]
    for answers, members in groups.items():
        options = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        keep = None if max_length is None else max(1, max_length - max(len(o) for o in options))
        contexts = []
        for i in members:
            ctx = tokenizer(render(rows[i]["prompt"]), add_special_tokens=False)["input_ids"]
            contexts.append(ctx if keep is None else ctx[-keep:])
        logps = choice_logprobs(model, contexts, options, tokenizer.pad_token_id, batch_size, on_batch)
        for i, lp in zip(members, logps):
            by_answer = dict(zip(answers, lp))
            result[i] = [by_answer[a] for a in rows[i]["corrects"] + rows[i]["incorrects"]]
    return result


def _judge(answers: list[str], n_correct: int, probs: torch.Tensor) -> dict:
    """Prediction, correctness and confidence from probabilities (A,) over ``answers`` (the correct ones first)."""
    top = probs == probs.max()  # (A,) several on an exact tie
    k = int(top.long().argmax())
    correct = torch.arange(len(answers)) < n_correct  # (A,)
    is_a = torch.tensor([a.strip() == "(A)" for a in answers])  # (A,)
    share = lambda flags: ((top & flags).sum() / top.sum()).item()  # noqa: E731 - ties count fractionally
    return {
        "probs": probs.tolist(),
        "pred": k,
        "pred_answer": answers[k],
        "correct": share(correct),
        "confidence": probs[k].item(),
        "p_correct": probs[correct].sum().item(),
        "p_a": probs[is_a].sum().item() if is_a.any() else None,
        "a_share": share(is_a) if is_a.any() else None,
    }


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 8,
    max_length: int | None = None,
    both_orders: bool = True,
    render: Callable[[str], str] | None = None,
    progress: bool = True,
) -> dict:
    """Score every answer of every row, in both option orders where the row allows it.

    Args:
        model: The feedback model.
        tokenizer: Its tokenizer.
        rows: Rows ``{prompt, corrects, incorrects}``.
        batch_size: Prompts per forward pass.
        max_length: The model's length limit (long prompts lose their beginning).
        both_orders: Also score each swappable row with (A) and (B) exchanged, and average (see the module doc).
        render: Turns a row's prompt into the text the model reads, the same for both orders; None: as it is.
        progress: Show a progress bar with an ETA over the prompts scored (rows times orders).

    Returns:
        ``{"rows": [...], "unswappable_rows": n}``. Per row: ``probs`` over ``corrects + incorrects`` (the mean of
        the orders scored), ``pred`` (index), ``pred_answer``, ``correct`` (1, 0, or a fraction on an exact tie),
        ``confidence``, ``p_correct``, and ``orders``: the same fields for each order alone (its ``probs`` in the
        relabelled row's answer order, which keeps each index on the same content), with ``p_a`` (probability of
        " (A)") and ``a_share`` (1 when the prediction is " (A)").
    """
    queries, owner = [], []  # one query per row and order; owner: (row, order)
    unswappable = 0
    for i, r in enumerate(rows):
        queries.append(r)
        owner.append((i, ORDERS[0]))
        swapped = swap_options(r) if both_orders else None
        if swapped is not None:
            queries.append(swapped)
            owner.append((i, ORDERS[1]))
        elif both_orders:
            unswappable += 1
    with tqdm(total=len(queries), desc="eval-feedback", unit="prompt", disable=not progress) as bar:
        logps = score_rows(model, tokenizer, queries, batch_size, max_length, render, on_batch=bar.update)
    per_row: list[list[dict]] = [[] for _ in rows]
    for (i, order), q, lp in zip(owner, queries, logps):
        probs = torch.softmax(torch.tensor(lp, dtype=torch.float64), 0)
        per_row[i].append({"order": order, **_judge(q["corrects"] + q["incorrects"], len(q["corrects"]), probs)})
    results = []
    for r, orders in zip(rows, per_row):
        mean = torch.tensor([o["probs"] for o in orders], dtype=torch.float64).mean(0)  # (A,)
        res = _judge(r["corrects"] + r["incorrects"], len(r["corrects"]), mean)
        del res["p_a"], res["a_share"]  # "(A)" names different contents in the two orders
        results.append(res | {"orders": orders})
    return {"rows": results, "unswappable_rows": unswappable}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], result: dict, n_bins: int = 10) -> dict:
    """Accuracy, calibration error and position bias of ``evaluate``'s result, over the order-averaged rows.

    ``position_bias``: the share of predictions that are " (A)" over every scored order of the rows that have an
    " (A)" answer; ``mean_p_a``: their mean probability of " (A)". ``orders``: accuracy, position bias and mean
    P("(A)") of each order alone (the swapped order over the swappable rows only).
    """
    res = result["rows"]
    conf = torch.tensor([r["confidence"] for r in res], dtype=torch.float32)  # (N,)
    correct = torch.tensor([r["correct"] for r in res], dtype=torch.float32)  # (N,) 0.5 on a tie
    ece = BinaryCalibrationError(n_bins=n_bins, norm="l1", validate_args=False)(conf, correct).item()
    scored = [o for r in res for o in r["orders"]]
    with_a = [o for o in scored if o["a_share"] is not None]
    orders = {}
    for name in ORDERS:
        sel = [o for o in scored if o["order"] == name]
        if sel:
            sel_a = [o for o in sel if o["a_share"] is not None]
            orders[name] = {
                "rows": len(sel),
                "accuracy": _mean([o["correct"] for o in sel]),
                "position_bias": _mean([o["a_share"] for o in sel_a]),
                "mean_p_a": _mean([o["p_a"] for o in sel_a]),
            }
    return {
        "examples": len(res),
        "accuracy": correct.mean().item(),
        "expected_calibration_error": ece,
        "mean_confidence": conf.mean().item(),
        "chance_accuracy": sum(1 / len(r["corrects"] + r["incorrects"]) for r in rows) / len(rows),
        "position_bias": _mean([o["a_share"] for o in with_a]),
        "mean_p_a": _mean([o["p_a"] for o in with_a]),
        "swapped_rows": sum(len(r["orders"]) > 1 for r in res),
        "unswappable_rows": result["unswappable_rows"],
        "orders": orders,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def measure(
    model: ModelConfig,
    evals: str,
    out: str | Path,
    max_examples: int | None = None,
    batch_size: int = 8,
    n_bins: int = 10,
    device: str = "cpu",
    both_orders: bool = True,
    prompt_format: str = "auto",
) -> dict:
    """Score a feedback model on ``evals``; write metrics.json, predictions.jsonl and reliability.png into ``out``.

    Prints the scores and returns the metrics. The settings are those of ``cai eval-feedback``
    (``cai.stages.eval_feedback.run``), which checks them first; ``device`` is resolved (``cpu``, ``cuda``, ``cuda:1``).
    """
    rows = read_evals(evals, max_examples)
    net = load_model(model).to(device).eval()
    tok = load_tokenizer(model.tokenizer or model.name_or_path)
    fmt = PromptFormat(tok, prompt_format)
    limit = getattr(net.config, "max_position_embeddings", None)
    result = evaluate(net, tok, rows, batch_size, limit, both_orders, fmt.answer_context)
    metrics = {"evals": evals, "model": model.name_or_path, "both_orders": both_orders, "prompt_format": fmt.kind}
    metrics |= summarize(rows, result, n_bins)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for r in result["rows"]:
            f.write(json.dumps(r) + "\n")
    orders = "mean of both orders" if metrics["swapped_rows"] else "one order"
    scores = (
        f"accuracy {metrics['accuracy']:.3f}, ECE {metrics['expected_calibration_error']:.3f}, "
        f"position bias {_fmt(metrics['position_bias'], 2)} (share of (A))"
    )
    conf = torch.tensor([r["confidence"] for r in result["rows"]])
    correct = torch.tensor([r["correct"] for r in result["rows"]])
    title = f"{Path(evals).name} (n={metrics['examples']}, {orders})\n{scores}"
    reliability_diagram(conf, correct, n_bins, out_dir / "reliability.png", title)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    per_order = "; ".join(
        f"{name} order: accuracy {_fmt(o['accuracy'])}, position bias {_fmt(o['position_bias'], 2)}"
        for name, o in metrics["orders"].items()
    )
    print(
        f"eval-feedback: {Path(evals).name} (n={metrics['examples']}, {orders}): {scores}\n"
        f"  {per_order}; unswappable rows {metrics['unswappable_rows']}; chance accuracy "
        f"{metrics['chance_accuracy']:.3f}; wrote {out_dir}/"
    )
    return metrics
