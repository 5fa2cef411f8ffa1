"""RL-CAI: PPO against the preference model with a KL penalty to the frozen SL-CAI policy (Bai et al. 2022, sec. 4).

Run as ``cai ppo fit --config configs/ppo/tiny.yaml``. Read ``PPOModule.training_step`` top to bottom: it is the
whole algorithm, in the order it runs (cf. CleanRL's ``ppo.py``), built on ``losses/ppo.py``. docs/ppo.md lists
every metric and every detail with its reason; ``cai/stages/ppo_config.py`` every setting (``model.ppo``,
``model.lora``).

One training step = one rollout of ``batch_size`` prompts per device, then ``ppo_epochs`` passes over shuffled
minibatches of it, one optimizer step per minibatch. Lightning's ``global_step`` therefore counts optimizer steps;
the run length is ``total_rollouts``.
"""

from __future__ import annotations

import importlib
import json
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from cai.stages.ppo_config import LoraConfig, PPOConfig
from cai.training import HFModule, OptimConfig, lr_lambda, make_adamw, run_cli
from data.formats import PromptFormat
from data.prompt_data import PromptDataModule
from losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from models import ModelConfig, load_model, load_tokenizer
from models.errors import UserError
from models.heads import PolicyWithValue, PreferenceModel, ValueModel
from models.loading import same_tokenizer
from models.logprobs import last_token_logprobs, position_ids_from_mask
from models.padding import pad_rows

# Checkpoints taken between training steps hold the state after that step's optimizer steps, which is what resuming
# needs; Lightning warns about this for every manual-optimization module that checkpoints by step.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class PPOModule(HFModule):
    """PPO with a value head (or a separate critic) against a frozen preference model and reference policy.

    Args:
        model: The policy to train, usually the SL-CAI model; also the reference policy unless ``reference`` is set.
        preference_model: The frozen preference model (``cai pm`` output). Exclusive with ``reward_function``.
        reward_function: ``module:function`` taking (prompts, responses) and returning a list of scores; for
            synthetic rewards and tests. Exclusive with ``preference_model``.
        reference: The frozen reference policy; None uses ``model``'s weights.
        critic: A separate value network to start from (e.g. the preference model); None: a value head on the policy.
        ppo: PPO hyperparameters.
        optim: Optimizer and schedule (the schedule spans all optimizer steps of ``total_rollouts``).
        lora: Train LoRA adapters instead of all weights.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        hf_out: Where the final policy is saved in Hugging Face format; default ``<log_dir>/hf``.
        prompt_format: ``auto``, ``chat`` or ``transcript`` (``data.formats``): how prompts are shown to the policy
            and conversations to the preference model; the same as in SFT and the preference model's training.
        log_samples_every: Every this many rollouts, log a few prompts, responses and scores (TensorBoard text and
            ``samples.jsonl`` in the log folder); 0 = never.
        log_samples: How many samples to log each time.
    """

    def __init__(
        self,
        model: ModelConfig,
        preference_model: ModelConfig | None = None,
        reward_function: str | None = None,
        reference: ModelConfig | None = None,
        critic: ModelConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        lora: LoraConfig | None = None,
        gradient_checkpointing: bool = False,
        hf_out: str | None = None,
        prompt_format: str = "auto",
        log_samples_every: int = 10,
        log_samples: int = 4,
    ):
        super().__init__(model, optim or OptimConfig(lr=1e-6, schedule="constant"), gradient_checkpointing, hf_out)
        if (preference_model is None) == (reward_function is None):
            raise UserError("ppo: give exactly one of model.preference_model and model.reward_function")
        if prompt_format not in ("auto", "chat", "transcript"):
            raise UserError(f"model.prompt_format={prompt_format!r}: must be auto, chat or transcript")
        for name, value in (("log_samples_every", log_samples_every), ("log_samples", log_samples)):
            if value < 0:
                raise UserError(f"model.{name}={value}: must be 0 or more")
        self.save_hyperparameters()
        self.automatic_optimization = False  # a rollout then several optimizer steps per training step
        self.cfg, self.lora = ppo or PPOConfig(), lora
        self.pm_cfg, self.ref_cfg, self.critic_cfg = preference_model, reference, critic
        cfg = self.cfg
        if cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl_penalty, cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.rollouts_done = 0
        # Frozen networks live outside the module tree: never in the optimizer, never in a checkpoint.
        self.frozen: dict[str, torch.nn.Module] = {}

    # ----------------------------------------------------------------------------------------- networks
    def build_network(self) -> torch.nn.Module:
        lm = load_model(self.model_cfg)
        if self.lora is not None:
            import peft

            lora = peft.LoraConfig(
                r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=0.0, target_modules=self.lora.target_modules
            )
            lm = peft.get_peft_model(lm, lora)
        if self.critic_cfg is None:
            return PolicyWithValue(lm)  # a value head on the policy's trunk
        # TRL's layout: a separate critic, and no value head on the policy (it would be built, run and trained idle)
        return PolicyWithValue(lm, critic=ValueModel(PreferenceModel.from_pretrained(self.critic_cfg).backbone))

    @property
    def hf_model(self):
        return self.model.lm

    def configure_model(self) -> None:
        if isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy):
            # PPO optimizes manually and calls generate on the inner model, outside the root FSDP1 wrapper.
            raise UserError(
                "ppo: FSDP1 (FSDPStrategy) does not work with manual optimization in Lightning (#19626, #20138); "
                "use FSDP2: --config configs/strategies/fsdp2_gpu.yaml"
            )
        first = self.model is None
        super().configure_model()  # policy (+ value head), sharded under ModelParallelStrategy
        if first:
            self.tokenizer = load_tokenizer(self.model_cfg.tokenizer or self.model_cfg.name_or_path, "left")
            self.format = PromptFormat(self.tokenizer, self.hparams.prompt_format)
            self.stop_ids = self.format.stop_token_ids()
            if self.ref_cfg is not None:
                self.frozen["ref"] = load_model(self.ref_cfg)
            elif self.lora is None:
                self.frozen["ref"] = load_model(self.model_cfg)  # LoRA: the base model with adapters disabled
            if self.pm_cfg is not None:
                self.frozen["pm"] = PreferenceModel.from_pretrained(self.pm_cfg)
                self.pm_tokenizer = load_tokenizer(self.pm_cfg.tokenizer or self.pm_cfg.name_or_path, "right")
                self.pm_format = PromptFormat(self.pm_tokenizer, self.hparams.prompt_format)
                # The same tokenizer and layout: the preference model can read the rollout's token ids as they are
                # (``_pm_inputs``), instead of decoded text tokenized again. Checked once, here.
                self.pm_reads_ids = self.pm_format.kind == self.format.kind and same_tokenizer(
                    self.tokenizer, self.pm_tokenizer
                )
                _, completion = self.pm_format.dialogue("hi", "XQZ7")  # what PromptFormat.text puts after a response
                close = completion[completion.rindex("XQZ7") + 4 :]
                self.pm_close_ids = self.pm_tokenizer(close, add_special_tokens=False)["input_ids"]
            else:
                module, fn = self.hparams.reward_function.split(":")
                self.reward_fn = getattr(importlib.import_module(module), fn)
            for net in self.frozen.values():
                net.requires_grad_(False).eval()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("batch_size")
        if batch is not None and (batch % self.cfg.num_minibatches or batch < self.cfg.num_minibatches):
            raise UserError(
                f"ppo: data.batch_size={batch} is not divisible by model.ppo.num_minibatches="
                f"{self.cfg.num_minibatches}: every minibatch must have the same size"
            )
        for net in self.frozen.values():  # Lightning moves only registered modules
            net.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # FSDP2 makes the first module called the root. The root must be the whole policy, so call it once
            # before generation calls the inner HF model on its own.
            ids = torch.full((1, 2), self.tokenizer.pad_token_id, device=self.device)
            with torch.no_grad():
                self.model(ids, torch.ones_like(ids), position_ids_from_mask(torch.ones_like(ids)), 1)

    def configure_optimizers(self):
        cfg, optim_cfg = self.cfg, self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_adamw(params, optim_cfg, self.trainer)
        total = cfg.total_rollouts * cfg.ppo_epochs * cfg.num_minibatches  # optimizer steps of the whole run
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, optim_cfg, total))
        return [optimizer], [schedule]

    # ----------------------------------------------------------------------------------------- rollout
    def _forward(self, ids, mask, n):
        """Log-probs (B, n), values (B, n) and tempered logits (B, n, V) of the last n tokens, in one pass."""
        pos = position_ids_from_mask(mask)
        logits, values = self.model(ids, mask, pos, n)  # (B, n, V), (B, n)
        logits = logits.float() / self.cfg.temperature
        return logprobs_from_logits(logits, ids[:, -n:]), values, logits

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Sample responses, then score them: log-probs, reference log-probs, values, preference scores."""
        cfg, tok = self.cfg, self.tokenizer
        gen_start = time.perf_counter()
        query = tok([self.format.prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
        q_ids, q_mask = pad_rows(query, tok.pad_token_id, "left", self.device)  # (B, P)
        # Sharded weights are gathered in every forward call, so under FSDP all ranks step together until the last
        # rank's rows have ended (synced_gpus); DDP ranks generate independently.
        sharded = self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, DDPStrategy)
        # TRL's layout: the log-probabilities of the sampled tokens are read off the logits generate computes anyway
        # (PPOConfig.logprobs_from_generation), so the policy does not run over the rollout again.
        reuse_logits = self.model.critic is not None and cfg.logprobs_from_generation
        self.model.lm.eval()
        out = self.model.lm.generate(
            input_ids=q_ids,
            attention_mask=q_mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k or None,
            top_p=None,
            eos_token_id=self.stop_ids,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            synced_gpus=sharded,
            return_dict_in_generate=True,
            output_logits=reuse_logits,  # each step's raw logits (B, V), before temperature and top-k
        )
        self.model.lm.train()
        t_gen = time.perf_counter() - gen_start
        seq = out.sequences  # (B, P + N); rows that ended early are padded
        resp = seq[:, q_ids.shape[1] :]  # (B, N)
        is_stop = torch.isin(resp, torch.tensor(self.stop_ids, device=resp.device))  # (B, N) EOS or end-of-turn
        after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # (B, N) strictly after the first stop token
        r_mask = (~after_stop).long()  # (B, N) response tokens up to and including the first stop token
        ids, mask = seq, torch.cat([q_mask, r_mask], 1)  # (B, P + N)
        n = resp.shape[1]
        if reuse_logits:  # the logits that sampled each token give its log-probability; only the critic runs
            logp = logprobs_from_logits(torch.stack(out.logits, 1), resp, cfg.temperature)  # (B, N)
            values = self.model.values(ids, mask, position_ids_from_mask(mask), n)  # (B, N)
        else:  # one pass of the policy gives log-probabilities and values (value head, or policy and critic)
            logp, values, _ = self._forward(ids, mask, n)  # (B, N) each
        del out
        if "ref" in self.frozen:
            ref_logp = last_token_logprobs(self.frozen["ref"], ids, mask, n, cfg.temperature)  # (B, N)
        else:
            with self.model.lm.disable_adapter():  # LoRA: the base weights are the reference
                ref_logp = last_token_logprobs(self.model.lm, ids, mask, n, cfg.temperature)
        has_eos = is_stop.any(1)  # (B,) the response ended rather than ran out of tokens
        resp = resp * r_mask + tok.pad_token_id * (1 - r_mask)  # (B, N) pad after the stop token
        pm_ids = self._pm_inputs(q_ids, q_mask, resp, r_mask, has_eos) if "pm" in self.frozen else None
        if pm_ids is not None:  # the preference model reads the rollout's ids: no decoding, no tokenizing
            scores = self.frozen["pm"](*pm_ids)  # (B,)
        else:
            scores = self.score(prompts, self.decode(resp))  # (B,)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
        return {
            "ids": ids,
            "mask": mask,
            "r_mask": r_mask,
            "logp": logp,
            "ref_logp": ref_logp,
            "values": values,
            "scores": scores,
            "has_eos": has_eos,
            "resp": resp,
            "left_pad": (1 - q_mask).sum(1),  # (B,) padding columns before each prompt
            "t_gen": t_gen,
        }

    def decode(self, resp: torch.Tensor) -> list[str]:
        """Response texts of the rollout's response ids (B, N), special tokens (the stop token) left out."""
        return self.tokenizer.batch_decode(resp, skip_special_tokens=True)

    def _pm_inputs(self, q_ids, q_mask, resp, r_mask, has_eos) -> tuple[torch.Tensor, ...] | None:
        """The preference model's input (ids, mask, positions) built from the rollout's ids; None: use ``score``.

        It reads what ``score`` would tokenize: the prompt, the response, then the end of turn that
        ``PromptFormat.text`` writes (e.g. EOS, or ``<|im_end|>`` and a newline) in place of the stop token. That
        needs the policy's tokenizer and prompt layout (``pm_reads_ids``, checked in ``configure_model``) and the
        preference model's context to hold the rollout. Unlike decoding and tokenizing again, it keeps the tokens
        the policy sampled: a response whose text tokenizes to other ids (a non-canonical split, or spaces that
        ``score`` strips) is scored as sampled, as TRL scores it.
        """
        close = torch.tensor(self.pm_close_ids, device=resp.device)  # (C,) the end of turn
        limit = getattr(self.frozen["pm"].config, "max_position_embeddings", None) or 10**9
        if not self.pm_reads_ids or not len(close) or q_ids.shape[1] + resp.shape[1] + len(close) > limit:
            return None
        B, N = resp.shape
        content = r_mask.sum(1) - has_eos.long()  # (B,) response tokens before the stop token
        offset = torch.arange(N + len(close), device=resp.device) - content[:, None]  # (B, N + C) from the close
        ids = torch.cat([resp, resp[:, :1].expand(B, len(close))], 1)  # (B, N + C); filler where masked
        ids = torch.where(offset >= 0, close[offset.clamp(0, len(close) - 1)], ids)  # the close after the content
        mask = torch.cat([q_mask, (offset < len(close)).long()], 1)  # (B, P + N + C)
        return torch.cat([q_ids, ids], 1), mask, position_ids_from_mask(mask)

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Preference-model scores (B,) of the transcripts, or the reward function's."""
        if "pm" not in self.frozen:
            return torch.tensor(self.reward_fn(prompts, responses), dtype=torch.float32, device=self.device)
        # The conversation as the preference model was trained on it: the same format, end-of-turn included.
        texts = [self.pm_format.text(p, r) for p, r in zip(prompts, responses)]
        return self.frozen["pm"].score_texts(self.pm_tokenizer, texts, batch_size=len(texts))  # one forward pass

    # ----------------------------------------------------------------------------------------- training step
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        cfg = self.cfg
        step_start = time.perf_counter()
        # 1. Rollout: responses and everything PPO needs about them, computed once without gradients.
        rollout = self.rollout(batch["prompt"])
        mask = rollout["r_mask"]  # (B, N) 1 on response tokens
        beta = self.kl_ctl.value
        # 2. Rewards: -β·KL on every response token, the preference score on the last one.
        rewards, kl = per_token_rewards(
            rollout["scores"], rollout["logp"], rollout["ref_logp"], mask, beta, cfg.kl_estimator
        )  # (B, N) each
        # 3. Advantages by GAE; whitened over the rollout so the step size does not depend on the reward scale.
        advantages, returns = gae(rewards, rollout["values"], mask, cfg.gamma, cfg.lam)  # (B, N) each
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        kl_per_response = (kl * mask).sum(1)  # (B,) KL to the reference of each response
        self._check_finite(step="rollout", scores=rollout["scores"], kl=kl_per_response)
        # 4. PPO epochs over shuffled minibatches of the rollout; one optimizer step per minibatch.
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        n_rows, n = mask.shape
        stats: dict[str, list] = {k: [] for k in ("pg", "vf", "ent", "clipfrac", "approxkl", "vf_clipfrac")}
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n_rows, device=mask.device)
            minibatches = order.view(cfg.num_minibatches, -1)  # PPOModule.on_fit_start checks that it divides evenly
            # A minibatch's longest prompt is often shorter than the rollout's: the columns that are left padding in
            # all its rows are dropped. The same numbers up to float rounding (masked columns add nothing), less
            # compute; one device sync per epoch reads how many.
            skips = rollout["left_pad"][minibatches].amin(1).tolist()  # (num_minibatches,)
            for rows, skip in zip(minibatches, skips):
                ids, row_mask = rollout["ids"][rows, skip:], rollout["mask"][rows, skip:]  # (b, T - skip)
                logp, values, logits = self._forward(ids, row_mask, n)  # (b, N) each, logits (b, N, V)
                pg_loss, pg_stats = policy_loss(
                    logp, rollout["logp"][rows], advantages[rows], mask[rows], cfg.clip_range
                )
                vf_loss, vf_stats = value_loss(
                    values, rollout["values"][rows], returns[rows], mask[rows], cfg.vf_clip_range
                )
                # Logged always; differentiated only when it is trained on (its backward pass reads (b, N, V) again).
                entropy = masked_mean(entropy_from_logits(logits if cfg.ent_coef else logits.detach()), mask[rows])
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                self._check_finite(step="loss", loss=loss.detach())
                self.manual_backward(loss)
                self.clip_gradients(optimizer, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                # Free the gradients now, not before the next backward: the next minibatch's forward pass then runs
                # without a second copy of the trained weights' size held (as transformers.Trainer and TRL do).
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                stats["pg"].append(pg_loss.detach())
                stats["vf"].append(vf_loss.detach())
                stats["ent"].append(entropy.detach())
                stats["clipfrac"].append(pg_stats["clipfrac"].detach())
                stats["approxkl"].append(pg_stats["approx_kl"].detach())
                stats["vf_clipfrac"].append(vf_stats["clipfrac"].detach())
            # Early stop: once the policy has moved too far from the rollout policy, more epochs overfit it.
            if cfg.target_kl is not None:
                epoch_kl = torch.stack(stats["approxkl"][-cfg.num_minibatches :]).mean()
                if self.trainer.strategy.reduce(epoch_kl).item() > cfg.target_kl:  # the same decision on every rank
                    break
        # 5. Adapt β, count the rollout, log.
        mean_kl = self.trainer.strategy.reduce(kl_per_response.mean())
        self.kl_ctl.update(mean_kl.item(), n_steps=n_rows * self.trainer.world_size)
        self.rollouts_done += 1
        self._log(rollout, kl_per_response, beta, stats, returns, mask, time.perf_counter() - step_start)
        self._log_samples(batch["prompt"], rollout)
        if self.rollouts_done >= cfg.total_rollouts:
            self.trainer.should_stop = True

    def _log(self, rollout, kl_per_response, beta, stats, returns, mask, step_time) -> None:
        mean = {k: torch.stack(v).mean() for k, v in stats.items()}
        lengths = mask.sum(1).float()  # (B,)
        scores, ended = rollout["scores"], rollout["has_eos"].float()
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": kl_per_response.mean(),
            "objective/rlhf_reward": (scores - beta * kl_per_response).mean(),
            "objective/entropy": mean["ent"],
            "objective/kl_coef": float(beta),
            "policy/approxkl": mean["approxkl"],
            "policy/clipfrac": mean["clipfrac"],
            "loss/policy": mean["pg"],
            "loss/value": mean["vf"],
            "value/clipfrac": mean["vf_clipfrac"],
            "value/explained_variance": explained_variance(rollout["values"], returns, mask),
            "response/length": lengths.mean(),
            "response/eos_share": ended.mean(),
            "response/empty_share": (lengths <= ended).float().mean(),
            "perf/episodes_per_sec": mask.shape[0] * self.trainer.world_size / step_time,
            "perf/generation_share": rollout["t_gen"] / step_time,
            "perf/rollouts": float(self.rollouts_done),
        }
        self.log_dict(metrics, prog_bar=False, sync_dist=True, on_step=True)
        self.log("objective/scores_pb", scores.mean(), prog_bar=True, logger=False)

    def _log_samples(self, prompts: list[str], ro: dict) -> None:
        """A few prompts, responses and scores of this rollout: what the policy writes, not only what it scores."""
        every, k = self.hparams.log_samples_every, self.hparams.log_samples
        if not every or (self.rollouts_done - 1) % every:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank
        if not self.trainer.is_global_zero:
            return
        rows = [
            {"rollout": self.rollouts_done, "prompt": p, "response": r, "score": round(s, 4), "ended": bool(e)}
            for p, r, s, e in zip(
                prompts[:k], self.decode(ro["resp"][:k]), ro["scores"][:k].tolist(), ro["has_eos"][:k].tolist()
            )
        ]
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard: the TEXT tab, one entry per logged rollout
            text = "\n\n---\n\n".join(
                f"**prompt:** {r['prompt']}\n\n**response:** {r['response']}\n\n"
                f"**score:** {r['score']:.3f} ({'ended' if r['ended'] else 'cut off'})"
                for r in rows
            )
            experiment.add_text("samples", text, global_step=self.rollouts_done)

    def _check_finite(self, step: str, **tensors: torch.Tensor) -> None:
        """Stop with a clear message (after saving a checkpoint) when a score, KL or loss is NaN or infinite."""
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        flag = self.trainer.strategy.reduce(torch.tensor(float(bool(bad)), device=self.device), reduce_op="sum")
        if flag.item() == 0:  # every rank takes the same branch
            return
        path = Path(self.trainer.default_root_dir) / f"nonfinite-rollout{self.rollouts_done}.ckpt"
        self.trainer.save_checkpoint(path)
        raise FloatingPointError(
            f"ppo: non-finite {', '.join(bad) or 'value on another rank'} at rollout {self.rollouts_done} "
            f"({step}, optimizer step {self.global_step}); checkpoint saved to {path}"
        )

    def run_progress(self) -> tuple[int, int, str]:
        """(rollouts done, ``total_rollouts``, unit) for the run's progress bar (``cai.progress``)."""
        return self.rollouts_done, self.cfg.total_rollouts, "rollout"

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo_state"] = {"kl_ctl": self.kl_ctl.state_dict(), "rollouts_done": self.rollouts_done}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state", {})
        if state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.rollouts_done = state["rollouts_done"]

    # ----------------------------------------------------------------------------------------- export
    def export_module(self) -> torch.nn.Module:
        """The policy (``HFModule.save_hf`` writes it), its LoRA adapters merged into plain weights."""
        if self.lora is not None:
            self.model.lm = self.model.lm.merge_and_unload()
        return self.model.lm


def cli_main(args: list[str] | None = None):
    """``cai ppo``: LightningCLI over ``PPOModule`` and ``PromptDataModule``."""
    return run_cli(PPOModule, PromptDataModule, args, "cai ppo")
