"""The main job: compress a model on a text protocol, measure perplexity, save the result."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tabulate import tabulate

from .assets import load_model
from .capture import count_parameters
from .compress import compress
from .data import Protocol, batches, protocol_data
from .evaluate import perplexity
from .export import save

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Row:
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


def run(model_name: str, sparsity: float, protocol: Protocol, *, dtype: str = "float32", device: str = "cpu",
        batch_size: int = 8, eval_batch_size: int = 4, evaluate_dense: bool = True, evaluate: bool = True,
        output: Optional[str] = None, overwrite: bool = False, progress: bool = True, max_cache_len: int = 1024,
        **options) -> dict:
    """Compress ``model_name`` at ``sparsity`` on ``protocol``; returns the rows and figures."""
    model, tokenizer = load_model(model_name, DTYPES[dtype], device)
    calibration, evaluations = protocol_data(tokenizer, protocol)
    if not evaluate:
        evaluations = {}
    dense_params = count_parameters(model)
    dense = Row("dense", dense_params, dense_params, str(model.config.hidden_size))
    if evaluate_dense:
        for name, windows in evaluations.items():
            dense.perplexities[name] = perplexity(model, batches(windows, eval_batch_size), f"dense ppl {name}", progress)
    started = time.perf_counter()
    sliced = compress(model, batches(calibration, batch_size), sparsity, progress=progress, **options)
    seconds = time.perf_counter() - started
    result = sliced.fxslice
    row = Row(f"sliced {sparsity:g}", result.param_count, dense_params, _widths(result.widths), seconds=seconds)
    for name, windows in evaluations.items():
        row.perplexities[name] = perplexity(sliced, batches(windows, eval_batch_size), f"sliced ppl {name}", progress)
    record = {
        "source_model": model_name,
        "sparsity": sparsity,
        "hidden_size": result.hidden_size,
        "widths": result.widths,
        "param_count": result.param_count,
        "dense_param_count": result.dense_param_count,
        "added_param_count": result.added_param_count,
        "tied_embeddings": result.tied_embeddings,
        "options": result.options,
        "calibration": {**protocol.to_dict(), "batch_size": batch_size, "tokens": result.calibration_tokens},
        "perplexity": row.perplexities,
        "dense_perplexity": dense.perplexities,
        "timings": result.timings,
    }
    saved = None
    if output:
        generator = None
        if max_cache_len > 0:
            from .generate import with_cache

            generator = with_cache(model, sliced, batch_size=1, max_cache_len=max_cache_len)
        saved = save(sliced, output, tokenizer, record, overwrite=overwrite, generator=generator)
    return {"rows": [dense, row] if evaluate_dense else [row], "record": record, "sliced": sliced, "saved": saved,
            "eval_names": list(evaluations), "peak_rss_mb": peak_rss_mb(), "result": result}


def _widths(widths: list[int]) -> str:
    distinct = sorted(set(widths), reverse=True)
    return "/".join(str(w) for w in distinct)
