"""Pass 7's loop: group by group of positions, calibrate, PCA, rotate and slice, then the block rewrites."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch.fx import Node
from tqdm.auto import tqdm

from ...calibration import Batch
from ...distributed import all_reduce_sum, broadcast_from_first, raise_together, world_size
from ...errors import CalibrationError
from ...graph.store import place_unmanaged
from ...hf import CausalProbe
from ...result import Stopwatch
from ..p5_fuse import Plan
from ..p6_widths import Widths, identity_shortcuts
from ..slice_record import RemoveShortcut, Resize, Slice
from .activations import ActivationCache
from .branches import BranchRotator
from .hidden import HiddenSlicer
from .keys import KeySlicer
from .values import ValueSlicer
from .pca import covariance, pca_basis
from .positions import Rotator
from .runner import SegmentRunner, Tap, finishing_schedule

if TYPE_CHECKING:
    from ..run import Run

NAME = "rotate"


class BlockRewrite(Protocol):
    """A rewrite inside the blocks, after its group's positions are rotated (post-norm branches, MLP
    hidden units): it watches values while the group's segments run and then edits its modules."""

    def taps(self, group: list[int]) -> dict[Node, Tap]: ...

    def slice(self, group: list[int], record: Slice) -> None: ...


class GroupHealth:
    """What a group's calibration found wrong on this rank — non-finite values (and the first such
    batch), an exception — as one tensor summed over ranks, so that every rank stops together."""

    def __init__(self, device: torch.device):
        self.flags = torch.zeros(3, dtype=torch.float64, device=device)  # non-finite, first bad batch, failed
        self.failure: Optional[BaseException] = None

    def non_finite(self, number: int) -> None:
        if not self.flags[0]:
            self.flags[:2] = torch.tensor([1.0, number])

    def failed(self, exc: BaseException) -> None:
        self.failure, self.flags[2] = exc, 1.0

    def check(self, group: list[int], plan: Plan) -> None:
        """Sum over ranks, then raise this rank's exception, another rank's failure, or non-finite values."""
        all_reduce_sum(self.flags)
        if self.flags[2]:  # every rank sees it: they exchange the failing rank's message
            raise_together(self.failure)
        if float(self.flags[0]) > 0:
            labels = ", ".join(f"{i} ({plan.positions[i].label})" for i in group)
            where = f"calibration batch {int(self.flags[1])}" if world_size() == 1 else "a calibration batch of some rank"
            raise CalibrationError(f"non-finite activations at stream position {labels} for {where}; "
                                   "the model or its dtype overflows on this data")


def rotate_and_slice(plan: Plan, batches: list[Batch], widths: Widths, *, pca_signal: str = "stream",
                     stopwatch: Optional[Stopwatch] = None, progress: bool = True,
                     activation_dir: Optional[Path] = None,
                     probe: Optional[CausalProbe] = None) -> tuple[Slice, list[Optional[torch.Tensor]]]:
    """Rotate and slice every group of positions of ``widths.groups`` (one basis each); returns the
    slice (every graph edit made, the MLP units kept) and the eigenvalues of every rotated position.

    Per group: run its segments once per batch (the block rewrites' taps watching), PCA of the summed
    covariance, rotate and slice its positions, project the cached values, remove the shortcuts inside
    the group (``Q_dᵀ Q_d = I``), then the block rewrites in order — post-norm branches, MLP hidden
    units. Within a group the later positions are computed before the group is sliced, so the next
    group calibrates on values that saw no slicing inside this one. The plan's weight store brings
    each segment's modules in before it runs and finishes them once their positions are rotated;
    under ``torch.distributed`` the covariances are summed over ranks. With ``activation_dir`` the
    cached stream values wait there between segments. A ``probe``'s two inputs run through every
    block beside the batches (outside the PCA) and are compared at the last rotated position: a
    model that is not causal is refused.
    """
    watch = stopwatch or Stopwatch()
    gm, hidden, weights = plan.gm, plan.hidden_size, plan.weights
    rotated = plan.rotated
    segment_of = {p.index: k for k, p in enumerate(rotated)}
    runner = SegmentRunner(gm, [p.root for p in rotated])
    segment_modules, finished = finishing_schedule(plan, runner, widths.groups)
    tokens = sum(b.input_ids.numel() for b in batches)
    group_modules = [[name for index in group for name in segment_modules[segment_of[index]]] for group in widths.groups]
    weights.check_room(group_modules, 2 * tokens * hidden * weights.like.element_size())  # a group is fetched whole
    record = Slice(len(plan.positions), rotate=widths.rotate)
    rotator = Rotator(plan, record)
    rewrites: list[BlockRewrite] = [BranchRotator(plan, widths.stream), HiddenSlicer(plan, widths.hidden),
                                    ValueSlicer(plan, widths.values), KeySlicer(plan, widths.query_keys)]
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    cache = ActivationCache(input_node, batches, [] if probe is None else [probe.ids, probe.changed],
                            weights.device, activation_dir)
    eigenvalues: list[Optional[torch.Tensor]] = [None] * len(plan.positions)
    bar = tqdm(total=len(rotated), desc="fxslice: rotate & slice", unit="pos", disable=not progress)
    with torch.no_grad():
        for number_of_group, group in enumerate(widths.groups):
            with watch("load"):
                weights.fetch([name for index in group for name in segment_modules[segment_of[index]]])
            segments = [segment_of[index] for index in group]
            runner.taps = {node: tap for rewrite in rewrites for node, tap in rewrite.taps(group).items()}
            summed, health = _calibrate(runner, cache, segments, plan, pca_signal if widths.rotate else None, watch)
            with watch("pca"):
                health.check(group, plan)  # every rank stops here together, or none does
                if widths.rotate:  # an unrotated stream keeps its coordinates: no basis, nothing to project
                    all_reduce_sum(summed)
                    # a centred basis (1/√D last) when any position of the group is centred: still complete at
                    # width D for the others (basis="model" groups a post-norm model's uncentred first position too)
                    basis, spectrum = pca_basis(summed, any(plan.positions[i].centered for i in group))
                    broadcast_from_first(basis)  # every rank slices with rank 0's basis, whatever its eigh did
            with watch("rewrite"):
                for index in group if widths.rotate else []:
                    eigenvalues[index] = spectrum.cpu()
                    rotator.rotate(index, basis, widths.stream[index])
                    cache.project(runner.boundaries[segment_of[index]], basis[:, :widths.stream[index]].float())
                for index in identity_shortcuts(plan, group, widths):
                    record.apply(plan, RemoveShortcut(index))
                for rewrite in rewrites:
                    rewrite.slice(group, record)
            with watch("load"):
                weights.finish(finished[number_of_group])
            bar.update(len(group))
    bar.close()
    if probe is not None:
        first, second = (env[runner.boundaries[-1]].reshape(*probe.ids.shape, -1)  # [B·T, D] too
                         for env in cache.probe_envs)
        probe.check(first, second, f"stream values (position {rotated[-1].index})")
    cache.close()
    with watch("rewrite"):
        tied = plan.tied
        if tied is not None and not plan.positions[tied.position].rotated:  # re-tie a raw embedding
            record.apply(plan, Resize(tied.position, hidden))
    with watch("load"):
        weights.finalise()
    gm.recompile()
    return record, eigenvalues


def _calibrate(runner: SegmentRunner, cache: ActivationCache, segments: list[int], plan: Plan,
               pca_signal: Optional[str], watch: Stopwatch) -> tuple[torch.Tensor, GroupHealth]:
    """Run a group's segments on every batch (covariance of each boundary summed, unless
    ``pca_signal`` is None: an unrotated stream) and on the probes."""
    device = plan.weights.device
    summed = torch.zeros(plan.hidden_size, plan.hidden_size, dtype=torch.float64, device=device)
    health = GroupHealth(device)
    keep = [runner.boundaries[k] for k in segments]
    try:
        for number, batch, env in cache.each_batch(keep):
            for k in segments:
                with watch("calibration forward"):
                    value = runner.run_segment(k, env, batch)
                with watch("pca"):
                    if not torch.isfinite(value).all():
                        health.non_finite(number)
                        continue
                    if pca_signal is not None:
                        summed += covariance(value, batch, pca_signal, plan.rotated[k].norm_eps)
        for env in cache.probe_envs:
            for k in segments:
                with watch("calibration forward"):
                    runner.run_segment(k, env)
    except Exception as exc:  # the other ranks must not wait for this one forever
        health.failed(exc)
    return summed, health


def step(run: "Run") -> None:
    """Rotate and slice with the calibration device holding the graph's small tensors meanwhile (a
    checkpoint's model, captured without values, is checked for causality here: ``CausalProbe``)."""
    place_unmanaged(run.gm, run.compute)
    probe = CausalProbe(run.spec) if not run.spec.weights_loaded else None
    run.slice, run.eigenvalues = rotate_and_slice(run.plan, run.batches, run.widths, pca_signal=run.options.pca_signal,
                                                  stopwatch=run.watch, progress=run.progress,
                                                  activation_dir=run.activation_dir, probe=probe)
    place_unmanaged(run.gm, run.weights.home)
