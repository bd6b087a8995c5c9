"""Linear-layer patterns: subgraphs that compute ``x W^T + b`` with parameter weights."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxslice.registry import LinearMatch, register_linear_pattern

RESHAPES = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
TRANSPOSES = ("aten.numpy_T.default", "aten.t.default", "aten.permute.default", "aten.transpose.int")


def _param(gm: GraphModule, node) -> object | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach()


def _owner(node: Node) -> str:
    """Module path of a weight's owner: ``a.b.q_proj.weight`` -> ``a.b.q_proj``."""
    return str(node.target).rsplit(".", 1)[0]


@register_linear_pattern("aten_linear")
def aten_linear(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``aten.linear(x, W[, b])`` with ``W`` (and ``b``) parameters."""
    if str(node.target) != "aten.linear.default":
        return None
    weight = _param(gm, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = _param(gm, bias_node)
    if weight is None or (bias_node is not None and bias is None):
        return None
    return LinearMatch([node], node.args[0], node, weight, bias, _owner(node.args[1]))


@register_linear_pattern("conv1d_addmm")
def conv1d_addmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """GPT-2 ``Conv1D``: ``view(x, [-1, in]) -> addmm(b, ., W[in, out]) -> view(., [*lead, out])``."""
    if str(node.target) != "aten.addmm.default":
        return None
    bias, flat_in, weight = _param(gm, node.args[0]), node.args[1], _param(gm, node.args[2])
    if weight is None or bias is None or str(getattr(flat_in, "target", "")) not in RESHAPES:
        return None
    if len(node.users) != 1:
        return None
    unflat = next(iter(node.users))
    if str(unflat.target) not in RESHAPES:
        return None
    x = flat_in.args[0]
    lead_in = tuple(x.meta["val"].shape[:-1])
    lead_out = tuple(unflat.meta["val"].shape[:-1])
    if lead_in != lead_out:
        return None
    nodes = ([flat_in] if len(flat_in.users) == 1 else []) + [node, unflat]
    return LinearMatch(nodes, x, unflat, weight.t(), bias, _owner(node.args[2]))


@register_linear_pattern("transposed_matmul")
def transposed_matmul(gm: GraphModule, node: Node) -> LinearMatch | None:
    """Falcon's ``FalconLinear``: ``matmul(x, W.T)`` optionally followed by ``+ b``."""
    if str(node.target) != "aten.matmul.default":
        return None
    x, transposed = node.args[0], node.args[1]
    if str(getattr(transposed, "target", "")) not in TRANSPOSES:
        return None
    if str(transposed.target) == "aten.permute.default" and list(transposed.args[1]) != [1, 0]:
        return None
    weight = _param(gm, transposed.args[0])
    if weight is None or weight.dim() != 2:
        return None
    nodes, out, bias = ([transposed] if len(transposed.users) == 1 else []) + [node], node, None
    if len(node.users) == 1:
        user = next(iter(node.users))
        if str(user.target) == "aten.add.Tensor" and user.args[0] is node:
            bias = _param(gm, user.args[1])
            if bias is not None and bias.dim() == 1:
                nodes, out = nodes + [user], user
            else:
                bias = None
    return LinearMatch(nodes, x, out, weight, bias, _owner(transposed.args[0]))
