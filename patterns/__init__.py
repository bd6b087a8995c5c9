"""Built-in architecture patterns of fxslice (installed as ``fxslice.patterns``).

Everything that differs between model families is recognised here, never in the passes:

- ``norms``: RMSNorm (``weight * x / rms``), offset RMSNorm (Gemma: ``(1 + weight) * x / rms``),
  LayerNorm (with, without or with partial affine parameters).
- ``linears``: ``aten.linear`` with a parameter weight, GPT-2's ``Conv1D`` (``view -> addmm -> view``),
  Falcon's ``FalconLinear`` (``x @ W.T [+ b]``).
- ``experts``: grouped mixture-of-experts weights ``[E, out, in]`` gathered per row and applied with
  ``bmm`` (transformers' ``batched_mm`` experts) become one ``ExpertLinear``; capture patterns give
  experts written as a loop over the experts a batch reaches (DBRX, JetMoE) that gathered form while the
  model is captured.
- ``indexers``: capture patterns giving sparse-attention indexers whose token selection loops over query
  groups (Kolibri 1.1) a dense, traceable form while the model is captured.
- ``configs``: config attributes that hold an MLP width where a config leaves it unset (for stock
  checkpoints of a slice).

Register more with :func:`fxslice.register_norm_pattern` / :func:`fxslice.register_linear_pattern` /
:func:`fxslice.register_capture_pattern`.
"""

from . import configs, experts, indexers, linears, norms  # noqa: F401  (importing registers the patterns)
