"""Exceptions raised by fxslice. All derive from ``FxSliceError`` (a ``ValueError``)."""

from __future__ import annotations


class FxSliceError(ValueError):
    """Base class of every error fxslice raises on bad input or an unsupported graph."""


class GraphStructureError(FxSliceError):
    """The captured graph does not have the structure SliceGPT needs (the invariance would break)."""


class BudgetOutOfReach(FxSliceError):
    """``target_params`` asks for fewer parameters than the slice's narrowest widths keep."""


class CalibrationError(FxSliceError):
    """The calibration data is unusable (empty, wrong shape, out-of-vocabulary ids, non-finite activations)."""


def whole(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (the one test every integer argument of fxslice takes)."""
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_named(name: object):
    """The ``torch.dtype`` called ``name`` (``"float32"``, as records and configs spell it), else None:
    the one test every dtype string read from a file takes."""
    import torch

    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return value if isinstance(value, torch.dtype) else None
