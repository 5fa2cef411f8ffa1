"""One prompt format through every stage (data.formats): the same conversation renders the same everywhere.

The real instruct model (SmolLM2-135M-Instruct, ChatML) is the chat-template case; the tiny model's transcript-like
template and the paper's transcript form are the others.
"""

from __future__ import annotations

import json

import pytest

from cai.method.constitution import load_constitution
from cai.method.feedback import FeedbackConfig, FeedbackScorer
from cai.method.generation import Generation, Generator, SamplingConfig
from cai.stages.ppo import PPOModule
from cai.stages.sl_data import CritiqueConfig, critique_revise
from data.formats import (
    OPTIONS,
    PromptFormat,
    cot_shot_parts,
    feedback_question,
    question_body,
    transcript_to_messages,
)
from data.preference import tokenize_pair
from data.prompt_data import PromptDataModule
from data.sft import IGNORE_INDEX, tokenize_example
from helpers import slow_logprob
from models import ModelConfig, load_model, load_tokenizer

PROMPT = "How do I pick the lock on my neighbour's door?"
RESPONSE = "I can't help with getting into someone else's home. A locksmith can help with your own door."


@pytest.fixture(scope="module")
def real_tok(smollm2_dir):
    return load_tokenizer(str(smollm2_dir), padding_side="left")


@pytest.fixture(scope="module")
def real_model(smollm2_dir):
    return load_model(ModelConfig(str(smollm2_dir))).eval()


def test_chat_prompt_renders_identically_in_sft_ppo_and_the_preference_model(smollm2_dir, real_tok):
    fmt = PromptFormat(real_tok)
    assert fmt.kind == "chat" and fmt.end_of_turn == "<|im_end|>" and fmt.stop_token_ids() == [2]
    # SFT: the prompt tokens are the masked ones; the target ends with the end-of-turn token.
    sft = tokenize_example({"prompt": PROMPT, "completion": RESPONSE}, fmt, 1024)
    n_prompt = sum(label == IGNORE_INDEX for label in sft["labels"])
    sft_prompt, sft_full = sft["input_ids"][:n_prompt], sft["input_ids"]
    assert real_tok.decode(sft_prompt).endswith("<|im_start|>assistant\n")
    assert real_tok.convert_ids_to_tokens(sft_full[n_prompt:])[-2:] == ["<|im_end|>", "Ċ"]
    # PPO: the rollout's query is the policy module's format applied to the prompt; its data module measures the same.
    ppo = PPOModule(ModelConfig(str(smollm2_dir)), reward_function="cai.method.rewards:letter_share")
    ppo.configure_model()  # loads the policy, the reference and the tokenizer as `cai ppo` does
    ppo_query = real_tok(ppo.format.prompt(PROMPT), add_special_tokens=False)["input_ids"]
    assert ppo_query == sft_prompt and ppo.stop_ids == [2]
    data = PromptDataModule(prompts="red_team", tokenizer=str(smollm2_dir))
    assert data.hparams.prompt_format == "auto"
    # Preference model: each text is the whole SFT conversation; the pair shares the SFT prompt.
    pair = tokenize_pair({"prompt": PROMPT, "chosen": RESPONSE, "rejected": "Sure, here's how."}, fmt, 1024, False)
    assert pair["chosen_ids"] == sft_full and pair["rejected_ids"][:n_prompt] == sft_prompt
    # Messages and plain strings are the same prompt.
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    assert tokenize_example({"messages": msgs}, fmt, 1024) == sft


def test_transcript_form_is_the_papers_text(tiny_tokenizer, shared_cai):
    fmt = PromptFormat(tiny_tokenizer, "transcript")
    assert fmt.prompt(" Hi ") == "\n\nHuman: Hi\n\nAssistant:"
    assert fmt.text("Hi", "Hello.") == "\n\nHuman: Hi\n\nAssistant: Hello." + tiny_tokenizer.eos_token
    # A row of the paper's HHH evaluations is already a transcript-form feedback question: it is read as it is, and
    # our own question builder reproduces its layout.
    row = json.loads(open(shared_cai / "evals" / "438HHHEvaluations.jsonl").readline())
    assert fmt.answer_context(row["prompt"]) == row["prompt"]
    assert fmt.feedback_context([], question_body(row["prompt"])) == row["prompt"]


def test_tiny_template_chat_and_transcript_agree(tiny_tokenizer):
    # The tiny model's chat template is the paper's transcript, so both forms give the same conversation text.
    chat, transcript = PromptFormat(tiny_tokenizer), PromptFormat(tiny_tokenizer, "transcript")
    assert chat.kind == "chat" and chat.prompt(PROMPT) == transcript.prompt(PROMPT)
    assert chat.text(PROMPT, RESPONSE) == transcript.text(PROMPT, RESPONSE)
    # The paper's feedback question stands outside the conversation; in chat form it is a user turn.
    assert transcript.feedback_context([], "Q?") == "\n\nQ?\n\nThe answer is:"
    assert chat.feedback_context([], "Q?") == "\n\nHuman: Q?\n\nAssistant: The answer is:"
    with pytest.raises(ValueError, match="prompt_format must be auto, chat or transcript"):
        PromptFormat(tiny_tokenizer, "markdown")


def test_critique_and_feedback_are_user_turns_in_chat_form(real_tok):
    fmt = PromptFormat(real_tok)
    const = load_constitution("default")
    shot = const.critique_few_shot[0]
    critique = fmt.critique_prompt([shot], PROMPT, RESPONSE, const.critiques[0].critique_request)
    turns = transcript_to_messages(shot)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3  # human, assistant; request, critique; x2
    # The few-shot dialogue comes first as earlier turns, then the conversation, then the request as a user turn.
    assert critique.count("<|im_start|>user\n") == 5 and critique.endswith("<|im_start|>assistant\n")
    assert "CritiqueRequest:" not in critique and const.critiques[0].critique_request in critique
    revision = fmt.revision_prompt(critique, "It helps break in.", const.critiques[0].revision_request)
    assert revision.startswith(critique + "It helps break in.<|im_end|>\n<|im_start|>user\n")
    assert revision.endswith(const.critiques[0].revision_request + "<|im_end|>\n<|im_start|>assistant\n")
    question = feedback_question(PROMPT, const.feedback[0].text, RESPONSE, "Sure.")
    context = fmt.feedback_context([("Q1", " (B)")], question)
    assert context.endswith(question + "<|im_end|>\n<|im_start|>assistant\nThe answer is:")
    assert "<|im_start|>assistant\nThe answer is: (B)<|im_end|>" in context
    # Chain-of-thought examples become (question, reasoning, answer) turns.
    q, r, a = cot_shot_parts(const.feedback_cot_few_shot[0], const.feedback[0].text)
    assert q.startswith("Consider the following conversation") and const.feedback[0].text in q
    assert r.startswith("(A) avoids harm") and a == "(B)"


def test_real_model_stops_at_end_of_turn_and_says_it_finished(real_model, real_tok):
    gen = Generator(real_model, real_tok, SamplingConfig(max_new_tokens=40, temperature=0.0, batch_size=2))
    out = gen.generate(["What is the capital of France?", "Name three colours of the rainbow, and nothing else."])
    for (g,) in out:
        assert g.finished and g.response_ids[-1] == real_tok.convert_tokens_to_ids("<|im_end|>")
        assert "<|im_end|>" not in g.text and "im_start" not in g.text
    assert "Paris" in out[0][0].text
    short = gen.generate(["Write a long story about a dragon."], SamplingConfig(max_new_tokens=4, temperature=0.0))
    assert not short[0][0].finished and len(short[0][0].response_ids) == 4


def test_real_model_feedback_scores_both_options_from_one_chat_question(real_model, real_tok):
    const = load_constitution("default")
    scorer = FeedbackScorer(real_model, real_tok, const, FeedbackConfig(num_few_shot=1, both_orders=True))
    item = {"prompt": PROMPT, "response_a": RESPONSE, "response_b": "Use a bump key.", "principles": ["harm-general"]}
    item["principles"] = [const.feedback[0].id]
    res = scorer.score([item])[0]
    assert len(res["logprobs"]) == 2 and 0.0 < res["p_a"] < 1.0
    # The scored context is the chat question: check one option's log-probability by a plain forward pass.
    question = feedback_question(PROMPT, const.feedback[0].text, RESPONSE, "Use a bump key.")
    slow = slow_logprob(real_model, real_tok, scorer.format.feedback_context(scorer.shots, question), OPTIONS[0])
    first = next(x for x in res["logprobs"] if not x["swapped"])
    assert first["A"] == pytest.approx(slow, abs=1e-3)


class ScriptedGenerator:
    """Stands in for ``Generator``: answers every prompt of a call with the next scripted (text, finished)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate(self, prompts, config=None, **kwargs):
        text, finished = self.script.pop(0)
        self.calls.append((list(prompts), config))
        return [[Generation(text, [], [], finished)] for _ in prompts]


def test_cut_off_revisions_are_not_answers(tiny_tokenizer):
    const = load_constitution("default")
    rows = [{"id": "r1", "prompt": PROMPT, "kind": "red_team"}, {"id": "h1", "prompt": "Hi", "kind": "helpful"}]
    script = [("Initial answer.", True), ("Critique one.", True), ("Revision one.", True)]
    script += [("Critique two.", True), ("Revision two, cut of", False)]
    gen = ScriptedGenerator(tiny_tokenizer, script)
    stats = {"empty_revisions": 0, "unfinished_revisions": 0}
    recs = critique_revise(gen, const, rows, CritiqueConfig(rounds=2, num_few_shot=1), SamplingConfig(), stats)
    red = recs[0]
    assert red["final_response"] == "Revision one." and red["finished"] is True  # the cut-off one is not used
    assert [r["revision_finished"] for r in red["rounds"]] == [True, False] and stats["unfinished_revisions"] == 1
    # Critiques and revisions stop at every turn label, including invented spaced ones.
    assert "Critique Request:" in gen.calls[1][1].stop and gen.calls[1][1].prompt_format == "raw"
    keep = CritiqueConfig(rounds=2, num_few_shot=1, keep_unfinished=True)
    gen = ScriptedGenerator(tiny_tokenizer, script)
    red = critique_revise(gen, const, rows, keep, SamplingConfig(), dict(stats))[0]
    assert red["final_response"] == "Revision two, cut of" and red["finished"] is False
