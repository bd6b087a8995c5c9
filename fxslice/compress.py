"""``fxslice.compress``: the graph pass, one pass after the other.

    capture → canonicalise → analyse → fuse → widths → rotate and slice
                                                       (post-norm branches, MLP hidden units inside)

Each pass lives in its own module of :mod:`fxslice.passes` and hands the next one an explicit
value: a captured graph, a canonical graph, a :class:`~fxslice.passes.p3_analyse.Structure`, a
:class:`~fxslice.passes.p4_fuse.Plan`, :class:`~fxslice.passes.widths.Widths`, the eigenvalues and
the sliced graph. What the user asked for travels as :class:`Options`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .calibration import check_device, check_lengths, prepare_batches, token_count
from .checkpoint import Checkpoint, checkpoint_weights, is_checkpoint
from .distributed import raise_together, total
from .errors import FxSliceError
from .graph.store import memory_weights, place_unmanaged
from .graph.weights import count_parameters, release_shared_storage
from .hf import CausalProbe, model_spec
from .passes.p1_capture import capture
from .passes.p2_canonicalise import canonicalise
from .passes.p3_analyse import Structure, analyse
from .passes.p4_fuse import Plan, fuse
from .passes.p5_rotate import BASES, PCA_SIGNALS, basis_groups, rotate_and_slice
from .passes.p6_hidden import ALLOCATIONS, MLP, HiddenSlicer, allocate_units, find_mlps, unit_energies
from .passes.p7_branches import BranchRotator
from .passes.widths import Widths, fill_hidden, plan_budget, sliced_parameter_count, uniform_widths
from .result import SliceResult, Stopwatch


@dataclass(frozen=True)
class Options:
    """What to slice and how (see :func:`compress` for each field); :meth:`check` refuses bad values."""

    sparsity: Optional[float] = None
    target_params: Optional[float] = None
    hidden_sparsity: Optional[float] = None
    round_to: int = 8
    pca_signal: str = "stream"
    slice_head: bool = False
    basis: str = "block"
    allocation: str = "uniform"

    def check(self) -> "Options":
        """Refuse a bad option before any work, naming the argument."""
        if (self.sparsity is None) == (self.target_params is None):
            raise FxSliceError("give either sparsity (fraction of the stream width to delete) or target_params "
                               "(fraction of the dense parameter count to keep), not "
                               + ("both" if self.sparsity is not None else "neither"))
        _fraction("sparsity", self.sparsity, low_open=False)
        _fraction("hidden_sparsity", self.hidden_sparsity, low_open=False)
        _fraction("target_params", self.target_params, low_open=True, high_closed=True)
        if self.target_params is not None and self.hidden_sparsity is not None:
            raise FxSliceError("hidden_sparsity is chosen by target_params; give one of the two")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise FxSliceError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.pca_signal not in PCA_SIGNALS:
            raise FxSliceError(f"pca_signal must be one of {PCA_SIGNALS}, got {self.pca_signal!r}")
        if not isinstance(self.slice_head, bool):
            raise FxSliceError(f"slice_head must be True or False, got {self.slice_head!r}")
        if self.basis not in BASES:
            raise FxSliceError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.allocation not in ALLOCATIONS:
            raise FxSliceError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        return self

    def to_record(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """``0.25``, ``0.2 + MLP 0.4``, ``≤80% params``: what was asked for, in a table cell."""
        if self.target_params is not None:
            return f"≤{100 * self.target_params:g}% params"
        return f"{self.sparsity:g}" + (f" + MLP {self.hidden_sparsity:g}" if self.hidden_sparsity else "")


def _fraction(name: str, value, low_open: bool, high_closed: bool = False) -> None:
    """``value`` is None or a number in [0, 1) ((0, 1] for ``target_params``)."""
    if value is None:
        return
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    low_ok = number is not None and (number > 0.0 if low_open else number >= 0.0)
    high_ok = number is not None and (number <= 1.0 if high_closed else number < 1.0)
    if not (low_ok and high_ok):
        interval = ("(0" if low_open else "[0") + (", 1]" if high_closed else ", 1)")
        raise FxSliceError(f"{name} must be a number in {interval}, got {value!r}")


def inspect(model: nn.Module, show: bool = True) -> Structure:
    """Print (and return) the residual-stream structure fxslice finds in ``model`` (no weight changes)."""
    structure = analyse(canonicalise(capture(model, model_spec(model))))
    if show:
        print(structure.table())
    return structure


def compress(
    model: nn.Module | str | os.PathLike,
    calib_loader: Iterable,
    sparsity: Optional[float] = None,
    *,
    target_params: Optional[float] = None,
    hidden_sparsity: Optional[float] = None,
    round_to: int = 8,
    pca_signal: str = "stream",
    slice_head: bool = False,
    basis: str = "block",
    allocation: str = "uniform",
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    offload_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> GraphModule:
    """Slice ``model`` and return the sliced ``torch.fx.GraphModule``.

    Args:
        model: a causal LM (any ``AutoModelForCausalLM``) in fp32, fp16 or bf16, left unchanged; or
            the path of a Hugging Face checkpoint folder (``config.json`` + safetensors; a hub id when
            a hub is reachable), which is streamed: captured without weights and read one block at a
            time, so that the dense model is never in memory.
        calib_loader: iterable of batches: LongTensor ``[B, T]`` or mappings with ``input_ids`` and an
            optional ``attention_mask`` (zero positions are left out of the PCA). Under
            ``torch.distributed`` each rank passes its own share; covariances are summed over ranks.
        sparsity: fraction of the stream width to delete, in [0, 1) (SliceGPT's knob). Give this or
            ``target_params``.
        target_params: fraction of the dense parameter count to keep, in (0, 1]: the true count of
            the result (inserted modules included, a tied head once) is at most that, within 0.5%.
            The stream and the MLP hidden units are sliced together (:mod:`fxslice.passes.widths`).
        hidden_sparsity: with ``sparsity``, the fraction of every MLP's hidden units to delete
            (default 0: SliceGPT alone); the down projection is refitted by ridge least squares
            (:mod:`fxslice.passes.p6_hidden`).
        round_to: slice widths are rounded down to a multiple of this (1 disables rounding).
        pca_signal: ``"stream"`` (PCA of the residual stream itself, the reference code's choice) or
            ``"norm_output"`` (PCA of the normalised stream, Eq. 8 of the paper).
        slice_head: also slice the last position (the head's input); by default it keeps full width.
        basis: ``"block"`` (default: one basis for the positions a block reads, from their summed
            covariances: the block's inner shortcut ``Q_aᵀ Q_b`` is then the identity and is removed —
            fewer parameters and FLOPs, and lower perplexity on the shipped protocol) or
            ``"position"`` (a PCA basis per stream position, the SliceGPT paper's mode).
        allocation: how the kept MLP hidden units are spread over the blocks: ``"uniform"`` (the
            same fraction everywhere) or ``"energy"`` (by each unit's share of its block's output
            energy, measured by one extra forward of the dense model; in-memory models only).
        device: where calibration runs (default: the model's device; a checkpoint's: ``cpu``). The
            block being calibrated and the cached activations live there, everything else on the CPU.
        dtype: a checkpoint's compute dtype (default: the dtype its config names, else float32).
        offload_dir: a folder in which finished (sliced) weights, and the cached activations
            between blocks, are kept on disk instead of in memory (a subfolder per compression,
            removed when the returned graph is garbage-collected, or at once if compression fails).
            A checkpoint's finished weights go to a temporary folder by default; they end
            memory-mapped from there.
        progress: show a tqdm bar.

    Returns:
        A GraphModule ``forward(input_ids) -> CausalLMOutput`` on the CPU for a checkpoint, on the
        model's device otherwise; ``result.fxslice`` holds a :class:`SliceResult` (widths, true
        parameter counts, inserted modules, timings, eigenvalues).
    """
    options = Options(sparsity, target_params, hidden_sparsity, round_to, pca_signal, slice_head, basis,
                      allocation).check()
    if device is not None:
        check_device(device)
    watch = Stopwatch()
    temporary: list[Path] = []  # offload folders fxslice made: they back the result's weights
    try:
        gm, spec, plan, widths, eigenvalues, batches, hidden, branches = _run_passes(
            model, calib_loader, options, device, dtype, offload_dir, progress, watch, temporary)
    except BaseException:
        for folder in temporary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder in temporary:
        weakref.finalize(gm, shutil.rmtree, folder, True)
    timings = dict(watch.seconds)
    timings["total"] = timings.pop("total")  # listed last
    gm.fxslice = SliceResult(
        hidden_size=plan.hidden_size,
        vocab_size=spec.vocab_size,
        sparsity=widths.stream_sparsity,
        widths=widths.stream,
        dense_param_count=spec.param_count,
        param_count=count_parameters(gm),
        tied_embeddings=plan.tied is not None,
        centered=plan.centered,
        options=options.to_record(),
        calibration_tokens=int(total(token_count(batches))),
        inserted=list(plan.inserted),
        head=list(plan.head),
        layout=plan.layout(),
        timings=timings,
        eigenvalues=eigenvalues,
        added_param_count=sum(p.numel() for m in plan.inserted for p in gm.get_submodule(m.name).parameters()),
        hidden_sparsity=widths.hidden_sparsity,
        hidden_widths={m.writer: (widths.hidden[m.writer], m.width) for m in hidden.mlps},
        refit_errors=dict(hidden.errors),
        norm_eps=dict(branches.eps),
    )
    return gm


def _run_passes(model, calib_loader, options: Options, device, dtype, offload_dir, progress, watch, temporary):
    """The passes in order (see the module docstring); returns what the result records."""
    with watch("total"):
        if is_checkpoint(model):
            checkpoint = Checkpoint.open(model)
            dtype = checkpoint_dtype(checkpoint, dtype)
            with watch("capture"):
                module, storage_keys = checkpoint.empty_model(dtype)
                spec = model_spec(module, weights_loaded=False)
        else:
            if dtype is not None:
                raise FxSliceError("dtype applies to a checkpoint path; convert an in-memory model with model.to(dtype)")
            module, checkpoint, spec = model, None, model_spec(model)
        compute = torch.device(device) if device is not None else spec.device
        error, batches = None, []
        try:
            batches = prepare_batches(calib_loader, spec.vocab_size, compute)
        except FxSliceError as exc:  # one rank's bad shard stops every rank
            error = exc
        raise_together(error)
        with watch("capture"):
            gm = capture(module, spec)
        with watch("canonicalise"):
            gm = canonicalise(gm)
        offload = _offload_folder(offload_dir, temporary, needed=checkpoint is not None)
        if checkpoint is not None:
            del module  # its parameters were never allocated; the graph reads the checkpoint from now on
            weights = checkpoint_weights(gm, checkpoint, storage_keys, dtype, compute, offload)
        else:
            weights = memory_weights(gm, compute, offload)
        with watch("analyse"):
            structure = analyse(gm)
        check_lengths(batches, spec.max_positions if structure.has_position_table() else None)
        with watch("fuse"):
            plan = fuse(structure, weights)
        groups = basis_groups(plan, options.basis)
        widths, mlps = choose_widths(plan, options, spec.param_count, groups)
        if options.allocation == "energy" and any(widths.hidden[m.writer] < m.width for m in mlps):
            if any(weights.manages(m.writer) for m in mlps):
                raise FxSliceError("allocation='energy' measures the dense model in memory; a streamed or "
                                   "offloaded compression takes allocation='uniform'")
            with watch("allocation"):
                energies = unit_energies(plan, mlps, batches)
                widths.hidden = allocate_units(mlps, energies, sum(widths.hidden.values()), options.round_to)
            if options.target_params is not None:  # units the rounding left over, one at a time
                widths, _ = fill_hidden(widths, mlps, options.target_params * spec.param_count, 1,
                                        lambda w: sliced_parameter_count(plan, mlps, w, groups))
        hidden = HiddenSlicer(plan, mlps, widths.hidden)
        branches = BranchRotator(plan, widths.stream)
        place_unmanaged(gm, compute)
        eigenvalues = rotate_and_slice(plan, batches, widths.stream, groups, pca_signal=options.pca_signal,
                                       stopwatch=watch, progress=progress,
                                       activation_dir=offload if offload_dir is not None else None,
                                       # the capture could not run a model without values: calibration does
                                       probe=CausalProbe(spec) if not spec.weights_loaded else None,
                                       inner=(branches, hidden))
        place_unmanaged(gm, weights.home)
        if checkpoint is None:
            release_shared_storage(gm, model)

    return gm, spec, plan, widths, eigenvalues, batches, hidden, branches


def choose_widths(plan: Plan, options: Options, dense_count: int, groups: list[list[int]]) -> tuple[Widths, list[MLP]]:
    """The widths (stream, MLP hidden) for ``options``, and the MLPs of the plan."""
    mlps = find_mlps(plan).mlps
    if options.target_params is not None:
        return plan_budget(plan, mlps, options.target_params, dense_count, options.round_to, options.slice_head,
                           groups), mlps
    return uniform_widths(plan, mlps, float(options.sparsity), float(options.hidden_sparsity or 0.0),
                          options.round_to, options.slice_head), mlps


def _offload_folder(offload_dir, made: list[Path], needed: bool) -> Optional[Path]:
    """A fresh folder of this compression inside ``offload_dir`` (or the system's temporary folder
    when a checkpoint needs one): concurrent runs and ranks never share files, a failed run
    leaves nothing, a finished one keeps it as long as the sliced graph maps its files."""
    if offload_dir is None and not needed:
        return None
    if offload_dir is not None and not Path(offload_dir).is_dir():
        raise FxSliceError(f"offload_dir {offload_dir} is not an existing folder")
    folder = Path(tempfile.mkdtemp(dir=offload_dir, prefix="fxslice-offload-"))
    made.append(folder)
    return folder


def checkpoint_dtype(checkpoint: Checkpoint, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The requested dtype, else the checkpoint config's, else float32."""
    if dtype is None:
        named = getattr(checkpoint.config, "dtype", None) or getattr(checkpoint.config, "torch_dtype", None)
        dtype = getattr(torch, named, None) if isinstance(named, str) else named
    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FxSliceError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype
