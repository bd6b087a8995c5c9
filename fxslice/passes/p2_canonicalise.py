"""Pass 2 — canonicalise: no-op nodes go, interpolations become sums, linears and embeddings become
real modules.

After this pass every weight that can touch the residual stream lives in an ``nn.Linear``,
:class:`~fxslice.graph.modules.ExpertLinear` (mixture-of-experts weights) or ``nn.Embedding`` submodule named after the original module path (``model.layers.0.self_attn.q_proj``),
so that later passes change weights, not graph structure, and peft can find the layers. Which
subgraphs are linear layers is the registered linear patterns' decision (``patterns/linears.py``).
The parameters still share storage with the caller's model; nothing here writes to them.

An interpolation with a rate ``r`` computed from parameters only (a tensor or a number),
``x + r ⊙ (y − x)`` or ``torch.lerp`` (nGPT's residual update towards the normalised branch, Dory's), is
the same sum written as ``(1 − r) ⊙ x + r ⊙ y``: a per-dimension map on the skip edge and one on the
branch, which the analysis knows (and fuse moves into the shortcut and the branch's writers). In the
first form the stream is read by a subtraction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, TYPE_CHECKING

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import GraphStructureError
from ..graph import ops
from ..graph.edit import mark_module_call
from ..graph.modules import BatchedExpertLinear, ExpertLinear, UpcastLinear
from ..graph.nodes import copy_meta, describe, example_value, fetch_attr, from_parameters, module_path, parameter_of
from ..graph.weights import count_parameters
from ..registry import REGISTRY, LinearMatch
from ..source import keep_module
from .p1_capture import GRAPH_CLASS

if TYPE_CHECKING:
    from .run import Run

INT64_MAX = 2**63 - 1


def canonicalise(gm: GraphModule) -> GraphModule:
    """A new GraphModule over ``gm``'s graph whose linears and embeddings are ``call_module`` nodes."""
    graph = gm.graph
    remove_noops(graph)
    expand_interpolations(graph)
    modules = ModuleBuilder(gm)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.graph is not graph or not node.users:
            continue
        if node.target is ops.EMBEDDING:
            modules.embedding(node)
            continue
        for _, pattern in REGISTRY.linears:
            match = pattern(gm, node)
            if match is not None:
                modules.linear(match)
                break
    for node in list(graph.nodes):  # after the linears, which take their gathered expert biases along
        gather = table_gather(gm, node) if node.graph is graph and node.users else None
        if gather is not None:
            modules.table_lookup(node, *gather)
    drop_dead_nodes(graph)
    canonical = GraphModule(modules.root(graph), graph, class_name=GRAPH_CLASS)
    canonical.graph.lint()
    return canonical


def _same_layout(node: Node) -> bool:
    src, dst = (example_value(node.args[0]) if node.args else None), example_value(node)
    return (
        src is not None and dst is not None and src.dtype == dst.dtype and src.device == dst.device
        and tuple(src.shape) == tuple(dst.shape) and tuple(src.stride()) == tuple(dst.stride())
    )


def _full_slice(node: Node) -> bool:
    """``x[..., 0:INT64_MAX:1]`` along any dim; a symbolic end (a graph value) is not a no-op."""
    start, end, step = (list(node.args) + [None] * 5)[2:5]
    full_end = end is None or (isinstance(end, int) and end >= INT64_MAX)
    return start in (0, None) and full_end and step in (1, None)


def is_noop(node: Node) -> bool:
    """Same-layout casts and copies, eval-mode dropout, full slices, adding 0 and multiplying by 1."""
    if ops.calls(node, ops.IDENTITIES | ops.CASTS):
        return _same_layout(node)
    if ops.calls(node, ops.DROPOUT):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    if ops.calls(node, ops.SLICE):
        return _full_slice(node)
    if node.op == "call_function" and node.target in ops.NEUTRAL_CONSTANT and len(node.args) == 2 \
            and not isinstance(node.args[1], (Node, bool)):
        return node.args[1] == ops.NEUTRAL_CONSTANT[node.target] and _same_layout(node)  # x + 0, x * 1
    return False


def table_gather(gm: GraphModule, node: Node) -> Optional[tuple[Node, Node]]:
    """``(T, ids)`` for ``T[ids]`` or ``index_select(T, 0, ids)`` of a 2-D floating-point parameter or
    buffer ``T`` with integer ``ids``: an embedding lookup written by hand (sinusoidal or learned
    position tables); None for anything else."""
    if ops.calls(node, ops.aten.index.Tensor) and len(node.args[1]) == 1:
        table, ids = node.args[0], node.args[1][0]
    elif ops.calls(node, ops.aten.index_select.default) and node.args[1] == 0:
        table, ids = node.args[0], node.args[2]
    else:
        return None
    values, rows = parameter_of(gm, table), example_value(ids)
    found = (values is not None and values.dim() == 2 and values.is_floating_point()
             and rows is not None and not rows.is_floating_point() and rows.dtype != torch.bool)
    return (table, ids) if found else None


def remove_noops(graph) -> None:
    """Drop identity nodes and metadata asserts; make in-place ops on temporaries functional."""
    for node in list(graph.nodes):
        if ops.calls(node, ops.ASSERT_METADATA):
            graph.erase_node(node)
        elif is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        else:
            functional = ops.functional_twin(node)
            mutated = node.args[0] if functional is not None else None
            if isinstance(mutated, Node) and len(mutated.users) == 1 and ops.private_tensor(mutated):
                node.target = functional  # a temporary no one reads afterwards: ``x.mul_(s)`` is ``x * s``


LERPS = frozenset({ops.aten.lerp.Tensor, ops.aten.lerp.Scalar})


def _interpolation(node: Node) -> Optional[tuple[Node, Node, object, list[Node]]]:
    """``(x, y, r, nodes)`` when ``node`` computes ``x + r ⊙ (y − x)`` (either order of the sum and of the
    product, or ``torch.lerp(x, y, r)``) with ``r`` from parameters only, the inner nodes used once and ``x``,
    ``y`` of the result's shape and dtype; ``nodes``: what the sum replaces. None for anything else."""
    found = None
    if ops.calls(node, LERPS) and not node.kwargs and from_parameters(node.args[2]):
        found = node.args[0], node.args[1], node.args[2], [node]
    elif ops.is_tensor_add(node) and not node.kwargs:
        for x, scaled in (node.args[:2], node.args[1::-1]):
            if not ops.calls(scaled, ops.aten.mul.Tensor) or len(scaled.users) != 1:
                continue
            for r, difference in (scaled.args[:2], scaled.args[1::-1]):
                if (ops.calls(difference, ops.aten.sub.Tensor) and len(difference.users) == 1
                        and not difference.kwargs and difference.args[1] is x and from_parameters(r)
                        and isinstance(difference.args[0], Node)):
                    found = x, difference.args[0], r, [node, scaled, difference]
    if found is None:
        return None
    result = example_value(node)
    for value in (example_value(found[0]), example_value(found[1])):  # the new nodes' metadata is the result's
        if value is None or result is None or value.shape != result.shape or value.dtype != result.dtype:
            return None
    return found


def expand_interpolations(graph) -> None:
    """``x + r ⊙ (y − x)`` → ``(1 − r) ⊙ x + r ⊙ y`` for a rate ``r`` from parameters (see the module docstring)."""
    for node in list(graph.nodes):
        found = _interpolation(node)
        if found is None:
            continue
        x, y, r, replaced = found
        with graph.inserting_before(node):
            keep = graph.call_function(ops.aten.rsub.Scalar, (r, 1)) if isinstance(r, Node) else 1 - r
            kept = graph.call_function(ops.aten.mul.Tensor, (x, keep))
            moved = graph.call_function(ops.aten.mul.Tensor, (y, r))
            total = graph.call_function(ops.aten.add.Tensor, (kept, moved))
        if isinstance(keep, Node):
            copy_meta(keep, r, ("val", "nn_module_stack"))
        for new in (kept, moved, total):
            copy_meta(new, node, ("val", "nn_module_stack"))
        node.replace_all_uses_with(total)
        for dead in replaced:
            graph.erase_node(dead)


def drop_dead_nodes(graph) -> None:
    """Dead-code elimination that does not need the owning module to be consistent yet."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op not in ("output", "placeholder") and not node.is_impure():
            graph.erase_node(node)


class ModuleBuilder:
    """Creates the ``nn.Linear`` / ``nn.Embedding`` modules of the canonical graph.

    One ``nn.Parameter`` per distinct source tensor, so that tied weights stay one object; one
    module name per HF module path (``_1``, ``_2`` for a module called twice).
    """

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.modules: dict[str, nn.Module] = {}
        self._parameters: dict[tuple, nn.Parameter] = {}

    def parameter(self, tensor: torch.Tensor) -> nn.Parameter:
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self._parameters:
            self._parameters[key] = nn.Parameter(tensor.detach(), requires_grad=False)
        return self._parameters[key]

    def _name(self, path: str) -> str:
        name, k = path, 1
        while name in self.modules:
            name, k = f"{path}_{k}", k + 1
        return name

    def _install(self, path: str, module: nn.Module, replaced: Node, args: tuple) -> None:
        name = self._name(path)
        self.modules[name] = module
        graph = replaced.graph
        with graph.inserting_after(replaced):
            node = graph.create_node("call_module", name, args)
        copy_meta(node, replaced)
        mark_module_call(node, name, module)
        replaced.replace_all_uses_with(node)

    def linear(self, match: LinearMatch) -> None:
        bias = None if match.bias is None else self.parameter(match.bias)
        if match.expert_ids is not None:  # grouped expert weights [E, out, in], one expert per input row
            self._install(match.name, ExpertLinear(self.parameter(match.weight), bias), match.output,
                          (match.input, match.expert_ids))
        elif match.batched_experts:  # the same weights, one batch of rows per expert
            self._install(match.name, BatchedExpertLinear(self.parameter(match.weight), bias), match.output,
                          (match.input,))
        else:
            out_features, in_features = match.weight.shape
            if match.compute_dtype is None:
                linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
            else:
                linear = UpcastLinear(in_features, out_features, bias is not None, match.compute_dtype, device="meta")
            linear.weight = self.parameter(match.weight)
            if bias is not None:
                linear.bias = bias
            self._install(match.name, linear, match.output, (match.input,))
        for dead in reversed(match.nodes):
            if not dead.users:
                match.output.graph.erase_node(dead)

    def embedding(self, node: Node) -> None:
        """``aten.embedding(weight, ids)`` becomes an ``nn.Embedding`` named after its module."""
        weight_node, ids = node.args[0], node.args[1]
        if weight_node.op != "get_attr":
            raise GraphStructureError(f"{describe(node)} looks up an embedding table that is not a parameter")
        self._lookup(node, weight_node, ids, module_path(node)[0] or str(weight_node.target).rsplit(".", 1)[0])

    def table_lookup(self, node: Node, table: Node, ids: Node) -> None:
        """A gather from a constant table (:func:`table_gather`) becomes an ``nn.Embedding`` named
        after the table."""
        self._lookup(node, table, ids, str(table.target))

    def _lookup(self, node: Node, table: Node, ids: Node, name: str) -> None:
        weight = fetch_attr(self.gm, str(table.target)).detach()
        embedding = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
        embedding.weight = self.parameter(weight)
        self._install(name, embedding, node, (ids,))
        node.graph.erase_node(node)

    def root(self, graph) -> dict[str, object]:
        """Everything the canonical graph reads: the new modules, remaining attributes and submodules."""
        root: dict[str, object] = dict(self.modules)
        for node in graph.nodes:
            if node.op == "get_attr" or (node.op == "call_module" and node.target not in root):
                root[str(node.target)] = fetch_attr(self.gm, str(node.target))
        return root


NAME = "canonicalise"


def step(run: "Run") -> None:
    """Canonicalise, keep what a second capture needs (:mod:`fxslice.source`), then put the canonical
    graph's weights behind the run's weight store."""
    with run.watch(NAME):
        run.gm = canonicalise(run.gm)
    # the dense size is what the causal LM's forward uses (GIT's image encoder, not called on tokens, is not counted)
    run.spec = replace(run.spec, param_count=min(run.spec.param_count, count_parameters(run.gm)))
    if run.source is None:  # a model in memory: keep its skeleton while the graph still shares its storage
        run.source = keep_module(run.module, run.gm)
    run.weights = run.store(run.gm)
    run.module = None  # the graph holds what the passes need (a checkpoint's empty model is dropped here)
