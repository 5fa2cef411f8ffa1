"""Networks over Hugging Face causal LMs: loading, tiny offline models, value and preference heads."""

from models.loading import (
    ModelConfig,
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_device,
)

__all__ = [
    "ModelConfig",
    "disable_dropout",
    "load_model",
    "load_tokenizer",
    "resolve_attn_implementation",
    "resolve_device",
]
