"""The modules pass 2 makes of what the model wrote as functions, and the parameter-free norm fxslice puts
into a rewritten graph (see :mod:`fxslice.graph.inserted` for the rest)."""

from __future__ import annotations

import torch
from torch import nn


class StreamNorm(nn.Module):
    """Weightless normalisation of the residual stream.

    ``center=False`` (every norm that reads a rotated position): RMSNorm that keeps dividing by the
    *original* width ``full_width`` after slicing, ``y = x / sqrt(sum(x^2) / D + eps)``. Because the
    rotation is orthogonal and the deleted coordinates carry (almost) nothing, this equals the
    original norm's normalisation (SliceGPT, Eq. 2).
    ``center=True`` is only used on full-width, unrotated inputs (writer-side LayerNorms): plain
    LayerNorm without affine parameters.
    Computed in float32 at least, like Hugging Face norms, and cast back to the input dtype.
    """

    def __init__(self, full_width: int, eps: float, center: bool = False):
        super().__init__()
        self.full_width = int(full_width)
        self.eps = float(eps)
        self.center = bool(center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upcast = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.center:
            y = torch.nn.functional.layer_norm(upcast, (upcast.shape[-1],), eps=self.eps)
        else:
            mean_square = upcast.pow(2).sum(-1, keepdim=True) / self.full_width
            y = upcast * torch.rsqrt(mean_square + self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, eps={self.eps}, center={self.center}"



class ExpertLinear(nn.Module):
    """The linear layers of a mixture-of-experts block, stored as one grouped weight.

    ``weight`` is ``[E, out, in]`` (``bias`` ``[E, out]``); row ``s`` of the input is multiplied by the
    weight of expert ``expert_ids[s]``: ``y_s = W[e_s] x_s + b[e_s]``. For the stream algebra this is a
    Linear like any other — a reader rotates ``W ← W Q`` along ``in``, a writer ``W ← Qᵀ W`` along
    ``out`` — for every expert at once (the products broadcast over ``E``).

    Eager calls run expert by expert over the rows routed to it (no weight copies); under
    ``torch.export`` the gathered-weight form ``bmm(W[e], x)`` is traced instead, which has no
    data-dependent shapes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = int(weight.shape[1]), int(weight.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or x.device.type == "meta":
            out = torch.bmm(weight[expert_ids], x.unsqueeze(-1)).squeeze(-1)
            return out if bias is None else out + bias[expert_ids]
        out = x.new_empty(*x.shape[:-1], weight.shape[1])
        for expert in torch.unique(expert_ids).tolist():
            rows = (expert_ids == expert).nonzero().squeeze(-1)
            out[rows] = nn.functional.linear(x[rows], weight[expert], None if bias is None else bias[expert])
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


class BatchedExpertLinear(ExpertLinear):
    """The experts of a mixture that sends every token to every expert (Llama 4): the input is
    ``[E, T, in]``, one batch per expert, and ``y_e = x_e W_eᵀ + b_e``; the weight is the same grouped
    ``[E, out, in]`` as :class:`ExpertLinear`'s, rotated the same way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias[:, None, :]


class UpcastLinear(nn.Linear):
    """A Linear whose weight (and bias) are stored in the model's dtype and cast to ``compute_dtype`` where
    they are used: ``F.linear(x, W.to(float32))``, as mixture-of-experts routers of bf16 models compute
    their logits. For the stream algebra it is a Linear like any other (rotations edit the stored weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return nn.functional.linear(x, self.weight.to(self.compute_dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"


LINEARS = (nn.Linear, ExpertLinear)
"""Modules whose weight maps the last dimension of their input: ``W[..., out, in]``."""
WEIGHTED = LINEARS + (nn.Embedding,)
"""Every module kind whose weights the passes edit."""
