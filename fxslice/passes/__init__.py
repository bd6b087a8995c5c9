"""The graph pass, one module per step, in pipeline order:

1. :mod:`.p1_capture` — ``torch.export`` → flat GraphModule ``forward(input_ids) -> CausalLMOutput``
2. :mod:`.p2_canonicalise` — no-ops out; linears and embeddings become ``nn.Linear``/``nn.Embedding``
3. :mod:`.p3_analyse` — the residual stream: positions, readers, writers, skips → ``Structure``
4. :mod:`.p4_fuse` — norms folded, shortcuts inserted, LayerNorm streams centred → ``Plan``
5. :mod:`.p5_rotate` — calibrate, PCA, rotate and slice every position

:func:`fxslice.compress` calls them in this order; the saved artifacts are the runtime's business
(:mod:`fxslice.runtime`).
"""
