"""MLP hidden units, inside pass 7's loop: select the units to keep and refit the down projection.

The MLPs come from pass 4 (:mod:`fxslice.passes.p4_mlps`: ``Plan.mlps``), how many units each keeps
from pass 6. With ``C = Σ hᵀh`` over the calibration tokens (float64) and the writer's current
weight ``W`` (``d × I``), keeping the units ``S`` and refitting the writer by ridge least squares on
the calibration data,

    ``X = argmin ‖H Wᵀ − H_S Xᵀ‖² + λ‖X‖² = W C[:, S] (C[S, S] + λ I)⁻¹``,

reproduces the block's output as well as a linear map of the kept units can (MoDeGPT's Nyström
refit, ICLR 2025). Its calibration error ``tr(W C Wᵀ) − tr(X C[S, :] Wᵀ) − …`` is computable from
``C``, so ``S`` is chosen as the best of three column scores: output energy ``C_jj ‖W_j‖²``, ridge
leverage of ``C`` and ridge leverage of ``C`` weighted by ``‖W_j‖`` (``diag(G (G + λ I)⁻¹)``). When
every unit is kept nothing is touched (exact). Weights only change: the graph keeps its shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.fx import Node

from ...calibration import Batch, token_rows
from ...distributed import all_reduce_sum, broadcast_from_first
from ...graph.weights import f64, set_linear
from ..p5_fuse import Plan
from ..slice_record import Slice
from .runner import Tap

RIDGE = 1e-3
"""Ridge of the refit and of the leverage scores, relative to the mean of ``diag(C)``."""


def refit(gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """``(X, error)``: the ridge least-squares writer over the units ``kept`` and its calibration error
    ``‖H Wᵀ − H_S Xᵀ‖²`` (both from ``C``)."""
    c_sk = gram[:, kept]
    c_ss = gram[kept][:, kept]
    system = c_ss + ridge * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    x = torch.linalg.solve(system, (weight @ c_sk).T).T  # W C[:, S] (C_SS + λI)^-1 (system symmetric)
    wc = weight @ gram
    error = (wc * weight).sum() - 2 * (x * (weight @ c_sk)).sum() + ((x @ c_ss) * x).sum()
    return x, float(error)


def unit_scores(gram: torch.Tensor, weight: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """Candidate importance of every hidden unit (higher: keep)."""
    norms = weight.pow(2).sum(0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weighted = gram * norms.sqrt()[:, None] * norms.sqrt()[None, :]

    def leverage(matrix: torch.Tensor) -> torch.Tensor:
        scale = ridge * matrix.diagonal().mean().clamp_min(1e-30)
        return torch.linalg.solve(matrix + scale * eye, matrix).diagonal()

    return {"energy": gram.diagonal() * norms, "leverage": leverage(gram), "weighted leverage": leverage(weighted)}


def select_units(gram: torch.Tensor, weight: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(kept units, refitted writer weight, relative calibration error)`` for ``keep`` of the
    ``I`` units: the scoring whose refit reconstructs ``H Wᵀ`` best."""
    gram, weight = gram.to(torch.float64), weight.to(torch.float64)
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-30))
    total = float((weight @ gram * weight).sum()) or 1.0
    best: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None
    for score in unit_scores(gram, weight, ridge).values():
        kept = torch.sort(torch.topk(score, keep).indices).values
        x, error = refit(gram, weight, kept, ridge)
        if best is None or error < best[2]:
            best = (kept, x, error)
    kept, x, error = best
    return kept, x, error / total


def keep_rows(linear: nn.Linear, kept: torch.Tensor, parts: int = 1) -> None:
    """A reader keeps the output rows of the hidden units ``kept`` (in each of its ``parts``)."""
    width = linear.out_features // parts
    index = torch.cat([kept + i * width for i in range(parts)]).to(linear.weight.device)
    set_linear(linear, f64(linear.weight)[index], None if linear.bias is None else f64(linear.bias)[index])


def replace_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """The writer reads the kept units only: its refitted weight ``X``."""
    set_linear(linear, weight.to(linear.weight.device), f64(linear.bias))


class HiddenSlicer:
    """Collects ``C`` of the MLPs writing a group's positions while pass 7 runs their segments, and
    slices them once those positions are rotated (their writers then hold ``Q_dᵀ W``)."""

    def __init__(self, plan: Plan, keep: dict[str, int]):
        self.plan = plan
        self.mlps = [m for m in plan.mlps if keep.get(m.writer, m.width) < m.width]
        self.keep = keep
        self.grams: dict[str, torch.Tensor] = {}

    def taps(self, group: list[int]) -> dict[Node, Tap]:
        """Per hidden node of the group's MLPs, the function accumulating its ``C``."""
        taps = {}
        for mlp in self.mlps:
            if mlp.position in group:
                self.grams[mlp.writer] = torch.zeros(mlp.width, mlp.width, dtype=torch.float64,
                                                     device=self.plan.weights.device)
                taps[mlp.hidden] = self._accumulator(mlp.writer)
        return taps

    def _accumulator(self, writer: str) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            rows = token_rows(value, batch).to(torch.float32)
            self.grams[writer] += (rows.T @ rows).to(torch.float64)
        return accumulate

    def slice(self, group: list[int], record: Slice) -> None:
        """Select, refit and slice the group's MLPs (``C`` summed over ranks, rank 0's choice used)."""
        weights = self.plan.weights
        for mlp in self.mlps:
            if mlp.position not in group:
                continue
            gram = all_reduce_sum(self.grams.pop(mlp.writer))
            kept, x, error = select_units(gram, f64(weights.module(mlp.writer).weight), self.keep[mlp.writer])
            broadcast_from_first(kept)
            broadcast_from_first(x)
            record.hidden_units[mlp.writer] = kept.tolist()
            record.refit_errors[mlp.writer] = error
            for reader, parts in mlp.readers.items():
                weights.edit(reader, keep_rows, kept, parts)
            weights.edit(mlp.writer, replace_weight, x)
