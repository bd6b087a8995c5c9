"""Pass 6 — slice the hidden units of the MLPs and refit their down projections.

Runs inside pass 5's block loop (:func:`~fxslice.passes.p5_rotate.rotate_and_slice`), so that each
block is read and calibrated once; it lives here because it is its own algebra.

**Discovery (from the graph, not from names).** An *MLP* is a writer Linear ``W_out`` of a rotated
position whose input ``h`` (width ``I``) is computed from the outputs of Linears (``I`` wide each:
up, gate, ``fc1``) through elementwise ops only — ``act(gate) * up``, ``gelu(fc1)``, biases, casts,
scalings by numbers or by per-token values. A fused input Linear split into equal chunks
(``gate, up = gate_up(x).chunk(2, -1)``) counts once per chunk. Every such value is used by the MLP
only. Hidden unit ``j`` is then row ``j`` (of every chunk) of every input Linear and column ``j`` of
``W_out``: deleting it is exact up
to the unit's contribution. Attention outputs (reshaped heads) are no MLP; a hidden value meeting
anything else (a reduction over the units, a split into unequal parts, a per-unit parameter) is
refused by :func:`trace_mlp` with the node named, and skipped by :func:`find_mlps`.

**Selection and refit.** With ``C = Σ hᵀh`` over the calibration tokens (float64) and the writer's
current weight ``W`` (``d × I``), keeping the units ``S`` and refitting the writer by ridge least
squares on the calibration data,

    ``X = argmin ‖H Wᵀ − H_S Xᵀ‖² + λ‖X‖² = W C[:, S] (C[S, S] + λ I)⁻¹``,

reproduces the block's output as well as a linear map of the kept units can (MoDeGPT's Nyström
refit, ICLR 2025). Its calibration error ``tr(W C Wᵀ) − tr(X C[S, :] Wᵀ) − …`` is computable from
``C``, so ``S`` is chosen as the best of three column scores: output energy ``C_jj ‖W_j‖²``, ridge
leverage of ``C`` and ridge leverage of ``C`` weighted by ``‖W_j‖`` (``diag(G (G + λ I)⁻¹)``). When
every unit is kept nothing is touched (exact).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.fx import Node

from ..calibration import token_rows
from ..distributed import all_reduce_sum, broadcast_from_first
from ..errors import GraphStructureError
from ..graph import ops
from ..graph.nodes import describe, example_value
from ..graph.weights import f64, set_linear
from .p4_fuse import Plan

CHUNK = torch.ops.aten.chunk.default
ALLOCATIONS = ("uniform", "energy")
RIDGE = 1e-3
"""Ridge of the refit and of the leverage scores, relative to the mean of ``diag(C)``."""


@dataclass
class MLP:
    """One MLP of the fused graph: the Linears whose output rows are its hidden units, the writer
    whose input columns they are, and the node holding the hidden value ``h``."""

    writer: str
    readers: dict[str, int]  # input Linear -> how many I-wide parts its output has (2: a fused gate/up)
    hidden: Node  # the writer's input node
    width: int  # I
    position: int  # the stream position the writer writes


@dataclass
class MLPSearch:
    """What :func:`find_mlps` found, and why the other linear writers are not MLPs."""

    mlps: list[MLP] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # writer -> reason


def _pointwise(node: Node) -> bool:
    target = node.target
    return (node.op == "call_function" and hasattr(target, "tags") and torch.Tag.pointwise in target.tags) \
        or ops.calls(node, ops.CASTS | ops.IDENTITIES)


def trace_mlp(plan: Plan, writer: str, position: int) -> MLP:
    """The MLP whose writer is module ``writer``; ``GraphStructureError`` naming the node where its
    hidden value meets an op that is not elementwise over the hidden units."""
    gm = plan.gm
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == writer), None)
    if node is None or not isinstance(modules.get(writer), nn.Linear):
        raise GraphStructureError(f"'{writer}' is not a Linear of the graph")
    hidden = node.args[0]
    width = modules[writer].in_features

    def refuse(at: Node, why: str) -> GraphStructureError:
        return GraphStructureError(f"the hidden units of '{writer}' cannot be sliced: {describe(at)} {why}")

    region: set[Node] = set()
    readers: dict[str, int] = {}
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
        if isinstance(module, nn.Linear):
            readers[str(current.target)] = 1
            continue
        fused = _fused_part(current, modules, width)
        if fused is not None:  # gate, up = chunk(gate_up(x), n, -1): unit j is row j + i·I of gate_up
            chunk, source, parts = fused
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
    return MLP(writer, dict(sorted(readers.items())), hidden, width, position)


def _fused_part(node: Node, modules: dict, width: int) -> Optional[tuple[Node, Node, int]]:
    """``(chunk, linear, parts)`` when ``node`` is one of ``parts`` equal chunks of a Linear's output
    along its last dimension."""
    if node.op != "call_function" or node.target is not operator.getitem or not ops.calls(node.args[0], CHUNK):
        return None
    chunk = node.args[0]
    source, parts = chunk.args[0], chunk.args[1]
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    linear = modules.get(str(source.target)) if isinstance(source, Node) and source.op == "call_module" else None
    value = example_value(source)
    if not isinstance(linear, nn.Linear) or value is None or dim not in (-1, value.dim() - 1) \
            or linear.out_features != parts * width:
        return None
    return chunk, source, parts


def find_mlps(plan: Plan) -> MLPSearch:
    """Every MLP writing a rotated position, directly or through a writer-side norm (see the module
    docstring); other linear writers are listed in ``skipped`` with the reason."""
    inserted = {m.name for m in plan.inserted}
    modules = dict(plan.gm.named_modules())
    writers = [(w, p.index) for p in plan.positions if p.rotated for w in p.writers]
    writers += [(w, b.position) for b in plan.branches for w in b.writers]  # behind a writer-side norm
    search = MLPSearch()
    for writer, position in writers:
        if writer in inserted or not isinstance(modules.get(writer), nn.Linear):
            continue
        try:
            search.mlps.append(trace_mlp(plan, writer, position))
        except GraphStructureError as exc:
            search.skipped[writer] = str(exc)
    return search


# --- selection and refit ------------------------------------------------------------------------------
def refit(gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """``(X, error)``: the ridge least-squares writer over the units ``kept`` and its calibration error
    ``‖H Wᵀ − H_S Xᵀ‖²`` (both from ``C``)."""
    c_sk = gram[:, kept]
    c_ss = gram[kept][:, kept]
    system = c_ss + ridge * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    x = torch.linalg.solve(system, (weight @ c_sk).T).T  # W C[:, S] (C_SS + λI)^-1 (system symmetric)
    wc = weight @ gram
    error = (wc * weight).sum() - 2 * (x * (weight @ c_sk)).sum() + ((x @ c_ss) * x).sum()
    return x, float(error)


def unit_scores(gram: torch.Tensor, weight: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """Candidate importance of every hidden unit (higher: keep)."""
    norms = weight.pow(2).sum(0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weighted = gram * norms.sqrt()[:, None] * norms.sqrt()[None, :]

    def leverage(matrix: torch.Tensor) -> torch.Tensor:
        scale = ridge * matrix.diagonal().mean().clamp_min(1e-30)
        return torch.linalg.solve(matrix + scale * eye, matrix).diagonal()

    return {"energy": gram.diagonal() * norms, "leverage": leverage(gram), "weighted leverage": leverage(weighted)}


def select_units(gram: torch.Tensor, weight: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(kept units, refitted writer weight, relative calibration error)`` for ``keep`` of the
    ``I`` units: the scoring whose refit reconstructs ``H Wᵀ`` best."""
    gram, weight = gram.to(torch.float64), weight.to(torch.float64)
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-30))
    total = float((weight @ gram * weight).sum()) or 1.0
    best: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None
    for score in unit_scores(gram, weight, ridge).values():
        kept = torch.sort(torch.topk(score, keep).indices).values
        x, error = refit(gram, weight, kept, ridge)
        if best is None or error < best[2]:
            best = (kept, x, error)
    kept, x, error = best
    return kept, x, error / total


def keep_rows(linear: nn.Linear, kept: torch.Tensor, parts: int = 1) -> None:
    """A reader keeps the output rows of the hidden units ``kept`` (in each of its ``parts``)."""
    width = linear.out_features // parts
    index = torch.cat([kept + i * width for i in range(parts)]).to(linear.weight.device)
    set_linear(linear, f64(linear.weight)[index], None if linear.bias is None else f64(linear.bias)[index])


def replace_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """The writer reads the kept units only: its refitted weight ``X``."""
    set_linear(linear, weight.to(linear.weight.device), f64(linear.bias))


# --- inside pass 5's loop -----------------------------------------------------------------------------
class HiddenSlicer:
    """Collects ``C`` of the MLPs writing a group's positions while pass 5 runs their segments, and
    slices them once those positions are rotated (their writers then hold ``Q_dᵀ W``)."""

    def __init__(self, plan: Plan, mlps: list[MLP], keep: dict[str, int]):
        self.plan = plan
        self.mlps = [m for m in mlps if keep.get(m.writer, m.width) < m.width]
        self.keep = keep
        self.grams: dict[str, torch.Tensor] = {}
        self.batch = None  # the calibration batch being run (its mask leaves padding out)
        self.errors: dict[str, float] = {}  # writer -> relative calibration error of its refit

    def taps(self, group: list[int]) -> dict[Node, callable]:
        """Per hidden node of the group's MLPs, the function accumulating its ``C``."""
        taps = {}
        for mlp in self.mlps:
            if mlp.position in group:
                self.grams[mlp.writer] = torch.zeros(mlp.width, mlp.width, dtype=torch.float64,
                                                     device=self.plan.weights.device)
                taps[mlp.hidden] = self._accumulator(mlp.writer)
        return taps

    def _accumulator(self, writer: str):
        def accumulate(value: torch.Tensor) -> None:
            rows = token_rows(value, self.batch).to(torch.float32)
            self.grams[writer] += (rows.T @ rows).to(torch.float64)
        return accumulate

    def slice(self, group: list[int]) -> None:
        """Select, refit and slice the group's MLPs (``C`` summed over ranks, rank 0's choice used)."""
        weights = self.plan.weights
        for mlp in self.mlps:
            if mlp.position not in group:
                continue
            gram = all_reduce_sum(self.grams.pop(mlp.writer))
            kept, x, error = select_units(gram, f64(weights.module(mlp.writer).weight), self.keep[mlp.writer])
            broadcast_from_first(kept)
            broadcast_from_first(x)
            self.errors[mlp.writer] = error
            for reader, parts in mlp.readers.items():
                weights.edit(reader, keep_rows, kept, parts)
            weights.edit(mlp.writer, replace_weight, x)


# --- allocation across MLPs -----------------------------------------------------------------------------
def unit_energies(plan: Plan, mlps: list[MLP], batches) -> dict[str, torch.Tensor]:
    """``E[h_j²] ‖W_j‖²`` for every unit of every MLP: what deleting it alone removes from its block's
    output, measured by one forward of the dense (fused, not yet rotated) graph over the batches."""
    gm = plan.gm
    squares = {m.writer: torch.zeros(m.width, dtype=torch.float64, device=plan.weights.device) for m in mlps}
    current = {}
    handles = []
    for mlp in mlps:
        def hook(_module, args, writer=mlp.writer):
            squares[writer] += token_rows(args[0], current.get("batch")).to(torch.float64).pow(2).sum(0)
        handles.append(gm.get_submodule(mlp.writer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = batch
                gm(batch.input_ids)
    finally:
        for handle in handles:
            handle.remove()
    for value in squares.values():
        all_reduce_sum(value)
    return {writer: value * f64(gm.get_submodule(writer).weight).pow(2).sum(0).to(value.device)
            for writer, value in squares.items()}


def allocate_units(mlps: list[MLP], energies: dict[str, torch.Tensor], total: int, round_to: int,
                   floor: float = 0.1) -> dict[str, int]:
    """Units kept per MLP, ``total`` in all: the units of largest *share* of their block's output
    energy ``e_j / Σ e`` win, every MLP keeping at least ``floor`` of its units; counts rounded to
    ``round_to`` (largest remainders first) so that they still add up to ``total``."""
    shares = torch.cat([energies[m.writer] / energies[m.writer].sum().clamp_min(1e-30) for m in mlps])
    owner = torch.cat([torch.full((m.width,), i) for i, m in enumerate(mlps)])
    minimum = [max(int(floor * m.width), 1) for m in mlps]
    order = torch.argsort(shares, descending=True)
    counts = list(minimum)
    budget = total - sum(minimum)
    taken = [0] * len(mlps)
    for unit in order.tolist():  # the floors count as the owners' best units
        i = int(owner[unit])
        taken[i] += 1
        if taken[i] <= minimum[i]:
            continue
        if budget <= 0:
            break
        counts[i] += 1
        budget -= 1
    rounded = [max(round_to * (c // round_to), min(round_to, m.width)) for c, m in zip(counts, mlps)]
    spare = total - sum(rounded)
    for i in sorted(range(len(mlps)), key=lambda i: counts[i] - rounded[i], reverse=True):
        if spare >= round_to and rounded[i] + round_to <= mlps[i].width:
            rounded[i] += round_to
            spare -= round_to
    return {m.writer: c for m, c in zip(mlps, rounded)}
