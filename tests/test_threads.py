"""The torch thread policy of the ``cai`` command (cai.threads)."""

import os

import pytest
import torch

from cai.threads import apply_thread_policy


@pytest.fixture
def env(monkeypatch):
    """A clean thread environment; torch's thread count is the process's, so it is restored afterwards."""
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "CAI_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(2)
    yield monkeypatch
    torch.set_num_threads(before)


def test_cpu_run_defaults_to_one_thread_and_children_inherit_it(env):
    assert apply_thread_policy(cuda=False) == 1
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_gpu_run_keeps_torchs_default(env):
    assert apply_thread_policy(cuda=True) == 2
    assert "OMP_NUM_THREADS" not in os.environ


def test_explicit_omp_num_threads_wins(env):
    env.setenv("OMP_NUM_THREADS", "2")
    assert apply_thread_policy(cuda=False) == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and "TOKENIZERS_PARALLELISM" not in os.environ


def test_cai_threads_wins_over_everything(env):
    env.setenv("OMP_NUM_THREADS", "1")
    env.setenv("CAI_THREADS", "3")
    assert apply_thread_policy(cuda=False) == 3 and torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"  # subprocesses get the same count
    env.setenv("CAI_THREADS", "1")
    assert apply_thread_policy(cuda=True) == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_cai_threads_is_refused(env, bad):
    env.setenv("CAI_THREADS", bad)
    with pytest.raises(ValueError, match="CAI_THREADS"):
        apply_thread_policy(cuda=False)
