r"""Pass 4 — MLPs: find, from the graph, the MLPs whose hidden units can be sliced.

A graph analysis like :mod:`.p3_analyse` (no weight is read or changed): it runs on the
:class:`~.p3_analyse.Structure`, before fuse, and its result travels in the plan (``Plan.mlps``).
The selection of units and the refit of the down projection happen block by block inside pass 7
(:mod:`.p7_rotate.hidden`); how many units each MLP keeps is pass 6's choice (:mod:`.p6_widths`).

An *MLP* is a writer Linear ``W_out`` of a rotated position (directly, or behind a writer-side
norm whose branch is sliced in its own basis) whose input ``h`` (width ``I``) is computed from the
outputs of Linears (``I`` wide each: up, gate, ``fc1``) through elementwise ops only —
``act(gate) * up``, ``gelu(fc1)``, biases, casts, scalings by numbers or by per-token values. A
fused input Linear split into equal chunks (``gate, up = gate_up(x).chunk(2, -1)``) counts once per
chunk. Every such value is used by the MLP only. Hidden unit ``j`` is then row ``j`` (of every
chunk) of every input Linear and column ``j`` of ``W_out``: deleting it is exact up to the unit's
contribution. Attention outputs (reshaped heads) are no MLP; a hidden value meeting anything else
(a reduction over the units, a split into unequal parts, a per-unit parameter) is refused by
:func:`trace_mlp` with the node named, and skipped by :func:`find_mlps`.

Mixture-of-experts MLPs are found the same way: a writer :class:`~fxslice.graph.modules.ExpertLinear`
(``[E, out, I]``) whose hidden value comes from reader ``ExpertLinear``\ s routed by the *same* expert
ids (or, for experts that see every token, :class:`~fxslice.graph.modules.BatchedExpertLinear`\ s).
Unit ``j`` of expert ``e`` is then row ``j`` of every reader's ``W[e]`` and column ``j`` of the
writer's ``W[e]``; each expert keeps its own units (:mod:`.p7_rotate.hidden`), the router is untouched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, TYPE_CHECKING

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import GraphStructureError
from ..graph import ops
from ..graph.modules import LINEARS, BatchedExpertLinear, ExpertLinear
from ..graph.nodes import describe, example_value
from .p3_analyse import Structure
from .p4_attention import find_attentions

if TYPE_CHECKING:
    from .run import Run

CHUNK = torch.ops.aten.chunk.default
SLICE = torch.ops.aten.slice.Tensor


@dataclass
class MLP:
    """One MLP of the fused graph: the Linears whose output rows are its hidden units, the writer
    whose input columns they are, and the node holding the hidden value ``h``."""

    writer: str
    readers: dict[str, int]  # input Linear -> how many I-wide parts its output has (2: a fused gate/up)
    hidden: Node  # the writer's input node
    width: int  # I
    position: int  # the stream position the writer writes
    interleaved: tuple[str, ...] = ()  # readers whose parts alternate row by row (unit j: rows j·parts + i)
    experts: int = 0  # E for a mixture of experts' MLP (one set of units per expert), 0 for a dense MLP
    routing: Optional[Node] = None  # the expert id of every row of ``hidden`` (None: dense, or [E, T, I] rows)


@dataclass
class MLPSearch:
    """What :func:`find_mlps` found, and why the other linear writers are not MLPs."""

    mlps: list[MLP] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # writer -> reason


def _pointwise(node: Node) -> bool:
    target = node.target
    return (node.op == "call_function" and hasattr(target, "tags") and torch.Tag.pointwise in target.tags) \
        or ops.calls(node, ops.CASTS | ops.IDENTITIES)


def trace_mlp(gm: GraphModule, writer: str, position: int) -> MLP:
    """The MLP whose writer is module ``writer`` of ``gm``; ``GraphStructureError`` naming the node
    where its hidden value meets an op that is not elementwise over the hidden units."""
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == writer), None)
    if node is None or not isinstance(modules.get(writer), LINEARS):
        raise GraphStructureError(f"'{writer}' is not a Linear of the graph")
    hidden = node.args[0]
    width = modules[writer].in_features
    kind = _kind(modules[writer], node)

    def refuse(at: Node, why: str) -> GraphStructureError:
        return GraphStructureError(f"the hidden units of '{writer}' cannot be sliced: {describe(at)} {why}")

    region: set[Node] = set()
    readers: dict[str, int] = {}
    interleaved: set[str] = set()
    frontier = [hidden]
    while frontier:
        current = frontier.pop()
        if current in region:
            continue
        region.add(current)
        value = example_value(current)
        if value is None or value.dim() == 0 or value.shape[-1] != width:
            raise refuse(current, f"does not carry the {width} hidden units in its last dimension")
        module = modules.get(str(current.target)) if current.op == "call_module" else None
        if isinstance(module, LINEARS):
            if _kind(module, current) != kind:
                raise refuse(current, "is not routed like the writer (dense and expert Linears, or other expert ids)")
            readers[str(current.target)] = 1
            continue
        fused = _fused_part(current, modules, width)
        if fused is not None:  # gate, up = chunk(gate_up(x), n, -1): unit j is row j + i·I of gate_up
            chunk, source, parts, alternating = fused
            if alternating:
                interleaved.add(str(source.target))
            if _kind(modules[str(source.target)], source) != kind:
                raise refuse(source, "is not routed like the writer (dense and expert Linears, or other expert ids)")
            region.update((chunk, source))
            readers[str(source.target)] = parts
            continue
        if not _pointwise(current):
            raise refuse(current, "is not elementwise over them")
        for arg in current.all_input_nodes:
            operand = example_value(arg)
            if operand is not None and operand.dim() > 0 and operand.shape[-1] == width and width > 1:
                if arg.op == "get_attr":
                    raise refuse(current, f"reads the per-unit tensor '{arg.target}'")
                frontier.append(arg)
            elif operand is not None and operand.dim() > 0 and operand.shape[-1] != 1:
                raise refuse(current, f"mixes them with '{arg.name}' of shape {tuple(operand.shape)}")
    for member in region:
        for user in member.users:
            if user not in region and user is not node:
                raise refuse(user, f"reads the hidden value '{member.name}' outside the MLP")
    if not readers:
        raise refuse(hidden, "is not computed from any Linear")
    if hidden.op == "call_module":  # W_out right after one Linear: no nonlinearity, nothing to slice
        raise refuse(hidden, "is a Linear feeding the writer directly (a low-rank pair, not an MLP)")
    experts = modules[writer].num_experts if isinstance(modules[writer], ExpertLinear) else 0
    routing = node.args[1] if isinstance(modules[writer], ExpertLinear) and len(node.args) > 1 else None
    return MLP(writer, dict(sorted(readers.items())), hidden, width, position, tuple(sorted(interleaved)), experts,
               routing)


def _kind(module: nn.Module, call: Node) -> object:
    """How a Linear's rows are routed: ``"dense"``, ``"batched"`` (every expert sees every token) or the
    node of its expert ids — readers and writer of one MLP must agree."""
    if isinstance(module, BatchedExpertLinear):
        return "batched"
    if isinstance(module, ExpertLinear):
        return call.args[1] if len(call.args) > 1 else call.kwargs.get("expert_ids")
    return "dense"


def _fused_part(node: Node, modules: dict, width: int) -> Optional[tuple[Node, Node, int, bool]]:
    """``(split, linear, parts, interleaved)`` when ``node`` is one of ``parts`` equal parts of a Linear's
    output along its last dimension: a chunk (``getitem(chunk(y, parts, -1), i)``, unit ``j`` at row
    ``j + i·I``) or a strided slice (``y[..., i::parts]``, GPT-OSS's gate/up, unit ``j`` at row ``j·parts + i``)."""
    if node.op == "call_function" and node.target is operator.getitem and ops.calls(node.args[0], CHUNK):
        split = node.args[0]
        source, parts = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        interleaved = False
    elif ops.calls(node, SLICE) and len(node.args) == 5 and isinstance(node.args[4], int) and node.args[4] > 1 \
            and node.args[2] in range(node.args[4]):
        split, (source, dim, _, _, parts) = node, node.args
        interleaved = True
    else:
        return None
    linear = modules.get(str(source.target)) if isinstance(source, Node) and source.op == "call_module" else None
    value = example_value(source)
    if not isinstance(linear, LINEARS) or value is None or dim not in (-1, value.dim() - 1) \
            or linear.out_features != parts * width:
        return None
    return split, source, parts, interleaved


def find_mlps(structure: Structure) -> MLPSearch:
    """Every MLP writing a rotated position, directly or through a writer-side norm branch (see the
    module docstring); other linear writers are listed in ``skipped`` with the reason."""
    modules = dict(structure.gm.named_modules())
    search = MLPSearch()
    for writer, position in structure.block_writers():
        if not isinstance(modules.get(writer), LINEARS):
            continue
        try:
            search.mlps.append(trace_mlp(structure.gm, writer, position))
        except GraphStructureError as exc:
            search.skipped[writer] = str(exc)
    return search


NAME = "mlps"


def step(run: "Run") -> None:
    with run.watch(NAME):
        run.mlps = find_mlps(run.structure)
        run.attentions = find_attentions(run.structure, frozenset(m.writer for m in run.mlps.mlps))
