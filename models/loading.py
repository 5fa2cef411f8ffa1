"""The one loading path for policies, reference policies, feedback models and preference-model backbones.

Every stage names its models with a `ModelConfig`: a local directory (such as one made by ``cai tiny-model``) or a
hub id. Loading goes through ``AutoModelForCausalLM`` / ``AutoTokenizer`` so that any causal LM architecture that
transformers knows can be used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelConfig:
    """Where a model lives and how to load it."""

    name_or_path: str
    """Local directory written by ``save_pretrained`` (e.g. by ``cai tiny-model``) or a Hugging Face hub id."""
    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16, or ``auto`` for the dtype stored in the checkpoint.
    With Lightning's ``bf16-true`` precision the trainer casts the weights itself, so leave float32 there."""
    attn_implementation: str = "auto"
    """``auto`` picks ``flash_attention_2`` when flash-attn is installed and a GPU is present, else ``sdpa``;
    or name one explicitly (``sdpa``, ``eager``, ``flash_attention_2``)."""
    trust_remote_code: bool = False
    """Allow code from the checkpoint's repository to run. Off by default: only turn it on for code you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    tokenizer: str | None = None
    """Tokenizer location if it differs from ``name_or_path``."""


def resolve_attn_implementation(requested: str = "auto") -> str:
    """Return the attention implementation to use for ``requested``.

    ``auto`` gives ``flash_attention_2`` only when the flash-attn package is importable and CUDA is available;
    ``sdpa`` (PyTorch's scaled dot-product attention) everywhere else. Asking for flash attention explicitly where it
    cannot run is an error rather than a silent fallback.
    """
    flash_ok = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU "
            "(pip install -e '.[flash]'); use 'sdpa' or 'auto'"
        )
    return requested


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; any other value passes through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str) -> torch.dtype | str:
    """Map a dtype name from a config file to a ``torch.dtype`` (``auto`` passes through)."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(
    name_or_path: str,
    padding_side: Literal["left", "right"] = "left",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for batching.

    Generation needs left padding (new tokens are appended on the right of every row); training code asks for
    right padding. A tokenizer without a pad token gets its EOS token as pad, the usual choice for causal LMs.
    """
    tok = AutoTokenizer.from_pretrained(
        name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code, revision=revision
    )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(cfg: ModelConfig, auto_class=AutoModelForCausalLM, **kwargs) -> PreTrainedModel:
    """Load a causal LM (or another ``auto_class``) from ``cfg`` through ``auto_class.from_pretrained``.

    Dropout is switched off in the config: RLHF-style training compares log-probabilities of the same tokens under
    several passes, which dropout would make inconsistent (Ziegler et al. 2019 train without dropout too).

    Args:
        cfg: Where the model is and how to load it.
        auto_class: The transformers Auto class, e.g. ``AutoModelForSequenceClassification`` for a saved preference
            model.
        **kwargs: Passed on to ``from_pretrained`` (override anything above).
    """
    model = auto_class.from_pretrained(
        cfg.name_or_path,
        dtype=resolve_dtype(cfg.dtype),
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        **kwargs,
    )
    disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set the probability of every dropout layer to 0 (the module stays in whatever train/eval mode it is)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
