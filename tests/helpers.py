"""Helpers shared by the end-to-end tests."""

import os

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(log_dir, tag):
    events = [os.path.join(d, f) for d, _, fs in os.walk(log_dir) for f in fs if f.startswith("events.out")]
    values = []
    for e in events:
        acc = EventAccumulator(e)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(s.step, s.value) for s in acc.Scalars(tag)]
    return [v for _, v in sorted(values)]


def run_args(config, model_dir, out):
    """``fit`` with a stage's tiny config, a model, and every output (logs, checkpoints, HF export) under ``out``."""
    return [
        "fit",
        "--config",
        config,
        "--model.model.name_or_path",
        str(model_dir),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--model.hf_out",
        str(out / "hf"),
        "--trainer.enable_progress_bar",
        "false",
    ]


def base_args(model_dir, data, out, steps):
    """SFT for ``steps`` steps on ``data``, logging every step and validating every 5."""
    return run_args("configs/sft/tiny.yaml", model_dir, out) + [
        "--data.train",
        str(data),
        "--trainer.max_steps",
        str(steps),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "5",
    ]


def kill_after_lines(cmd, path, n_lines, timeout=120):
    """Start ``cmd``, SIGKILL it once ``path`` has ``n_lines`` lines; returns (returncode, lines at kill)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    path = Path(path)
    while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= n_lines):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode, path.read_text().count("\n") if path.exists() else 0


def clean_env() -> dict:
    """The environment without torch.distributed variables, for launching a multi-process run from pytest."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK", "NODE_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop}


def recording_letter_share(prompts: list[str], responses: list[str]) -> list[float]:
    """``cai.method.rewards.letter_share``; also appends each rollout's prompts (one line) to ``$CAI_PROMPT_LOG``."""
    import json

    from cai.method.rewards import letter_share

    with open(os.environ["CAI_PROMPT_LOG"], "a") as f:
        f.write(json.dumps(prompts) + "\n")
    return letter_share(prompts, responses)


def slow_logprob(model, tok, context, option):
    """log p(option | context) by one plain forward pass over the joined text (the reference for fast scoring)."""
    import torch

    ids = tok(context, add_special_tokens=False)["input_ids"]
    opt = tok(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + opt])).logits[0].float(), -1)
    return sum(lp[len(ids) - 1 + j, t].item() for j, t in enumerate(opt))


class GradDump(L.Callback):
    """A Lightning callback that saves the first optimizer step's gradients and logged loss (rank 0) to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        import torch

        if trainer.global_step == 0 and trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            loss = trainer.callback_metrics.get("loss/train")
            torch.save({"grads": grads, "loss": None if loss is None else float(loss)}, self.path)


class FirstStepDump(L.Callback):
    """Saves the first optimizer step's loss and full gradients to ``path``, under any strategy.

    Unlike ``GradDump`` it gathers FSDP2's gradient shards (DTensors) into full tensors, stores gradients in float32
    on CPU, and saves the loss averaged over ranks (the global batch's mean when the ranks hold equal batches).
    """

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        import torch
        from torch.distributed.tensor import DTensor

        if trainer.global_step != 0:
            return
        grads = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                g = p.grad.detach()
                grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).float().cpu().clone()  # collective
        loss = trainer.callback_metrics["loss/train"].detach().float().clone()
        loss = float(trainer.strategy.reduce(loss, reduce_op="mean"))
        if trainer.is_global_zero:
            torch.save({"grads": grads, "loss": loss, "world_size": trainer.world_size}, self.path)


class FirstRolloutKL(L.Callback):
    """PPO: writes ``<path>.<rank>`` (JSON): the largest |log π - log π_ref| over the first rollout's response tokens.

    At the first rollout the policy is the reference, so under every strategy and precision the difference must be
    exactly 0. The callback wraps the module's ``rollout`` to see its log-probabilities.
    """

    def __init__(self, path: str):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        import json

        rollout, state = pl_module.rollout, {"done": False}

        def recorded(prompts):
            out = rollout(prompts)
            if not state["done"]:
                diff = ((out["logp"] - out["ref_logp"]).abs() * out["r_mask"]).max().item()
                record = {"max_abs_diff": diff, "tokens": int(out["r_mask"].sum()), "dtype": str(out["logp"].dtype)}
                with open(f"{self.path}.{trainer.global_rank}", "w") as f:
                    json.dump(record, f)
                state["done"] = True
            return out

        pl_module.rollout = recorded


class BatchLog(L.Callback):
    """Appends, per rank, each training batch's ``input_ids`` with its optimizer step to ``<path>.<rank>`` (JSONL)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import json

        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step + 1, "input_ids": batch["input_ids"].tolist()}) + "\n")
