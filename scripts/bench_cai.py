"""This project's workers for ``scripts/bench_vs_trl.py``: one measured SFT, reward-model, PPO or DPO run each."""

from __future__ import annotations

import os

from bench_lib import RolloutTimer, WindowTimer, n_params, setup_worker


def _cai_trainer(spec: dict, callback, **overrides):
    """A ``lightning.Trainer`` on one device with logging, checkpoints, validation and progress bars off."""
    import lightning as L

    cuda = spec["device"] == "cuda"
    settings = dict(max_steps=spec["warmup"] + spec["steps"], gradient_clip_val=spec["max_grad_norm"])
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if spec["bf16"] else "32-true",
        **{**settings, **overrides},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[callback],
        default_root_dir=spec["tmp"],
    )


def _cai_optim(spec: dict):
    from cai.training import OptimConfig

    return OptimConfig(
        lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant"
    )


def cai_model_config(spec: dict):
    from models import ModelConfig

    return ModelConfig(spec["model"], dtype="float32", attn_implementation=spec["attn"])


def _in_order(spec: dict, data) -> None:
    """With ``spec["in_order"]``, the data module's training loader reads the rows in file order (no shuffling).

    The real-text preset sets it (and TRL's ``train_sampling_strategy="sequential"``), so that both systems train
    on the same batches of rows that vary in length.
    """
    if spec.get("in_order"):
        data.train_dataloader = lambda: data._loader(data.train_set, shuffle=False)


def _cai_callback(timer: WindowTimer, network, count_batch=None):
    """A Lightning callback that feeds ``timer``.

    Args:
        timer: The timer.
        network: ``network(pl_module)`` is the module whose forward inputs are counted, or None.
        count_batch: Without ``network``: ``count_batch(batch)`` gives (real tokens, sequences) of a training batch.
    """
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            timer.attach(network(pl_module) if network else None)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if count_batch is not None:
                timer.add(*count_batch(batch))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.step_end(trainer.global_step)

        def on_train_end(self, trainer, pl_module):
            timer.train_end()

    return StepTimer()


def run_sft_cai(spec: dict) -> dict:
    """One SFT run of ``cai.stages.sft.SFTModule`` on ``data.sft.SFTDataModule`` with a ``lightning.Trainer``."""
    setup_worker(spec)
    from cai.stages.sft import SFTModule
    from data.sft import SFTDataModule

    timer = WindowTimer(spec["warmup"], spec["steps"])
    module = SFTModule(
        cai_model_config(spec),
        _cai_optim(spec),
        hf_out=os.path.join(spec["tmp"], "hf"),
        loss_chunk_size=spec.get("loss_chunk_size", 128),
    )
    data = SFTDataModule(
        train=spec["data"]["sft_cai"],
        val=spec["data"]["sft_cai"],  # no hold-out: validation is off (limit_val_batches=0)
        tokenizer=spec["model"],
        max_length=spec["seq_len"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
    )
    _in_order(spec, data)
    _cai_trainer(spec, _cai_callback(timer, lambda m: m.model)).fit(module, datamodule=data)
    return {**timer.result(), "n_params": n_params(module.model)}


def run_rm_cai(spec: dict) -> dict:
    """One hard-label preference-model run of ``cai.stages.pm.PreferenceModule`` on ``PreferenceDataModule``."""
    setup_worker(spec)
    from cai.stages.pm import PreferenceModule
    from data.preference import PreferenceDataModule

    timer = WindowTimer(spec["warmup"], spec["steps"])
    module = PreferenceModule(
        cai_model_config(spec),
        _cai_optim(spec),
        hf_out=os.path.join(spec["tmp"], "hf"),
        share_prompt=spec.get("share_prompt"),
    )
    data = PreferenceDataModule(
        train=spec["data"]["rm_cai"],
        val=spec["data"]["rm_cai"],
        tokenizer=spec["model"],
        hard_labels=True,
        max_length=spec["seq_len"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
    )
    _in_order(spec, data)

    # The backbone runs twice a step (shared prompts, then continuations), so count the batch: both whole texts.
    def count(batch):
        return 2 * batch["prompt_mask"].sum() + batch["response_mask"].sum(), 2 * len(batch["p_chosen"])

    _cai_trainer(spec, _cai_callback(timer, None, count)).fit(module, datamodule=data)
    return {**timer.result(), "n_params": n_params(module.model)}


def run_dpo_cai(spec: dict) -> dict:
    """One hard-label DPO run of ``cai.stages.dpo.DPOModule`` on ``DPODataModule`` with a ``lightning.Trainer``.

    The policy computes the reference log-probabilities itself before its first step (outside the timed window, as
    TRL's ``precompute_ref_log_probs``; no second copy of the model), on every run (no cache). ``dpo_precompute``
    runs this same worker.
    """
    setup_worker(spec)
    from cai.stages.dpo import DPOConfig, DPOModule
    from data.dpo import DPODataModule

    timer = WindowTimer(spec["warmup"], spec["steps"])
    module = DPOModule(
        cai_model_config(spec),
        dpo=DPOConfig(beta=spec["dpo_beta"], labels="hard"),
        optim=_cai_optim(spec),
        share_prompt=spec.get("share_prompt"),
        hf_out=os.path.join(spec["tmp"], "hf"),
    )
    data = DPODataModule(
        train=spec["data"]["dpo_cai"],
        val=spec["data"]["dpo_cai"],
        tokenizer=spec["model"],
        max_length=spec["seq_len"],
        max_prompt_length=spec["seq_len"] - 1,
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        ref_cache="off",
    )
    _in_order(spec, data)

    def count(batch):  # both whole texts of each pair, as TRL's concatenated forward pass holds them
        return 2 * batch["prompt_mask"].sum() + batch["response_mask"].sum(), 2 * len(batch["p_chosen"])

    _cai_trainer(spec, _cai_callback(timer, None, count)).fit(module, datamodule=data)
    return {**timer.result(), "n_params": n_params(module.model)}


def run_ppo_cai(spec: dict, critic: bool | None = None) -> dict:
    """One PPO run of ``cai.stages.ppo.PPOModule`` on ``PromptDataModule`` with a ``lightning.Trainer``.

    The window is timed by rollouts (``on_train_batch_end``; one training step is one rollout of ``batch_size``
    prompts). ``critic`` (default ``spec["ppo"]["critic"]``): a separate critic started from the preference model
    (TRL's layout) instead of the default value head on the policy.
    """
    setup_worker(spec)
    import lightning as L

    from cai.stages.ppo import PPOConfig, PPOModule
    from data.prompt_data import PromptDataModule
    from models import ModelConfig

    p = spec["ppo"]
    timer = RolloutTimer(p["warmup"], p["steps"], p["batch_size"])
    pm = ModelConfig(spec["pm"], dtype="float32", attn_implementation=spec["attn"])
    cfg = PPOConfig(
        total_rollouts=p["warmup"] + p["steps"],
        max_new_tokens=p["new_tokens"],
        temperature=1.0,
        ppo_epochs=p["epochs"],
        num_minibatches=p["minibatches"],
        clip_range=p["clip"],
        vf_clip_range=p["clip"],
        vf_coef=p["vf_coef"],
        gamma=1.0,
        lam=0.95,
        kl_coef=p["kl_coef"],
        kl_estimator="k1",
        missing_eos_penalty=None,
        max_grad_norm=spec["max_grad_norm"],
    )
    module = PPOModule(
        cai_model_config(spec),
        preference_model=pm,
        critic=pm if (p.get("critic") if critic is None else critic) else None,
        ppo=cfg,
        optim=_cai_optim({**spec, "lr": p["lr"]}),
        hf_out=os.path.join(spec["tmp"], "hf"),
    )
    data = PromptDataModule(
        prompts="red_team", tokenizer=spec["model"], batch_size=p["batch_size"], max_prompt_tokens=10**6
    )
    count = {"rollouts": 0}

    class RolloutCallback(L.Callback):
        def on_train_start(self, trainer, pl_module):
            timer.attach(pl_module.model)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            count["rollouts"] += 1
            timer.step_end(count["rollouts"])

        def on_train_end(self, trainer, pl_module):
            timer.train_end()

    # Stopped by total_rollouts; PPOModule clips its own gradients (manual optimization).
    trainer = _cai_trainer(spec, RolloutCallback(), max_steps=-1, max_epochs=1000, gradient_clip_val=None)
    trainer.fit(module, datamodule=data)
    return {**timer.result(), "n_params": n_params(module.model)}
