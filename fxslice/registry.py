"""Pattern registry: how fxslice recognises norms and linear layers in a captured graph, and how it
captures modules whose own forward ``torch.export`` cannot trace.

Architecture knowledge lives in the top-level ``patterns/`` package (installed as
``fxslice.patterns``), which registers the built-in patterns through the functions below. A user
adds an architecture's norm or linear formulation the same way::

    from fxslice import register_norm_pattern, NormSpec

    @register_norm_pattern("scale_norm")
    def scale_norm(region):
        if not region.uses(torch.ops.aten.linalg_vector_norm.default):
            return None
        g = region.param("gain")
        return NormSpec(centered=False, scale=g * region.width ** 0.5 * torch.ones(region.width), eps=0.0)

A norm pattern only *proposes* a ``NormSpec``; fxslice accepts it only after checking numerically
that ``y = normalise(x) * scale + shift`` reproduces the region's output on random inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .errors import FxSliceError
from .graph.nodes import call_number, evaluate_constant, module_call, module_path


@dataclass(frozen=True)
class NormSpec:
    """``y = (x - centered * mean(x)) / sqrt(mean((x - centered * mean(x))^2) + eps) * scale + shift``."""

    centered: bool
    scale: torch.Tensor
    eps: float
    shift: Optional[torch.Tensor] = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The formula in float64 (reference for verification)."""
        x = x.double()
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale.double()
        return y + self.shift.double() if self.shift is not None else y


class Region:
    """The nodes of one module call (by ``nn_module_stack`` path), or a single node.

    Has exactly one tensor input from outside (the value being normalised) and one output used
    outside; parameters are the ``get_attr`` nodes it reads, by their last name (``weight``, ``bias``).
    """

    def __init__(self, gm: GraphModule, nodes: list[Node], path: str, cls: str):
        self.gm, self.nodes, self.path, self.cls = gm, nodes, path, cls
        inside = set(nodes)
        self.params: dict[str, Node] = {}
        inputs: list[Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                if a.op == "get_attr":
                    self.params.setdefault(str(a.target).rsplit(".", 1)[-1], a)
                elif a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        self.input = inputs[0] if len(inputs) == 1 else None
        self.output = outputs[0] if len(outputs) == 1 else None

    @property
    def valid(self) -> bool:
        return self.input is not None and self.output is not None

    @property
    def width(self) -> int:
        return int(self.input.meta["val"].shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.input.meta["val"].dtype

    def uses(self, *ops) -> bool:
        """Whether any node of the region calls one of these ops (``torch.ops.aten.rsqrt.default``; a
        name such as ``"aten.rsqrt.default"`` is resolved to its overload)."""
        wanted = {as_op(op) for op in ops}
        return any(n.op == "call_function" and n.target in wanted for n in self.nodes)

    def nodes_calling(self, op) -> list[Node]:
        """The region's calls of ``op`` (an overload or its name), in graph order."""
        target = as_op(op)
        return [n for n in self.nodes if n.op == "call_function" and n.target is target]

    def tensor(self, node_or_none) -> Optional[torch.Tensor]:
        """The value of a parameter node, or of a node computed from parameters and constants only
        (``weight + 1`` of a LayerNorm1P); None for None."""
        return None if node_or_none is None else evaluate_constant(self.gm, node_or_none)

    def param(self, name: str) -> Optional[torch.Tensor]:
        """A parameter read by the region, by its last name; None when absent."""
        node = self.params.get(name)
        return self.tensor(node)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Run the region's nodes on ``x`` (in place of its input)."""
        env: dict[Node, object] = {self.input: x}
        for name, node in self.params.items():
            env[node] = self.tensor(node)
        for n in self.nodes:
            args = map_arg(n.args, lambda a: env[a])
            kwargs = map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        return env[self.output]


def as_op(op):
    """``torch.ops.aten.rsqrt.default`` for itself or for its name ``"aten.rsqrt.default"``."""
    if not isinstance(op, str):
        return op
    namespace, name, *overload = op.split(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload[0] if overload else "default")
    except (AttributeError, RuntimeError):
        raise ValueError(f"unknown op {op!r}: expected a name like 'aten.rsqrt.default'") from None


def module_index(gm: GraphModule) -> dict[tuple[str, int], list[Node]]:
    """(module path, call number) -> the call_function nodes inside that call of the module (nested
    modules included), in graph order. A module called twice (one norm before the first block and
    after the last) gives two regions."""
    index: dict[tuple[str, int], list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
            index.setdefault((path, call_number(key)), []).append(n)
    return index


def region_of(gm: GraphModule, node: Node, index: Optional[dict] = None) -> Optional[Region]:
    """The region of the module call that ``node`` belongs to, else the node alone; None if neither is
    single-in single-out. A later call ``k`` of a module is named ``<path>_<k>``."""
    path, cls = module_path(node)
    candidates = []
    if path:
        _, call = module_call(node)
        members = (index if index is not None else module_index(gm)).get((path, call), [])
        candidates.append(Region(gm, members, f"{path}_{call}" if call else path, cls))
    candidates.append(Region(gm, [node], path, cls))
    for region in candidates:
        if region.valid:
            return region
    return None


NormMatcher = Callable[[Region], Optional[NormSpec]]


@dataclass
class LinearMatch:
    """A subgraph computing ``y = x W^T + b`` that becomes one ``nn.Linear`` named ``name``.

    With ``expert_ids`` (a graph value with one expert index per row of ``input``) the weight is a
    grouped ``[E, out, in]`` tensor (bias ``[E, out]``) and the subgraph becomes one
    :class:`~fxslice.graph.modules.ExpertLinear`: ``y_s = W[e_s] x_s + b[e_s]``. With ``compute_dtype``
    the subgraph casts the stored weight before using it and becomes an
    :class:`~fxslice.graph.modules.UpcastLinear`.
    """

    nodes: list[Node]
    input: Node
    output: Node
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    name: str
    expert_ids: Optional[Node] = None
    batched_experts: bool = False  # a [E, out, in] weight applied to an [E, T, in] input: a BatchedExpertLinear
    compute_dtype: Optional[torch.dtype] = None  # W (and b) cast to it where used: an UpcastLinear


LinearMatcher = Callable[[GraphModule, Node], Optional[LinearMatch]]


@dataclass
class Substitution:
    """A capture pattern's proposal: export-friendly versions of some methods of one module (a loop over
    the experts a batch happens to reach, ``.tolist()`` of routing counts: data-dependent control flow
    ``torch.export`` cannot trace), used while the model is captured and removed afterwards.

    ``methods`` maps a method name to ``fn(module, *args)``; ``example(call, generator)`` computes
    something from the module through ``call(name, *args)`` on random inputs drawn from ``generator``
    and returns the tensors to compare. It runs once with the module's own methods and once with the
    substitutes; the substitution is used only where they agree (:func:`capture_tolerance`; integer
    and boolean outputs equal).
    """

    methods: dict[str, Callable]
    example: Callable[[Callable, torch.Generator], object]


CaptureMatcher = Callable[[torch.nn.Module], Optional[Substitution]]


@dataclass
class _Registry:
    norms: list[tuple[str, NormMatcher]] = field(default_factory=list)
    linears: list[tuple[str, LinearMatcher]] = field(default_factory=list)
    captures: list[tuple[str, CaptureMatcher]] = field(default_factory=list)
    width_attributes: list[str] = field(default_factory=list)  # config attributes that may hold an unset MLP width


REGISTRY = _Registry()


def _register(table: list, name: str, fn, first: bool):
    table[:] = [(n, f) for n, f in table if n != name]
    table.insert(0, (name, fn)) if first else table.append((name, fn))
    return fn


def register_norm_pattern(name: str, fn: NormMatcher | None = None, *, first: bool = False):
    """Register ``fn(region) -> NormSpec | None`` under ``name`` (replacing one of that name).

    Usable as a decorator. Patterns are tried in registration order (``first=True`` puts this one
    ahead of the built-ins); the first whose spec passes numerical verification wins.
    """
    if fn is None:
        return lambda f: _register(REGISTRY.norms, name, f, first)
    return _register(REGISTRY.norms, name, fn, first)


def register_linear_pattern(name: str, fn: LinearMatcher | None = None, *, first: bool = False):
    """Register ``fn(gm, anchor_node) -> LinearMatch | None``: a subgraph that is a linear layer."""
    if fn is None:
        return lambda f: _register(REGISTRY.linears, name, f, first)
    return _register(REGISTRY.linears, name, fn, first)


def register_capture_pattern(name: str, fn: CaptureMatcher | None = None, *, first: bool = False):
    """Register ``fn(module) -> Substitution | None``: export-friendly methods for a module whose own
    forward ``torch.export`` cannot capture (see :class:`Substitution`)."""
    if fn is None:
        return lambda f: _register(REGISTRY.captures, name, f, first)
    return _register(REGISTRY.captures, name, fn, first)


def register_width_attribute(name: str) -> None:
    """Name a config attribute that holds an MLP width even where a config leaves it unset (``None``:
    derived from the hidden size), so that a stock config can set it (:mod:`fxslice.runtime.stock`)."""
    if name not in REGISTRY.width_attributes:
        REGISTRY.width_attributes.append(name)


def unregister_pattern(name: str) -> None:
    """Remove a norm, linear or capture pattern by name (no error when absent)."""
    REGISTRY.norms[:] = [(n, f) for n, f in REGISTRY.norms if n != name]
    REGISTRY.linears[:] = [(n, f) for n, f in REGISTRY.linears if n != name]
    REGISTRY.captures[:] = [(n, f) for n, f in REGISTRY.captures if n != name]


def verification_tolerance(dtype: torch.dtype) -> float:
    """The relative deviation a pattern's proposal may show against what it replaces: summation order
    only (1e-4 in float32/64, 3e-2 in half types)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def verify_norm(region: Region, spec: NormSpec, seed: int = 0) -> float:
    """Largest relative deviation between the region and ``spec`` on random inputs (0 is perfect)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 5, region.width)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + 0.7).to(region.dtype)
    device = region.input.meta["val"].device
    x = x.to(device if device.type != "meta" else "cpu")
    with torch.no_grad():
        got = region.evaluate(x).double().cpu()
        want = spec.apply(x.cpu())
    return float((got - want).abs().max() / (1.0 + want.abs().max()))


def _check_finite(region: Region, spec: NormSpec) -> None:
    """A norm whose scale or shift holds inf or NaN (a damaged checkpoint) is refused naming its parameter:
    no pattern could verify it, and "matches no norm pattern" would send the user looking at the graph."""
    if all(t is None or bool(torch.isfinite(t).all()) for t in (spec.scale, spec.shift)):
        return
    named = {str(node.target): region.tensor(node) for node in region.params.values()}
    name, value = next(((n, v) for n, v in named.items() if not bool(torch.isfinite(v).all())),
                       ("scale", spec.scale if not bool(torch.isfinite(spec.scale).all()) else spec.shift))
    index = (~torch.isfinite(value)).nonzero()[0].tolist()
    raise FxSliceError(f"norm '{region.path}' ({region.cls}): its weight '{name}' is not finite "
                       f"({value[tuple(index)].item()} at index {index}); the checkpoint or model is damaged")


def match_norm(region: Region) -> tuple[Optional[str], Optional[NormSpec], list[str]]:
    """Try every registered norm pattern; returns (name, spec, notes on the ones that were rejected)."""
    tolerance = verification_tolerance(region.dtype)
    notes = []
    damaged: Optional[NormSpec] = None  # a proposal with non-finite weights: refused if no other pattern verifies
    for name, fn in REGISTRY.norms:
        try:
            spec = fn(region)
        except Exception as exc:  # a pattern that crashes on a foreign region simply does not match
            notes.append(f"{name}: raised {type(exc).__name__}: {exc}")
            continue
        if spec is None:
            continue
        if spec.scale.shape != (region.width,) or (spec.shift is not None and spec.shift.shape != (region.width,)):
            notes.append(f"{name}: scale/shift shape does not match width {region.width}")
            continue
        if not all(t is None or bool(torch.isfinite(t).all()) for t in (spec.scale, spec.shift)):
            damaged = damaged or spec
            continue
        error = verify_norm(region, spec)
        if error <= tolerance:
            return name, spec, notes
        notes.append(f"{name}: proposed spec deviates by {error:.2e} (tolerance {tolerance:.0e})")
    if damaged is not None:
        _check_finite(region, damaged)
    return None, None, notes


CAPTURE_SEEDS = 3


def capture_tolerance(module: torch.nn.Module) -> float:
    """What a substitute may differ by: :func:`verification_tolerance` of the module's dtype."""
    return verification_tolerance(next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.float32))


def relative_difference(got: object, want: object) -> float:
    """``max |got - want| / (1 + max |want|)`` over the tensors of two outputs (inf where their structure,
    shapes or integer values differ)."""
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return float("inf")
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves):
        if not isinstance(b, torch.Tensor):
            if a != b:
                return float("inf")
        elif not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        elif not b.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
        else:
            a, b = a.double(), b.double()
            worst = max(worst, float((a - b).abs().max() / (1.0 + b.abs().max())) if b.numel() else 0.0)
    return worst


def verify_substitution(module: torch.nn.Module, substitution: Substitution) -> float:
    """Largest relative difference between ``substitution``'s example computed with the module's own
    methods and with the substitutes, over a few random draws."""
    own = {name: getattr(module, name) for name in substitution.methods}
    new = {name: MethodType(fn, module) for name, fn in substitution.methods.items()}
    worst = 0.0
    for seed in range(CAPTURE_SEEDS):
        with torch.no_grad():
            want = substitution.example(lambda name, *args: own[name](*args), torch.Generator().manual_seed(seed))
            got = substitution.example(lambda name, *args: new[name](*args), torch.Generator().manual_seed(seed))
        worst = max(worst, relative_difference(got, want))
    return worst


@contextmanager
def capture_substitutions(model: torch.nn.Module):
    """Inside: every module for which a registered capture pattern's :class:`Substitution` verifies runs
    the substitutes (instance attributes, deleted afterwards). A module whose weights are not loaded
    (a streamed checkpoint's skeleton) cannot be verified and is refused naming it and the pattern."""
    installed: list[tuple[torch.nn.Module, list[str]]] = []
    try:
        for path, module in model.named_modules():
            for name, propose in REGISTRY.captures:
                try:
                    substitution = propose(module)
                except Exception:  # noqa: BLE001 - a pattern that crashes on a foreign module does not match
                    continue
                if substitution is None:
                    continue
                if any(t.device.type == "meta" for t in module.parameters()):
                    raise FxSliceError(
                        f"module '{path}' ({type(module).__name__}) is captured through capture pattern '{name}', "
                        "which is checked on the module's weights; they are not loaded (a streamed checkpoint): "
                        "load the model in memory to compress it")
                try:
                    error = verify_substitution(module, substitution)
                except Exception:  # noqa: BLE001 - a proposal that cannot run on this module does not match
                    continue
                if error <= capture_tolerance(module):
                    for method, fn in substitution.methods.items():
                        setattr(module, method, MethodType(fn, module))
                    installed.append((module, list(substitution.methods)))
                    break
        yield model
    finally:
        for module, methods in installed:
            for method in methods:
                delattr(module, method)
