"""Norm patterns. Each proposes a NormSpec; fxslice verifies it numerically before use."""

from __future__ import annotations

import torch

from fxslice.graph import ops
from fxslice.registry import NormSpec, Region, register_norm_pattern

RSQRT = ops.aten.rsqrt.default
RMS_NORM = ops.aten.rms_norm.default
LAYER_NORM = tuple(ops.LAYER_NORMS)
POW = ops.aten.pow.Tensor_Scalar
MEANS = frozenset({ops.aten.mean.dim, ops.aten.mean.default})
SUM = ops.aten.sum.dim_IntList


def _eps_added_to_mean(region: Region, default: float = 1e-6) -> float:
    """The constant added to ``mean(x^2)`` (or ``sum(x^2)``) before the inverse root (the epsilon)."""
    for node in region.nodes_calling(ops.ADD):
        first, second = node.args[0], node.args[1]
        if isinstance(second, float) and ops.calls(first, MEANS | {SUM}):
            return second
    return default


def _inverse_root(region: Region) -> bool:
    """``rsqrt``, ``rms_norm`` or ``pow(·, -0.5)`` (Gemma 4 writes the root as a power)."""
    return region.uses(RSQRT, RMS_NORM) or any(n.args[1] == -0.5 for n in region.nodes_calling(POW))


def _sums_squares(region: Region) -> bool:
    """An L2 norm ``x / sqrt(sum(x^2) + eps)``: sums where an RMSNorm averages."""
    squares = region.nodes_calling(POW)
    return not region.uses(*MEANS) and any(n.args[0] in squares for n in region.nodes_calling(SUM))


def _single_vector_param(region: Region) -> torch.Tensor | None:
    vectors = [region.tensor(n) for n in region.params.values()]
    vectors = [v for v in vectors if v.dim() == 1 and v.shape[0] == region.width]
    return vectors[0] if len(vectors) == 1 else None


def _rms_eps(region: Region) -> float:
    if region.uses(RMS_NORM):
        eps = region.nodes_calling(RMS_NORM)[0].args[3:4]
        return float(eps[0]) if eps and eps[0] is not None else torch.finfo(region.dtype).eps
    return _eps_added_to_mean(region)


@register_norm_pattern("rms_norm")
def rms_norm(region: Region) -> NormSpec | None:
    """Llama-style RMSNorm: ``weight * x * rsqrt(mean(x^2) + eps)`` (weight optional); an L2 norm
    ``x / sqrt(sum(x^2) + eps)`` is the RMSNorm ``x / sqrt(mean(x^2) + eps/D)`` scaled by ``1/sqrt(D)``."""
    if not _inverse_root(region) or region.uses(*LAYER_NORM):
        return None
    weight = _single_vector_param(region)
    scale = weight.float() if weight is not None else torch.ones(region.width)
    if _sums_squares(region):
        return NormSpec(centered=False, scale=scale / region.width ** 0.5, eps=_rms_eps(region) / region.width)
    return NormSpec(centered=False, scale=scale, eps=_rms_eps(region))


@register_norm_pattern("offset_rms_norm")
def offset_rms_norm(region: Region) -> NormSpec | None:
    """Gemma-style RMSNorm whose scale is ``1 + weight``."""
    if not _inverse_root(region) or region.uses(*LAYER_NORM):
        return None
    weight = _single_vector_param(region)
    if weight is None:
        return None
    return NormSpec(centered=False, scale=1.0 + weight.float(), eps=_rms_eps(region))


@register_norm_pattern("centered_rms_norm")
def centered_rms_norm(region: Region) -> NormSpec | None:
    """A LayerNorm written out by hand (Cohere): ``weight * (x - mean) * rsqrt(var + eps) [+ bias]``."""
    if not _inverse_root(region) or not region.uses(ops.aten.sub.Tensor) or region.uses(*LAYER_NORM):
        return None
    weight = _single_vector_param(region)
    scale = weight.float() if weight is not None else torch.ones(region.width)
    bias = region.param("bias")
    return NormSpec(centered=True, scale=scale, shift=None if bias is None else bias.float(), eps=_eps_added_to_mean(region))


@register_norm_pattern("layer_norm")
def layer_norm(region: Region) -> NormSpec | None:
    """``aten.layer_norm(x, [D], weight, bias, eps)`` over the last dimension; weight/bias may be None
    or computed from parameters (LayerNorm1P passes ``weight + 1``)."""
    calls = [n for op in LAYER_NORM for n in region.nodes_calling(op)]
    if len(calls) != 1:
        return None
    node = calls[0]
    shape = node.args[1]
    if list(shape) != [region.width]:
        return None
    weight = region.tensor(node.args[2]) if len(node.args) > 2 else None
    bias = region.tensor(node.args[3]) if len(node.args) > 3 else None
    eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
    scale = weight.float() if weight is not None else torch.ones(region.width)
    return NormSpec(centered=True, scale=scale, shift=None if bias is None else bias.float(), eps=eps)
