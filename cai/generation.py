"""The batched generation engine that every stage uses to sample text from a causal LM.

What makes it fast compared with calling a ``pipeline("text-generation")`` on a list of prompts:

* prompts are tokenized once and sorted by length into buckets, so a batch holds prompts of similar length and
  little compute goes to padding;
* each batch is left-padded (new tokens are appended on the right of every row) and decoded with the KV cache;
* several samples per prompt come from one batch (``num_return_sequences``), not from repeated calls.

Results come back in the order of the prompts, with their texts and token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.formats import ANSWER_STOPS, Prompt, PromptFormat


@dataclass
class SamplingConfig:
    """How to sample."""

    max_new_tokens: int = 128
    """Number of new tokens at most per response."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to ``top_p``."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 keeps all)."""
    num_samples: int = 1
    """Responses per prompt."""
    batch_size: int = 16
    """Prompts per forward batch (each expands to ``batch_size * num_samples`` rows)."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the text by this (> 1 discourages loops; 1 = off). Small instruct models
    fall into repetition loops without it."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (0 = off)."""
    stop: list[str] = field(default_factory=lambda: list(ANSWER_STOPS))
    """Stop strings: a response ends at the first of them, which is cut from its text. The format's end-of-turn and
    EOS tokens always stop a response too."""
    prompt_format: Literal["auto", "chat", "transcript", "raw"] = "auto"
    """How a prompt is laid out (``data.formats``): ``auto`` (the chat template when the tokenizer has one, else the
    paper's transcript), ``chat``, ``transcript``, or ``raw`` (the prompt string is already rendered)."""
    seed: int = 0
    """Seed of the sampling; the same prompts, settings and seed give the same responses."""

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("num_samples", self.num_samples >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "above 0 (1 is off)"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "0 (off) or more"),
            (
                "prompt_format",
                self.prompt_format in ("auto", "chat", "transcript", "raw"),
                "auto, chat, transcript or raw",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"sampling.{name}={getattr(self, name)!r}: must be {expected}")


@dataclass
class Generation:
    """One sampled response."""

    text: str
    """Decoded response, cut at the first stop string and stripped of special tokens."""
    prompt_ids: list[int]
    """Token ids of the formatted prompt (no padding)."""
    response_ids: list[int]
    """Token ids of the response, EOS included when produced, no padding."""
    finished: bool
    """True when the response ended with EOS or a stop string rather than at ``max_new_tokens``."""


def format_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> str:
    """Render a prompt (a string or chat ``messages``) as the text the model continues (``raw``: as given)."""
    if prompt_format == "raw":
        if not isinstance(prompt, str):
            raise ValueError("prompt_format=raw needs rendered prompt strings, not chat messages")
        return prompt
    return PromptFormat(tokenizer, prompt_format).prompt(prompt)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory problems show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Generator:
    """Batched sampling from a Hugging Face causal LM.

    Args:
        model: Any ``AutoModelForCausalLM`` model (switched to eval mode while generating).
        tokenizer: Its tokenizer; padding is forced to the left here.
        config: Sampling settings.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: SamplingConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # EOS and the chat template's end-of-turn token end a response whatever format the prompt is in.
        self.stop_ids = PromptFormat(tokenizer, "auto").stop_token_ids()

    def _hf_config(self, cfg: SamplingConfig) -> transformers.GenerationConfig:
        sample = cfg.temperature > 0
        return transformers.GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=cfg.top_k if sample else None,
            repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty != 1.0 else None,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size or None,
            num_return_sequences=cfg.num_samples,
            stop_strings=cfg.stop or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids or self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        config: SamplingConfig | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[list[Generation]]:
        """Sample ``num_samples`` responses for every prompt.

        Args:
            prompts: Prompt strings or chat message lists.
            config: Settings for this call (defaults to the generator's).
            on_batch: Called with the number of prompts finished after each batch (progress bars).

        Returns:
            For every prompt, in the order given, its list of ``num_samples`` generations.
        """
        cfg = config or self.config
        tok, model = self.tokenizer, self.model
        if not prompts:
            return []
        texts = [format_prompt(p, tok, cfg.prompt_format) for p in prompts]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        hf_cfg = self._hf_config(cfg)
        was_training = model.training
        model.eval()
        results: list[list[Generation]] = [[] for _ in prompts]
        device = next(model.parameters()).device
        for b, batch in enumerate(length_buckets([len(x) for x in ids], cfg.batch_size)):
            # Left padding: every row's last prompt token sits in the same column, so new tokens line up.
            enc = tok.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt").to(device)
            torch.manual_seed(cfg.seed * 1_000_003 + b)  # reproducible per batch, independent of earlier batches
            out = model.generate(**enc, generation_config=hf_cfg, tokenizer=tok)  # (rows * num_samples, P + N)
            new = out[:, enc["input_ids"].shape[1] :]  # (rows * num_samples, N)
            for row, seq in enumerate(new.tolist()):
                i = batch[row // cfg.num_samples]
                results[i].append(self._make(ids[i], seq, cfg))
            if on_batch is not None:
                on_batch(len(batch))
        model.train(was_training)
        return results

    def _make(self, prompt_ids: list[int], seq: list[int], cfg: SamplingConfig) -> Generation:
        tok = self.tokenizer
        pad = tok.pad_token_id
        # Rows that finished early are padded with pad tokens after EOS (or after the stop string).
        end = len(seq)
        while end > 0 and seq[end - 1] == pad and pad not in self.stop_ids:
            end -= 1
        seq = seq[:end]
        finished = end < cfg.max_new_tokens
        stop_at = next((i for i, t in enumerate(seq) if t in self.stop_ids), None)
        if stop_at is not None:
            seq, finished = seq[: stop_at + 1], True
        text = tok.decode(seq, skip_special_tokens=True)
        for s in cfg.stop:
            if s in text:
                text, finished = text[: text.index(s)], True
        return Generation(text=text.strip(), prompt_ids=list(prompt_ids), response_ids=seq, finished=finished)
