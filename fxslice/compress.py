"""``fxslice.compress``: capture → canonicalise → analyse → fuse → rotate and slice."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from .analyse import Structure, analyse
from .calibrate import SegmentRunner
from .canonicalise import canonicalise
from .capture import capture, count_parameters, vocab_size_of
from .errors import CalibrationError, FxSliceError, describe
from .fuse import Plan, fuse
from .rotate import Rotator, pca_basis, slice_width

PCA_SIGNALS = ("stream", "norm_output")
BASES = ("position", "block")


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]


@dataclass
class SliceResult:
    """What ``compress`` did: widths per stream position, true parameter counts, timings, spectra."""

    hidden_size: int
    sparsity: float
    widths: list[int]  # per stream position (raw positions keep the full width)
    dense_param_count: int
    param_count: int  # unique parameters of the sliced graph, shortcut matrices included
    added_param_count: int  # of which: shortcut matrices and norm affines fxslice inserted
    tied_embeddings: bool
    centered: bool
    options: dict
    calibration_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    eigenvalues: list[Optional[torch.Tensor]] = field(default_factory=list)
    layout: dict[str, tuple[Optional[int], Optional[int]]] = field(default_factory=dict)
    """module name -> (stream position its input reads, stream position its output writes)."""
    added: list[str] = field(default_factory=list)
    """modules fxslice inserted: shortcut matrices (``*.skip_*``) and norm affines (``*_affine``)."""

    @property
    def param_fraction(self) -> float:
        return self.param_count / self.dense_param_count

    def table(self) -> str:
        rows = [
            ["hidden size D", self.hidden_size],
            ["sparsity", self.sparsity],
            ["slice widths", _ranges(self.widths)],
            ["dense parameters", f"{self.dense_param_count:,}"],
            ["sliced parameters (true)", f"{self.param_count:,} ({100 * self.param_fraction:.1f}%)"],
            ["  of which shortcuts/affines", f"{self.added_param_count:,}"],
            ["tied embeddings kept tied", self.tied_embeddings],
            ["calibration tokens", f"{self.calibration_tokens:,}"],
        ] + [[f"time {k} (s)", f"{v:.2f}"] for k, v in self.timings.items()]
        return tabulate(rows, tablefmt="simple")

    def __str__(self) -> str:
        return self.table()


def _ranges(widths: list[int]) -> str:
    parts, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            parts.append(f"{widths[start]}" + (f" x{i - start}" if i - start > 1 else ""))
            start = i
    return ", ".join(parts)


def prepare_batches(calib_loader: Iterable, vocab_size: int, device: torch.device) -> list[Batch]:
    """Validate and materialise the calibration batches (before anything is captured or changed)."""
    if isinstance(calib_loader, torch.Tensor) and calib_loader.dim() == 2:
        raise CalibrationError(
            "calib_loader is a single [B, T] tensor; pass an iterable of batches, e.g. [input_ids] or input_ids.split(8)"
        )
    if calib_loader is None or isinstance(calib_loader, (str, bytes)):
        raise CalibrationError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}")
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise CalibrationError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}") from None
    batches = []
    for i, batch in enumerate(iterator):
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise CalibrationError(f"calibration batch {i} is a mapping without 'input_ids' (keys: {sorted(batch)})")
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        elif isinstance(batch, torch.Tensor):
            ids, mask = batch, None
        elif isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
            ids, mask = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            raise CalibrationError(
                f"calibration batch {i} is a {type(batch).__name__}; expected a LongTensor [B, T] or a mapping "
                "with 'input_ids' (and optionally 'attention_mask')"
            )
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise CalibrationError(f"calibration batch {i}: input_ids must be an integer tensor, got "
                                   f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise CalibrationError(f"calibration batch {i}: input_ids must have shape [B, T] with B, T > 0, got {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise CalibrationError(f"calibration batch {i}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                raise CalibrationError(
                    f"calibration batch {i}: attention_mask must be a tensor of the same shape as input_ids "
                    f"{list(ids.shape)}, got {list(getattr(mask, 'shape', []))}"
                )
            if not torch.isin(mask.to(torch.int64), torch.tensor([0, 1])).all():
                raise CalibrationError(f"calibration batch {i}: attention_mask must contain only 0 and 1")
            mask = mask.to(device=device, dtype=torch.bool)
        batches.append(Batch(ids.to(device=device, dtype=torch.long), mask))
    if not batches:
        raise CalibrationError("calib_loader yielded no batches")
    tokens = sum(int(b.attention_mask.sum()) if b.attention_mask is not None else b.input_ids.numel() for b in batches)
    if tokens == 0:
        raise CalibrationError("every calibration token is masked out by attention_mask")
    return batches


def _check_options(sparsity, round_to, pca_signal, slice_head, basis):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise FxSliceError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise FxSliceError(f"round_to must be a positive integer, got {round_to!r}")
    if pca_signal not in PCA_SIGNALS:
        raise FxSliceError(f"pca_signal must be one of {PCA_SIGNALS}, got {pca_signal!r}")
    if not isinstance(slice_head, bool):
        raise FxSliceError(f"slice_head must be True or False, got {slice_head!r}")
    if basis not in BASES:
        raise FxSliceError(f"basis must be one of {BASES}, got {basis!r}")


def prepare(model: nn.Module) -> tuple[GraphModule, Structure, int]:
    """Capture, canonicalise and analyse ``model`` (no weight is changed). Returns (graph, structure, dense count)."""
    captured = capture(model)
    gm = canonicalise(captured.gm)
    return gm, analyse(gm), captured.dense_param_count


def inspect(model: nn.Module, show: bool = True) -> Structure:
    """Print (and return) the residual-stream structure fxslice finds in ``model``."""
    _, structure, _ = prepare(model)
    if show:
        print(structure.table())
    return structure


def compress(
    model: nn.Module,
    calib_loader: Iterable,
    sparsity: float,
    *,
    round_to: int = 8,
    pca_signal: str = "stream",
    slice_head: bool = False,
    basis: str = "position",
    progress: bool = True,
) -> GraphModule:
    """Slice ``model`` with SliceGPT and return the sliced ``torch.fx.GraphModule``.

    Args:
        model: a causal LM (any ``AutoModelForCausalLM``) in fp32, fp16 or bf16. Left unchanged.
        calib_loader: iterable of batches: LongTensor ``[B, T]`` or mappings with ``input_ids`` and an
            optional ``attention_mask`` (zero positions are left out of the PCA).
        sparsity: fraction of the stream width to delete, in [0, 1).
        round_to: slice widths are rounded down to a multiple of this (1 disables rounding).
        pca_signal: ``"stream"`` (PCA of the residual stream itself, the reference code's choice) or
            ``"norm_output"`` (PCA of the normalised stream, Eq. 8 of the paper).
        slice_head: also slice the last position (the head's input); by default it keeps full width.
        basis: ``"position"`` (a PCA basis per stream position, as in the paper) or ``"block"`` (one
            basis for the positions a block reads, from their summed covariances: the block's inner
            shortcut ``Q_aᵀ Q_b`` is then the identity and is removed — fewer parameters and FLOPs).
        progress: show a tqdm bar.

    Returns:
        A GraphModule ``forward(input_ids) -> CausalLMOutput``; ``result.fxslice`` holds a
        :class:`SliceResult` (widths, true parameter counts, timings, eigenvalues).
    """
    _check_options(sparsity, round_to, pca_signal, slice_head, basis)
    started = time.perf_counter()
    device = next(model.parameters()).device
    batches = prepare_batches(calib_loader, vocab_size_of(model), device)
    timings = {}
    t0 = time.perf_counter()
    gm, structure, dense_count = prepare(model)
    plan = fuse(structure)
    timings["capture"] = time.perf_counter() - t0
    hidden = structure.hidden_size
    width = slice_width(hidden, float(sparsity), round_to)
    if width < 1:
        raise FxSliceError(f"sparsity {sparsity} leaves no column of the hidden size {hidden} (round_to={round_to})")
    cap = hidden - 1 if plan.centered else hidden
    widths = []
    for p in structure.positions:
        if not p.rotated:
            widths.append(hidden)
        elif p is structure.last and not slice_head:
            widths.append(cap)
        else:
            widths.append(min(width, cap))
    groups = structure.block_groups() if basis == "block" else [[p.index] for p in structure.positions if p.rotated]
    eigenvalues = calibrate_and_slice(plan, batches, widths, groups, pca_signal, timings, progress)
    release_source_storage(gm, model)
    gm.recompile()
    added = sum(p.numel() for name in plan.added for p in gm.get_submodule(name).parameters())
    timings["total"] = time.perf_counter() - started
    gm.fxslice = SliceResult(
        hidden_size=hidden,
        sparsity=float(sparsity),
        widths=widths,
        dense_param_count=dense_count,
        param_count=count_parameters(gm),
        added_param_count=added,
        tied_embeddings=plan.tied is not None,
        centered=plan.centered,
        options={"round_to": round_to, "pca_signal": pca_signal, "slice_head": slice_head, "basis": basis},
        calibration_tokens=sum(
            int(b.attention_mask.sum()) if b.attention_mask is not None else b.input_ids.numel() for b in batches
        ),
        timings=timings,
        eigenvalues=eigenvalues,
        layout=layout_of(plan),
        added=list(plan.added),
    )
    return gm


def layout_of(plan: Plan) -> dict[str, tuple[Optional[int], Optional[int]]]:
    """Which stream position each module reads and writes (None: not the stream)."""
    reads = {name: p for p, names in plan.readers.items() for name in names}
    writes = {name: p for p, names in plan.writers.items() for name in names}
    writes.update({name: p for p, name in plan.shortcuts.items()})
    if plan.tied is not None:
        writes.pop(plan.tied.embedding, None)
    return {name: (reads.get(name), writes.get(name)) for name in sorted(set(reads) | set(writes))}


def calibrate_and_slice(plan: Plan, batches: list[Batch], widths: list[int], groups: list[list[int]],
                        pca_signal: str, timings: dict, progress: bool) -> list[Optional[torch.Tensor]]:
    """Group by group of positions (one basis each): run their blocks once per batch, PCA of the
    summed covariance, rotate and slice, rotate the cached values. Shortcuts inside a group are then
    ``Q_dᵀ Q_d = I`` and are removed.

    Within a group the later positions are computed before the group is sliced, so the next group
    calibrates on values that saw no slicing inside this one (each block still runs once per batch).
    """
    structure = plan.structure
    gm, hidden = structure.gm, structure.hidden_size
    rotated = [p for p in structure.positions if p.rotated]
    segment_of = {p.index: k for k, p in enumerate(rotated)}
    runner = SegmentRunner(gm, [plan.roots[p.index] for p in rotated])
    rotator = Rotator(plan)
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    envs = [{input_node: b.input_ids} for b in batches]
    eigenvalues: list[Optional[torch.Tensor]] = [None] * len(structure.positions)
    timings.update({"calibration forward": 0.0, "pca": 0.0, "rewrite": 0.0})
    bar = tqdm(total=len(rotated), desc="fxslice: rotate & slice", unit="pos", disable=not progress)
    with torch.no_grad():
        for group in groups:
            covariance = torch.zeros(hidden, hidden, dtype=torch.float64, device=batches[0].input_ids.device)
            for b, (batch, env) in enumerate(zip(batches, envs)):
                for index in group:
                    t0 = time.perf_counter()
                    value = runner.run_segment(segment_of[index], env)
                    timings["calibration forward"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    covariance += _covariance(value, batch, b, structure.positions[index], pca_signal,
                                              plan.norm_eps.get(index, 0.0))
                    timings["pca"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            basis, spectrum = pca_basis(covariance, plan.centered)
            timings["pca"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for index in group:
                eigenvalues[index] = spectrum.cpu()
                rotator.apply(index, basis, widths[index])
                root = runner.boundaries[segment_of[index]]
                projection = basis[:, :widths[index]].to(torch.float32)
                for env in envs:
                    if root in env:
                        env[root] = (env[root].to(torch.float32) @ projection).to(env[root].dtype)
            timings["rewrite"] += time.perf_counter() - t0
            bar.update(len(group))
    bar.close()
    if plan.tied is not None and not structure.positions[plan.tied.position].rotated:
        rotator.retie(None, hidden)
    for group in groups:  # each member after the first is fed by the one before it (block_groups)
        for previous, index in zip(group, group[1:]):
            if widths[index] == widths[previous]:
                rotator.remove_shortcut(index)
    return eigenvalues


def _covariance(value: torch.Tensor, batch: Batch, number: int, position, pca_signal: str,
                eps: float) -> torch.Tensor:
    """``XᵀX`` in float64 over the unmasked tokens of one batch at one position (Sec. 3.3)."""
    if not torch.isfinite(value).all():
        raise CalibrationError(
            f"non-finite activations at stream position {position.index} ({describe(position.root)}) "
            f"for calibration batch {number}; the model or its dtype overflows on this data"
        )
    signal = value.to(torch.float64)
    if pca_signal == "norm_output":
        signal = signal * torch.rsqrt(signal.pow(2).sum(-1, keepdim=True) / signal.shape[-1] + eps)
    rows = signal[batch.attention_mask] if batch.attention_mask is not None else signal.reshape(-1, signal.shape[-1])
    return rows.T @ rows


def release_source_storage(gm: GraphModule, model: nn.Module) -> None:
    """Give every parameter/buffer still sharing memory with the caller's model its own copy."""
    source = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    for module in gm.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.numel() and param.data_ptr() in source:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.numel() and buffer.data_ptr() in source:
                module.register_buffer(name, buffer.clone())
    for name, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() in source:
            setattr(gm, name, value.clone())
