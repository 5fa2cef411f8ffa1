"""Tokens per second of ``cai.method.generation.Generator`` against ``pipeline("text-generation")`` on a prompt list.

The baseline is how the seed recipe samples: a transformers text-generation pipeline called on the list of prompts.
Both sample with the same model, prompts, temperature, top_p and ``max_new_tokens``; only generated tokens count.
Runs alternate and each figure is the median of ``--repeats`` runs.

    python scripts/bench_generation.py --preset small --num_prompts 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import pipeline

from cai.method.generation import Generator, SamplingConfig
from data.prompts import load_prompts
from models import ModelConfig, load_model, load_tokenizer
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
            return_tensors=True,
            pad_token_id=tok.pad_token_id,
        )
        n = sum(len(o[0]["generated_token_ids"]) - len(tok(p)["input_ids"]) for o, p in zip(out, prompts))
        return n / (time.perf_counter() - t)

    engine_tps, pipe_tps = [], []
    for _ in range(args.repeats):  # alternate so that drift of the machine hits both alike
        pipe_tps.append(run_pipeline())
        engine_tps.append(run_engine())
    e, p = statistics.median(engine_tps), statistics.median(pipe_tps)
    print("| system | tokens/s (median) | runs |\n|---|---|---|")
    print(f"| pipeline('text-generation') | {p:,.0f} | {', '.join(f'{x:,.0f}' for x in pipe_tps)} |")
    print(f"| cai Generator (batch {args.batch_size}) | {e:,.0f} | {', '.join(f'{x:,.0f}' for x in engine_tps)} |")
    print(f"speed-up: {e / p:.1f}x")


if __name__ == "__main__":
    main()
