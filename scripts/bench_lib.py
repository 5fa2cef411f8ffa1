"""Shared parts of ``scripts/bench_vs_trl.py``'s workers: model and data set-up, timing, memory, the worker entry.

The workers themselves: ``bench_cai.py`` (this project), ``bench_trl.py`` (TRL) and ``bench_parity.py`` (the loss
checks on identical inputs).

Each measured run happens in a fresh process (``bench_vs_trl.py --_worker NAME --_spec FILE``) so that its peak
memory belongs to one system and one run. A worker prints one line ``BENCH_RESULT {json}`` at the end.

Throughput is measured the same way in both systems: a forward pre-hook on the network counts the real (non-padding)
tokens and the rows of every training forward pass, and a step callback (a Lightning ``Callback`` here, a
``transformers.TrainerCallback`` in TRL) reads the clock at the end of optimizer step ``warmup`` and at the end of
step ``warmup + steps``. The window holds ``steps`` whole steps: data loading, forward, backward, clipping, optimizer
and scheduler step, and each system's own per-step bookkeeping (metrics, logging hooks).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
EOS_TEXT = "<|endoftext|>"  # models.tiny.EOS_TOKEN, written out so that this module imports nothing heavy
FILLER = "a"  # one token on its own (" a") in the tiny tokenizer: used to hit exact lengths


# ----------------------------------------------------------------------------- model and data


def build_model(out: Path, arch: str, overrides: dict, vocab_size: int | None, seed: int = 0) -> Path:
    """A random model of ``arch`` with the tiny offline tokenizer, saved with ``save_pretrained`` in ``out``.

    Args:
        out: Output directory.
        arch: Hugging Face ``model_type`` (llama, qwen2, ...).
        overrides: Config fields that replace the tiny defaults (hidden size, layers, ...).
        vocab_size: Embedding rows of the network when larger than the tokenizer's (e.g. Qwen2's 151936, so that the
            embedding and LM head cost what they cost in the real model); the extra rows are never indexed.
        seed: Weight initialisation seed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.tiny import ARCHITECTURES, TinyModelConfig, make_tiny_model

    if vocab_size is None:
        return make_tiny_model(out, TinyModelConfig(arch=arch, seed=seed, overrides=overrides))
    make_tiny_model(out, TinyModelConfig(arch=arch, seed=seed))  # the tokenizer, and a small model replaced below
    tok = AutoTokenizer.from_pretrained(out)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **ids, **{**ARCHITECTURES[arch], **overrides})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def count_parameters(model_dir: Path) -> int:
    """Parameters of the causal LM saved in ``model_dir`` (tied weights once), without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def _exact_words(rng: random.Random, words: list[str], cost: dict[str, int], n_tokens: int, count) -> str:
    """Random words whose text ``count`` gives exactly ``n_tokens`` tokens.

    Words are drawn while their summed token ``cost`` fits, then the count of the whole text is corrected with
    one-token fillers (a few tokenizer calls per text instead of one per word).
    """
    picked = [rng.choice(words)]
    total = count(picked)
    for _ in range(n_tokens * 4):  # words while they fit, then fillers for the last token or two
        word = rng.choice(words)
        if total + cost[word] <= n_tokens - 1:
            picked.append(word)
            total += cost[word]
    for _ in range(64):
        n = count(picked)
        if n == n_tokens:
            return " ".join(picked)
        if n < n_tokens:
            picked += [FILLER] * (n_tokens - n)
        else:
            picked.pop()
    raise RuntimeError(f"cannot make a text of exactly {n_tokens} tokens")


def write_data(model_dir: Path, out: Path, n_rows: int, seq_len: int, seed: int = 0) -> dict[str, str]:
    """Synthetic SFT and preference sets in each system's own input format, with the same token ids in both.

    SFT rows are exactly ``seq_len`` tokens (a quarter prompt, the rest completion with its EOS), so no batch has
    padding and every step does the same work in both systems whatever the shuffling. Preference rows: chosen texts
    are ``seq_len`` tokens, rejected ones 0-15 tokens shorter, so every batch is ``seq_len`` wide and only rejected
    rows are padded (which the parity check needs in order to test where the reward is read).

    This project's files hold the bare prompt and responses (``data.formats`` lays them out in the tiny model's
    chat template, "\\n\\nHuman: ...\\n\\nAssistant: ..." closed by EOS); TRL's hold the framed prompt, and TRL
    appends the EOS token itself. Both systems therefore see the same ids (TRL reads the reward at the EOS token;
    ours reads it at the last real token, which is the same token).

    Returns:
        Paths of ``sft_cai``, ``sft_trl``, ``rm_cai`` and ``rm_trl`` (JSONL).
    """
    from data.formats import PromptFormat
    from data.preference import tokenize_pair
    from data.sft import tokenize_example
    from models import load_tokenizer
    from models.tiny import bundled_corpus

    tok = load_tokenizer(str(model_dir), padding_side="right")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", bundled_corpus())})
    cost = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    rng = random.Random(seed)
    frame = "\n\nHuman: {}\n\nAssistant:"

    def n_prompt(ws: list[str]) -> int:
        return len(tok(frame.format(" ".join(ws)), add_special_tokens=False)["input_ids"])

    def n_response(ws: list[str]) -> int:
        return len(tok(" " + " ".join(ws) + EOS_TEXT, add_special_tokens=False)["input_ids"])

    if seq_len < 64:
        raise ValueError(f"seq_len={seq_len}: the synthetic rows need at least 64 tokens")
    n_p = seq_len // 4
    rows: dict[str, list[dict]] = {"sft_cai": [], "sft_trl": [], "rm_cai": [], "rm_trl": []}
    for _ in range(n_rows):
        prompt = _exact_words(rng, words, cost, n_p, n_prompt)
        completion = _exact_words(rng, words, cost, seq_len - n_p, n_response)
        chosen = _exact_words(rng, words, cost, seq_len - n_p, n_response)
        rejected = _exact_words(rng, words, cost, seq_len - n_p - rng.randrange(16), n_response)
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        fmt = PromptFormat(tok)
        sft_ids = tokenize_example({"prompt": prompt, "completion": completion}, fmt, seq_len + 1)["input_ids"]
        if len(sft_ids) != seq_len or len(tokenize_pair(pair, fmt, seq_len + 1, True)["chosen_ids"]) != seq_len:
            raise RuntimeError(f"a synthetic row is not {seq_len} tokens long")
        rows["sft_cai"].append({"prompt": prompt, "completion": completion})
        rows["sft_trl"].append({"prompt": frame.format(prompt), "completion": " " + completion})
        rows["rm_cai"].append(pair)
        rows["rm_trl"].append({"prompt": frame.format(prompt), "chosen": " " + chosen, "rejected": " " + rejected})
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in rows}
    for name, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return {name: str(path) for name, path in paths.items()}


def dpo_data(data: dict[str, str], n_rows: int) -> dict[str, str]:
    """DPO's files: the first ``n_rows`` pairs of the reward-model files (``dpo_cai``, ``dpo_trl``).

    Both systems compute the reference log-probabilities of every training row before training; a run needs only
    the rows of its ``warmup + steps`` batches.
    """
    out = {}
    for system in ("cai", "trl"):
        src = Path(data[f"rm_{system}"])
        dst = src.with_name(f"dpo_{system}.jsonl")
        dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n_rows]))
        out[f"dpo_{system}"] = str(dst)
    return out


# ----------------------------------------------------------------------------- measuring


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by all processes on this machine since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, without guest (counted in user)


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on a GPU, else peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS"


def memory_now_bytes() -> int:
    """Memory this process holds now: ``torch.cuda.memory_allocated`` on a GPU, else resident memory (Linux)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the figure is left out of the report


class WindowTimer:
    """Counts tokens and rows of training forward passes and times steps ``warmup + 1 ... warmup + steps``.

    Args:
        warmup: Optimizer steps before the window opens (at least 1).
        steps: Optimizer steps inside the window.
    """

    def __init__(self, warmup: int, steps: int):
        if warmup < 1 or steps < 1:
            raise ValueError(f"need warmup >= 1 and steps >= 1, got warmup={warmup}, steps={steps}")
        self.warmup, self.steps = warmup, steps
        self.tokens: list = []  # one entry per training forward pass (tensors: no device sync per step)
        self.rows: list[int] = []
        self.t0 = self.t1 = None
        self.i0 = self.i1 = 0
        self.peak: tuple[int, str] | None = None
        self.mem_start = 0
        self.busy0 = self.busy1 = self.cpu0 = self.cpu1 = None

    def attach(self, module) -> None:
        """Count the inputs of every forward pass of ``module`` that builds a graph (training passes).

        Called just before training starts, so it also reads the memory held by then (imports, model, data).
        ``module`` None: the worker counts each batch itself with ``add``.
        """
        import torch

        self.mem_start = memory_now_bytes()
        if module is None:
            return

        def hook(_module, args, kwargs):
            if not torch.is_grad_enabled():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self.tokens.append(mask.sum() if mask is not None else ids.numel())
            self.rows.append(int(ids.shape[0]))

        module.register_forward_pre_hook(hook, with_kwargs=True)

    def add(self, tokens, rows: int) -> None:
        """Count one training batch of ``rows`` sequences holding ``tokens`` real tokens (for workers without hook)."""
        self.tokens.append(tokens)
        self.rows.append(rows)

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step_end(self, global_step: int) -> None:
        """Call at the end of every optimizer step with the number of steps done."""
        if global_step == self.warmup:
            self._sync()
            self.t0, self.i0 = time.perf_counter(), len(self.tokens)
            self.busy0, self.cpu0 = cpu_busy_seconds(), time.process_time()
        elif global_step == self.warmup + self.steps:
            self._sync()
            self.t1, self.i1 = time.perf_counter(), len(self.tokens)
            self.busy1, self.cpu1 = cpu_busy_seconds(), time.process_time()

    def train_end(self) -> None:
        """Call when training ends (before any final save), to read the peak memory of training."""
        self.peak = peak_memory_bytes()

    def result(self) -> dict:
        """Seconds, tokens, rows and forward passes inside the window, and the peak memory."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timing window did not close: fewer than warmup + steps optimizer steps ran")
        tokens = sum(int(t) for t in self.tokens[self.i0 : self.i1])
        seconds = self.t1 - self.t0
        other = None  # CPU time other processes took during the window, in cores (0 on a quiet machine)
        if self.busy0 is not None and self.busy1 is not None:
            other = max(0.0, (self.busy1 - self.busy0) - (self.cpu1 - self.cpu0)) / seconds
        return {
            "seconds": seconds,
            "steps": self.steps,
            "forwards": self.i1 - self.i0,
            "tokens": tokens,
            "rows": sum(self.rows[self.i0 : self.i1]),
            "tokens_per_s": tokens / seconds,
            "peak_mem_bytes": self.peak[0],
            "mem_at_train_start_bytes": self.mem_start,
            "mem_kind": self.peak[1],
            "other_cpu_load": other,
        }


def setup_worker(spec: dict) -> None:
    import datasets
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets.disable_caching()
    datasets.disable_progress_bars()
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_preference_model(model_dir: Path, out: Path) -> Path:
    """A tiny preference model for PPO: ``PreferenceModel`` started from the policy, saved with its tokenizer.

    It is a standard ``AutoModelForSequenceClassification`` (one label), so TRL loads it as its reward model and, as
    in TRL's examples, as the start of its value model.
    """
    from models import ModelConfig, load_tokenizer
    from models.heads import PreferenceModel

    PreferenceModel.from_pretrained(ModelConfig(str(model_dir))).save_pretrained(out)
    load_tokenizer(str(model_dir)).save_pretrained(out)
    return out


def ppo_prompts(spec: dict) -> list[str]:
    """The built-in red_team prompts as this project's PPO renders them, the same list (and order) in both systems."""
    from data.formats import PromptFormat
    from data.prompts import load_prompts_with_stats
    from models import load_tokenizer

    ds, _ = load_prompts_with_stats("red_team")
    fmt = PromptFormat(load_tokenizer(spec["model"]))
    return [fmt.prompt(p) for p in ds["prompt"]]


class RolloutTimer(WindowTimer):
    """``WindowTimer`` for PPO: a step is one rollout (``batch_size`` episodes) with all its optimizer steps."""

    def __init__(self, warmup: int, steps: int, batch_size: int):
        super().__init__(warmup, steps)
        self.batch_size = batch_size

    def result(self) -> dict:
        out = super().result()
        return {**out, "rows": self.batch_size * self.steps}  # episodes: responses of the timed rollouts


def workers() -> dict:
    """Worker functions by name (imported here: each worker process imports only the modules it needs)."""
    from functools import partial

    import bench_cai
    import bench_parity
    import bench_trl

    return {
        "sft-cai": bench_cai.run_sft_cai,
        "sft-trl": bench_trl.run_sft_trl,
        "rm-cai": bench_cai.run_rm_cai,
        "rm-trl": bench_trl.run_rm_trl,
        "ppo-cai": bench_cai.run_ppo_cai,
        "ppo-trl": bench_trl.run_ppo_trl,
        "dpo-cai": bench_cai.run_dpo_cai,
        "dpo-trl": bench_trl.run_dpo_trl,  # TRL's defaults: its reference model runs every step
        "dpo_precompute-cai": bench_cai.run_dpo_cai,  # the same run as dpo-cai
        "dpo_precompute-trl": partial(bench_trl.run_dpo_trl, precompute=True),
        "ppo_critic-cai": partial(bench_cai.run_ppo_cai, critic=True),
        "ppo_critic-trl": bench_trl.run_ppo_trl,  # TRL has one layout: the same run as ppo-trl
        "parity": bench_parity.run_parity,
    }


def worker_main(name: str, spec_path: str) -> None:
    """Run worker ``name`` on the spec in ``spec_path`` and print its result line."""
    spec = json.loads(Path(spec_path).read_text())
    result = workers()[name](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
