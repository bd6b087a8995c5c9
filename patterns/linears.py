"""Linear-layer patterns: subgraphs that compute ``x W^T + b`` with parameter weights."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxslice.graph import ops
from fxslice.graph.nodes import module_path, parameter_of as _param
from fxslice.registry import LinearMatch, register_linear_pattern

aten = ops.aten


def _name(call: Node, weight: Node) -> str:
    """The module that called the linear (``nn_module_stack``: ``lm_head`` even when its weight is the
    embedding's), else the weight's owner (``a.b.q_proj.weight`` -> ``a.b.q_proj``)."""
    return module_path(call)[0] or str(weight.target).rsplit(".", 1)[0]


def _cast_to(node: object) -> tuple[object, object]:
    """``(source, dtype)`` of a dtype cast ``to(p, dtype)`` / ``_to_copy(p, dtype=…)``; else ``(node, None)``."""
    if ops.calls(node, {aten.to.dtype}) and len(node.args) > 1:
        return node.args[0], node.args[1]
    if ops.calls(node, {aten._to_copy.default}) and set(node.kwargs) <= {"dtype"} and "dtype" in node.kwargs:
        return node.args[0], node.kwargs["dtype"]
    return node, None


@register_linear_pattern("aten_linear")
def aten_linear(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``aten.linear(x, W[, b])`` with ``W`` (and ``b``) parameters, or parameters cast to one dtype where
    they are used (a bf16 model's router computing in float32: ``linear(x.float(), W.float())``)."""
    if not ops.calls(node, aten.linear.default):
        return None
    weight_node, dtype = _cast_to(node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias_source, bias_dtype = _cast_to(bias_node)
    weight, bias = _param(gm, weight_node), _param(gm, bias_source)
    if weight is None or (bias_node is not None and (bias is None or bias_dtype != dtype)):
        return None
    if dtype is not None and dtype == weight.dtype:
        dtype = None
    casts = [n for n in (node.args[1], bias_node) if n is not None and n is not weight_node and n is not bias_source
             and len(n.users) == 1]
    added = []
    if bias_node is None and dtype is None:
        bias, added = _added_bias(gm, node)
    nodes = casts + [node] + added
    return LinearMatch(nodes, node.args[0], nodes[-1], weight, bias, _name(node, weight_node), compute_dtype=dtype)


@register_linear_pattern("conv1d_addmm")
def conv1d_addmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """GPT-2 ``Conv1D``: ``view(x, [-1, in]) -> addmm(b, ., W[in, out]) -> view(., [*lead, out])``."""
    if not ops.calls(node, aten.addmm.default):
        return None
    bias, flat_in, weight = _param(gm, node.args[0]), node.args[1], _param(gm, node.args[2])
    if weight is None or bias is None or not ops.calls(flat_in, ops.RESHAPES):
        return None
    if len(node.users) != 1:
        return None
    unflat = next(iter(node.users))
    if not ops.calls(unflat, ops.RESHAPES):
        return None
    x = flat_in.args[0]
    lead_in = tuple(x.meta["val"].shape[:-1])
    lead_out = tuple(unflat.meta["val"].shape[:-1])
    if lead_in != lead_out:
        return None
    nodes = ([flat_in] if len(flat_in.users) == 1 else []) + [node, unflat]
    return LinearMatch(nodes, x, unflat, weight.t(), bias, _name(node, node.args[2]))


@register_linear_pattern("transposed_matmul")
def transposed_matmul(gm: GraphModule, node: Node) -> LinearMatch | None:
    """Falcon's ``FalconLinear``: ``matmul(x, W.T)`` optionally followed by ``+ b``."""
    if not ops.calls(node, aten.matmul.default):
        return None
    x, transposed = node.args[0], node.args[1]
    if not ops.calls(transposed, ops.TRANSPOSES):
        return None
    if transposed.target is aten.permute.default and list(transposed.args[1]) != [1, 0]:
        return None
    weight = _param(gm, transposed.args[0])
    if weight is None or weight.dim() != 2:
        return None
    bias, added = _added_bias(gm, node)
    nodes = ([transposed] if len(transposed.users) == 1 else []) + [node] + added
    return LinearMatch(nodes, x, nodes[-1], weight, bias, _name(node, transposed.args[0]))


BROADCASTS = frozenset({aten.expand.default, aten.expand_as.default})


def _added_bias(gm: GraphModule, node: Node) -> tuple[object, list[Node]]:
    """``(b, [nodes])`` where ``node``'s only use is ``node + b`` with ``b`` a 1-D parameter of its output
    width, or that parameter broadcast by ``expand``/``expand_as`` (``expand_as(b, node)`` may read
    ``node`` for its shape: GPT-NeoX-Japanese adds its last attention's bias apart from the Linear);
    ``(None, [])`` otherwise."""
    adds = [u for u in node.users if ops.calls(u, ops.ADD) and len(u.args) == 2 and u.kwargs.get("alpha", 1) == 1]
    if len(adds) != 1 or adds[0].args[0] is adds[0].args[1]:
        return None, []
    user = adds[0]
    other = user.args[1] if user.args[0] is node else user.args[0]
    broadcast = [other] if ops.calls(other, BROADCASTS) and len(other.users) == 1 else []
    if not set(node.users) <= {user, *broadcast} or (broadcast and node is broadcast[0].args[0]):
        return None, []
    bias = _param(gm, other.args[0] if broadcast else other)
    width = node.meta["val"].shape[-1] if "val" in node.meta else None
    if bias is None or bias.dim() != 1 or bias.shape[0] != width or user.meta["val"].shape != node.meta["val"].shape:
        return None, []
    return bias, broadcast + [user]
