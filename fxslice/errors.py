"""Exceptions raised by fxslice. All derive from ``FxSliceError`` (a ``ValueError``)."""

from __future__ import annotations

from torch.fx import Node


class FxSliceError(ValueError):
    """Base class of every error fxslice raises on bad input or an unsupported graph."""


class GraphStructureError(FxSliceError):
    """The captured graph does not have the structure SliceGPT needs (the invariance would break)."""


class CalibrationError(FxSliceError):
    """The calibration data is unusable (empty, wrong shape, out-of-vocabulary ids, non-finite activations)."""


def module_path(node: Node) -> tuple[str, str]:
    """The innermost Hugging Face module path and class name that produced ``node`` ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def describe(node: Node) -> str:
    """``node 'name' (op) in module 'path' (Class)`` — the way every error names a node."""
    op = str(node.target)
    path, cls = module_path(node)
    where = f" in module '{path}' ({cls})" if path else " (no module path)"
    return f"node '{node.name}' ({node.op}: {op}){where}"
