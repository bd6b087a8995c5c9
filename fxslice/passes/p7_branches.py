"""Pass 7 — writer-side norms: slice a post-norm branch in its own PCA basis.

Runs inside pass 5's block loop, like pass 6. A branch ``x + A · norm(y)`` with ``y = Σ W_i z_i``
(Gemma 2/3, OLMo 2, Exaone 4 post-norms; ``A = Q_dᵀ diag(γ)`` after pass 5) would otherwise keep
``y`` at the full width ``D`` and ``A`` at ``d × D``. The norm only needs ``‖y‖``, which a rotation
keeps: with ``Σ yᵀy = R Λ Rᵀ`` over the calibration tokens (eigenvalues descending) and
``c = R_kᵀ y`` (``R_k = R[:, :k]``),

- writers ``W_i ← R_kᵀ W_i`` (``b ← b R_k``), the reader ``A ← A R_k``;
- ``norm(y) = y / sqrt(‖y‖²/D + ε)`` with ``‖y‖² = ‖c‖² + ‖y − R_k c‖²``: the weightless norm keeps
  dividing by ``D`` and adds the removed energy's calibration mean ``e = Σ_{j≥k} λ_j / N`` as
  ``ε ← ε + e / D`` (a zero-parameter correction: ``‖y‖²`` right on average over the calibration
  tokens instead of always too small);

so the branch costs ``k · in + d · k`` instead of ``D · in + d · D`` and is exact when ``k = D``.
``k`` is the width of the stream position the branch writes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Node

from ..calibration import token_rows
from ..distributed import all_reduce_sum, broadcast_from_first
from .p4_fuse import NormBranch, Plan
from .p5_rotate import pca_basis, rotate_reader, rotate_writer


class BranchRotator:
    """Collects ``Σ yᵀy`` of the branches writing a group's positions while pass 5 runs their
    segments, then rotates and slices each branch to the width of its position."""

    def __init__(self, plan: Plan, widths: list[int]):
        self.plan = plan
        self.branches = [b for b in plan.branches if widths[b.position] < plan.hidden_size]
        self.widths = widths
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.batch = None
        self.eps: dict[str, float] = {}  # stream norm -> its epsilon with the removed energy added

    def taps(self, group: list[int]) -> dict[Node, Callable[[torch.Tensor], None]]:
        taps = {}
        device = self.plan.weights.device
        for branch in self.branches:
            if branch.position in group:
                hidden = self.plan.hidden_size
                self.sums[branch.affine] = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
                self.counts[branch.affine] = torch.zeros(1, dtype=torch.float64, device=device)
                taps[branch.input] = self._accumulator(branch.affine)
        return taps

    def _accumulator(self, key: str):
        def accumulate(value: torch.Tensor) -> None:
            rows = token_rows(value, self.batch).to(torch.float64)
            self.sums[key] += rows.T @ rows
            self.counts[key] += rows.shape[0]
        return accumulate

    def slice(self, group: list[int]) -> None:
        for branch in self.branches:
            if branch.position in group:
                self.rotate(branch, all_reduce_sum(self.sums.pop(branch.affine)),
                            float(all_reduce_sum(self.counts.pop(branch.affine))))

    def rotate(self, branch: NormBranch, summed: torch.Tensor, tokens: float) -> None:
        hidden, width = self.plan.hidden_size, self.widths[branch.position]
        basis, spectrum = pca_basis(summed, centered=False)
        broadcast_from_first(basis)
        kept = basis[:, :width]
        weights = self.plan.weights
        for name in branch.writers:
            weights.edit(name, rotate_writer, kept)
        weights.edit(branch.affine, rotate_reader, kept)
        resize_branch(branch, width, hidden)
        norm = self.plan.gm.get_submodule(branch.norm)
        removed = float(spectrum[width:].clamp_min(0).sum()) / max(tokens, 1.0)
        norm.eps = norm.eps + removed / hidden
        self.eps[branch.norm] = norm.eps


def resize_branch(branch: NormBranch, width: int, hidden: int) -> None:
    """The reshapes carrying ``y``'s width take the branch width (also for a second capture)."""
    for node in branch.reshapes:
        shape = list(node.args[1])
        if shape and shape[-1] == hidden:
            shape[-1] = width
            node.args = (node.args[0], shape) + tuple(node.args[2:])
