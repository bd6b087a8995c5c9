"""Pass 2 — canonicalise: no-op nodes go, linears and embeddings become real modules.

After this pass every weight that can touch the residual stream lives in an ``nn.Linear`` or
``nn.Embedding`` submodule named after the original module path (``model.layers.0.self_attn.q_proj``),
so that later passes change weights, not graph structure, and peft can find the layers.
The parameters still share storage with the caller's model; nothing here writes to them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .errors import GraphStructureError, describe, module_path
from .registry import REGISTRY

CASTS = ("aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.device", "aten.type_as.default")
IDENTITIES = ("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
              "aten.lift_fresh_copy.default")
INT64_MAX = 2**63 - 1


def _val(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_noop(node: Node) -> bool:
    target = str(node.target)
    if node.op != "call_function":
        return False
    src, dst = _val(node.args[0]) if node.args else None, _val(node)
    same_layout = (
        src is not None and dst is not None and src.dtype == dst.dtype and src.device == dst.device
        and tuple(src.shape) == tuple(dst.shape) and tuple(src.stride()) == tuple(dst.stride())
    )
    if target in IDENTITIES:
        return same_layout
    if target == "aten.dropout.default":
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    if target in CASTS:
        return same_layout
    if target == "aten.slice.Tensor":
        args = list(node.args) + [None] * (5 - len(node.args))
        _, _, start, end, step = args[:5]
        return start in (0, None) and (end is None or end >= INT64_MAX) and step in (1, None)
    return False


def remove_noops(graph) -> None:
    """Drop identity nodes (same-dtype casts, eval dropout, full slices, metadata asserts); make ``add_`` functional."""
    for node in list(graph.nodes):
        target = str(node.target)
        if node.op == "call_function" and target == "aten._assert_tensor_metadata.default":
            graph.erase_node(node)
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and target == "aten.add_.Tensor":
            mutated = node.args[0]
            if len(mutated.users) == 1 and mutated.op == "call_function":  # a temporary: same as a functional add
                node.target = torch.ops.aten.add.Tensor


def drop_dead_nodes(graph) -> None:
    """Dead-code elimination that does not need the owning module to be consistent yet."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op not in ("output", "placeholder") and not node.is_impure():
            graph.erase_node(node)


class _ParameterPool:
    """One ``nn.Parameter`` per distinct source tensor, so that tied weights stay one object."""

    def __init__(self):
        self._by_storage: dict[tuple, nn.Parameter] = {}

    def get(self, tensor: torch.Tensor) -> nn.Parameter:
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self._by_storage:
            self._by_storage[key] = nn.Parameter(tensor.detach(), requires_grad=False)
        return self._by_storage[key]


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unique_name(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def canonicalise(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    remove_noops(graph)
    pool = _ParameterPool()
    modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.graph is not graph or not node.users:
            continue
        if str(node.target) == "aten.embedding.default":
            _replace_embedding(gm, node, pool, modules)
            continue
        for _, pattern in REGISTRY.linears:
            match = pattern(gm, node)
            if match is not None:
                _replace_linear(match, pool, modules)
                break
    drop_dead_nodes(graph)
    root: dict[str, object] = dict(modules)
    for node in graph.nodes:
        if node.op == "get_attr":
            root[str(node.target)] = _fetch(gm, str(node.target))
        elif node.op == "call_module" and node.target not in root:
            root[str(node.target)] = _fetch(gm, str(node.target))
    canonical = GraphModule(root, graph, class_name="SlicedCausalLM")
    canonical.graph.lint()
    return canonical


def _new_node(graph, after: Node, name: str, args: tuple, like: Node) -> Node:
    with graph.inserting_after(after):
        node = graph.create_node("call_module", name, args)
    node.meta.update({k: like.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in like.meta})
    return node


def _replace_linear(match, pool: _ParameterPool, modules: dict) -> None:
    out_features, in_features = match.weight.shape
    linear = nn.Linear(in_features, out_features, bias=match.bias is not None, device="meta")
    linear.weight = pool.get(match.weight)
    if match.bias is not None:
        linear.bias = pool.get(match.bias)
    name = _unique_name(match.name, modules)
    modules[name] = linear
    graph = match.output.graph
    new = _new_node(graph, match.output, name, (match.input,), match.output)
    match.output.replace_all_uses_with(new)
    for dead in reversed(match.nodes):
        if not dead.users:
            graph.erase_node(dead)


def _replace_embedding(gm: GraphModule, node: Node, pool: _ParameterPool, modules: dict) -> None:
    weight_node, ids = node.args[0], node.args[1]
    if weight_node.op != "get_attr":
        raise GraphStructureError(f"{describe(node)} looks up an embedding table that is not a parameter")
    weight = _fetch(gm, str(weight_node.target)).detach()
    embedding = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
    embedding.weight = pool.get(weight)
    path = module_path(node)[0] or str(weight_node.target).rsplit(".", 1)[0]
    name = _unique_name(path, modules)
    modules[name] = embedding
    new = _new_node(node.graph, node, name, (ids,), node)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
