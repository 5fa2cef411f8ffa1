"""Parity checks of ``scripts/bench_vs_trl.py``: this project's losses against TRL's on the same first batch."""

from __future__ import annotations

from bench_cai import cai_model_config
from bench_lib import setup_worker
from bench_trl import make_trl_rm, make_trl_sft


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

    from cai.pm import PreferenceModule
    from data.preference import PreferenceDataModule, join_pairs

    device = torch.device(spec["device"])
    dm = PreferenceDataModule(
        spec["data"]["rm_cai"], spec["data"]["rm_cai"], spec["model"], True, spec["seq_len"], batch_size=n
    )
    dm.setup("fit")
    ours = {k: v.to(device) for k, v in dm.collator()([dm.train_set[i] for i in range(n)]).items()}
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


PARITY = {"sft": parity_sft, "rm": parity_rm}


def run_parity(spec: dict) -> dict:
    """Parity of every stage in ``spec["parity_stages"]`` that has a check, in float32, on one batch each."""
    setup_worker(spec)
    n = min(spec["batch_size"], 8)
    return {stage: PARITY[stage](spec, n) for stage in spec["parity_stages"] if stage in PARITY}
