"""fxslice — SliceGPT as a torch.fx graph pass, for any Hugging Face causal LM.

    import fxslice
    sliced = fxslice.compress(model, calib_batches, sparsity=0.25)        # SliceGPT
    sliced = fxslice.compress(model, calib_batches, target_params=0.8)    # a parameter budget
    sliced(input_ids).logits
    print(sliced.fxslice)          # widths, true parameter counts, inserted modules, timings
    fxslice.inspect(model)         # the residual-stream structure fxslice finds
    fxslice.save(sliced, "out", tokenizer); model, tokenizer = fxslice.load("out")
    fxslice.save(fxslice.quantize(sliced, "int8"), "out-int8", tokenizer)   # torchao weight-only int8 (or "int4")
    tuned, report = fxslice.finetune(sliced, train, val, teacher=model)      # recovery: distil from the dense model
    sliced = fxslice.compress("path/to/checkpoint", calib_batches, 0.25)   # streamed, block by block

Layout: ``passes/`` (the graph pass, one module per step, numbered in run order; the recorded slice
and its replay), ``options.py`` (what the user asks for), ``source.py`` (what a second capture of
the model needs), ``graph/`` (helpers the passes share,
the weight store every weight edit goes through), ``runtime/`` (saving, loading and running the
sliced program), ``jobs/`` (what users run around it: shipped models and texts, perplexity,
fine-tuning, zero-shot tasks), ``hf.py`` (every Hugging Face assumption about a model object),
``checkpoint.py`` (safetensors checkpoints read tensor by tensor), ``distributed.py``
(torch.distributed calibration), ``cli.py`` (argument parsing and printing only).
"""

from .noise import filter_import_noise

filter_import_noise()  # before anything imports transformers (which imports torchao)

from .compress import compress, inspect  # noqa: E402
from .errors import CalibrationError, FxSliceError, GraphStructureError
from .graph.inserted import InsertedModule
from .passes.p3_analyse import Structure
from .registry import (LinearMatch, NormSpec, Region, Substitution, register_capture_pattern, register_linear_pattern,
                       register_norm_pattern, unregister_pattern)
from .result import SliceResult
from .passes.p8_quantize import quantize
from .jobs.finetune import finetune
from .runtime.load import load
from .runtime.quantize import quantize_folder
from .runtime.save import save
from .version import __version__

from . import patterns  # noqa: E402,F401  (registers the built-in patterns from the top-level patterns/ folder)

__all__ = [
    "compress", "inspect", "save", "load", "quantize", "quantize_folder", "finetune", "SliceResult", "Structure", "InsertedModule", "NormSpec", "Region",
    "LinearMatch", "Substitution", "register_norm_pattern", "register_linear_pattern", "register_capture_pattern",
    "unregister_pattern",
    "FxSliceError", "GraphStructureError", "CalibrationError", "__version__",
]
