"""With hard labels, ``cai dpo``'s loss equals TRL 1.12.0's ``DPOTrainer`` on identical batches (to 1e-6).

TRL's own code path runs: its collator (``DataCollatorForPreference``) pads our tokenized rows (they are TRL's
tokenized preference rows), and ``DPOTrainer._compute_loss`` (on a stub trainer, as in
``tests/losses/test_loss_trl_parity.py``) runs the same policy network over whole texts. Our side reads each prompt
once through the KV cache and the reference log-probs from the data; TRL's computes them itself in the second test.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_dpo import synthetic_pairs

from cai.stages.dpo import DPOConfig, DPOModule, reference_logps
from data.dpo import DPOCollator, DPODataModule
from models import ModelConfig, load_model

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl", reason="TRL is not installed (the bench extra); parity with TRL cannot be checked")
try:
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
except ImportError as exc:  # another TRL version moved things around
    pytest.skip(
        f"TRL {trl.__version__} lacks what these tests were written against (1.12.0): {exc}", allow_module_level=True
    )

TOL = {"rtol": 1e-6, "atol": 1e-6}
BETA = 0.3


class StubAccelerator:
    """Single-process stand-in for ``accelerate.Accelerator`` (gathers are identities)."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def stub_trainer(model, ref_model=None) -> SimpleNamespace:
    """The attributes ``DPOTrainer._compute_loss`` reads from ``self``: plain sigmoid DPO, no extras."""
    return SimpleNamespace(
        model=model,
        ref_model=ref_model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=StubAccelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        beta=BETA,
        aux_loss_enabled=False,
        precompute_ref_logps=ref_model is None,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        use_weighting=False,
        label_smoothing=0.0,
    )


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tmp_path_factory):
    """A policy moved away from the reference, and 8 pairs with their cached reference log-probs."""
    path = synthetic_pairs(tmp_path_factory.mktemp("trl") / "pairs.jsonl", 8, 3, 0.1)
    dm = DPODataModule(train=path, val=path, tokenizer=str(tiny_model_dir), ref_cache="off")
    dm.setup("fit")
    reference = load_model(ModelConfig(str(tiny_model_dir))).eval()
    dm.add_reference_logps(lambda ds: reference_logps(reference, ds, dm.collator(), 3), {"test": "trl"})
    module = DPOModule(ModelConfig(str(tiny_model_dir)), dpo=DPOConfig(beta=BETA, labels="hard"))
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference: margins are not all 0
        for p in module.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    rows = [dm.train_set[i] for i in range(len(dm.train_set))]
    return module, reference, rows, dm.pad_token_id


@pytest.mark.parametrize("share_prompt", [False, True])
def test_hard_label_loss_metrics_and_gradients_equal_trl(setting, share_prompt):
    """Whole texts, as TRL runs them: equal to 1e-6. Each prompt once through the KV cache: the same sums of
    token log-probs in another order of float32 operations, which moves the loss by about 2e-6 (1e-5 allowed)."""
    module, _, rows, pad = setting
    module.share_prompt = share_prompt
    tol = TOL if not share_prompt else {"rtol": 1e-5, "atol": 1e-5}
    module.zero_grad()
    ours = module._step(DPOCollator(pad)(rows))
    ours["loss"].backward()
    our_grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}

    module.zero_grad()
    trainer = stub_trainer(module.model)
    theirs = DPOTrainer._compute_loss(trainer, module.model, DataCollatorForPreference(pad)(rows), False)
    theirs.backward()
    torch.testing.assert_close(ours["loss"], theirs, **tol)
    for n, p in module.model.named_parameters():
        torch.testing.assert_close(our_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    metrics = trainer._metrics["train"]
    for ours_name, trl_name in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),  # every label here favours chosen: the same accuracy
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ]:
        assert ours[ours_name].mean().item() == pytest.approx(metrics[trl_name][-1], rel=1e-5, abs=1e-5), ours_name
    assert 0 < ours["rewards/accuracy"].mean() < 1, "a test batch whose accuracy is neither 0 nor 1"


def test_cached_reference_logps_equal_trl_reference_pass(setting):
    """TRL running the reference model itself (no precomputed values) gives the loss of our cached values.

    Our cache is computed with each prompt once through the KV cache, TRL's pass runs whole texts: 1e-5 (see above).
    """
    module, reference, rows, pad = setting
    module.share_prompt = False
    with torch.no_grad():
        ours = module._step(DPOCollator(pad)(rows))["loss"]
        inputs = DataCollatorForPreference(pad)(
            [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows]
        )
        theirs = DPOTrainer._compute_loss(stub_trainer(module.model, reference), module.model, inputs, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
