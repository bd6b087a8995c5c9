"""What ``compress`` keeps of the model it sliced, so that the model can be captured again later.

A second capture (the KV-cache program that ``fxslice.save`` writes as ``generate.pt2``) needs the
model's code and every tensor that the slice does not replace — norm scales inside attention,
rotary tables, other small parameters and buffers — but none of the Linear and Embedding weights:
those come from the sliced graph. So the source keeps:

- for a checkpoint, its path and dtype (the small tensors are read from it again);
- for a model in memory, a *skeleton*: a copy of the module whose weights that the canonical graph
  holds in Linear/Embedding modules are meta tensors (no memory), everything else copied. The
  caller's model is not kept alive.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule

from .checkpoint import Checkpoint, read_unmanaged
from .errors import FxSliceError
from .graph.store import managed_modules

Fill = Callable[[GraphModule], None]
"""Gives a canonical capture of the rebuilt model the values of its tensors that the slice does not replace."""


@dataclass
class CheckpointSource:
    """A checkpoint folder, captured again with unallocated weights."""

    path: str | os.PathLike
    dtype: torch.dtype

    def build(self) -> tuple[nn.Module, Fill]:
        checkpoint = Checkpoint.open(self.path)
        module, storage_keys = checkpoint.empty_model(self.dtype)
        return module, lambda gm: read_unmanaged(gm, checkpoint, storage_keys, self.dtype)


@dataclass
class ModuleSkeleton:
    """A copy of an in-memory model without the weights the slice replaces (meta tensors)."""

    skeleton: nn.Module
    device: torch.device

    @classmethod
    def of(cls, model: nn.Module, canonical: GraphModule, device: torch.device) -> "ModuleSkeleton":
        """The skeleton of ``model``, whose weights ``canonical`` (its capture, sharing its storage)
        holds in the Linear and Embedding modules the slice replaces."""
        managed = {param.untyped_storage().data_ptr() for name in managed_modules(canonical)
                   for param in canonical.get_submodule(name).parameters(recurse=False) if param.numel()}
        memo = {id(param): nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                for param in model.parameters() if param.numel() and param.untyped_storage().data_ptr() in managed}
        return cls(copy.deepcopy(model, memo), torch.empty(0, device=device).device)

    def build(self) -> tuple[nn.Module, Fill]:
        """A module to capture: the skeleton with uninitialised (never read) memory for its meta weights."""
        memo = {id(param): nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=self.device),
                                        requires_grad=False)
                for param in self.skeleton.parameters() if param.is_meta}
        return copy.deepcopy(self.skeleton, memo), lambda gm: None


@dataclass
class NoSource:
    """A model that could not be kept (its module does not copy): the slice cannot be replayed."""

    reason: str

    def build(self) -> tuple[nn.Module, Fill]:
        raise FxSliceError(f"the model this slice was made from cannot be captured again ({self.reason}); "
                           "no KV-cache program can be built for it")


def keep_module(model: nn.Module, canonical: GraphModule, device: torch.device) -> "ModelSource":
    """:meth:`ModuleSkeleton.of`, or a :class:`NoSource` saying why the model does not copy."""
    try:
        return ModuleSkeleton.of(model, canonical, device)
    except Exception as exc:  # noqa: BLE001 — whatever deepcopy raises for a module it cannot copy
        return NoSource(f"copying {type(model).__name__} failed: {type(exc).__name__}: {exc}")


ModelSource = CheckpointSource | ModuleSkeleton | NoSource
