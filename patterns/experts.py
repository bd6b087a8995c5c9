"""Mixture-of-experts patterns: grouped expert weights ``[E, out, in]`` applied row by row.

transformers' experts modules (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE,
GraniteMoE, PhiMoE, DeepSeek-V2/V3, GPT-OSS, …) are captured in their ``batched_mm`` form
(:func:`fxslice.hf.exportable` selects it), where every (token, expert) row gathers its expert's
weight and multiplies it:

    y = squeeze(bmm(W[ids], unsqueeze(x, -1)), -1)  [+ b[ids]]      W: [E, out, in]
    y = squeeze(bmm(unsqueeze(x, 1), W[ids]), 1)    [+ b[ids]]      W: [E, in, out] (transposed)

Each becomes one :class:`~fxslice.graph.modules.ExpertLinear` reading ``(x, ids)``, so that the
passes see the experts' up/gate weights as readers of the stream and their down weights as writers.
The routing around them (``repeat_interleave`` of the tokens, the per-row routing weights, the
sum over the top-k) only gathers, scales and sums rows: the analysis walks through it.

Experts that see every token (Llama 4: the tokens ``repeat``-ed once per expert, scaled by their
routing weight, viewed ``[E, T, in]``) are a plain batched product with the 3-D parameter,

    y = bmm(x, W)                                                   x: [E, T, in], W: [E, in, out]

which becomes a :class:`~fxslice.graph.modules.BatchedExpertLinear` (the sum over experts after it
is a sum over a leading dimension).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxslice.graph import ops
from fxslice.graph.nodes import example_value, parameter_of
from fxslice.registry import LinearMatch, register_linear_pattern

aten = ops.aten


def _gathered_weight(gm: GraphModule, node: object):
    """``(W, ids, index node)`` for ``W[ids]`` with ``W`` a 3-D parameter, else None."""
    if not ops.calls(node, aten.index.Tensor) or len(node.args[1]) != 1:
        return None
    weight, ids = parameter_of(gm, node.args[0]), node.args[1][0]
    if weight is None or weight.dim() != 3 or not isinstance(ids, Node):
        return None
    return weight, ids, node


def _unsqueezed(node: object, dims: tuple[int, ...]):
    """``x`` for ``unsqueeze(x, d)`` with ``d`` in ``dims``, else None."""
    if ops.calls(node, aten.unsqueeze.default) and node.args[1] in dims:
        return node.args[0]
    return None


def _single_user(node: Node, op, dims: tuple[int, ...]):
    """The one user of ``node`` when it is ``op(node, d)`` with ``d`` in ``dims``."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if ops.calls(user, op) and user.args[0] is node and user.args[1] in dims else None


@register_linear_pattern("expert_bmm")
def expert_bmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``bmm`` of gathered expert weights with one input row each (either operand order)."""
    if not ops.calls(node, aten.bmm.default):
        return None
    left, right = node.args[0], node.args[1]
    gathered, x = _gathered_weight(gm, left), _unsqueezed(right, (-1, 2))
    transposed = gathered is None
    if transposed:
        gathered, x = _gathered_weight(gm, right), _unsqueezed(left, (1, -2))
    if gathered is None or x is None:
        return None
    weight, ids, index = gathered
    squeeze = _single_user(node, aten.squeeze.dim, (1, -2) if transposed else (-1, 2))
    value = example_value(x)
    if squeeze is None or value is None or value.dim() != 2:
        return None
    weight = weight.transpose(1, 2) if transposed else weight
    unsqueeze = right if not transposed else left
    nodes = [n for n in (index, unsqueeze) if len(n.users) == 1] + [node, squeeze]
    output, bias = squeeze, None
    if len(squeeze.users) == 1:
        add = next(iter(squeeze.users))
        gathered_bias = add.args[1] if ops.calls(add, ops.ADD) and add.args[0] is squeeze else None
        if ops.calls(gathered_bias, aten.index.Tensor) and list(gathered_bias.args[1]) == [ids]:
            candidate = parameter_of(gm, gathered_bias.args[0])
            if candidate is not None and candidate.shape == weight.shape[:2]:
                bias, output = candidate, add
                nodes += ([gathered_bias] if len(gathered_bias.users) == 1 else []) + [add]
    return LinearMatch(nodes, x, output, weight, bias, str(index.args[0].target), expert_ids=ids)


@register_linear_pattern("batched_experts_bmm")
def batched_experts_bmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``bmm(x [E, T, in], W [E, in, out])`` with ``W`` a 3-D parameter: every expert's rows at once."""
    if not ops.calls(node, aten.bmm.default):
        return None
    weight = parameter_of(gm, node.args[1])
    value = example_value(node.args[0])
    if weight is None or weight.dim() != 3 or value is None or value.dim() != 3:
        return None
    return LinearMatch([node], node.args[0], node, weight.transpose(1, 2), None, str(node.args[1].target),
                       batched_experts=True)
