"""A shared token prefix read once (``models.prefix_cache``) gives what the unshared path gives."""

import random

import pytest
import torch

from models import ModelConfig, load_model
from models.logprobs import choice_logprobs
from models.prefix_cache import SharedPrefix, shared_prefix_length
from models.tiny import TinyModelConfig, make_tiny_model

PAD = 0  # the tiny tokenizer's <|pad|>
OPTIONS = [[5, 9, 11], [5, 12], [40], [7, 7, 7, 7]]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def arch_model(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), TinyModelConfig(arch=request.param, seed=3))
    return load_model(ModelConfig(str(path))).eval()


def with_prefix(n, prefix_len=60, seed=0, longest=30):
    """``n`` contexts: one shared prefix, then suffixes of 1 to ``longest`` tokens (one of them a single token)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 512) for _ in range(prefix_len)]
    lengths = [1] + [rng.randrange(1, longest) for _ in range(n - 1)]
    return [prefix + [rng.randrange(2, 512) for _ in range(k)] for k in lengths]


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], min_length=1) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]], min_length=1) == 2  # a row keeps one token
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], min_length=1) == 2
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], min_length=4) == 0  # too short to be worth it
    assert shared_prefix_length([[1, 2, 3, 4]], min_length=1) == 0  # one row: nothing to share
    assert shared_prefix_length([[9, 2], [1, 2]], min_length=0) == 0


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_choice_logprobs_shared_equals_unshared(arch_model, batch_size):
    contexts = with_prefix(7)
    shared = torch.tensor(choice_logprobs(arch_model, contexts, OPTIONS, PAD, batch_size))
    plain = torch.tensor(choice_logprobs(arch_model, contexts, OPTIONS, PAD, batch_size, share_prefix=False))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert shared.shape == (7, 4) and not torch.equal(shared[0], shared[1])


def test_prefix_extends_an_earlier_one(arch_model):
    rows = with_prefix(4, prefix_len=40, seed=2)
    short = SharedPrefix(arch_model, rows[0][:20])
    longer = SharedPrefix(arch_model, rows[0][:40], reuse=short)
    fresh = SharedPrefix(arch_model, rows[0][:40])
    assert longer.cache.get_seq_length() == fresh.cache.get_seq_length() == 40
    assert short.cache.get_seq_length() == 20  # the earlier prefix is copied, not extended in place
    for a, b in zip(longer.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="start with the prefix"):
        fresh.layout([rows[0][:40]], PAD, "cpu")
