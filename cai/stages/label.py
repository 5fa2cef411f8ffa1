"""Response pairs and AI preference labels: ``cai label --config configs/label/tiny.yaml``.

For every prompt the policy (the SL-CAI model) samples two responses; one or more feedback models compare them by
principles sampled from the constitution (``cai.method.feedback``), and the result is a soft label: the probability that
one response is better. Records are appended to ``records.jsonl`` chunk by chunk, so a killed run continues where
it stopped when started again, with the pairs the uninterrupted run would have sampled: both samples of a prompt are
keyed by its id (``Generator.generate(keys=...)``), not by its chunk or batch (the feedback scores can differ in
their last float bits: a batch is padded to its longest question). ``settings.json`` in the output folder holds the
settings that determine the records; a rerun with other settings stops before any work unless ``overwrite`` is set.
The finished labels are also written as a ``datasets`` folder ``pairs/`` in TRL's preference form (``prompt``,
``chosen``, ``rejected``) plus ``p_chosen``, the probability that ``chosen`` is the
better response (at least 0.5 by construction).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from cai.method.constitution import Constitution, load_constitution
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from cai.method.generation import Generator, SamplingConfig
from cai.stages.sl_data import PromptSources, constitution_fingerprint, load_prompt_mix
from data.formats import PromptFormat
from data.jsonl import ResumableJsonl, check_out_dir, claim_out_dir
from models import ModelConfig, load_model, load_tokenizer, resolve_device
from models.errors import UserError, check_positive


def aggregate(p_by_model: list[float], how: str) -> float:
    """Combine the feedback models' probabilities: their mean, or the share of models that prefer A (vote)."""
    if how == "mean":
        return sum(p_by_model) / len(p_by_model)
    if how == "vote":
        return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_by_model) / len(p_by_model)
    raise ValueError(f"label: ensemble must be 'mean' or 'vote', not {how!r}")


def make_record(row: dict, a: str, b: str, p_a: float, principles: list[str], details: list[dict]) -> dict:
    """One output record: the pair, its label in both forms, and what produced it."""
    a_wins = p_a >= 0.5
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "response_a": a,
        "response_b": b,
        "p_a": p_a,
        "chosen": a if a_wins else b,
        "rejected": b if a_wins else a,
        "p_chosen": p_a if a_wins else 1.0 - p_a,
        "principle_ids": principles,
        "feedback": details,  # per feedback model: its p_a, raw log-probabilities, reasoning
    }


def run(
    out: str = "runs/label",
    policy: ModelConfig | None = None,
    feedback_models: list[ModelConfig] | None = None,
    prompts: PromptSources | None = None,
    sampling: SamplingConfig | None = None,
    feedback: FeedbackConfig | None = None,
    ensemble: Literal["mean", "vote"] = "mean",
    constitution: str = "default",
    chunk_size: int = 32,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Sample response pairs and label them with AI feedback; resumes when ``out`` already holds part of it.

    Args:
        out: Output folder: records.jsonl, pairs/ (a datasets folder) and summary.json.
        policy: The model that samples the two responses (the SL-CAI model).
        feedback_models: Models that compare the responses; None uses the policy. Several form an ensemble.
        prompts: Prompt sources (red-team prompts by default, no helpful ones).
        sampling: Sampling of the responses (two per prompt).
        feedback: Few-shot, principle ensemble, position-bias and chain-of-thought settings.
        ensemble: How several feedback models combine: ``mean`` of probabilities or majority ``vote``.
        constitution: ``default``, a project YAML file, or a folder with the paper's JSON files.
        chunk_size: Prompts per chunk; a chunk's records are written together. The pairs do not depend on it (nor
            on the batch sizes): both samples of a prompt are keyed by its id.
        seed: Seed of the principle sampling (per prompt, so a resumed run samples the same principles).
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        overwrite: Start again when ``out`` holds a run with other settings (its records are removed). Without it
            such a rerun stops before any work, naming the first setting that differs (``out/settings.json``).
    """
    if policy is None:
        raise UserError("label: policy.name_or_path is required (the SL-CAI model)")
    check_positive(chunk_size, "chunk_size")
    if ensemble not in ("mean", "vote"):
        raise UserError(f"label: ensemble={ensemble!r}: must be mean or vote")
    if sampling is not None and sampling.prompt_format == "raw":
        raise UserError("label: sampling.prompt_format must be auto, chat or transcript (prompts are rendered here)")
    prompts = prompts or PromptSources(helpful=None)
    sampling, feedback = sampling or SamplingConfig(), feedback or FeedbackConfig()
    out_dir = check_out_dir(out, "label")
    const = load_constitution(constitution)
    const.require_feedback("label")
    tok = load_tokenizer(policy.tokenizer or policy.name_or_path, padding_side="left")
    rows, counts = load_prompt_mix(prompts, tok)
    fmt = PromptFormat(tok, sampling.prompt_format)  # checked before any work
    settings = {
        "stage": "label",
        "policy": asdict(policy),
        "feedback_models": [asdict(m) for m in feedback_models] if feedback_models else None,
        "prompts": asdict(prompts),
        # Batch sizes do not change records; label always samples two responses per prompt.
        "sampling": {k: v for k, v in asdict(sampling).items() if k not in ("batch_size", "num_samples")},
        "feedback": {k: v for k, v in asdict(feedback).items() if k != "batch_size"},
        "ensemble": ensemble,
        "constitution": constitution_fingerprint(const),
        "seed": seed,
        "prompt_format": fmt.kind,
    }
    claim_out_dir(out_dir, settings, "label", overwrite, ["records.jsonl", "summary.json", "pairs"])
    store = ResumableJsonl(out_dir / "records.jsonl")
    todo = [r for r in rows if r["id"] not in store.done]
    print(f"label: {len(rows)} prompts, {len(rows) - len(todo)} already done, {len(todo)} to go -> {out_dir}")
    if todo:
        dev = resolve_device(device)
        policy_model = load_model(policy).to(dev)
        gen = Generator(policy_model, tok, replace(sampling, num_samples=2))
        scorers = []
        for fm in feedback_models or [policy]:
            same = fm.name_or_path == policy.name_or_path
            model = policy_model if same else load_model(fm).to(dev)  # one copy when the policy labels itself
            ftok = tok if same else load_tokenizer(fm.tokenizer or fm.name_or_path, padding_side="left")
            scorers.append(FeedbackScorer(model, ftok, const, feedback, prompt_format=sampling.prompt_format))
        k = min(feedback.num_principles, len(const.feedback))
        start = time.time()
        with tqdm(total=len(todo), desc="label", unit="prompt") as bar:
            for i in range(0, len(todo), chunk_size):
                chunk = todo[i : i + chunk_size]
                # Keyed by prompt id (samples 0 and 1): the pair is the same whatever the chunk, batch or resume.
                pairs = gen.generate([r["prompt"] for r in chunk], keys=[r["id"] for r in chunk])
                items = [
                    {
                        "prompt": r["prompt"],
                        "response_a": g[0].text,
                        "response_b": g[1].text,
                        "principles": [p.id for p in Constitution.sampler(seed, r["id"]).sample(const.feedback, k)],
                    }
                    for r, g in zip(chunk, pairs)
                ]
                scored = [s.score(items) for s in scorers]  # per model, per item
                records = []
                for j, (r, it) in enumerate(zip(chunk, items)):
                    details = [s[j] for s in scored]
                    p_a = aggregate([d["p_a"] for d in details], ensemble)
                    rec = make_record(r, it["response_a"], it["response_b"], p_a, it["principles"], details)
                    records.append(rec | {"finished_a": pairs[j][0].finished, "finished_b": pairs[j][1].finished})
                store.write(records)
                bar.update(len(chunk))
        print(f"label: {len(todo)} prompts in {time.time() - start:.1f}s")
    done = {r["id"]: r for r in store.read()}
    records = [done[r["id"]] for r in rows if r["id"] in done]
    write_pairs(records, out_dir / "pairs")
    p = [r["p_chosen"] for r in records]
    fallbacks = sum(d["cot_fallbacks"] for r in records for d in r["feedback"])
    judgements = sum(len(d["logprobs"]) for r in records for d in r["feedback"])
    warnings = []
    if feedback.chain_of_thought and judgements and fallbacks > judgements / 2:
        warnings.append(
            f"{fallbacks} of {judgements} chain-of-thought reasonings fell back to plain scoring (empty or cut off): "
            "these labels are clamped plain labels, not chain-of-thought ones"
        )
    ties = sum(r["p_chosen"] == 0.5 for r in records)
    if records and ties > len(records) / 2:
        warnings.append(f"{ties} of {len(records)} labels are exactly 0.5: the feedback model expresses no preference")
    for w in warnings:
        print(f"WARNING: label: {w}", file=sys.stderr)
    summary = {
        "prompts": len(rows),
        "pairs": len(records),
        **counts,
        "cot_fallbacks": fallbacks,
        "cot_judgements": judgements if feedback.chain_of_thought else 0,
        "ties": ties,
        "unfinished_responses": sum(not r.get(k, True) for r in records for k in ("finished_a", "finished_b")),
        "prompt_format": fmt.kind,
        "warnings": warnings,
        "identical_pairs": sum(r["response_a"] == r["response_b"] for r in records),
        "mean_p_chosen": sum(p) / len(p) if p else None,
        "chain_of_thought": feedback.chain_of_thought,
        "policy": policy.name_or_path,
        "constitution": const.name,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"label: wrote {out_dir / 'records.jsonl'} and {out_dir / 'pairs'}; {fallbacks} chain-of-thought fallbacks")
    return out_dir


def write_pairs(records: list[dict], out: Path) -> Path:
    """Save the labelled pairs as a ``datasets`` folder in TRL's preference form plus the soft label."""
    from datasets import Dataset

    cols = ("id", "prompt", "chosen", "rejected", "p_chosen", "principle_ids")
    Dataset.from_list([{c: r[c] for c in cols} for r in records]).save_to_disk(str(out))
    return out
