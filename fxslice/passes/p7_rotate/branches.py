"""Writer-side norms, inside pass 7's loop: slice a post-norm branch in its own PCA basis.

Runs right after a group's positions are rotated. A branch ``x + A · norm(y)`` with ``y = Σ W_i z_i``
(Gemma 2/3, OLMo 2, Exaone 4 post-norms; ``A = Q_dᵀ diag(γ)`` once its position is rotated) would otherwise keep
``y`` at the full width ``D`` and ``A`` at ``d × D``. The norm only needs ``‖y‖``, which a rotation
keeps: with ``Σ yᵀy = R Λ Rᵀ`` over the calibration tokens (eigenvalues descending) and
``c = R_kᵀ y`` (``R_k = R[:, :k]``),

- writers ``W_i ← R_kᵀ W_i`` (``b ← b R_k``), the reader ``A ← A R_k``;
- ``norm(y) = y / sqrt(‖y‖²/D + ε)`` with ``‖y‖² = ‖c‖² + ‖y − R_k c‖²``: the weightless norm keeps
  dividing by ``D`` and adds the removed energy's calibration mean ``e = Σ_{j≥k} λ_j / N`` as
  ``ε ← ε + e / D`` (a zero-parameter correction: ``‖y‖²`` right on average over the calibration
  tokens instead of always too small);

so the branch costs ``k · in + d · k`` instead of ``D · in + d · D`` and is exact when ``k = D``.
``k`` is the width of the stream position the branch writes. The new width and epsilon reach the
graph as a :class:`~fxslice.passes.slice_record.ResizeBranch` edit, recorded in the slice.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ...calibration import Batch, token_rows
from ...distributed import all_reduce_sum, broadcast_from_first
from ..p5_fuse import Plan
from ..slice_record import ResizeBranch, Slice
from .pca import pca_basis
from .positions import rotate_reader, rotate_writer
from .runner import Tap


class BranchRotator:
    """Collects ``Σ yᵀy`` of the branches writing a group's positions while pass 7 runs their
    segments, then rotates and slices each branch to the width of its position."""

    def __init__(self, plan: Plan, widths: list[int]):
        self.plan = plan
        self.branches = [b for b in plan.branches if widths[b.position] < plan.hidden_size]
        self.widths = widths
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def taps(self, group: list[int]) -> dict[Node, Tap]:
        taps = {}
        device = self.plan.weights.device
        for branch in self.branches:
            if branch.position in group:
                hidden = self.plan.hidden_size
                self.sums[branch.affine] = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
                self.counts[branch.affine] = torch.zeros(1, dtype=torch.float64, device=device)
                taps[branch.input] = self._accumulator(branch.affine)
        return taps

    def _accumulator(self, key: str) -> Tap:
        def accumulate(value: torch.Tensor, batch: Batch) -> None:
            rows = token_rows(value, batch).to(torch.float64)
            self.sums[key] += rows.T @ rows
            self.counts[key] += rows.shape[0]
        return accumulate

    def slice(self, group: list[int], record: Slice) -> None:
        for number, branch in enumerate(self.plan.branches):
            if any(b is branch for b in self.branches) and branch.position in group:
                self.rotate(number, all_reduce_sum(self.sums.pop(branch.affine)),
                            float(all_reduce_sum(self.counts.pop(branch.affine))), record)

    def rotate(self, number: int, summed: torch.Tensor, tokens: float, record: Slice) -> None:
        """Branch ``number`` of the plan rotated into the PCA basis of its input and cut to its width."""
        branch = self.plan.branches[number]
        hidden, width = self.plan.hidden_size, self.widths[branch.position]
        basis, spectrum = pca_basis(summed, centered=False)
        broadcast_from_first(basis)
        kept = basis[:, :width]
        weights = self.plan.weights
        for name in branch.writers:
            weights.edit(name, rotate_writer, kept)
        weights.edit(branch.affine, rotate_reader, kept)
        eps = self.plan.gm.get_submodule(branch.norm).eps
        removed = float(spectrum[width:].clamp_min(0).sum()) / max(tokens, 1.0)
        record.apply(self.plan, ResizeBranch(number, width, eps + removed / hidden))
