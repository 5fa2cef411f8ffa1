"""The preference model runs the prefix both texts of a pair share once: same rewards and gradients, less work."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.formats import PromptFormat
from data.preference import PreferenceCollator, join_pairs, shared_prefix_length, tokenize_pair
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel
from models.loading import enable_activation_checkpointing
from models.tiny import ARCHITECTURES, TinyModelConfig, make_tiny_model

PAIRS = [  # prompts of different lengths, so the prompt block is left-padded; responses of different lengths
    ("Tell me about the river near the old house.", "It is quiet and blue, and the road is long.", "No, I will not."),
    ("Why?", "Because the road is long and the lamp is old.", "I will not say anything about that at all."),
]


def examples(tok, pairs=PAIRS):
    frame = "\n\nHuman: {}\n\nAssistant: {}"
    return [
        {
            "chosen_ids": tok(frame.format(p, c), add_special_tokens=False)["input_ids"],
            "rejected_ids": tok(frame.format(p, r), add_special_tokens=False)["input_ids"],
            "p_chosen": 1.0,
        }
        for p, c, r in pairs
    ]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), TinyModelConfig(arch=request.param, seed=1))


def test_shared_prefix_length_leaves_a_token_on_each_side():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix_length([1, 2, 3], [1, 2, 3]) == 2  # identical texts: the last token stays a continuation
    assert shared_prefix_length([1, 2], [1, 2, 3, 4]) == 1  # one text a prefix of the other
    assert shared_prefix_length([7, 2], [1, 2]) == 0


def test_collator_layout_and_join_round_trip(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    ex = examples(tok)
    batch = PreferenceCollator(tok.pad_token_id)(ex)
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    assert prompt_mask[0].all() and not prompt_mask[1, 0], (
        "the longer prompt fills the block; the shorter is left-padded"
    )
    for i, e in enumerate(ex):
        n = int(prompt_mask[i].sum())
        assert prompt_ids[i, prompt_mask.shape[1] - n :].tolist() == e["chosen_ids"][:n] == e["rejected_ids"][:n]
        for row, key in ((2 * i, "chosen_ids"), (2 * i + 1, "rejected_ids")):  # interleaved continuations
            m = int(batch["response_mask"][row].sum())
            assert m >= 1 and batch["response_ids"][row, :m].tolist() == e[key][n:]
    ids, mask = join_pairs(batch, tok.pad_token_id)  # back to whole texts: chosen rows, then rejected rows
    for r, key in enumerate(["chosen_ids"] * 2 + ["rejected_ids"] * 2):
        text = ex[r % 2][key]
        assert ids[r, : len(text)].tolist() == text and int(mask[r].sum()) == len(text)


def test_pair_without_common_first_token_gets_an_empty_prompt_row(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    ex = examples(tok)
    ex[1] = {**ex[1], "rejected_ids": [tok.eos_token_id] + ex[1]["rejected_ids"]}  # e.g. cut from the left apart
    batch = PreferenceCollator(tok.pad_token_id)(ex)
    assert batch["prompt_mask"][0].sum() > 0 and batch["prompt_mask"][1].sum() == 0
    assert batch["response_mask"][2:].sum(1).tolist() == [len(ex[1]["chosen_ids"]), len(ex[1]["rejected_ids"])]
    pm = PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir), dtype="float32"))
    r_c, r_r = pm.forward_pairs(*[batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")])
    ids, mask = join_pairs(batch, tok.pad_token_id)
    torch.testing.assert_close(torch.cat([r_c, r_r]), pm(ids, mask), atol=1e-5, rtol=1e-5)


def test_long_pairs_are_cut_at_the_same_token_when_the_cut_part_is_shared(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    row = {"prompt": "the old road " * 20, "chosen": "yes", "rejected": "no, the river is blue and quiet"}
    full_c = tok(PromptFormat(tok).text(row["prompt"], row["chosen"]), add_special_tokens=False)["input_ids"]
    full_r = tok(PromptFormat(tok).text(row["prompt"], row["rejected"]), add_special_tokens=False)["input_ids"]
    ex = tokenize_pair(row, PromptFormat(tok), 40, True)
    cut = len(full_r) - 40  # the longer text fits exactly; the shorter loses the same leading tokens
    assert ex["rejected_ids"] == full_r[cut:] and ex["chosen_ids"] == full_c[cut:]
    assert shared_prefix_length(ex["chosen_ids"], ex["rejected_ids"]) > 0
    apart = tokenize_pair(
        {"chosen": "a " * 60 + "x", "rejected": "b " * 60 + "y"}, PromptFormat(tok), 40, True
    )  # differ at once
    assert len(apart["chosen_ids"]) == len(apart["rejected_ids"]) == 40  # each keeps its own last 40 tokens


def test_shared_prompt_gives_the_whole_text_rewards_and_gradients(arch_dir):
    """Rewards and gradients through the KV cache equal those of running each whole text (every architecture)."""
    torch.manual_seed(0)
    pm = PreferenceModel.from_pretrained(ModelConfig(str(arch_dir), dtype="float32"))
    tok = load_tokenizer(str(arch_dir), padding_side="right")
    batch = PreferenceCollator(tok.pad_token_id)(examples(tok))
    args = [batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")]

    seen = []  # (rows, width) of every backbone call
    handle = pm.backbone.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r_c, r_r = pm.forward_pairs(*args)
    handle.remove()
    # transformers 5.24 renamed the cache argument and removes the old name in 5.40: the new one must be used.
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    B, P = batch["prompt_ids"].shape
    assert seen == [(B, P), (2 * B, batch["response_ids"].shape[1])], "the prompt must go through the backbone once"
    (r_c - 2 * r_r).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in pm.named_parameters()}

    pm.zero_grad()
    ids, mask = join_pairs(batch, tok.pad_token_id)
    whole = pm(ids, mask)  # (2B,): chosen rows, then rejected rows
    torch.testing.assert_close(torch.cat([r_c, r_r]), whole, atol=1e-5, rtol=1e-5)
    (whole[:B] - 2 * whole[B:]).sum().backward()
    for name, p in pm.named_parameters():
        torch.testing.assert_close(shared_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)

    unshared = pm.forward_pairs(*args, share_prompt=False)
    torch.testing.assert_close(torch.cat(unshared), whole, atol=1e-5, rtol=1e-5)
    given_width = pm.forward_pairs(*args, share_prompt=False, width=batch["width"])  # the collator's, no device read
    torch.testing.assert_close(torch.cat(given_width), whole, atol=1e-5, rtol=1e-5)


def test_no_sharing_under_gradient_checkpointing_or_past_a_sliding_window(tiny_model_dir):
    pm = PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir), dtype="float32"))
    assert pm.can_share_prompt(4096)
    enable_activation_checkpointing(pm.backbone)
    assert not pm.can_share_prompt(8)
    pm.backbone.gradient_checkpointing_disable()
    pm.config.sliding_window = 16
    assert pm.can_share_prompt(16) and not pm.can_share_prompt(17)
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    batch = PreferenceCollator(tok.pad_token_id)(examples(tok))
    seen = []
    pm.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    pm.forward_pairs(*[batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")])
    assert len(seen) == 1, "past the window each text must run whole, in one call"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(1, 3), min_size=0, max_size=12),  # shared start
            st.lists(st.integers(1, 3), min_size=1, max_size=12),  # rest of chosen
            st.lists(st.integers(1, 3), min_size=1, max_size=12),  # rest of rejected
        ),
        min_size=1,
        max_size=5,
    )
)
def test_split_batches_never_cost_more_positions_than_whole_texts(pairs):
    ex = [{"chosen_ids": p + c, "rejected_ids": p + r, "p_chosen": 1.0} for p, c, r in pairs]
    batch = PreferenceCollator(pad_token_id=0)(ex)
    whole, _ = join_pairs(batch, 0)
    assert batch["width"] == whole.shape[1]  # the longest whole text
    assert batch["prompt_ids"].numel() + batch["response_ids"].numel() <= whole.numel()
    assert (batch["response_mask"].sum(1) >= 1).all()
    for i, e in enumerate(ex):  # the split loses nothing
        assert whole[i][: len(e["chosen_ids"])].tolist() == e["chosen_ids"]
        assert whole[len(ex) + i][: len(e["rejected_ids"])].tolist() == e["rejected_ids"]


def test_prefix_cap_trades_a_long_prefix_for_less_padding():
    # Pair 0: 20 shared tokens and 2-token answers; pair 1: 2 shared tokens and 20-token answers. Sharing all of
    # pair 0's prefix makes the prompt block 20 wide and the response block 20 wide: 2*20 + 4*20 = 120 positions;
    # whole texts: 4 * 22 = 88; sharing at most 2 tokens: 2*2 + 4*20 = 84.
    assert PreferenceCollator.prefix_cap([(22, 22), (22, 22)], [20, 2]) == 2
    assert PreferenceCollator.prefix_cap([(22, 22), (22, 22)], [20, 20]) == 20  # equal prefixes: share them all


def test_share_prompt_default_is_on_for_a_cpu_and_off_on_a_gpu(tiny_model_dir, monkeypatch):
    # Catches: the stages forcing the shared prompt on a GPU, where it measured 2x slower (docs/BENCHMARKS.md), or
    # losing it on the CPU, where it is the reward model's main gain.
    from cai.stages.pm import PreferenceModule
    from models.sequence_logprobs import share_prompt_on

    assert share_prompt_on(None, torch.device("cpu")) and not share_prompt_on(None, torch.device("cuda"))
    assert share_prompt_on(True, torch.device("cuda")) and not share_prompt_on(False, torch.device("cpu"))
    module = PreferenceModule(ModelConfig(str(tiny_model_dir)))
    assert module.share_prompt is None
    module.configure_model()
    seen = []
    monkeypatch.setattr(module.model, "forward_pairs", lambda *args: seen.append(args[4]) or (torch.zeros(1),) * 2)
    batch = {k: torch.zeros(1, 1) for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "p_chosen")}
    module._step({**batch, "width": 2})
    assert seen == [True]  # on the CPU
