"""What ``compress`` hands back: :class:`SliceResult` (attached as ``sliced.fxslice``) and its timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from tabulate import tabulate

from .graph.inserted import InsertedModule

if TYPE_CHECKING:
    from .passes.slice_record import Slice
    from .source import ModelSource
    from .split import SplitSearch


class Stopwatch:
    """Seconds per label, accumulated: ``with watch("pca"): ...``; labels keep their first-use order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, label: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started


@dataclass
class SliceResult:
    """What ``compress`` did: widths per stream position, true parameter counts, timings, spectra."""

    hidden_size: int
    vocab_size: int
    sparsity: float
    widths: list[int]  # per stream position (raw positions keep the full width)
    dense_param_count: int
    param_count: int  # unique parameters of the sliced graph, inserted modules included
    tied_embeddings: bool
    centered: bool
    options: dict
    calibration_tokens: int
    inserted: list[InsertedModule] = field(default_factory=list)
    """modules fxslice inserted (shortcuts, norm affines), named by :mod:`fxslice.graph.inserted`."""
    head: list[str] = field(default_factory=list)
    """the Linear module(s) reading the last stream position (the LM head)."""
    layout: dict[str, tuple[Optional[int], Optional[int]]] = field(default_factory=dict)
    """module name -> (stream position its input reads, stream position its output writes)."""
    timings: dict[str, float] = field(default_factory=dict)
    eigenvalues: list[Optional[torch.Tensor]] = field(default_factory=list)
    added_param_count: int = 0  # parameters of the inserted modules
    hidden_sparsity: float = 0.0
    hidden_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    """MLP writer -> (hidden units kept, hidden units of the dense MLP), for the MLPs sliced."""
    refit_errors: dict[str, float] = field(default_factory=dict)
    """MLP writer -> ``‖H Wᵀ − H_S Xᵀ‖² / ‖H Wᵀ‖²`` of its refit on the calibration data."""
    value_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    """attention output Linear -> (value dimensions kept per key/value group, dense value dimensions)."""
    key_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    """attention output Linear -> (query/key dimensions kept per key/value group, dense head dimension)."""
    skipped_attentions: dict[str, str] = field(default_factory=dict)
    """with ``value_sparsity`` / ``key_sparsity``: the output Linears (not MLPs) whose attention values or
    queries and keys could not be narrowed, and why."""
    value_errors: dict[str, float] = field(default_factory=dict)
    """attention output Linear -> relative calibration error of its narrowed values (:mod:`.passes.p7_rotate.values`)."""
    norm_eps: dict[str, float] = field(default_factory=dict)
    """weightless norm -> its epsilon, where a sliced branch added its removed energy (pass 7)."""
    slice: Optional["Slice"] = None
    """every graph edit the rotation made, in order (:mod:`fxslice.passes.slice_record`): what another
    capture of the model replays to take the sliced shapes."""
    quantization: Optional[dict] = None
    """what pass 8 quantised (:meth:`~fxslice.passes.p8_quantize.QuantizationReport.to_record`), or None."""
    source: Optional["ModelSource"] = None
    """how the model can be captured again (:mod:`fxslice.source`); not part of the record."""
    split_search: Optional["SplitSearch"] = None
    """the candidate splits of a ``target_params`` budget and their held-out scores (:mod:`fxslice.split`)."""

    @property
    def param_fraction(self) -> float:
        return self.param_count / self.dense_param_count

    @property
    def stock_param_count(self) -> Optional[int]:
        """Parameters of the stock Transformers checkpoint of an unrotated slice (``basis="none"``): the
        graph's own count, since nothing was folded or inserted; None for a rotated slice."""
        return self.param_count if self.slice is not None and not self.slice.rotate else None

    @property
    def added(self) -> list[str]:
        """Names of the inserted modules."""
        return [m.name for m in self.inserted]

    def to_record(self) -> dict:
        """The JSON-ready part of the result (what ``fxslice.json`` keeps)."""
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "sparsity": self.sparsity,
            "widths": self.widths,
            "param_count": self.param_count,
            "dense_param_count": self.dense_param_count,
            "added_param_count": self.added_param_count,
            "tied_embeddings": self.tied_embeddings,
            "options": self.options,
            "inserted": [m.to_dict() for m in self.inserted],
            "head": self.head,
            "hidden_sparsity": self.hidden_sparsity,
            "hidden_widths": {k: list(v) for k, v in self.hidden_widths.items()},
            "value_widths": {k: list(v) for k, v in self.value_widths.items()},
            "key_widths": {k: list(v) for k, v in self.key_widths.items()},
            "norm_eps": self.norm_eps,
            "stock_param_count": self.stock_param_count,
            **({"slice": self.slice.to_record()} if self.slice is not None else {}),
            **({"quantization": self.quantization} if self.quantization is not None else {}),
            **({"split_search": self.split_search.to_record()} if self.split_search is not None else {}),
        }

    def table(self) -> str:
        rows = [
            ["hidden size D", self.hidden_size],
            ["sparsity", self.sparsity],
            ["slice widths", _ranges(self.widths)],
            ["MLP hidden units kept", _hidden(self.hidden_widths)],
            ["attention value dims kept", _hidden(self.value_widths)],
            ["attention query/key dims kept", _hidden(self.key_widths)],
            ["dense parameters", f"{self.dense_param_count:,}"],
            ["sliced parameters (true)", f"{self.param_count:,} ({100 * self.param_fraction:.1f}%)"],
            ["  of which shortcuts/affines", f"{self.added_param_count:,}"],
        ] + ([["stock checkpoint parameters",
               f"{self.stock_param_count:,} ({100 * self.stock_param_count / self.dense_param_count:.1f}%)"]]
             if self.stock_param_count is not None else []) + [
            ["tied embeddings kept tied", self.tied_embeddings],
            ["calibration tokens", f"{self.calibration_tokens:,}"],
        ] + ([["budget split", f"{self.split_search.chosen} (measured, held-out {self.split_search.criterion})"]]
             if self.split_search is not None else []) + [
            [f"time {k} (s)", f"{v:.2f}"] for k, v in self.timings.items()]
        return tabulate(rows, tablefmt="simple")

    def __str__(self) -> str:
        return self.table()


def _hidden(widths: dict[str, tuple[int, int]]) -> str:
    """``1152/1536 x30`` (kept/full per sliced MLP, runs of equal values), ``all`` when none is sliced."""
    return _ranges([f"{kept}/{full}" for kept, full in widths.values()]) if widths else "all"


def _ranges(widths: list) -> str:
    """``432 x60, 576`` for runs of equal widths."""
    parts, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            parts.append(f"{widths[start]}" + (f" x{i - start}" if i - start > 1 else ""))
            start = i
    return ", ".join(parts)
