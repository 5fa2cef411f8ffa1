"""Tests for losses.sft: hand values, torch's cross-entropy, and a real Hugging Face causal LM's ``.loss``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import sft_loss, sft_loss_sum
from losses.sft import chunked_sft_loss_sum

FAST = settings(max_examples=50, deadline=None)


def random_batch(seed: int, b: int, t: int, v: int = 13):
    """Logits and HF-style labels: a random-length prompt (ignored) then response, then right padding (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen) * 2
    labels = torch.randint(0, v, (b, t), generator=gen)
    prompt = torch.randint(0, t + 1, (b, 1), generator=gen)
    end = torch.randint(0, t + 1, (b, 1), generator=gen)
    pos = torch.arange(t).unsqueeze(0)
    labels = torch.where((pos < prompt) | (pos >= torch.maximum(prompt, end)), -100, labels)
    return gen, logits, labels


def test_sft_loss_by_hand():
    # T = 3, uniform logits over V = 4 -> every counted token costs log 4; labels[:, 0] is never a target,
    # labels[:, 1] is ignored, so exactly one token (labels[:, 2]) counts.
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[2, -100, 3]])
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(4))
    loss_sum, count = sft_loss_sum(logits, labels)
    assert count.item() == 1 and loss_sum.item() == pytest.approx(math.log(4))
    # the prediction for labels[:, 2] is made at position 1: make it confident and the loss drops to ~0
    logits[0, 1, 3] = 50.0
    assert sft_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), t=st.integers(2, 9))
def test_sft_loss_equals_cross_entropy_on_shifted_tensors(seed, b, t):
    _, logits, labels = random_batch(seed, b, t)
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    loss = sft_loss(logits, labels)
    if (shifted_labels != -100).any():
        torch.testing.assert_close(loss, F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100))
    else:
        assert loss.item() == 0.0
    loss_sum, count = sft_loss_sum(logits, labels)
    assert count.item() == int((shifted_labels != -100).sum())
    torch.testing.assert_close(loss_sum, F.cross_entropy(shifted_logits, shifted_labels, reduction="sum"))


@FAST
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), t=st.integers(2, 9))
def test_sft_logits_at_ignored_targets_never_matter(seed, b, t):
    gen, logits, labels = random_batch(seed, b, t)
    # logits at position t predict labels[:, t + 1]; where that label is ignored, the logits are padding
    ignored_next = torch.cat([labels[:, 1:] == -100, torch.ones(b, 1, dtype=torch.bool)], dim=1)  # (B, T)
    junk = torch.randn(logits.shape, generator=gen) * 1e4
    logits2 = torch.where(ignored_next.unsqueeze(-1), junk, logits)
    torch.testing.assert_close(sft_loss(logits2, labels), sft_loss(logits, labels), rtol=0, atol=0)


def test_sft_all_ignored_gives_zero_with_grad():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = sft_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sft_custom_ignore_index():
    _, logits, labels = random_batch(5, 3, 6)
    relabelled = torch.where(labels == -100, 7777, labels)
    torch.testing.assert_close(sft_loss(logits, relabelled, ignore_index=7777), sft_loss(logits, labels))


@FAST
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), t=st.integers(2, 6))
def test_sft_bf16_logits_give_float32_result(seed, b, t):
    _, logits, labels = random_batch(seed, b, t)
    got = sft_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sft_loss(logits.bfloat16().float(), labels), rtol=1e-6, atol=1e-6)


def test_sft_loss_equals_hf_causal_lm_loss():
    transformers = pytest.importorskip("transformers", reason="transformers is needed to compare with a real HF model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (3, 10))
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 7:] = -100  # padding of a shorter example
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(sft_loss(out.logits, labels), out.loss.float(), rtol=0, atol=1e-6)


def test_aligned_targets_equal_the_shifted_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, :3] = -100
    shifted = sft_loss(logits, labels)
    assert torch.allclose(sft_loss(logits[:, :-1], labels[:, 1:], aligned=True), shifted)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 256])
@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_full_logits_loss_and_grads(chunk_size, head_dtype):
    # the chunked loss from hidden states against sft_loss_sum of all the logits: same value, same gradients
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(2, 7, 5, generator=gen)  # (B, T, H)
    head = torch.nn.Linear(5, 11, bias=False).to(head_dtype)
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    h_full = hidden.to(head_dtype).requires_grad_()
    full_sum, count = sft_loss_sum(head(h_full), labels)
    (g_h_full, g_w_full) = torch.autograd.grad(full_sum, (h_full, head.weight))

    h = hidden.to(head_dtype).requires_grad_()
    wanted = labels[:, 1:] != -100  # (B, T-1)
    got = chunked_sft_loss_sum(h[:, :-1][wanted], labels[:, 1:][wanted], head, chunk_size)
    (g_h, g_w) = torch.autograd.grad(got, (h, head.weight))
    assert got.dtype == torch.float32 and count.item() == int(wanted.sum()) == 8
    torch.testing.assert_close(got, full_sum, rtol=1e-6, atol=1e-5)
    # bfloat16 weights: the head's gradient is summed over chunks in bfloat16 (the full product rounds once)
    tol = {"rtol": 1e-6, "atol": 1e-6} if head_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(g_h, g_h_full, **tol)
    torch.testing.assert_close(g_w, g_w_full, **tol)


def test_chunked_loss_without_targets_is_zero_with_grad():
    head = torch.nn.Linear(4, 6)
    got = chunked_sft_loss_sum(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head, 2)
    got.backward()
    assert got.item() == 0.0 and torch.equal(head.weight.grad, torch.zeros_like(head.weight))
