"""Pass 5 — fuse: an exactly equivalent graph whose stream algebra lives in module weights.

- Reader-side norms become weightless :class:`StreamNorm` modules; their scale ``γ`` and shift
  ``β`` fold into the linears behind them: ``W ← W diag(γ)``, ``b ← b + W β`` (Eq. 3 of the paper).
- Writer-side norms (Gemma 2/3 and OLMo 2 post-norms, Bloom's embedding norm) have no weight
  behind them to absorb a rotation: they become a weightless norm followed by a new Linear
  ``diag(γ)`` (+ ``β``), which later becomes ``Q_dᵀ diag(γ)``. A post-norm on a branch written by
  Linears is recorded as a :class:`NormBranch`: its input gets a basis of its own later, so that
  the new Linear ends ``d × k`` instead of ``d × D``.
- Every residual add gets a shortcut Linear on its skip edge, the identity for now and
  ``Q_aᵀ Q_b`` once both sides are rotated.
- A per-dimension affine map on the stream (a :class:`~.p3_analyse.StreamAffine`: Doge's and Ergo's
  residual gates, Zaya's residual scale and bias) commutes with no rotation, so it leaves the graph:
  on the skip edge, ``x_b = s ⊙ x_a + c + y`` becomes the shortcut ``diag(s)`` with bias ``c`` (later
  ``Q_aᵀ diag(s) Q_b``, never removed); on the branch, ``x_b = x_a + s ⊙ y + c`` scales the rows of
  ``y``'s writers, ``W ← diag(s) W``, and ``c`` joins the shortcut's bias.
- LayerNorm models: every writer of a position read by LayerNorms is centred, ``W_out ← M W_out`` with
  ``M = I - 11ᵀ/D`` (embeddings ``E ← E M``, and the shortcut from a position that is not centred: the first
  position of a post-norm model without an embedding norm, read by Linears directly), so that the value is
  mean-free and each LayerNorm is an RMSNorm.

A stream that will not be rotated (``rotate=False``: ``basis="none"``) needs none of this: its graph
is left as it is (norms with their weights, no shortcut, the head still tied), which is also what
keeps it a stock model.
- A head tied to the embedding keeps its weight: the final norm's ``diag(γ)`` (+ ``β``) becomes a
  Linear in front of the head instead, and the embedding gets a private copy until rotation
  re-ties the two.

Inserted modules are named by the rule of :mod:`fxslice.graph.inserted`. Nothing here depends on
calibration; the result computes the same logits (to float rounding). The returned :class:`Plan`
describes the graph as fuse leaves it — module names and live nodes only — together with what the
graph analyses found (block groups from pass 3, norm branches, the MLPs of pass 4): everything the
width policy (pass 6) and the rotation (pass 7) need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, TYPE_CHECKING

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import GraphStructureError
from ..graph import ops
from ..graph.edit import call_module_after, call_module_on_edge, drop_attribute, erase_unused, submodule_exists
from ..graph.inserted import (BRANCH_MAP, HEAD_AFFINE, HEAD_INPUT, LONG_SKIP, NORM_AFFINE, PASSTHROUGH, READ_MAP,
                              SHORTCUT, InsertedModule, affine_name, branch_map_name, head_input_name, long_skip_name,
                              passthrough_name, read_map_name, shortcut_name, stream_norm_name)
from ..graph.modules import StreamNorm
from ..graph.nodes import copy_meta, describe, evaluate_constant, example_value, module_path
from ..graph.store import Weights
from ..graph.weights import f64, set_embedding, set_linear
from ..registry import NormSpec
from .p3_analyse import NormSite, Position, StreamAffine, Structure
from .p4_attention import Attention, find_attentions
from .p4_mlps import MLP, find_mlps

if TYPE_CHECKING:
    from .run import Run


# --- the hand-over value --------------------------------------------------------------------------
@dataclass
class TiedHead:
    embedding: str  # nn.Embedding writing the first position
    head: str  # nn.Linear sharing its weight
    affine: str  # Linear in front of the head holding the final norm's diag(γ), β
    position: int  # the position the embedding writes
    width_slice: Optional[Node] = None  # ``emb[..., :d]`` after the embedding (rotated positions only)


@dataclass
class NormBranch:
    """A branch ``x + A norm(y)`` of a writer-side RMSNorm, ``y`` written by Linears: ``y`` is rotated
    into its own PCA basis and sliced inside its block (:mod:`fxslice.passes.p7_rotate.branches`)."""

    writers: list[str]  # the Linears writing y (output side rotated by R)
    affine: str  # the Linear A after the norm (input side rotated by R)
    norm: str  # the weightless StreamNorm between them (it keeps dividing by the full width)
    input: Node  # the node holding y
    position: int  # the stream position the branch is added to
    reshapes: list[Node] = field(default_factory=list)  # width-carrying reshapes between writers and norm


@dataclass
class PlannedPosition:
    """What rotation touches at one stream position of the fused graph."""

    index: int
    root: Node  # the node holding the position's value in the fused graph
    label: str  # how errors name the position (its original node and module)
    rotated: bool
    centered: bool = False  # read by LayerNorms: every writer centred, the basis ends with 1/√D
    writers: list[str] = field(default_factory=list)  # output side rotated by Q_p (not the shortcut)
    readers: list[str] = field(default_factory=list)  # input side rotated by Q_p (the shortcut out included)
    shortcut: Optional[str] = None  # the skip Linear producing this position
    skip_source: Optional[int] = None
    mapped_shortcut: bool = False  # the shortcut holds a per-dimension affine map: never the identity
    reshapes: list[Node] = field(default_factory=list)  # reshapes carrying the width (last dim)
    norm_eps: float = 0.0  # epsilon of the norms reading it (for the ``norm_output`` PCA signal)


@dataclass
class Plan:
    """The fused graph and, per stream position, the modules and nodes rotation must touch."""

    gm: GraphModule
    hidden_size: int
    centered: bool
    positions: list[PlannedPosition]
    block_groups: list[list[int]]  # rotated positions read by one block (``Structure.block_groups``)
    head: list[str]  # the Linear(s) reading the last position (the LM head; a tied one behind a head transform too)
    weights: Weights  # where the module weights are; every weight edit goes through it
    inserted: list[InsertedModule] = field(default_factory=list)
    tied: Optional[TiedHead] = None
    branches: list[NormBranch] = field(default_factory=list)
    mlps: list[MLP] = field(default_factory=list)  # pass 4: MLPs whose hidden units can be sliced
    attentions: list[Attention] = field(default_factory=list)  # pass 4: attentions whose values can be narrowed
    folded_biases: set[str] = field(default_factory=set)
    """Readers given a bias by folding a norm's shift ``W β`` into them: a streamed reader gets it only when
    its weights are loaded, so the parameter count (pass 6) must not read it off the module."""

    @property
    def last(self) -> PlannedPosition:
        return self.positions[-1]

    @property
    def rotated(self) -> list[PlannedPosition]:
        return [p for p in self.positions if p.rotated]

    def layout(self) -> dict[str, tuple[Optional[int], Optional[int]]]:
        """module name -> (position its input reads, position its output writes); None: not the stream."""
        reads = {name: p.index for p in self.positions for name in p.readers}
        writes = {name: p.index for p in self.positions for name in p.writers}
        writes.update({p.shortcut: p.index for p in self.positions if p.shortcut})
        if self.tied is not None:
            writes.pop(self.tied.embedding, None)
        return {name: (reads.get(name), writes.get(name)) for name in sorted(set(reads) | set(writes))}


# --- the algebra ------------------------------------------------------------------------------------
def fold_norm(linear: nn.Linear, spec: NormSpec) -> None:
    """``W ← W diag(γ)``, ``b ← b + W β``: the norm's affine moves into a reader."""
    weight, bias = f64(linear.weight), f64(linear.bias)
    if spec.shift is not None:
        extra = weight @ f64(spec.shift).to(weight.device)
        bias = extra if bias is None else bias + extra
    set_linear(linear, weight * f64(spec.scale).to(weight.device)[None, :], bias)


def scale_outputs(module: nn.Module, scale: torch.Tensor) -> None:
    """``W ← diag(s) W``, ``b ← s ⊙ b`` (``E ← E diag(s)`` for an embedding): ``s ⊙`` the module's output."""
    if isinstance(module, nn.Embedding):
        set_embedding(module, f64(module.weight) * scale.to(module.weight.device))
        return
    weight, bias, s = f64(module.weight), f64(module.bias), scale.to(module.weight.device)
    set_linear(module, weight * s[:, None], None if bias is None else bias * s)


def affine_coefficients(gm: GraphModule, affine: StreamAffine, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, c)`` in float64 with ``affine(x) = s ⊙ x + c``, composed step by step from its constants."""
    scale = torch.ones(width, dtype=torch.float64)
    constant = torch.zeros(width, dtype=torch.float64)
    value = affine.start
    for step in affine.steps:
        if step.target in ops.AFFINE_STEPS:  # else a cast
            first, second = step.args
            other = second if first is value else first
            k = _constant64(gm, other).reshape(-1).expand(width)
            if step.target is torch.ops.aten.mul.Tensor:
                scale, constant = scale * k, constant * k
            elif step.target is torch.ops.aten.div.Tensor:
                scale, constant = scale / k, constant / k
            elif step.target is torch.ops.aten.add.Tensor:
                constant = constant + k
            elif first is value:
                constant = constant - k
            else:
                scale, constant = -scale, k - constant
        value = step
    _verify_affine(gm, affine, scale, constant)
    return scale, constant


def _constant64(gm: GraphModule, value) -> torch.Tensor:
    """A map's constant operand (a number, or a node computed from parameters only) in float64 on the CPU."""
    tensor = torch.tensor(float(value)) if isinstance(value, (int, float)) else evaluate_constant(gm, value).detach()
    return tensor.to("cpu", torch.float64)


def _verify_affine(gm: GraphModule, affine: StreamAffine, scale: torch.Tensor, constant: torch.Tensor) -> None:
    """The chain itself, run on random rows, equals ``s ⊙ x + c`` (its parameters are one-dimensional: read
    with the checkpoint's small tensors before any pass runs, :func:`fxslice.checkpoint.read_unmanaged`)."""
    x = torch.randn(3, scale.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    env: dict = {affine.start: x}

    for step in affine.steps:
        args = [env[a] if a in env else _constant64(gm, a) if isinstance(a, Node) else a for a in step.args]
        env[step] = step.target(*args) if step.target in ops.AFFINE_STEPS else args[0]  # a cast: float64 kept
    want = scale * x + constant
    if not torch.allclose(env[affine.end], want, rtol=1e-6, atol=1e-6 * float(want.abs().max())):
        raise GraphStructureError(f"{describe(affine.end)}: the elementwise map of the stream read as "
                                  "s ⊙ x + c does not reproduce it")


def affine_weights(spec: NormSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(diag(γ), β)``: a norm's affine as the weights of a Linear that rotation can act on."""
    return torch.diag(f64(spec.scale)), f64(spec.shift)


def is_empty(module: nn.Module) -> bool:
    """No parameters, buffers or submodules left."""
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()) \
        and not any(True for _ in module.children())


def own_copy(embedding: nn.Embedding) -> None:
    """A private copy of the table (a tied head's weight must not follow the embedding's edits)."""
    set_embedding(embedding, f64(embedding.weight))


def center(module: nn.Module) -> None:
    """``W_out ← M W_out``, ``b ← b M``, ``E ← E M`` with ``M = I - 11ᵀ/D``: the written value is mean-free."""
    if isinstance(module, nn.Embedding):
        weight = f64(module.weight)
        set_embedding(module, weight - weight.mean(1, keepdim=True))
    else:
        weight, bias = f64(module.weight), f64(module.bias)  # [..., D, in], [..., D]
        set_linear(module, weight - weight.mean(-2, keepdim=True),
                   None if bias is None else bias - bias.mean(-1, keepdim=True))


# --- the rewrite --------------------------------------------------------------------------------------
class Fuser:
    """Rewrites a graph described by a :class:`Structure` into the fused graph of a :class:`Plan`."""

    def __init__(self, structure: Structure, weights: Weights, mlps: list[MLP], rotate: bool = True,
                 attentions: Optional[list[Attention]] = None):
        self.structure = structure
        self.rotate = rotate
        self.mlps = mlps
        self.attentions = list(attentions or [])
        self.gm = structure.gm
        self.hidden = structure.hidden_size
        self.weights = weights
        self.replaced: dict[Node, Node] = {}  # erased or rerouted nodes -> the nodes now standing for them
        self.inserted: list[InsertedModule] = []
        self.branches: list[NormBranch] = []
        self.folded_biases: set[str] = set()
        self.coefficients: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(StreamAffine) -> (s, c)
        # StreamNorms waiting for the module whose path they take, by the parameters of their norm: a norm module
        # called more than once leaves the graph with its last call
        self.waiting_norms: dict[frozenset[str], list[tuple[str, StreamNorm, NormSite]]] = {}

    def resolve(self, node: Node) -> Node:
        while node in self.replaced:
            node = self.replaced[node]
        return node

    def add_module(self, name: str, module: nn.Module) -> str:
        """Install an inserted module under its rule-given name; a name already taken is refused
        (two norms sharing one module path, a norm path that is a whole block)."""
        if submodule_exists(self.gm, name):
            raise GraphStructureError(f"cannot insert '{name}': a module of that name is already in the graph "
                                      "(norms without a module of their own?)")
        self.gm.add_submodule(name, module)
        return name

    def stream_norm(self, site: NormSite, center_input: bool) -> Node:
        """Swap a norm region for a weightless StreamNorm at the norm's path; its parameters, folded
        elsewhere, leave the graph (with the module's last call when it is called more than once — X-MOD's
        adapters apply the layer's output LayerNorm again —, the StreamNorms of its calls installed then).
        Returns the new node."""
        region = site.region
        module = StreamNorm(self.hidden, site.spec.eps, center=center_input)
        name = stream_norm_name(region.path, region.output.name)
        node = call_module_after(self.gm, name, module, self.resolve(region.input), region.output, region.output)
        region.output.replace_all_uses_with(node)
        self.replaced[region.output] = node
        for dead in reversed(region.nodes):
            if not dead.users:
                self.gm.graph.erase_node(dead)
        group = frozenset(str(param.target) for param in region.params.values())  # the calls of one norm module
        self.waiting_norms.setdefault(group, []).append((name, module, site))
        if any(param.users for param in region.params.values()):
            return node  # another call of the module still reads its parameters
        for param in region.params.values():
            drop_attribute(self.gm, param)
        for owner_path in {str(param.target).rpartition(".")[0] for param in region.params.values()} - {"", name}:
            if submodule_exists(self.gm, owner_path) and is_empty(self.gm.get_submodule(owner_path)):
                self.gm.delete_submodule(owner_path)  # another call's path took the module's name
        if submodule_exists(self.gm, name):  # the norm's own module, emptied of its folded parameters
            if not is_empty(self.gm.get_submodule(name)):
                raise GraphStructureError(f"norm '{site.path}' shares its module with other parameters or modules; "
                                          "it cannot be replaced by a weightless norm")
            self.gm.delete_submodule(name)
        for waiting_name, waiting, _ in self.waiting_norms.pop(group):
            self.add_module(waiting_name, waiting)
        return node

    def center_positions(self, planned: list[PlannedPosition]) -> None:
        """Every writer of a centred position made mean-free, and the shortcut into it from one that is not."""
        for plan_p in planned:
            if not plan_p.centered:
                continue
            for name in plan_p.writers:
                self.weights.edit(name, center)
            if plan_p.shortcut is not None and not planned[plan_p.skip_source].centered:  # M on the skip edge
                self.weights.edit(plan_p.shortcut, center)
                plan_p.mapped_shortcut = True

    def explicit_zeros(self, like: Node) -> Node:
        """``zeros_like(x)`` as ``new_zeros(x, [size(x, 0), …, D])``: the zero tensor a scatter fills with a position's
        values (:meth:`~.p3_analyse.NodeKinds.scattered_rows`) takes that position's width, which resizing writes
        into its last size, whatever ``x``'s width is."""
        graph, source, value = self.gm.graph, like.args[0], example_value(like)
        sizes: list = []
        with graph.inserting_before(like):
            for dim in range(value.dim() - 1):
                size = graph.call_function(torch.ops.aten.sym_size.int, (source, dim))
                size.meta["val"] = value.shape[dim]
                sizes.append(size)
            kwargs = {k: v for k, v in like.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
            node = graph.call_function(torch.ops.aten.new_zeros.default, (source, sizes + [self.hidden]), kwargs)
        copy_meta(node, like, ("val", "nn_module_stack"))
        like.replace_all_uses_with(node)
        graph.erase_node(like)
        return node

    def affine(self, site: NormSite) -> nn.Linear:
        spec = site.spec
        return self.weights.add_linear(affine_name(site.path), self.hidden, self.hidden, spec.shift is not None,
                                       lambda: affine_weights(spec))

    def affine_after(self, site: NormSite, norm: Node, writes: int) -> str:
        """``diag(γ)`` (+ ``β``) after a writer-side norm's weightless node, rerouting its users."""
        affine = self.affine(site)
        name = self.add_module(affine_name(site.path), affine)
        users = list(norm.users)
        source = self.cast(norm, self.weights.like.dtype)  # a branch normalised in float32 (Ergo's)
        node = self.in_weight_dtype(call_module_after(self.gm, name, affine, source, source, norm))
        out = self.cast(node, example_value(norm).dtype)
        for user in users:
            user.replace_input_with(norm, out)
        self.replaced[norm] = out
        self.inserted.append(InsertedModule(name, NORM_AFFINE, None, writes))
        return name

    def affine_before_head(self, site: NormSite, head: Node, reads: int) -> str:
        """``diag(γ)`` (+ ``β``) on the input edge of a tied head (its weight must stay the embedding's)."""
        affine = self.affine(site)
        name = self.add_module(affine_name(site.path), affine)
        call_module_on_edge(self.gm, name, affine, head.args[0], head)
        self.inserted.append(InsertedModule(name, HEAD_AFFINE, reads, None))
        return name

    def shortcut(self, position: Position) -> str:
        """The Linear on the skip edge of the residual add producing ``position``: the identity, or
        ``diag(s)`` with bias ``c`` for the affine maps of the edge and of the branch (see the module
        docstring); the maps' nodes leave the graph."""
        skip, branch, hidden = position.skip, position.branch_affine, self.hidden
        name = shortcut_name(module_path(skip.joint)[0], position.index)
        scale, constant = (self.coefficients[id(skip.affine)] if skip.affine is not None
                           else (torch.ones(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)))
        if branch is not None:
            constant = constant + self.coefficients[id(branch)][1]
        biased = any(a is not None and a.has_constant for a in (skip.affine, branch))
        shortcut = self.weights.add_linear(name, hidden, hidden, biased,
                                           lambda: (torch.diag(scale), constant if biased else None))
        self.add_module(name, shortcut)
        source = self.resolve(skip.stream_value)  # the map's casts leave with it: cast around the shortcut instead
        if skip.add is None:  # nothing is added: the stream goes on from the shortcut
            source = self.cast(source, self.weights.like.dtype, before=skip.operand)
            node = self.in_weight_dtype(call_module_after(self.gm, name, shortcut, source, source, skip.operand))
            out = self.cast(node, example_value(skip.operand).dtype)
            skip.operand.replace_all_uses_with(out)
            self.replaced[skip.operand] = out
        else:
            self.linear_on_edge(name, shortcut, source, skip.add, replaced=self.resolve(skip.operand))
        if skip.affine is not None:
            erase_unused(self.gm, skip.affine.steps)
        self.inserted.append(InsertedModule(name, SHORTCUT, skip.source, position.index))
        return name

    def cast(self, node: Node, dtype: torch.dtype, before: Optional[Node] = None) -> Node:
        """``node.to(dtype)`` inserted before ``before`` (default: right after ``node``); ``node`` itself
        when it has that dtype already."""
        value = example_value(node)
        if value is None or value.dtype == dtype:
            return node
        with self.gm.graph.inserting_before(before) if before is not None else self.gm.graph.inserting_after(node):
            cast = self.gm.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
        cast.meta["val"] = value.to(dtype)
        copy_meta(cast, node, ("nn_module_stack",))
        return cast

    def linear_on_edge(self, name: str, module: nn.Module, source: Node, user: Node,
                       replaced: Optional[Node] = None) -> Node:
        """Inserted ``module`` called on the edge ``source -> user`` (taking ``replaced``'s place in ``user``,
        default ``source``), in the weights' dtype: a value of another dtype (a stream kept in float32 around
        a bf16 model's blocks: Zaya's, the hyper-connections') is cast to it and the result back."""
        replaced = source if replaced is None else replaced
        if replaced not in user.all_input_nodes:
            raise GraphStructureError(f"cannot insert '{name}': {describe(replaced)} is no input of {describe(user)}")
        cast = self.cast(source, self.weights.like.dtype, before=user)
        node = self.in_weight_dtype(call_module_on_edge(self.gm, name, module, cast, user, replaced=replaced))
        out = self.cast(node, example_value(replaced).dtype, before=user)
        if out is not node:
            user.replace_input_with(node, out)
        return out

    def in_weight_dtype(self, node: Node) -> Node:
        """An inserted Linear's call computes in the weights' dtype, whatever its metadata was copied from."""
        value = example_value(node)
        if value is not None:
            node.meta["val"] = value.to(self.weights.like.dtype)
        return node

    def inserted_on_edge(self, name: str, kind: str, value: Node, user: Node, reads: Optional[int],
                         writes: Optional[int], site: Optional[NormSite] = None) -> str:
        """A ``D × D`` Linear inserted on the edge ``value -> user`` (``value`` as the graph held it before fuse):
        a reader-side norm's ``diag(γ)`` (+ ``β``) after its now weightless output (``site``: a passthrough, a read
        map), else the identity (a branch map, a long skip); rotation then treats it as a reader of position
        ``reads`` and a writer of ``writes`` (None: the model's coordinates)."""
        biased = site is not None and site.spec.shift is not None
        init = ((lambda: affine_weights(site.spec)) if site is not None
                else lambda: (torch.eye(self.hidden, dtype=torch.float64), None))
        module = self.weights.add_linear(name, self.hidden, self.hidden, biased, init)
        self.add_module(name, module)
        self.linear_on_edge(name, module, self.resolve(value), user)
        self.inserted.append(InsertedModule(name, kind, reads, writes))
        return name

    def full_width_mean(self, mean: Node, width: int) -> None:
        """``mean(x², -1)`` over merged stream copies becomes ``sum(x², -1) / width`` (the row's width before
        slicing: the deleted coordinates carry almost nothing, as in :class:`StreamNorm`)."""
        source, dims = mean.args[0], mean.args[1]
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        with self.gm.graph.inserting_before(mean):
            total = self.gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (source, dims, keepdim),
                                                {k: v for k, v in mean.kwargs.items() if k != "keepdim"})
            average = self.gm.graph.call_function(torch.ops.aten.div.Tensor, (total, float(width)))
        for node in (total, average):
            copy_meta(node, mean, ("val", "nn_module_stack"))
        mean.replace_all_uses_with(average)
        self.gm.graph.erase_node(mean)

    def scaled_branch(self, position: Position, writers: list[str]) -> None:
        """The branch's per-dimension scale moves into the rows of its writers; its map leaves the graph."""
        branch = position.branch_affine
        scale, _ = self.coefficients[id(branch)]
        for name in writers:
            self.weights.edit(name, scale_outputs, scale)
        branch.end.replace_all_uses_with(self.resolve(branch.start))
        erase_unused(self.gm, branch.steps)

    def width_slice(self, embedding: Node) -> Node:
        """``emb[..., :D]`` after a tied embedding; rotation narrows it to the position's width."""
        users = list(embedding.users)
        with self.gm.graph.inserting_after(embedding):
            node = self.gm.graph.call_function(torch.ops.aten.slice.Tensor, (embedding, -1, 0, self.hidden))
        copy_meta(node, embedding, ("val", "nn_module_stack"))
        for user in users:
            user.replace_input_with(embedding, node)
        self.replaced[embedding] = node
        return node

    def untie(self) -> Optional[tuple[Node, Node, Optional[Node]]]:
        """(embedding, head, width slice) of a tied head; the embedding gets a private copy until
        rotation re-ties it."""
        tie = self.structure.tied_head()
        if tie is None:
            return None
        self.weights.edit(str(tie[0].target), own_copy)
        width_slice = self.width_slice(tie[0]) if self.structure.positions[0].rotated else None
        return tie[0], tie[1], width_slice

    def unrotated(self) -> Plan:
        """The plan of a stream that keeps its coordinates: nothing is folded or inserted (the norms,
        the tied head and the residual adds stay as they are); the positions only say where the
        stream and its Linears are, for the calibration order and the MLP units."""
        s = self.structure
        planned = [PlannedPosition(p.index, p.root, describe(p.root), p.rotated, reshapes=list(p.reshapes),
                                   writers=[str(w.target) for w in p.writers],
                                   readers=[str(r.target) for r in p.direct_readers + [r for site in p.norms
                                                                                      for r in site.readers]])
                   for p in s.positions]
        return Plan(self.gm, self.hidden, False, planned, s.block_groups(), [str(r.target) for r in s.last.readers],
                    self.weights, mlps=list(self.mlps), attentions=self.attentions)

    def run(self) -> Plan:
        if not self.rotate:
            return self.unrotated()
        s = self.structure
        maps = [a for p in s.positions for a in (p.skip.affine if p.skip is not None else None, p.branch_affine) if a]
        self.coefficients = {id(a): affine_coefficients(self.gm, a, self.hidden) for a in maps}  # before any edit
        tie = self.untie()
        tied: Optional[TiedHead] = None
        branch_sites = {id(site) for _, site in s.branch_sites()}
        planned = [PlannedPosition(p.index, p.root, describe(p.root), p.rotated, p.centered, reshapes=list(p.reshapes))
                   for p in s.positions]
        for p, plan_p in zip(s.positions, planned):
            plan_p.writers = [str(w.target) for w in p.writers]
            plan_p.readers = [str(r.target) for r in p.direct_readers]
            for site in p.writer_norms:
                norm = self.stream_norm(site, center_input=site.spec.centered)
                affine = self.affine_after(site, norm, p.index)
                plan_p.writers.append(affine)
                if id(site) in branch_sites:
                    self.branches.append(NormBranch([str(w.target) for w in site.inner_writers], affine,
                                                    str(norm.target), norm.args[0], p.index,
                                                    list(site.inner_reshapes)))
            for site in p.norms:
                self.stream_norm(site, center_input=False)
                if plan_p.norm_eps == 0.0:
                    plan_p.norm_eps = site.spec.eps
                for reader in site.readers:
                    if tie is not None and reader is tie[1]:
                        affine = self.affine_before_head(site, reader, p.index)
                        tied = TiedHead(str(tie[0].target), str(reader.target), affine, s.positions[0].index, tie[2])
                        plan_p.readers.append(affine)
                    else:
                        self.weights.edit(str(reader.target), fold_norm, site.spec)
                        if site.spec.shift is not None:
                            self.folded_biases.add(str(reader.target))
                        plan_p.readers.append(str(reader.target))
                plan_p.readers.extend(  # an op reading the norm's output in the model's coordinates
                    self.inserted_on_edge(read_map_name(site.path, k), READ_MAP, value, user, p.index, None, site)
                    for k, (value, user) in enumerate(site.model_reads))
            if p.skip is not None:
                plan_p.shortcut = self.shortcut(p)
                plan_p.skip_source = p.skip.source
                plan_p.mapped_shortcut = p.skip.affine is not None or (p.branch_affine is not None
                                                                        and p.branch_affine.has_constant)
                planned[p.skip.source].readers.append(plan_p.shortcut)
            for merged in p.merged:
                for mean in merged.means:
                    self.full_width_mean(mean, merged.copies * self.hidden)
            for k, (value, add) in enumerate(p.opaque_branches):  # the branch's one writer: Q_pᵀ after rotation
                plan_p.writers.append(self.inserted_on_edge(branch_map_name(module_path(add)[0], p.index, k),
                                                            BRANCH_MAP, value, add, None, p.index))
            for k, (source, value, user) in enumerate(p.long_skips):  # Q_aᵀ Q_p after rotation
                name = self.inserted_on_edge(long_skip_name(module_path(user)[0], source.index, p.index, k),
                                             LONG_SKIP, value, user, source.index, p.index)
                plan_p.writers.append(name)
                planned[source.index].readers.append(name)
            if p.branch_affine is not None:
                self.scaled_branch(p, plan_p.writers)
            for site, value, user in p.passthroughs:
                source = next(q.index for q in s.positions if any(site is norm for norm in q.norms))
                name = self.inserted_on_edge(passthrough_name(site.path), PASSTHROUGH, value, user,
                                             source, p.index, site)  # Q_pᵀ M diag(γ) Q_a after rotation
                plan_p.writers.append(name)
                planned[source].readers.append(name)
        if tie is not None and tied is None:  # the head reads no stream value: the identity in front of it
            name = self.inserted_on_edge(head_input_name(str(tie[1].target)), HEAD_INPUT, tie[1].args[0], tie[1],
                                         None, None)
            tied = TiedHead(str(tie[0].target), str(tie[1].target), name, s.positions[0].index, tie[2])
        self.center_positions(planned)
        if self.waiting_norms:
            site = next(iter(self.waiting_norms.values()))[0][2]
            raise GraphStructureError(f"norm '{site.path}' shares its parameters with an op that is not a norm; it "
                                      "cannot be replaced by a weightless norm")
        explicit: dict[Node, Node] = {}  # zeros_like -> new_zeros (one zero tensor can sit in two lists)
        for reshapes in ([plan_p.reshapes for plan_p in planned] + [branch.reshapes for branch in self.branches]
                         + [site.inner_reshapes for p in s.positions for site in p.writer_norms]):
            for k, node in enumerate(reshapes):
                if ops.calls(node, ops.ZEROS_LIKE):
                    if node not in explicit:
                        explicit[node] = self.explicit_zeros(node)
                    reshapes[k] = explicit[node]
        for plan_p in planned:
            plan_p.root = self.resolve(plan_p.root)
        self.gm.recompile()
        head = [str(r.target) for r in s.last.readers]
        if tied is not None and tied.head not in head:  # the vocabulary projection behind a head transform
            head.append(tied.head)
        return Plan(self.gm, self.hidden, s.centered, planned, s.block_groups(), head, self.weights, self.inserted,
                    tied, self.branches,
                    list(self.mlps), folded_biases=self.folded_biases, attentions=self.attentions)


def fuse(structure: Structure, weights: Optional[Weights] = None, mlps: Optional[list[MLP]] = None,
         rotate: bool = True, attentions: Optional[list[Attention]] = None) -> Plan:
    """Rewrite ``structure.gm`` in place into its fused form (see module docstring); returns the plan.
    Weight edits go through ``weights`` (default: the graph's weights in memory, edited at once);
    ``mlps`` and ``attentions``: pass 4's results (found here from ``structure`` when not given);
    ``rotate=False``: the stream keeps its coordinates, the graph is left unchanged (:meth:`Fuser.unrotated`)."""
    found = find_mlps(structure).mlps if mlps is None else mlps
    if attentions is None:
        attentions = find_attentions(structure, frozenset(m.writer for m in found)).attentions
    return Fuser(structure, weights or Weights(structure.gm), found, rotate, attentions).run()


NAME = "fuse"


def step(run: "Run") -> None:
    with run.watch(NAME):
        run.plan = fuse(run.structure, run.weights, run.mlps.mlps, rotate=run.options.basis != "none",
                        attentions=run.attentions.attentions)
