"""Parity checks of ``scripts/bench_vs_trl.py``: this project's losses against TRL's on the same first batch."""

from __future__ import annotations

from bench_cai import cai_model_config
from bench_lib import setup_worker
from bench_trl import make_trl_dpo, make_trl_rm, make_trl_sft


def _compare_batches(ours: dict, theirs: dict, keys: tuple[str, ...]) -> str | None:
    """None when the batches hold the same tensors under ``keys``, else what differs."""
    for key in keys:
        a, b = ours[key].cpu(), theirs[key].cpu()
        if a.shape != b.shape or not bool((a.long() == b.long()).all()):
            return f"{key} differ (shapes {tuple(a.shape)} vs {tuple(b.shape)})"
    return None


def _first_batch(dm, n: int, device) -> dict:
    """The data module's collated batch of its first ``n`` training rows, tensors on ``device``."""
    import torch

    batch = dm.collator()([dm.train_set[i] for i in range(n)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _verdict(
    values: dict[str, float],
    diffs: dict[str, float],
    inputs_differ: str | None,
    tol: float,
    note: str = "",
    what: str = "identical token ids",
) -> dict:
    worst = max(diffs.values())
    return {
        "what": what,
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

    from cai.stages.sft import SFTModule
    from data.sft import SFTDataModule
    from losses import sft_loss

    device = torch.device(spec["device"])
    dm = SFTDataModule(spec["data"]["sft_cai"], spec["data"]["sft_cai"], spec["model"], spec["seq_len"], n)
    dm.setup("fit")
    ours = _first_batch(dm, n, device)
    trainer = make_trl_sft({**spec, "bf16": False})
    ds = trainer.train_dataset
    theirs = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))
    differ = _compare_batches(ours, theirs, ("input_ids", "labels", "attention_mask"))

    module = SFTModule(cai_model_config(spec))
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

    from cai.stages.pm import PreferenceModule
    from data.preference import PreferenceDataModule, join_pairs

    device = torch.device(spec["device"])
    dm = PreferenceDataModule(
        spec["data"]["rm_cai"], spec["data"]["rm_cai"], spec["model"], True, spec["seq_len"], batch_size=n
    )
    dm.setup("fit")
    ours = _first_batch(dm, n, device)
    trainer = make_trl_rm({**spec, "bf16": False})
    ds = trainer.train_dataset
    theirs = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))
    # Our batch holds each pair's shared prefix once; joined back into whole texts it must equal TRL's rows.
    ids, mask = join_pairs(ours, dm.pad_token_id)
    differ = _compare_batches({"input_ids": ids, "attention_mask": mask}, theirs, ("input_ids", "attention_mask"))

    module = PreferenceModule(cai_model_config(spec))
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
    note = (
        "the heads start from different random inits (TRL std 0.02, ours 1/sqrt(H+1)): ours copied for the check; "
        "ours runs each pair's shared prompt once (KV cache), so float rounding differs"
    )
    return _verdict(values, diffs, differ, spec["parity_tol"], note)


def parity_dpo(spec: dict, n: int) -> dict:
    """This project's DPO inputs, reference log-probabilities and loss against TRL's ``DPOTrainer`` on ``n`` pairs.

    Each system tokenizes its own file: the prompt, chosen and rejected ids of every row must be the same. TRL's
    precomputed reference log-probabilities (its concatenated forward pass over whole texts) are compared with
    ours (``cai.stages.dpo.reference_logps``: each prompt once, the responses after its KV cache), relative to
    their size (sums over a response's tokens), and the loss of one batch with them. Before training the policy is
    the reference, so both losses are log 2; the loss math itself is checked in ``tests/test_dpo_trl.py``.
    """
    import torch

    from cai.stages.dpo import DPOConfig, DPOModule, reference_logps
    from data.dpo import DPODataModule

    device = torch.device(spec["device"])
    path, seq = spec["data"]["dpo_cai"], spec["seq_len"]
    dm = DPODataModule(path, path, spec["model"], seq, seq - 1, batch_size=n, ref_cache="off")
    dm.setup("fit")
    trainer = make_trl_dpo({**spec, "bf16": False}, rows=n, precompute=True)
    ds = trainer.train_dataset
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    wrong = [f"{k} of row {i + 1}" for i in range(n) for k in keys if dm.train_set[i][k] != ds[i][k]]
    differ = f"{', '.join(wrong[:3])} differ" if wrong else None

    module = DPOModule(cai_model_config(spec), dpo=DPOConfig(beta=spec["dpo_beta"], labels="hard"))
    module.configure_model()
    module.to(device)
    trainer.model.train()
    ref = reference_logps(module.model, dm.train_set.select(range(n)), dm.collator(), n)
    rows = [{**dm.train_set[i], "ref_chosen_logps": c, "ref_rejected_logps": r} for i, (c, r) in enumerate(ref)]
    ours = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dm.collator()(rows).items()}
    theirs = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(n)]))
    with torch.no_grad():
        loss_ours = module._step(ours)["loss"]
        loss_trl = trainer.compute_loss(trainer.model, dict(theirs))
    ref_ours = torch.tensor(ours["ref_chosen_logps"] + ours["ref_rejected_logps"])  # Python floats (float_column)
    ref_trl = torch.cat([theirs["ref_chosen_logps"], theirs["ref_rejected_logps"]]).float().cpu()
    diffs = {
        "ref logps (relative)": float(((ref_ours - ref_trl).abs() / ref_trl.abs().clamp(min=1)).max()),
        "loss": abs(float(loss_ours) - float(loss_trl)),
    }
    values = {"loss_cai": float(loss_ours), "loss_trl": float(loss_trl), "ref_logp_chosen_row1": float(ref_trl[0])}
    note = "ours reads each prompt once (KV cache), so float rounding differs"
    return _verdict(values, diffs, differ, spec["parity_tol"], note)


def parity_ppo(spec: dict, n: int) -> dict:
    """This project's PPO math against TRL 1.12.0's ``PPOTrainer.train`` on identical rollouts, end to end.

    Inputs: 8 random rollouts in TRL's layout and of the run's shape (``ppo.batch_size`` responses of up to
    ``ppo.new_tokens`` tokens, right-padded to random lengths), with the run's KL coefficient and clip range, k1
    KL, gamma 1, lambda 0.95, no reward whitening. TRL's side is ``trl_ppo_reference`` (its lines transcribed; its
    ``masked_whiten``/``masked_mean`` called). Ours: ``losses.per_token_rewards`` -> ``gae`` -> ``masked_whiten`` ->
    ``policy_loss`` and ``value_loss``, given TRL's masks (TRL puts the score one slot past the response; here the
    score slot is part of the mask, see docs/losses.md). ``n`` is unused: the rollouts have the PPO batch size.
    """
    import torch
    from trl_ppo_reference import random_rollout, trl_losses, trl_rollout

    from losses import gae, masked_whiten, per_token_rewards, policy_loss, value_loss

    p = spec["ppo"]
    kl, clip = p["kl_coef"], p["clip"]
    diffs = dict.fromkeys(["rewards", "advantages", "returns", "policy loss", "value loss"], 0.0)
    for seed in range(8):
        x = random_rollout(seed, p["batch_size"], p["new_tokens"])
        roll = trl_rollout(
            x.logprobs, x.ref_logprobs, x.values, x.scores, x.sequence_lengths, kl, "k1", 1.0, 0.95, False
        )
        theirs = trl_losses(x.new_logprobs, x.vpred, roll, clip, clip)
        response, extended = ~roll.padding_mask, ~roll.padding_mask_p1  # response tokens; plus TRL's score slot
        rewards, _ = per_token_rewards(x.scores, roll.logprobs, roll.ref_logprobs, extended, kl, "k1")
        advantages, returns = gae(rewards, roll.values, extended, gamma=1.0, lam=0.95)
        advantages = masked_whiten(advantages, response)
        pg, _ = policy_loss(x.new_logprobs, roll.logprobs, advantages, response, clip_range=clip)
        vf, _ = value_loss(x.vpred, roll.values, returns, extended, clip_range=clip)
        pairs = [(rewards, roll.rewards), (advantages * response, roll.advantages), (returns, roll.returns)]
        pairs += [(pg, theirs.pg_loss), (vf, theirs.vf_loss)]
        for name, (ours, trl) in zip(diffs, pairs):
            diffs[name] = max(diffs[name], float(torch.as_tensor(ours - trl).abs().max()))
    values = {"policy_loss_cai": float(pg), "policy_loss_trl": float(theirs.pg_loss)}
    scored = (
        "ours scores the last response token, the stop token <|im_end|> included; TRL the token before it (its pad "
        "token is <|im_end|>, so it takes the stop token for padding)"
        if p.get("stop_eos")
        else "ours scores the last response token (TRL one slot later; the same token here: no stop token)"
    )
    note = (
        "on 8 random rollouts of the run's shape; differs by design: value model (ours a value head on the policy "
        f"by default, TRL a separate value model started from the PM), {scored}, ours clips gradients at 1.0 (TRL's "
        "PPO never clips)"
    )
    return _verdict(values, diffs, None, spec["parity_tol"], note, what="identical rollouts")


PARITY = {
    "sft": parity_sft,
    "rm": parity_rm,
    "dpo": parity_dpo,
    "dpo_precompute": parity_dpo,
    "ppo": parity_ppo,
    "ppo_critic": parity_ppo,
}


def run_parity(spec: dict) -> dict:
    """Parity of every stage in ``spec["parity_stages"]`` that has a check, in float32, on one batch each."""
    setup_worker(spec)
    n = min(spec["batch_size"], 8)
    done: dict = {}  # one check per function: stages that share one (dpo, dpo_precompute) share its result
    for stage in spec["parity_stages"]:
        if stage in PARITY and PARITY[stage] not in done:
            done[PARITY[stage]] = PARITY[stage](spec, n)
    return {stage: done[PARITY[stage]] for stage in spec["parity_stages"] if stage in PARITY}
