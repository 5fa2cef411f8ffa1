"""The batched generation engine that every stage uses to sample text from a causal LM.

What makes it fast compared with calling a ``pipeline("text-generation")`` on a list of prompts:

* prompts are tokenized once and sorted by length into buckets, so a batch holds prompts of similar length and
  little compute goes to padding;
* each batch is left-padded (new tokens are appended on the right of every row) and decoded with the KV cache;
* several samples per prompt come from one batch (each prompt's row repeated), not from repeated calls;
* a token prefix that every prompt of a call shares (the few-shot context of ``sl-data``'s critiques and revisions,
  of the feedback model's chain of thought) is read once, at batch 1, and its keys and values repeated to every row
  of every batch, and kept for the next call while the weights stay the same (``models.prefix_cache``);
* top-p keeps its nucleus from a ``topk`` of the few best tokens instead of sorting the whole vocabulary each step
  (:func:`nucleus`), and a sample is drawn among the kept tokens only.

Results come back in the order of the prompts, with their texts and token ids.

**Keyed sampling.** Given a key per prompt (``generate(prompts, keys=[...])``, e.g. ``"rt-12/revision1"``), every
sample depends only on (``seed``, key, sample index) and the model, never on which prompts share a batch, the batch
size, the chunking or what an interrupted run had already done; so a resumed run writes what the uninterrupted run
would have. Hugging Face's sampler draws every row from the one global RNG, so the samples of a row depend on its
batch. Here each row has its own ``torch.Generator``, seeded from a stable hash of (seed, key, sample index), and
the draw is done by the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014, "A* Sampling"): ``argmax(l_i + g_i)``
with ``g_i = -log(-log(u_i))``, ``u_i ~ U(0, 1)`` i.i.d., is an exact sample from ``softmax(l)``. ``model.generate``
runs greedily (``do_sample=False``) with :class:`RowSampler` as its last logits processor: it applies the
repetition penalty and the n-gram ban on each row's own tokens (padding excluded: HF's processors would count pad
tokens of padded rows only), then temperature, top-k and top-p (the sets HF's warpers keep, so the distribution is
the one ``do_sample=True`` samples from), then adds each row's Gumbel noise, one uniform per vocabulary entry and
decode step. Without keys, a prompt's place in the call is its key. EOS, the end-of-turn token and stop strings end
rows as before. Batched padding or a shared prefix could still change a logit in its last bits and so, very rarely,
which of two near-tied tokens wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.formats import ANSWER_STOPS, Prompt, PromptFormat
from models.errors import UserError
from models.padding import pad_rows
from models.prefix_cache import SharedPrefix, cache_kwarg, shared_prefix_length


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


def nucleus(scores: torch.Tensor, top_k: int, top_p: float, start: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that top-k then top-p keep, as HF's ``TopKLogitsWarper`` and ``TopPLogitsWarper`` define them.

    HF's top-p sorts the whole vocabulary every step (49,152 tokens for SmolLM2: a quarter of a decode step on a
    CPU). Here ``topk`` takes the best ``start`` tokens of every row, sorted, and only the rows whose nucleus goes
    on past them take eight times as many, and so on: most rows' nuclei are short, a few are long. Top-p keeps a
    token when the probability of the tokens above it is under ``top_p`` (HF removes it when the tail from it down
    adds up to at most ``1 - top_p``: the same set), the softmax taken after top-k. Exactly tied logits at a cut may
    be split otherwise than HF splits them.

    Args:
        scores: Logits (R, V), temperature applied.
        top_k: Tokens to keep (0: no top-k).
        top_p: Nucleus mass (1: no top-p).
        start: Candidates first taken per row.

    Returns:
        ``(values, indices)``, both (R, K), best first, K the size of the largest set kept; values of tokens cut
        are ``-inf``.
    """
    vocab = scores.shape[-1]
    k = min(top_k, vocab) if top_k else vocab
    size = k if top_k else min(k, start)
    values, indices = scores.topk(size, dim=-1)  # (R, size)
    if top_p >= 1.0:
        return values, indices
    # top-p sees the distribution that top-k left
    norm = values.logsumexp(-1, keepdim=True) if top_k else scores.logsumexp(-1, keepdim=True)  # (R, 1)
    while True:
        probs = (values - norm).exp()
        keep = probs.cumsum(-1) - probs < top_p  # (R, size): the mass of the better tokens is under top_p
        longer = keep[:, -1].nonzero()[:, 0]  # rows whose nucleus may go on past the candidates
        if size == k or len(longer) == 0:
            width = int(keep.sum(-1).max())
            return values.masked_fill(~keep, float("-inf"))[:, :width], indices[:, :width]
        grown = min(k, size * 8)
        more_values, more_indices = scores[longer].topk(grown, dim=-1)  # (L, grown)
        values = torch.nn.functional.pad(values, (0, grown - size), value=float("-inf"))  # the others: cut anyway
        indices = torch.nn.functional.pad(indices, (0, grown - size))
        values[longer], indices[longer], size = more_values, more_indices, grown


class RowSampler(transformers.LogitsProcessor):
    """Per-row sampling for a greedy ``model.generate``: penalties on each row's own tokens, then the Gumbel-max trick.

    Args:
        cfg: Sampling settings (temperature, top-k, top-p, repetition penalty, n-gram ban).
        pads: Which prompt columns are not the row's text: the left-padding width of each row, or a (R, P) mask of
            the prompt columns, 1 on real tokens (a shared prefix puts the padding after the prefix).
        seeds: One seed per row (:func:`sample_seed`); unused when ``cfg.temperature`` is 0 (greedy).
        device: Where the rows' generators draw.
    """

    def __init__(self, cfg: SamplingConfig, pads: list[int] | torch.Tensor, seeds: list[int], device: torch.device):
        if isinstance(pads, torch.Tensor):
            self.hidden = pads.to(device) == 0  # (R, P)
        else:
            width = torch.tensor(pads, device=device)[:, None]  # (R, 1)
            self.hidden = torch.arange(max(pads, default=0), device=device)[None] < width  # (R, max pad)
        self.cfg = cfg
        lp = transformers.generation.logits_process
        self.ngram_ban = lp.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size) if cfg.no_repeat_ngram_size else None
        self.generators = []
        if cfg.temperature > 0:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cfg = self.cfg
        scores = scores.float()  # (R, V)
        rows, length = input_ids.shape
        hidden = torch.nn.functional.pad(self.hidden, (0, length - self.hidden.shape[1]))  # (R, T) not the text
        if cfg.repetition_penalty != 1.0:
            # HF's repetition penalty (divide positive logits, multiply negative ones, once per distinct token), on
            # each row's own tokens: a hidden column points at the row's first real token, penalised anyway.
            first = input_ids.gather(1, (~hidden).long().argmax(1, keepdim=True))  # (R, 1)
            ids = torch.where(hidden, first, input_ids)  # (R, T)
            seen = scores.gather(1, ids)  # (R, T)
            seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
            scores = scores.scatter(1, ids, seen)
        if self.ngram_ban is not None:  # HF's n-gram ban loops over rows itself; each row without its padding
            scores = torch.cat(
                [self.ngram_ban(input_ids[r : r + 1, ~hidden[r]], scores[r : r + 1].clone()) for r in range(rows)]
            )
        if not self.generators:
            return scores  # greedy: generate takes the argmax
        scores = scores / cfg.temperature
        vocab, tiny = scores.shape[-1], torch.finfo(torch.float32).tiny
        # One uniform per vocabulary entry and row each step, whatever is kept: a row's draws follow its own seed.
        u = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
        )
        if cfg.top_k or cfg.top_p < 1.0:
            values, indices = nucleus(scores, cfg.top_k, cfg.top_p)  # (R, K)
            gumbel = -torch.log(-torch.log(u.gather(1, indices).clamp_(min=tiny)))  # -inf stays -inf
            choice = indices.gather(1, (values + gumbel).argmax(-1, keepdim=True))  # (R, 1)
        else:
            choice = (scores - torch.log(-torch.log(u.clamp_(min=tiny)))).argmax(-1, keepdim=True)  # (R, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)  # generate's argmax takes the draw


class Generator:
    """Batched sampling from a Hugging Face causal LM.

    Args:
        model: Any ``AutoModelForCausalLM`` model (switched to eval mode while generating).
        tokenizer: Its tokenizer; prompts are left-padded with its pad token whatever its ``padding_side``.
        config: Sampling settings.
        share_prefix: Read the prompts' longest common token prefix once per call and reuse its keys and values
            for every row (``models.prefix_cache``); False lays every prompt out whole (the reference path).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SamplingConfig,
        share_prefix: bool = True,
    ):
        self.model, self.tokenizer, self.config, self.share = model, tokenizer, config, share_prefix
        # EOS and the chat template's end-of-turn token end a response whatever format the prompt is in.
        self.stop_ids = PromptFormat(tokenizer, "auto").stop_token_ids()
        self._prefix: tuple[tuple, SharedPrefix] | None = None  # the last shared prefix and the weights it is of

    def _hf_config(self, cfg: SamplingConfig) -> transformers.GenerationConfig:
        # Greedy over RowSampler's scores: the samples are expanded and drawn here, and RowSampler does the penalties,
        # which are set to off (not None, so that the model's own generation_config does not fill them in).
        return transformers.GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_return_sequences=1,
            stop_strings=cfg.stop or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids or self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def shared_prefix(self, rows: Sequence[Sequence[int]]) -> SharedPrefix | None:
        """The keys and values of the rows' longest common token prefix (None when too short to share).

        The last prefix is kept and reused by later calls (the rounds of ``sl-data`` share their few-shot context;
        a longer prefix extends it) as long as the model's weights have not changed in place since.
        """
        n = shared_prefix_length(rows) if self.share else 0
        if not n:
            return None
        tokens = list(rows[0][:n])
        weights = tuple(p._version for p in self.model.parameters())  # bumped by every in-place update
        last = self._prefix[1] if self._prefix is not None and self._prefix[0] == weights else None
        if last is None or last.tokens != tokens:
            last = SharedPrefix(self.model, tokens, reuse=last)
        self._prefix = (weights, last)
        return last

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        config: SamplingConfig | None = None,
        on_batch: Callable[[int], None] | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        """Sample ``num_samples`` responses for every prompt.

        A token prefix that every prompt of the call shares (the few-shot context of a critique or a feedback
        question) is read once and its keys and values reused by every row of every batch
        (``models.prefix_cache``); the outputs are those of the unshared path up to float rounding.

        Args:
            prompts: Prompt strings or chat message lists.
            config: Settings for this call (defaults to the generator's).
            on_batch: Called with the number of prompts finished after each batch (progress bars).
            keys: One stable key per prompt (its id and step, e.g. ``"rt-3/critique0"``). Given, sample ``s`` of a
                prompt depends only on (``config.seed``, its key, ``s``), whatever the batching (see the module
                docstring: per-row generators and the Gumbel-max trick). None: the prompt's place in ``prompts``
                is its key.

        Returns:
            For every prompt, in the order given, its list of ``num_samples`` generations.
        """
        cfg = config or self.config
        tok, model = self.tokenizer, self.model
        if not prompts:
            return []
        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts")
        keys = keys if keys is not None else [f"#{i}" for i in range(len(prompts))]
        texts = [format_prompt(p, tok, cfg.prompt_format) for p in prompts]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        hf_cfg = self._hf_config(cfg)
        sampled = cfg.temperature > 0 or cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0
        was_training = model.training
        model.eval()
        n = cfg.num_samples
        prefix = self.shared_prefix(ids if len(ids) > 1 else ids * n)
        results: list[list[Generation]] = [[] for _ in prompts]
        device = next(model.parameters()).device
        for batch in length_buckets([len(x) for x in ids], cfg.batch_size):
            rows = [ids[i] for i in batch for _ in range(n)]  # row = prompt * n + sample
            if prefix is None:
                # Left padding: every row's last prompt token sits in the same column, so new tokens line up.
                input_ids, mask = pad_rows(rows, tok.pad_token_id, "left", device)
                past = {}
            else:  # [prefix | suffix left-padded after it]; generate reads only the suffix, after the prefix's cache
                suffix, mask, _ = prefix.layout(rows, tok.pad_token_id, device)
                head = torch.tensor(prefix.tokens, device=device).expand(len(rows), -1)
                input_ids, past = torch.cat([head, suffix], 1), {cache_kwarg(model): prefix.repeated(len(rows))}
            processors = []
            if sampled:
                seeds = [sample_seed(cfg.seed, keys[i], s) for i in batch for s in range(n)]
                processors.append(RowSampler(cfg, mask, seeds, device))
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=hf_cfg,
                tokenizer=tok,
                logits_processor=transformers.LogitsProcessorList(processors),
                **past,
            )
            new = out[:, input_ids.shape[1] :]  # (rows, N)
            for row, seq in enumerate(new.tolist()):
                i = batch[row // n]
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
