"""fxslice — SliceGPT as a torch.fx graph pass, for any Hugging Face causal LM.

    import fxslice
    sliced = fxslice.compress(model, calib_batches, sparsity=0.25)
    sliced(input_ids).logits
    print(sliced.fxslice)          # widths, true parameter counts, timings
    fxslice.inspect(model)         # the residual-stream structure fxslice finds
"""

from .analyse import Structure
from .compress import SliceResult, compress, inspect
from .errors import CalibrationError, FxSliceError, GraphStructureError
from .registry import NormSpec, Region, LinearMatch, register_linear_pattern, register_norm_pattern, unregister_pattern

__version__ = "0.1.0"

from . import patterns  # noqa: E402,F401  (registers the built-in patterns from the top-level patterns/ folder)

__all__ = [
    "compress", "inspect", "SliceResult", "Structure", "NormSpec", "Region", "LinearMatch",
    "register_norm_pattern", "register_linear_pattern", "unregister_pattern",
    "FxSliceError", "GraphStructureError", "CalibrationError", "__version__",
]
