"""AI feedback: the multiple-choice comparison query and its soft label (Bai et al. 2022, sec. 4.1).

The feedback model reads a conversation, a principle, two candidate responses and "The answer is:". The
log-probabilities of the option strings " (A)" and " (B)", computed by teacher forcing (whatever the tokenizer makes
of them), are normalised into the probability that (A) is the better response. In the chain-of-thought variant the
model first writes its reasoning ("Let's think step by step:") and the options are scored after it; the paper then
clamps the probability to [0.4, 0.6] because such labels are otherwise too confident (sec. 4.1).

The query formats follow the paper's published files: the plain one is the format of the 438 HHH evaluations, the
chain-of-thought one that of ``RLMadisonPrecogFewShotPrompts.json`` (with ``{}`` where the principle goes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.constitution import Constitution, FeedbackExample, frame_feedback_principle
from cai.generation import Generator, SamplingConfig
from losses import clamp_probabilities, normalize_choice_logprobs
from models.logprobs import continuation_logprobs

OPTIONS = (" (A)", " (B)")
DEFAULT_PRINCIPLE = "Please choose the response that is the most helpful, honest, and harmless."
COT_ANSWER = "\n\nHuman:\nSo the answer is:"


def plain_query(prompt: str, principle: str, response_a: str, response_b: str) -> str:
    """The multiple-choice query that ends with "The answer is:" (``principle``: bare text)."""
    return (
        f"\n\nConsider the following conversation between a human and an assistant:\n\nHuman: {prompt.strip()}\n\n"
        f"{frame_feedback_principle(principle)}\n (A) [[[{response_a.strip()}]]]\n (B) [[[{response_b.strip()}]]]"
        "\n\nThe answer is:"
    )


def cot_query(prompt: str, principle: str, response_a: str, response_b: str) -> str:
    """The chain-of-thought query that ends with "Let's think step by step:" for the model to continue."""
    return (
        "\n\nHuman: Consider the following conversation between a human (H) and an assistant (A):\n\n"
        f"H: {prompt.strip()}\n\n{frame_feedback_principle(principle).strip()}\n (A) [[[{response_a.strip()}]]]\n"
        f" (B) [[[{response_b.strip()}]]]\n\nAssistant: Let's think step by step:"
    )


def few_shot_text(example: FeedbackExample, index: int) -> str:
    """A labelled few-shot example as text.

    Paper-style examples (a conversation with whole correct and incorrect responses) become multiple-choice
    queries, the correct answer alternating between (A) and (B).
    """
    if example.is_multiple_choice:
        return example.prompt + example.corrects[0]
    conversation = example.prompt.strip()
    if conversation.endswith("Assistant:"):
        conversation = conversation[: -len("Assistant:")].strip()
    conversation = conversation.removeprefix("Human:").strip()
    good, bad = example.corrects[0], example.incorrects[0]
    a, b, answer = (good, bad, OPTIONS[0]) if index % 2 == 0 else (bad, good, OPTIONS[1])
    return plain_query(conversation, DEFAULT_PRINCIPLE, a, b) + answer


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
    """Rows per scoring forward pass."""


class FeedbackScorer:
    """Scores pairs of responses with one feedback model.

    Args:
        model: The feedback model (a causal LM).
        tokenizer: Its tokenizer.
        constitution: Feedback principles and few-shot examples.
        cfg: Feedback settings.
        cot_sampling: Sampling settings of the chain-of-thought reasoning (greedy by default).
    """

    def __init__(self, model, tokenizer, constitution: Constitution, cfg: FeedbackConfig, cot_sampling=None):
        self.model, self.tok, self.const, self.cfg = model, tokenizer, constitution, cfg
        shots = constitution.feedback_few_shot
        shots = shots if cfg.num_few_shot is None else shots[: cfg.num_few_shot]
        self.context = "".join(few_shot_text(ex, i) for i, ex in enumerate(shots))
        cot = constitution.feedback_cot_few_shot
        self.cot_shots = cot if cfg.num_few_shot is None else cot[: cfg.num_few_shot]
        self.cot_sampling = cot_sampling or SamplingConfig(
            max_new_tokens=cfg.cot_max_new_tokens, temperature=0.0, stop=["\n\nHuman:"], prompt_format="raw"
        )
        self.option_ids = [self.tok(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]

    def _option_logprobs(self, contexts: list[str]) -> list[tuple[float, float]]:
        ids = self.tok(contexts, add_special_tokens=False)["input_ids"]
        ctx = [c for c in ids for _ in OPTIONS]  # each context twice: once per option
        cont = [o for _ in ids for o in self.option_ids]
        lp = continuation_logprobs(self.model, ctx, cont, self.tok.pad_token_id, self.cfg.batch_size)
        return list(zip(lp[0::2], lp[1::2]))

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
            queries.append((plain_query(it["prompt"], text, a, b), cot_query(it["prompt"], text, a, b), text))
        contexts = [self.context + q[0] for q in queries]
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
        prompts = [
            "".join(s.replace("{}", frame_feedback_principle(q[2]).strip()) for s in self.cot_shots) + q[1]
            for q in queries
        ]
        gens = Generator(self.model, self.tok, self.cot_sampling).generate(prompts)
        contexts = []
        for j, (prompt, g) in enumerate(zip(prompts, gens)):
            g = g[0]
            cot_texts[j] = g.text
            if not g.text or not g.finished:  # empty or cut off: no answer can be read after it
                fallback[j] = True
                contexts.append(plain_contexts[j])
            else:
                contexts.append(f"{prompt} {g.text}{COT_ANSWER}")
        return contexts
