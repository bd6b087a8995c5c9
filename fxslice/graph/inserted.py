"""The modules fxslice inserts into a graph, and the one rule that names them.

============  ==============================  ==================================================================
kind          module name                     what it holds
============  ==============================  ==================================================================
shortcut      ``<block>.shortcut_<p>``        Linear on the skip edge of the residual add that produces stream
                                              position ``p`` (``<block>``: the module holding the add;
                                              ``shortcut_<p>`` at the root); the identity after fuse,
                                              ``Q_aᵀ Q_p`` after rotation; removed where it stays the identity
norm_affine   ``<norm>_affine``               ``diag(γ)`` (+ ``β``) of a writer-side norm (Gemma 2/3, OLMo 2,
                                              Bloom), later ``diag(γ) Q_d``
head_affine   ``<norm>_affine``               ``diag(γ)`` (+ ``β``) of the final norm in front of a head tied to
                                              the embedding
head_input    ``<head>_input``                the identity on the input of a Linear sharing the token embedding's
                                              weight that reads no stream position (BERT's decoder behind its
                                              head transform), later ``Q_0ᵀ``
passthrough   ``<norm>_passthrough``          ``diag(γ)`` (+ ``β``) of a reader-side norm on the path that carries
                                              its output into a later residual add (LongCat-Flash's identity
                                              experts; a post-norm block's skip edge, centred in a LayerNorm
                                              model), later ``Q_bᵀ M diag(γ) Q_a``
branch_map    ``<block>.branch_<p>[_k]``      Linear on the value a branch adds to position ``p`` when its writers
                                              cannot be rotated where they are (Inkling's causal convolution
                                              over the attention output; ``_k`` for a k-th such branch of
                                              ``p``, k ≥ 1): the identity, later ``Q_pᵀ``
long_skip     ``<block>.skip_<a>_<p>[_k]``    Linear on the edge carrying position ``a``'s value into the residual add
                                              that produces a later position ``p`` besides its own skip edge (a
                                              looped model's input injection: Dory adds the input section's
                                              normalised output again before every loop; ``_k`` for the k-th
                                              into ``p``, k ≥ 1): the identity, later ``Q_aᵀ Q_p``
read_map      ``<norm>_read[_k]``             ``diag(γ)`` (+ ``β``) of a reader-side norm on an edge where an op reads
                                              its output in the model's coordinates (AXK2's input-dependent gate
                                              on the norm's output; ``_k`` for the k-th such edge, k ≥ 1), later
                                              ``Q_pᵀ diag(γ)``
(stream norm) ``<norm>``                      weightless :class:`~fxslice.graph.modules.StreamNorm` in place of
                                              the norm at that path (no parameters, not listed)
============  ==============================  ==================================================================

Names derive from the graph (module paths, position indices) only, so two captures of one model
(the full-sequence and the KV-cache program) name their inserted modules alike. The list of
:class:`InsertedModule` travels in the compression result and in ``fxslice.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

SHORTCUT, NORM_AFFINE, HEAD_AFFINE, HEAD_INPUT, PASSTHROUGH, BRANCH_MAP, LONG_SKIP, READ_MAP = (
    "shortcut", "norm_affine", "head_affine", "head_input", "passthrough", "branch_map", "long_skip", "read_map")


def shortcut_name(block_path: str, position: int) -> str:
    return f"{block_path}.shortcut_{position}" if block_path else f"shortcut_{position}"


def branch_map_name(block_path: str, position: int, k: int = 0) -> str:
    """``k``: the how-manyth such branch of the position (0 for the first, unnumbered)."""
    name = f"branch_{position}" + (f"_{k}" if k else "")
    return f"{block_path}.{name}" if block_path else name


def affine_name(norm_path: str) -> str:
    return f"{norm_path}_affine"


def head_input_name(head_path: str) -> str:
    return f"{head_path}_input"


def passthrough_name(norm_path: str) -> str:
    return f"{norm_path}_passthrough"


def long_skip_name(block_path: str, source: int, position: int, k: int = 0) -> str:
    """``k``: the how-manyth long skip into ``position`` (0: unnumbered)."""
    name = f"skip_{source}_{position}" + (f"_{k}" if k else "")
    return f"{block_path}.{name}" if block_path else name


def read_map_name(norm_path: str, k: int = 0) -> str:
    """``k``: the how-manyth edge reading the norm's output in model coordinates (0: unnumbered)."""
    return f"{norm_path}_read" + (f"_{k}" if k else "")


def stream_norm_name(norm_path: str, output_node_name: str) -> str:
    return norm_path or f"stream_norm_{output_node_name}"


@dataclass
class InsertedModule:
    """A parameterised module fxslice added: its name, kind and the stream positions it reads/writes."""

    name: str
    kind: str
    reads: Optional[int]
    writes: Optional[int]

    def to_dict(self) -> dict:
        return asdict(self)
