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
from typing import Callable, Optional

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

    path: str | os.PathLike  # resolved: a later chdir does not move it

    def build(self, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Fill]:
        """The checkpoint's model in ``dtype`` (its small tensors read from the checkpoint; ``device``
        is the CPU, where a streamed compression's result lives)."""
        checkpoint = Checkpoint.open(self.path)
        module, storage_keys = checkpoint.empty_model(dtype)
        return module, lambda gm: read_unmanaged(gm, checkpoint, storage_keys, dtype)

    def configs(self) -> tuple[object, Optional[object]]:
        """The checkpoint's model config and its generation config (None without one)."""
        config = copy.deepcopy(Checkpoint.open(self.path).config)
        try:
            from transformers import GenerationConfig
            return config, GenerationConfig.from_pretrained(self.path)
        except (OSError, ValueError):
            return config, None


@dataclass
class ModuleSkeleton:
    """A copy of an in-memory model without the weights the slice replaces (meta tensors)."""

    skeleton: nn.Module

    @classmethod
    def of(cls, model: nn.Module, canonical: GraphModule) -> "ModuleSkeleton":
        """The skeleton of ``model``, whose weights ``canonical`` (its capture, sharing its storage)
        holds in the Linear and Embedding modules the slice replaces. A parameter is left out when
        those modules' views of its storage (a transposed ``Conv1D`` weight, the halves of a fused
        expert matrix) hold at least as many elements as it has."""
        covered: dict[int, int] = {}  # storage address -> elements the managed views of it hold
        for name in managed_modules(canonical):
            module = canonical.get_submodule(name)
            # its weight and bias only: a Linear named after the module that called it holds that module's
            # other parameters too (a hyper-connection's ``base`` and ``scale`` beside its ``fn``)
            for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(param, torch.Tensor) and param.numel():
                    address = param.untyped_storage().data_ptr()
                    covered[address] = covered.get(address, 0) + param.numel()
        memo = {id(param): nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                for param in model.parameters()
                if param.numel() and covered.get(param.untyped_storage().data_ptr(), 0) >= param.numel()}
        return cls(copy.deepcopy(model, memo))

    def build(self, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Fill]:
        """A module to capture in ``dtype`` on ``device``: the skeleton's tensors moved there, and each
        left-out weight a zero broadcast from one element (its values are never used, its memory is one
        element: the capture's one-token shape check runs through it)."""
        module = copy.deepcopy(self.skeleton).to(dtype=dtype)  # meta tensors stay meta: nothing allocated
        zeros: dict[int, nn.Parameter] = {}  # one per left-out parameter: a head tied to the embedding stays tied
        for owner in module.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                if param.is_meta:
                    if id(param) not in zeros:
                        zero = torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)
                        zeros[id(param)] = nn.Parameter(zero, requires_grad=False)
                    setattr(owner, name, zeros[id(param)])
        return module.to(device=device), lambda gm: None

    def configs(self) -> tuple[object, Optional[object]]:
        """The model's config and generation config (None for a module that has none)."""
        config = getattr(self.skeleton, "config", None)
        if config is None:
            raise FxSliceError(f"{type(self.skeleton).__name__} has no Transformers config: no stock checkpoint "
                               "can be written for it")
        return copy.deepcopy(config), copy.deepcopy(getattr(self.skeleton, "generation_config", None))


@dataclass
class NoSource:
    """A model that could not be kept (its module does not copy): the slice cannot be replayed."""

    reason: str

    def build(self, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Fill]:
        raise FxSliceError(f"the model this slice was made from cannot be captured again ({self.reason}); "
                           "no KV-cache program can be built for it")

    def configs(self) -> tuple[object, Optional[object]]:
        raise FxSliceError(f"the model this slice was made from was not kept ({self.reason}); no stock "
                           "checkpoint can be written for it")


def keep_module(model: nn.Module, canonical: GraphModule) -> "ModelSource":
    """:meth:`ModuleSkeleton.of`, or a :class:`NoSource` saying why the model does not copy."""
    try:
        return ModuleSkeleton.of(model, canonical)
    except Exception as exc:  # noqa: BLE001 — whatever deepcopy raises for a module it cannot copy
        return NoSource(f"copying {type(model).__name__} failed: {type(exc).__name__}: {exc}")


ModelSource = CheckpointSource | ModuleSkeleton | NoSource
