"""Generation with a shared few-shot prefix read once gives what the unshared path gives."""

import pytest
import torch

from cai.method.generation import Generator, SamplingConfig
from models import ModelConfig, load_model, load_tokenizer
from models.tiny import TinyModelConfig, make_tiny_model

FEW_SHOT = (
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris, which is famous for its museums and food."
    "\n\nHuman: Tell me a story about a dragon.\n\nAssistant: Once upon a time a dragon guarded a small village."
)
QUESTIONS = ["Hi", "What is two plus two, and why?", "Tell me a story.", "Why is the sky blue?", "Name a fruit."]
PROMPTS = [f"{FEW_SHOT}\n\nHuman: {q}\n\nAssistant:" for q in QUESTIONS]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_and_tok(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), TinyModelConfig(arch=request.param, seed=1))
    return load_model(ModelConfig(str(path))).eval(), load_tokenizer(str(path), padding_side="left")


def run(model, tok, share, prompts=PROMPTS, keys=None, **kw):
    cfg = SamplingConfig(stop=[], prompt_format="raw", **{"max_new_tokens": 10, **kw})
    gen = Generator(model, tok, cfg, share_prefix=share)
    return [[g.response_ids for g in gs] for gs in gen.generate(prompts, keys=keys)], gen


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_shared_greedy_equals_unshared(model_and_tok, batch_size):
    model, tok = model_and_tok
    shared, gen = run(model, tok, True, temperature=0.0, batch_size=batch_size)
    plain, _ = run(model, tok, False, temperature=0.0, batch_size=batch_size)
    assert gen._prefix is not None and len(gen._prefix[1]) >= 40  # the few-shot part was shared
    assert shared == plain
    assert all(len(r[0]) == 10 for r in shared)


def test_shared_keyed_sampling_equals_unshared(model_and_tok):
    model, tok = model_and_tok
    keys = [f"p{i}" for i in range(len(PROMPTS))]
    kw = dict(num_samples=2, top_p=0.9, top_k=50, repetition_penalty=1.3, no_repeat_ngram_size=2, batch_size=2)
    shared, _ = run(model, tok, True, keys=keys, **kw)
    plain, _ = run(model, tok, False, keys=keys, **kw)
    assert shared == plain
    assert len({tuple(s) for r in shared for s in r}) > 1
    one, _ = run(model, tok, True, prompts=PROMPTS[:1], keys=keys[:1], **kw)  # two samples share the whole prompt
    assert one == plain[:1]


def test_prefix_is_reused_by_later_calls_until_the_weights_change(model_and_tok):
    model, tok = model_and_tok
    gen = Generator(model, tok, SamplingConfig(max_new_tokens=3, temperature=0.0, stop=[], prompt_format="raw"))
    gen.generate(PROMPTS[:3])
    first = gen._prefix[1]
    gen.generate(PROMPTS[2:])
    assert gen._prefix[1] is first  # the same few-shot prefix: not read again
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # an in-place update, as an optimizer step makes
    gen.generate(PROMPTS[2:])
    assert gen._prefix[1] is not first


def test_shared_prefix_is_exact_on_the_real_model(smollm2_dir, shared_cai):
    """SmolLM2 in chat format with the paper's few-shot files: greedy critiques and feedback log-probabilities."""
    from cai.method.constitution import load_constitution
    from cai.method.feedback import few_shot_pair
    from data.formats import PromptFormat
    from models.logprobs import choice_logprobs

    model = load_model(ModelConfig(str(smollm2_dir))).eval()
    tok = load_tokenizer(str(smollm2_dir), padding_side="left")
    const = load_constitution(shared_cai / "prompts")
    fmt = PromptFormat(tok, "chat")
    request = const.critiques[0].critique_request
    prompts = [fmt.critique_prompt(const.critique_few_shot[:1], q, "Sure.", request) for q in QUESTIONS[:3]]
    greedy = dict(temperature=0.0, max_new_tokens=8, batch_size=3)
    shared, gen = run(model, tok, True, prompts=prompts, **greedy)
    assert len(gen._prefix[1]) > 300  # the few-shot dialogue
    assert shared == run(model, tok, False, prompts=prompts, **greedy)[0]
    shots = [few_shot_pair(ex, i) for i, ex in enumerate(const.feedback_few_shot[:2])]
    contexts = [tok(fmt.feedback_context(shots, f"Which is better? (A) {q} (B) No."))["input_ids"] for q in QUESTIONS]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in (" (A)", " (B)")]
    a = torch.tensor(choice_logprobs(model, contexts, options, tok.pad_token_id, batch_size=3))
    b = torch.tensor(choice_logprobs(model, contexts, options, tok.pad_token_id, batch_size=3, share_prefix=False))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
