"""TRL's workers for ``scripts/bench_vs_trl.py``: one measured SFT, reward-model, PPO or DPO trainer run each."""

from __future__ import annotations

import os
from functools import partial

from bench_lib import RolloutTimer, WindowTimer, n_params, ppo_prompts, setup_worker


def _trl_common_args(spec: dict) -> dict:
    """``TrainingArguments`` shared by both TRL trainers: the same schedule, optimizer settings and precision."""
    return dict(
        output_dir=os.path.join(spec["tmp"], "trl"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        **_optim_args(spec["lr"]),
        max_grad_norm=spec["max_grad_norm"],
        max_steps=spec["warmup"] + spec["steps"],
        max_length=spec["seq_len"],
        gradient_checkpointing=False,  # TRL's default is True; this project's is False
        **_quiet_args(spec),
        dataloader_num_workers=0,
        data_seed=spec["seed"],
        # rows in file order when this project's worker reads them so too (bench_cai._in_order)
        train_sampling_strategy="sequential" if spec.get("in_order") else "random",
        model_init_kwargs={"dtype": "float32", "attn_implementation": spec["attn"]},
    )


def _optim_args(lr: float) -> dict:
    """AdamW settings as this project's workers set them: constant lr, betas 0.9/0.999, eps 1e-8, no decay."""
    return dict(
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
    )


def _quiet_args(spec: dict) -> dict:
    """``TrainingArguments`` of every TRL trainer here: precision, device, seed; logging, saving and eval off."""
    return dict(
        bf16=spec["bf16"],
        fp16=False,
        use_cpu=spec["device"] != "cuda",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
    )


def _trl_callback(timer: WindowTimer):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            timer.train_end()

    return StepTimer()


def _load_jsonl(path: str):
    import datasets

    return datasets.load_dataset("json", data_files=path, split="train")


def make_trl_sft(spec: dict, callbacks=()):
    """A ``trl.SFTTrainer`` on the TRL-format SFT file (prompt/completion, loss on completions only)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_trl_common_args(spec), completion_only_loss=True, packing=False)
    return SFTTrainer(
        model=spec["model"],
        args=args,
        train_dataset=_load_jsonl(spec["data"]["sft_trl"]),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=list(callbacks),
    )


def make_trl_rm(spec: dict, callbacks=()):
    """A ``trl.RewardTrainer`` (``AutoModelForSequenceClassification``, one label) on the TRL-format pairs."""
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**_trl_common_args(spec))
    return RewardTrainer(
        model=spec["model"],
        args=args,
        train_dataset=_load_jsonl(spec["data"]["rm_trl"]),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=list(callbacks),
    )


def make_trl_dpo(spec: dict, callbacks=(), rows: int | None = None, precompute: bool = False):
    """A ``trl.DPOTrainer`` (sigmoid loss: hard labels) on the TRL-format pairs, its first ``rows`` (all if None).

    ``precompute``: TRL's ``precompute_ref_log_probs``, the reference log-probabilities computed once by the policy
    when the trainer is built (outside the timed window), as this project's DPO does before training; else TRL's
    default, a second copy of the model that runs as the reference every step.
    """
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = _load_jsonl(spec["data"]["dpo_trl"])
    args = DPOConfig(**_trl_common_args(spec), beta=spec["dpo_beta"], precompute_ref_log_probs=precompute)
    return DPOTrainer(
        model=spec["model"],
        args=args,
        train_dataset=data if rows is None else data.select(range(rows)),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=list(callbacks),
    )


def _run_trl(spec: dict, make) -> dict:
    """One timed run of the TRL trainer that ``make(spec, callbacks)`` builds."""
    setup_worker(spec)
    timer = WindowTimer(spec["warmup"], spec["steps"])
    trainer = make(spec, [_trl_callback(timer)])
    timer.attach(trainer.model)
    trainer.train()
    return {**timer.result(), "n_params": n_params(trainer.model)}


def run_sft_trl(spec: dict) -> dict:
    """One SFT run of TRL's ``SFTTrainer``."""
    return _run_trl(spec, make_trl_sft)


def run_rm_trl(spec: dict) -> dict:
    """One reward-model run of TRL's ``RewardTrainer``."""
    return _run_trl(spec, make_trl_rm)


def run_dpo_trl(spec: dict, precompute: bool = False) -> dict:
    """One DPO run of TRL's ``DPOTrainer``: its defaults, or with ``precompute_ref_log_probs`` (``precompute``)."""
    return _run_trl(spec, partial(make_trl_dpo, precompute=precompute))


def run_ppo_trl(spec: dict) -> dict:
    """One PPO run of TRL's ``trl.experimental.ppo.PPOTrainer``, timed by updates (one update = one rollout batch).

    Policy and reference from the same model; reward model and value model (TRL's separate critic, started from
    the preference model as in TRL's examples) from the saved preference model. No missing-EOS penalty. Stop token:
    EOS with ``spec["ppo"]["stop_eos"]`` (the real model, which ends its answers; this project stops there too), else
    none, so every response of the random models is ``response_length`` tokens.
    """
    setup_worker(spec)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    p = spec["ppo"]
    timer = RolloutTimer(p["warmup"], p["steps"], p["batch_size"])
    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ppo_prompts(spec)]
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    load = dict(dtype=torch.float32, attn_implementation=spec["attn"])
    args = PPOConfig(
        output_dir=os.path.join(spec["tmp"], "trl"),
        per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=p["minibatches"],
        total_episodes=p["batch_size"] * (p["warmup"] + p["steps"]),
        local_rollout_forward_batch_size=p["batch_size"],
        response_length=p["new_tokens"],
        num_ppo_epochs=p["epochs"],
        temperature=1.0,
        stop_token="eos" if p.get("stop_eos") else None,
        stop_token_id=None,
        missing_eos_penalty=None,
        kl_coef=p["kl_coef"],
        kl_estimator="k1",
        cliprange=p["clip"],
        cliprange_value=p["clip"],
        vf_coef=p["vf_coef"],
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        num_sample_generations=0,
        **_optim_args(p["lr"]),
        gradient_checkpointing=False,  # TRL's PPO default is True; this project's is False
        **_quiet_args(spec),
        sft_model_path=spec["model"],
        reward_model_path=spec["pm"],
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(spec["model"], **load),
        ref_model=AutoModelForCausalLM.from_pretrained(spec["model"], **load),
        reward_model=AutoModelForSequenceClassification.from_pretrained(spec["pm"], num_labels=1, **load),
        value_model=AutoModelForSequenceClassification.from_pretrained(spec["pm"], num_labels=1, **load),
        train_dataset=ds,
        eval_dataset=ds,  # never used: num_sample_generations=0, no evaluation
        callbacks=[_trl_callback(timer)],
    )
    timer.attach(trainer.model)
    trainer.train()
    return {**timer.result(), "n_params": n_params(trainer.model)}
