"""Writing weights: float64 algebra in, fresh parameters in the layer's dtype out (never in place).

The caller's model shares storage with a freshly captured graph; replacing parameters instead of
writing into them is what keeps that model untouched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def f64(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to(torch.float64)


def _parameter(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(device=like.device, dtype=like.dtype), requires_grad=False)


def set_linear(linear: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``linear`` computes ``x weightᵀ + bias`` from now on (its shape follows ``weight``; an
    ``ExpertLinear``'s ``[E, out, in]`` weight is one such matrix per expert)."""
    like = linear.weight
    linear.weight = _parameter(weight, like)
    sync_features(linear)
    if bias is not None:
        linear.bias = _parameter(bias, like)


def sync_features(linear: nn.Module) -> None:
    """``in_features`` / ``out_features`` of a Linear (or ``ExpertLinear``) read off its weight ``[..., out, in]``."""
    linear.in_features, linear.out_features = linear.weight.shape[-1], linear.weight.shape[-2]


def set_embedding(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    embedding.weight = _parameter(weight, embedding.weight)
    embedding.embedding_dim = weight.shape[1]


def share_embedding(embedding: nn.Embedding, weight: nn.Parameter) -> None:
    """Make ``embedding`` read ``weight`` itself (a tied head's parameter), not a copy."""
    embedding.weight = weight
    embedding.embedding_dim = weight.shape[1]


def meta_parameter(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> nn.Parameter:
    """A placeholder of ``like``'s shape on the meta device: no memory, any use fails loudly."""
    return nn.Parameter(torch.empty(like.shape, dtype=dtype or like.dtype, device="meta"), requires_grad=False)


def new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and ``bias``) in the dtype and device of ``like``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = _parameter(weight, like)
    if bias is not None:
        linear.bias = _parameter(bias, like)
    return linear


def reads_an_embedding(gm: nn.Module, heads: list[str]) -> bool:
    """Whether a head Linear's weight is an embedding table's own parameter (a tied head)."""
    tables = {id(m.weight) for m in gm.modules() if isinstance(m, nn.Embedding)}
    return any(id(gm.get_submodule(name).weight) in tables for name in heads)


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in module.parameters())


def release_shared_storage(gm: nn.Module, model: nn.Module) -> None:
    """Give every parameter/buffer/tensor attribute of ``gm`` still sharing memory with ``model`` its
    own copy, so that the caller's model and the sliced graph never alias."""
    source = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    copies: dict[int, nn.Parameter] = {}  # one copy per parameter: tied weights stay tied
    for module in gm.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.numel() and param.data_ptr() in source:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
                setattr(module, name, copies[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.numel() and buffer.data_ptr() in source:
                module.register_buffer(name, buffer.clone())
    for name, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() in source:
            setattr(gm, name, value.clone())
