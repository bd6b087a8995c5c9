"""Pass 5 — rotate and slice, one stream position at a time.

For a position with calibration signal ``X`` (tokens × D, original basis), ``C = Σ XᵀX`` is
accumulated in float64 and ``C = Q Λ Qᵀ`` with eigenvalues sorted in descending order (the PCA of
SliceGPT, Sec. 3.3). With ``Q_d = Q[:, :d]``:

- writers (linears, embeddings, writer-norm affines, the shortcut into the position):
  ``W ← Q_dᵀ W``, ``b ← b Q_d``, ``E ← E Q_d``;
- readers (linears behind the norms, the shortcut out of the position, the tied head's affine):
  ``W ← W Q_d``;
- the shortcut between positions a and b therefore ends as ``Q_a[:, :d_a]ᵀ Q_b[:, :d_b]``.

In a centred (LayerNorm) stream every value is orthogonal to ``u = 1/√D``; the basis puts ``u``
last so that slicing drops that always-zero coordinate first.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import Node

from .fuse import Plan, set_embedding, set_linear


def slice_width(hidden: int, sparsity: float, round_to: int) -> int:
    """``d = floor(D (1 - sparsity))`` rounded down to a multiple of ``round_to``."""
    width = math.floor(hidden * (1.0 - sparsity) + 1e-9)
    if round_to > 1:
        width -= width % round_to
    return width


def pca_basis(covariance: torch.Tensor, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of ``C`` by decreasing eigenvalue (columns), signs fixed (largest entry positive)."""
    c = covariance.to(torch.float64)
    c = (c + c.T) / 2
    size = c.shape[0]
    if centered:
        u = torch.full((size,), size ** -0.5, dtype=torch.float64, device=c.device)
        m = torch.eye(size, dtype=torch.float64, device=c.device) - torch.outer(u, u)
        c = m @ c @ m - (torch.trace(c) + 1.0) * torch.outer(u, u)
    eigenvalues, eigenvectors = torch.linalg.eigh(c)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, basis = eigenvalues[order], eigenvectors[:, order]
    if centered:
        basis[:, -1] = u
        eigenvalues[-1] = 0.0
    pivot = basis.abs().argmax(0)
    signs = torch.sign(basis[pivot, torch.arange(size, device=c.device)])
    signs[signs == 0] = 1.0
    return basis * signs, eigenvalues


def remove_module_call(gm, name: str) -> None:
    """Replace the call of module ``name`` (one input, same shape out) by its input; drop the module.
    The caller recompiles ``gm`` once its edits are done."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == name:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_submodule(name)


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


class Rotator:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.gm = plan.structure.gm

    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(name)

    def rotate_writer(self, name: str, basis: torch.Tensor) -> None:
        module = self.module(name)
        q = basis.to(module.weight.device)
        if isinstance(module, nn.Embedding):
            set_embedding(module, _f64(module.weight) @ q)
        else:
            bias = _f64(module.bias)
            set_linear(module, q.T @ _f64(module.weight), None if bias is None else bias @ q)

    def rotate_reader(self, name: str, basis: torch.Tensor) -> None:
        module = self.module(name)
        q = basis.to(module.weight.device)
        set_linear(module, _f64(module.weight) @ q, _f64(module.bias))

    def apply(self, index: int, basis: torch.Tensor, width: int) -> None:
        """Rotate every weight touching position ``index`` into ``basis`` and keep ``width`` coordinates."""
        plan, q = self.plan, basis[:, :width]
        tied = plan.tied
        for name in plan.writers.get(index, []):
            if not (tied is not None and tied.position == index and name == tied.embedding):
                self.rotate_writer(name, q)
        if index in plan.shortcuts:
            self.rotate_writer(plan.shortcuts[index], q)
        for name in plan.readers.get(index, []):
            self.rotate_reader(name, q)
        for node in plan.reshapes.get(index, []):
            self._narrow_reshape(node, basis.shape[0], width)
        if tied is not None and tied.position == index:
            self.retie(basis, width)

    def retie(self, basis: torch.Tensor | None, width: int) -> None:
        """Head weight ``E Q`` (full width) shared with the embedding, which reads its first ``width`` columns.

        The affine in front of the head maps into the same basis: ``A ← Qᵀ A``, ``β ← β Q``.
        """
        tied = self.plan.tied
        head, embedding = self.module(tied.head), self.module(tied.embedding)
        if basis is not None:
            set_linear(head, _f64(head.weight) @ basis.to(head.weight.device), _f64(head.bias))
            self.rotate_writer(tied.affine, basis)
        embedding.weight = head.weight
        embedding.embedding_dim = head.weight.shape[1]
        if tied.width_slice is not None:
            tied.width_slice.args = (tied.width_slice.args[0], -1, 0, width)

    def remove_shortcut(self, index: int) -> None:
        """Delete the shortcut into position ``index`` (its matrix is the identity: both ends share a
        basis and a width); the residual add reads the stream directly again."""
        plan = self.plan
        name = plan.shortcuts.pop(index)
        remove_module_call(self.gm, name)
        for names in plan.readers.values():
            if name in names:
                names.remove(name)
        plan.added.remove(name)

    @staticmethod
    def _narrow_reshape(node: Node, hidden: int, width: int) -> None:
        shape = list(node.args[1])
        if shape and shape[-1] == hidden:
            shape[-1] = width
            node.args = (node.args[0], shape) + tuple(node.args[2:])
