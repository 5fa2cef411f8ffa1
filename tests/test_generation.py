import pytest
import torch

from cai.method.generation import Generator, SamplingConfig, format_prompt, length_buckets

PROMPTS = ["Hi", "What is the capital of France, and why is it famous?", "Tell me a story.", "2+2?", "Why?"]


def test_length_buckets_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    buckets = length_buckets(lengths, 3)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert [len(b) for b in buckets] == [3, 3, 1]
    flat = [lengths[i] for b in buckets for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_prompt_formats(tiny_tokenizer):
    assert format_prompt("Hi ", tiny_tokenizer, "transcript") == "\n\nHuman: Hi\n\nAssistant:"
    assert format_prompt("raw text", tiny_tokenizer, "raw") == "raw text"
    chat = format_prompt("Hi", tiny_tokenizer, "chat")
    assert chat == tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert format_prompt(msgs, tiny_tokenizer, "transcript") == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    with pytest.raises(ValueError, match="prompt_format"):
        format_prompt("x", tiny_tokenizer, "bogus")


def test_batched_greedy_equals_one_at_a_time(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=4, stop=[])
    gen = Generator(tiny_model, tiny_tokenizer, cfg)
    batched = gen.generate(PROMPTS)
    alone = [gen.generate([p])[0] for p in PROMPTS]
    # Left padding and length buckets must not change what the model sees, and results keep the prompts' order.
    assert [g[0].response_ids for g in batched] == [g[0].response_ids for g in alone]
    for p, g in zip(PROMPTS, batched):
        assert g[0].prompt_ids == tiny_tokenizer(format_prompt(p, tiny_tokenizer, "transcript"))["input_ids"]


def test_samples_per_prompt_seeded(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=12, num_samples=3, batch_size=2, seed=7, stop=[])
    gen = Generator(tiny_model, tiny_tokenizer, cfg)
    a, b = gen.generate(PROMPTS), gen.generate(PROMPTS)
    assert all(len(g) == 3 for g in a)
    assert [[x.response_ids for x in g] for g in a] == [[x.response_ids for x in g] for g in b]
    c = gen.generate(PROMPTS, SamplingConfig(**{**cfg.__dict__, "seed": 8}))
    assert [[x.response_ids for x in g] for g in a] != [[x.response_ids for x in g] for g in c]
    assert len({tuple(x.response_ids) for x in a[1]}) > 1, "samples of one prompt should differ"
    assert all(len(x.response_ids) <= 12 for g in a for x in g)


def test_eos_padding_and_stop_strings(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    gen = Generator(tiny_model, tok, SamplingConfig(max_new_tokens=20, stop=["\n\nHuman:"]))
    words = tok("Sure, here it is.", add_special_tokens=False)["input_ids"]
    g = gen._make([1, 2], words + [tok.eos_token_id] + [tok.pad_token_id] * 3, gen.config)
    assert g.response_ids == words + [tok.eos_token_id] and g.finished and g.text == "Sure, here it is."
    cut = tok("Answer.\n\nHuman: next question", add_special_tokens=False)["input_ids"]
    g = gen._make([1], cut, gen.config)
    assert g.text == "Answer." and g.finished
    g = gen._make([1], words, SamplingConfig(max_new_tokens=len(words)))
    assert not g.finished  # ran out of tokens


def test_generation_restores_train_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    Generator(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=2)).generate(["x"])
    assert tiny_model.training
    tiny_model.eval()
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**tiny_tokenizer(["x"], return_tensors="pt")).logits).all()


def test_keyed_samples_do_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    keys = [f"p{i}" for i in range(len(PROMPTS))]

    def sample(prompts, ks, **kw):
        cfg = SamplingConfig(max_new_tokens=10, num_samples=2, seed=5, top_p=0.9, stop=[], **kw)
        out = Generator(tiny_model, tiny_tokenizer, cfg).generate(prompts, keys=ks)
        return {k: [x.response_ids for x in g] for k, g in zip(ks, out)}

    for extra in ({}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}):
        ref = sample(PROMPTS, keys, batch_size=1, **extra)
        assert sample(PROMPTS, keys, batch_size=5, **extra) == ref
        assert sample(PROMPTS[::-1], keys[::-1], batch_size=2, **extra) == ref  # other batches, other padding
        assert sample(PROMPTS[2:4], keys[2:4], batch_size=3, **extra) == {k: ref[k] for k in keys[2:4]}
        assert all(a != b for a, b in ref.values()), "the samples of one prompt should differ"
    # The key, not the text, decides the draw: the same prompt under two keys samples differently.
    twice = sample(["Hi", "Hi"], ["a", "b"], batch_size=2)
    assert twice["a"] != twice["b"]
    assert sample(PROMPTS, keys, batch_size=2) != sample(PROMPTS, keys, batch_size=2, temperature=0.5)


def test_keyed_greedy_equals_plain_greedy(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=3, stop=[])
    gen = Generator(tiny_model, tiny_tokenizer, cfg)
    plain = [g[0].response_ids for g in gen.generate(PROMPTS)]
    assert [g[0].response_ids for g in gen.generate(PROMPTS, keys=[str(i) for i in range(len(PROMPTS))])] == plain


def test_keyed_sampling_draws_from_the_filtered_softmax(tiny_model, tiny_tokenizer):
    """Gumbel-max with per-row generators samples the distribution HF's warpers define (here top-k 4, T 0.8)."""
    n = 3000
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=4, batch_size=n, stop=[])
    gen = Generator(tiny_model, tiny_tokenizer, cfg)
    out = gen.generate(["Tell me a story."] * n, keys=[str(i) for i in range(n)])
    firsts = [(g[0].response_ids or [tiny_tokenizer.pad_token_id])[0] for g in out]  # a sampled pad is stripped
    ids = tiny_tokenizer(format_prompt("Tell me a story.", tiny_tokenizer, "auto"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, -1].float() / 0.8
    top = torch.topk(logits, 4)
    expect = dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))
    assert set(firsts) <= set(expect)
    tv = sum(abs(firsts.count(t) / n - p) for t, p in expect.items()) / 2
    assert tv < 0.04, (tv, expect)


def test_row_sampler_repetition_penalty_is_hfs_on_each_rows_own_tokens():
    import transformers

    from cai.method.generation import RowSampler

    torch.manual_seed(0)
    ids, pads = torch.randint(1, 50, (5, 9)), [0, 3, 1, 8, 2]  # row 3 has a single real token
    for r, pad in enumerate(pads):
        ids[r, :pad] = 0  # left padding, whose token must not be penalised
    scores = torch.randn(5, 50)
    fast = RowSampler(SamplingConfig(temperature=0.0, repetition_penalty=1.3), pads, [0] * 5, torch.device("cpu"))
    hf = transformers.generation.logits_process.RepetitionPenaltyLogitsProcessor(1.3)
    slow = torch.cat([hf(ids[r : r + 1, pad:], scores[r : r + 1].clone()) for r, pad in enumerate(pads)])
    assert torch.equal(fast(ids, scores.clone()), slow)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (20, 0.8), (7, 1.0), (0, 0.999)])
def test_nucleus_keeps_what_hfs_warpers_keep(top_k, top_p):
    import transformers

    from cai.method.generation import nucleus

    torch.manual_seed(1)
    scores = torch.randn(6, 3000) * torch.tensor([0.5, 1, 2, 4, 8, 0.01])[:, None]  # flat to peaked rows
    lp = transformers.generation.logits_process
    hf = scores.clone()
    if top_k:
        hf = lp.TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = lp.TopPLogitsWarper(top_p)(None, hf)
    values, indices = nucleus(scores, top_k, top_p, start=8)
    ours = torch.full_like(scores, float("-inf")).scatter(1, indices, values)
    assert torch.equal(ours, hf)
    assert values.shape[1] < 3000 or top_p > 0.99  # only the candidates, not the whole vocabulary
