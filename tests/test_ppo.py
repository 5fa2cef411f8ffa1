import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.stages.pm import PreferenceModule  # noqa: F401  (imported so the module is importable in CI)
from cai.stages.ppo import LoraConfig, PPOConfig, PPOModule, cli_main
from cai.training import OptimConfig
from helpers import clean_env, run_args, scalars
from models import ModelConfig
from models.errors import UserError
from models.heads import PreferenceModel


def ppo_args(policy, out, rollouts, *extra, reward="cai.method.rewards:letter_share"):
    args = run_args("configs/ppo/tiny.yaml", policy, out) + ["--model.ppo.total_rollouts", str(rollouts)]
    if reward:
        args += ["--model.preference_model", "null", "--model.reward_function", reward]
    return args + list(extra)


def first_last(values, k=5):
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.fixture(scope="module")
def pm_dir(tiny_model_dir, tmp_path_factory):
    """A (random) preference model in the saved format of ``cai pm``."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("pm")
    PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir))).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.slow  # 40 rollouts (5 s): kept out of make test-fast's minute
def test_ppo_learns_a_synthetic_reward(tiny_model_dir, tmp_path):
    cli = cli_main(ppo_args(tiny_model_dir, tmp_path, 40, "--model.optim.lr", "3e-3", "--model.ppo.ppo_epochs", "4"))
    module = cli.model
    assert module.rollouts_done == 40 and cli.trainer.global_step == 40 * 4 * 2  # optimizer steps
    start, end = first_last(scalars(tmp_path, "objective/scores"))
    kl = scalars(tmp_path, "objective/kl")
    print(
        f"ppo: mean score of the first 5 rollouts {start:.2f}, last 5 {end:.2f}; KL max {max(kl):.1f}, "
        f"last {kl[-1]:.1f}"
    )
    # Over prompt orders (--data.seed 0-5) the rise was 0.61-2.00 (docs/results.md): every order rose by more than 0.5.
    assert end > start + 0.5, f"mean score {start:.2f} -> {end:.2f}"
    assert all(torch.isfinite(torch.tensor(kl))) and max(kl) < 100, kl  # bounded by the β-penalty
    # The reference stays frozen, the policy moved.
    ref = module.frozen["ref"].state_dict()
    start_weights = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(ref[k].cpu(), start_weights[k]) for k in start_weights)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert any(not torch.equal(trained[k], start_weights[k]) for k in start_weights)
    for tag in (
        "policy/clipfrac",
        "policy/approxkl",
        "loss/policy",
        "loss/value",
        "value/explained_variance",
        "value/clipfrac",
        "objective/kl_coef",
        "objective/entropy",
        "objective/rlhf_reward",
        "response/length",
        "response/eos_share",
        "perf/episodes_per_sec",
        "perf/generation_share",
    ):
        assert scalars(tmp_path, tag), f"{tag} not logged"


def test_frozen_models_are_not_in_optimizer_or_checkpoint(tiny_model_dir, pm_dir, tmp_path):
    cli = cli_main(
        ppo_args(tiny_model_dir, tmp_path, 2, "--model.preference_model.name_or_path", str(pm_dir), reward=None)
    )
    module = cli.model
    pm_before = PreferenceModel.from_pretrained(ModelConfig(str(pm_dir))).state_dict()
    pm_after = module.frozen["pm"].state_dict()
    assert all(torch.equal(pm_before[k], pm_after[k].cpu()) for k in pm_before)
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    for net in module.frozen.values():
        assert not any(id(p) in opt_params for p in net.parameters())
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    n_policy = sum(1 for _ in module.model.state_dict())
    assert len(ckpt["state_dict"]) == n_policy  # policy + value head only
    assert "ppo_state" in ckpt and scalars(tmp_path, "objective/scores")


def test_ppo_resumes_from_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    # Checkpoints every 3 rollouts (12 optimizer steps); resume a 5-rollout run from the one at rollout 3.
    extra = [
        "--model.reward_function",
        "helpers:recording_letter_share",  # logs each rollout's prompts to $CAI_PROMPT_LOG
        "--model.ppo.adaptive_kl",
        "true",
        "--model.ppo.target_kl_penalty",
        "0.5",
        "--model.ppo.kl_horizon",
        "100",
        "--trainer.callbacks",
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        '"init_args": {"every_n_train_steps": 12, "save_top_k": -1}}]',
    ]
    monkeypatch.setenv("CAI_PROMPT_LOG", str(tmp_path / "prompts_a.jsonl"))
    full = cli_main(ppo_args(tiny_model_dir, tmp_path / "a", 5, *extra))
    ckpt = next((tmp_path / "a").rglob("*step=12.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["ppo_state"]["rollouts_done"] == 3 and state["ppo_state"]["kl_ctl"]["value"] != 0.05
    monkeypatch.setenv("CAI_PROMPT_LOG", str(tmp_path / "prompts_b.jsonl"))
    resumed = cli_main(ppo_args(tiny_model_dir, tmp_path / "b", 5, *extra, "--ckpt_path", str(ckpt)))
    assert resumed.model.rollouts_done == 5 and resumed.trainer.global_step == full.trainer.global_step == 20
    assert len(scalars(tmp_path / "b", "objective/scores")) == 2  # only rollouts 4 and 5 ran again
    betas = scalars(tmp_path / "b", "objective/kl_coef")
    assert betas[0] == pytest.approx(state["ppo_state"]["kl_ctl"]["value"])  # β continued, not reset
    # The prompt loader resumed too: rollouts 4 and 5 drew the prompts they drew in the uninterrupted run.
    prompts_a = (tmp_path / "prompts_a.jsonl").read_text().splitlines()
    prompts_b = (tmp_path / "prompts_b.jsonl").read_text().splitlines()
    assert len(prompts_a) == 5 and prompts_b == prompts_a[3:]


def test_nan_reward_stops_with_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite scores at rollout 2 \(rollout"):
        cli_main(ppo_args(tiny_model_dir, tmp_path, 5, reward="cai.method.rewards:nan_after_two_calls"))
    saved = list(tmp_path.glob("nonfinite-rollout2.ckpt"))
    assert saved and torch.load(saved[0], weights_only=False)["ppo_state"]["rollouts_done"] == 2


def test_ppo_lora_uses_base_as_reference(tiny_model_dir, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs peft (the lora or bench extra)")
    cli = cli_main(ppo_args(tiny_model_dir, tmp_path, 2, "--model.lora.r", "4", "--model.optim.lr", "1e-2"))
    assert "ref" not in cli.model.frozen  # no second copy of the policy
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()  # merged, plain HF model
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.slow
def test_ppo_fsdp2_two_cpu_processes(tiny_model_dir, pm_dir, tmp_path):
    env = clean_env()
    args = ppo_args(
        tiny_model_dir,
        tmp_path,
        3,
        "--model.preference_model.name_or_path",
        str(pm_dir),
        "--config",
        "configs/strategies/fsdp2_cpu.yaml",
        reward=None,
    )
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "ppo", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(scalars(tmp_path, "objective/scores")) == 3
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(trained[k].shape == start[k].shape for k in start)  # gathered, not shards
    assert any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_ppo_bf16(tiny_model_dir, tmp_path, precision):
    cli = cli_main(ppo_args(tiny_model_dir, tmp_path, 2, "--trainer.precision", precision))
    assert cli.model.rollouts_done == 2
    assert all(torch.isfinite(torch.tensor(scalars(tmp_path, tag))).all() for tag in ("loss/policy", "objective/kl"))
    if precision == "bf16-true":
        assert next(cli.model.frozen["ref"].parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_ppo_ddp_two_cpu_processes_with_early_stop(tiny_model_dir, tmp_path):
    env = clean_env()
    args = ppo_args(
        tiny_model_dir,
        tmp_path,
        3,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--model.ppo.target_kl",
        "0.0",
        "--model.ppo.ppo_epochs",
        "4",
    )
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "ppo", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # target_kl 0: every rollout stops after its first epoch, on both ranks alike (else DDP would hang).
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 3 * 1 * 2 and ckpt["ppo_state"]["rollouts_done"] == 3


def test_ppo_separate_critic_and_gradient_checkpointing(tiny_model_dir, pm_dir, tmp_path):
    cli = cli_main(
        ppo_args(
            tiny_model_dir,
            tmp_path,
            2,
            "--model.critic.name_or_path",
            str(pm_dir),
            "--model.gradient_checkpointing",
            "true",
        )
    )
    module = cli.model
    assert module.hf_model.is_gradient_checkpointing
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in module.model.critic.parameters())  # the critic is trained
    assert module.model.value_head is None  # TRL's layout: no idle value head on the policy
    policy_params = sum(p.numel() for p in module.model.parameters()) - sum(
        p.numel() for p in module.model.critic.parameters()
    )
    assert policy_params == sum(p.numel() for p in module.model.lm.parameters())
    critic_start = PreferenceModel.from_pretrained(ModelConfig(str(pm_dir))).backbone.state_dict()
    critic_now = module.model.critic.backbone.state_dict()
    assert any(not torch.equal(critic_start[k], critic_now[k].cpu()) for k in critic_start)
    assert len(scalars(tmp_path, "loss/value")) == 2
    # Gradients are freed right after each optimizer step, so the next minibatch's forward pass and the next rollout
    # do not hold them: about 11% of the peak memory of SmolLM2 in this layout (docs/BENCHMARKS.md).
    assert all(p.grad is None for p in module.model.parameters())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PPOConfig(kl_horizon=0), "ppo.kl_horizon=0: must be at least 1"),
        (lambda: PPOConfig(target_kl_penalty=0.0), "ppo.target_kl_penalty=0.0: must be above 0"),
        (lambda: PPOConfig(vf_coef=-0.1), "ppo.vf_coef=-0.1: must be 0 or more"),
        (lambda: LoraConfig(r=0), "lora.r=0: must be at least 1"),
        (lambda: LoraConfig(alpha=0), "lora.alpha=0: must be above 0"),
        (lambda: LoraConfig(target_modules=[]), "lora.target_modules: must name at least one module"),
        (lambda: OptimConfig(lr=0.0), "optim.lr=0.0: must be above 0"),
        (lambda: OptimConfig(betas=(0.9, 1.0)), r"optim.betas=\(0.9, 1.0\): must be two numbers in \[0, 1\)"),
        (lambda: OptimConfig(schedule="linear"), "optim.schedule='linear': must be cosine or constant"),
        (lambda: OptimConfig(min_lr_ratio=1.5), "optim.min_lr_ratio=1.5"),
        (lambda: OptimConfig(warmup_steps=-1), "optim.warmup_steps=-1"),
    ],
)
def test_settings_are_checked_when_built(make, message):
    with pytest.raises(UserError, match=message):
        make()
    # the defaults and the boundary values pass
    assert PPOConfig(kl_horizon=1, vf_coef=0.0).kl_horizon == 1
    assert LoraConfig(r=1).r == 1 and OptimConfig(weight_decay=0.0, min_lr_ratio=0.0, warmup_steps=0).lr > 0


def test_ppo_module_refuses_a_bad_prompt_format_or_sample_count():
    policy = ModelConfig("unused")  # nothing is loaded before configure_model
    with pytest.raises(UserError, match="model.prompt_format='md': must be auto, chat or transcript"):
        PPOModule(policy, reward_function="m:f", prompt_format="md")
    with pytest.raises(UserError, match="model.log_samples=-1: must be 0 or more"):
        PPOModule(policy, reward_function="m:f", log_samples=-1)
    with pytest.raises(UserError, match="give exactly one of"):
        PPOModule(policy)


def test_ppo_refuses_fsdp1_before_loading_anything():
    # FSDP1 refuses a CPU at Trainer start, so the module gets a stand-in trainer holding the strategy object.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = PPOModule(ModelConfig("unused"), reward_function="m:f")  # loading "unused" would fail differently
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UserError, match=r"^ppo: FSDP1 .*fsdp2_gpu\.yaml$"):
        module.configure_model()
