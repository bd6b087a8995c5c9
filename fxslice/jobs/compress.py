"""The main job: compress a model on a text protocol, measure perplexity, save the result."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tabulate import tabulate
from torch.fx import GraphModule

from ..calibration import check_device
from ..compress import compress, inspect
from ..distributed import is_writer, raise_together, rank, world_size
from ..errors import FxSliceError
from ..hf import load_tokenizer
from ..options import Options
from ..passes.p3_analyse import Structure
from ..passes.p8_quantize import check_scheme
from ..result import SliceResult
from ..runtime.compiled import check_compile_devices, compile_folder
from ..runtime.folder import check_destination
from ..runtime.save import save
from .assets import load_model, resolve_model, torch_dtype
from .data import Protocol, batches, protocol_data
from .evaluate import perplexity
from .quantize import QuantizeJobResult, quantize_job


@dataclass
class Row:
    """One line of the before/after table."""

    label: str
    params: int
    dense_params: int
    widths: str
    perplexities: dict[str, float] = field(default_factory=dict)
    seconds: Optional[float] = None

    def cells(self, names: list[str]) -> list:
        return [self.label, f"{self.params / 1e6:.2f}M", f"{100 * self.params / self.dense_params:.1f}%", self.widths,
                *[f"{self.perplexities[n]:.2f}" if n in self.perplexities else "-" for n in names],
                "-" if self.seconds is None else f"{self.seconds:.0f}"]


def table(rows: list[Row], names: list[str]) -> str:
    head = ["model", "params (true)", "of dense", "stream widths", *[f"ppl {n}" for n in names], "time (s)"]
    return tabulate([r.cells(names) for r in rows], head, tablefmt="github")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class CompressJobResult:
    """What ``fxslice compress`` measured and wrote."""

    rows: list[Row]  # dense (when evaluated) and sliced
    eval_names: list[str]
    record: dict  # what fxslice.json holds besides versions and checksums
    sliced: GraphModule
    result: SliceResult
    seconds: float  # compression wall time
    peak_rss_mb: float
    saved: Optional[Path] = None
    spectra_plot: Optional[str] = None
    compiled: list = field(default_factory=list)  # CompileOutcome per device, when asked for
    quantized: Optional[QuantizeJobResult] = None  # when the saved folder was quantised

    def table(self) -> str:
        return table(self.rows, self.eval_names)

    def to_json(self) -> dict:
        return {**self.record, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb}


def distinct_widths(widths: list[int]) -> str:
    """``576/432``: the distinct widths, widest first."""
    return "/".join(str(w) for w in sorted(set(widths), reverse=True))


def compress_job(model_name: str, sparsity: Optional[float], protocol: Protocol, *, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 8, eval_batch_size: int = 4, evaluate_dense: bool = True, evaluate: bool = True,
                 output: Optional[str] = None, overwrite: bool = False, progress: bool = True,
                 max_cache_len: int = 1024, cache_batch_size: int = 1, plot_spectra: Optional[str] = None,
                 stream: bool = False, offload_dir: Optional[str] = None, compile_devices: Optional[list[str]] = None,
                 save_format: str = "fxslice", quantize: Optional[str] = None, group_size: int = 32,
                 **options) -> CompressJobResult:
    """Compress ``model_name`` at ``sparsity`` (or ``options["target_params"]``) on ``protocol``; evaluate
    dense and sliced; save to ``output``. ``options``: the other :class:`fxslice.compress.Options`.

    ``stream``: read the checkpoint block by block instead of loading the model (the dense model is
    then not evaluated). Under ``torch.distributed`` every rank calibrates on its share of the
    windows; only rank 0 evaluates and writes files. ``max_cache_len`` / ``cache_batch_size``: the
    saved KV-cache program's length and batch; ``compile_devices``: also build AOTInductor packages
    (:func:`fxslice.runtime.compiled.compile_folder`) for these devices after saving; ``save_format``:
    ``"transformers"`` saves a stock checkpoint (needs ``stock=True``); ``quantize``: a scheme of
    :data:`fxslice.options.QUANT_SCHEMES` the saved folder is then quantised with, in place
    (:func:`fxslice.jobs.quantize.quantize_job`; ``group_size`` for int4)."""
    writer = is_writer()
    error = None
    try:  # under torch.distributed, what one rank refuses stops every rank with the same message
        checked = Options(sparsity, **options).check()
        if save_format == "transformers" and not checked.stock:
            raise FxSliceError("format 'transformers' needs a stock slice: pass stock=True (CLI --stock)")
        if save_format == "transformers" and compile_devices is not None:
            raise FxSliceError("--compile builds packages of fxslice folders; a transformers checkpoint is compiled "
                               "by its own runtime (torch.compile, llama.cpp)")
        model_dtype = torch_dtype(dtype) if dtype is not None else None  # streamed: the checkpoint's by default
        check_device(device)
        if compile_devices:  # an unknown compile device is refused before any work, not after the save
            check_compile_devices(compile_devices)
        if quantize is not None:
            if not output or save_format != "fxslice":
                raise FxSliceError("quantize applies to a saved fxslice folder: give an output folder and format "
                                   "'fxslice' (a transformers checkpoint is quantised by its own runtime)")
            check_scheme(quantize, "cpu", group_size)
        if output and writer:
            check_destination(Path(output), overwrite)
        source = resolve_model(model_name) if writer else None  # a shipped model is converted once, by rank 0
    except FxSliceError as exc:
        error = exc
    raise_together(error)
    label = "sliced " + checked.label()
    try:
        source = source or resolve_model(model_name)
        if stream:
            model, tokenizer = None, _checkpoint_tokenizer(source)
            tokenizer.model_max_length = 10**9  # windows are cut by the protocol
            evaluate_dense = False
        else:
            model, tokenizer = load_model(source, model_dtype or torch.float32, device)
        calibration, evaluations = protocol_data(tokenizer, protocol)
        if len(calibration) < world_size():
            raise FxSliceError(f"{len(calibration)} calibration window(s) for {world_size()} processes: every rank "
                               f"needs at least one (--calibration-windows {world_size()} or more)")
    except FxSliceError as exc:
        error = exc
    raise_together(error)
    if world_size() > 1:  # this rank's share: windows rank, rank + N, ...
        calibration = calibration.shard(num_shards=world_size(), index=rank(), contiguous=False)
    if not evaluate or not writer:
        evaluations = {}
    started = time.perf_counter()
    if stream:
        sliced = compress(source, batches(calibration, batch_size), sparsity, progress=progress and writer,
                          device=device, dtype=model_dtype, offload_dir=offload_dir, **options)
    else:
        sliced = compress(model, batches(calibration, batch_size), sparsity, progress=progress and writer,
                          offload_dir=offload_dir, **options)
    seconds = time.perf_counter() - started
    result = sliced.fxslice
    rows = []
    if evaluate_dense:  # after compression: ranks never wait for rank 0's evaluation
        dense = Row("dense", result.dense_param_count, result.dense_param_count, str(result.hidden_size))
        for name, windows in evaluations.items():
            dense.perplexities[name] = perplexity(model, batches(windows, eval_batch_size), f"dense ppl {name}", progress)
        rows.append(dense)
    row = Row(label, result.param_count, result.dense_param_count, distinct_widths(result.widths),
              seconds=seconds)
    for name, windows in evaluations.items():
        row.perplexities[name] = perplexity(sliced, batches(windows, eval_batch_size), f"sliced ppl {name}", progress)
    rows.append(row)
    record = {
        "source_model": model_name,
        **result.to_record(),
        "calibration": {**protocol.to_dict(), "batch_size": batch_size, "tokens": result.calibration_tokens,
                        "processes": world_size()},
        "perplexity": row.perplexities,
        "dense_perplexity": rows[0].perplexities if evaluate_dense else {},
        "timings": result.timings,
    }
    job = CompressJobResult(rows, list(evaluations), record, sliced, result, seconds, peak_rss_mb())
    if output and writer:
        job.saved = save(sliced, output, tokenizer, record, overwrite=overwrite, max_cache_len=max_cache_len,
                         cache_batch_size=cache_batch_size, format=save_format)
        if quantize is not None:
            job.quantized = quantize_job(job.saved, quantize, protocol, output=job.saved, overwrite=True,
                                         group_size=group_size, evaluate=evaluate, eval_batch_size=eval_batch_size,
                                         progress=progress, float_perplexities=row.perplexities)
            quantized_row = Row(f"{label} + {quantize}", result.param_count, result.dense_param_count,
                                distinct_widths(result.widths), job.quantized.perplexities_after, job.quantized.seconds)
            job.rows.append(quantized_row)
        if compile_devices is not None:
            job.compiled = compile_folder(job.saved, compile_devices or None, progress=progress)
    if plot_spectra and writer:
        from .plots import plot_spectra as plot

        plot(result.eigenvalues, plot_spectra, title=f"{model_name}: PCA spectra per stream position")
        job.spectra_plot = plot_spectra
    job.peak_rss_mb = peak_rss_mb()
    return job


def _checkpoint_tokenizer(source):
    """The tokenizer saved beside a checkpoint (a streamed run never loads the model to find one)."""
    try:
        return load_tokenizer(source)
    except FxSliceError:  # its config.json named (load_tokenizer checks it first)
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise FxSliceError(f"checkpoint {source} has no usable tokenizer files (--stream reads the tokenizer "
                           f"from the checkpoint folder): {type(exc).__name__}: {exc}") from exc


def inspect_job(model_name: str) -> Structure:
    """The residual-stream structure of a shipped, hub or local model (printed by ``fxslice inspect``)."""
    model, _ = load_model(model_name)
    return inspect(model, show=False)
