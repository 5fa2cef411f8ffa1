"""PPO's rollout does no work twice: the preference model reads the rollout's ids when it shares the policy's
tokenizer, and with a separate critic the policy's log-probabilities come from generation (``cai/stages/ppo.py``).

Each shortcut is checked against the path it replaces: the same token ids and scores as decoding and tokenizing
again, and the same log-probabilities as a fresh forward pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from test_ppo import ppo_args

from cai.stages.ppo import PPOConfig, PPOModule
from helpers import clean_env, scalars
from models import ModelConfig, load_tokenizer
from models.heads import PreferenceModel
from models.loading import same_tokenizer
from models.padding import pad_rows

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats.", "Hi"]
RESPONSES = [" Mix flour, water and yeast, then bake it.", " No.", " Hello there, how can I help"]


@pytest.fixture(scope="module")
def pm_dir(tiny_model_dir, tmp_path_factory):
    """A random preference model with the policy's tokenizer, saved as ``cai pm`` saves one."""
    out = tmp_path_factory.mktemp("pm")
    PreferenceModel.from_pretrained(ModelConfig(str(tiny_model_dir))).save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def built(module: PPOModule) -> PPOModule:
    """The module's networks loaded and a one-device CPU trainer attached, as ``fit`` would do before a step."""
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return module


def rollout_rows(module: PPOModule, ended: list[bool]):
    """A hand-made rollout of PROMPTS and RESPONSES: (q_ids, q_mask, resp, r_mask, has_eos).

    A response that ``ended`` gets the stop token (EOS) and then padding; the others run to the last column.
    """
    tok = module.tokenizer
    query = tok([module.format.prompt(p) for p in PROMPTS], add_special_tokens=False)["input_ids"]
    q_ids, q_mask = pad_rows(query, tok.pad_token_id, "left")
    answers = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * e for r, e in zip(RESPONSES, ended)]
    resp, r_mask = pad_rows(answers, tok.pad_token_id, "right")
    return q_ids, q_mask, resp, r_mask, torch.tensor(ended)


def test_preference_model_reads_the_rollout_ids_as_the_text_path_tokenizes_them(tiny_model_dir, pm_dir):
    module = built(PPOModule(ModelConfig(str(tiny_model_dir)), preference_model=ModelConfig(str(pm_dir))))
    assert module.pm_reads_ids  # the same tokenizer files in another folder
    q_ids, q_mask, resp, r_mask, has_eos = rollout_rows(module, ended=[True, True, False])
    ids, mask, positions = module._pm_inputs(q_ids, q_mask, resp, r_mask, has_eos)
    texts = module.decode(resp)
    assert texts == RESPONSES  # the stop token and padding are not text
    # Row by row, the real tokens are exactly what the text path tokenizes: prompt, response, end of turn.
    for row, (prompt, text) in enumerate(zip(PROMPTS, texts)):
        expected = module.pm_tokenizer(module.pm_format.text(prompt, text), add_special_tokens=False)["input_ids"]
        assert ids[row][mask[row].bool()].tolist() == expected
    # ... so the scores agree with decoding and tokenizing again (left vs right padding: float rounding only).
    with torch.no_grad():
        direct = module.frozen["pm"](ids, mask, positions)
        text_path = module.score(PROMPTS, texts)
    torch.testing.assert_close(direct, text_path, atol=1e-5, rtol=0)


def test_another_tokenizer_is_scored_through_text(tiny_model_dir, pm_dir, tmp_path):
    other = tmp_path / "pm_other"
    shutil.copytree(pm_dir, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<extra>"])  # one more id: the same text may map to other ids
    tok.save_pretrained(other)
    assert same_tokenizer(load_tokenizer(str(pm_dir)), load_tokenizer(str(pm_dir), padding_side="left"))
    assert not same_tokenizer(load_tokenizer(str(pm_dir)), tok)
    module = built(PPOModule(ModelConfig(str(tiny_model_dir)), preference_model=ModelConfig(str(other))))
    assert not module.pm_reads_ids
    assert module._pm_inputs(*rollout_rows(module, ended=[True, False, False])) is None  # -> score(decoded text)


def test_critic_rollout_takes_logprobs_from_generation(tiny_model_dir, pm_dir):
    module = built(
        PPOModule(
            ModelConfig(str(tiny_model_dir)),
            reward_function="cai.method.rewards:letter_share",
            critic=ModelConfig(str(pm_dir)),
            ppo=PPOConfig(max_new_tokens=12),
        )
    )
    calls = []
    module.model.lm.register_forward_hook(lambda *args: calls.append(1))
    out = {}
    for reuse in (True, False):
        module.cfg.logprobs_from_generation = reuse
        calls.clear()
        torch.manual_seed(0)
        out[reuse] = module.rollout(PROMPTS)
        out[reuse]["policy_calls"] = len(calls)
    steps = out[True]["r_mask"].shape[1]  # generate runs the policy once per new token
    assert out[True]["policy_calls"] == steps and out[False]["policy_calls"] == steps + 1
    assert torch.equal(out[True]["ids"], out[False]["ids"])  # the same samples
    real = out[True]["r_mask"].bool()
    # The same log-probabilities as the forward pass (the KV cache adds in another order) and the same values.
    torch.testing.assert_close(out[True]["logp"][real], out[False]["logp"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True]["values"], out[False]["values"], atol=1e-6, rtol=0)
    # On the first rollout the policy is the reference: the KL is float rounding, not a penalty.
    assert (out[True]["logp"] - out[True]["ref_logp"])[real].abs().max() < 1e-5


@pytest.mark.slow
def test_critic_rollout_under_fsdp2_two_cpu_processes(tiny_model_dir, pm_dir, tmp_path):
    # The critic alone runs in the rollout (PolicyWithValue.values): FSDP2 must gather the root's parameters (the
    # critic's value head) for that entry point as it does for forward.
    args = ppo_args(tiny_model_dir, tmp_path, 2, "--model.critic.name_or_path", str(pm_dir), reward=None)
    args += ["--model.preference_model.name_or_path", str(pm_dir), "--config", "configs/strategies/fsdp2_cpu.yaml"]
    res = subprocess.run(
        [sys.executable, "-m", "cai.cli", "ppo", *args], env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    values = scalars(tmp_path, "loss/value")
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
