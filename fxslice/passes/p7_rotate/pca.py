"""The PCA of SliceGPT (Sec. 3.3): covariance of a stream signal in float64, its sorted eigenbasis."""

from __future__ import annotations

import torch

from ...calibration import Batch, token_rows



def covariance(value: torch.Tensor, batch: Batch, pca_signal: str, eps: float) -> torch.Tensor:
    """``XᵀX`` in float64 over the unmasked tokens of one batch (Sec. 3.3). ``X`` is the stream value
    itself (``"stream"``) or its RMS-normalised form (``"norm_output"``, the paper's Eq. 8)."""
    signal = value.to(torch.float64)
    if pca_signal == "norm_output":
        signal = signal * torch.rsqrt(signal.pow(2).sum(-1, keepdim=True) / signal.shape[-1] + eps)
    rows = token_rows(signal, batch)
    return rows.T @ rows


def pca_basis(covariance: torch.Tensor, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of ``C`` by decreasing eigenvalue (columns), signs fixed (largest entry positive)."""
    c = covariance.to(torch.float64)
    c = (c + c.T) / 2
    size = c.shape[0]
    if centered:
        u = torch.full((size,), size ** -0.5, dtype=torch.float64, device=c.device)
        m = torch.eye(size, dtype=torch.float64, device=c.device) - torch.outer(u, u)
        c = m @ c @ m - (torch.trace(c) + 1.0) * torch.outer(u, u)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(c)
    except (RuntimeError, NotImplementedError):  # a device without float64 eigh: the CPU's
        eigenvalues, eigenvectors = (t.to(c.device) for t in torch.linalg.eigh(c.cpu()))
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, basis = eigenvalues[order], eigenvectors[:, order]
    if centered:
        basis[:, -1] = u
        eigenvalues[-1] = 0.0
    pivot = basis.abs().argmax(0)
    signs = torch.sign(basis[pivot, torch.arange(size, device=c.device)])
    signs[signs == 0] = 1.0
    return basis * signs, eigenvalues
