"""The batched generation engine that every stage uses to sample text from a causal LM.

What makes it fast compared with calling a ``pipeline("text-generation")`` on a list of prompts:

* prompts are tokenized once and sorted by length into buckets, so a batch holds prompts of similar length and
  little compute goes to padding;
* each batch is left-padded (new tokens are appended on the right of every row) and decoded with the KV cache;
* several samples per prompt come from one batch (``num_return_sequences``), not from repeated calls.

Results come back in the order of the prompts, with their texts and token ids.

**Keyed sampling.** Given a key per prompt (``generate(prompts, keys=[...])``, e.g. ``"rt-12/revision1"``), every
sample depends only on (``seed``, key, sample index) and the model, never on which prompts share a batch, the batch
size, the chunking or what an interrupted run had already done; so a resumed run writes what the uninterrupted run
would have. Hugging Face's sampler draws every row from the one global RNG, so the samples of a row depend on its
batch. Here each row has its own ``torch.Generator``, seeded from a stable hash of (seed, key, sample index), and
the draw is done by the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014, "A* Sampling"): ``argmax(l_i + g_i)``
with ``g_i = -log(-log(u_i))``, ``u_i ~ U(0, 1)`` i.i.d., is an exact sample from ``softmax(l)``. ``model.generate``
runs greedily (``do_sample=False``) with :class:`RowSampler` as its last logits processor: it applies the
repetition penalty and the n-gram ban on each row's own tokens (left padding excluded: HF's processors would count
pad tokens of padded rows only), then temperature, top-k and top-p (HF's own warpers, so the distribution is the
one ``do_sample=True`` samples from), then adds each row's Gumbel noise, one draw per decode step. EOS, the
end-of-turn token and stop strings end rows as before. Batched padding could still change a logit in its last bits
and so, very rarely, which of two near-tied tokens wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.formats import ANSWER_STOPS, Prompt, PromptFormat
from models.errors import UserError


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
                raise UserError(f"sampling.{name}={getattr(self, name)!r}: must be {expected}")


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


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of one sample: a stable 63-bit hash of (seed, key, sample index).

    The same in every process and Python version (the builtin ``hash`` of a string is salted per process).
    """
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RowSampler(transformers.LogitsProcessor):
    """Per-row sampling for a greedy ``model.generate``: penalties on each row's own tokens, then the Gumbel-max trick.

    Args:
        cfg: Sampling settings (temperature, top-k, top-p, repetition penalty, n-gram ban).
        pads: Left-padding width of each row; those columns are not the row's text.
        seeds: One seed per row (:func:`sample_seed`); unused when ``cfg.temperature`` is 0 (greedy).
        device: Where the rows' generators draw.
    """

    def __init__(self, cfg: SamplingConfig, pads: list[int], seeds: list[int], device: torch.device):
        self.pads = pads
        self.pad_width = torch.tensor(pads, device=device)[:, None]  # (R, 1)
        lp = transformers.generation.logits_process
        self.repetition_penalty = cfg.repetition_penalty
        self.ngram_ban = lp.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size) if cfg.no_repeat_ngram_size else None
        self.warpers, self.generators = [], []
        if cfg.temperature > 0:
            # HF's own warpers in HF's order, so the filtered distribution is the one do_sample=True draws from.
            self.warpers.append(lp.TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                self.warpers.append(lp.TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                self.warpers.append(lp.TopPLogitsWarper(cfg.top_p))
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()  # (R, V)
        if self.repetition_penalty != 1.0:
            # HF's repetition penalty (divide positive logits, multiply negative ones, once per distinct token), on
            # each row's own tokens: a pad column points at the row's first real token, which is penalised anyway.
            first = input_ids.gather(1, self.pad_width.clamp(max=input_ids.shape[1] - 1))  # (R, 1)
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
            ids = torch.where(columns < self.pad_width, first, input_ids)  # (R, T)
            seen = scores.gather(1, ids)  # (R, T)
            seen = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            scores = scores.scatter(1, ids, seen)
        if self.ngram_ban is not None:  # HF's n-gram ban loops over rows itself; each row without its padding
            scores = torch.cat(
                [
                    self.ngram_ban(input_ids[r : r + 1, pad:], scores[r : r + 1].clone())
                    for r, pad in enumerate(self.pads)
                ]
            )
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        if self.generators:
            vocab, tiny = scores.shape[-1], torch.finfo(torch.float32).tiny
            u = torch.stack(
                [torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
            )
            scores = scores + -torch.log(-torch.log(u.clamp_(min=tiny)))  # Gumbel noise; -inf stays -inf
        return scores


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
        keys: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        """Sample ``num_samples`` responses for every prompt.

        Args:
            prompts: Prompt strings or chat message lists.
            config: Settings for this call (defaults to the generator's).
            on_batch: Called with the number of prompts finished after each batch (progress bars).
            keys: One stable key per prompt (its id and step, e.g. ``"rt-3/critique0"``). Given, sample ``s`` of a
                prompt depends only on (``config.seed``, its key, ``s``), whatever the batching (see the module
                docstring: per-row generators and the Gumbel-max trick). None: one seed per length bucket, so a
                sample also depends on which prompts share its batch.

        Returns:
            For every prompt, in the order given, its list of ``num_samples`` generations.
        """
        cfg = config or self.config
        tok, model = self.tokenizer, self.model
        if not prompts:
            return []
        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts")
        texts = [format_prompt(p, tok, cfg.prompt_format) for p in prompts]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        if keys is None:
            hf_cfg = self._hf_config(cfg)
        else:
            # Greedy over RowSampler's scores: the samples are expanded here and RowSampler does the penalties, which
            # are set to off (not None, so that the model's own generation_config does not fill them in).
            off = replace(cfg, temperature=0.0, num_samples=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
            hf_cfg = self._hf_config(off)
            hf_cfg.repetition_penalty, hf_cfg.no_repeat_ngram_size = 1.0, 0
        was_training = model.training
        model.eval()
        results: list[list[Generation]] = [[] for _ in prompts]
        device = next(model.parameters()).device
        for b, batch in enumerate(length_buckets([len(x) for x in ids], cfg.batch_size)):
            # Left padding: every row's last prompt token sits in the same column, so new tokens line up.
            if keys is None:
                enc = tok.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt").to(device)
                torch.manual_seed(cfg.seed * 1_000_003 + b)  # reproducible per batch, independent of earlier batches
                out = model.generate(**enc, generation_config=hf_cfg, tokenizer=tok)  # (rows * num_samples, P + N)
            else:
                n = cfg.num_samples
                rows = [ids[i] for i in batch for _ in range(n)]  # row = prompt * n + sample, as HF expands them
                enc = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(device)
                pads = (enc["attention_mask"] == 0).sum(1).tolist()
                seeds = [sample_seed(cfg.seed, keys[i], s) for i in batch for s in range(n)]
                sampler = RowSampler(cfg, pads, seeds, device)
                out = model.generate(
                    **enc,
                    generation_config=hf_cfg,
                    tokenizer=tok,
                    logits_processor=transformers.LogitsProcessorList([sampler]),
                )
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
