"""AI feedback: the multiple-choice comparison query and its soft label (Bai et al. 2022, sec. 4.1).

The feedback model reads a conversation, a principle, two candidate responses and "The answer is:". The
log-probabilities of the option strings " (A)" and " (B)", computed by teacher forcing (whatever the tokenizer makes
of them), are normalised into the probability that (A) is the better response. In the chain-of-thought variant the
model first writes its reasoning ("Let's think step by step:") and the options are scored after it; the paper then
clamps the probability to [0.4, 0.6] because such labels are otherwise too confident (sec. 4.1).

The question texts live in ``data.formats`` with every other prompt string: in transcript form they are the paper's
published formats (the plain one that of the 438 HHH evaluations, the chain-of-thought one that of
``RLMadisonPrecogFewShotPrompts.json``); in chat form the question is a user turn and the answer an assistant turn.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from cai.method.constitution import Constitution, FeedbackExample
from cai.method.generation import Generator, SamplingConfig
from data.formats import (
    DEFAULT_PRINCIPLE,
    OPTIONS,
    PromptFormat,
    cot_question,
    cot_shot_parts,
    feedback_question,
    question_body,
)
from losses import clamp_probabilities, normalize_choice_logprobs
from models.logprobs import choice_logprobs


def few_shot_pair(example: FeedbackExample, index: int) -> tuple[str, str]:
    """A labelled few-shot example as (question, answer).

    Multiple-choice examples keep their question and first correct option. Paper-style examples (a conversation with
    whole correct and incorrect responses) become multiple-choice questions, the correct answer alternating between
    (A) and (B).
    """
    if example.is_multiple_choice:
        return question_body(example.prompt), example.corrects[0]
    conversation = example.prompt.strip()
    if conversation.endswith("Assistant:"):
        conversation = conversation[: -len("Assistant:")].strip()
    conversation = conversation.removeprefix("Human:").strip()
    good, bad = example.corrects[0], example.incorrects[0]
    a, b, answer = (good, bad, OPTIONS[0]) if index % 2 == 0 else (bad, good, OPTIONS[1])
    return feedback_question(conversation, DEFAULT_PRINCIPLE, a, b), answer


@dataclass
class FeedbackConfig:
    """How AI preference labels are computed."""

    num_few_shot: int | None = None
    """Labelled few-shot examples in front of each query; None for all of the constitution's."""
    num_principles: int = 1
    """Ensemble size: principles sampled per pair, whose probabilities are averaged (the paper samples one per
    comparison and notes ensembling over principles improves robustness)."""
    both_orders: bool = False
    """Score (A, B) and (B, A) and average, to cancel the model's position bias."""
    chain_of_thought: bool = False
    """Let the feedback model reason first, then read the answer probabilities and clamp them."""
    clamp_low: float = 0.4
    """Lower clamp bound of chain-of-thought probabilities."""
    clamp_high: float = 0.6
    """Upper clamp bound of chain-of-thought probabilities."""
    cot_max_new_tokens: int = 128
    """Length limit of the reasoning; reasoning that hits it is unparseable and falls back to plain scoring."""
    batch_size: int = 8
    """Questions per scoring forward pass (each is read once for both options)."""

    def __post_init__(self):
        checks = [
            ("num_few_shot", self.num_few_shot is None or self.num_few_shot >= 0, "None (all) or 0 or more"),
            ("num_principles", self.num_principles >= 1, "at least 1"),
            ("clamp_low", 0 <= self.clamp_low <= self.clamp_high <= 1, "at most clamp_high, both in [0, 1]"),
            ("cot_max_new_tokens", self.cot_max_new_tokens >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"feedback.{name}={getattr(self, name)!r}: must be {expected}")


class FeedbackScorer:
    """Scores pairs of responses with one feedback model.

    Args:
        model: The feedback model (a causal LM).
        tokenizer: Its tokenizer.
        constitution: Feedback principles and few-shot examples.
        cfg: Feedback settings.
        cot_sampling: Sampling settings of the chain-of-thought reasoning (greedy by default).
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``): how the question is laid out.
        share_prefix: Score the options after a few-shot context that every query shares read once
            (``models.prefix_cache``); False reads every query whole (the reference path; the same results up to
            float rounding). The chain-of-thought generation shares its prefix either way (``Generator``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        constitution: Constitution,
        cfg: FeedbackConfig,
        cot_sampling=None,
        prompt_format="auto",
        share_prefix: bool = True,
    ):
        self.model, self.tok, self.const, self.cfg, self.share = model, tokenizer, constitution, cfg, share_prefix
        self.format = PromptFormat(tokenizer, prompt_format)
        self.shots = [few_shot_pair(ex, i) for i, ex in enumerate(constitution.feedback_few_shot[: cfg.num_few_shot])]
        self.cot_shots = constitution.feedback_cot_few_shot[: cfg.num_few_shot]
        self.cot_sampling = cot_sampling or SamplingConfig(
            max_new_tokens=cfg.cot_max_new_tokens, temperature=0.0, stop=self.format.stop_strings("cot")
        )
        self.cot_sampling = replace(self.cot_sampling, prompt_format="raw")  # the prompts come rendered
        self.option_ids = [self.tok(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]

    def _option_logprobs(self, contexts: list[str]) -> list[tuple[float, float]]:
        # Each context runs once; its keys and values are reused for " (A)" and " (B)" (models.logprobs).
        ids = self.tok(contexts, add_special_tokens=False)["input_ids"]
        lp = choice_logprobs(
            self.model, ids, self.option_ids, self.tok.pad_token_id, self.cfg.batch_size, share_prefix=self.share
        )
        return [(a, b) for a, b in lp]

    def score(self, items: list[dict]) -> list[dict]:
        """Probability that ``response_a`` is better, for each item {prompt, response_a, response_b, principles}.

        Each item lists the principle ids to use (``num_principles`` of them). Returns per item ``p_a`` and the
        details: raw log-probabilities per principle and order, the reasoning texts, and whether a chain-of-thought
        answer fell back to plain scoring.
        """
        jobs = []  # (item index, principle id, swapped)
        for i, it in enumerate(items):
            for pid in it["principles"]:
                for swapped in (False, True) if self.cfg.both_orders else (False,):
                    jobs.append((i, pid, swapped))
        queries, cot_texts, fallback = [], [None] * len(jobs), [False] * len(jobs)
        for i, pid, swapped in jobs:
            it, text = items[i], self.const.get_feedback(pid).text
            a, b = (it["response_b"], it["response_a"]) if swapped else (it["response_a"], it["response_b"])
            queries.append((feedback_question(it["prompt"], text, a, b), cot_question(it["prompt"], text, a, b), text))
        contexts = [self.format.feedback_context(self.shots, q[0]) for q in queries]
        if self.cfg.chain_of_thought:
            contexts = self._with_reasoning(queries, contexts, cot_texts, fallback)
        pairs = self._option_logprobs(contexts)
        out = [{"p_a": [], "logprobs": [], "cot": [], "cot_fallbacks": 0} for _ in items]
        for (i, pid, swapped), (lp_a, lp_b), cot, fb in zip(jobs, pairs, cot_texts, fallback):
            p_first = normalize_choice_logprobs(torch.tensor(lp_a), torch.tensor(lp_b))
            if self.cfg.chain_of_thought:  # fallbacks too: every label of a CoT dataset keeps the clamp's promise
                p_first = clamp_probabilities(p_first, self.cfg.clamp_low, self.cfg.clamp_high)
            p = 1.0 - p_first.item() if swapped else p_first.item()  # probability that response_a is better
            out[i]["p_a"].append(p)
            out[i]["logprobs"].append({"principle": pid, "swapped": swapped, "A": lp_a, "B": lp_b})
            out[i]["cot"].append(cot)
            out[i]["cot_fallbacks"] += int(fb)
        for o in out:
            o["p_a"] = sum(o["p_a"]) / len(o["p_a"])
        return out

    def _with_reasoning(self, queries, plain_contexts, cot_texts, fallback) -> list[str]:
        """Generate the reasoning; contexts for scoring the answer after it (or the plain ones where it failed)."""
        prompts = [self.format.cot_prompt([cot_shot_parts(s, q[2]) for s in self.cot_shots], q[1]) for q in queries]
        gens = Generator(self.model, self.tok, self.cot_sampling).generate(prompts)
        contexts = []
        for j, (prompt, g) in enumerate(zip(prompts, gens)):
            g = g[0]
            cot_texts[j] = g.text
            if not g.text or not g.finished:  # empty or cut off: no answer can be read after it
                fallback[j] = True
                contexts.append(plain_contexts[j])
            else:
                contexts.append(self.format.cot_answer_context(prompt, g.text))
        if fallback and sum(fallback) > len(fallback) / 2:
            print(
                f"WARNING: chain-of-thought: {sum(fallback)} of {len(fallback)} reasonings were empty or cut off and "
                "fell back to plain scoring (their labels are the clamped plain ones; raise cot_max_new_tokens or "
                "use a stronger feedback model)",
                file=sys.stderr,
            )
        return contexts
