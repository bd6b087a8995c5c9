"""The graph pass, one module per step, numbered in the order :func:`fxslice.compress` runs them.

1. :mod:`.p1_capture` — ``torch.export`` → flat GraphModule ``forward(input_ids) -> CausalLMOutput``
2. :mod:`.p2_canonicalise` — no-ops out; linears and embeddings become ``nn.Linear``/``nn.Embedding``
   (then the graph's weights go behind a weight store, :mod:`fxslice.graph.store`)
3. :mod:`.p3_analyse` — the residual stream: positions, readers, writers, skips, block groups,
   norm branches → ``Structure`` (a graph analysis: no weight is read)
4. :mod:`.p4_mlps` — the MLPs whose hidden units can be sliced, and :mod:`.p4_attention` the attentions
   whose value/output dimension can be narrowed (graph analyses too)
5. :mod:`.p5_fuse` — norms folded, shortcuts inserted, LayerNorm streams centred → ``Plan`` (the
   fused graph with everything the analyses found)
6. :mod:`.p6_widths` — the width policy: stream widths, MLP units kept, basis groups → ``Widths``
7. :mod:`.p7_rotate` — calibrate block by block, PCA, rotate and slice every position; post-norm
   branches and MLP hidden units inside each block's turn → ``Slice`` (:mod:`.slice_record`)

``PASSES`` below is that order; ``compress`` runs ``step(run)`` of each (:mod:`.run`). The slice
it returns is replayed onto other captures of the model by :meth:`.slice_record.Slice.replay`
(the KV-cache program, :mod:`fxslice.runtime.generate`). Saving and running the sliced program is
the runtime's business (:mod:`fxslice.runtime`).
"""

from . import p1_capture, p2_canonicalise, p3_analyse, p4_mlps, p5_fuse, p6_widths, p7_rotate

PASSES = (p1_capture, p2_canonicalise, p3_analyse, p4_mlps, p5_fuse, p6_widths, p7_rotate)
"""The passes in run order; each has ``NAME`` and ``step(run)``."""

__all__ = ["PASSES"]
