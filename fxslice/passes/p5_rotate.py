"""Pass 5 — rotate and slice: calibrate, PCA, rotate every weight touching a position, keep ``d`` columns.

For a position with calibration signal ``X`` (tokens × D, original basis), ``C = Σ XᵀX`` is
accumulated in float64 and ``C = Q Λ Qᵀ`` with eigenvalues sorted in descending order (the PCA of
SliceGPT, Sec. 3.3). With ``Q_d = Q[:, :d]``:

- writers (linears, embeddings, writer-norm affines, the shortcut into the position):
  ``W ← Q_dᵀ W``, ``b ← b Q_d``, ``E ← E Q_d``;
- readers (linears behind the norms, the shortcut out of the position, the tied head's affine):
  ``W ← W Q_d``;
- the shortcut between positions a and b therefore ends as ``Q_a[:, :d_a]ᵀ Q_b[:, :d_b]``.

In a centred (LayerNorm) stream every value is orthogonal to ``u = 1/√D``; the basis puts ``u``
last so that slicing drops that always-zero coordinate first.

The widths come from :mod:`fxslice.passes.widths`. The module holds the whole pass, in the order it
runs: the block-wise runner that computes each position from the cached, already rotated previous one
(:class:`SegmentRunner`), the covariance and its eigenbasis (:func:`covariance`, :func:`pca_basis`),
the weight rewrite (:class:`Rotator`) and the loop that ties them together (:func:`rotate_and_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from ..calibration import Batch, token_rows
from ..distributed import all_reduce_sum, broadcast_from_first, world_size
from ..errors import CalibrationError, FxSliceError, GraphStructureError
from ..graph.edit import remove_module_call
from ..graph.nodes import describe
from ..graph.weights import f64, set_embedding, set_linear
from ..hf import CausalProbe
from ..result import Stopwatch
from .p4_fuse import Plan
from .widths import identity_shortcuts

PCA_SIGNALS = ("stream", "norm_output")
BASES = ("position", "block")


def basis_groups(plan: Plan, basis: str) -> list[list[int]]:
    """Positions sharing one PCA basis: each rotated position alone, or the plan's block groups."""
    return plan.block_groups if basis == "block" else [[p.index] for p in plan.rotated]


# --- block-wise execution -----------------------------------------------------------------------------
class SegmentRunner(Interpreter):
    """Runs a flat graph segment by segment, cut at the nodes holding the rotated positions.

    Segment ``k`` computes position ``k`` from position ``k-1`` (segment 0: the embeddings and
    everything that depends only on ``input_ids``, such as masks and rotary tables). Each batch
    keeps an environment with just the values later segments still need, so calibration runs every
    block once per batch: position ``k`` is computed from the cached, already rotated position
    ``k-1``, never by re-running the prefix. Parameters (``get_attr``) are fetched afresh on every
    run because rotation replaces them.
    """

    def __init__(self, gm: GraphModule, boundaries: list[Node]):
        super().__init__(gm, garbage_collect_values=False)
        self.boundaries = boundaries
        self.taps: dict[Node, Callable[[torch.Tensor], None]] = {}  # node -> sees its value when computed
        segment = self._segments(gm, boundaries)
        count = len(boundaries)
        self.nodes: list[list[Node]] = [[] for _ in range(count)]
        for node in gm.graph.nodes:
            seg = segment.get(node)
            if seg is None or seg >= count or node.op == "output":
                continue
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg not in self.nodes[seg]:
                    self.nodes[seg].append(arg)
            self.nodes[seg].append(node)
        last_use: dict[Node, int] = {}
        for node, seg in segment.items():
            for arg in node.all_input_nodes:
                last_use[arg] = max(last_use.get(arg, -1), seg)
        # values to drop after segment k: produced by segments <= k and not used after k
        self.drop: list[list[Node]] = [[] for _ in range(count)]
        for node, seg in segment.items():
            if seg < count:
                self.drop[min(max(last_use.get(node, seg), seg), count - 1)].append(node)
        self.drop[count - 1] = []  # nothing after the last boundary is run here

    @staticmethod
    def _segments(gm: GraphModule, boundaries: list[Node]) -> dict[Node, int]:
        """The segment of every computed node: how many boundaries lie on its deepest input path."""
        index = {node: i for i, node in enumerate(boundaries)}
        level: dict[Node, int] = {}
        segment: dict[Node, int] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                level[node] = 0
                continue
            lv = max((level[a] for a in node.all_input_nodes if a.op != "get_attr"), default=0)
            segment[node] = lv
            if node in index and lv != index[node]:
                raise GraphStructureError(
                    f"stream position {index[node]} at {describe(node)} is computed from position {lv - 1}; "
                    "the positions are not in order"
                )
            level[node] = lv + 1 if node in index else lv
        return segment

    def run_segment(self, k: int, env: dict) -> torch.Tensor:
        """Run segment ``k`` on one batch's environment; returns the value of boundary ``k``."""
        self.env = env
        for node in self.nodes[k]:
            env[node] = self.run_node(node)
            if node in self.taps:
                self.taps[node](env[node])
        value = env[self.boundaries[k]]
        for node in self.drop[k]:
            if node is not self.boundaries[k]:
                env.pop(node, None)
        for node in self.nodes[k]:
            if node.op == "get_attr":
                env.pop(node, None)
        return value


# --- PCA ------------------------------------------------------------------------------------------------
def covariance(value: torch.Tensor, batch: Batch, pca_signal: str, eps: float) -> torch.Tensor:
    """``XᵀX`` in float64 over the unmasked tokens of one batch (Sec. 3.3). ``X`` is the stream value
    itself (``"stream"``) or its RMS-normalised form (``"norm_output"``, the paper's Eq. 8)."""
    signal = value.to(torch.float64)
    if pca_signal == "norm_output":
        signal = signal * torch.rsqrt(signal.pow(2).sum(-1, keepdim=True) / signal.shape[-1] + eps)
    rows = token_rows(signal, batch)
    return rows.T @ rows


def pca_basis(covariance: torch.Tensor, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of ``C`` by decreasing eigenvalue (columns), signs fixed (largest entry positive)."""
    c = covariance.to(torch.float64)
    c = (c + c.T) / 2
    size = c.shape[0]
    if centered:
        u = torch.full((size,), size ** -0.5, dtype=torch.float64, device=c.device)
        m = torch.eye(size, dtype=torch.float64, device=c.device) - torch.outer(u, u)
        c = m @ c @ m - (torch.trace(c) + 1.0) * torch.outer(u, u)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(c)
    except (RuntimeError, NotImplementedError):  # a device without float64 eigh: the CPU's
        eigenvalues, eigenvectors = (t.to(c.device) for t in torch.linalg.eigh(c.cpu()))
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, basis = eigenvalues[order], eigenvectors[:, order]
    if centered:
        basis[:, -1] = u
        eigenvalues[-1] = 0.0
    pivot = basis.abs().argmax(0)
    signs = torch.sign(basis[pivot, torch.arange(size, device=c.device)])
    signs[signs == 0] = 1.0
    return basis * signs, eigenvalues


# --- the rewrite -------------------------------------------------------------------------------------------
def rotate_writer(module: nn.Module, basis: torch.Tensor) -> None:
    """``W ← Qᵀ W``, ``b ← b Q`` (``E ← E Q`` for an embedding)."""
    q = basis.to(module.weight.device)
    if isinstance(module, nn.Embedding):
        set_embedding(module, f64(module.weight) @ q)
    else:
        bias = f64(module.bias)
        set_linear(module, q.T @ f64(module.weight), None if bias is None else bias @ q)


def rotate_reader(module: nn.Module, basis: torch.Tensor) -> None:
    """``W ← W Q``."""
    set_linear(module, f64(module.weight) @ basis.to(module.weight.device), f64(module.bias))


class Rotator:
    """Rewrites the weights (through the plan's weight store) and width-carrying nodes of a fused
    graph position by position."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.gm = plan.gm
        self.weights = plan.weights

    def rotate_writer(self, name: str, basis: torch.Tensor) -> None:
        self.weights.edit(name, rotate_writer, basis)

    def rotate_reader(self, name: str, basis: torch.Tensor) -> None:
        self.weights.edit(name, rotate_reader, basis)

    def rotate(self, index: int, basis: torch.Tensor, width: int) -> None:
        """Rotate every weight touching position ``index`` into ``basis`` and keep ``width`` coordinates."""
        position, tied, q = self.plan.positions[index], self.plan.tied, basis[:, :width]
        tied_here = tied is not None and tied.position == index
        if tied_here and self.plan.centered and width >= self.plan.hidden_size:
            raise FxSliceError(f"position {index} of a centred stream with a tied head keeps at most "
                               f"{self.plan.hidden_size - 1} coordinates (the embedding it shares with the head is "
                               "not mean-free), got width {width}")
        for name in position.writers:
            if not (tied_here and name == tied.embedding):
                self.rotate_writer(name, q)
        if position.shortcut is not None:
            self.rotate_writer(position.shortcut, q)
        for name in position.readers:
            self.rotate_reader(name, q)
        if tied_here:
            self.rotate_tied_head(basis)
        self.resize(index, width)

    def rotate_tied_head(self, basis: torch.Tensor) -> None:
        """A head tied to the embedding reads the whole rotated basis: ``H ← H Q`` (``= E Q``, the
        rotated embedding table), and the affine in front of it maps into that basis: ``A ← Qᵀ A``,
        ``β ← β Q``."""
        self.rotate_reader(self.plan.tied.head, basis)
        self.rotate_writer(self.plan.tied.affine, basis)

    def resize(self, index: int, width: int) -> None:
        """Give the nodes that carry position ``index``'s width (reshapes, a tied embedding's column
        slice) the width ``width``, and re-tie a tied embedding to its head. Weights are not touched:
        this is also how a second capture of the model (the KV-cache program) takes the widths of
        weights it receives."""
        hidden = self.plan.hidden_size
        for node in self.plan.positions[index].reshapes:
            shape = list(node.args[1])
            if shape and shape[-1] == hidden:
                shape[-1] = width
                node.args = (node.args[0], shape) + tuple(node.args[2:])
        tied = self.plan.tied
        if tied is not None and tied.position == index:
            self.weights.tie(tied.embedding, tied.head)
            if tied.width_slice is not None:
                tied.width_slice.args = (tied.width_slice.args[0], -1, 0, width)

    def remove_shortcut(self, index: int) -> None:
        """Delete the shortcut into position ``index`` (its matrix is the identity: both ends share a
        basis and a width); the residual add reads the stream directly again."""
        plan = self.plan
        position = plan.positions[index]
        name, position.shortcut = position.shortcut, None
        remove_module_call(self.gm, name)
        self.weights.drop(name)
        for p in plan.positions:
            if name in p.readers:
                p.readers.remove(name)
        plan.inserted[:] = [m for m in plan.inserted if m.name != name]


# --- the pass -------------------------------------------------------------------------------------------------
def finishing_schedule(plan: Plan, runner: "SegmentRunner", groups: list[list[int]]) -> tuple[list[list[str]], list[list[str]]]:
    """Per segment, the managed modules it runs; per group, the modules final once it is rotated
    (every position a module computes, reads or writes is rotated). Modules run after the last
    position (the head) are neither: they are completed by ``weights.finalise()``."""
    layout = plan.layout()
    segment_modules: list[list[str]] = []
    last: dict[str, int] = {}
    for k, nodes in enumerate(runner.nodes):
        names = [str(n.target) for n in nodes if n.op == "call_module" and plan.weights.manages(str(n.target))]
        segment_modules.append(names)
        for name in names:
            reads, writes = layout.get(name, (None, None))
            touched = [i for i in (reads, writes) if i is not None and plan.positions[i].rotated]
            last[name] = max([last.get(name, -1), plan.rotated[k].index] + touched)
    group_of = {index: g for g, group in enumerate(groups) for index in group}
    finished: list[list[str]] = [[] for _ in groups]
    for name, index in last.items():
        finished[group_of[index]].append(name)
    return segment_modules, finished


@dataclass
class OnDisk:
    """A cached activation written to the offload folder (``torch.save``) with the projections its
    position received since (applied when it is read back)."""

    path: Path
    projections: list = field(default_factory=list)


def restore(env: dict, device: torch.device) -> None:
    """Read back the activations of one batch's environment that wait on disk, projected."""
    for node, value in list(env.items()):
        if isinstance(value, OnDisk):
            tensor = torch.load(value.path, map_location=device)
            for projection in value.projections:
                tensor = project(tensor, projection)
            env[node] = tensor
            value.path.unlink()


def spill(env: dict, node: Node, path: Path) -> None:
    """Write one cached activation to ``path`` until the next segment needs it (a group's earlier
    position that no later segment reads was dropped already: nothing to write)."""
    if node not in env:
        return
    torch.save(env[node], path)
    env[node] = OnDisk(path)


def project(value: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """A cached stream value in the rotated, sliced basis: ``X Q[:, :d]`` (in its own dtype)."""
    return (value.to(torch.float32) @ projection).to(value.dtype)


class InnerPass(Protocol):
    """A rewrite inside the blocks (passes 6 and 7): it watches values while the group's segments
    run (``taps``, with the current ``batch`` set) and edits its modules once the group is rotated."""

    batch: Optional[Batch]

    def taps(self, group: list[int]) -> dict[Node, Callable[[torch.Tensor], None]]: ...

    def slice(self, group: list[int]) -> None: ...


def rotate_and_slice(plan: Plan, batches: list[Batch], widths: list[int], groups: list[list[int]], *,
                     pca_signal: str = "stream", stopwatch: Optional[Stopwatch] = None,
                     progress: bool = True, activation_dir: Optional[Path] = None,
                     probe: Optional[CausalProbe] = None,
                     inner: Sequence["InnerPass"] = ()) -> list[Optional[torch.Tensor]]:
    """Group by group of positions (one basis each): run their blocks once per batch, PCA of the
    summed covariance, rotate and slice, rotate the cached values. Shortcuts inside a group are then
    ``Q_dᵀ Q_d = I`` and are removed. Returns the eigenvalues of every rotated position.

    Within a group the later positions are computed before the group is sliced, so the next group
    calibrates on values that saw no slicing inside this one (each block still runs once per batch).
    The plan's weight store brings each segment's modules in before it runs and finishes them once
    their positions are rotated; under ``torch.distributed`` the covariances are summed over ranks.
    With ``activation_dir`` the cached (rotated) stream values wait there between segments. A
    ``probe``'s two inputs run through every block beside the batches (outside the PCA) and are
    compared at the last rotated position: a model that is not causal is refused. The ``inner``
    passes (writer-side norm branches, MLP hidden units) see their values while a group's segments
    run and rewrite their modules right after the group is rotated, in the order given.
    """
    watch = stopwatch or Stopwatch()
    gm, hidden, weights = plan.gm, plan.hidden_size, plan.weights
    rotated = plan.rotated
    segment_of = {p.index: k for k, p in enumerate(rotated)}
    runner = SegmentRunner(gm, [p.root for p in rotated])
    segment_modules, finished = finishing_schedule(plan, runner, groups)
    tokens = sum(b.input_ids.numel() for b in batches)
    weights.check_room(segment_modules, 2 * tokens * hidden * weights.like.element_size())
    rotator = Rotator(plan)
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    envs = [{input_node: b.input_ids} for b in batches]
    probes = [] if probe is None else [{input_node: ids.to(weights.device)} for ids in (probe.ids, probe.changed)]
    eigenvalues: list[Optional[torch.Tensor]] = [None] * len(plan.positions)
    bar = tqdm(total=len(rotated), desc="fxslice: rotate & slice", unit="pos", disable=not progress)
    with torch.no_grad():
        for number_of_group, group in enumerate(groups):
            summed = torch.zeros(hidden, hidden, dtype=torch.float64, device=weights.device)
            # non-finite flag, first bad batch, failure flag: summed over ranks
            overflow = torch.zeros(3, dtype=torch.float64, device=weights.device)
            for index in group:
                with watch("load"):
                    weights.fetch(segment_modules[segment_of[index]])
            failure: Optional[BaseException] = None
            runner.taps = {node: tap for part in inner for node, tap in part.taps(group).items()}
            try:
                for number, (batch, env) in enumerate(zip(batches, envs)):
                    for part in inner:
                        part.batch = batch
                    if activation_dir is not None:
                        with watch("load"):
                            restore(env, weights.device)
                    for index in group:
                        with watch("calibration forward"):
                            value = runner.run_segment(segment_of[index], env)
                        with watch("pca"):
                            if not torch.isfinite(value).all():
                                if not overflow[0]:
                                    overflow[:2] = torch.tensor([1.0, number])
                                continue
                            summed += covariance(value, batch, pca_signal, plan.positions[index].norm_eps)
                    if activation_dir is not None:
                        for index in group:
                            spill(env, runner.boundaries[segment_of[index]],
                                  activation_dir / f"activation-{index}-{number}.pt")
                runner.taps = {}
                for env in probes:
                    for index in group:
                        with watch("calibration forward"):
                            runner.run_segment(segment_of[index], env)
            except Exception as exc:  # the other ranks must not wait for this one forever
                failure, overflow[2] = exc, 1.0
            with watch("pca"):
                all_reduce_sum(summed)
                all_reduce_sum(overflow)
                if failure is not None:
                    raise failure
                if overflow[2]:
                    raise CalibrationError("calibration failed on another rank (see its error)")
                _check_finite(overflow, group, plan)
                basis, spectrum = pca_basis(summed, plan.centered)
                broadcast_from_first(basis)  # every rank slices with rank 0's basis, whatever its eigh did
            with watch("rewrite"):
                for index in group:
                    eigenvalues[index] = spectrum.cpu()
                    rotator.rotate(index, basis, widths[index])
                    root = runner.boundaries[segment_of[index]]
                    projection = basis[:, :widths[index]].to(torch.float32)
                    for env in envs + probes:
                        if isinstance(env.get(root), OnDisk):
                            env[root].projections.append(projection)
                        elif root in env:
                            env[root] = project(env[root], projection)
                for index in identity_shortcuts(group, widths):
                    rotator.remove_shortcut(index)
                for part in inner:
                    part.slice(group)
            with watch("load"):
                weights.finish(finished[number_of_group])
            bar.update(len(group))
    bar.close()
    if probes:
        first, second = (env[runner.boundaries[-1]].reshape(*probe.ids.shape, -1) for env in probes)  # [B·T, D] too
        probe.check(first, second, f"stream values (position {rotated[-1].index})")
    for env in envs:  # what the last segments left on disk
        for value in env.values():
            if isinstance(value, OnDisk):
                value.path.unlink(missing_ok=True)
    with watch("rewrite"):
        tied = plan.tied
        if tied is not None and not plan.positions[tied.position].rotated:
            rotator.resize(tied.position, hidden)
    with watch("load"):
        weights.finalise()
    gm.recompile()
    return eigenvalues


def _check_finite(overflow: torch.Tensor, group: list[int], plan: Plan) -> None:
    """Refuse non-finite activations (``overflow``: a flag and the first bad batch, summed over ranks)."""
    if float(overflow[0]) > 0:
        labels = ", ".join(f"{i} ({plan.positions[i].label})" for i in group)
        where = f"calibration batch {int(overflow[1])}" if world_size() == 1 else "a calibration batch of some rank"
        raise CalibrationError(f"non-finite activations at stream position {labels} for {where}; "
                               "the model or its dtype overflows on this data")
