"""What running each pair's shared prompt once saves the preference model, on real preference data.

``PreferenceModel.forward_pairs`` runs the tokens both texts of a pair start with once, through a KV cache, instead
of once per text. How much that saves depends on the data: how long the shared conversation is next to the two
responses. This script reads a preference data set, batches it as ``cai pm`` does, and prints

- token positions the backbone computes per batch, padding included, with and without sharing;
- the time of one training step's forward and backward pass of a preference model over those batches, with and
  without sharing (median of ``--repeats`` passes over the same batches, alternating).

The paper's 438 HHH comparisons (``../shared/anthropic-cai/evals/438HHHEvaluations.jsonl``: ``text_correct`` and
``text_incorrect`` are whole transcripts that share the conversation) are read with ``--hhh``:

    python scripts/bench_shared_prompt.py --hhh ../shared/anthropic-cai/evals/438HHHEvaluations.jsonl
    python scripts/bench_shared_prompt.py --data runs/tiny/label/pairs --model runs/tiny/sft/hf
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.formats import PromptFormat
from data.preference import PreferenceCollator, join_pairs, shared_prefix_length, tokenize_pair
from data.sft import load_any_dataset
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel
from models.tiny import TinyModelConfig, make_tiny_model

# The compute-bound CPU model of scripts/bench_vs_trl.py's "small" preset (3.2M parameters): its step is matrix work.
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def read_pairs(args) -> list[dict]:
    """Rows with ``chosen`` and ``rejected`` (and ``prompt`` when the data has it)."""
    if args.hhh:
        with open(args.hhh) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [{"chosen": r["text_correct"], "rejected": r["text_incorrect"]} for r in rows]
    return list(load_any_dataset(args.data))


def step_seconds(pm, batches, share: bool) -> float:
    """Seconds of forward and backward passes over ``batches``."""
    t0 = time.perf_counter()
    for b in batches:
        r_c, r_r = pm.forward_pairs(
            b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"], share, b["width"]
        )
        torch.nn.functional.logsigmoid(r_c - r_r).mean().neg().backward()
    pm.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hhh", help="the paper's 438HHHEvaluations.jsonl (text_correct vs text_incorrect)")
    src.add_argument("--data", help="preference data in any form `cai pm` reads")
    ap.add_argument("--model", help="model directory; default: a random llama of the `small` shape (3.2M parameters)")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per batch")
    ap.add_argument("--n_batches", type=int, default=8, help="batches timed (the first ones of the data)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_tiny_model(Path(tmp) / "small", TinyModelConfig(overrides=SMALL)))
        tok = load_tokenizer(model, padding_side="right")
        source = args.hhh or args.data
        examples = [tokenize_pair(r, PromptFormat(tok), args.max_length, True, source) for r in read_pairs(args)]
        collate = PreferenceCollator(tok.pad_token_id)
        batches = [collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]

        whole = sum(join_pairs(b, tok.pad_token_id)[0].numel() for b in batches)  # whole texts, right-padded
        shared = sum(b["prompt_ids"].numel() + b["response_ids"].numel() for b in batches)
        real = sum(2 * int(b["prompt_mask"].sum()) + int(b["response_mask"].sum()) for b in batches)
        common = sum(2 * shared_prefix_length(e["chosen_ids"], e["rejected_ids"]) for e in examples) / real
        prompt_share = sum(2 * int(b["prompt_mask"].sum()) for b in batches) / real
        n = len(examples)
        print(f"{source}: {n} pairs, {len(batches)} batches of {args.batch_size}, max_length {args.max_length}")
        print(f"tokens the two texts of a pair start with in common: {common:.1%} of both texts' tokens; "
              f"in the prompt blocks as batched (prefixes capped against padding): {prompt_share:.1%}")  # fmt: skip
        print(f"token positions computed (padding included): whole texts {whole:,}, shared prompt {shared:,} "
              f"({whole / shared:.2f}x fewer)")  # fmt: skip

        pm = PreferenceModel.from_pretrained(ModelConfig(model, dtype="float32"))
        pm.train()
        timed = batches[: args.n_batches]
        step_seconds(pm, timed[:1], True)  # warm-up
        times = {True: [], False: []}
        for i in range(args.repeats):
            for share in (True, False) if i % 2 == 0 else (False, True):
                times[share].append(step_seconds(pm, timed, share))
        n_params = sum(p.numel() for p in pm.parameters())
        t_shared, t_whole = statistics.median(times[True]), statistics.median(times[False])
        print(f"forward + backward of {len(timed)} batches, {n_params / 1e6:.1f}M-parameter model, "
              f"{args.threads} thread(s), median of {args.repeats}: whole texts {t_whole:.2f} s, "
              f"shared prompt {t_shared:.2f} s ({t_whole / t_shared:.2f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
