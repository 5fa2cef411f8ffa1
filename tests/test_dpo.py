"""``cai dpo fit``: data from ``cai label``, the reference cache, training end to end, resume, export, precisions."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.stages.dpo import DPOConfig, DPOModule, cli_main, target_probability
from cai.stages.label import make_record, write_pairs
from data.dpo import DPOCollator, DPODataModule
from data.formats import PromptFormat
from helpers import clean_env, run_args, scalars
from models import ModelConfig, load_tokenizer
from models.errors import UserError

WORDS = "the a cat dog house tree river blue green small large quiet happy old new road book lamp".split()
P_TRUE = {1: 0.65, 2: 0.8, 3: 0.95}
"""Known probability that the response with k times "safely" is preferred to one without."""


def synthetic_pairs(path, n: int, seed: int, noise: float | None) -> str:
    """Pairs whose better response has k in {1, 2, 3} times "safely" (preferred with probability ``P_TRUE[k]``).

    ``noise``: the feedback model's soft label is the true probability plus Gaussian noise of this spread, and the
    pair is ordered as ``cai label`` orders it (chosen: the response the label favours; so some pairs are flipped).
    None: the true probability, the better response chosen (held-out data for accuracy and calibration).
    """
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
            bad = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
            k = rng.choice(sorted(P_TRUE))
            for _ in range(k):
                good.insert(rng.randint(0, len(good)), "safely")
            p = P_TRUE[k] if noise is None else min(0.98, max(0.02, rng.gauss(P_TRUE[k], noise)))
            a, b = " ".join(good), " ".join(bad)
            chosen, rejected, p_chosen = (a, b, p) if p >= 0.5 else (b, a, 1 - p)
            row = {"id": str(i), "prompt": "Say something.", "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row | {"p_chosen": p_chosen}) + "\n")
    return str(path)


def dpo_args(model_dir, train, val, out, steps, *extra):
    return run_args("configs/dpo/tiny.yaml", model_dir, out) + [
        "--data.train",
        str(train),
        "--data.val",
        str(val),
        "--trainer.max_steps",
        str(steps),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        str(steps),
        "--data.batch_size",
        "16",
        "--model.optim.lr",
        "3e-3",
        *extra,
    ]


@pytest.fixture()
def data(tmp_path):
    return synthetic_pairs(tmp_path / "train.jsonl", 64, 0, 0.1), synthetic_pairs(tmp_path / "val.jsonl", 16, 1, None)


def test_config_checks_and_targets():
    for bad in ({"beta": 0.0}, {"labels": "noisy"}, {"label_smoothing": 0.5}):
        with pytest.raises(UserError, match="model.dpo."):
            DPOConfig(**bad)
    p = torch.tensor([0.9, 0.6, 0.5, 0.3])
    assert target_probability(p, DPOConfig()).tolist() == p.tolist()
    assert target_probability(p, DPOConfig(labels="hard")).tolist() == [1, 1, 1, 0]
    assert target_probability(p, DPOConfig(labels="cdpo", label_smoothing=0.25)).tolist() == [0.75, 0.75, 0.75, 0.25]


def test_reads_the_label_stage_output(tiny_model_dir, tmp_path):
    """The ``pairs/`` folder written by ``cai label`` and its ``records.jsonl`` give the same rows."""
    records = [
        make_record({"id": "0", "prompt": "Hi"}, "Hello!", "Go away.", 0.7, ["p1"], []),
        make_record({"id": "1", "prompt": "Why?"}, "No.", "Because.", 0.2, ["p2"], []),  # b wins: flipped
    ]
    write_pairs(records, tmp_path / "pairs")
    with open(tmp_path / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("chosen", "rejected", "p_chosen")}) + "\n")
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    sets = {}
    for name in ("pairs", "records.jsonl"):
        dm = DPODataModule(train=str(tmp_path / name), val=str(tmp_path / name), tokenizer=str(tiny_model_dir))
        dm.setup("fit")
        sets[name] = dm.train_set
    assert sets["pairs"].to_list() == sets["records.jsonl"].to_list()
    row = sets["pairs"][1]
    prompt, completion = PromptFormat(tok).dialogue("Why?", "Because.")
    assert tok.decode(row["prompt_ids"]) == prompt and tok.decode(row["chosen_ids"]) == completion
    assert row["p_chosen"] == pytest.approx(0.8)
    batch = DPOCollator(tok.pad_token_id)(list(sets["pairs"]))
    assert batch["response_ids"].shape[0] == 4 and batch["prompt_mask"][:, -1].all()  # left-padded prompts


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "chosen": "y"}, r"bad.jsonl: row 2: 'rejected' must be a string, got nothing"),
        ({"prompt": "x", "chosen": "y", "rejected": "z", "p_chosen": 1.5}, r"bad.jsonl: row 2: p_chosen=1.5 is not"),
        ({"prompt": "x", "chosen": "y", "rejected": "z", "p_chosen": "high"}, r"row 2: p_chosen='high' is not a num"),
        ({"prompt": 3, "chosen": "y", "rejected": "z"}, r"bad.jsonl: row 2: 'prompt' must be a string"),
    ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_row(tiny_model_dir, tmp_path, row, message):
    good = {"prompt": "x", "chosen": "y", "rejected": "z", "p_chosen": 0.6}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    dm = DPODataModule(train=str(path), val=str(path), tokenizer=str(tiny_model_dir))
    with pytest.raises(UserError, match=message):
        dm.setup("fit")


def test_long_pairs_keep_the_prompt_end_and_the_response_start(tiny_model_dir):
    from data.dpo import tokenize_dpo_pair

    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    fmt = PromptFormat(tok)
    row = {"prompt": "the old road " * 30, "chosen": "yes " * 40, "rejected": "no"}
    full_prompt, full_chosen = (
        tok(t, add_special_tokens=False)["input_ids"] for t in fmt.dialogue(row["prompt"], "yes " * 40)
    )
    ex = tokenize_dpo_pair(row, fmt, max_length=60, max_prompt_length=20)
    assert ex["cut"] and len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 60
    assert ex["prompt_ids"] == full_prompt[-20:] and ex["chosen_ids"] == full_chosen[:40]


def test_dpo_fit_logs_caches_the_reference_resumes_and_exports(tiny_model_dir, data, tmp_path):
    train, val = data
    cli = cli_main(dpo_args(tiny_model_dir, train, val, tmp_path, 6))
    assert cli.datamodule.reference_source == {"train_set": "computed", "val_set": "computed"}
    assert len(list((tmp_path / "train.jsonl.ref_logps").glob("*.json"))) == 1
    for tag in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert len(scalars(tmp_path, tag)) == 6 and len(scalars(tmp_path, f"val/{tag.replace('loss/dpo', 'loss')}"))
    for tag in ("calibration/ece", "logps/chosen", "logps/rejected"):
        assert scalars(tmp_path, tag) and scalars(tmp_path, f"val/{tag}")
    # Before any update the policy is the reference: margins start at 0 (up to float rounding), the loss at log 2.
    assert abs(scalars(tmp_path, "rewards/margin")[0]) < 1e-4
    assert scalars(tmp_path, "loss/dpo")[0] == pytest.approx(float(torch.tensor(2.0).log()), abs=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(saved.lm_head.weight, start.lm_head.weight)
    assert (tmp_path / "hf" / "tokenizer.json").exists()

    ckpt = next(tmp_path.rglob("last.ckpt"))
    resumed = cli_main(dpo_args(tiny_model_dir, train, val, tmp_path, 8) + ["--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 8  # continued from 6
    assert resumed.datamodule.reference_source == {"train_set": "cache", "val_set": "cache"}


def test_policy_is_its_own_reference_and_a_resume_never_uses_trained_weights(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    """Without ``reference`` no second model is loaded; a resume without cache loads the start, not trained weights."""
    import cai.stages.dpo as dpo_stage
    from models import load_model

    train, val = data
    loads = []

    def counted_load(cfg):
        loads.append(cfg.name_or_path)
        return load_model(cfg)

    monkeypatch.setattr(dpo_stage, "load_model", counted_load)
    cli_main(dpo_args(tiny_model_dir, train, val, tmp_path, 4))
    assert loads == []  # the policy computed the reference log-probs itself
    cache = next((tmp_path / "train.jsonl.ref_logps").glob("*.json"))
    first = torch.tensor(json.loads(cache.read_text())["logps"])
    dm = DPODataModule(train=train, val=val, tokenizer=str(tiny_model_dir), ref_cache="off")
    dm.setup("fit")
    alone = dpo_stage.reference_logps(load_model(ModelConfig(str(tiny_model_dir))), dm.train_set, dm.collator(), 8)
    torch.testing.assert_close(first, torch.tensor(alone), atol=1e-5, rtol=1e-5)

    cache.unlink()  # a resume that finds no cache: the reference comes from the starting weights, loaded once
    ckpt = next(tmp_path.rglob("last.ckpt"))
    resumed = cli_main(dpo_args(tiny_model_dir, train, val, tmp_path, 5) + ["--ckpt_path", str(ckpt)])
    assert resumed.datamodule.reference_source["train_set"] == "computed" and loads == [str(tiny_model_dir)]
    again = torch.tensor(json.loads(next((tmp_path / "train.jsonl.ref_logps").glob("*.json")).read_text())["logps"])
    torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
    trained = dpo_stage.reference_logps(resumed.model.model.float().eval(), dm.train_set, dm.collator(), 8)
    assert not torch.allclose(torch.tensor(trained), first, atol=1e-3)  # trained weights would have given others


def test_validation_with_the_training_rows_reuses_their_reference_values(tiny_model_dir, data):
    """``val`` = ``train`` (two datasets, the same token ids): the reference runs once and both get its values."""
    train, _ = data
    dm = DPODataModule(train=train, val=train, tokenizer=str(tiny_model_dir), ref_cache="off")
    dm.setup("fit")
    calls = []

    def compute(ds):
        calls.append(len(ds))
        return [(float(-i), float(-2 * i)) for i in range(len(ds))]

    dm.add_reference_logps(compute, {"name": "fake"})
    assert calls == [64] and dm.reference_source == {"train_set": "computed", "val_set": "computed"}
    assert dm.val_set["ref_rejected_logps"] == dm.train_set["ref_rejected_logps"] == [-2.0 * i for i in range(64)]


def test_sharded_ranks_run_equal_reference_batches(tiny_model_dir):
    """``min_batches`` pads a short share with unused forwards (FSDP ranks must run as many), values unchanged."""
    from cai.stages.dpo import reference_logps
    from models import load_model

    model = load_model(ModelConfig(str(tiny_model_dir))).eval()
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "p_chosen": 1.0}] * 3
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    tok = load_tokenizer(str(tiny_model_dir))
    import datasets

    ds = datasets.Dataset.from_list(rows)
    plain = reference_logps(model, ds, DPOCollator(tok.pad_token_id), 2)
    n_plain = len(calls)
    padded = reference_logps(model, ds, DPOCollator(tok.pad_token_id), 2, min_batches=4)
    assert len(calls) - n_plain == 2 * n_plain and padded == plain  # 2 batches of 2 forwards, then 4 batches


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_dpo_bf16(tiny_model_dir, data, tmp_path, precision):
    train, val = data
    cli = cli_main(dpo_args(tiny_model_dir, train, val, tmp_path, 2, "--trainer.precision", precision))
    assert cli.trainer.global_step == 2
    losses = scalars(tmp_path, "loss/dpo")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # The reference ran in the policy's precision, so the first margin is 0 up to the rounding of a differently
    # batched pass (2e-5 to 4e-5 here). Under bf16-true it was 0.0056 while the batch carried the reference
    # log-probs as tensors, which Lightning rounded to bf16 (test_per_pair_floats_survive_bf16_true_batches).
    assert abs(scalars(tmp_path, "rewards/margin")[0]) < 1e-3


def test_per_pair_floats_survive_bf16_true_batches():
    # Catches: the collators handing soft labels and reference log-probs over as float tensors, which Lightning's
    # bf16-true plugin casts to bf16 before the step (-300.3 became -300.0: a fixed error in every DPO margin).
    from lightning.pytorch.plugins.precision import HalfPrecision

    from data.base import float_column
    from data.preference import PreferenceCollator

    row = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "p_chosen": 0.6}
    refs = {"ref_chosen_logps": -300.3, "ref_rejected_logps": -301.7}
    plugin = HalfPrecision("bf16-true")
    dpo = plugin.convert_input(DPOCollator(0)([{**row, **refs}]))
    pm = plugin.convert_input(PreferenceCollator(0)([{"chosen_ids": [1, 3], "rejected_ids": [1, 4], "p_chosen": 0.6}]))
    assert dpo["response_ids"].dtype == torch.long  # the plugin did run over the batch
    for batch, want in ((dpo, {"p_chosen": 0.6, **refs}), (pm, {"p_chosen": 0.6})):
        for col, value in want.items():
            got = float_column(batch[col], "cpu")
            assert got.dtype == torch.float32 and got.tolist() == pytest.approx([value], rel=1e-6), col


def test_hard_and_cdpo_labels_change_the_loss(tiny_model_dir, data, tmp_path):
    """One step on the same batch: hard and cDPO targets give other losses than soft ones (a label really used)."""
    train, val = data
    first = {}
    for labels in ("soft", "hard", "cdpo"):
        out = tmp_path / labels
        cli_main(dpo_args(tiny_model_dir, train, val, out, 2, "--model.dpo.labels", labels, "--data.ref_cache", "off"))
        first[labels] = scalars(out, "loss/dpo")[1]
    assert len({round(v, 6) for v in first.values()}) == 3, first


def test_fsdp1_computes_the_reference_with_a_frozen_copy(monkeypatch):
    # Under FSDP1 the policy cannot run outside a step (its root-level weights stay sharded); stand-in trainers,
    # since FSDP1 refuses a CPU at Trainer start.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = DPOModule(ModelConfig("unused"))
    calls = []
    monkeypatch.setattr(module, "_add_reference", lambda use_policy: calls.append(use_policy))
    dm = SimpleNamespace(add_reference_logps=None)
    for strategy, want_calls, pending in ((DDPStrategy(), [], True), (FSDPStrategy(), [False], False)):
        calls.clear()
        module._trainer = SimpleNamespace(strategy=strategy, datamodule=dm)
        module.setup("fit")
        assert calls == want_calls and module._reference_pending is pending, type(strategy).__name__


def test_module_refuses_batches_without_reference(tiny_model_dir):
    module = DPOModule(ModelConfig(str(tiny_model_dir)))
    module.configure_model()
    tok = load_tokenizer(str(tiny_model_dir))
    batch = DPOCollator(tok.pad_token_id)(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "p_chosen": 1}]
    )
    with pytest.raises(UserError, match="no reference log-probs"):
        module._step(batch)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dpo_two_cpu_processes(tiny_model_dir, data, tmp_path, strategy):
    train, val = data
    extra = ["--config", "configs/strategies/fsdp2_cpu.yaml"] if strategy == "fsdp2" else []
    extra += ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    extra += ["--trainer.strategy", "ddp"] if strategy == "ddp" else []
    args = dpo_args(tiny_model_dir, train, val, tmp_path, 3, *extra)
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "dpo", *args], env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "computed and cached" in res.stdout + res.stderr
    ckpt = next(tmp_path.rglob("last.ckpt"))
    if strategy == "ddp":  # FSDP2 writes a sharded checkpoint folder
        assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    else:
        assert ckpt.is_dir() and "FSDPLlamaForCausalLM" in res.stdout + res.stderr  # really sharded by fully_shard
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert saved.lm_head.weight.shape == start.lm_head.weight.shape  # gathered, not a shard
    assert not torch.equal(saved.lm_head.weight, start.lm_head.weight)
    # The two ranks' shares of the reference pass together equal one process's values.
    cached = json.loads(next((tmp_path / "train.jsonl.ref_logps").glob("*.json")).read_text())["logps"]
    dm = DPODataModule(train=train, val=val, tokenizer=str(tiny_model_dir), ref_cache="off")
    dm.setup("fit")
    from cai.stages.dpo import reference_logps
    from models import load_model

    alone = reference_logps(load_model(ModelConfig(str(tiny_model_dir))), dm.train_set, dm.collator(), 8)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(alone), atol=1e-4, rtol=1e-5)
