"""The weight-only quantised Linears pass 8 (:mod:`fxslice.passes.p8_quantize`) puts in place of ``nn.Linear``.

Each holds what torchao chose for its weight (the integer values and their scales) and computes
``y = x Ŵᵀ + b`` with ATen's CPU weight-only kernel, never materialising ``Ŵ`` in floating point:

================================  =====================================  ==============================================
module                            stored                                 kernel
================================  =====================================  ==============================================
:class:`Int8WeightOnlyLinear`     ``qdata`` int8 ``[N, K]``,             ``aten._weight_int8pack_mm(x, qdata, scale)``
                                  ``scale`` ``[N]`` (one per row)        ``= x qdataᵀ diag(scale)``
:class:`Int4WeightOnlyLinear`     ``qdata`` uint8 ``[N, K/2]`` (tinygemm ``aten._weight_int4pack_mm_for_cpu``: groups of
                                  layout), ``scale_and_zero``            ``group_size`` inputs, ``Ŵ = (q - 8) s + z``
                                  ``[K/g, N, 2]``
================================  =====================================  ==============================================

:class:`HalfWeightLinear` (``weight`` in bfloat16, ``F.linear`` in bfloat16) holds, in a float32 model,
the modules pass 8 keeps off the integer grid.

An input width the kernel cannot take (int8: a multiple of 16; int4: of the group size) is padded:
the weight gets zero columns, the activations zeros, ``x Ŵᵀ`` is unchanged.
Both kernels take ``compute_dtype`` activations (bfloat16 for a float32 or bfloat16 model: their
float32 paths are reference loops, 3-30x slower than a float32 matmul on this CPU); the result is
cast back to the input's dtype, the bias added in it. Every tensor is a frozen parameter, so a
saved folder stores them once like any other weight, and an exported program holds two ATen calls
per Linear and no torchao code.
"""

from __future__ import annotations

import torch
from torch import nn


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _fresh(integers: torch.Tensor) -> torch.Tensor:
    """A new contiguous copy: the kernels need their integers at an aligned address, which a view may not have."""
    return integers.detach().clone(memory_format=torch.contiguous_format)


class _WeightOnlyLinear(nn.Module):
    """What both quantised Linears share: shapes, bias, the cast around the kernel."""

    def __init__(self, in_features: int, padded_features: int, out_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.padded_features = int(padded_features)  # the kernel's input width: zero columns appended
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else _frozen(bias.detach())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:  # [M, padded_features] compute_dtype -> [M, N]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # the kernels need rows in order
        if self.padded_features > self.in_features:
            rows = nn.functional.pad(rows, (0, self.padded_features - self.in_features))
        y = self.kernel(rows).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        padded = f" (padded to {self.padded_features})" if self.padded_features > self.in_features else ""
        return (f"in_features={self.in_features}{padded}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """``y = (x qdataᵀ) · scale + b``: int8 weights, one scale per output row."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 in_features: int | None = None):
        super().__init__(in_features or qdata.shape[1], qdata.shape[1], qdata.shape[0], bias, compute_dtype)
        self.qdata = _frozen(_fresh(qdata))
        self.scale = _frozen(scale.reshape(-1).to(compute_dtype).contiguous())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qdata, self.scale)


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """``y = x Ŵᵀ + b`` with ``Ŵ`` int4 in groups of ``group_size`` inputs (scale and zero point per group)."""

    def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, in_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype, padded_features: int | None = None):
        super().__init__(in_features, padded_features or in_features, qdata.shape[0], bias, compute_dtype)
        self.group_size = int(group_size)
        self.qdata = _frozen(_fresh(qdata))
        self.scale_and_zero = _frozen(scale_and_zero.to(compute_dtype).contiguous())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qdata, self.group_size, self.scale_and_zero)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class HalfWeightLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored in ``compute_dtype`` (bfloat16) and computed in it, the result cast
    back: what a float32 model's modules that stay off the integer grid hold (see pass 8)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        self.weight = _frozen(weight.detach().to(compute_dtype).contiguous())
        self.bias = None if bias is None else _frozen(bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(self.compute_dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}")


QUANTIZED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, HalfWeightLinear)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s floating-point weights: its quantised modules' integers and scales aside."""
    quantized = {id(p) for m in model.modules() if isinstance(m, QUANTIZED_LINEARS) for p in m.parameters(recurse=False)}
    quantized -= {id(m.bias) for m in model.modules() if isinstance(m, QUANTIZED_LINEARS) and m.bias is not None}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized),
                torch.float32)


