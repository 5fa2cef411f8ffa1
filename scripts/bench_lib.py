"""Workers of ``scripts/bench_vs_trl.py``: model and data set-up, one measured training run, and the parity checks.

Each measured run happens in a fresh process (``bench_vs_trl.py --_worker NAME --_spec FILE``) so that its peak
memory belongs to one system and one run. A worker prints one line ``BENCH_RESULT {json}`` at the end.

Throughput is measured the same way in both systems: a forward pre-hook on the network counts the real (non-padding)
tokens and the rows of every training forward pass, and a step callback (a Lightning ``Callback`` here, a
``transformers.TrainerCallback`` in TRL) reads the clock at the end of optimizer step ``warmup`` and at the end of
step ``warmup + steps``. The window holds ``steps`` whole steps: data loading, forward, backward, clipping, optimizer
and scheduler step, and each system's own per-step bookkeeping (metrics, logging hooks).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
EOS_TEXT = "<|endoftext|>"  # models.tiny.EOS_TOKEN, written out so that this module imports nothing heavy
FILLER = "a"  # one token on its own (" a") in the tiny tokenizer: used to hit exact lengths


# ----------------------------------------------------------------------------- model and data


def build_model(out: Path, arch: str, overrides: dict, vocab_size: int | None, seed: int = 0) -> Path:
    """A random model of ``arch`` with the tiny offline tokenizer, saved with ``save_pretrained`` in ``out``.

    Args:
        out: Output directory.
        arch: Hugging Face ``model_type`` (llama, qwen2, ...).
        overrides: Config fields that replace the tiny defaults (hidden size, layers, ...).
        vocab_size: Embedding rows of the network when larger than the tokenizer's (e.g. Qwen2's 151936, so that the
            embedding and LM head cost what they cost in the real model); the extra rows are never indexed.
        seed: Weight initialisation seed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.tiny import ARCHITECTURES, TinyModelConfig, make_tiny_model

    if vocab_size is None:
        return make_tiny_model(out, TinyModelConfig(arch=arch, seed=seed, overrides=overrides))
    make_tiny_model(out, TinyModelConfig(arch=arch, seed=seed))  # the tokenizer, and a small model replaced below
    tok = AutoTokenizer.from_pretrained(out)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **ids, **{**ARCHITECTURES[arch], **overrides})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def count_parameters(model_dir: Path) -> int:
    """Parameters of the causal LM saved in ``model_dir`` (tied weights once), without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def _exact_words(rng: random.Random, words: list[str], cost: dict[str, int], n_tokens: int, count) -> str:
    """Random words whose text ``count`` gives exactly ``n_tokens`` tokens.

    Words are drawn while their summed token ``cost`` fits, then the count of the whole text is corrected with
    one-token fillers (a few tokenizer calls per text instead of one per word).
    """
    picked = [rng.choice(words)]
    total = count(picked)
    for _ in range(n_tokens * 4):  # words while they fit, then fillers for the last token or two
        word = rng.choice(words)
        if total + cost[word] <= n_tokens - 1:
            picked.append(word)
            total += cost[word]
    for _ in range(64):
        n = count(picked)
        if n == n_tokens:
            return " ".join(picked)
        if n < n_tokens:
            picked += [FILLER] * (n_tokens - n)
        else:
            picked.pop()
    raise RuntimeError(f"cannot make a text of exactly {n_tokens} tokens")


def write_data(model_dir: Path, out: Path, n_rows: int, seq_len: int, seed: int = 0) -> dict[str, str]:
    """Synthetic SFT and preference sets in each system's own input format, with the same token ids in both.

    SFT rows are exactly ``seq_len`` tokens (a quarter prompt, the rest completion with its EOS), so no batch has
    padding and every step does the same work in both systems whatever the shuffling. Preference rows: chosen texts
    are ``seq_len`` tokens, rejected ones 0-15 tokens shorter, so every batch is ``seq_len`` wide and only rejected
    rows are padded (which the parity check needs in order to test where the reward is read).

    This project's files hold the bare prompt and responses (``data.sft`` and ``data.preference`` add the
    "\\n\\nHuman: ...\\n\\nAssistant:" frame); TRL's hold the framed prompt, and TRL appends the EOS token itself.
    Our preference responses end with the EOS text so that both systems see the same ids (TRL reads the reward at
    the EOS token; ours reads it at the last real token, which is then the same token).

    Returns:
        Paths of ``sft_cai``, ``sft_trl``, ``rm_cai`` and ``rm_trl`` (JSONL).
    """
    from data.preference import tokenize_pair
    from data.sft import tokenize_example
    from models import load_tokenizer
    from models.tiny import bundled_corpus

    tok = load_tokenizer(str(model_dir), padding_side="right")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", bundled_corpus())})
    cost = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    rng = random.Random(seed)
    frame = "\n\nHuman: {}\n\nAssistant:"

    def n_prompt(ws: list[str]) -> int:
        return len(tok(frame.format(" ".join(ws)), add_special_tokens=False)["input_ids"])

    def n_response(ws: list[str]) -> int:
        return len(tok(" " + " ".join(ws) + EOS_TEXT, add_special_tokens=False)["input_ids"])

    if seq_len < 64:
        raise ValueError(f"seq_len={seq_len}: the synthetic rows need at least 64 tokens")
    n_p = seq_len // 4
    rows: dict[str, list[dict]] = {"sft_cai": [], "sft_trl": [], "rm_cai": [], "rm_trl": []}
    for _ in range(n_rows):
        prompt = _exact_words(rng, words, cost, n_p, n_prompt)
        completion = _exact_words(rng, words, cost, seq_len - n_p, n_response)
        chosen = _exact_words(rng, words, cost, seq_len - n_p, n_response)
        rejected = _exact_words(rng, words, cost, seq_len - n_p - rng.randrange(16), n_response)
        pair = {"prompt": prompt, "chosen": chosen + EOS_TEXT, "rejected": rejected + EOS_TEXT}
        sft_ids = tokenize_example({"prompt": prompt, "completion": completion}, tok, seq_len + 1)["input_ids"]
        if len(sft_ids) != seq_len or len(tokenize_pair(pair, tok, seq_len + 1, True)["chosen_ids"]) != seq_len:
            raise RuntimeError(f"a synthetic row is not {seq_len} tokens long")
        rows["sft_cai"].append({"prompt": prompt, "completion": completion})
        rows["sft_trl"].append({"prompt": frame.format(prompt), "completion": " " + completion})
        rows["rm_cai"].append(pair)
        rows["rm_trl"].append({"prompt": frame.format(prompt), "chosen": " " + chosen, "rejected": " " + rejected})
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in rows}
    for name, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return {name: str(path) for name, path in paths.items()}


# ----------------------------------------------------------------------------- measuring


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by all processes on this machine since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, without guest (counted in user)


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on a GPU, else peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS"


class WindowTimer:
    """Counts tokens and rows of training forward passes and times steps ``warmup + 1 ... warmup + steps``.

    Args:
        warmup: Optimizer steps before the window opens (at least 1).
        steps: Optimizer steps inside the window.
    """

    def __init__(self, warmup: int, steps: int):
        if warmup < 1 or steps < 1:
            raise ValueError(f"need warmup >= 1 and steps >= 1, got warmup={warmup}, steps={steps}")
        self.warmup, self.steps = warmup, steps
        self.tokens: list = []  # one entry per training forward pass (tensors: no device sync per step)
        self.rows: list[int] = []
        self.t0 = self.t1 = None
        self.i0 = self.i1 = 0
        self.peak: tuple[int, str] | None = None
        self.peak_before = 0
        self.busy0 = self.busy1 = self.cpu0 = self.cpu1 = None

    def attach(self, module) -> None:
        """Count the inputs of every forward pass of ``module`` that builds a graph (training passes).

        Called just before training starts, so it also reads the peak memory of the set-up (imports, model, data).
        """
        import torch

        self.peak_before = peak_memory_bytes()[0]

        def hook(_module, args, kwargs):
            if not torch.is_grad_enabled():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self.tokens.append(mask.sum() if mask is not None else ids.numel())
            self.rows.append(int(ids.shape[0]))

        module.register_forward_pre_hook(hook, with_kwargs=True)

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step_end(self, global_step: int) -> None:
        """Call at the end of every optimizer step with the number of steps done."""
        if global_step == self.warmup:
            self._sync()
            self.t0, self.i0 = time.perf_counter(), len(self.tokens)
            self.busy0, self.cpu0 = cpu_busy_seconds(), time.process_time()
        elif global_step == self.warmup + self.steps:
            self._sync()
            self.t1, self.i1 = time.perf_counter(), len(self.tokens)
            self.busy1, self.cpu1 = cpu_busy_seconds(), time.process_time()

    def train_end(self) -> None:
        """Call when training ends (before any final save), to read the peak memory of training."""
        self.peak = peak_memory_bytes()

    def result(self) -> dict:
        """Seconds, tokens, rows and forward passes inside the window, and the peak memory."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timing window did not close: fewer than warmup + steps optimizer steps ran")
        tokens = sum(int(t) for t in self.tokens[self.i0 : self.i1])
        seconds = self.t1 - self.t0
        other = None  # CPU time other processes took during the window, in cores (0 on a quiet machine)
        if self.busy0 is not None and self.busy1 is not None:
            other = max(0.0, (self.busy1 - self.busy0) - (self.cpu1 - self.cpu0)) / seconds
        return {
            "seconds": seconds,
            "steps": self.steps,
            "forwards": self.i1 - self.i0,
            "tokens": tokens,
            "rows": sum(self.rows[self.i0 : self.i1]),
            "tokens_per_s": tokens / seconds,
            "peak_mem_bytes": self.peak[0],
            "peak_mem_before_train_bytes": self.peak_before,
            "mem_kind": self.peak[1],
            "other_cpu_load": other,
        }


def _setup_worker(spec: dict) -> None:
    import datasets
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets.disable_caching()
    datasets.disable_progress_bars()
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- this project


def _cai_trainer(spec: dict, callback):
    import lightning as L

    cuda = spec["device"] == "cuda"
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if spec["bf16"] else "32-true",
        max_steps=spec["warmup"] + spec["steps"],
        gradient_clip_val=spec["max_grad_norm"],
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


def _cai_model_config(spec: dict):
    from models import ModelConfig

    return ModelConfig(spec["model"], dtype="float32", attn_implementation=spec["attn"])


def _cai_callback(timer: WindowTimer, network):
    """A Lightning callback that feeds ``timer``; ``network(pl_module)`` is the module whose inputs are counted."""
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            timer.attach(network(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.step_end(trainer.global_step)

        def on_train_end(self, trainer, pl_module):
            timer.train_end()

    return StepTimer()


def run_sft_cai(spec: dict) -> dict:
    """One SFT run of ``cai.sft.SFTModule`` on ``data.sft.SFTDataModule`` with a ``lightning.Trainer``."""
    _setup_worker(spec)
    from cai.sft import SFTModule
    from data.sft import SFTDataModule

    timer = WindowTimer(spec["warmup"], spec["steps"])
    module = SFTModule(_cai_model_config(spec), _cai_optim(spec), hf_out=os.path.join(spec["tmp"], "hf"))
    data = SFTDataModule(
        train=spec["data"]["sft_cai"],
        val=spec["data"]["sft_cai"],  # no hold-out: validation is off (limit_val_batches=0)
        tokenizer=spec["model"],
        max_length=spec["seq_len"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
    )
    _cai_trainer(spec, _cai_callback(timer, lambda m: m.model)).fit(module, datamodule=data)
    return {**timer.result(), "n_params": _n_params(module.model)}


def run_rm_cai(spec: dict) -> dict:
    """One hard-label preference-model run of ``cai.pm.PreferenceModule`` on ``PreferenceDataModule``."""
    _setup_worker(spec)
    from cai.pm import PreferenceModule
    from data.preference import PreferenceDataModule

    timer = WindowTimer(spec["warmup"], spec["steps"])
    module = PreferenceModule(_cai_model_config(spec), _cai_optim(spec), hf_out=os.path.join(spec["tmp"], "hf"))
    data = PreferenceDataModule(
        train=spec["data"]["rm_cai"],
        val=spec["data"]["rm_cai"],
        tokenizer=spec["model"],
        hard_labels=True,
        max_length=spec["seq_len"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
    )
    _cai_trainer(spec, _cai_callback(timer, lambda m: m.model.backbone)).fit(module, datamodule=data)
    return {**timer.result(), "n_params": _n_params(module.model)}


def build_preference_model(model_dir: Path, out: Path) -> Path:
    """A tiny preference model for PPO: ``PreferenceModel`` started from the policy, saved with its tokenizer.

    It is a standard ``AutoModelForSequenceClassification`` (one label), so TRL loads it as its reward model and, as
    in TRL's examples, as the start of its value model.
    """
    from models import ModelConfig, load_tokenizer
    from models.heads import PreferenceModel

    PreferenceModel.from_pretrained(ModelConfig(str(model_dir))).save_pretrained(out)
    load_tokenizer(str(model_dir)).save_pretrained(out)
    return out


def ppo_prompts(spec: dict) -> list[str]:
    """The built-in red_team prompts in transcript form, the same list (and order) in both systems."""
    from data.prompt_data import transcript_prompt
    from data.prompts import load_prompts_with_stats

    ds, _ = load_prompts_with_stats("red_team")
    return [transcript_prompt(p) for p in ds["prompt"]]


class RolloutTimer(WindowTimer):
    """``WindowTimer`` for PPO: a step is one rollout (``batch_size`` episodes) with all its optimizer steps."""

    def __init__(self, warmup: int, steps: int, batch_size: int):
        super().__init__(warmup, steps)
        self.batch_size = batch_size

    def result(self) -> dict:
        out = super().result()
        return {**out, "rows": self.batch_size * self.steps}  # episodes: responses of the timed rollouts


def run_ppo_cai(spec: dict) -> dict:
    """One PPO run of ``cai.ppo.PPOModule`` on ``PromptDataModule`` with a ``lightning.Trainer``.

    The window is timed by rollouts (``on_train_batch_end``; one training step is one rollout of ``batch_size``
    prompts). ``spec["ppo"]["critic"]``: a separate critic started from the preference model (TRL's layout) instead
    of the default value head on the policy.
    """
    _setup_worker(spec)
    import lightning as L

    from cai.ppo import PPOConfig, PPOModule
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
        _cai_model_config(spec),
        preference_model=pm,
        critic=pm if p.get("critic") else None,
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

    cuda = spec["device"] == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if spec["bf16"] else "32-true",
        max_steps=-1,
        max_epochs=1000,  # stopped by total_rollouts
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[RolloutCallback()],
        default_root_dir=spec["tmp"],
    )
    trainer.fit(module, datamodule=data)
    return {**timer.result(), "n_params": _n_params(module.model)}


# ----------------------------------------------------------------------------- TRL


def _trl_common_args(spec: dict) -> dict:
    """``TrainingArguments`` shared by both TRL trainers: the same schedule, optimizer settings and precision."""
    return dict(
        output_dir=os.path.join(spec["tmp"], "trl"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"],
        max_steps=spec["warmup"] + spec["steps"],
        max_length=spec["seq_len"],
        gradient_checkpointing=False,  # TRL's default is True; this project's is False
        bf16=spec["bf16"],
        fp16=False,
        use_cpu=spec["device"] != "cuda",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
        data_seed=spec["seed"],
        model_init_kwargs={"dtype": "float32", "attn_implementation": spec["attn"]},
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


def _run_trl(spec: dict, make) -> dict:
    """One timed run of the TRL trainer that ``make(spec, callbacks)`` builds."""
    _setup_worker(spec)
    timer = WindowTimer(spec["warmup"], spec["steps"])
    trainer = make(spec, [_trl_callback(timer)])
    timer.attach(trainer.model)
    trainer.train()
    return {**timer.result(), "n_params": _n_params(trainer.model)}


def run_sft_trl(spec: dict) -> dict:
    """One SFT run of TRL's ``SFTTrainer``."""
    return _run_trl(spec, make_trl_sft)


def run_rm_trl(spec: dict) -> dict:
    """One reward-model run of TRL's ``RewardTrainer``."""
    return _run_trl(spec, make_trl_rm)


def run_ppo_trl(spec: dict) -> dict:
    """One PPO run of TRL's ``trl.experimental.ppo.PPOTrainer``, timed by updates (one update = one rollout batch).

    Policy and reference from the same tiny model; reward model and value model (TRL's separate critic, started from
    the preference model as in TRL's examples) from the saved preference model. No stop token and no missing-EOS
    penalty, so every response is ``response_length`` tokens, as generation is in this project.
    """
    _setup_worker(spec)
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
        stop_token=None,
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
        learning_rate=p["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        gradient_checkpointing=False,  # TRL's PPO default is True; this project's is False
        bf16=spec["bf16"],
        fp16=False,
        use_cpu=spec["device"] != "cuda",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
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
    return {**timer.result(), "n_params": _n_params(trainer.model)}


# ----------------------------------------------------------------------------- parity


def _compare_batches(ours: dict, theirs: dict, keys: tuple[str, ...]) -> str | None:
    """None when the batches hold the same tensors under ``keys``, else what differs."""
    for key in keys:
        a, b = ours[key].cpu(), theirs[key].cpu()
        if a.shape != b.shape or not bool((a.long() == b.long()).all()):
            return f"{key} differ (shapes {tuple(a.shape)} vs {tuple(b.shape)})"
    return None


def _verdict(
    values: dict[str, float], diffs: dict[str, float], inputs_differ: str | None, tol: float, note: str = ""
) -> dict:
    worst = max(diffs.values())
    return {
        "equal": inputs_differ is None and worst <= tol,
        "max_abs_diff": worst,
        "diffs": diffs,
        "values": values,
        "inputs": inputs_differ or "identical",
        "note": note,
    }


def parity_sft(spec: dict, n: int) -> dict:
    """This project's SFT loss against ``SFTTrainer.compute_loss`` on the first ``n`` rows of the same data.

    Each system tokenizes and collates its own file; the batches must hold the same ids, labels and mask. The loss
    is ``losses.sft_loss`` on ``SFTModule``'s logits against TRL's ``compute_loss`` (its default
    ``loss_type="chunked_nll"``: the LM head only on completion positions, cross-entropy in chunks).
    """
    import torch

    from cai.sft import SFTModule
    from data.sft import SFTDataModule
    from losses import sft_loss

    device = torch.device(spec["device"])
    dm = SFTDataModule(spec["data"]["sft_cai"], spec["data"]["sft_cai"], spec["model"], spec["seq_len"], n)
    dm.setup("fit")
    ours = {k: v.to(device) for k, v in dm.collator()([dm.train_set[i] for i in range(n)]).items()}
    trainer = make_trl_sft({**spec, "bf16": False})
    ds = trainer.train_dataset
    theirs = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))
    differ = _compare_batches(ours, theirs, ("input_ids", "labels", "attention_mask"))

    module = SFTModule(_cai_model_config(spec))
    module.configure_model()
    module.to(device)
    trainer.model.train()
    with torch.no_grad():
        logits, targets = module(ours)  # logits only where a target follows
        loss_ours = sft_loss(logits, targets, aligned=True)
        loss_trl = trainer.compute_loss(trainer.model, dict(theirs))
    values = {"loss_cai": float(loss_ours), "loss_trl": float(loss_trl)}
    return _verdict(values, {"loss": abs(float(loss_ours) - float(loss_trl))}, differ, spec["parity_tol"])


def parity_rm(spec: dict, n: int) -> dict:
    """This project's hard-label preference loss and rewards against ``RewardTrainer.compute_loss`` on one batch.

    TRL's sequence-classification head starts from its own random init (std ``initializer_range`` = 0.02); ours
    from std 1/sqrt(hidden + 1). The check copies our head into TRL's, so both networks hold the same weights (and
    the rewards are O(1), not all near 0 as with TRL's init, which would make every loss close to log 2).
    """
    import torch

    from cai.pm import PreferenceModule
    from data.preference import PreferenceDataModule

    device = torch.device(spec["device"])
    dm = PreferenceDataModule(
        spec["data"]["rm_cai"], spec["data"]["rm_cai"], spec["model"], True, spec["seq_len"], batch_size=n
    )
    dm.setup("fit")
    ours = {k: v.to(device) for k, v in dm.collator()([dm.train_set[i] for i in range(n)]).items()}
    trainer = make_trl_rm({**spec, "bf16": False})
    ds = trainer.train_dataset
    theirs = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))
    differ = _compare_batches(ours, theirs, ("input_ids", "attention_mask"))

    module = PreferenceModule(_cai_model_config(spec))
    module.configure_model()
    module.to(device)
    trainer.model.train()
    with torch.no_grad():
        trainer.model.score.weight.copy_(module.model.score.weight)
        loss_ours, r_c, r_r, _ = module._step(ours)
        rewards_trl = trainer.model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"]).logits
        loss_trl = trainer.compute_loss(trainer.model, dict(theirs))
    diffs = {
        "loss": abs(float(loss_ours) - float(loss_trl)),
        "rewards": float((torch.cat([r_c, r_r]) - rewards_trl.squeeze(-1).float()).abs().max()),
    }
    values = {"loss_cai": float(loss_ours), "loss_trl": float(loss_trl)}
    note = "the heads start from different random inits (TRL std 0.02, ours 1/sqrt(H+1)): ours copied for the check"
    return _verdict(values, diffs, differ, spec["parity_tol"], note)


PARITY = {"sft": parity_sft, "rm": parity_rm}


def run_parity(spec: dict) -> dict:
    """Parity of every stage in ``spec["parity_stages"]`` that has a check, in float32, on one batch each."""
    _setup_worker(spec)
    n = min(spec["batch_size"], 8)
    return {stage: PARITY[stage](spec, n) for stage in spec["parity_stages"] if stage in PARITY}


WORKERS = {
    "sft-cai": run_sft_cai,
    "sft-trl": run_sft_trl,
    "rm-cai": run_rm_cai,
    "rm-trl": run_rm_trl,
    "ppo-cai": run_ppo_cai,
    "ppo-trl": run_ppo_trl,
    "parity": run_parity,
}


def worker_main(name: str, spec_path: str) -> None:
    """Run worker ``name`` on the spec in ``spec_path`` and print its result line."""
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[name](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
