"""What the user asked ``compress`` for (:class:`Options`), checked before any work.

The names of the choices live here, beside the check that refuses anything else; the passes that
act on them import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .errors import FxSliceError, whole

PCA_SIGNALS = ("stream", "norm_output")
"""PCA of the stream value itself (the reference code) or of the norm's output (the paper's Eq. 8)."""
BASES = ("position", "block", "model", "none")
"""One PCA basis per stream position, per group of positions a block reads, or one for the whole stream;
or none: the stream keeps its coordinates and its width (only MLP hidden units are cut), so no shortcut
and no norm change."""
SAVE_FORMATS = ("fxslice", "transformers")
"""What ``fxslice.save`` writes: the sliced program and its weights, or a stock Transformers checkpoint."""
FINETUNE_METHODS = ("lora", "full")
"""What recovery fine-tuning trains: LoRA adapters merged afterwards, or every weight of the slice."""
QUANT_SCHEMES = ("int8", "int4")
"""Weight-only quantisation of a slice (pass 8): int8 with one scale per row, or int4 in groups."""
ALLOCATIONS = ("uniform", "energy", "measured")
"""MLP hidden units kept: the same fraction everywhere, by measured output energy, or by the measured
divergence each MLP's cut alone causes (:func:`fxslice.passes.p6_widths.mlp_sensitivities`)."""
SPLITS = ("measured", "fixed")
"""How ``target_params`` divides the budget between the stream width and the MLP units: the candidate
split whose slice stays closest to the model on held-out calibration windows (:mod:`fxslice.split`), or
the fixed ratio of :mod:`fxslice.passes.p6_widths`."""


@dataclass(frozen=True)
class Options:
    """What to slice and how (see :func:`compress` for each field); :meth:`check` refuses bad values."""

    sparsity: Optional[float] = None
    target_params: Optional[float] = None
    hidden_sparsity: Optional[float] = None
    round_to: int = 8
    pca_signal: str = "stream"
    slice_head: bool = False
    basis: Optional[str] = None  # None: "none" under ``stock``, else "block"
    allocation: str = "uniform"
    stock: bool = False
    split: str = "measured"
    stream_sparsity: Optional[float] = None  # under target_params: the stream's share, MLP units meet the rest
    value_sparsity: Optional[float] = None  # the share of every attention's value dimensions cut
    key_sparsity: Optional[float] = None  # the share of every attention's query/key dimensions cut
    basis_span: int = 1  # under basis="block": consecutive blocks sharing one basis

    def check(self) -> "Options":
        """Refuse a bad option before any work, naming the argument; returns the options with the
        default basis filled in."""
        if not isinstance(self.stock, bool):
            raise FxSliceError(f"stock must be True or False, got {self.stock!r}")
        if self.basis is None:
            return replace(self, basis="none" if self.stock else "block").check()
        if (self.sparsity is None) == (self.target_params is None):
            raise FxSliceError("give either sparsity (fraction of the stream width to delete) or target_params "
                               "(fraction of the dense parameter count to keep), not "
                               + ("both" if self.sparsity is not None else "neither"))
        _fraction("sparsity", self.sparsity, low_open=False)
        _fraction("hidden_sparsity", self.hidden_sparsity, low_open=False)
        _fraction("target_params", self.target_params, low_open=True, high_closed=True)
        if self.target_params is not None and self.hidden_sparsity is not None:
            raise FxSliceError("hidden_sparsity is chosen by target_params; give one of the two")
        if not whole(self.round_to) or self.round_to < 1:
            raise FxSliceError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.pca_signal not in PCA_SIGNALS:
            raise FxSliceError(f"pca_signal must be one of {PCA_SIGNALS}, got {self.pca_signal!r}")
        if not isinstance(self.slice_head, bool):
            raise FxSliceError(f"slice_head must be True or False, got {self.slice_head!r}")
        if self.basis not in BASES:
            raise FxSliceError(f"basis must be one of {BASES}, got {self.basis!r}")
        if not whole(self.basis_span) or self.basis_span < 1:
            raise FxSliceError(f"basis_span must be a positive integer, got {self.basis_span!r}")
        if self.basis_span != 1 and self.basis != "block":
            raise FxSliceError(f"basis_span joins the bases of consecutive blocks: it needs basis='block', got "
                               f"basis={self.basis!r} with basis_span={self.basis_span}")
        if self.allocation not in ALLOCATIONS:
            raise FxSliceError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.split not in SPLITS:
            raise FxSliceError(f"split must be one of {SPLITS}, got {self.split!r}")
        _fraction("stream_sparsity", self.stream_sparsity, low_open=False)
        _fraction("value_sparsity", self.value_sparsity, low_open=False)
        _fraction("key_sparsity", self.key_sparsity, low_open=False)
        if self.stream_sparsity is not None and self.target_params is None:
            raise FxSliceError("stream_sparsity fixes the stream's share of a target_params budget; without "
                               "target_params give sparsity (and hidden_sparsity)")
        if self.stock:
            self._check_stock()
        if self.basis == "none" and self.sparsity:
            raise FxSliceError(f"basis='none' keeps the stream unrotated and whole: sparsity must be 0, got "
                               f"{self.sparsity!r} (cut MLP units with hidden_sparsity, or give target_params)")
        if self.stream_sparsity and self.basis == "none":
            raise FxSliceError(f"basis='none' keeps the stream unrotated and whole: stream_sparsity must be 0, "
                               f"got {self.stream_sparsity!r}")
        if self.basis == "none" and self.slice_head:
            raise FxSliceError("basis='none' keeps the stream whole: slice_head needs a rotated stream")
        return self

    def _check_stock(self) -> None:
        """A stock config has one hidden size and nothing on the residual path, one MLP width for all
        layers: the stream stays unrotated and every MLP keeps the same number of units."""
        if self.value_sparsity:
            raise FxSliceError(f"stock=True keeps every attention's value heads (a stock config has one head size): "
                               f"value_sparsity must be 0, got {self.value_sparsity!r}")
        if self.key_sparsity:
            raise FxSliceError(f"stock=True keeps every attention's query and key heads (a stock config has one head "
                               f"size): key_sparsity must be 0, got {self.key_sparsity!r}")
        if self.sparsity or self.stream_sparsity:
            raise FxSliceError(f"stock=True keeps the stream width (a stock config has one hidden size): sparsity "
                               f"must be 0, got {self.sparsity or self.stream_sparsity!r}; cut MLP units with hidden_sparsity or target_params")
        if self.basis != "none":
            raise FxSliceError(f"stock=True keeps the stream unrotated (a stock Transformers config has no "
                               f"rotation on the residual path): basis must be 'none', got {self.basis!r}")
        if self.allocation != "uniform":
            raise FxSliceError("stock=True keeps the same MLP width in every layer (one intermediate_size in a "
                               f"stock config): allocation must be 'uniform', got {self.allocation!r}")

    def to_record(self) -> dict:
        return asdict(self)

    @property
    def searches_split(self) -> bool:
        """A budget whose stream/MLP split is still to be measured: ``target_params`` with
        ``split="measured"``, no ``stream_sparsity`` given, and a stream that may be narrowed."""
        return (self.target_params is not None and self.split == "measured" and self.stream_sparsity is None
                and self.basis != "none" and not self.stock)

    def label(self) -> str:
        """``0.25``, ``0.2 + MLP 0.4``, ``≤80% params``: what was asked for, in a table cell."""
        if self.target_params is not None:
            return f"≤{100 * self.target_params:g}% params" + (" (stock)" if self.stock else "")
        label = f"{self.sparsity:g}" + (f" + MLP {self.hidden_sparsity:g}" if self.hidden_sparsity else "")
        return label + (" (stock)" if self.stock else "")


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
