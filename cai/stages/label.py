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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm.auto import tqdm

from cai.method.constitution import Constitution, load_constitution
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from cai.method.generation import Generator, SamplingConfig
from cai.method.prompt_mix import PromptSources, constitution_fingerprint, load_prompt_mix
from data.formats import PromptFormat
from data.jsonl import ResumableJsonl, check_out_dir, claim_out_dir
from models import ModelConfig, load_model, load_tokenizer, resolve_device
from models.errors import UserError, check_positive

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


@dataclass
class LabelSettings:
    """The settings of ``cai label`` (the arguments of ``run``), checked when built."""

    out: str = "runs/label"
    """Output folder: records.jsonl, pairs/ (a datasets folder), settings.json and summary.json."""
    policy: ModelConfig | None = None
    """The model that samples the two responses (the SL-CAI model); required."""
    feedback_models: list[ModelConfig] | None = None
    """Models that compare the responses; None uses the policy. Several form an ensemble."""
    prompts: PromptSources | None = None
    """Prompt sources; None: red-team prompts only (``PromptSources(helpful=None)``)."""
    sampling: SamplingConfig | None = None
    """Sampling of the responses (two per prompt; ``num_samples`` is set here); None: the defaults."""
    feedback: FeedbackConfig | None = None
    """Few-shot, principle ensemble, position-bias and chain-of-thought settings; None: the defaults."""
    ensemble: Literal["mean", "vote"] = "mean"
    """How several feedback models combine: ``mean`` of probabilities or majority ``vote`` (``aggregate``)."""
    constitution: str = "default"
    """``default``, a project YAML file, or a folder with the paper's JSON files."""
    chunk_size: int = 32
    """Prompts per chunk; a chunk's records are written together (the pairs do not depend on it)."""
    seed: int = 0
    """Seed of the principle sampling (per prompt, so a resumed run samples the same principles)."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    overwrite: bool = False
    """Start again when ``out`` holds a run with other settings (its records are removed)."""

    def __post_init__(self):
        if self.policy is None:
            raise UserError("label: policy.name_or_path is required (the SL-CAI model)")
        check_positive(self.chunk_size, "chunk_size")
        if self.ensemble not in ("mean", "vote"):
            raise UserError(f"label: ensemble={self.ensemble!r}: must be mean or vote")
        if self.sampling is not None and self.sampling.prompt_format == "raw":
            raise UserError(
                "label: sampling.prompt_format must be auto, chat or transcript (prompts are rendered here)"
            )
        self.prompts = self.prompts or PromptSources(helpful=None)
        self.sampling, self.feedback = self.sampling or SamplingConfig(), self.feedback or FeedbackConfig()


@dataclass
class LabelJob:
    """What ``prepare`` found: the run's folder, prompts, constitution and tokenizer, and its records so far."""

    out_dir: Path
    """The output folder, claimed for these settings."""
    constitution: Constitution
    """The loaded constitution (it has feedback principles)."""
    tokenizer: PreTrainedTokenizerBase
    """The policy's tokenizer (left padding)."""
    rows: list[dict]
    """Every prompt row ``{id, prompt, kind}``, in order."""
    counts: dict
    """Prompts skipped while loading, by reason."""
    prompt_format: str
    """The resolved prompt format (``chat`` or ``transcript``)."""
    store: ResumableJsonl
    """``records.jsonl``: the records written so far, and where the next go."""


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

    The arguments are checked together as a ``LabelSettings``; then ``prepare`` (prompts, constitution, the claim
    on ``out``), ``label_prompts`` (the prompts not done yet, chunk by chunk) and ``finish`` (pairs/ and the summary).

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
    s = LabelSettings(
        out, policy, feedback_models, prompts, sampling, feedback, ensemble, constitution, chunk_size, seed, device,
        overwrite,
    )  # fmt: skip
    job = prepare(s)
    todo = [r for r in job.rows if r["id"] not in job.store.done]
    print(
        f"label: {len(job.rows)} prompts, {len(job.rows) - len(todo)} already done, {len(todo)} to go -> {job.out_dir}"
    )
    if todo:
        start = time.time()
        label_prompts(s, job, todo)
        print(f"label: {len(todo)} prompts in {time.time() - start:.1f}s")
    finish(s, job)
    return job.out_dir


def prepare(s: LabelSettings) -> LabelJob:
    """Load the constitution, the tokenizer and the prompts, and claim ``s.out`` for these settings (no model yet).

    Raises:
        UserError: when ``s.out`` holds a run with other settings and ``s.overwrite`` is not set, or when the
            constitution has no feedback principles.
    """
    out_dir = check_out_dir(s.out, "label")
    const = load_constitution(s.constitution)
    const.require_feedback("label")
    tok = load_tokenizer(s.policy.tokenizer or s.policy.name_or_path, padding_side="left")
    rows, counts = load_prompt_mix(s.prompts, tok)
    fmt = PromptFormat(tok, s.sampling.prompt_format)  # checked before any work
    settings = {
        "stage": "label",
        "policy": asdict(s.policy),
        "feedback_models": [asdict(m) for m in s.feedback_models] if s.feedback_models else None,
        "prompts": asdict(s.prompts),
        # Batch sizes do not change records; label always samples two responses per prompt.
        "sampling": {k: v for k, v in asdict(s.sampling).items() if k not in ("batch_size", "num_samples")},
        "feedback": {k: v for k, v in asdict(s.feedback).items() if k != "batch_size"},
        "ensemble": s.ensemble,
        "constitution": constitution_fingerprint(const),
        "seed": s.seed,
        "prompt_format": fmt.kind,
    }
    claim_out_dir(out_dir, settings, "label", s.overwrite, ["records.jsonl", "summary.json", "pairs"])
    store = ResumableJsonl(out_dir / "records.jsonl")
    return LabelJob(out_dir, const, tok, rows, counts, fmt.kind, store)


def label_prompts(s: LabelSettings, job: LabelJob, todo: list[dict]) -> None:
    """Sample a pair for every row of ``todo`` and label it; each chunk's records are appended to ``job.store``."""
    dev = resolve_device(s.device)
    policy_model = load_model(s.policy).to(dev)
    gen = Generator(policy_model, job.tokenizer, replace(s.sampling, num_samples=2))
    scorers = []
    for fm in s.feedback_models or [s.policy]:
        same = fm.name_or_path == s.policy.name_or_path
        model = policy_model if same else load_model(fm).to(dev)  # one copy when the policy labels itself
        ftok = job.tokenizer if same else load_tokenizer(fm.tokenizer or fm.name_or_path, padding_side="left")
        scorers.append(
            FeedbackScorer(model, ftok, job.constitution, s.feedback, prompt_format=s.sampling.prompt_format)
        )
    k = min(s.feedback.num_principles, len(job.constitution.feedback))
    with tqdm(total=len(todo), desc="label", unit="prompt") as bar:
        for i in range(0, len(todo), s.chunk_size):
            chunk = todo[i : i + s.chunk_size]
            # Keyed by prompt id (samples 0 and 1): the pair is the same whatever the chunk, batch or resume.
            pairs = gen.generate([r["prompt"] for r in chunk], keys=[r["id"] for r in chunk])
            items = [
                {
                    "prompt": r["prompt"],
                    "response_a": g[0].text,
                    "response_b": g[1].text,
                    "principles": [
                        p.id for p in Constitution.sampler(s.seed, r["id"]).sample(job.constitution.feedback, k)
                    ],
                }
                for r, g in zip(chunk, pairs)
            ]
            scored = [sc.score(items) for sc in scorers]  # per model, per item
            records = []
            for j, (r, it) in enumerate(zip(chunk, items)):
                details = [sc[j] for sc in scored]
                p_a = aggregate([d["p_a"] for d in details], s.ensemble)
                rec = make_record(r, it["response_a"], it["response_b"], p_a, it["principles"], details)
                records.append(rec | {"finished_a": pairs[j][0].finished, "finished_b": pairs[j][1].finished})
            job.store.write(records)
            bar.update(len(chunk))


def finish(s: LabelSettings, job: LabelJob) -> dict:
    """Write ``pairs/`` and ``summary.json`` from every record (in prompt order), warn of weak labels; the summary."""
    done = {r["id"]: r for r in job.store.read()}
    records = [done[r["id"]] for r in job.rows if r["id"] in done]
    write_pairs(records, job.out_dir / "pairs")
    p = [r["p_chosen"] for r in records]
    fallbacks = sum(d["cot_fallbacks"] for r in records for d in r["feedback"])
    judgements = sum(len(d["logprobs"]) for r in records for d in r["feedback"])
    warnings = []
    if s.feedback.chain_of_thought and judgements and fallbacks > judgements / 2:
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
        "prompts": len(job.rows),
        "pairs": len(records),
        **job.counts,
        "cot_fallbacks": fallbacks,
        "cot_judgements": judgements if s.feedback.chain_of_thought else 0,
        "ties": ties,
        "unfinished_responses": sum(not r.get(k, True) for r in records for k in ("finished_a", "finished_b")),
        "prompt_format": job.prompt_format,
        "warnings": warnings,
        "identical_pairs": sum(r["response_a"] == r["response_b"] for r in records),
        "mean_p_chosen": sum(p) / len(p) if p else None,
        "chain_of_thought": s.feedback.chain_of_thought,
        "policy": s.policy.name_or_path,
        "constitution": job.constitution.name,
    }
    (job.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    out = job.out_dir
    print(f"label: wrote {out / 'records.jsonl'} and {out / 'pairs'}; {fallbacks} chain-of-thought fallbacks")
    return summary


def write_pairs(records: list[dict], out: Path) -> Path:
    """Save the labelled pairs as a ``datasets`` folder in TRL's preference form plus the soft label."""
    from datasets import Dataset

    cols = ("id", "prompt", "chosen", "rejected", "p_chosen", "principle_ids")
    Dataset.from_list([{c: r[c] for c in cols} for r in records]).save_to_disk(str(out))
    return out
