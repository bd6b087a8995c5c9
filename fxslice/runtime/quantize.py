"""Quantising a saved folder (``fxslice quantize``): its programs canonicalised back into modules, their
Linears quantised by pass 8 (:mod:`fxslice.passes.p8_quantize`), saved as a new folder whose
``fxslice.json`` records the scheme. The KV-cache program receives the same quantised modules
(:func:`~fxslice.runtime.generate.retarget`), so the folder stores each quantised weight once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import FxSliceError
from ..passes.p8_quantize import check_scheme, half_precision_modules, quantize_modules
from .folder import RECORD, check_destination, read_record


def check_not_quantized(folder: Path, record: dict, action: str) -> None:
    """Refuse to ``action`` a folder whose weights are quantised already (never quantise twice)."""
    quantization = record.get("quantization")
    if quantization:
        raise FxSliceError(f"{folder} is quantised already (scheme {quantization.get('scheme')!r} in its {RECORD}): "
                           f"{action} the float folder it was made from")


def quantize_folder(folder: str | os.PathLike, scheme: str = "int8", output: Optional[str | os.PathLike] = None, *,
                    overwrite: bool = False, group_size: int = 32):
    """Quantise the saved folder ``folder`` into ``output`` (default ``FOLDER-SCHEME``; the folder itself
    with ``overwrite``). Returns ``(path, float model, quantised model, tokenizer)``, the models as
    loaded/built here (for measuring them) — the programs were saved before this returns."""
    from ..jobs.finetune import trainable_copy
    from .generate import retarget
    from .load import load
    from .save import save

    source = Path(folder)
    record = read_record(source)
    check_not_quantized(source, record, "quantise")
    check_scheme(scheme, "cpu", group_size)
    target = Path(output) if output is not None else Path(f"{str(source).rstrip('/')}-{scheme}")
    check_destination(target, overwrite)
    loaded, tokenizer = load(source, compiled=False)
    program = trainable_copy(loaded)
    report = quantize_modules(program, scheme, group_size=group_size, half_modules=half_precision_modules(record))
    program.recompile()
    generator = retarget(loaded.generator, program) if loaded.generator is not None else None
    kept = {key: value for key, value in record.items() if key not in ("program_sha256", "weights")}
    save(program, target, tokenizer, {**kept, "quantization": report.to_record()}, overwrite=overwrite,
         generator=generator)
    return target, loaded, program, tokenizer
