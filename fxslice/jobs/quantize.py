"""``fxslice quantize``: weight-only quantisation of a saved folder, its perplexity measured before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tabulate import tabulate

from ..errors import FxSliceError
from ..runtime.compiled import check_compile_devices, compile_folder
from ..runtime.folder import read_record, write_record


@dataclass
class QuantizeJobResult:
    """What ``fxslice quantize`` measured and wrote."""

    output: Path
    scheme: str
    quantization: dict  # the record's "quantization" entry
    seconds: float
    perplexities_before: dict[str, float] = field(default_factory=dict)
    perplexities_after: dict[str, float] = field(default_factory=dict)
    compiled: list = field(default_factory=list)  # CompileOutcome per device

    def table(self) -> str:
        rows = [[name, f"{self.perplexities_before[name]:.2f}", f"{after:.2f}",
                 f"{100 * (after / self.perplexities_before[name] - 1):+.2f}%"]
                for name, after in self.perplexities_after.items()]
        return tabulate(rows, ["text", "ppl float", f"ppl {self.scheme}", "cost"], tablefmt="github")

    @property
    def summary(self) -> str:
        q = self.quantization
        kinds = {}
        for fmt in q["modules"].values():
            kinds[fmt] = kinds.get(fmt, 0) + 1
        held = ", ".join(f"{count} {fmt}" for fmt, count in sorted(kinds.items()))
        untouched = sum(name not in q["modules"] for name in q["kept_float"])
        return (f"{held} Linear(s), {untouched} kept in float; their weights "
                f"{q['float_bytes'] / 2**20:.1f} MiB -> {q['quantized_bytes'] / 2**20:.1f} MiB; "
                f"saved to {self.output} ({self.seconds:.0f}s)")


def quantize_job(folder: str, scheme: str, protocol, *, output: Optional[str] = None, overwrite: bool = False,
                 group_size: int = 32, evaluate: bool = True, eval_batch_size: int = 4,
                 compile_devices: Optional[list[str]] = None, progress: bool = True,
                 float_perplexities: Optional[dict[str, float]] = None) -> QuantizeJobResult:
    """Quantise the saved ``folder`` with ``scheme`` into ``output``; with ``evaluate``, the perplexity of
    the float and the quantised programs on ``protocol``'s evaluation texts (recorded in the new
    folder's ``fxslice.json``; ``float_perplexities``: the float figures when they are known already);
    ``compile_devices``: then build its AOTInductor package ([] = default devices)."""
    from ..runtime.quantize import quantize_folder
    from .data import batches, protocol_data
    from .evaluate import perplexity

    if compile_devices:
        check_compile_devices(compile_devices)
    started = time.perf_counter()
    target, float_model, quantized, tokenizer = quantize_folder(folder, scheme, output, overwrite=overwrite,
                                                                group_size=group_size)
    record = read_record(target)
    result = QuantizeJobResult(target, scheme, record["quantization"], 0.0)
    if evaluate:
        if tokenizer is None:
            raise FxSliceError(f"{folder} has no tokenizer files: cannot measure perplexity (pass --no-eval)")
        _, evaluations = protocol_data(tokenizer, protocol)
        for name, windows in evaluations.items():
            chunks = batches(windows, eval_batch_size)
            known = (float_perplexities or {}).get(name)
            result.perplexities_before[name] = known if known is not None else \
                perplexity(float_model, chunks, f"float ppl {name}", progress)
            result.perplexities_after[name] = perplexity(quantized, chunks, f"{scheme} ppl {name}", progress)
        record.update({"perplexity_before_quantization": result.perplexities_before,
                       "perplexity": result.perplexities_after, "quantization_protocol": protocol.to_dict()})
        write_record(target, record)
    result.seconds = time.perf_counter() - started
    if compile_devices is not None:
        result.compiled = compile_folder(target, compile_devices or None, progress=progress)
    return result

