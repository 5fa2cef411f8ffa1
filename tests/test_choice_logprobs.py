import random

import pytest
import torch

from models import ModelConfig, load_model
from models.logprobs import choice_logprobs, continuation_logprobs
from models.tiny import TinyModelConfig, make_tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
PAD = 0  # the tiny tokenizer's <|pad|>


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), TinyModelConfig(arch=request.param, seed=3))
    return load_model(ModelConfig(str(path))).eval()


def random_contexts(n, seed=0, longest=40):
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


def old_path(model, contexts, options, batch_size):
    """Context + option as one sequence per (context, option): the reference."""
    ctx = [c for c in contexts for _ in options]
    cont = [o for _ in contexts for o in options]
    lp = continuation_logprobs(model, ctx, cont, PAD, batch_size)
    return torch.tensor(lp).view(len(contexts), len(options))


# Unequal lengths, a shared first token (5), a one-token option and a repeated token.
OPTIONS = [[5, 9, 11], [5, 12], [40], [7, 7, 7, 7]]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_equals_one_sequence_per_option(arch_model, batch_size):
    contexts = random_contexts(7)
    new = torch.tensor(choice_logprobs(arch_model, contexts, OPTIONS, PAD, batch_size))  # (7, 4)
    assert new.shape == (7, 4)
    torch.testing.assert_close(new, old_path(arch_model, contexts, OPTIONS, batch_size=5), atol=1e-5, rtol=0)


def test_one_token_options_need_no_cache(arch_model):
    contexts = random_contexts(5, seed=1)
    options = [[21], [22], [23]]
    new = torch.tensor(choice_logprobs(arch_model, contexts, options, PAD, batch_size=2))
    torch.testing.assert_close(new, old_path(arch_model, contexts, options, batch_size=4), atol=1e-5, rtol=0)


def test_two_letter_options_like_the_feedback_query(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    contexts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["Which is better? The answer is:", "Hm."]]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in (" (A)", " (B)")]
    new = torch.tensor(choice_logprobs(tiny_model, contexts, options, tok.pad_token_id))
    ctx = [c for c in contexts for _ in options]
    old = continuation_logprobs(tiny_model, ctx, options * len(contexts), tok.pad_token_id)
    torch.testing.assert_close(new, torch.tensor(old).view(2, 2), atol=1e-5, rtol=0)


def test_each_context_goes_through_the_model_once(tiny_model):
    contexts = random_contexts(10, seed=2)
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (
                kwargs["input_ids"].clone(),
                kwargs["attention_mask"].clone(),
                kwargs.get("cache", kwargs.get("past_key_values")),
            )
        )

    done = []
    handle = tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        choice_logprobs(tiny_model, contexts, OPTIONS, PAD, batch_size=4, on_batch=done.append)
    finally:
        handle.remove()
    assert done == [4, 4, 2]  # on_batch: contexts scored per batch
    context_calls = [(ids, mask) for ids, mask, cache in calls if cache is None]
    option_calls = [ids for ids, _, cache in calls if cache is not None]
    assert len(context_calls) == len(option_calls) == 3  # one context pass, then one option pass, per batch
    seen = [ids[m.bool()].tolist() for ids, mask in context_calls for ids, m in zip(ids, mask)]
    assert sorted(seen) == sorted(contexts)  # every context exactly once
    width = max(len(o) for o in OPTIONS)
    assert [ids.shape for ids in option_calls] == [(4 * 4, width - 1), (4 * 4, width - 1), (2 * 4, width - 1)]
    fed = sum(ids.numel() for ids, _, _ in calls)
    padded_contexts = sum(ids.numel() for ids, _ in context_calls)
    assert fed == padded_contexts + len(contexts) * len(OPTIONS) * (width - 1)
    assert fed < sum(len(c) for c in contexts) * len(OPTIONS)  # the old path reads every context once per option


def test_rejects_empty_options_and_contexts(tiny_model):
    with pytest.raises(ValueError, match="option"):
        choice_logprobs(tiny_model, [[3, 4]], [[5], []], PAD)
    with pytest.raises(ValueError, match="context"):
        choice_logprobs(tiny_model, [[3, 4], []], [[5]], PAD)
