"""SL-CAI data: critique-revision of red-team responses (Bai et al. 2022, section 3.1).

For each red-team prompt the model writes a response; then, ``rounds`` times, a principle is sampled from the
constitution, the model critiques its latest response by that principle and revises it. Few-shot critique/revision
dialogues go in front of every critique and revision prompt so that a pretrained model stays in role. Helpful
prompts are mixed in with plain responses (no critique), as the paper does to keep the SL-CAI model helpful.

Every round advances all prompts of a chunk together, in batches. Each chunk's records are appended to
``records.jsonl`` as soon as the chunk is done, so a killed run loses at most one chunk of work and started again
with the same command continues where it stopped. The resumed run is the same run: every sample is keyed by (seed,
prompt id, step) (``Generator.generate(keys=...)``), so no record depends on the chunking, the batching or where the
run was killed. The output folder's ``settings.json`` holds the settings that determine the records; a rerun with
other settings stops before any work unless ``overwrite`` is set.

Each round restarts from "Human: prompt / Assistant: latest response" rather than appending all earlier rounds to
one growing context (the paper's transcripts grow); the model is asked the same thing and the context stays bounded.

Every text is laid out by ``data.formats.PromptFormat``: the paper's transcript for base models, the chat template
(critique and revision requests as user turns) for instruct models. A response that runs to ``max_new_tokens``
without ending is *unfinished*: a cut-off revision is not used as an answer (the latest finished response stays the
final one), and a record whose final response is unfinished is left out of the SFT split unless
``keep_unfinished`` is set; ``summary.json`` counts both.

Run as ``cai sl-data --config configs/sl_data/tiny.yaml``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from cai.method.constitution import Constitution, load_constitution
from cai.method.generation import Generator, SamplingConfig
from cai.method.prompt_mix import PromptSources, constitution_fingerprint, load_prompt_mix, without
from data.formats import PromptFormat
from data.jsonl import ResumableJsonl, check_out_dir, claim_out_dir
from models import ModelConfig, load_model, load_tokenizer, resolve_device
from models.errors import UserError, check_positive


@dataclass
class CritiqueConfig:
    """How the critique-revision loop runs."""

    rounds: int = 4
    """Critique-revision rounds per red-team prompt (the paper uses 4)."""
    style: Literal["plain", "strong", "cot"] = "plain"
    """``plain``: the principle's critique request; ``strong``: asks for a more thorough critique; ``cot``: asks the
    model to reason step by step (helpful, honest, harmless, non-toxic) before the revision."""
    num_few_shot: int | None = None
    """Few-shot dialogues put in front of each critique/revision prompt; None for all of the constitution's."""
    seed: int = 0
    """Seed of the principle sampling (per prompt and round, so a resumed run samples the same principles)."""
    keep_unfinished: bool = False
    """Treat responses that never ended (cut at ``max_new_tokens``) as answers. Off (the default for real models):
    a cut-off revision does not replace the latest finished response, and a record whose final response is cut off
    stays in ``records.jsonl`` with ``finished: false`` but is not trained on, since SFT would teach the model to stop
    mid-sentence. On: the old behaviour, for random models that never end a text."""

    def __post_init__(self):
        if self.rounds < 0:
            raise UserError(f"critique.rounds={self.rounds}: must be 0 or more")
        if self.num_few_shot is not None and self.num_few_shot < 0:
            raise UserError(f"critique.num_few_shot={self.num_few_shot}: must be None (all) or 0 or more")
        if self.style not in ("plain", "strong", "cot"):
            raise UserError(f"critique.style={self.style!r}: must be plain, strong or cot")


def critique_revise(
    gen: Generator,
    constitution: Constitution,
    rows: list[dict],
    cfg: CritiqueConfig,
    sampling: SamplingConfig,
    stats: dict,
) -> list[dict]:
    """Run the initial response and ``cfg.rounds`` critique-revision rounds for a chunk of prompts, batched.

    Args:
        gen: The generation engine over the model being distilled.
        constitution: Principles and few-shot dialogues.
        rows: Prompt rows with ``id``, ``prompt`` and ``kind`` (``red_team`` or ``helpful``).
        cfg: Rounds, style and few-shot settings.
        sampling: Sampling settings for every call (the stop strings are set here).
        stats: Counters updated in place (``empty_revisions``).

    Returns:
        One record per row, in order.
    """
    fmt = PromptFormat(gen.tokenizer, sampling.prompt_format)
    stats.setdefault("empty_revisions", 0)
    stats.setdefault("unfinished_revisions", 0)

    def seeded(step: str, stops: str) -> SamplingConfig:
        # The initial answer is a prompt for the format to render; critiques and revisions come rendered already.
        how = sampling.prompt_format if step == "initial" else "raw"
        return replace(sampling, num_samples=1, stop=fmt.stop_strings(stops), prompt_format=how)

    def keys(recs: list[dict], step: str) -> list[str]:
        # Every sample is keyed by (seed, prompt id, step): the same whatever the chunking, the batching or what a
        # killed run had done, and different between steps (one seed for every call would correlate the rounds).
        return [f"{rec['id']}/{step}" for rec in recs]

    initial = gen.generate([r["prompt"] for r in rows], seeded("initial", "critique"), keys=keys(rows, "initial"))
    records = []
    for r, g in zip(rows, initial):
        records.append(
            {
                "id": r["id"],
                "kind": r["kind"],
                "prompt": r["prompt"],
                "initial_response": g[0].text,
                "initial_finished": g[0].finished,
                "rounds": [],
                "final_response": g[0].text,
                "finished": g[0].finished and bool(g[0].text),
            }
        )
    shots = (
        constitution.critique_few_shot
        if cfg.num_few_shot is None
        else constitution.critique_few_shot[: cfg.num_few_shot]
    )
    todo = [rec for rec in records if rec["kind"] == "red_team"]
    for k in range(cfg.rounds):
        principles = [
            constitution.sample_critique(Constitution.sampler(cfg.seed, f"{rec['id']}/{k}")) for rec in todo
        ]  # seeded per prompt and round: the same on resume, whatever the batching
        c_prompts = [
            fmt.critique_prompt(shots, rec["prompt"], rec["final_response"], p.critique_request, cfg.style)
            for rec, p in zip(todo, principles)
        ]
        critiques = [
            g[0] for g in gen.generate(c_prompts, seeded(f"critique{k}", "critique"), keys=keys(todo, f"critique{k}"))
        ]
        r_prompts = [
            fmt.revision_prompt(cp, c.text, p.revision_request) for cp, c, p in zip(c_prompts, critiques, principles)
        ]
        revisions = [
            g[0] for g in gen.generate(r_prompts, seeded(f"revision{k}", "critique"), keys=keys(todo, f"revision{k}"))
        ]
        for rec, p, c, rev in zip(todo, principles, critiques, revisions):
            rec["rounds"].append(
                {
                    "principle_id": p.id,
                    "critique": c.text,
                    "critique_finished": c.finished,
                    "revision": rev.text,
                    "revision_finished": rev.finished,
                }
            )
            # An empty revision is never an answer; a cut-off one only with keep_unfinished. Otherwise the latest
            # good response stays the final one.
            if not rev.text:
                stats["empty_revisions"] += 1
            elif rev.finished or cfg.keep_unfinished:
                rec["final_response"], rec["finished"] = rev.text, rev.finished
            else:
                stats["unfinished_revisions"] += 1
    for rec in records:
        rec["messages"] = [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["final_response"]},
        ]
    return records


def write_sft_split(records: list[dict], out: Path) -> Path:
    """Save the (prompt, final revision) pairs as a ``datasets`` directory for SFT (the caller picks the records)."""
    from datasets import Dataset

    ds = Dataset.from_list(
        [
            {
                "id": r["id"],
                "kind": r["kind"],
                "prompt": r["prompt"],
                "completion": r["final_response"],
                "messages": r["messages"],
            }
            for r in records
        ]
    )
    ds.save_to_disk(str(out))
    return out


def run(
    out: str = "runs/sl_data",
    model: ModelConfig | None = None,
    prompts: PromptSources | None = None,
    critique: CritiqueConfig | None = None,
    sampling: SamplingConfig | None = None,
    constitution: str = "default",
    chunk_size: int = 64,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Generate SL-CAI critique-revision data; resumes when ``out`` already holds part of it.

    Args:
        out: Output folder: records.jsonl (one record per prompt), sft/ (a datasets split) and summary.json.
        model: The model that answers, critiques and revises (a helpful RLHF model in the paper).
        prompts: Red-team and helpful prompt sources and their mix.
        critique: Rounds, critique style and few-shot settings.
        sampling: Sampling settings (temperature, top_p, max_new_tokens, batch_size, seed).
        constitution: ``default``, a project YAML file, or a folder with the paper's JSON files.
        chunk_size: Prompts per chunk; a chunk's records are written together when it finishes. Records do not
            depend on it (nor on ``sampling.batch_size``): every sample is keyed by prompt id and step.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        overwrite: Start again when ``out`` holds a run with other settings (its records are removed). Without it
            such a rerun stops before any work, naming the first setting that differs (``out/settings.json``).
    """
    if model is None:
        raise UserError("sl-data: model.name_or_path is required (a model directory or hub id)")
    check_positive(chunk_size, "chunk_size")
    prompts, critique, sampling = prompts or PromptSources(), critique or CritiqueConfig(), sampling or SamplingConfig()
    out_dir = check_out_dir(out, "sl-data")
    const = load_constitution(constitution)
    tok = load_tokenizer(model.tokenizer or model.name_or_path, padding_side="left")
    rows, counts = load_prompt_mix(prompts, tok)
    fmt = PromptFormat(tok, sampling.prompt_format)  # checked before any work
    settings = {
        "stage": "sl-data",
        "model": asdict(model),
        "prompts": asdict(prompts),
        "critique": asdict(critique),
        # batch_size does not change records; num_samples and stop are set per step by critique_revise.
        "sampling": without(asdict(sampling), "batch_size", "num_samples", "stop"),
        "constitution": constitution_fingerprint(const),
        "prompt_format": fmt.kind,
    }
    claim_out_dir(out_dir, settings, "sl-data", overwrite, ["records.jsonl", "summary.json", "sft"])
    store = ResumableJsonl(out_dir / "records.jsonl")
    todo = [r for r in rows if r["id"] not in store.done]
    print(f"sl-data: {len(rows)} prompts, {len(rows) - len(todo)} already done, {len(todo)} to go -> {out_dir}")
    stats = {"empty_revisions": 0, "unfinished_revisions": 0}
    if todo:
        dev = resolve_device(device)
        gen = Generator(load_model(model).to(dev), tok, sampling)
        start = time.time()
        with tqdm(total=len(todo), desc="sl-data", unit="prompt") as bar:
            for i in range(0, len(todo), chunk_size):
                chunk = todo[i : i + chunk_size]
                store.write(critique_revise(gen, const, chunk, critique, sampling, stats))
                bar.update(len(chunk))
        print(f"sl-data: {len(todo)} prompts in {time.time() - start:.1f}s")
    done = {r["id"]: r for r in store.read()}
    records = [done[r["id"]] for r in rows if r["id"] in done]
    train = [r for r in records if critique.keep_unfinished or r.get("finished", True)]
    write_sft_split(train, out_dir / "sft")
    rounds = [rd for r in records for rd in r["rounds"]]
    summary = {
        "prompts": len(rows),
        "records": len(records),
        "sft_examples": len(train),
        "unfinished_records": sum(not r.get("finished", True) for r in records),
        "unfinished_initial_responses": sum(not r.get("initial_finished", True) for r in records),
        "unfinished_critiques": sum(not rd.get("critique_finished", True) for rd in rounds),
        "unfinished_revisions": sum(bool(rd["revision"]) and not rd.get("revision_finished", True) for rd in rounds),
        "empty_revisions": sum(not rd["revision"] for rd in rounds),
        "prompt_format": fmt.kind,
        "rounds": critique.rounds,
        **counts,
        "constitution": const.name,
        "model": model.name_or_path,
        "repaired_partial_line": store.repaired,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"sl-data: wrote {out_dir / 'records.jsonl'} and {out_dir / 'sft'}")
    return out_dir
