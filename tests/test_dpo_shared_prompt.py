"""DPO's policy pass reads each pair's prompt once: the same log-probs and gradients as two whole-text passes."""

import pytest
import torch

from data.dpo import DPOCollator
from models import ModelConfig, load_model, load_tokenizer
from models.loading import enable_activation_checkpointing
from models.sequence_logprobs import can_share_prompt, pair_logprobs
from models.tiny import ARCHITECTURES, TinyModelConfig, make_tiny_model

PAIRS = [  # prompts of different lengths (left padding), responses of different lengths (right padding), and one
    # response of a single token (nothing to feed after the prompt's cache)
    ("Tell me about the river near the old house.", " It is quiet and blue, and the road is long.", " No."),
    ("Why?", " Because the road is long and the lamp is old.", " I will not say anything about that at all."),
    ("Hi", " a", " b"),
]


def rows(tok):
    frame = "\n\nHuman: {}\n\nAssistant:"
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        {"prompt_ids": ids(frame.format(p)), "chosen_ids": ids(c), "rejected_ids": ids(r), "p_chosen": 0.8}
        for p, c, r in PAIRS
    ]


def whole_text_logps(model, examples) -> torch.Tensor:
    """Reference: each prompt + response as its own unpadded sequence, log-probs of the response tokens summed."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e[key]])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)  # (T-1, V)
            n = len(e["prompt_ids"])
            out.append(sum(logp[n - 1 + j, t] for j, t in enumerate(e[key])))
    return torch.stack(out)  # (2B,): chosen rows, then rejected rows


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), TinyModelConfig(arch=request.param, seed=2))


def test_shared_prompt_gives_the_whole_text_logps_and_gradients(arch_dir):
    """Every architecture: log-probs and gradients through the cache equal those of unpadded whole texts."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(str(arch_dir), dtype="float32"))
    tok = load_tokenizer(str(arch_dir), padding_side="right")
    examples = rows(tok)
    batch = DPOCollator(tok.pad_token_id)(examples)
    args = [batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")]
    assert can_share_prompt(model, batch["width"])

    seen = []  # (rows, width) of every forward call
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    c, r = pair_logprobs(model, *args, width=batch["width"])
    handle.remove()
    B, P = batch["prompt_ids"].shape
    R = batch["response_ids"].shape[1]
    assert seen == [(B, P), (2 * B, R - 1)], "the prompt must go through the network once"
    (c - 2 * r).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    whole = whole_text_logps(model, examples)
    torch.testing.assert_close(torch.cat([c, r]), whole, atol=1e-4, rtol=1e-5)
    (whole[:B] - 2 * whole[B:]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(shared_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)

    heads = []  # (rows, positions, vocabulary) of every LM-head output
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: heads.append(tuple(out.shape)))
    unshared = pair_logprobs(model, *args, share_prompt=False, width=batch["width"])
    handle.remove()
    torch.testing.assert_close(torch.cat(unshared), whole, atol=1e-4, rtol=1e-5)
    assert heads == [(2 * B, R + 1, model.config.vocab_size)], "whole texts: the head runs on the responses only"


def test_gradient_checkpointing_turns_sharing_off(tiny_model_dir):
    model = load_model(ModelConfig(str(tiny_model_dir)))
    assert can_share_prompt(model, 10)
    enable_activation_checkpointing(model)
    assert not can_share_prompt(model, 10)
