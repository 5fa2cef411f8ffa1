"""The floor under SFT's speed: a bare PyTorch loop over the same batches as ``bench_vs_trl.py --preset smollm2``.

No Lightning, no TRL: the Hugging Face model's own loss (all logits, as ``transformers`` computes it), ``backward``,
gradient clipping at 1.0 and AdamW at a constant rate, the rows in file order in batches of ``--batch_size``.
Tokens per second counts real (unpadded) tokens, as the benchmark does. If both systems are close to this figure,
neither can be made much faster without doing less arithmetic (fewer tokens: packing; fewer logits: only the
response positions), which is what docs/BENCHMARKS.md uses it to show.

    OMP_NUM_THREADS=1 python scripts/bench_sft_floor.py --model runs/smollm2/base_model --repeats 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]


def one_run(model_dir: str, data: str, batch_size: int, warmup: int, steps: int, seq_len: int) -> float:
    """Real tokens per second of ``steps`` timed optimizer steps after ``warmup`` untimed ones."""
    import torch

    from data.sft import SFTDataModule
    from models import ModelConfig, load_model

    torch.manual_seed(0)
    model = load_model(ModelConfig(model_dir, dtype="float32"))
    model.train()
    dm = SFTDataModule(train=data, val=data, tokenizer=model_dir, max_length=seq_len, batch_size=batch_size)
    dm.setup("fit")
    loader = dm._loader(dm.train_set, shuffle=False)  # file order, as the benchmark reads them
    if len(loader) < warmup + steps:  # before any step: a short file must not cost a run of the model first
        raise SystemExit(f"bench_sft_floor: {data} has fewer than {warmup + steps} batches ({len(loader)})")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tokens, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            break
        loss = model(**batch, use_cache=False).loss  # (B, T, V) logits inside, the mean over target tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/smollm2/base_model", help="the SmolLM2 folder (models.gguf import)")
    ap.add_argument("--sft_data", help="sl-data output or JSONL (default: the paper's SL-CAI samples)")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--n_rows", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs, each in a fresh process")
    ap.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        rate = one_run(args.model, args.worker[0], args.batch_size, args.warmup, args.steps, args.seq_len)
        Path(args.worker[1]).write_text(str(rate))
        return
    from bench_presets import source_paths, write_real_data

    with tempfile.TemporaryDirectory(prefix="bench_sft_floor_") as tmp:
        sft_source, _ = source_paths(args.sft_data, None, ["sft"])
        paths, notes = write_real_data(
            Path(args.model), Path(tmp), args.seq_len, args.n_rows, args.batch_size, sft_source, None
        )
        print("; ".join(notes), flush=True)
        rates = []
        for r in range(args.repeats):
            out = Path(tmp) / f"rate{r}"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", paths["sft_cai"], str(out)]
            if rc := subprocess.run(cmd).returncode:  # the worker printed its one-line reason
                sys.exit(rc)
            rates.append(float(out.read_text()))
            print(f"  bare loop run {r + 1}: {rates[-1]:.1f} tokens/s", flush=True)
    rates.sort()
    print(f"bare PyTorch SFT loop: median {rates[len(rates) // 2]:.1f} tokens/s over {len(rates)} runs")


if __name__ == "__main__":
    main()
