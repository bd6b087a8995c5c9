"""The programs of a saved folder: exporting them (dynamic shapes, logits only) and loading them back.

``model.pt2`` is ``input_ids -> logits`` with dynamic batch and length; ``generate.pt2`` is the
KV-cache program ``(input_ids [B, T], cache_position [T]) -> logits`` with dynamic ``T``. Both are
saved without their weights (:mod:`fxslice.runtime.weightfiles` stores those once).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule, Node

from ..errors import FxSliceError
from ..hf import causal_lm_output, logits
from .folder import GENERATOR, PROGRAM, RECORD
from .weightfiles import fill_weights, sha256


class _LogitsOnly(nn.Module):
    """``model(input_ids)``'s logits tensor, for a model that is not a GraphModule."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return logits(self.model(input_ids))


def logits_module(model: nn.Module) -> nn.Module:
    """``input_ids -> logits tensor``. A GraphModule gets a graph copy returning the logits node (its
    parameter names, which the saved program keeps, stay the sliced graph's own); any other model a
    wrapper (names then start with ``model.``)."""
    if not isinstance(model, GraphModule):
        return _LogitsOnly(model)
    graph = copy.deepcopy(model.graph)
    output = next(node for node in graph.nodes if node.op == "output")
    returned = output.args[0]
    if isinstance(returned, Node) and returned.op == "call_function" and returned.target is causal_lm_output:
        output.args = (returned.args[0],)
        graph.erase_node(returned)
    return GraphModule(model, graph, class_name=type(model).__name__)


def export_program(model: nn.Module, vocab_size: int) -> torch.export.ExportedProgram:
    """Re-export ``model`` (a sliced GraphModule or any ``input_ids -> logits`` module) with dynamic shapes."""
    device = next(model.parameters()).device
    example = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return torch.export.export(logits_module(model).eval(), (example,),
                                   dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)


def export_generator(program: nn.Module) -> torch.export.ExportedProgram:
    """Re-export a KV-cache program ``(input_ids [B, T], cache_position [T]) -> logits`` with dynamic T
    (``program.cache_batch_size`` and ``program.max_cache_len`` give its static cache's shape)."""
    batch, max_cache_len = program.cache_batch_size, program.max_cache_len
    device = next(program.parameters()).device
    length = Dim("length", min=1, max=max_cache_len)
    example = torch.zeros(batch, 4, dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.export.export(program, (example, torch.arange(4, device=device)),
                                   dynamic_shapes=({1: length}, {0: length}), strict=False)


def program_file(folder: Path) -> Path:
    """The folder's ``model.pt2``; an error where it has none."""
    path = folder / PROGRAM
    if not path.is_file():
        raise FxSliceError(f"{folder} has no {PROGRAM}")
    return path


def load_program(path: Path, checksum: Optional[str], weights: dict, tensors: dict) -> nn.Module:
    """The saved program at ``path`` (checked against ``checksum``) as a module, its state taken from
    ``tensors`` (stored key -> tensor) through the record's ``weights`` index."""
    if sha256(path) != checksum:
        raise FxSliceError(f"{path} does not match the checksum in {RECORD}: the file is corrupted or was replaced")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise FxSliceError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    fill_weights(program, weights["programs"].get(path.name), tensors, path)
    return program.module()


def set_cache_shape(generator: nn.Module, record: dict) -> None:
    """Give a loaded KV-cache program the cache shape the record holds (``max_cache_len``, ``cache_batch_size``)
    and the vocabulary its token ids must lie in."""
    cache = record.get("generator") or {}
    generator.max_cache_len, generator.cache_batch_size = cache.get("max_cache_len"), cache.get("batch_size", 1)
    generator.vocab_size = record.get("vocab_size")


def load_programs(folder: Path, record: dict, tensors: dict) -> tuple[nn.Module, Optional[nn.Module]]:
    """The folder's exported programs with their weights: the logits program, and the KV-cache program
    with its cache shape (None when the folder has no ``generate.pt2``)."""
    program = load_program(program_file(folder), record.get("program_sha256"), record["weights"], tensors)
    if not (folder / GENERATOR).is_file():
        return program, None
    checksum = (record.get("generator") or {}).get("program_sha256")
    generator = load_program(folder / GENERATOR, checksum, record["weights"], tensors)
    set_cache_shape(generator, record)
    return program, generator
