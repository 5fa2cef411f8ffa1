import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cai.method.calibration import SoftCalibrationError
from cai.stages.pm import PreferenceModule, cli_main
from data.formats import PromptFormat
from data.preference import PreferenceCollator, tokenize_pair
from helpers import run_args, scalars
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel

WORDS = "the a cat dog house tree river blue green small large quiet happy old new road book lamp".split()


def synthetic_pairs(path, n, seed, p_chosen):
    """Pairs whose chosen response contains the word 'safely' and whose rejected one does not."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            b = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            a.insert(rng.randint(0, len(a)), "safely")
            p = p_chosen(rng)
            f.write(
                json.dumps(
                    {
                        "id": str(i),
                        "prompt": "Say something.",
                        "chosen": " ".join(a),
                        "rejected": " ".join(b),
                        "p_chosen": p,
                    }
                )
                + "\n"
            )
    return path


def pm_args(model_dir, train, val, out, steps, *extra):
    return run_args("configs/pm/tiny.yaml", model_dir, out) + [
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


def test_soft_calibration_error_by_hand():
    m = SoftCalibrationError(n_bins=2)
    m.update(torch.tensor([0.2, 0.3, 0.9]), torch.tensor([0.0, 0.1, 0.5]))
    # bin 0: preds 0.2, 0.3 (mean .25) vs labels 0, .1 (mean .05) -> .2 over 2; bin 1: .9 vs .5 -> .4 over 1.
    assert m.compute().item() == pytest.approx((2 * 0.2 + 1 * 0.4) / 3)


def test_calibration_sums_stay_float64_when_the_module_is_cast_to_bf16():
    # Catches: bf16-true casting the metric's running sums with the module (validation then crashed in index_add_,
    # and bin counts in bfloat16 stop growing at 256).
    m = torch.nn.Module()
    m.ece = SoftCalibrationError(n_bins=2)
    m.to(torch.bfloat16)
    assert m.ece.count.dtype == torch.float64
    m.ece.update(torch.full((300,), 0.75), torch.full((300,), 0.5))
    m.ece.reset()  # the defaults kept their dtype too
    m.ece.update(torch.full((300,), 0.75), torch.full((300,), 0.5))
    assert m.ece.count.dtype == torch.float64 and m.ece.count[1].item() == 300
    assert m.ece.compute().item() == pytest.approx(0.25)


def test_calibration_sums_stay_on_their_device_when_the_dtype_is_reset():
    # Catches: HFModule's set_dtype(float32) at the start of validation sending the sums back to the CPU while the
    # module is on a GPU (seen on an H200: "Encountered different devices in metric calculation"). The meta device
    # stands in for the GPU: any device other than the CPU shows the move.
    m = torch.nn.Module()
    m.ece = SoftCalibrationError(n_bins=2)
    m.to("meta")
    m.ece.set_dtype(torch.float32)
    for name in ("pred_sum", "label_sum", "count"):
        assert getattr(m.ece, name).device.type == "meta", name
        assert m.ece._defaults[name].device.type == "meta", name
        assert getattr(m.ece, name).dtype == torch.float64, name


def test_pair_tokenization_and_collation(tiny_tokenizer):
    ex = tokenize_pair(
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "p_chosen": 0.7},
        PromptFormat(tiny_tokenizer),
        64,
        hard_labels=False,
    )
    # The conversation as SFT trained it: the tiny template's transcript, the answer closed by EOS.
    text = "\n\nHuman: Hi\n\nAssistant: Hello!" + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(ex["chosen_ids"]) == text and ex["p_chosen"] == 0.7
    assert (
        tokenize_pair(
            {"prompt": "Hi", "chosen": "a", "rejected": "b", "p_chosen": 0.7},
            PromptFormat(tiny_tokenizer),
            64,
            hard_labels=True,
        )["p_chosen"]
        == 1.0
    )
    hh = tokenize_pair(
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"},
        PromptFormat(tiny_tokenizer),
        3,
        hard_labels=False,
    )
    # cut from the left (both texts at the same token: the longer keeps 3), default hard label
    assert max(len(hh["chosen_ids"]), len(hh["rejected_ids"])) == 3 and hh["p_chosen"] == 1.0
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)([ex, ex])
    assert batch["response_ids"].shape[0] == 4 and batch["p_chosen"] == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError, match="pairs.jsonl: no column 'rejected'"):
        tokenize_pair({"prompt": "x", "chosen": "y"}, PromptFormat(tiny_tokenizer), 8, False, "pairs.jsonl")
    with pytest.raises(ValueError, match="p_chosen=1.5 is not a probability"):
        tokenize_pair(
            {"prompt": "x", "chosen": "y", "rejected": "z", "p_chosen": 1.5}, PromptFormat(tiny_tokenizer), 8, False
        )


def test_pm_learns_a_detectable_preference(tiny_model_dir, tmp_path):
    train = synthetic_pairs(tmp_path / "train.jsonl", 256, 0, lambda r: 1.0)
    val = synthetic_pairs(tmp_path / "val.jsonl", 64, 1, lambda r: 1.0)
    cli = cli_main(pm_args(tiny_model_dir, train, val, tmp_path, 60))
    acc = cli.trainer.callback_metrics["val/accuracy"].item()
    print(f"preference model: held-out accuracy {acc:.3f} after 60 steps")
    assert acc >= 0.9, f"held-out accuracy {acc:.3f}"
    losses = scalars(tmp_path, "loss/train")
    assert losses[-1] < losses[0]
    # The saved model is a standard HF sequence classifier that gives the same rewards.
    tok = load_tokenizer(str(tmp_path / "hf"), padding_side="right")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    ours = PreferenceModel.from_pretrained(ModelConfig(str(tmp_path / "hf")))
    enc = tok(
        ["\n\nHuman: Say something.\n\nAssistant: the cat safely", "\n\nHuman: hi\n\nAssistant: a"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits.squeeze(-1), ours(**enc))


@pytest.mark.slow
def test_soft_labels_calibrate_better_than_hard_labels(tiny_model_dir, tmp_path):
    """With noisy soft labels around 0.7, soft-label training should predict ~0.7; hard labels push towards 1."""

    def noisy(r):
        return min(1.0, max(0.5, r.gauss(0.7, 0.08)))

    train = synthetic_pairs(tmp_path / "train.jsonl", 256, 0, noisy)
    val = synthetic_pairs(tmp_path / "val.jsonl", 64, 1, noisy)
    errors = {}
    for mode in ("soft", "hard"):
        out = tmp_path / mode
        cli = cli_main(pm_args(tiny_model_dir, train, val, out, 60, "--data.hard_labels", str(mode == "hard")))
        errors[mode] = cli.trainer.callback_metrics["val/calibration_error"].item()
    print(
        f"calibration error against the soft labels: soft-label training {errors['soft']:.3f}, "
        f"hard-label training {errors['hard']:.3f}"
    )
    assert errors["soft"] < errors["hard"]


def test_reward_read_at_last_real_token(tiny_model_dir):
    pm = PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir)))
    right = load_tokenizer(str(tiny_model_dir), padding_side="right")
    left = load_tokenizer(str(tiny_model_dir), padding_side="left")
    texts = ["a short one", "a much longer text than the other one"]
    with torch.no_grad():
        r_right = pm(**right(texts, return_tensors="pt", padding=True))
        r_left = pm(**left(texts, return_tensors="pt", padding=True))
        alone = torch.stack([pm(**right([t], return_tensors="pt"))[0] for t in texts])
    torch.testing.assert_close(r_right, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r_left, alone, rtol=1e-4, atol=1e-4)
    assert isinstance(PreferenceModule(ModelConfig(str(tiny_model_dir))).center_rewards_coef, float)


def test_hard_labels_apply_to_training_rows_only(tiny_model_dir, tmp_path):
    from data.preference import PreferenceDataModule

    train = synthetic_pairs(tmp_path / "train.jsonl", 40, 0, lambda r: 0.7)
    dm = PreferenceDataModule(train=str(train), tokenizer=str(tiny_model_dir), hard_labels=True, val_fraction=0.25)
    dm.setup("fit")
    assert set(dm.train_set["p_chosen"]) == {1.0} and set(dm.val_set["p_chosen"]) == {0.7}
    assert len(dm.val_set) == 10


@pytest.mark.slow
def test_pm_fsdp2_two_cpu_processes(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from helpers import clean_env

    train = synthetic_pairs(tmp_path / "train.jsonl", 64, 0, lambda r: 0.8)
    val = synthetic_pairs(tmp_path / "val.jsonl", 16, 1, lambda r: 0.8)
    args = pm_args(tiny_model_dir, train, val, tmp_path, 4, "--config", "configs/strategies/fsdp2_cpu.yaml")
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "pm", *args], env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    start = PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir)))
    assert hf.score.weight.shape == start.score.weight.shape  # gathered, not a shard
    assert hf.model.embed_tokens.weight.shape == start.backbone.embed_tokens.weight.shape


def test_score_texts_batches_and_keeps_the_end_of_long_texts(tiny_model_dir):
    pm = PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir))).eval()
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    long_text = "word " * 1500 + "and the end"
    texts = ["short one", long_text, "a middle sized text here"]
    scores = pm.score_texts(tok, texts, batch_size=2)
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > pm.config.max_position_embeddings
    with torch.no_grad():
        end = pm(torch.tensor([ids[-pm.config.max_position_embeddings :]]), torch.ones(1, 1024, dtype=torch.long))
        alone = pm(**{k: v for k, v in tok(["short one"], return_tensors="pt").items() if k != "token_type_ids"})
    torch.testing.assert_close(scores[1:2], end, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[:1], alone, rtol=1e-4, atol=1e-4)


def test_bf16_true_validation_keeps_metric_sums_in_full_precision(tiny_model_dir, tmp_path):
    # Catches: bf16-true casting the validation metrics' running sums with the module (means in bfloat16, calibration
    # counts stuck at 256, or the crash in index_add_ this once caused); HFModule._keep_metrics_float32.
    train = synthetic_pairs(tmp_path / "train.jsonl", 32, 0, lambda r: 0.8)
    val = synthetic_pairs(tmp_path / "val.jsonl", 300, 1, lambda r: 0.8)
    cli = cli_main(pm_args(tiny_model_dir, train, val, tmp_path, 2, "--trainer.precision", "bf16-true"))
    module = cli.model
    assert "val/calibration_error" in cli.trainer.callback_metrics  # validation ran to the end
    assert module.val_calibration.count.dtype == torch.float64
    assert module.val_loss.mean_value.dtype == torch.float32 and module.val_margin.weight.dtype == torch.float32
