"""The slice as one value: what pass 7 decided that changes the graph, and the one way to apply it.

Rotation changes two things: weights (rotated, sliced, refitted — they travel as tensors) and the
*shape* of the graph (reshapes carrying a position's width, a tied embedding's column slice, the
identity shortcuts removed, a sliced branch's reshapes and its norm's epsilon). Every shape change
is a :class:`GraphEdit` that pass 7 makes through :meth:`Slice.apply` — which applies it to the
plan *and* records it — so the recorded edits are by construction everything that happened.
:meth:`Slice.replay` applies them, in the same order, to another fused capture of the same model
(the KV-cache program of :mod:`fxslice.runtime.generate`); that capture then only needs the sliced
weights. Edits name positions and branches by their index in the plan, never by module name, so they
hold in a capture whose module names carry a prefix.

A new shape-changing rewrite is a new :class:`GraphEdit` subclass (registered in ``EDITS``): the
replay needs no other change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch.fx import Node

from ..errors import FxSliceError
from ..graph.edit import remove_module_call
from ..graph.nodes import copy_meta
from .p5_fuse import Plan


class GraphEdit:
    """One shape change of a fused graph (a frozen dataclass with ``apply``)."""

    kind: ClassVar[str]

    def apply(self, plan: Plan) -> None:
        raise NotImplementedError

    def to_record(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


def resize_reshapes(nodes, width: int, full: int) -> None:
    """Reshape nodes whose target shape ends in ``full`` end in ``width`` instead (in ``N·full``, merged copies
    of the stream: ``N·width``)."""
    for node in nodes:
        shape = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else []
        if shape and isinstance(shape[-1], int) and shape[-1] > 0 and shape[-1] % full == 0:
            shape[-1] = shape[-1] // full * width
            node.args = (node.args[0], shape) + tuple(node.args[2:])


@dataclass(frozen=True)
class Resize(GraphEdit):
    """Stream position ``position`` is ``width`` wide: its width-carrying reshapes and a tied
    embedding's column slice follow, and a tied embedding reads its head's weight again."""

    kind: ClassVar[str] = "resize"
    position: int
    width: int

    def apply(self, plan: Plan) -> None:
        resize_reshapes(plan.positions[self.position].reshapes, self.width, plan.hidden_size)
        tied = plan.tied
        if tied is not None and tied.position == self.position:
            plan.weights.tie(tied.embedding, tied.head)
            if tied.width_slice is not None:
                tied.width_slice.args = (tied.width_slice.args[0], -1, 0, self.width)


@dataclass(frozen=True)
class RemoveShortcut(GraphEdit):
    """The shortcut into ``position`` is the identity (``Q_dᵀ Q_d``, both ends in one basis and one
    width): deleted, the residual add reads the stream directly again."""

    kind: ClassVar[str] = "remove_shortcut"
    position: int

    def apply(self, plan: Plan) -> None:
        position = plan.positions[self.position]
        name, position.shortcut = position.shortcut, None
        if name is None:
            raise FxSliceError(f"stream position {self.position} has no shortcut to remove")
        remove_module_call(plan.gm, name)
        plan.weights.drop(name)
        for p in plan.positions:
            if name in p.readers:
                p.readers.remove(name)
        plan.inserted[:] = [m for m in plan.inserted if m.name != name]


@dataclass(frozen=True)
class ResizeBranch(GraphEdit):
    """Post-norm branch ``branch`` (its index in ``plan.branches``) is ``width`` wide and its
    weightless norm adds the removed energy: epsilon ``eps`` (:mod:`.p7_rotate.branches`)."""

    kind: ClassVar[str] = "resize_branch"
    branch: int
    width: int
    eps: float

    def apply(self, plan: Plan) -> None:
        branch = plan.branches[self.branch]
        resize_reshapes(branch.reshapes, self.width, plan.hidden_size)
        plan.gm.get_submodule(branch.norm).eps = self.eps


@dataclass(frozen=True)
class ResizeValues(GraphEdit):
    """Attention ``attention`` (its index in ``plan.attentions``) keeps ``width`` value dimensions per
    key/value group: the reshapes and expands on its value path take ``width`` (``G·width``,
    ``H·width`` where they hold whole groups or heads) and a KV cache's value buffers are rebuilt
    ``width`` wide (:mod:`.p7_rotate.values`)."""

    kind: ClassVar[str] = "resize_values"
    attention: int
    width: int

    def apply(self, plan: Plan) -> None:
        attention = plan.attentions[self.attention]
        full, new = attention.width, self.width
        sizes = {full: new, attention.groups * full: attention.groups * new, attention.heads * full: attention.heads * new}
        for node in attention.shaped:
            shape = list(node.args[1])
            if shape and shape[-1] in sizes:
                shape[-1] = sizes[shape[-1]]
                node.args = (node.args[0], shape) + tuple(node.args[2:])
        narrow_buffers(plan.gm, attention.buffers, new)


def narrow_buffers(gm, targets: list[str], width: int) -> None:
    """KV-cache buffers (get_attr targets) rebuilt ``width`` wide in their last dimension (zeros)."""
    for target in targets:
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        old = getattr(module, name)
        setattr(module, name, old.new_zeros(*old.shape[:-1], width))


@dataclass(frozen=True)
class NarrowKeys(GraphEdit):
    """Attention ``attention`` (its index in ``plan.attentions``) keeps the head dimensions ``kept[g]`` of its
    queries and keys in key/value group ``g`` (whole units, :mod:`.p4_keys`): behind ``W_q`` and ``W_k`` (whose
    dropped rows pass 7 deleted) their kept features are scattered back to the full width (zeros in the
    dropped ones) so that the path's own ops run as before; each head's kept dimensions are then gathered
    before the attention (a KV cache's keys before they are cached, its key buffers ``len(kept[g])`` wide),
    and the attention's scale stays ``1/√d``."""

    kind: ClassVar[str] = "narrow_keys"
    attention: int
    width: int  # d, the dense head dimension
    kept: list[list[int]]

    def apply(self, plan: Plan) -> None:
        attention = plan.attentions[self.attention]
        keys = attention.query_key
        if keys is None:
            raise FxSliceError(f"the queries and keys of '{attention.writer}' cannot be narrowed in this capture: "
                               f"{attention.query_key_refused}")
        self._check(attention.writer, keys)
        gm, width = plan.gm, keys.width
        for path in (keys.query, keys.key):
            device = _device_of(gm, path.linear)
            scatter_features(gm, path.source, path.kept_rows(keys.units, self.kept), path.features, device)
            repeats = path.heads // keys.groups
            gather_dimensions(gm, path.gather, [self.kept[h // repeats] for h in range(path.heads)], device)
            resize_reshapes(path.tail, len(self.kept[0]), width)
            narrow_buffers(gm, path.buffers, len(self.kept[0]))
        if keys.attention.kwargs.get("scale") is None:  # the default 1/√(last size) would follow the narrow width
            keys.attention.kwargs = {**keys.attention.kwargs, "scale": 1.0 / math.sqrt(width)}

    def _check(self, writer: str, keys) -> None:
        """The capture's attention has the head dimension, groups and units this slice was made with."""
        unit_of = {j: unit for unit in keys.units for j in unit}

        def whole_units(kept: list[int]) -> bool:
            return all(j in unit_of and set(unit_of[j]) <= set(kept) for j in kept)

        if keys.width != self.width or len(self.kept) != keys.groups or len({len(k) for k in self.kept}) != 1 \
                or not all(whole_units(kept) for kept in self.kept):
            raise FxSliceError(f"the slice narrows the queries and keys of '{writer}' to dimensions {self.kept} of "
                               f"{self.width}; this capture's attention has {keys.groups} key/value groups of "
                               f"{keys.width} dimensions in units {keys.units}")


def _device_of(gm, linear: str) -> torch.device:
    """Where the Linear's weight lives (the CPU for a weight not loaded yet)."""
    device = gm.get_submodule(linear).weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _index_buffer(gm, near: Node, name: str, index: torch.Tensor) -> Node:
    """A get_attr node before ``near`` reading ``index`` (a buffer of the root, recreated by every replay; stored
    with the weights in a saved folder, where a compiled package reads every constant from)."""
    gm.register_buffer(name, index)
    with gm.graph.inserting_before(near):
        return gm.graph.get_attr(name)


def scatter_features(gm, source: Node, kept: list[int], features: int, device: torch.device) -> None:
    """``source`` (a Linear's call, now ``len(kept)`` features wide) is read at its dense width again: its
    features back in their places ``kept``, zeros elsewhere — ``index_select`` of the output padded with
    one zero column."""
    places = torch.full((features,), len(kept), dtype=torch.long)
    places[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    users = list(source.users)
    anchor = source.next
    index = _index_buffer(gm, anchor, f"{str(source.target).replace('.', '_')}_features", places.to(device))
    with gm.graph.inserting_before(anchor):
        padded = gm.graph.call_function(torch.ops.aten.constant_pad_nd.default, (source, [0, 1]))
        full = gm.graph.call_function(torch.ops.aten.index_select.default, (padded, -1, index))
    copy_meta(padded, source, ("nn_module_stack",))  # no example value: their widths are no longer the captured ones
    copy_meta(full, source, ("nn_module_stack",))
    for user in users:
        user.replace_input_with(source, full)


def gather_dimensions(gm, value: Node, kept: list[list[int]], device: torch.device) -> None:
    """``value`` (``[B, n, T, d]``) read by its users with only head ``h``'s dimensions ``kept[h]``: ``gather``
    on the last dimension with the ``[1, n, 1, m]`` index expanded to ``[B, n, T, m]`` (sizes read off
    ``value``, so that batch and length stay dynamic; ``take_along_dim`` would fix them)."""
    index = torch.tensor(kept, dtype=torch.long, device=device)[None, :, None, :]
    users = list(value.users)
    anchor = value.next
    node_index = _index_buffer(gm, anchor, f"{value.name}_kept_dims", index)
    with gm.graph.inserting_before(anchor):
        sizes = [gm.graph.call_function(torch.ops.aten.sym_size.int, (value, dim)) for dim in range(3)]
        expanded = gm.graph.call_function(torch.ops.aten.expand.default, (node_index, [*sizes, len(kept[0])]))
        gathered = gm.graph.call_function(torch.ops.aten.gather.default, (value, -1, expanded))
    example = value.meta.get("val")
    for dim, size in enumerate(sizes):
        size.meta["val"] = example.shape[dim] if example is not None else None
    copy_meta(gathered, value, ("nn_module_stack",))
    for user in users:
        user.replace_input_with(value, gathered)


EDITS = {cls.kind: cls for cls in (Resize, RemoveShortcut, ResizeBranch, ResizeValues, NarrowKeys)}


@dataclass
class Slice:
    """What one compression decided: the graph edits in the order they were made, and the MLP
    hidden units each sliced MLP kept (with the calibration error of its refit)."""

    positions: int  # stream positions of the plan it was made on
    rotate: bool = True  # False: the stream kept its coordinates (fuse it with ``rotate=False`` to replay)
    edits: list[GraphEdit] = field(default_factory=list)
    hidden_units: dict[str, list[int]] = field(default_factory=dict)  # MLP writer -> kept unit indices
    refit_errors: dict[str, float] = field(default_factory=dict)  # MLP writer -> relative refit error
    value_errors: dict[str, float] = field(default_factory=dict)  # attention W_o -> relative error of its values

    def apply(self, plan: Plan, edit: GraphEdit) -> None:
        """Make ``edit`` on ``plan`` and record it."""
        edit.apply(plan)
        self.edits.append(edit)

    def replay(self, plan: Plan) -> None:
        """Make every recorded edit, in order, on another fused capture of the sliced model."""
        if len(plan.positions) != self.positions:
            raise FxSliceError(f"the slice was made on a graph with {self.positions} stream positions, this "
                               f"capture has {len(plan.positions)}")
        for edit in self.edits:  # queries and keys measured on the capture as it is, before any edit
            if isinstance(edit, NarrowKeys):
                plan.attentions[edit.attention].measure_query_key()
        for edit in self.edits:
            edit.apply(plan)
        plan.gm.recompile()

    def widths(self, plan: Plan) -> list[int]:
        """Width of every stream position after the slice (positions never resized keep ``D``)."""
        widths = [plan.hidden_size] * len(plan.positions)
        for edit in self.edits:
            if isinstance(edit, Resize):
                widths[edit.position] = edit.width
        return widths

    def value_widths(self, plan: Plan) -> dict[str, tuple[int, int]]:
        """Attention ``W_o`` -> (value dimensions kept per group, dense value dimensions), for those narrowed."""
        return {plan.attentions[e.attention].writer: (e.width, plan.attentions[e.attention].width)
                for e in self.edits if isinstance(e, ResizeValues)}

    def key_widths(self, plan: Plan) -> dict[str, tuple[int, int]]:
        """Attention ``W_o`` -> (query/key dimensions kept per group, dense head dimension), for those narrowed."""
        return {plan.attentions[e.attention].writer: (len(e.kept[0]), e.width)
                for e in self.edits if isinstance(e, NarrowKeys)}

    def norm_eps(self, plan: Plan) -> dict[str, float]:
        """Weightless norm -> the epsilon a sliced branch gave it."""
        return {plan.branches[e.branch].norm: e.eps for e in self.edits if isinstance(e, ResizeBranch)}

    def to_record(self) -> dict:
        return {"positions": self.positions, "rotate": self.rotate, "edits": [edit.to_record() for edit in self.edits], "hidden_units": self.hidden_units,
                "refit_errors": self.refit_errors, "value_errors": self.value_errors}

    @classmethod
    def from_record(cls, record: dict) -> "Slice":
        """The slice a record (``to_record``, e.g. ``fxslice.json``'s ``slice``) describes."""
        try:
            edits = [EDITS[item["kind"]](**{k: v for k, v in item.items() if k != "kind"})
                     for item in record.get("edits", [])]
            positions = int(record["positions"])
            rotate = record.get("rotate", True)
            if not isinstance(rotate, bool):
                raise TypeError(f"'rotate' is {rotate!r}, not true or false")
        except (KeyError, TypeError, ValueError) as exc:
            raise FxSliceError(f"a slice record is malformed: {exc!r}") from exc
        return cls(positions, rotate, edits, dict(record.get("hidden_units", {})), dict(record.get("refit_errors", {})),
                   dict(record.get("value_errors", {})))
