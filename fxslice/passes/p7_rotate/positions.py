"""The rewrite of one stream position: every weight touching it rotated into its basis and sliced.

With ``Q_d = Q[:, :d]``:

- writers (linears, embeddings, writer-norm affines, the shortcut into the position):
  ``W ← Q_dᵀ W``, ``b ← b Q_d``, ``E ← E Q_d``;
- readers (linears behind the norms, the shortcut out of the position, the tied head's affine):
  ``W ← W Q_d``;
- the shortcut between positions a and b therefore ends as ``Q_a[:, :d_a]ᵀ Q_b[:, :d_b]``.

Weights change through the plan's weight store; the position's new width reaches the graph as a
:class:`~fxslice.passes.slice_record.Resize` edit, recorded in the slice.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...errors import FxSliceError
from ...graph.weights import f64, set_embedding, set_linear
from ..p5_fuse import Plan
from ..slice_record import Resize, Slice


def rotate_writer(module: nn.Module, basis: torch.Tensor) -> None:
    """``W ← Qᵀ W``, ``b ← b Q`` (``E ← E Q`` for an embedding)."""
    q = basis.to(module.weight.device)
    if isinstance(module, nn.Embedding):
        set_embedding(module, f64(module.weight) @ q)
    else:
        bias = f64(module.bias)
        set_linear(module, q.T @ f64(module.weight), None if bias is None else bias @ q)


def rotate_reader(module: nn.Module, basis: torch.Tensor) -> None:
    """``W ← W Q``; a Linear reading ``N`` merged copies of the stream (``N·D`` inputs) rotates each block of
    ``D`` alike, ``W ← W diag(Q, …, Q)``."""
    weight, q = f64(module.weight), basis.to(module.weight.device)
    blocks = weight.reshape(*weight.shape[:-1], -1, q.shape[0])  # [..., N, D]: one block per copy (N = 1 mostly)
    set_linear(module, (blocks @ q).reshape(*weight.shape[:-1], -1), f64(module.bias))


class Rotator:
    """Rotates and slices the weights of a fused graph position by position."""

    def __init__(self, plan: Plan, record: Optional[Slice] = None):
        self.plan = plan
        self.record = record if record is not None else Slice(len(plan.positions))
        self.weights = plan.weights

    def rotate(self, index: int, basis: torch.Tensor, width: int) -> None:
        """Rotate every weight touching position ``index`` into ``basis`` and keep ``width`` coordinates."""
        position, tied, q = self.plan.positions[index], self.plan.tied, basis[:, :width]
        tied_here = tied is not None and tied.position == index
        if tied_here and position.centered and width >= self.plan.hidden_size:
            raise FxSliceError(f"position {index} of a centred stream with a tied head keeps at most "
                               f"{self.plan.hidden_size - 1} coordinates (the embedding it shares with the head is "
                               "not mean-free), got width {width}")
        for name in position.writers:
            if not (tied_here and name == tied.embedding):
                self.weights.edit(name, rotate_writer, q)
        if position.shortcut is not None:
            self.weights.edit(position.shortcut, rotate_writer, q)
        for name in position.readers:
            self.weights.edit(name, rotate_reader, q)
        if tied_here:
            self.rotate_tied_head(basis)
        self.record.apply(self.plan, Resize(index, width))

    def rotate_tied_head(self, basis: torch.Tensor) -> None:
        """A head tied to the embedding reads the whole rotated basis: ``H ← H Q`` (``= E Q``, the
        rotated embedding table), and the affine in front of it maps into that basis: ``A ← Qᵀ A``,
        ``β ← β Q``."""
        self.weights.edit(self.plan.tied.head, rotate_reader, basis)
        self.weights.edit(self.plan.tied.affine, rotate_writer, basis)
