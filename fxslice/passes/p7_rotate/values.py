"""Attention values, inside pass 7's loop: narrow each key/value group's value dimension, refit the output.

The attentions come from pass 4 (:mod:`fxslice.passes.p4_attention`: ``Plan.attentions``), how many
value dimensions each group keeps from pass 6 (``Widths.values``). Head ``h`` of group ``g`` hands
``o_h = A_h v_g`` (``d_v`` wide) to ``W_o``, whose columns for the head are ``W_h`` (``D × d_v``).
Replacing ``v_g`` by ``v_g T`` (``T``: ``d_v × m``) and ``W_h`` by ``W_h Bᵀ`` (``B``: ``m × d_v``) changes
the head's contribution to ``o_h T B W_hᵀ``, because ``A_h`` only mixes tokens. With ``C_g = Σ_h Σ o_hᵀ o_h``
(the group's heads, over the calibration tokens, float64) and ``M_g = Σ_h W_hᵀ W_h``, the error
``Σ ‖o (I − T B) W_hᵀ‖²`` is least (pooling the group's heads) for

    ``T = C^{-1/2} V_m``,  ``B = V_mᵀ C^{1/2}``,  ``V_m``: the top ``m`` eigenvectors of ``C^{1/2} M C^{1/2}``

(the reduced-rank regression that MoDeGPT applies to values and outputs). ``T B = I`` when ``m = d_v``:
exact. ``W_v``'s rows of the group become ``Tᵀ W_v`` (its bias ``Tᵀ b``); the graph's value reshapes and
cache buffers follow through a :class:`~fxslice.passes.slice_record.ResizeValues` edit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Node

from ...calibration import Batch, token_rows
from ...distributed import all_reduce_sum, broadcast_from_first
from ...graph.weights import f64, set_linear
from ..p5_fuse import Plan
from ..slice_record import ResizeValues, Slice
from .runner import Tap

RIDGE = 1e-6
"""Added to ``C``'s eigenvalues, relative to their mean, before ``C^{-1/2}``."""


def reduced_rank(gram: torch.Tensor, output: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(T, B, relative error)`` for a group with value Gram ``gram`` (``d_v × d_v``) and output metric
    ``output`` (``M = Σ W_hᵀ W_h``), keeping ``keep`` dimensions."""
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(0) + RIDGE * float(values.clamp_min(0).mean().clamp_min(1e-30))
    root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
    spectrum, directions = torch.linalg.eigh(root @ output @ root)
    order = torch.argsort(spectrum, descending=True)
    kept = directions[:, order[:keep]]
    total = float(spectrum.clamp_min(0).sum()) or 1.0
    return inverse_root @ kept, kept.T @ root, float(spectrum[order[keep:]].clamp_min(0).sum()) / total


def narrow_rows(linear: nn.Linear, transforms: list[torch.Tensor]) -> None:
    """``W_v``: group ``g``'s ``d_v`` rows become ``T_gᵀ`` times them (and its bias)."""
    weight, bias = f64(linear.weight), f64(linear.bias)
    width = weight.shape[0] // len(transforms)
    rows = [t.T.to(weight.device) @ weight[g * width:(g + 1) * width] for g, t in enumerate(transforms)]
    biases = None if bias is None else [t.T.to(bias.device) @ bias[g * width:(g + 1) * width]
                                        for g, t in enumerate(transforms)]
    set_linear(linear, torch.cat(rows), None if biases is None else torch.cat(biases))


def narrow_columns(linear: nn.Linear, backs: list[torch.Tensor], heads: int) -> None:
    """``W_o``: head ``h``'s ``d_v`` columns become ``W_h B_gᵀ`` (``g`` its group)."""
    weight = f64(linear.weight)
    width, repeats = weight.shape[1] // heads, heads // len(backs)
    columns = [weight[:, h * width:(h + 1) * width] @ backs[h // repeats].T.to(weight.device) for h in range(heads)]
    set_linear(linear, torch.cat(columns, dim=1), f64(linear.bias))


class ValueSlicer:
    """Collects every head's ``Σ o_hᵀ o_h`` of the attentions writing a group's positions while pass 7
    runs their segments, and narrows them once those positions are rotated."""

    def __init__(self, plan: Plan, keep: dict[str, int]):
        self.plan = plan
        self.attentions = [(i, a) for i, a in enumerate(plan.attentions) if keep.get(a.writer, a.width) < a.width]
        self.keep = keep
        self.grams: dict[str, torch.Tensor] = {}

    def taps(self, group: list[int]) -> dict[Node, Tap]:
        taps = {}
        for _, attention in self.attentions:
            if attention.position in group:
                self.grams[attention.writer] = torch.zeros(attention.heads, attention.width, attention.width,
                                                           dtype=torch.float64, device=self.plan.weights.device)
                taps[attention.output] = self._accumulator(attention.writer, attention.heads)
        return taps

    def _accumulator(self, writer: str, heads: int) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            rows = token_rows(value, batch).to(torch.float32)
            per_head = rows.reshape(rows.shape[0], heads, -1).transpose(0, 1)  # [H, tokens, d_v]
            self.grams[writer] += (per_head.transpose(1, 2) @ per_head).to(torch.float64)
        return accumulate

    def slice(self, group: list[int], record: Slice) -> None:
        weights = self.plan.weights
        for number, attention in self.attentions:
            if attention.position not in group:
                continue
            grams = all_reduce_sum(self.grams.pop(attention.writer))
            output = f64(weights.module(attention.writer).weight).to(grams.device)
            heads, width, groups = attention.heads, attention.width, attention.groups
            repeats = heads // groups
            metric = torch.stack([output[:, h * width:(h + 1) * width].T @ output[:, h * width:(h + 1) * width]
                                  for h in range(heads)])
            transforms, backs, errors = [], [], []
            for g in range(groups):
                heads_of_group = slice(g * repeats, (g + 1) * repeats)
                t, b, error = reduced_rank(grams[heads_of_group].sum(0), metric[heads_of_group].sum(0),
                                           self.keep[attention.writer])
                transforms.append(broadcast_from_first(t))
                backs.append(broadcast_from_first(b))
                errors.append(error)
            record.value_errors[attention.writer] = sum(errors) / len(errors)
            weights.edit(attention.reader, narrow_rows, transforms)
            weights.edit(attention.writer, narrow_columns, backs, heads)
            record.apply(self.plan, ResizeValues(number, self.keep[attention.writer]))
