"""Op tables, as ``torch.ops.aten`` overloads: ``node.target in RESHAPES``, never string compares."""

from __future__ import annotations

import torch
from torch.fx import Node

aten = torch.ops.aten

CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device, aten.type_as.default})
"""Dtype/device conversions: they keep the hidden dimension and every value's meaning."""
IDENTITIES = frozenset({aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
                        aten.lift_fresh_copy.default})
"""Copies and views that change nothing when the layout is kept."""
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
SIZED = RESHAPES | {aten.expand.default}
"""``op(x, shape)``: the shape argument carries the width of what it reshapes or broadcasts."""
MERGES = RESHAPES | {aten.flatten.using_ints}
"""Reshapes that may merge the copies of a stream (``[..., N, D]``) into one row (``[..., N·D]``)."""
MIXES = frozenset({aten.matmul.default, aten.bmm.default})
LEADING_INDEXING = frozenset({aten.slice.Tensor, aten.select.int})
UNIT_DIMS = frozenset({aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default})
"""Adding or removing size-1 dimensions (never the hidden one when the last dimension keeps its size)."""
ROW_GATHERS = frozenset({aten.repeat_interleave.self_int, aten.index_select.default})
"""``op(x, ..., dim)`` picking or repeating whole rows along a leading ``dim`` (token dispatch to experts)."""
ROW_SUMS = frozenset({aten.sum.dim_IntList, aten.mean.dim})
"""``op(x, dims, keepdim)``: sums over leading dims (the top-k experts of a token) keep the hidden dimension."""
SCALINGS = frozenset({aten.mul.Tensor, aten.div.Tensor})
AFFINE_STEPS = frozenset({aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor})
"""``x * k``, ``x / k``, ``x + k``, ``x - k`` (``k - x``, ``k * x``, ``k + x``): with a constant ``k`` per hidden
coordinate, a per-dimension affine map of ``x``."""
TRANSPOSES = frozenset({aten.numpy_T.default, aten.t.default, aten.permute.default, aten.transpose.int})
LAYER_NORMS = frozenset({aten.layer_norm.default, aten.native_layer_norm.default})
ADD = aten.add.Tensor
EMBEDDING = aten.embedding.default
NEUTRAL_CONSTANT = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1}
"""Ops that change nothing when their second argument is this number."""
SLICE = aten.slice.Tensor
DROPOUT = aten.dropout.default
SYM_SIZE = aten.sym_size.int
ZEROS_LIKE = frozenset({aten.zeros_like.default})
SCATTERS = frozenset({aten.index_put.default, aten.index_put_.default})
LIKE = frozenset({aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
                  aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default})
"""New tensors made from their input's shape, dtype or device, never from its values."""
ASSERT_METADATA = aten._assert_tensor_metadata.default


def functional_twin(node: Node):
    """``aten.mul.Tensor`` for a call of ``aten.mul_.Tensor`` (any in-place op with an out-of-place
    overload of the same name); None for anything else."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    schema = node.target._schema
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_") or not schema.arguments or not schema.arguments[0].is_write:
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


def private_tensor(node: Node) -> bool:
    """Whether an in-place update of ``node`` can be seen by nothing but its one user: ``node`` makes a
    new tensor, or is a view (``squeeze``, ``select``) of one that nothing else reads either."""
    while True:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return False
        returns = node.target._schema.returns
        if len(returns) != 1:
            return False
        if returns[0].alias_info is None:
            return True
        base = node.args[0] if node.args else None
        if not isinstance(base, Node) or len(base.users) != 1:  # the viewed tensor is read elsewhere
            return False
        node = base


def calls(node: object, ops) -> bool:
    """Whether ``node`` is a ``call_function`` of ``ops`` (one overload or a set of them)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    return node.target in ops if isinstance(ops, (frozenset, set, tuple)) else node.target is ops


def is_tensor_add(node: Node) -> bool:
    """``a + b`` of two graph values (a residual add candidate), not ``x + constant``."""
    return calls(node, ADD) and all(isinstance(a, Node) for a in node.args[:2])
