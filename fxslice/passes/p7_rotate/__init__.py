"""Pass 7 — rotate and slice: calibrate, PCA, rotate every weight touching a position, keep ``d`` columns.

For a position with calibration signal ``X`` (tokens × D, original basis), ``C = Σ XᵀX`` is
accumulated in float64 and ``C = Q Λ Qᵀ`` with eigenvalues sorted in descending order (the PCA of
SliceGPT, Sec. 3.3). Writers become ``Q_dᵀ W``, readers ``W Q_d``, the shortcut between positions a
and b ``Q_a[:, :d_a]ᵀ Q_b[:, :d_b]``. In a centred (LayerNorm) stream every value is orthogonal to
``u = 1/√D``; the basis puts ``u`` last so that slicing drops that always-zero coordinate first.

The widths and basis groups come from pass 6. Modules, in the order a group goes through them:

- :mod:`.loop` — :func:`rotate_and_slice`, the loop over groups of positions (one basis each);
- :mod:`.runner` — :class:`SegmentRunner`: each block once per batch, from the cached previous position;
- :mod:`.activations` — :class:`ActivationCache`: those cached values, in memory or on disk;
- :mod:`.pca` — :func:`covariance`, :func:`pca_basis`;
- :mod:`.positions` — :class:`Rotator`: the weights of each position rotated and sliced;
- :mod:`.branches` — post-norm branches sliced in their own basis (after the positions);
- :mod:`.hidden` — MLP hidden units selected and the down projection refitted;
- :mod:`.values` — attention value dimensions narrowed per key/value group, the output refitted (last).

Every change of the graph's shape is recorded in a :class:`~fxslice.passes.slice_record.Slice`,
the value the loop returns.
"""

from .loop import NAME, rotate_and_slice, step
from .pca import covariance, pca_basis
from .positions import Rotator, rotate_reader, rotate_writer
from .runner import SegmentRunner

__all__ = ["NAME", "step", "rotate_and_slice", "covariance", "pca_basis", "Rotator", "rotate_reader",
           "rotate_writer", "SegmentRunner"]
