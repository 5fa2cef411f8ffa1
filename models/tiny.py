"""Tiny random models for offline tests and demos.

No model can be downloaded in CI, so every test and the default demo run on a model built here: a byte-level BPE
tokenizer trained with `tokenizers` on text bundled with the project, and a randomly initialised causal LM of a
chosen Hugging Face architecture. Both are written with ``save_pretrained`` so that the rest of the code loads them
through exactly the same path as a real checkpoint.

Run as ``cai tiny-model --arch llama --out runs/tiny-llama``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"

# The chat template renders conversations in the transcript form of Bai et al. (2022):
# "\n\nHuman: ...\n\nAssistant: ...". Assistant turns end with the EOS token so that SFT teaches the model to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

# Hugging Face `model_type` -> the config fields that make it tiny. Field names differ per architecture.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
}
ARCHITECTURES["mistral"] = dict(ARCHITECTURES["llama"])  # the same field names and sizes


@dataclass
class TinyModelConfig:
    """Settings of a tiny random model."""

    arch: str = "llama"
    """Hugging Face ``model_type`` of the network: one of ``ARCHITECTURES`` (llama, qwen2, mistral, gpt2)."""
    vocab_size: int = 512
    """Size of the byte-level BPE vocabulary trained on the bundled corpus (at least 260: 256 bytes + specials)."""
    seed: int = 0
    """Seed of the weight initialisation; the same seed gives the same weights."""
    corpus: str | None = None
    """Text file to train the tokenizer on; ``None`` uses the corpus bundled in ``models/corpus``."""
    overrides: dict | None = None
    """Config fields that replace the tiny defaults (e.g. ``{"hidden_size": 512}`` for benchmarks)."""


def bundled_corpus() -> str:
    """Return the text bundled with the project for training the tiny tokenizer."""
    return resources.files("models").joinpath("corpus/tiny_corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = 512, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``text`` and wrap it as a transformers tokenizer.

    Byte-level BPE (as in GPT-2) can encode any string, so prompts outside the corpus never hit unknown tokens.
    Training is deterministic for a given text and vocabulary size.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    # transformers 5 does not save `padding_side` unless it is passed to the constructor.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """Build a randomly initialised causal LM of ``cfg.arch`` whose vocabulary matches ``tokenizer``."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"tiny model: unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    config = AutoConfig.for_model(
        cfg.arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{**ARCHITECTURES[cfg.arch], **(cfg.overrides or {})},
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_model(out: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Train the tokenizer, build the model and save both with ``save_pretrained`` into ``out``.

    Returns:
        The output directory, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer`` or ``models.load_model``.
    """
    cfg = cfg or TinyModelConfig()
    if cfg.vocab_size < 260:
        raise ValueError(f"tiny model: vocab_size={cfg.vocab_size} is below 260 (256 bytes + special tokens)")
    text = Path(cfg.corpus).read_text(encoding="utf-8") if cfg.corpus else bundled_corpus()
    tokenizer = train_tokenizer(text, cfg.vocab_size)
    model = build_tiny_model(cfg, tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_model.json").write_text(json.dumps(vars(cfg), indent=2) + "\n")
    return out


def main(
    out: str = "runs/tiny-llama", arch: str = "llama", vocab_size: int = 512, seed: int = 0, corpus: str | None = None
) -> None:
    """Build a tiny random model with its tokenizer and save it with ``save_pretrained``.

    Args:
        out: Output directory.
        arch: Hugging Face architecture (llama, qwen2, mistral, gpt2).
        vocab_size: Byte-level BPE vocabulary size.
        seed: Weight initialisation seed.
        corpus: Text file for the tokenizer; default is the bundled corpus.
    """
    path = make_tiny_model(out, TinyModelConfig(arch=arch, vocab_size=vocab_size, seed=seed, corpus=corpus))
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    print(f"tiny {arch} model ({n:,} parameters) saved to {path}")
