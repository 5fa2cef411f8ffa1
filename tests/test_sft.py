import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from cai.stages.sft import SFTModule, cli_main
from data.formats import PromptFormat
from data.sft import IGNORE_INDEX, SFTCollator, SFTDataModule, tokenize_example
from helpers import base_args, clean_env, scalars
from losses import sft_loss
from models import ModelConfig, load_tokenizer
from models.errors import UserError


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """A small SFT set whose answers share one pattern, so that a few steps of training lower the loss."""
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": f"Tell me about item {i}.", "completion": "Item facts: it is safe."}) + "\n")
    return path


def test_tokenize_masks_the_prompt(tiny_tokenizer):
    a = tokenize_example({"prompt": "Hi?", "completion": "Hello."}, PromptFormat(tiny_tokenizer), 64)
    b = tokenize_example(
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        PromptFormat(tiny_tokenizer),
        64,
    )
    assert a == b  # both forms render to the same transcript
    prompt_len = len(tiny_tokenizer("\n\nHuman: Hi?\n\nAssistant:")["input_ids"])
    assert a["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert a["labels"][prompt_len:] == a["input_ids"][prompt_len:]
    assert a["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert (
        len(tokenize_example({"prompt": "x " * 100, "completion": "y"}, PromptFormat(tiny_tokenizer), 16)["input_ids"])
        == 16
    )
    with pytest.raises(ValueError, match="pairs.jsonl: needs a 'messages' column"):
        tokenize_example({"text": "x"}, PromptFormat(tiny_tokenizer), 16, "pairs.jsonl")


def test_packed_batch_gives_the_padded_loss(tiny_model, tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer.name_or_path, padding_side="right")
    examples = [
        tokenize_example({"prompt": p, "completion": c}, PromptFormat(tok), 64)
        for p, c in [("a?", "b."), ("A longer question here?", "A longer answer."), ("q", "r s t")]
    ]
    padded = SFTCollator(tok.pad_token_id)(examples)
    packed = SFTCollator(tok.pad_token_id, packing=True)(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert (padded["attention_mask"] == 0).any() and "attention_mask" not in packed
    with torch.no_grad():
        lp = sft_loss(
            tiny_model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits, padded["labels"]
        )
        # use_cache=False: transformers only builds the block-diagonal mask for packed rows when no cache is used.
        lk = sft_loss(
            tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits,
            packed["labels"],
        )
    # Equal only if examples in the packed row cannot attend to each other (block-diagonal mask).
    torch.testing.assert_close(lk, lp, rtol=1e-5, atol=1e-5)


def test_sft_fit_lowers_loss_and_saves_hf(tiny_model_dir, sft_file, tmp_path):
    cli = cli_main(base_args(tiny_model_dir, sft_file, tmp_path, 20))
    assert cli.trainer.global_step == 20
    losses = scalars(tmp_path, "loss/train")
    assert len(losses) >= 15 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert scalars(tmp_path, "val/perplexity"), "validation perplexity was not logged"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(saved.lm_head.weight, start.lm_head.weight)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert list(tmp_path.rglob("config.yaml")), "LightningCLI saves the config with the run"


def test_sft_resumes_from_checkpoint(tiny_model_dir, sft_file, tmp_path):
    cli_main(base_args(tiny_model_dir, sft_file, tmp_path, 10))
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert torch.load(ckpt, weights_only=False)["global_step"] == 10
    cli = cli_main(base_args(tiny_model_dir, sft_file, tmp_path, 14) + ["--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 14  # continued from 10, not restarted from 0


class BatchRecorder(L.Callback):
    """Keeps the input ids of the batch of every optimizer step (numbered from 1)."""

    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step + 1] = batch["input_ids"].clone()


def fit_and_record(model_dir, data, out, steps, ckpt_path=None) -> dict[int, torch.Tensor]:
    recorder = BatchRecorder()
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[recorder, ModelCheckpoint(dirpath=out, every_n_train_steps=10, save_last=True)],
    )
    L.seed_everything(0)
    data = SFTDataModule(train=str(data), tokenizer=str(model_dir), batch_size=8, max_length=64)
    trainer.fit(SFTModule(ModelConfig(str(model_dir)), hf_out=str(out / "hf")), datamodule=data, ckpt_path=ckpt_path)
    return recorder.seen


def test_sft_resumed_mid_epoch_sees_the_batches_of_an_uninterrupted_run(tiny_model_dir, sft_file, tmp_path):
    """44 training rows in batches of 8 make 6 steps an epoch: step 10 is mid-epoch, and 11-14 cross an epoch end."""
    whole = fit_and_record(tiny_model_dir, sft_file, tmp_path / "whole", 14)
    fit_and_record(tiny_model_dir, sft_file, tmp_path / "cut", 10)
    resumed = fit_and_record(
        tiny_model_dir, sft_file, tmp_path / "cut", 14, ckpt_path=str(tmp_path / "cut" / "last.ckpt")
    )
    assert sorted(resumed) == [11, 12, 13, 14]
    for step in resumed:
        assert torch.equal(resumed[step], whole[step]), f"step {step}: the resumed run trained on other rows"


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_sft_bf16(tiny_model_dir, sft_file, tmp_path, precision):
    cli = cli_main(base_args(tiny_model_dir, sft_file, tmp_path, 3) + ["--trainer.precision", precision])
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars(tmp_path, "loss/train"))


@pytest.mark.slow
def test_sft_fsdp2_two_cpu_processes(tiny_model_dir, sft_file, tmp_path):
    env = clean_env()
    args = base_args(tiny_model_dir, sft_file, tmp_path, 6) + ["--config", "configs/strategies/fsdp2_cpu.yaml"]
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "sft", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FSDPLlamaForCausalLM" in res.stdout + res.stderr  # the model was really sharded by fully_shard
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert saved.lm_head.weight.shape == start.lm_head.weight.shape  # gathered, not a shard
    assert not torch.equal(saved.lm_head.weight, start.lm_head.weight)


@pytest.mark.parametrize("packing", [False, True])
def test_module_loss_on_kept_positions_equals_full_logits_loss(tiny_model_dir, tiny_tokenizer, packing):
    from cai.stages.sft import SFTModule
    from models import ModelConfig

    tok = load_tokenizer(tiny_tokenizer.name_or_path, padding_side="right")
    examples = [
        tokenize_example({"prompt": p, "completion": c}, PromptFormat(tok), 64)
        for p, c in [("a?", "b."), ("A longer question here?", "A longer answer."), ("q", "r s t")]
    ]
    batch = SFTCollator(tok.pad_token_id, packing=packing)(examples)
    module = SFTModule(ModelConfig(str(tiny_model_dir)))
    module.configure_model()
    with torch.no_grad():
        logits, targets = module(batch)
        full = module.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert logits.shape[1] < full.shape[1]  # prompt positions were skipped
    torch.testing.assert_close(sft_loss(logits, targets, aligned=True), sft_loss(full, batch["labels"]))


@pytest.mark.parametrize("packing,chunk", [(False, 3), (True, 3), (False, None)])
def test_chunked_training_loss_equals_full_logits_loss_and_grads(tiny_model_dir, tiny_tokenizer, packing, chunk):
    from losses import sft_loss_sum

    tok = load_tokenizer(tiny_tokenizer.name_or_path, padding_side="right")
    examples = [
        tokenize_example({"prompt": p, "completion": c}, PromptFormat(tok), 64)
        for p, c in [("a?", "b."), ("A longer question here?", "A longer answer."), ("q", "r s t")]
    ]
    batch = SFTCollator(tok.pad_token_id, packing=packing)(examples)
    module = SFTModule(ModelConfig(str(tiny_model_dir)), loss_chunk_size=chunk)  # 3: several chunks
    module.configure_model()
    params = [p for p in module.model.parameters() if p.requires_grad]
    got_sum, got_count = module.loss_sum(batch)
    got_grads = torch.autograd.grad(got_sum, params)
    full = module.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # (B, T, V)
    want_sum, want_count = sft_loss_sum(full, batch["labels"])
    want_grads = torch.autograd.grad(want_sum, params)
    assert got_count.item() == want_count.item() > 3
    torch.testing.assert_close(got_sum, want_sum, rtol=1e-6, atol=1e-5)
    for name_param, got, want in zip(module.model.named_parameters(), got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name_param[0]: f"{n}: {m}")


def test_loss_chunk_size_must_be_positive(tiny_model_dir):
    with pytest.raises(UserError, match="loss_chunk_size"):
        SFTModule(ModelConfig(str(tiny_model_dir)), loss_chunk_size=0)


@pytest.mark.slow
def test_sft_ddp_two_cpu_processes(tiny_model_dir, sft_file, tmp_path):
    args = base_args(tiny_model_dir, sft_file, tmp_path, 4) + [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "sft", *args], env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)["global_step"] == 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.model_type == "llama"


class GradientsAtBatchStart(L.Callback):
    """Whether any parameter still holds a gradient when each training batch starts (before its forward)."""

    def __init__(self):
        self.held: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in pl_module.parameters()))


def test_gradients_are_freed_before_the_next_forward(tiny_model_dir, sft_file, tmp_path):
    # Catches: the previous step's gradients (a float32 copy of the parameters) kept alive through the next forward,
    # Lightning's default, which raised peak memory to 1.10x TRL's on SmolLM2 (HFModule.optimizer_step).
    probe = GradientsAtBatchStart()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[probe],
    )
    data = SFTDataModule(train=str(sft_file), tokenizer=str(tiny_model_dir), batch_size=8, max_length=64)
    trainer.fit(SFTModule(ModelConfig(str(tiny_model_dir)), hf_out=str(tmp_path / "hf")), datamodule=data)
    assert probe.held == [False, False, False]
