"""Loading a saved folder: its exported programs, or its AOTInductor package (:mod:`.compiled`), with
the weights memory-mapped from the folder. Needs torch and safetensors only (and the tokenizer's library
for the tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..calibration import check_device
from ..errors import FxSliceError
from ..hf import causal_lm_output, load_tokenizer
from .compiled import DECODE, PREFILL, CompiledProgram, compiled_entry, load_compiled
from .folder import read_record
from .generate import check_token_ids, generate as generate_with_cache
from .programs import load_programs, program_file, set_cache_shape
from .weightfiles import read_weights


class LoadedModel(nn.Module):
    """A loaded sliced program: ``forward(input_ids) -> CausalLMOutput`` with its ``record``, and
    ``generator`` (the KV-cache program, or None) behind :meth:`generate`."""

    def __init__(self, program_module: nn.Module, record: dict, generator: Optional[nn.Module] = None):
        super().__init__()
        self.program = program_module
        self.record = record
        self.generator = generator

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **options) -> torch.Tensor:
        """KV-cache generation (see :func:`fxslice.runtime.generate.generate` for the options)."""
        if self.generator is None:
            raise FxSliceError("this folder has no generate.pt2 (saved without a KV-cache program)")
        return generate_with_cache(self.generator, input_ids, max_new_tokens, **options)

    @property
    def compiled(self) -> bool:
        """Whether the programs are the folder's AOTInductor package (``fxslice compile``)."""
        return isinstance(self.program, CompiledProgram)

    def forward(self, input_ids: torch.Tensor):
        check_token_ids(input_ids, self.record.get("vocab_size"))
        return causal_lm_output(self.program(input_ids))

    def train(self, mode: bool = True) -> "LoadedModel":
        """The program was captured in eval mode and has no train/eval switch (torch refuses one)."""
        self.training = mode
        return self


def _tokenizer(path: Path, vocab_size: int):
    """The folder's tokenizer, refused when it has more tokens than the model's vocabulary."""
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > vocab_size:
        raise FxSliceError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary "
                           f"is {vocab_size}")
    return tokenizer


def check_quantized_device(folder: Path, record: dict, device_type: Optional[str]) -> None:
    """Refuse a quantised folder on a device its weights are not packed for (ATen's CPU kernels)."""
    packed_for = (record.get("quantization") or {}).get("packed_for")
    if packed_for and device_type is not None and device_type != packed_for:
        raise FxSliceError(f"{folder} holds {record['quantization'].get('scheme')} weights packed for {packed_for} "
                           f"kernels; it cannot run on {device_type}: load it on {packed_for}, or load the float folder")


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", with_tokenizer: bool = True,
         compiled: Optional[bool] = None):
    """Load a saved sliced model: returns ``(model, tokenizer)`` (tokenizer None when absent or not wanted).

    ``compiled``: None uses the folder's AOTInductor package for ``device`` when it has one
    (``fxslice compile``), True requires it, False loads the exported programs."""
    path = Path(folder)
    record = read_record(path)
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        device_type = None  # check_device names it
    program_file(path)  # refused before any weight is read
    check_quantized_device(path, record, device_type)
    entry = compiled_entry(path, record, device_type, required=compiled is True) \
        if compiled is not False and device_type is not None else None
    check_device(device)  # a device this machine lacks is refused before any weight is read
    device = torch.device(device)
    tensors = read_weights(path, record["weights"])
    if entry is None:
        program, generator = load_programs(path, record, tensors)
    else:
        models = load_compiled(path, record, entry, device, tensors)
        program, generator = models[PREFILL], models.get(DECODE)
        if generator is not None:
            set_cache_shape(generator, record)
    model = LoadedModel(program, record, generator).to(device)
    wanted = with_tokenizer and (path / "tokenizer_config.json").exists()
    return model, _tokenizer(path, record["vocab_size"]) if wanted else None
