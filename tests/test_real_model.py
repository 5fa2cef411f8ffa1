"""Every stage on the real instruct model (SmolLM2-135M-Instruct, ChatML), a short step each, through `cai pipeline`.

What the tiny random model cannot show: the chat format runs through every stage, texts end at ``<|im_end|>``, the
preference model reads the same conversation the policy writes, and PPO logs what it wrote.
"""

from __future__ import annotations

import json

import datasets
import yaml

from cai.stages.pipeline import run as pipeline
from data.formats import PromptFormat
from models import load_tokenizer

NO_CHECKPOINTS = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def test_every_stage_runs_on_the_real_model_in_chat_format(smollm2_dir, shared_cai, tmp_path):
    trainer = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1, **NO_CHECKPOINTS}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "base_model": str(smollm2_dir),
        "hhh_evals": str(shared_cai / "evals" / "438HHHEvaluations.jsonl"),
        "hhh_max_examples": 2,
        "sl_data": {
            "prompts": {"max_prompts": 2, "helpful_ratio": 0.5, "hold_out_last": 4},
            "critique": {"rounds": 1, "num_few_shot": 1, "keep_unfinished": True},
            "sampling": {"max_new_tokens": 12, "batch_size": 2, "repetition_penalty": 1.1},
            "chunk_size": 2,
        },
        "sft": {
            "trainer": {**trainer, "max_steps": 1, "limit_val_batches": 0},
            "model": {"optim": {"lr": 1.0e-5}},
            "data": {"max_length": 256, "batch_size": 2, "val_fraction": 0.0},
        },
        "label": {
            "prompts": {"helpful": None, "max_prompts": 2, "hold_out_last": 4},
            "sampling": {"max_new_tokens": 12, "batch_size": 2},
            "feedback": {"num_few_shot": 1, "both_orders": True},
            "chunk_size": 2,
        },
        "pm": {
            "trainer": {**trainer, "max_steps": 1, "limit_val_batches": 0},
            "model": {"optim": {"lr": 1.0e-5}},
            "data": {"max_length": 256, "batch_size": 2, "val_fraction": 0.0},
        },
        "ppo": {
            "trainer": {**trainer, "max_epochs": 10},
            "model": {
                "ppo": {"total_rollouts": 1, "max_new_tokens": 8, "ppo_epochs": 1, "num_minibatches": 1},
                "optim": {"lr": 1.0e-6, "schedule": "constant"},
                "log_samples_every": 1,
            },
            "data": {"prompts": "red_team", "batch_size": 2, "hold_out_last": 4},
        },
        "evaluate": {"num_prompts": 1, "sampling": {"max_new_tokens": 8, "batch_size": 4}, "bootstrap": 0},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    rd = pipeline(**cfg)
    # One format everywhere: the stages that record it say chat, and the SFT data renders as ChatML.
    assert json.loads((rd / "sl_data" / "summary.json").read_text())["prompt_format"] == "chat"
    label = json.loads((rd / "label" / "summary.json").read_text())
    assert label["prompt_format"] == "chat" and label["pairs"] == 2
    hhh = json.loads((rd / "eval_feedback" / "metrics.json").read_text())
    assert hhh["prompt_format"] == "chat" and hhh["examples"] == 2 and hhh["both_orders"]
    records = [json.loads(x) for x in open(rd / "sl_data" / "records.jsonl")]
    assert all("initial_finished" in r and "finished" in r for r in records)
    # PPO logged what it wrote, and the saved policy answers a chat prompt.
    samples = [json.loads(x) for x in open(rd / "ppo" / "tb" / "version_0" / "samples.jsonl")]
    assert len(samples) == 2 and all({"prompt", "response", "score", "ended"} <= set(s) for s in samples)
    assert (rd / "ppo" / "hf" / "model.safetensors").exists() and (rd / "report.md").exists()
    tok = load_tokenizer(str(rd / "ppo" / "hf"))
    assert PromptFormat(tok).kind == "chat" and "<|im_start|>" in PromptFormat(tok).prompt("Hi")
    pairs = datasets.load_from_disk(str(rd / "label" / "pairs"))
    assert len(pairs) == 2 and all(0.5 <= p <= 1 for p in pairs["p_chosen"])
    assert not list(rd.rglob("*.ckpt"))  # no checkpoint was asked for, none written
