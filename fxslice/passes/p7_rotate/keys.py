"""Attention queries and keys, inside pass 7's loop: drop each key/value group's least useful units of head
dimensions.

The units come from pass 4 (:mod:`fxslice.passes.p4_keys`: ``Attention.query_key``), how many dimensions each group
keeps from pass 6 (``Widths.query_keys``). A score is ``s = Σ_u Σ_{j∈u} q_j k_j``; dropping unit ``u`` of group ``g``
removes its terms ``Q_{h,u} K_uᵀ`` (tokens × tokens) from the scores of each of the group's heads ``h``. Their
size is bounded by ``‖Q_{h,u} K_uᵀ‖_F ≤ ‖Q_{h,u}‖_F ‖K_u‖_F``, the norms over the calibration tokens and the
unit's dimensions (at the attention's inputs: after rotary, whose rotations keep each unit's norm), so each
group keeps the units with the largest ``Σ_{h∈g} ‖Q_{h,u}‖ ‖K_u‖`` (the column-norm score of a CR
decomposition of ``Q Kᵀ``, as MoDeGPT selects query/key columns) whose sizes add up to the width asked for.
No refit: the softmax between scores and output leaves no least-squares problem. The rows of ``W_q`` and
``W_k`` feeding dropped units are deleted; the graph follows through a
:class:`~fxslice.passes.slice_record.NarrowKeys` edit.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ...calibration import Batch
from ...distributed import all_reduce_sum, broadcast_from_first
from ...errors import FxSliceError
from ..p4_keys import choose_units
from ..p5_fuse import Plan
from ..slice_record import NarrowKeys, Slice
from .hidden import keep_rows
from .runner import Tap


def head_energies(value: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``Σ_t x_{h,j}(t)²`` per head and dimension of an attention input ``[B, n, T, d]``, masked tokens left out."""
    squares = value.to(torch.float32).square()
    if batch.attention_mask is not None:
        squares = squares * batch.attention_mask.to(squares.dtype)[:, None, :, None]
    return squares.sum(dim=(0, 2)).to(torch.float64)


class KeySlicer:
    """Collects the squared norms of every attention's query and key dimensions while pass 7 runs their
    segments, and narrows them once the positions they write are rotated."""

    def __init__(self, plan: Plan, keep: dict[str, int]):
        self.plan = plan
        self.attentions = [(i, a) for i, a in enumerate(plan.attentions) if a.writer in keep]
        self.keep = keep
        self.energies: dict[tuple[str, str], torch.Tensor] = {}

    def taps(self, group: list[int]) -> dict[Node, Tap]:
        taps = {}
        for _, attention in self.attentions:
            if attention.position in group:
                for side, path in (("query", attention.query_key.query), ("key", attention.query_key.key)):
                    self.energies[attention.writer, side] = torch.zeros(
                        path.heads, attention.query_key.width, dtype=torch.float64, device=self.plan.weights.device)
                    taps[path.gather] = self._accumulator((attention.writer, side))
        return taps

    def _accumulator(self, key: tuple[str, str]) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            energies = self.energies[key]
            energies += head_energies(value, batch).to(energies.device)
        return accumulate

    def unit_scores(self, writer: str, keys) -> torch.Tensor:
        """``[G, units]``: ``Σ_{h∈g} ‖Q_{h,u}‖ ‖K_u‖`` (module docstring)."""
        queries = all_reduce_sum(self.energies.pop((writer, "query")))
        cached = all_reduce_sum(self.energies.pop((writer, "key")))
        groups = keys.groups
        per_unit = [torch.stack([e[:, unit].sum(1) for unit in keys.units], dim=1) for e in (queries, cached)]
        query_norms = per_unit[0].sqrt().reshape(groups, -1, len(keys.units))  # [G, heads of g, units]
        key_norms = per_unit[1].sqrt().reshape(groups, -1, len(keys.units)).mean(1)  # a group's copies alike
        return (query_norms * key_norms[:, None, :]).sum(1)

    def slice(self, group: list[int], record: Slice) -> None:
        weights = self.plan.weights
        for number, attention in self.attentions:
            if attention.position not in group:
                continue
            keys = attention.query_key
            scores = self.unit_scores(attention.writer, keys)
            kept = []
            for g in range(keys.groups):
                chosen = choose_units(scores[g], keys.unit_sizes, self.keep[attention.writer])
                if chosen is None:
                    raise FxSliceError(f"the queries and keys of '{attention.writer}' cannot keep "
                                       f"{self.keep[attention.writer]} dimensions in whole units of sizes {keys.unit_sizes}")
                kept.append(sorted(j for k in chosen for j in keys.units[k]))
            kept = broadcast_from_first(torch.tensor(kept)).tolist()  # every rank drops rank 0's choice
            for path in (keys.query, keys.key):
                weights.edit(path.linear, keep_rows, torch.tensor(path.kept_rows(keys.units, kept)))
            record.apply(self.plan, NarrowKeys(number, keys.width, kept))
