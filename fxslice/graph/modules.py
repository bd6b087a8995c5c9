"""The parameter-free module fxslice puts into a rewritten graph (see :mod:`fxslice.graph.inserted` for the rest)."""

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

