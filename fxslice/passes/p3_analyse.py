"""Pass 3 — analyse: find the residual stream in a canonical graph.

The stream is followed forward from the token embedding. A *position* is one value of the stream
(the output of a residual add, or the embedding sum at the start). For every position the analysis
records its readers (norms and the linears behind them, or linears reading it directly), its
writers (linears, embeddings or writer-side norms whose outputs are summed into it), the skip edge
of the residual add that produced it, and the reshapes that carry its width. Walk-through ops that
do not mix the hidden dimension (dtype casts, leading-dim reshapes, slices of leading dims, scalar
multiplies) are followed. Elementwise maps ``s ⊙ x + c`` whose ``s`` and ``c`` come from parameters only
(:class:`StreamAffine`: residual gates and scales) are recorded where they sit — on a skip edge, on
top of a branch, or between two positions with nothing added — for fuse to move into Linears.
Anything else touching the stream raises ``GraphStructureError`` naming the node — before any weight
is changed.

Positions are *rotated* (PCA basis, sliced) or *raw* (full width, original basis): a raw position
is one whose only reader is a writer-side norm (Bloom's embedding LayerNorm).

Post-norm blocks (``x_b = LN(x_a' + f(x_a'))``, ``x_a' = LN_a(x_a)``: BERT, BART, GPT-1) have no skip edge from one
position to the next: the norm reading ``x_a`` is a reader-side norm whose output is also the skip operand of the
add producing ``x_b`` (``NormSite.carried``), a passthrough into the next position like LongCat-Flash's identity
experts. A position is *centred* when LayerNorms read it (:attr:`Position.centered`): its writers are made
mean-free, so that a position read by Linears directly (a post-norm model's first one) can sit beside it.

Three parts: the result (:class:`Structure` and its positions), :class:`NodeKinds` (what a single
node is: a linear, an embedding, a matched norm, a walk-through op) and :class:`StreamWalk` (the
walk from position to position), followed by :func:`check_structure`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, TYPE_CHECKING

import torch
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule, Node

from ..calibration import check_lengths
from ..errors import GraphStructureError
from ..graph import ops
from ..graph.modules import LINEARS
from ..graph.nodes import describe, example_value, from_parameters, module_path
from ..registry import NormSpec, Region, match_norm, module_index, region_of

if TYPE_CHECKING:
    from .run import Run


# --- the result -------------------------------------------------------------------------------
@dataclass
class NormSite:
    """A matched norm region: ``output = spec.apply(input)``."""

    region: Region
    pattern: str
    spec: NormSpec
    readers: list[Node] = field(default_factory=list)  # Linear call_module nodes behind a reader-side norm
    reshapes: list[Node] = field(default_factory=list)  # width-carrying reshapes between the norm and them
    # a writer-side norm on a branch (``x + norm(o_proj(...))``): the Linears writing its input, and
    # the width-carrying reshapes between them and the norm; None when something else writes it
    inner_writers: Optional[list[Node]] = None
    inner_reshapes: list[Node] = field(default_factory=list)
    # a reader-side norm whose output also reaches a later residual add through walk-through ops only
    # (LongCat-Flash's identity experts, ``w ⊙ norm(x)``; a post-LayerNorm block's skip edge, ``LN(x + f(LN'(…)))``):
    # ``(value, add)``, the values that end those paths and the adds taking them
    passthroughs: list[tuple[Node, Node]] = field(default_factory=list)
    # the one passthrough that carries the stream on when nothing else of the position does (post-norm blocks:
    # the norm's output is both what the next block reads and the skip operand of its residual add)
    carried: Optional[tuple[Node, Node]] = None
    # ``(value, user)`` edges where an op reads the norm's output in the model's coordinates (AXK2's
    # input-dependent gate ``y ⊙ σ(g(y))``): fuse puts the norm's ``diag(γ)`` (+ ``β``) on each edge as a Linear,
    # a reader of the stream like any other (``Q_pᵀ diag(γ)`` after rotation), so the op sees what it saw
    model_reads: list[tuple[Node, Node]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.region.path or self.region.output.name


@dataclass
class StreamAffine:
    """A per-dimension affine map ``y = s ⊙ x + c`` of a stream value (or of a branch): a chain of
    elementwise ops whose other operand is computed from parameters only (Doge's and Ergo's residual
    gates, Zaya's residual scale and bias), with casts between them. It commutes with no rotation,
    so fuse moves it into a Linear: the shortcut's ``diag(s)`` and bias, or a branch's writers."""

    start: Node  # the value the chain maps
    steps: list[Node]  # the chain, in order (casts included)

    @property
    def end(self) -> Node:
        return self.steps[-1]

    @property
    def has_constant(self) -> bool:
        """Whether ``c`` can be non-zero (an add or subtract in the chain): the Linear needs a bias."""
        return any(ops.calls(step, {ops.aten.add.Tensor, ops.aten.sub.Tensor}) for step in self.steps)


@dataclass
class Skip:
    add: Optional[Node]  # the residual add (None: the stream goes on through ``affine`` alone, no branch added)
    operand: Node  # the stream-side argument of the add (``affine``'s end when there is one)
    source: int  # index of the position it comes from
    affine: Optional[StreamAffine] = None  # a per-dimension affine map on the skip edge

    @property
    def stream_value(self) -> Node:
        """The value of the source position the skip edge starts from."""
        return self.affine.start if self.affine is not None else self.operand

    @property
    def joint(self) -> Node:
        """Where the skip edge ends: the residual add, or the affine map's last step."""
        return self.add if self.add is not None else self.operand


@dataclass
class MergedCopies:
    """The ``N`` copies of a stream value (``[..., N, D]``: hyper-connections keep ``N`` residual streams per
    token, mixed by weights computed from all of them) merged into one row ``[..., N·D]``. Rotating every
    copy by the same ``Q`` is rotating the row by ``diag(Q, …, Q)``: a Linear reading it rotates its ``N``
    blocks of inputs alike, and a mean of squares over the row stays the same — once the copies are sliced
    it is taken over ``N·D`` still (``means``, rewritten by fuse into a sum over the full width)."""

    reshape: Node
    copies: int
    means: list[Node] = field(default_factory=list)


@dataclass
class Position:
    index: int
    root: Node
    rotated: bool = True
    aliases: list[Node] = field(default_factory=list)
    writers: list[Node] = field(default_factory=list)  # Linear / Embedding call_module nodes
    writer_norms: list[NormSite] = field(default_factory=list)
    skip: Optional[Skip] = None
    branch_affine: Optional[StreamAffine] = None  # a per-dimension affine map of the whole branch added here
    # the values branches add here when their writers cannot be rotated where they are (an op after them
    # that is not linear in the stream's coordinates: Inkling's causal convolution over the attention
    # output): they stay in the model's coordinates and fuse maps each in with an inserted Linear
    opaque_branches: list[tuple[Node, Node]] = field(default_factory=list)  # (value, the residual add taking it)
    # (norm, value, add): an earlier position's norm output reaching this position's add (``NormSite.passthroughs``);
    # a post-norm block's position has no skip edge, only the previous norm's passthrough
    passthroughs: list[tuple[NormSite, Node, Node]] = field(default_factory=list)
    # an earlier position's value added here again (a looped model's input injection, ``h ← norm(h) + e`` before
    # every loop, Dory's): (that position, its value, the residual add taking it); fuse maps each with an
    # inserted Linear, ``Q_aᵀ Q_p`` after rotation
    long_skips: list[tuple["Position", Node, Node]] = field(default_factory=list)
    norms: list[NormSite] = field(default_factory=list)  # reader-side norms
    # the stream's copies merged into one row (``[..., N, D] -> [..., N·D]``, hyper-connections): what reads
    # them — Linears (also in ``direct_readers``: ``N`` blocks of ``D`` inputs) and mean squares over the row
    merged: list["MergedCopies"] = field(default_factory=list)
    direct_readers: list[Node] = field(default_factory=list)
    reshapes: list[Node] = field(default_factory=list)  # reshapes that carry the width (last dim)

    @property
    def readers(self) -> list[Node]:
        return [r for site in self.norms for r in site.readers] + self.direct_readers

    @property
    def centered(self) -> bool:
        """LayerNorm readers: the value must be made mean-free so that they become RMSNorms (every writer centred,
        and a skip edge from a position that is not)."""
        return self.rotated and any(site.spec.centered for site in self.norms)


@dataclass
class Structure:
    """The residual stream of ``gm``: positions in graph order, the last one read by the head."""

    gm: GraphModule
    hidden_size: int
    positions: list[Position]

    @property
    def last(self) -> Position:
        return self.positions[-1]

    @property
    def centered(self) -> bool:
        """Whether any position is read by LayerNorms (:attr:`Position.centered`)."""
        return any(p.centered for p in self.positions)

    def module(self, node: Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def tied_head(self) -> Optional[tuple[Node, Node]]:
        """(embedding node, head node) when a Linear shares the token embedding's weight: a reader of the last
        position, or, where the embedding is rotated, a Linear reading no stream value (BERT's decoder behind
        the head's own transform; a raw embedding keeps its table as it is)."""
        embeddings = [w for w in self.positions[0].writers if isinstance(self.module(w), nn.Embedding)]
        stream = {node for p in self.positions for node in p.readers + p.writers}
        others = [node for node in self.gm.graph.nodes if node.op == "call_module" and node not in stream
                  and isinstance(self.module(node), nn.Linear)] if self.positions[0].rotated else []
        for readers in (self.last.readers, others):
            for writer in embeddings:
                reader = next((r for r in readers if self.module(r).weight is self.module(writer).weight), None)
                if reader is not None:
                    return writer, reader
        return None

    def branch_sites(self) -> list[tuple[int, NormSite]]:
        """``(position, site)`` of every writer-side RMSNorm whose input is written by Linears only: a
        branch ``x + A·norm(y)`` that fuse records as a ``NormBranch`` and pass 7 slices in its own basis."""
        return [(p.index, site) for p in self.positions for site in p.writer_norms
                if site.inner_writers and not site.spec.centered]

    def block_writers(self) -> list[tuple[str, int]]:
        """``(module, position)`` of every module writing a rotated position, directly or inside a
        post-norm branch: where pass 4 looks for MLPs and attentions."""
        writers = [(str(w.target), p.index) for p in self.positions if p.rotated for w in p.writers]
        return writers + [(str(w.target), index) for index, site in self.branch_sites() for w in site.inner_writers]

    def has_position_table(self) -> bool:
        """Whether an embedding besides the token embedding writes the first position (learned
        positions: inputs longer than the table cannot run)."""
        return any(isinstance(self.module(w), nn.Embedding) for w in self.positions[0].writers[1:])

    def block_groups(self) -> list[list[int]]:
        """Rotated positions grouped by the block that reads them.

        A position belongs to the module holding the residual add it feeds (the add of the position
        whose skip starts there). Consecutive positions fed into the same module, such as the
        attention input and the MLP input of one pre-norm decoder layer, form one group; the last
        position and positions whose add has no module path stand alone.
        """
        consumer = {p.skip.source: module_path(p.skip.joint)[0] for p in self.positions if p.skip is not None}
        # a position and the next one share a basis only if both are centred or neither is (and post-norm
        # positions, with no skip edge, stand alone)
        groups: list[list[int]] = []
        for p in self.positions:
            if not p.rotated:
                continue
            block = consumer.get(p.index) or None
            previous = groups[-1][-1] if groups else None
            follows = previous is not None and p.skip is not None and p.skip.source == previous \
                and p.centered == self.positions[previous].centered  # one basis: centred alike
            if follows and block is not None and consumer.get(previous) == block:
                groups[-1].append(p.index)
            else:
                groups.append([p.index])
        return groups

    def table(self) -> str:
        rows = []
        for p in self.positions:
            writers = [str(w.target) for w in p.writers] + [f"{s.path} [{s.pattern}]" for s in p.writer_norms]
            writers += [f"{value.name} [kept in model coordinates]" for value, _ in p.opaque_branches]
            rows.append([
                p.index,
                p.root.name,
                "rotated" if p.rotated else "raw",
                "-" if p.skip is None else f"#{p.skip.source}",
                short_names(writers),
                ", ".join(f"{s.path} [{s.pattern}]" + (" [also read in model coordinates]" if s.model_reads else "")
                          for s in p.norms) or "-",
                short_names([str(r.target) for r in p.readers]),
            ])
        head = ["#", "root node", "kind", "skip from", "writers", "reader norms", "readers"]
        return f"residual stream of width {self.hidden_size}, {len(self.positions)} positions\n" + tabulate(rows, head)

    def __str__(self) -> str:
        return self.table()


def short_names(names: list[str]) -> str:
    """``a.b.{q,k,v}`` for names sharing a prefix."""
    if not names:
        return "-"
    prefix = names[0].rsplit(".", 1)[0] + "." if len(names) > 1 and "." in names[0] else ""
    if prefix and all(n.startswith(prefix) for n in names):
        return prefix + "{" + ",".join(n[len(prefix):] for n in names) + "}"
    return ", ".join(names)


# --- what a node is ---------------------------------------------------------------------------
class NodeKinds:
    """Classifies single nodes of a canonical graph (results cached per node)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self._index = module_index(gm)
        self._constant: dict[Node, bool] = {}
        self._norms: dict[Node, Optional[NormSite]] = {}

    def module_of(self, node: Node) -> Optional[nn.Module]:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def is_linear(self, node: Node) -> bool:
        """A Linear, or the grouped Linear of a mixture of experts (whose second argument, the
        expert of each row, is not stream data)."""
        return isinstance(self.module_of(node), LINEARS)

    def is_embedding(self, node: Node) -> bool:
        return isinstance(self.module_of(node), nn.Embedding)

    def constant(self, value) -> bool:
        """A number, or a tensor computed from parameters and constants only (never from the input)."""
        return from_parameters(value, self._constant)

    def constant_scalar(self, value) -> bool:
        """A number, or a one-element tensor computed from parameters/constants only (not from the input)."""
        example = example_value(value)
        return isinstance(value, (int, float)) or (example is not None and example.numel() == 1 and self.constant(value))

    def affine_step(self, node: Node, src: Node) -> bool:
        """Whether ``node`` maps ``src`` by ``s ⊙ src + c`` with constants per hidden coordinate (the
        same for every token): ``src * k``, ``src / k``, ``src ± k``, ``k - src`` (a scaling by a
        number is a walk-through, not this)."""
        if not ops.calls(node, ops.AFFINE_STEPS) or len(node.args) != 2 or node.kwargs:
            return False
        first, second = node.args
        if (first is src) == (second is src) or (node.target is ops.aten.div.Tensor and second is src):
            return False
        other = second if first is src else first
        vin, vout = example_value(src), example_value(node)
        if vin is None or vout is None or vin.dim() == 0 or vout.shape != vin.shape or not self.constant(other):
            return False
        if ops.calls(node, ops.SCALINGS) and self.row_scalar(other, vin):
            return False
        if isinstance(other, (int, float)):
            return True
        k = example_value(other)
        return k is not None and k.dim() <= vin.dim() and all(size == 1 for size in k.shape[:-1]) \
            and (k.dim() == 0 or k.shape[-1] in (1, vin.shape[-1]))

    def affine_chain(self, first: Node, src: Node) -> StreamAffine:
        """The affine map starting with step ``first`` on ``src``: followed through further steps and
        casts while each value has one user."""
        steps, current = [first], first
        while len(current.users) == 1:
            user = next(iter(current.users))
            if self.norm_site(user) is not None or not (self.affine_step(user, current) or self.cast_of(user, current)):
                break  # a norm's own leading cast stays the norm's
            steps.append(user)
            current = user
        return StreamAffine(src, steps)

    def branch_affine(self, branch: Node) -> Optional[StreamAffine]:
        """The affine map at the top of a branch (``g ⊙ o_proj(…)``, ``(mlp(…) + b) ⊙ s``), if any:
        steps and casts followed down from the value added to the stream."""
        chain: list[tuple[Node, Node]] = []  # (step, the value it maps), from the top down
        current = branch
        while isinstance(current, Node) and current.op == "call_function" and len(current.users) == 1 \
                and self.norm_site(current) is None:  # a norm's own scale (Gemma's ``1 + w``) stays the norm's
            inner = next((a for a in current.args[:2] if isinstance(a, Node) and not self.constant(a)), None)
            if inner is None or not (self.affine_step(current, inner) or self.cast_of(current, inner)):
                break
            chain.append((current, inner))
            current = inner
        while chain and not self.affine_step(*chain[-1]):  # casts below the lowest step stay in the branch
            chain.pop()
        return StreamAffine(chain[-1][1], [step for step, _ in reversed(chain)]) if chain else None

    @staticmethod
    def cast_of(node: Node, src: Node) -> bool:
        return ops.calls(node, ops.CASTS | ops.IDENTITIES) and node.args[0] is src

    def walks_through(self, node: Node, src: Node) -> bool:
        """Whether ``node`` passes ``src`` on without mixing the hidden (last) dimension."""
        if node.op != "call_function":
            return False
        vin, vout = example_value(src), example_value(node)
        if vin is None or vout is None or vin.dim() == 0 or vout.dim() == 0 or vin.shape[-1] != vout.shape[-1]:
            return False
        if ops.calls(node, ops.CASTS | ops.RESHAPES | ops.UNIT_DIMS | ops.IDENTITIES):
            return node.args[0] is src
        if ops.calls(node, ops.LEADING_INDEXING):
            dim = node.args[1] if len(node.args) > 1 else 0
            return node.args[0] is src and dim not in (-1, vin.dim() - 1)
        if ops.calls(node, ops.ROW_GATHERS | {ops.aten.index.Tensor}):
            return node.args[0] is src and self.leading_only(node, vin)
        if ops.calls(node, {ops.aten.repeat.default}):  # copies of whole rows (every token to every expert)
            return node.args[0] is src and len(node.args[1]) == vin.dim() and node.args[1][-1] == 1
        if ops.calls(node, {ops.aten.expand.default, ops.aten.expand_as.default}):  # the same, as a view
            return node.args[0] is src
        if ops.calls(node, ops.MIXES):  # A·X: rows mixed along a leading dimension (the copies of a stream)
            return node.args[1] is src and node.args[0] is not src and vout.dim() == vin.dim()
        if ops.calls(node, ops.ROW_SUMS):
            dims = [d % vin.dim() for d in node.args[1]] if len(node.args) > 1 and node.args[1] else []
            return node.args[0] is src and bool(dims) and vin.dim() - 1 not in dims
        if ops.calls(node, ops.SCALINGS) and len(node.args) == 2:
            a, b = node.args
            if a is src:
                return self.row_scalar(b, vin)
            return node.target is ops.aten.mul.Tensor and b is src and self.row_scalar(a, vin)
        return False

    @staticmethod
    def merged_copies(node: Node, src: Node) -> Optional[int]:
        """``N`` when ``node`` merges the last two dimensions of ``src`` (``[..., N, D] -> [..., N·D]``)."""
        if not ops.calls(node, ops.MERGES) or node.args[0] is not src:
            return None
        vin, vout = example_value(src), example_value(node)
        if vin is None or vout is None or vin.dim() < 3 or vout.dim() != vin.dim() - 1:
            return None
        if tuple(vout.shape[:-1]) != tuple(vin.shape[:-2]) or vout.shape[-1] != vin.shape[-2] * vin.shape[-1]:
            return None
        return int(vin.shape[-2])

    @staticmethod
    def squares(node: Node, src: Node) -> bool:
        """``src²`` elementwise (``pow(src, 2)``, ``square(src)``, ``src * src``)."""
        if ops.calls(node, {ops.aten.pow.Tensor_Scalar}):
            return node.args[0] is src and node.args[1] == 2
        if ops.calls(node, {ops.aten.square.default}):
            return node.args[0] is src
        return ops.calls(node, {ops.aten.mul.Tensor}) and node.args[0] is src and node.args[1] is src

    @staticmethod
    def row_means(square: Node, row: str) -> list[Node]:
        """The means over the last dimension of ``square`` (sums need nothing); anything else using the
        squares is refused naming it."""
        means, last = [], example_value(square).dim() - 1
        for user in square.users:
            dims = user.args[1] if ops.calls(user, ops.ROW_SUMS) and len(user.args) > 1 else None
            if dims is None or [d % (last + 1) for d in dims] != [last]:
                raise GraphStructureError(f"{describe(user)} uses the squares of the stream's copies merged by "
                                          f"{row} other than summed or averaged over the row")
            if ops.calls(user, {ops.aten.mean.dim}):
                means.append(user)
        return means

    def gate(self, node: Node, src: Node) -> bool:
        """Whether ``node`` multiplies or divides ``src`` elementwise by a value computed from the input (a
        gate per coordinate, ``src ⊙ σ(g(src))``), keeping its shape: no rotation commutes with it."""
        if not ops.calls(node, ops.SCALINGS) or len(node.args) != 2 or node.kwargs or src not in node.args[:2]:
            return False
        other = node.args[1] if node.args[0] is src else node.args[0]
        vin, vout = example_value(src), example_value(node)
        return (isinstance(other, Node) and other is not src and not self.constant(other) and vin is not None
                and vout is not None and vout.shape == vin.shape and vin.dim() > 0)

    def skip_map(self, node: Node, src: Node) -> bool:
        """Whether ``node`` starts a per-dimension affine map of ``src`` that ends in a residual add (the
        skip edge of an interpolated update, ``(1 − r) ⊙ x + r ⊙ y``)."""
        if not self.affine_step(node, src):
            return False
        end = self.affine_chain(node, src).end
        return len(end.users) == 1 and ops.is_tensor_add(next(iter(end.users)))

    @staticmethod
    def shape_query(node: Node, src: Node) -> bool:
        """Whether ``node`` reads only the shape, dtype or device of ``src``: the size of a leading
        dimension, a new tensor made like it (``zeros_like``, ``new_zeros``), or another tensor cast to its
        dtype (``y.type_as(src)``, as a bf16 router casts its float32 weights back). Not ``y.expand_as(src)``:
        its result has the stream's width, which slicing changes."""
        if ops.calls(node, ops.SYM_SIZE):
            return node.args[1] not in (-1, example_value(src).dim() - 1)
        if ops.calls(node, {ops.aten.type_as.default}):
            return node.args[1] is src and node.args[0] is not src
        return ops.calls(node, ops.LIKE) and node.args[0] is src

    def row_scalar(self, value, stream) -> bool:
        """A factor the same for every hidden coordinate of a row: a constant scalar, or a tensor
        whose last dimension is 1 (per-token routing weights: ``(w x) Q = w (x Q)``)."""
        if self.constant_scalar(value):
            return True
        example = example_value(value)
        return example is not None and 0 < example.dim() <= stream.dim() and example.shape[-1] == 1

    @staticmethod
    def leading_only(node: Node, value) -> bool:
        """Whether a gather picks rows along leading dims only: ``x[idx]``, ``index_select(x, 0, i)``,
        ``repeat_interleave(x, k, 0)``."""
        if node.target is ops.aten.index.Tensor:
            return 0 < len(node.args[1]) < value.dim()
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if node.target is ops.aten.index_select.default:
            dim = node.args[1]
        return isinstance(dim, int) and dim % value.dim() != value.dim() - 1

    @staticmethod
    def scattered_rows(node: Node) -> Optional[tuple[Node, Node]]:
        """``(base, values)`` when ``node`` scatters ``values`` along leading dimensions only into ``base``, a new zero
        tensor or such a scatter with no other use (X-MOD's language adapters, one per language:
        ``out = zeros_like(x); out[rows_l] = adapter_l(x[rows_l])``): linear in the values — every row a sum of
        value rows or zero —, and a rotation of the last dimension passes through, so their writers can be rotated
        where they are; the zero tensor takes the width of the position they are added to (fuse writes it out)."""
        if not ops.calls(node, ops.SCATTERS) or len(node.args) < 3 or not isinstance(node.args[2], Node):
            return None
        base, indices, values = node.args[:3]
        out, rows = example_value(node), example_value(values)
        if not (isinstance(base, Node) and len(base.users) == 1 and isinstance(indices, (list, tuple))
                and out is not None and rows is not None and rows.dim() > 0 and rows.shape[-1] == out.shape[-1]
                and (ops.calls(base, ops.ZEROS_LIKE) or NodeKinds.scattered_rows(base) is not None)):
            return None
        covered = 0
        for index in indices:
            example = example_value(index) if isinstance(index, Node) else None
            if index is not None and example is None:
                return None
            covered += example.dim() if example is not None and example.dtype in (torch.bool, torch.uint8) else 1
        return (base, values) if covered < out.dim() else None

    def passed_on(self, node: Node) -> Optional[Node]:
        """The tensor a walk-through node passes on (inverse of :meth:`walks_through`)."""
        for arg in node.args[:2]:
            if isinstance(arg, Node) and self.walks_through(node, arg):
                return arg
        return None

    def norm_site(self, node: Node) -> Optional[NormSite]:
        """The matched norm region ``node`` belongs to (verified numerically by the registry), if any."""
        if node.op != "call_function":
            return None
        region = region_of(self.gm, node, self._index)
        if region is None:
            return None
        if region.output not in self._norms:
            name, spec, _ = match_norm(region)
            self._norms[region.output] = None if spec is None else NormSite(region, name, spec)
        return self._norms[region.output]

    def norm_output(self, node: Node) -> Optional[NormSite]:
        """The matched norm whose output ``node`` is, if any."""
        site = self.norm_site(node)
        return site if site is not None and site.region.output is node else None

    def why_not_norm(self, node: Node) -> str:
        """Why the module around ``node`` is not a norm: the rejected patterns and what to do."""
        region = region_of(self.gm, node, self._index)
        if region is None:
            return ""
        _, _, notes = match_norm(region)
        detail = f" ({'; '.join(notes)})" if notes else ""
        return (f". Its module '{region.path}' ({region.cls}) matches no registered norm pattern{detail}; "
                "register one with fxslice.register_norm_pattern")

    def token_embedding(self) -> Node:
        """The ``nn.Embedding`` call that reads ``input_ids``: through casts and reshapes only, else
        (Gemma 3 replaces out-of-vocabulary ids first) through any ops that take the ids as their
        first argument and keep them integers (``clone``, ``index_put``, ``masked_fill``)."""
        embeddings = [node for node in self.gm.graph.nodes if self.is_embedding(node)]
        for steps in (ops.RESHAPES | ops.CASTS, None):
            for node in embeddings:
                ids = node.args[0]
                while _integer_step(ids, steps):
                    ids = ids.args[0]
                if isinstance(ids, Node) and ids.op == "placeholder":
                    return node
        raise GraphStructureError("no token embedding (an nn.Embedding reading input_ids) found in the graph")


def _integer_step(node: object, steps) -> bool:
    """Whether ``node`` computes integer ids from its first argument (by one of ``steps``, or by any
    op when ``steps`` is None)."""
    if steps is not None:
        return ops.calls(node, steps)
    if not isinstance(node, Node) or node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    value = example_value(node)
    return value is not None and not value.is_floating_point()


# --- the walk ---------------------------------------------------------------------------------
class Use(enum.Enum):
    """How a node uses a value of the residual stream."""

    NORM = "reads it through a norm"
    LINEAR = "reads it directly"
    RESIDUAL_ADD = "adds a branch to it"
    ALIAS = "passes it on unchanged in the hidden dimension"
    MERGED = "merges its copies into one row"
    AFFINE = "maps it by a per-dimension affine map (a residual gate or scale)"
    SHAPE_QUERY = "asks for its shape (a leading dimension's size, or a new tensor like it)"


class OpaqueBranch(GraphStructureError):
    """A branch's writers cannot be rotated where they are: an op that is not linear in the stream's
    coordinates comes after them, or their output is used elsewhere too."""


class StreamWalk:
    """Follows the stream from the token embedding, position by position."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.kinds = NodeKinds(gm)
        self.skip_affines: dict[Node, StreamAffine] = {}  # residual add -> the affine map on its skip edge
        self.hidden = 0  # the stream's width, known once the walk starts
        self.passthrough_sources: dict[Node, NormSite] = {}  # a passthrough's last value -> its norm
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.position_of: dict[Node, Position] = {}  # every value of the positions walked so far -> its position
        # residual adds taking a position's value that the stream does not go on through from there (the
        # stream goes on through the first in graph order): each must be claimed as a later position's long skip
        self.later_adds: dict[Node, list[Position]] = {}
        # norms of a raw position besides the one the stream goes on through: each must write a later branch
        self.later_norms: dict[Node, NormSite] = {}
        # residual adds a post-norm block's norm carries the stream into -> (that norm, its value the add takes)
        self.carried_adds: dict[Node, tuple[NormSite, Node]] = {}

    def run(self) -> Structure:
        start = self.projected(self.kinds.token_embedding())
        hidden = self.hidden = int(example_value(start).shape[-1])
        positions: list[Position] = []
        current = Position(0, start, writers=[start])
        while True:
            add, writer_norm, affine = self.collect_consumers(current)
            has_readers = bool(current.norms or current.direct_readers)
            if writer_norm is not None:
                # the whole position feeds one norm whose output continues the stream: a raw position
                current.rotated = False
                positions.append(current)
                current = Position(len(positions), writer_norm.region.output, writer_norms=[writer_norm])
            elif affine is not None:  # the stream goes on through a per-dimension affine map, nothing added
                positions.append(current)
                current = Position(len(positions), affine.end, skip=Skip(None, affine.end, current.index, affine))
            elif add is None:
                if not has_readers:
                    raise GraphStructureError(f"the residual stream ends at {describe(current.root)} with no reader")
                positions.append(current)
                break
            elif has_readers or add in self.skip_affines or current.branch_affine is not None:
                positions.append(current)
                current = self.next_position(add, current, len(positions))
            else:  # nothing reads this value: one sum with the next (token + position embeddings, x + a + b)
                current = self.merged_position(add, current)
        for i, p in enumerate(positions):
            p.index = i
        for p in positions:
            if p.skip is not None:
                p.skip.source = next(i for i, q in enumerate(positions) if p.skip.stream_value in q.aliases)
        for add, (source, *_) in self.later_adds.items():
            raise GraphStructureError(f"position {source.index} ('{source.root.name}') feeds {describe(add)} besides "
                                      "the residual add the stream goes on through, and no later position adds it as a "
                                      "whole (a long skip)")
        for site in self.later_norms.values():
            raise GraphStructureError(f"the output of norm '{site.path}' (a second norm of the stream where another "
                                      "continues it) is not added to the stream by a later residual add")
        claimed = {value for p in positions for _, value, _ in p.passthroughs}
        for value, site in self.passthrough_sources.items():
            if value not in claimed:
                raise GraphStructureError(f"the output of norm '{site.path}' reaches {describe(next(iter(value.users)))}, "
                                          "which is not a residual add of the stream: it cannot be rotated")
        return Structure(self.gm, hidden, positions)

    def projected(self, embedding: Node) -> Node:
        """Where the stream starts: the embedding, or the one Linear projecting it to another width
        (OPT's ``project_in`` when ``word_embed_proj_dim`` differs from the hidden size)."""
        users, frontier = [], [embedding]
        while frontier:
            src = frontier.pop()
            for user in src.users:
                if self.kinds.walks_through(user, src):
                    frontier.append(user)
                else:
                    users.append(user)
        if len(users) == 1 and self.kinds.is_linear(users[0]):
            width = example_value(embedding).shape[-1]
            if self.kinds.module_of(users[0]).out_features != width:
                return users[0]
        return embedding

    def _branch(self, add: Node, current: Position) -> tuple[Node, Node]:
        """(branch, stream operand) of a residual add."""
        stream_side = current.aliases + ([self.skip_affines[add].end] if add in self.skip_affines else [])
        if add.args[0] in stream_side:
            return add.args[1], add.args[0]
        return add.args[0], add.args[1]

    def next_position(self, add: Node, current: Position, index: int) -> Position:
        """The position ``add`` produces. After a post-norm block (``add`` in ``carried_adds``: ``x_b = y + f(y)``,
        ``y = norm_a(x_a)``) it has no skip edge: ``y`` on that edge is a passthrough of ``current`` (fuse puts the
        norm's ``diag(γ)`` + ``β`` there, centred in a LayerNorm model, ``Q_bᵀ M diag(γ) Q_a`` after rotation), so both
        sums are rotated and sliced."""
        carried = self.carried_adds.get(add)
        if carried is None:
            branch, operand = self._branch(add, current)
        else:
            operand = carried[1]
            branch = add.args[1] if add.args[0] is operand else add.args[0]
        branch_affine = self.kinds.branch_affine(branch)
        if carried is not None and branch_affine is not None:  # its constant would need the skip edge's bias
            raise GraphStructureError(f"{describe(add)} adds a value mapped by a per-dimension affine map to the "
                                      f"output of norm '{carried[0].path}' (a post-norm block's skip edge)")
        passthroughs: list[tuple[NormSite, Node, Node]] = [] if carried is None else [(*carried, add)]
        long_skips: list[tuple[Position, Node, Node]] = []
        writers, writer_norms, reshapes, opaque = self.trace_branch(
            branch, branch if branch_affine is None else branch_affine.start, add, current, passthroughs, long_skips)
        if long_skips and branch_affine is not None:
            raise GraphStructureError(f"{describe(add)} adds an earlier position's value through a per-dimension map")
        return Position(index, add, writers=writers, writer_norms=writer_norms, reshapes=reshapes,
                        skip=None if carried else Skip(add, operand, current.index, self.skip_affines.get(add)),
                        branch_affine=None if opaque else branch_affine, passthroughs=passthroughs,
                        opaque_branches=opaque, long_skips=long_skips)

    def merged_position(self, add: Node, current: Position) -> Position:
        branch, _ = self._branch(add, current)
        if self.kinds.branch_affine(branch) is not None:
            raise GraphStructureError(f"{describe(add)} adds a value mapped by a per-dimension affine map to a stream "
                                      "value nothing reads: only a whole branch's map can move into its writers")
        passthroughs, long_skips = list(current.passthroughs), list(current.long_skips)
        writers, writer_norms, reshapes, opaque = self.trace_branch(branch, branch, add, current, passthroughs,
                                                                    long_skips)
        merged = Position(current.index, add, writers=current.writers + writers,
                          writer_norms=current.writer_norms + writer_norms, skip=current.skip,
                          reshapes=current.reshapes + reshapes, passthroughs=passthroughs,
                          opaque_branches=current.opaque_branches + opaque, long_skips=long_skips)
        # the summed value's position is the merged one
        self.position_of.update({key: merged for key, value in self.position_of.items() if value is current})
        for sources in self.later_adds.values():
            sources[:] = [merged if source is current else source for source in sources]
        return merged

    def trace_branch(self, branch: Node, start: Node, add: Node, position: Position,
                     passthroughs: list[tuple[NormSite, Node, Node]], long_skips: list[tuple[Position, Node, Node]]
                     ) -> tuple[list[Node], list[NormSite], list[Node], list[tuple[Node, Node]]]:
        """:meth:`trace_writers` of the value ``add`` takes from a branch (from ``start``), plus the branches
        kept in the model's coordinates: none, or ``[(branch, add)]`` with no writers when its writers cannot
        be rotated where they are (the passthroughs and long skips met on the way are then not claimed: a long
        skip's add left unclaimed is refused at the end of :meth:`run`, since its value is rotated)."""
        met: list[tuple[NormSite, Node, Node]] = []
        skips: list[tuple[Position, Node, Node]] = []
        try:
            writers, writer_norms, reshapes = self.trace_writers(start, position, met, skips, add)
        except OpaqueBranch:
            self.check_opaque(branch, add)
            return [], [], [], [(branch, add)]
        for source, value, user in skips:
            sources = self.later_adds.get(user, [])
            if source in sources:
                sources.remove(source)
                if not sources:
                    del self.later_adds[user]
            else:
                raise GraphStructureError(f"{describe(user)} takes the value of position {source.index} "
                                          f"({describe(value)}) on its way into {describe(add)}; only a residual add "
                                          "may take an earlier position's value whole")
        passthroughs.extend(met)
        long_skips.extend(skips)
        return writers, writer_norms, reshapes, []

    def check_opaque(self, branch: Node, add: Node) -> None:
        """A branch kept in the model's coordinates is exact whatever computed it, because it sees no
        rotated value: the stream's readers hand it model-coordinate values, every other use of a stream
        value is judged by :meth:`use_of` and of a norm's output by :meth:`norm_readers`, and a norm output
        carried towards an add (a passthrough) that no branch claims is refused at the end of :meth:`run`.
        It must be a full-width value the inserted Linear can map, and made without a tensor shaped like a rotated
        value (``zeros_like(y)`` filled with model coordinates would take ``y``'s sliced width)."""
        value = example_value(branch)
        if value is None or value.dim() == 0 or value.shape[-1] != self.hidden:
            raise GraphStructureError(f"{describe(add)} adds {describe(branch)} to the residual stream, a value "
                                      "fxslice can neither trace to its writers nor map as a whole (not "
                                      f"{self.hidden} wide in its last dimension)")
        seen, stack = set(), [branch]
        while stack:
            node = stack.pop()
            if node in seen or node in self.position_of:
                continue
            seen.add(node)
            source = node.args[0] if ops.calls(node, ops.LIKE) else None
            if isinstance(source, Node) and (source in self.position_of or self.kinds.norm_output(source)):
                raise GraphStructureError(f"{describe(node)} makes a tensor shaped like {describe(source)}, a value "
                                          f"the rotation slices, and {describe(add)} adds it to the stream in the "
                                          "model's coordinates: its width would follow the slice")
            stack.extend(node.all_input_nodes)

    def use_of(self, user: Node, src: Node, index: int, aliases: list[Node]) -> tuple[Use, Optional[NormSite]]:
        """How ``user`` uses stream value ``src`` (of position ``index``, whose values so far are
        ``aliases``); a ``GraphStructureError`` naming the node for any other use."""
        kinds = self.kinds
        site = kinds.norm_site(user)
        if site is not None and site.region.input is src:
            return Use.NORM, site
        if kinds.is_linear(user):
            return Use.LINEAR, None
        if kinds.affine_step(user, src):
            return Use.AFFINE, None
        if ops.is_tensor_add(user):
            if user.args[0] in aliases and user.args[1] in aliases:
                raise GraphStructureError(f"{describe(user)} adds the residual stream to itself")
            return Use.RESIDUAL_ADD, None
        if kinds.walks_through(user, src):
            return Use.ALIAS, None
        if kinds.shape_query(user, src):
            return Use.SHAPE_QUERY, None
        if kinds.merged_copies(user, src) is not None:
            return Use.MERGED, None
        raise GraphStructureError(
            f"{describe(user)} consumes the residual stream (position {index}, value '{src.name}'); only norms matched by a "
            "registered pattern, linear layers, residual adds and ops that keep the hidden dimension may read it"
            + kinds.why_not_norm(user)
        )

    def collect_consumers(self, position: Position) -> tuple[Optional[Node], Optional[NormSite], Optional[StreamAffine]]:
        """Fill aliases, readers, reshapes of ``position``; return its residual add (at most one; after a post-norm
        block the add its norm's output is carried into), the norm whose output continues the stream (a
        writer-side norm) and the per-dimension affine map whose output continues it with nothing added, if any. An affine map on the stream side of a
        residual add is recorded in ``skip_affines``."""
        aliases, frontier = [position.root], [position.root]
        adds: list[Node] = []
        sites: list[NormSite] = []
        continuations: list[StreamAffine] = []
        while frontier:
            src = frontier.pop()
            for user in list(src.users):
                if user in aliases or user in adds:
                    continue
                use, site = self.use_of(user, src, position.index, aliases)
                if use is Use.NORM and site not in sites:
                    sites.append(site)
                elif use is Use.LINEAR:
                    position.direct_readers.append(user)
                elif use is Use.RESIDUAL_ADD:
                    adds.append(user)
                elif use is Use.AFFINE:
                    affine = self.kinds.affine_chain(user, src)
                    joint = next(iter(affine.end.users)) if len(affine.end.users) == 1 else None
                    if joint is not None and ops.is_tensor_add(joint) and joint not in adds:
                        self.skip_affines[joint] = affine
                        adds.append(joint)
                    else:
                        continuations.append(affine)
                elif use is Use.ALIAS:
                    aliases.append(user)
                    frontier.append(user)
                    if ops.calls(user, ops.SIZED):
                        position.reshapes.append(user)
                elif use is Use.MERGED:
                    position.merged.append(self.merged_reads(user, src, position))
        position.aliases = aliases
        self.position_of.update({alias: position for alias in aliases})
        if len(adds) > 1 and not continuations:  # the stream goes on through the first; later ones take it whole
            adds.sort(key=self.order.__getitem__)
            if any(add in self.skip_affines for add in adds[1:]):
                raise GraphStructureError(f"position {position.index} ('{position.root.name}') feeds "
                                          f"{describe(adds[1])} through a per-dimension map besides {describe(adds[0])}")
            for add in adds[1:]:
                self.later_adds.setdefault(add, []).append(position)
            adds = adds[:1]
        if len(adds) + len(continuations) > 1:
            raise GraphStructureError(
                f"position {position.index} ('{position.root.name}') feeds {len(adds)} residual adds and "
                f"{len(continuations)} per-dimension maps continuing the stream: "
                + "; ".join(describe(n) for n in adds + [a.steps[0] for a in continuations])
            )
        continuing: list[NormSite] = []  # norms whose outputs continue the stream
        for site in sorted(sites, key=lambda site: self.order[site.region.output]):
            readers = self.norm_readers(site, passthrough=bool(adds))
            if readers is None:
                continuing.append(site)
            else:
                site.readers = readers
                position.norms.append(site)
                position.reshapes.extend(site.reshapes)
        stream_norm = continuing[0] if continuing else None
        if stream_norm is not None and (position.norms or adds or continuations or position.direct_readers):
            raise GraphStructureError(
                f"the output of norm '{stream_norm.path}' is used as the residual stream while position "
                f"{position.index} is read elsewhere too: {describe(stream_norm.region.output)}")
        # a raw position's other norms (Dory normalises the input section's output twice: the stream, and the
        # value every loop adds again) must each write a later branch, from the model's coordinates
        self.later_norms.update({site.region.output: site for site in continuing[1:]})
        if stream_norm is not None and continuations:
            raise GraphStructureError(f"the stream at position {position.index} goes on through both norm "
                                      f"'{stream_norm.path}' and {describe(continuations[0].steps[0])}")
        carriers = [site for site in position.norms if site.carried is not None]
        if carriers and (stream_norm is not None or continuations or len(carriers) > 1):
            others = [c.carried[1] for c in carriers[1:]] + [a.steps[0] for a in continuations] + (
                [stream_norm.region.output] if stream_norm is not None else [])
            raise GraphStructureError(f"the stream at position {position.index} goes on through norm '{carriers[0].path}' "
                                      f"(a post-norm block's skip edge) and through {describe(others[0])} too")
        if carriers:  # a post-norm block: the stream goes on through the residual add taking the norm's output
            value, add = carriers[0].carried
            self.carried_adds[add] = (carriers[0], value)
            return add, None, None
        return (adds[0] if adds else None), stream_norm, (continuations[0] if continuations else None)

    def merged_reads(self, merge: Node, src: Node, position: Position) -> MergedCopies:
        """What reads the stream's copies merged into one row: Linears (direct readers of ``N`` blocks),
        and squares averaged or summed over the row (``rsqrt(mean(x²))``: a factor per token that no
        rotation of the copies changes); a ``GraphStructureError`` naming any other reader."""
        merged = MergedCopies(merge, self.kinds.merged_copies(merge, src))
        if ops.calls(merge, ops.SIZED):
            position.reshapes.append(merge)
        frontier = [merge]
        while frontier:
            value = frontier.pop()
            for user in value.users:
                if self.kinds.is_linear(user):
                    position.direct_readers.append(user)
                elif self.kinds.cast_of(user, value):
                    frontier.append(user)
                elif self.kinds.squares(user, value):
                    merged.means.extend(self.kinds.row_means(user, describe(merge)))
                else:
                    raise GraphStructureError(
                        f"{describe(user)} reads the copies of the residual stream merged into one row by "
                        f"{describe(merge)}; only Linears and mean squares over the row may read them")
        return merged

    def norm_readers(self, site: NormSite, passthrough: bool = False) -> Optional[list[Node]]:
        """Linears reading a norm's output (through walk-through ops); None when the output is used
        as the stream instead (a writer-side norm: it reaches a residual add or another norm); a
        ``GraphStructureError`` naming the node for any other reader. With ``passthrough`` (the
        position has its own residual add, so the norm does not continue the stream), paths of a
        norm read by Linears that reach another add are recorded in ``site.passthroughs``. Without it, a
        norm read by Linears whose output is also the skip operand of one residual add (a post-norm block,
        ``LN(x + f(x))`` with ``x`` the previous norm's output) carries the stream on: ``site.carried``."""
        readers, frontier, seen = [], [site.region.output], {site.region.output}
        walked = {site.region.output}  # the norm's output and what walks it through
        scaled: dict[Node, Node] = {}  # a walked value -> the first op on its way that scales or sums its rows
        passthroughs: list[tuple[Node, Node]] = []
        stream_adds: list[tuple[Node, Node]] = []  # (value, add) where the stream may go on from the norm
        unknown: Optional[Node] = None  # the first user that is none of the above
        model_reads: list[tuple[Node, Node]] = []
        while frontier:
            src = frontier.pop()
            for user in src.users:
                if user in seen:
                    continue
                seen.add(user)
                if self.kinds.walks_through(user, src):
                    frontier.append(user)
                    walked.add(user)
                    if src in scaled or ops.calls(user, ops.SCALINGS | ops.ROW_SUMS | ops.MIXES):
                        scaled[user] = scaled.get(src, user)
                    if ops.calls(user, ops.SIZED):
                        site.reshapes.append(user)
                elif self.kinds.is_linear(user):
                    self.check_shift(site, src, user, scaled)
                    readers.append(user)
                elif self.kinds.shape_query(user, src):
                    continue
                elif ops.is_tensor_add(user) and passthrough and len(src.users) == 1:
                    passthroughs.append((src, user))
                elif ops.is_tensor_add(user) and not passthrough:
                    stream_adds.append((src, user))
                elif (ops.is_tensor_add(user) or self.kinds.norm_site(user) is not None
                      or self.kinds.skip_map(user, src)):
                    return None  # the stream goes on from here (through a per-dimension map on a skip edge: nGPT's)
                elif self.kinds.gate(user, src):
                    self.check_shift(site, src, user, scaled)
                    model_reads.append((src, user))
                elif unknown is None:
                    unknown = user
        if unknown is not None:
            if stream_adds:
                return None  # the stream may go on from the norm: the walk from there names the op
            raise GraphStructureError(
                f"the output of norm '{site.path}' is read by {describe(unknown)}, which is neither a Linear "
                "layer nor an op that keeps the hidden dimension, so what it reads cannot be rotated "
                "(a mixture-of-experts dispatch that no pattern of patterns/experts.py knows?)")
        for src, user in model_reads:  # both factors the norm's: no map on one edge can serve the product
            if walked.intersection(user.args[:2]) - {src}:
                raise GraphStructureError(f"the output of norm '{site.path}' is read by {describe(user)} as both of its "
                                          "factors: a product of two rotated values cannot be rotated")
        if (passthroughs or stream_adds) and not readers and not model_reads:
            return None  # a writer-side norm after all
        if len(stream_adds) > 1:
            return None  # not one post-norm skip edge: the walk from the norm's output judges it
        for src, user in passthroughs + stream_adds:
            self.check_shift(site, src, user, scaled)
        site.passthroughs = passthroughs + stream_adds
        site.carried = stream_adds[0] if stream_adds else None
        site.model_reads = model_reads
        self.passthrough_sources.update({value: site for value, _ in site.passthroughs})
        return readers

    @staticmethod
    def check_shift(site: NormSite, src: Node, user: Node, scaled: dict[Node, Node]) -> None:
        """A norm's shift ``β`` folds into what reads its output (a reader's bias, a read map's) only where no
        op on the way scales or sums its rows (``w·(γx̂ + β)`` is not ``w·γx̂ + β``)."""
        if site.spec.shift is not None and src in scaled:
            raise GraphStructureError(f"the output of norm '{site.path}' has a shift β and {describe(scaled[src])} "
                                      f"scales or sums its rows before {describe(user)} reads it: β cannot move "
                                      "into the reader")

    def trace_writers(self, branch: Node, position: Position, passthroughs: Optional[list] = None,
                      long_skips: Optional[list] = None, add: Optional[Node] = None
                      ) -> tuple[list[Node], list[NormSite], list[Node]]:
        """Walk back from the non-stream operand of a residual add (``add``) to the layers that wrote it.

        Returns the writer modules, writer-side norms and the width-carrying reshapes on the way; an earlier
        norm's passthrough met on the way goes to ``passthroughs`` as ``(norm, value, the node taking it)``, an
        earlier position's value to ``long_skips`` as ``(position, value, the node taking it)``.
        """
        writers: list[Node] = []
        reshapes: list[Node] = []
        norms: list[NormSite] = []
        frontier = [(branch, add)]
        while frontier:
            node, user = frontier.pop()
            source = self.position_of.get(node)
            if source is not None and source is not position and long_skips is not None:
                long_skips.append((source, node, user))
                continue
            if node in self.passthrough_sources:
                carrier = self.passthrough_sources[node]
                if carrier.carried is not None and carrier.carried != (node, user):
                    raise GraphStructureError(f"{describe(user)} takes the output of norm '{carrier.path}', which a "
                                              f"post-norm block carries into {describe(carrier.carried[1])}")
                if passthroughs is None:
                    raise GraphStructureError(f"{describe(node)} carries the output of norm "
                                              f"'{self.passthrough_sources[node].path}' into a sum no branch owns")
                passthroughs.append((self.passthrough_sources[node], node, user))
                continue
            if node in position.aliases:
                raise GraphStructureError(f"the residual stream reaches residual add through {describe(node)}")
            if len(node.users) != 1:
                raise OpaqueBranch(
                    f"{describe(node)} writes into the residual stream but its value is also used elsewhere "
                    f"({', '.join(u.name for u in node.users)}); its output cannot be rotated"
                )
            site = self.kinds.norm_output(node)
            if site is not None:
                norms.append(site)
                self.later_norms.pop(node, None)
                self.trace_inner_writers(site, position)
            elif self.kinds.is_linear(node) or self.kinds.is_embedding(node):
                writers.append(node)
            elif ops.is_tensor_add(node):
                frontier.extend((arg, node) for arg in node.args[:2])
            elif self.kinds.passed_on(node) is not None:
                if ops.calls(node, ops.SIZED):
                    reshapes.append(node)
                frontier.append((self.kinds.passed_on(node), node))
            elif (scattered := self.kinds.scattered_rows(node)) is not None:
                base, values = scattered
                if ops.calls(base, ops.ZEROS_LIKE):
                    reshapes.append(base)  # the zero tensor: fuse writes its width out, resizing follows it
                else:
                    frontier.append((base, node))  # an earlier scatter into the same tensor
                frontier.append((values, node))
            else:
                raise OpaqueBranch(
                    f"{describe(node)} produces a value that is added to the residual stream; fxslice can "
                    "only rotate linear layers, embeddings and norms matched by a registered pattern there"
                )
        return writers, norms, reshapes


    def trace_inner_writers(self, site: NormSite, position: Position) -> None:
        """The Linears whose sum a branch's writer-side norm normalises (none when an embedding, a norm
        or an unknown op writes it: the norm then keeps its full-width input)."""
        start = site.region.input  # used by the norm's nodes only, maybe more than once (x · rsqrt(mean(x²)))
        if any(user not in site.region.nodes for user in start.users):
            return
        if self.kinds.is_linear(start):
            writers, norms, reshapes = [start], [], []
        else:
            passed = self.kinds.passed_on(start)
            sources = start.args[:2] if ops.is_tensor_add(start) else [passed] if passed is not None else []
            writers, norms, reshapes = [], [], [start] if passed is not None and ops.calls(start, ops.SIZED) else []
            try:
                for source in sources:
                    found = self.trace_writers(source, position)
                    writers, norms, reshapes = writers + found[0], norms + found[1], reshapes + found[2]
            except GraphStructureError:
                return
        if writers and not norms and all(self.kinds.is_linear(w) for w in writers):
            site.inner_writers, site.inner_reshapes = writers, reshapes


def check_structure(structure: Structure) -> None:
    """Refuse what the rotation cannot keep exact: uncentrable LayerNorm positions, shared weights."""
    for p in structure.positions:
        if not p.centered:
            continue
        if p.merged:
            raise GraphStructureError(
                f"{describe(p.merged[0].reshape)} merges the copies of a LayerNorm model's stream: centring "
                "the stream (what makes its LayerNorms RMSNorms) changes the row's mean square")
        if p.direct_readers:
            raise GraphStructureError(
                f"position {p.index} is read by LayerNorms ({', '.join(s.path for s in p.norms)}) and by linears "
                f"without a norm ({short_names([str(r.target) for r in p.direct_readers])}): centring it, what makes "
                "the LayerNorms RMSNorms that a rotation passes, would change what the linears read")
        mapped = (p.skip.affine if p.skip is not None else None) or p.branch_affine
        if mapped is not None:
            raise GraphStructureError(
                f"{describe(mapped.steps[0])} maps the stream of a LayerNorm model per dimension: centring the "
                "stream (what makes its LayerNorms RMSNorms) does not commute with such a map")
        plain = [s.path for s in p.norms if not s.spec.centered]
        if plain:
            raise GraphStructureError(f"LayerNorm and RMSNorm readers mixed on the stream ({', '.join(plain)})")
    owner: dict[int, str] = {}
    tie = structure.tied_head()
    tied_names = {str(tie[0].target), str(tie[1].target)} if tie is not None else set()
    for p in structure.positions:
        for node in p.writers + p.readers:
            name, weight = str(node.target), structure.module(node).weight
            other = owner.setdefault(id(weight), name)
            if other != name and {other, name} != tied_names:
                raise GraphStructureError(
                    f"modules '{other}' and '{name}' share one weight on the stream (a layer run again, as a looped "
                    "model's loops do?): rotating it for one of the positions it touches breaks it for the other")


def analyse(gm: GraphModule) -> Structure:
    """Find the residual stream of a canonical graph (see module docstring)."""
    structure = StreamWalk(gm).run()
    check_structure(structure)
    return structure


NAME = "analyse"


def step(run: "Run") -> None:
    """Analyse; calibration windows longer than a learned position table are refused here."""
    with run.watch(NAME):
        run.structure = analyse(run.gm)
    check_lengths(run.batches, run.spec.max_positions if run.structure.has_position_table() else None)
