"""Networks over Hugging Face causal LMs: loading, GGUF import, tiny offline models, value and preference heads."""

from models.gguf import import_model
from models.loading import (
    ModelConfig,
    ModelSource,
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_device,
    resolve_model_source,
)

__all__ = [
    "ModelConfig",
    "ModelSource",
    "disable_dropout",
    "import_model",
    "load_model",
    "load_tokenizer",
    "resolve_attn_implementation",
    "resolve_device",
    "resolve_model_source",
]
