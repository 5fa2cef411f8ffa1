import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import ModelConfig, load_model, load_tokenizer, resolve_attn_implementation
from models.tiny import ARCHITECTURES, TinyModelConfig, make_tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_factory_saves_reloads_and_generates(arch, tmp_path):
    out = make_tiny_model(tmp_path / arch, TinyModelConfig(arch=arch, seed=1))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == arch

    tok = load_tokenizer(str(out), padding_side="left")
    model = load_model(ModelConfig(str(out)))
    assert model.config.model_type == arch
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.pad_token_id != tok.eos_token_id

    prompts = ["Human: hi", "Human: what is a prime number, please?"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][0, 0] == 0).item(), "left padding expected for generation"
    torch.manual_seed(0)
    gen = model.generate(**enc, max_new_tokens=6, do_sample=True, pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 2 and enc["input_ids"].shape[1] < gen.shape[1] <= enc["input_ids"].shape[1] + 6
    # Plain transformers can read the directory too: nothing here is specific to this project.
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).pad_token == tok.pad_token


def test_tiny_factory_is_deterministic_per_seed(tmp_path):
    a = load_model(ModelConfig(str(make_tiny_model(tmp_path / "a", TinyModelConfig(seed=3)))))
    b = load_model(ModelConfig(str(make_tiny_model(tmp_path / "b", TinyModelConfig(seed=3)))))
    c = load_model(ModelConfig(str(make_tiny_model(tmp_path / "c", TinyModelConfig(seed=4)))))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_tokenizer_round_trips_any_text_and_keeps_settings(tiny_model_dir, tiny_tokenizer):
    text = "Unicode ünïcødé ✓ and numbers 12345 never seen in the corpus"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    right = load_tokenizer(str(tiny_model_dir), padding_side="right")
    assert right.padding_side == "right" and tiny_tokenizer.padding_side == "left"
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert chat == "\n\nHuman: Hi\n\nAssistant: Hello" + tiny_tokenizer.eos_token
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "\n\nHuman: Hi\n\nAssistant:"


def test_unknown_arch_and_small_vocab_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'bert-ish'"):
        make_tiny_model(tmp_path / "x", TinyModelConfig(arch="bert-ish"))
    with pytest.raises(ValueError, match="vocab_size=100"):
        make_tiny_model(tmp_path / "y", TinyModelConfig(vocab_size=100))


def test_loader_options(tiny_model_dir, monkeypatch):
    bf16 = load_model(ModelConfig(str(tiny_model_dir), dtype="bfloat16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert bf16.config._attn_implementation == "sdpa"  # no flash-attn / GPU here
    eager = load_model(ModelConfig(str(tiny_model_dir), attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"
    assert ModelConfig("x").trust_remote_code is False
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(ModelConfig(str(tiny_model_dir), dtype="float8"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if flash-attn ran here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float16) == "flash_attention_2"
    for dtype in (torch.float32, "auto", None):  # no float32 kernels: a float32 model must not get flash attention
        assert resolve_attn_implementation("auto", dtype) == "sdpa"
    assert resolve_attn_implementation("flash_attention_2", torch.float32) == "flash_attention_2"  # asked by name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2")


def test_loader_turns_dropout_off(tmp_path):
    from transformers import AutoConfig

    out = make_tiny_model(tmp_path / "gpt2", TinyModelConfig(arch="gpt2"))
    assert AutoConfig.from_pretrained(out).resid_pdrop > 0  # gpt2's default config has dropout
    model = load_model(ModelConfig(str(out)))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)


def test_tokenizer_without_pad_gets_eos(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).pad_token == tok.eos_token


@pytest.mark.slow
def test_cli_tiny_model(tmp_path):
    out = tmp_path / "cli-model"
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "tiny-model", "--arch", "gpt2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "saved to" in res.stdout and (out / "model.safetensors").exists()
    bad = subprocess.run([sys.executable, "-m", "cai.cli", "no-such-stage"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown command 'no-such-stage'" in bad.stderr
