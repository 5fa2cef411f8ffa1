r"""Every prompt string of the method and the two ways of laying it out: the one home of the prompt format.

Constitutional AI talks to a model in four kinds of text: the conversation it answers (SL-CAI sampling, SFT, label
sampling, PPO rollouts, evaluation), the critique and revision requests (SL-CAI), the multiple-choice feedback
question (AI labels, evaluation), and the text a preference model reads. Every stage builds them through one
:class:`PromptFormat`, so a prompt change is an edit of this file and a conversation renders the same in every stage.

Two formats:

* ``transcript``: the paper's plain text (Bai et al. 2022), for base models: ``"\n\nHuman: ...\n\nAssistant: ..."``,
  with ``CritiqueRequest:`` / ``Critique:`` / ``RevisionRequest:`` / ``Revision:`` turns and the feedback question
  ending ``"The answer is:"``. This is the form of the paper's published prompts.
* ``chat``: the tokenizer's chat template, for instruct models. Critique and revision requests and the feedback
  question are user turns; few-shot examples are earlier turns of the same conversation; the answer to the feedback
  question is an assistant turn that starts ``"The answer is:"``, after which ``" (A)"`` and ``" (B)"`` are scored.

``auto`` picks ``chat`` when the tokenizer has a chat template, else ``transcript``. Either way a response is closed
by the format's end-of-turn (the chat template's end-of-turn token, or EOS in transcript form): SFT trains the model
to write it, generation stops at it, and the preference model reads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Prompt = str | list[dict]
"""A prompt: a user message, or chat ``messages`` ({role, content} dicts) ending with a user turn."""
FormatName = Literal["auto", "chat", "transcript"]

# ------------------------------------------------------------------------------------------ the paper's strings
HUMAN, ASSISTANT = "Human:", "Assistant:"
CRITIQUE_REQUEST, CRITIQUE = "CritiqueRequest:", "Critique:"
REVISION_REQUEST, REVISION = "RevisionRequest:", "Revision:"
OPTIONS = (" (A)", " (B)")
"""The option strings whose log-probabilities make the feedback label."""
ANSWER_LEAD = "The answer is:"
COT_LEAD = "Let's think step by step:"
COT_ANSWER_LEAD = "So the answer is:"
DEFAULT_PRINCIPLE = "Please choose the response that is the most helpful, honest, and harmless."
"""The principle of the paper's 438 HHH comparisons; used for few-shot examples that name none."""

# Extra wording of the critique styles. "plain" uses the principle's request as written.
STRONG_SUFFIX = " Be thorough and specific: point out every problem, however small, and say why it matters."
COT_SUFFIX = " Think step by step: is the response helpful, is it honest, is it harmless, and is it free of toxicity?"
COT_CRITIQUE_START = "Let's think step by step."

ANSWER_STOPS = ["\n\nHuman:"]
"""Stop strings of an ordinary answer (transcript form: the model starting the human's next turn)."""
TURN_LABEL_STOPS = [
    "\n\nHuman:",
    "\n\nCritiqueRequest:",
    "\n\nCritique:",
    "\n\nRevisionRequest:",
    "\n\nRevision:",
    "Critique Request:",
    "Revision Request:",
    "\nCritiqueRequest:",
    "\nRevisionRequest:",
]
"""Stop strings of critiques and revisions: every turn label of the critique dialogue, including the spaced forms a
small model invents ("Critique Request:")."""
COT_STOPS = ["\n\nHuman:", COT_ANSWER_LEAD, "Therefore, option"]
"""Stop strings of chain-of-thought reasoning: the reasoning ends where the paper's examples state the answer."""

_MARKERS = {
    HUMAN: "user",
    ASSISTANT: "assistant",
    CRITIQUE_REQUEST: "user",
    CRITIQUE: "assistant",
    REVISION_REQUEST: "user",
    REVISION: "assistant",
}
_MARKER_RE = re.compile(r"(?:^|\n\n)(CritiqueRequest:|Critique:|RevisionRequest:|Revision:|Human:|Assistant:)")


def frame_critique_request(text: str) -> str:
    r"""Wrap a bare critique request as the paper does: ``"\n\nCritiqueRequest: <text>\n\nCritique:"``."""
    return f"\n\n{CRITIQUE_REQUEST} {text}\n\n{CRITIQUE}"


def frame_revision_request(text: str) -> str:
    r"""Wrap a bare revision request as the paper does: ``"\n\nRevisionRequest: <text>\n\nRevision:"``."""
    return f"\n\n{REVISION_REQUEST} {text}\n\n{REVISION}"


def frame_feedback_principle(text: str) -> str:
    r"""Wrap a bare feedback principle as the paper does: ``"\n<text> Options:"``."""
    return f"\n{text} Options:"


def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages (a string becomes one user turn, stripped)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt.strip()}]
    return [dict(m) for m in prompt]


def transcript_to_messages(text: str) -> list[dict]:
    """Split a paper-style transcript into chat turns.

    ``Human:``, ``CritiqueRequest:`` and ``RevisionRequest:`` open user turns; ``Assistant:``, ``Critique:`` and
    ``Revision:`` open assistant turns. Text before the first label is dropped; empty turns are dropped.
    """
    parts = _MARKER_RE.split(text.strip())
    messages = []
    for marker, body in zip(parts[1::2], parts[2::2]):
        if body.strip():
            messages.append({"role": _MARKERS[marker], "content": body.strip()})
    return messages


def feedback_question(prompt: str, principle: str, response_a: str, response_b: str) -> str:
    """The body of the multiple-choice feedback question (Bai et al. 2022, sec. 4.1), without "The answer is:"."""
    return (
        f"Consider the following conversation between a human and an assistant:\n\nHuman: {prompt.strip()}\n\n"
        f"{frame_feedback_principle(principle)}\n (A) [[[{response_a.strip()}]]]\n (B) [[[{response_b.strip()}]]]"
    )


def cot_question(prompt: str, principle: str, response_a: str, response_b: str) -> str:
    """The body of the chain-of-thought feedback question (the form of ``RLMadisonPrecogFewShotPrompts.json``)."""
    return (
        "Consider the following conversation between a human (H) and an assistant (A):\n\n"
        f"H: {prompt.strip()}\n\n{frame_feedback_principle(principle).strip()}\n (A) [[[{response_a.strip()}]]]\n"
        f" (B) [[[{response_b.strip()}]]]"
    )


def question_body(query: str) -> str:
    """The question of a multiple-choice text that ends "The answer is:" (as in the paper's evaluation files)."""
    text = query.strip()
    if text.endswith(ANSWER_LEAD):
        text = text[: -len(ANSWER_LEAD)].rstrip()
    return text


def cot_shot_parts(text: str, principle: str) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a chain-of-thought few-shot transcript, ``{}`` filled with ``principle``.

    The paper's examples read "Human: <question> / Assistant: Let's think step by step: <reasoning> / Human: So
    the answer is: (B)".
    """
    turns = transcript_to_messages(text.replace("{}", frame_feedback_principle(principle).strip()))
    question = next((m["content"] for m in turns if m["role"] == "user"), "")
    reasoning = next((m["content"] for m in turns if m["role"] == "assistant"), "")
    reasoning = reasoning.removeprefix(COT_LEAD).strip()
    last = turns[-1]["content"] if turns else ""
    answer = last.split(COT_ANSWER_LEAD, 1)[1].strip() if COT_ANSWER_LEAD in last else ""
    return question, reasoning, answer


class PromptFormat:
    """How prompts, responses, critiques and feedback questions are laid out for one tokenizer.

    Args:
        tokenizer: The model's tokenizer (its chat template, EOS and special tokens are read).
        kind: ``auto`` (chat when the tokenizer has a chat template), ``chat`` or ``transcript``.
    """

    def __init__(self, tokenizer, kind: FormatName = "auto"):
        if kind not in ("auto", "chat", "transcript"):
            raise ValueError(f"prompt_format must be auto, chat or transcript, not {kind!r}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if kind == "chat" and not has_template:
            name = getattr(tokenizer, "name_or_path", "the tokenizer")
            raise ValueError(f"prompt_format=chat: {name} has no chat template; use transcript")
        self.tokenizer = tokenizer
        self.kind: str = "chat" if kind == "chat" or (kind == "auto" and has_template) else "transcript"
        # How the format closes an assistant turn, and what separates a turn's opening from its text (" " in the
        # transcript, often "" in chat templates; text the code writes into an assistant turn starts with it).
        self.assistant_sep, self.assistant_close = (" ", tokenizer.eos_token or "")
        if self.is_chat:
            self.assistant_sep, self.assistant_close = self._assistant_turn_edges()
        self.end_of_turn = self.assistant_close.rstrip()
        """What ends an assistant message (e.g. ``<|im_end|>``; EOS in the transcript)."""
        self._eot_id = self._end_of_turn_id()

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat"

    # ---------------------------------------------------------------------------------------- conversations
    def prompt(self, prompt: Prompt) -> str:
        """The text the model continues to write the assistant's next turn."""
        messages = as_messages(prompt)
        if self.is_chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = {"user": HUMAN, "assistant": ASSISTANT}
        text = "".join(f"\n\n{turns.get(m['role'], m['role'] + ':')} {m['content'].strip()}" for m in messages)
        return text + f"\n\n{ASSISTANT}"

    def dialogue(self, prompt: Prompt, response: str) -> tuple[str, str]:
        """(prompt text, completion text) of a conversation answered by ``response``, end-of-turn included.

        The prompt text is exactly :meth:`prompt`; SFT trains on the completion, and the preference model reads
        prompt + completion.
        """
        prompt_text = self.prompt(prompt)
        if not self.is_chat:
            return prompt_text, " " + response.strip() + self.end_of_turn
        messages = as_messages(prompt) + [{"role": "assistant", "content": response.strip()}]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt_text):
            name = getattr(self.tokenizer, "name_or_path", "tokenizer")
            raise ValueError(f"{name}: the chat template does not render the prompt as a prefix of the dialogue")
        return prompt_text, full[len(prompt_text) :]

    def text(self, prompt: Prompt, response: str) -> str:
        """The whole conversation as one text (what the preference model reads)."""
        return "".join(self.dialogue(prompt, response))

    # ---------------------------------------------------------------------------------------- stopping
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a response: EOS and the chat template's end-of-turn token when it is one token."""
        tok, eot = self.tokenizer, self._eot_id
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return ids + ([eot] if eot is not None and eot not in ids else [])

    def stop_strings(self, kind: Literal["answer", "critique", "cot"] = "answer") -> list[str]:
        """Stop strings for a kind of generated text.

        Turn labels the model may write on its own, and the end-of-turn text when it is not a single special token.
        """
        stops = {"answer": ANSWER_STOPS, "critique": TURN_LABEL_STOPS, "cot": COT_STOPS}[kind]
        eot = self.end_of_turn.strip()
        extra = [eot] if eot and self._eot_id is None and eot != self.tokenizer.eos_token else []
        return list(stops) + extra

    def _end_of_turn_id(self) -> int | None:
        eot = self.end_of_turn.strip()
        if not eot:
            return None
        ids = self.tokenizer(eot, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 and ids[0] in self.tokenizer.all_special_ids else None

    def _assistant_turn_edges(self) -> tuple[str, str]:
        """(separator, close) of an assistant turn in the chat template, read off one rendered dialogue."""
        marker = "XQZ7"
        head = self.prompt("hi")
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        at = full.rindex(marker)
        sep = full[len(head) : at] if full.startswith(head) else ""
        return sep, full[at + len(marker) :]

    # ---------------------------------------------------------------------------------------- SL-CAI critiques
    def critique_prompt(
        self, few_shot: Sequence[str], prompt: str, response: str, request: str, style: str = "plain"
    ) -> str:
        """The request to critique ``response`` by a principle, after the few-shot critique dialogues.

        Args:
            few_shot: Complete critique/revision transcripts in the paper's form.
            prompt: The red-team prompt.
            response: The assistant's latest response.
            request: The principle's bare critique request.
            style: ``plain``, ``strong`` (asks for a thorough critique) or ``cot`` (reason step by step first).
        """
        request = request + {"plain": "", "strong": STRONG_SUFFIX, "cot": COT_SUFFIX}[style]
        start = COT_CRITIQUE_START if style == "cot" else ""
        if not self.is_chat:
            context = "".join("\n\n" + s.strip() for s in few_shot)
            lead = f" {start}" if start else ""
            conversation = f"\n\n{HUMAN} {prompt.strip()}\n\n{ASSISTANT} {response.strip()}"
            return f"{context}{conversation}{frame_critique_request(request)}{lead}"
        messages = [m for s in few_shot for m in transcript_to_messages(s)]
        messages += [
            {"role": "user", "content": prompt.strip()},
            {"role": "assistant", "content": response.strip()},
            {"role": "user", "content": request},
        ]
        return self.prompt(messages) + (self.assistant_sep + start if start else "")

    def revision_prompt(self, critique_prompt: str, critique: str, request: str) -> str:
        """The request to revise, continuing the critique prompt after the model's critique."""
        if not self.is_chat:
            return f"{critique_prompt} {critique.strip()}{frame_revision_request(request)}"
        sep = " " if critique_prompt.endswith(COT_CRITIQUE_START) else self.assistant_sep  # after the CoT lead
        return critique_prompt + sep + critique.strip() + self.assistant_close + self.prompt_suffix(request)

    def prompt_suffix(self, user_text: str) -> str:
        """A further user turn and the opening of the assistant's answer, as it follows a closed assistant turn."""
        head = [{"role": "user", "content": "h"}, {"role": "assistant", "content": "a"}]
        closed = self.tokenizer.apply_chat_template(head, tokenize=False)
        more = self.tokenizer.apply_chat_template(
            head + [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return more[len(closed) :]

    # ---------------------------------------------------------------------------------------- AI feedback
    def feedback_context(self, shots: Sequence[tuple[str, str]], question: str) -> str:
        """The text after which " (A)" and " (B)" are scored: few-shot (question, answer) pairs, then the question.

        Transcript form: "\\n\\n<question>\\n\\nThe answer is: (B)" per example, as in the paper's evaluation files.
        Chat form: each question a user turn, each answer an assistant turn "The answer is: (B)"; the new question's
        answer turn is opened with "The answer is:".
        """
        if not self.is_chat:
            context = "".join(f"\n\n{q.strip()}\n\n{ANSWER_LEAD}{a}" for q, a in shots)
            return f"{context}\n\n{question.strip()}\n\n{ANSWER_LEAD}"
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": ANSWER_LEAD + a}]
        return (
            self.prompt(messages + [{"role": "user", "content": question.strip()}]) + self.assistant_sep + ANSWER_LEAD
        )

    def cot_prompt(self, shots: Sequence[tuple[str, str, str]], question: str) -> str:
        """The chain-of-thought prompt that the model continues with its reasoning.

        Args:
            shots: (question, reasoning, answer) of each few-shot example (:func:`cot_shot_parts`).
            question: The chain-of-thought question body (:func:`cot_question`).
        """
        if not self.is_chat:
            context = "".join(
                f"\n\n{HUMAN} {q}\n\n{ASSISTANT} {COT_LEAD} {r}\n\n{HUMAN}\n{COT_ANSWER_LEAD} {a}" for q, r, a in shots
            )
            return f"{context}\n\n{HUMAN} {question.strip()}\n\n{ASSISTANT} {COT_LEAD}"
        messages = []
        for q, r, a in shots:
            messages += [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"{COT_LEAD} {r}\n\n{COT_ANSWER_LEAD} {a}"},
            ]
        return self.prompt(messages + [{"role": "user", "content": question.strip()}]) + self.assistant_sep + COT_LEAD

    def cot_answer_context(self, cot_prompt: str, reasoning: str) -> str:
        """The text after which the options are scored once the model has reasoned."""
        if not self.is_chat:
            return f"{cot_prompt} {reasoning.strip()}\n\n{HUMAN}\n{COT_ANSWER_LEAD}"
        return f"{cot_prompt} {reasoning.strip()}\n\n{COT_ANSWER_LEAD}"

    def answer_context(self, query: str) -> str:
        """A ready-made multiple-choice text (e.g. a row of the paper's HHH evaluations) in this format."""
        if not self.is_chat:
            return query
        return self.feedback_context([], question_body(query))
