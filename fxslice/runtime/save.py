"""Saving a sliced graph as a folder (:mod:`fxslice.runtime.folder`): its programs exported without
their weights, the weights stored once, the tokenizer and ``fxslice.json``, swapped into place in one step.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import FxSliceError, whole
from ..hf import vocab_size_of
from ..options import SAVE_FORMATS
from ..version import __version__
from .folder import (FORMAT, FORMAT_VERSION, GENERATOR, PROGRAM, check_destination, move_into_place,
                     share_files, staging_folder, write_record)
from .generate import kv_cache_bytes_per_token, with_cache
from ..graph.quantized import model_dtype
from .programs import export_generator, export_program
from .stock import save_transformers
from .weightfiles import sha256, write_weights


def _check_save_inputs(model, tokenizer, record, generator, max_cache_len, cache_batch_size) -> None:
    """Refuse arguments :func:`save` cannot use, before anything is exported."""
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise FxSliceError(f"save: model must be a torch.nn.Module with parameters (a sliced GraphModule), "
                           f"got {type(model).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise FxSliceError(f"save: tokenizer must be a Hugging Face tokenizer (with save_pretrained) or None, "
                           f"got {type(tokenizer).__name__}")
    if record is not None and not isinstance(record, dict):
        raise FxSliceError(f"save: record must be a dict or None, got {type(record).__name__}")
    is_cache_program = isinstance(generator, nn.Module) and hasattr(generator, "max_cache_len") \
        and hasattr(generator, "cache_batch_size")
    if generator is not None and not is_cache_program:
        raise FxSliceError("save: generator must be a KV-cache program from fxslice.runtime.generate.with_cache")
    for name, value, least in (("max_cache_len", max_cache_len, 0), ("cache_batch_size", cache_batch_size, 1)):
        if not whole(value) or value < least:
            raise FxSliceError(f"save: {name} must be an integer >= {least}, got {value!r}")


def _cache_program(model: nn.Module, max_cache_len: int, cache_batch_size: int) -> Optional[nn.Module]:
    """The KV-cache program of a graph ``fxslice.compress`` returned (it keeps its slice and how to capture
    its model again), sharing its weights; None for any other model or when ``max_cache_len`` is 0. A
    model that cannot be captured with a static cache is saved without one, with a warning that says why."""
    result = getattr(model, "fxslice", None)
    if max_cache_len == 0 or getattr(result, "slice", None) is None or getattr(result, "source", None) is None:
        return None
    try:
        return with_cache(model, batch_size=cache_batch_size, max_cache_len=max_cache_len, share_weights=True)
    except FxSliceError as exc:
        warnings.warn(f"fxslice.save: no generate.pt2 (the folder runs, but does not generate with a KV "
                      f"cache): {exc}", stacklevel=3)
        return None


def _full_record(record: dict, model: nn.Module, vocab: int, staging: Path, weights: dict,
                 generator: Optional[nn.Module]) -> dict:
    """``record`` with the keys fxslice reserves (they win over a copied record, e.g. a fine-tuned folder's)."""
    full = {
        **record,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxslice_version": __version__,
        "torch_version": torch.__version__,
        "vocab_size": vocab,
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "program_sha256": sha256(staging / PROGRAM),
        "weights": weights,
    }
    full.pop("generator", None)
    full.pop("compiled", None)  # packages belong to the programs they were compiled from
    if generator is not None:
        full["generator"] = {"max_cache_len": generator.max_cache_len, "batch_size": generator.cache_batch_size,
                             "kv_cache_bytes_per_token": kv_cache_bytes_per_token(generator),
                             "program_sha256": sha256(staging / GENERATOR)}
    return full


def save(model: nn.Module, folder: str | os.PathLike, tokenizer=None, record: Optional[dict] = None,
         overwrite: bool = False, generator: Optional[nn.Module] = None, *, max_cache_len: int = 1024,
         cache_batch_size: int = 1, format: str = "fxslice") -> Path:
    """Export ``model`` and its KV-cache program and write the folder atomically.

    ``format="transformers"`` writes a stock Transformers checkpoint instead (a slice made with
    ``compress(..., stock=True)``; :func:`fxslice.runtime.stock.save_transformers`): no programs,
    ``from_pretrained`` loads it without fxslice.

    The KV-cache program (``generate.pt2``) of a graph returned by :func:`fxslice.compress` is built
    here, for ``cache_batch_size`` sequences of at most ``max_cache_len`` tokens (0: none), from what
    ``compress`` kept; ``generator`` gives one built elsewhere instead (e.g. retargeted to fine-tuned
    weights). ``fxslice.json`` holds the model's :class:`~fxslice.result.SliceResult` record (when it
    has one), updated by ``record``. With ``overwrite`` only an empty folder or one fxslice saved is
    replaced; a save that fails or is killed leaves the previous folder as it was."""
    _check_save_inputs(model, tokenizer, record, generator, max_cache_len, cache_batch_size)
    if format not in SAVE_FORMATS:
        raise FxSliceError(f"save: format must be one of {SAVE_FORMATS}, got {format!r}")
    if format == "transformers":
        if generator is not None:
            raise FxSliceError("save: a transformers checkpoint has no KV-cache program (generator applies to "
                               "format='fxslice'); transformers generates with its own cache")
        return save_transformers(model, folder, tokenizer, record, overwrite)
    target = Path(folder)
    check_destination(target, overwrite)
    if generator is None:
        generator = _cache_program(model, max_cache_len, cache_batch_size)
    result = getattr(model, "fxslice", None)
    record = {**(result.to_record() if result is not None else {}), **(record or {})}
    vocab = int(record["vocab_size"]) if record.get("vocab_size") else vocab_size_of(model)
    programs = {PROGRAM: export_program(model, vocab)}
    if generator is not None:
        programs[GENERATOR] = export_generator(generator)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        weights = write_weights(staging, programs, offload_files=getattr(model, "fxslice_offload_files", None))
        for name, program in programs.items():
            torch.export.save(program, staging / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_record(staging, _full_record(record, model, vocab, staging, weights, generator))
        share_files(staging)
        check_destination(target, overwrite)  # nothing else appeared there meanwhile
        move_into_place(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
