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

A mixture of experts' MLP does this per expert: ``C_e`` sums the rows routed to expert ``e`` (the
rows of a ``repeat_interleave``-d token batch, so a token's mask covers its ``k`` rows), every expert
keeps the same number of units — its own — and its writer ``W[e]`` is refitted on ``C_e``. An expert
no calibration row reached keeps the units of largest weight norms, unrefitted.
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


def _unit_norms(reader: torch.Tensor, width: int, interleaved: bool) -> torch.Tensor:
    """``‖R[rows of unit j]‖`` for every unit of a reader weight ``[parts·I, in]``."""
    parts = reader.shape[0] // width
    grouped = reader.reshape(width, parts, -1) if interleaved else reader.reshape(parts, width, -1).transpose(0, 1)
    return grouped.pow(2).sum((1, 2)).sqrt()


def select_expert_units(grams: torch.Tensor, weight: torch.Tensor, readers: list[tuple[torch.Tensor, bool]],
                        keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`select_units` for every expert: ``(kept [E, keep], refitted writer [E, out, keep], mean
    relative error over the experts the calibration reached)``. An unreached expert (``C_e = 0``) keeps
    the units of largest ``‖W_e[:, j]‖ · Σ_r ‖R_e[j]‖`` (``readers``: ``([E, parts·I, in], interleaved)``),
    as they are."""
    kept, refitted, errors = [], [], []
    width = weight.shape[-1]
    for expert in range(weight.shape[0]):
        gram, writer = grams[expert], f64(weight[expert])
        if float(gram.diagonal().sum()) > 0:
            units, x, error = select_units(gram, writer, keep)
            errors.append(error)
        else:
            norms = writer.pow(2).sum(0).sqrt() * sum(_unit_norms(f64(r[expert]), width, layout)
                                                    for r, layout in readers)
            units = torch.sort(torch.topk(norms, keep).indices).values
            x = writer[:, units]
        kept.append(units)
        refitted.append(x)
    return torch.stack(kept), torch.stack(refitted), sum(errors) / len(errors) if errors else float("nan")


def keep_rows(linear: nn.Module, kept: torch.Tensor, parts: int = 1, interleaved: bool = False) -> None:
    """A reader keeps the output rows of the hidden units ``kept`` (in each of its ``parts``: blocks of
    ``I`` rows, or ``interleaved`` row by row); an expert reader's ``kept`` is ``[E, keep]``, one set of
    units per expert."""
    width = linear.out_features // parts

    def rows(units: torch.Tensor) -> torch.Tensor:
        if interleaved:
            return (units[:, None] * parts + torch.arange(parts, device=units.device)).reshape(-1).to(linear.weight.device)
        return torch.cat([units + i * width for i in range(parts)]).to(linear.weight.device)

    weight, bias = f64(linear.weight), None if linear.bias is None else f64(linear.bias)
    if kept.dim() == 1:
        set_linear(linear, weight[rows(kept)], None if bias is None else bias[rows(kept)])
        return
    index = torch.stack([rows(units) for units in kept])  # [E, parts·keep]
    set_linear(linear, torch.stack([w[i] for w, i in zip(weight, index)]),
               None if bias is None else torch.stack([b[i] for b, i in zip(bias, index)]))


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
        """Per hidden node of the group's MLPs, the function accumulating its ``C`` (one per expert of a
        mixture, which also watches the expert ids of its rows)."""
        taps = {}
        for mlp in self.mlps:
            if mlp.position in group:
                shape = (mlp.experts,) * bool(mlp.experts) + (mlp.width, mlp.width)
                self.grams[mlp.writer] = torch.zeros(shape, dtype=torch.float64, device=self.plan.weights.device)
                if not mlp.experts:
                    taps[mlp.hidden] = self._accumulator(mlp.writer)
                    continue
                routing: dict[str, torch.Tensor] = {}
                taps[mlp.hidden] = self._expert_accumulator(mlp.writer, routing)
                if mlp.routing is not None:
                    taps[mlp.routing] = lambda ids, _batch, seen=routing: seen.update(ids=ids)
        return taps

    def _accumulator(self, writer: str) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            rows = token_rows(value, batch).to(torch.float32)
            self.grams[writer] += (rows.T @ rows).to(torch.float64)
        return accumulate

    def _expert_accumulator(self, writer: str, routing: dict[str, torch.Tensor]) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            grams = self.grams[writer]
            if "ids" not in routing:  # every expert sees every token: value [E, tokens, I]
                real = None if batch.attention_mask is None else batch.attention_mask.reshape(-1)
                for expert, rows in enumerate(value.to(torch.float32)):
                    rows = rows if real is None or rows.shape[0] != real.numel() else rows[real]
                    grams[expert] += (rows.T @ rows).to(torch.float64)
                return
            rows, ids = value.reshape(-1, value.shape[-1]).to(torch.float32), routing["ids"].reshape(-1)
            if batch.attention_mask is not None:  # a token's k routed rows follow each other
                real = batch.attention_mask.reshape(-1)
                real = real.repeat_interleave(rows.shape[0] // real.numel()) if rows.shape[0] % real.numel() == 0 else None
                if real is not None:
                    rows, ids = rows[real], ids[real]
            for expert in torch.unique(ids).tolist():
                chosen = rows[ids == expert]
                grams[expert] += (chosen.T @ chosen).to(torch.float64)
        return accumulate

    def slice(self, group: list[int], record: Slice) -> None:
        """Select, refit and slice the group's MLPs (``C`` summed over ranks, rank 0's choice used)."""
        weights = self.plan.weights
        for mlp in self.mlps:
            if mlp.position not in group:
                continue
            gram = all_reduce_sum(self.grams.pop(mlp.writer))
            weight = weights.module(mlp.writer).weight
            if mlp.experts:
                readers = [(weights.module(reader).weight, reader in mlp.interleaved) for reader in mlp.readers]
                kept, x, error = select_expert_units(gram, weight, readers, self.keep[mlp.writer])
            else:
                kept, x, error = select_units(gram, f64(weight), self.keep[mlp.writer])
            broadcast_from_first(kept)
            broadcast_from_first(x)
            record.hidden_units[mlp.writer] = kept.tolist()
            record.refit_errors[mlp.writer] = error
            for reader, parts in mlp.readers.items():
                weights.edit(reader, keep_rows, kept, parts, reader in mlp.interleaved)
            weights.edit(mlp.writer, replace_weight, x)
