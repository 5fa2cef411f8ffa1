"""Tokens per second of ``cai.method.generation.Generator`` against two baselines on a prompt list.

The first baseline is how the seed recipe samples: a transformers text-generation pipeline called on the list of
prompts (one prompt at a time). The second, stronger one is batched ``model.generate``: the same batches as the
engine (sorted by length, left-padded), ``do_sample=True``. All sample with the same model, prompts, temperature,
top_p and ``max_new_tokens``; only generated tokens count (up to and including an end token). Runs alternate
(pipeline, generate, engine, pipeline, ...) so that load on the machine hits all alike, and each figure is the
median of ``--repeats`` runs.

    python scripts/bench_generation.py --preset small --num_prompts 64
    OMP_NUM_THREADS=1 python scripts/bench_generation.py --model runs/smollm2/base_model --num_prompts 32 \
        --max_new_tokens 32 --batch_size 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import pipeline

from cai.method.generation import Generator, SamplingConfig, length_buckets
from data.prompts import load_prompts
from models import ModelConfig, load_model, load_tokenizer
from models.padding import pad_rows
from models.tiny import TinyModelConfig, make_tiny_model

PRESETS = {
    "tiny": {},
    # ~25M parameters: large enough that matrix work, not Python overhead, dominates a decoding step on a CPU.
    "small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--model", help="a model directory or hub id instead of a preset")
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.model or make_tiny_model(tempfile.mkdtemp(), TinyModelConfig(overrides=PRESETS[args.preset]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(str(path), padding_side="left")
    model = load_model(ModelConfig(str(path))).to(device)
    prompts = [f"\n\nHuman: {p}\n\nAssistant:" for p in load_prompts("red_team")["prompt"][: args.num_prompts]]
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=0.95,
        stop=[],
        batch_size=args.batch_size,
        prompt_format="raw",
    )
    engine = Generator(model, tok, cfg)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device=model.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {path} ({n_params / 1e6:.1f}M parameters) on {device}; {len(prompts)} prompts, "
        f"max_new_tokens={args.max_new_tokens}, torch threads={torch.get_num_threads()}"
    )

    def run_engine() -> float:
        t = time.perf_counter()
        out = engine.generate(prompts)
        return sum(len(g.response_ids) for gs in out for g in gs) / (time.perf_counter() - t)

    def run_pipeline() -> float:
        t = time.perf_counter()
        out = pipe(
            prompts,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            top_k=0,  # off, as in the engine's settings (HF's default is 50)
            return_tensors=True,
            pad_token_id=tok.pad_token_id,
        )
        n = sum(len(o[0]["generated_token_ids"]) - len(tok(p)["input_ids"]) for o, p in zip(out, prompts))
        return n / (time.perf_counter() - t)

    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    ends = set(engine.stop_ids) | {tok.eos_token_id}

    @torch.no_grad()
    def run_generate() -> float:
        t, n = time.perf_counter(), 0
        for batch in length_buckets([len(x) for x in ids], args.batch_size):
            input_ids, mask = pad_rows([ids[i] for i in batch], tok.pad_token_id, "left", model.device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=0,  # off, as in the engine's settings
                pad_token_id=tok.pad_token_id,
                eos_token_id=list(ends),
            )
            for row in out[:, input_ids.shape[1] :].tolist():
                n += next((j + 1 for j, x in enumerate(row) if x in ends), len(row))
        return n / (time.perf_counter() - t)

    runs = {"pipe": [], "generate": [], "engine": []}
    for _ in range(args.repeats):  # alternate so that drift of the machine hits all alike
        runs["pipe"].append(run_pipeline())
        runs["generate"].append(run_generate())
        runs["engine"].append(run_engine())
    med = {k: statistics.median(v) for k, v in runs.items()}
    names = {
        "pipe": "pipeline('text-generation')",
        "generate": f"batched model.generate (batch {args.batch_size})",
        "engine": f"cai Generator (batch {args.batch_size})",
    }
    print("| system | tokens/s (median) | runs |\n|---|---|---|")
    for k, v in runs.items():
        print(f"| {names[k]} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")
    ratio_pipe, ratio_generate = med["engine"] / med["pipe"], med["engine"] / med["generate"]
    print(f"speed-up: {ratio_pipe:.1f}x over the pipeline, {ratio_generate:.2f}x over batched generate")


if __name__ == "__main__":
    main()
