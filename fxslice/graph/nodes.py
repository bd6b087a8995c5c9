"""Reading nodes: their example values, the parameters they fetch, the module path that made them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.fx import Node
from torch.fx.node import map_arg


def example_value(node: object) -> Optional[torch.Tensor]:
    """The tensor ``torch.export`` recorded for ``node`` (``meta["val"]``), None for non-tensors."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def from_parameters(value, cache: Optional[dict] = None) -> bool:
    """A number, or a tensor computed from parameters, buffers and numbers only by deterministic ops (never
    from the input); ``cache``: answers kept per node."""
    if isinstance(value, (int, float)):
        return True
    if not isinstance(value, Node):
        return False
    cache = {} if cache is None else cache
    if value not in cache:
        cache[value] = value.op == "get_attr" or (
            value.op == "call_function" and example_value(value) is not None
            and torch.Tag.nondeterministic_seeded not in getattr(value.target, "tags", ())
            and all(from_parameters(a, cache) for a in value.all_input_nodes))
    return cache[value]


def fetch_attr(root: nn.Module, target: str):
    """``root.a.b.c`` for target ``"a.b.c"`` (what a ``get_attr`` node reads)."""
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def parameter_of(root: nn.Module, node: object) -> Optional[torch.Tensor]:
    """The (detached) tensor a ``get_attr`` node reads; None for anything else."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    return fetch_attr(root, str(node.target)).detach()


def evaluate_constant(root: nn.Module, node: Node) -> torch.Tensor:
    """The value of a ``get_attr`` node, or of a node computed from parameters and constants only
    (``weight + 1``, ``sigmoid(gate)``), evaluated on ``root``'s tensors."""
    if node.op == "get_attr":
        return fetch_attr(root, str(node.target)).detach()
    if node.op != "call_function":
        raise ValueError(f"node '{node.name}' is not computed from parameters only")
    args = map_arg(node.args, lambda a: evaluate_constant(root, a))
    kwargs = map_arg(node.kwargs, lambda a: evaluate_constant(root, a))
    with torch.no_grad():
        return node.target(*args, **kwargs)


def module_path(node: Node) -> tuple[str, str]:
    """The innermost Hugging Face module path and class name that produced ``node`` ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def module_call(node: Node) -> tuple[str, int]:
    """The innermost module path of ``node`` and which call of that module made it (0 for the first;
    ``torch.export`` tells repeated calls of one module apart as ``path@1``, ``path@2``, …)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", 0
    key, (path, _) = list(stack.items())[-1]
    return path, call_number(key)


def call_number(stack_key: str) -> int:
    head, _, number = str(stack_key).rpartition("@")
    return int(number) if head and number.isdigit() else 0


def describe(node: Node) -> str:
    """``node 'name' (op) in module 'path' (Class)`` — the way every error names a node."""
    path, cls = module_path(node)
    where = f" in module '{path}' ({cls})" if path else " (no module path)"
    return f"node '{node.name}' ({node.op}: {node.target}){where}"


def copy_meta(target: Node, source: Node, keys=("val", "nn_module_stack", "stack_trace")) -> None:
    """Give an inserted node the metadata of the node it stands for."""
    target.meta.update({k: source.meta[k] for k in keys if k in source.meta})
