"""Pass 4, attention values: find, from the graph, the attentions whose value/output dimension can be narrowed.

A graph analysis like :mod:`.p4_mlps` (no weight is read); the attentions travel in the plan
(``Plan.attentions``) and are narrowed inside pass 7 (:mod:`.p7_rotate.values`) to the width pass 6
chose (``Widths.values``).

An *attention* is a writer Linear ``W_o`` of a rotated position whose input is the output of
``scaled_dot_product_attention`` through reshapes and transposes only, and whose value argument comes
from a reader Linear ``W_v`` (used by nothing else) through reshapes, transposes, size-1 dimensions,
``expand`` (the key/value groups repeated for grouped-query attention) and, in a KV-cache capture,
``index_copy_`` into a cache buffer. With ``H`` query heads and ``G`` key/value groups of ``d_v``
value dimensions, head ``h`` reads group ``h // (H/G)``; value dimension ``j`` of group ``g`` is row
``g·d_v + j`` of ``W_v`` and, for each head ``h`` of the group, column ``h·d_v + j`` of ``W_o``. That
layout is not assumed: it is *verified* by running the path's own ops on index tensors (the graph's
example shapes, no weights). Any other structure — eager attention written with ``matmul``/``softmax``,
a fused query/key/value Linear whose value shares a reshape with the queries, a value dimension that is
not the last one — is refused by :func:`trace_attention` with the node named and skipped by
:func:`find_attentions`, which leaves that attention whole.

Narrowing group ``g`` to ``m`` dimensions rewrites ``W_v``'s rows of the group as ``Tᵀ W_v`` and each
head's ``W_o`` columns as ``W_o B`` (``T``: ``d_v × m``, ``B``: ``m × d_v``); attention mixes tokens,
never value dimensions, so the head's output becomes ``(A v T) B = (A v)(T B)``: exact when ``m = d_v``.
The graph's reshapes carrying ``d_v`` (and a KV cache's value buffers) take ``m``
(:class:`~fxslice.passes.slice_record.ResizeValues`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..errors import GraphStructureError
from ..graph import ops
from ..graph.nodes import describe, example_value, fetch_attr
from .p3_analyse import Structure

if TYPE_CHECKING:
    from .p4_keys import QueryKey

SDPA = ops.aten.scaled_dot_product_attention.default
EXPAND = ops.aten.expand.default
INDEX_COPY = frozenset({ops.aten.index_copy_.default, ops.aten.index_copy.default})
PATH_OPS = ops.RESHAPES | ops.TRANSPOSES | ops.UNIT_DIMS | ops.IDENTITIES | ops.CASTS | {EXPAND}
"""What may stand between the value Linear and the attention, and between the attention and ``W_o``."""


@dataclass
class Attention:
    """One attention of the graph whose value/output dimension can be narrowed."""

    writer: str  # W_o
    reader: str  # W_v
    heads: int  # H
    groups: int  # G (key/value heads)
    width: int  # d_v
    position: int  # the stream position W_o writes
    output: Node  # W_o's input: the heads' outputs side by side, [..., H·d_v]
    shaped: list[Node] = field(default_factory=list)  # reshapes / expands whose last size is d_v, G·d_v or H·d_v
    buffers: list[str] = field(default_factory=list)  # KV-cache value buffers [..., d_v] (get_attr targets)
    sdpa: Optional[Node] = None  # the scaled_dot_product_attention call
    _query_key: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    @property
    def query_key(self) -> Optional["QueryKey"]:
        """Its queries and keys where their dimensions can be dropped (:mod:`.p4_keys`), measured on first use
        (only a compression or replay that narrows them pays for it); None where they cannot."""
        return self._traced_query_key()[0]

    @property
    def query_key_refused(self) -> Optional[str]:
        """Why its queries and keys cannot be narrowed (None where they can)."""
        return self._traced_query_key()[1]

    def measure_query_key(self) -> None:
        """Measure the queries and keys now (a replay does, before its edits change the graph)."""
        self._traced_query_key()

    def _traced_query_key(self) -> tuple:
        """``(query_key, refusal)``, measured once."""
        if self._query_key is None:
            from .p4_keys import trace_query_key  # p4_keys replays paths with this module's helpers

            try:
                self._query_key = (trace_query_key(self.sdpa.graph.owning_module, self.sdpa, self.writer), None)
            except GraphStructureError as exc:
                self._query_key = (None, str(exc))
        return self._query_key


@dataclass
class AttentionSearch:
    attentions: list[Attention] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # writer -> reason

    def refusals(self, values: bool, keys: bool) -> dict[str, str]:
        """Why each attention (by ``W_o``) stays whole for what was asked: its values, its queries and keys."""
        reasons = dict(self.skipped) if values else {}
        if keys:
            for writer, why in self.skipped.items():  # keys are traced in the attentions the value trace recognises
                reasons.setdefault(writer, f"the attention queries and keys of '{writer}' are narrowed only in an "
                                           f"attention pass 4 recognises, and this one is not: {why}")
            reasons.update({a.writer: a.query_key_refused for a in self.attentions if a.query_key_refused})
        return reasons


def concrete(value):
    """A shape argument with every symbolic size replaced by the size it had when captured."""
    if isinstance(value, Node):
        return concrete(value.meta.get("val"))
    if isinstance(value, torch.SymInt):
        return int(optimization_hint(value))
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v) for v in value)
    return value


def example_shape(node: Node) -> Optional[tuple[int, ...]]:
    value = example_value(node)
    return None if value is None else tuple(concrete(list(value.shape)))


def trace_attention(gm: GraphModule, writer: str, position: int) -> Attention:
    """The attention whose output Linear is ``writer``; ``GraphStructureError`` naming the node where
    its structure is not the one described in the module docstring."""
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == writer), None)
    if node is None or type(modules.get(writer)) is not nn.Linear:
        raise GraphStructureError(f"'{writer}' is not a plain Linear of the graph")

    def refuse(at: Node, why: str) -> GraphStructureError:
        return GraphStructureError(f"the attention values of '{writer}' cannot be narrowed: {describe(at)} {why}")

    after, attention = _walk_back(node.args[0], lambda n: ops.calls(n, SDPA), refuse,
                                  "is not a reshape of an attention's output (scaled_dot_product_attention)")
    if len(attention.users) != 1:
        raise refuse(attention, "is read elsewhere too")
    buffers: list[Node] = []
    before, reader = _walk_back(attention.args[2], lambda n: n.op == "call_module" and
                                type(modules.get(str(n.target))) is nn.Linear, refuse,
                                "is not a reshape of the values between their Linear and the attention", buffers)
    if len(reader.users) != 1:
        raise refuse(reader, "is read elsewhere too (a fused projection)")
    out, value, projected = example_shape(attention), example_shape(attention.args[2]), example_shape(reader)
    if out is None or value is None or projected is None or len(out) != 4:
        raise refuse(attention, "has no example shapes")
    heads, width = out[1], out[-1]
    reader_module, writer_module = modules[str(reader.target)], modules[writer]
    if reader_module.out_features % width or writer_module.in_features != heads * width:
        raise refuse(reader, f"does not hold whole value heads of {width} dimensions")
    groups = reader_module.out_features // width
    if heads % groups:
        raise refuse(attention, f"has {heads} heads for {groups} key/value groups")
    lasts = {width, groups * width, heads * width}
    for member in before + after:
        shape = example_shape(member)
        if shape is None or shape[-1] not in lasts:
            raise refuse(member, "moves the value dimension away from the last one")
    _verify_layout(gm, reader, before, attention, after, heads, groups, width, refuse)
    return Attention(writer, str(reader.target), heads, groups, width, position, node.args[0],
                     [n for n in before + after if ops.calls(n, ops.SIZED)], [str(b.target) for b in buffers],
                     attention)


def _walk_back(current: Node, arrived, refuse, why: str, buffers: Optional[list[Node]] = None) -> tuple[list[Node], Node]:
    """``(path, end)``: the single-use path ops from ``current`` back to the first node ``arrived`` accepts;
    with ``buffers``, a cache write (``index_copy_`` into a buffer of its own) is walked through to its new
    values and its buffer collected."""
    path = []
    while not arrived(current):
        if buffers is not None and ops.calls(current, INDEX_COPY):
            buffer = current.args[0]
            if not isinstance(buffer, Node) or buffer.op != "get_attr" or len(buffer.users) != 1:
                raise refuse(current, "writes the values into a cache that is not a buffer of its own")
            buffers.append(buffer)
            path.append(current)
            current = current.args[3]
            continue
        if not ops.calls(current, PATH_OPS) or len(current.users) != 1:
            raise refuse(current, why)
        path.append(current)
        current = current.args[0]
    return path, current


def replay_path(path: list[Node], start: Node, value: torch.Tensor, gm: GraphModule,
         inputs: Optional[dict] = None) -> torch.Tensor:
    """The path's ops (in data-flow order from ``start``) applied to ``value`` with the captured sizes, and
    ``inputs`` (node -> tensor) for what the path reads from elsewhere; a cache write passes its new values
    through, repeated along the cache's length."""
    env = {start: value, **(inputs or {})}

    def load(arg):
        return env[arg] if arg in env else concrete(arg)

    for member in path:
        if ops.calls(member, INDEX_COPY):
            buffer = fetch_attr(gm, member.args[0].target)
            dim, source = member.args[1], env[member.args[3]]
            env[member] = source.narrow(dim, 0, 1).expand(*buffer.shape[:-1], source.shape[-1]).clone()
            continue
        args = map_arg(member.args, load)
        kwargs = {k: map_arg(v, load) for k, v in member.kwargs.items() if k not in ("device", "dtype", "layout",
                                                                                     "memory_format")}
        env[member] = member.target(*args, **kwargs)
    return env[path[-1]] if path else value


def _verify_layout(gm, reader, before, attention, after, heads, groups, width, refuse) -> None:
    """Run the value path on row indices and the output path on (head, dimension) indices: head ``h``
    must read value dimension ``j`` of group ``h // (H/G)`` and ``W_o`` column ``h·d_v + j``."""
    repeats = heads // groups
    try:
        rows = torch.arange(groups * width, dtype=torch.float64).expand(*example_shape(reader)).clone()
        reached = replay_path(list(reversed(before)), reader, rows, gm)  # [B, H, L, d_v]
        head, dim = torch.arange(heads)[:, None], torch.arange(width)[None, :]
        expected = ((head // repeats) * width + dim).to(torch.float64)
        values_ok = tuple(reached.shape[-3:-2]) == (heads,) and bool((reached == expected[:, None, :]).all())
        outputs = (head * width + dim).to(torch.float64)[None, :, None, :].expand(*example_shape(attention)).clone()
        columns = replay_path(list(reversed(after)), attention, outputs, gm)
        outputs_ok = bool((columns == torch.arange(heads * width, dtype=torch.float64)).all())
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise refuse(attention, f"has a head layout its reshapes could not be replayed for ({exc})") from exc
    if not values_ok:
        raise refuse(attention, "does not read value heads in the layout W_v writes them (group h // (H/G))")
    if not outputs_ok:
        raise refuse(attention, "does not hand its heads to the output Linear side by side (column h·d_v + j)")


def find_attentions(structure: Structure, mlps: frozenset[str] = frozenset()) -> AttentionSearch:
    """Every attention writing a rotated position, directly or through a writer-side norm branch (see
    the module docstring); the other linear writers but the MLP writers ``mlps`` are listed in
    ``skipped`` with the reason."""
    modules = dict(structure.gm.named_modules())
    search = AttentionSearch()
    for writer, position in structure.block_writers():
        if type(modules.get(writer)) is not nn.Linear or writer in mlps:
            continue
        try:
            search.attentions.append(trace_attention(structure.gm, writer, position))
        except GraphStructureError as exc:
            search.skipped[writer] = str(exc)
    return search
