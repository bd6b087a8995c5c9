"""Figures: eigenvalue spectra per stream position, perplexity against sparsity."""

from __future__ import annotations

from typing import Optional

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(eigenvalues: list[Optional[torch.Tensor]], path: str, title: str = "PCA spectra") -> None:
    """Normalised eigenvalues (log scale) of every rotated stream position, early positions light."""
    plt = _pyplot()
    spectra = [(i, e) for i, e in enumerate(eigenvalues) if e is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rank, (index, values) in enumerate(spectra):
        values = values.clamp_min(1e-12)
        ax.semilogy(values / values[0], color=plt.cm.viridis(rank / max(1, len(spectra) - 1)), lw=0.8)
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_perplexity(rows: list[dict], path: str, title: str) -> None:
    """Perplexity against sparsity, one line per evaluation text; the true parameter fraction annotated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = sorted({k for r in rows for k in r["perplexity"]})
    for name in names:
        xs = [r["sparsity"] for r in rows if name in r["perplexity"]]
        ys = [r["perplexity"][name] for r in rows if name in r["perplexity"]]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, r in zip(xs, ys, [r for r in rows if name in r["perplexity"]]):
            ax.annotate(f"{100 * r['param_fraction']:.0f}%", (x, y), textcoords="offset points", xytext=(0, 6),
                        fontsize=7, ha="center")
    ax.set_xlabel("slicing (fraction of stream width deleted)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
