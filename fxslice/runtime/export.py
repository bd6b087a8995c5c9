"""Saving and loading a sliced graph as ``torch.export`` programs with their weights stored once.

A saved folder holds ``model.pt2`` (the re-exported program, dynamic batch and length, returning
the logits tensor), optionally ``generate.pt2`` (the KV-cache program), both saved without their
weights, the weights once in ``weights*.safetensors`` (:mod:`fxslice.runtime.weightfiles`), the
tokenizer files, and ``fxslice.json`` (source model, sparsity, widths, parameter counts, inserted
modules, the head, calibration protocol, versions, the programs' SHA-256, which stored tensor each
program parameter is). Loading needs torch and safetensors only. Saving is atomic: the folder is
assembled elsewhere on the same file system and swapped into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule, Node

from ..errors import FxSliceError
from ..hf import causal_lm_output, logits, vocab_size_of
from .compiled import DECODE, PREFILL, CompiledProgram, compiled_entry, load_compiled
from .weightfiles import check_index, fill_weights, read_weights, sha256, write_weights

FORMAT = "fxslice-sliced-model"
FORMAT_VERSION = 2  # 2: weights stored once in safetensors files beside weightless programs
PROGRAM = "model.pt2"
GENERATOR = "generate.pt2"
RECORD = "fxslice.json"


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return logits(self.model(input_ids))


def logits_module(model: nn.Module) -> nn.Module:
    """``input_ids -> logits tensor``. A GraphModule gets a graph copy returning the logits node (its
    parameter names, which the saved program keeps, stay the sliced graph's own); any other model a
    wrapper (names then start with ``model.``)."""
    if not isinstance(model, GraphModule):
        return _LogitsOnly(model)
    graph = copy.deepcopy(model.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, Node) and value.op == "call_function" and value.target is causal_lm_output:
        output.args = (value.args[0],)
        graph.erase_node(value)
    return GraphModule(model, graph, class_name=type(model).__name__)


def export_program(model: nn.Module, vocab_size: int) -> torch.export.ExportedProgram:
    """Re-export ``model`` (a sliced GraphModule or any ``input_ids -> logits`` module) with dynamic shapes."""
    device = next(model.parameters()).device
    example = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return torch.export.export(logits_module(model).eval(), (example,),
                                   dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)


def export_generator(program: nn.Module) -> torch.export.ExportedProgram:
    """Re-export a KV-cache program ``(input_ids [B, T], cache_position [T]) -> logits`` with dynamic T
    (``program.cache_batch_size`` and ``program.max_cache_len`` give its static cache's shape)."""
    batch, max_cache_len = program.cache_batch_size, program.max_cache_len
    device = next(program.parameters()).device
    length = Dim("length", min=1, max=max_cache_len)
    example = torch.zeros(batch, 4, dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.export.export(program, (example, torch.arange(4, device=device)),
                                   dynamic_shapes=({1: length}, {0: length}), strict=False)


def check_destination(target: Path, overwrite: bool) -> None:
    """A folder may be written to ``target`` if nothing is there, or, with ``overwrite``, an empty folder
    or one fxslice saved. Anything else (a file, a folder of other files) is refused untouched."""
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FxSliceError(f"{target} already exists (pass overwrite=True / --overwrite to replace it)")
    if not target.is_dir() or target.is_symlink():
        raise FxSliceError(f"{target} exists and is not a folder; fxslice will not replace it")
    if any(target.iterdir()) and not is_saved_folder(target):
        raise FxSliceError(f"{target} is a folder fxslice did not write (no valid {RECORD}); "
                           "refusing to delete it: choose another output folder")


def is_saved_folder(path: Path) -> bool:
    try:
        read_record(path)
    except FxSliceError:
        return False
    return True


def _check_save_inputs(model, tokenizer, record, generator) -> None:
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise FxSliceError(f"save: model must be a torch.nn.Module with parameters (a sliced GraphModule), "
                           f"got {type(model).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise FxSliceError(f"save: tokenizer must be a Hugging Face tokenizer (with save_pretrained) or None, "
                           f"got {type(tokenizer).__name__}")
    if record is not None and not isinstance(record, dict):
        raise FxSliceError(f"save: record must be a dict or None, got {type(record).__name__}")
    if generator is not None and not (isinstance(generator, nn.Module) and hasattr(generator, "max_cache_len")
                                      and hasattr(generator, "cache_batch_size")):
        raise FxSliceError("save: generator must be a KV-cache program from fxslice.runtime.generate.with_cache")


def _staging_folder(target: Path) -> Path:
    """An empty folder on the target's file system (so that it can be renamed into place), outside the
    target's parent when the temporary directory shares that file system: a save killed midway then
    leaves nothing beside the target. Created with the user's umask, like any folder."""
    parent = target.parent
    temporary = Path(tempfile.gettempdir())
    where = temporary if _can_rename(temporary, parent) else parent
    remove_stale_staging(where, target.name)
    staging = Path(tempfile.mkdtemp(dir=where, prefix=f"{_staging_prefix(target.name)}{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _can_rename(source_dir: Path, target_dir: Path) -> bool:
    """Whether a folder made in ``source_dir`` can be renamed into ``target_dir`` (same file system and
    mount: a probe folder is moved there and removed)."""
    try:
        probe = Path(tempfile.mkdtemp(dir=source_dir, prefix=".fxslice-probe-"))
    except OSError:
        return False
    moved = target_dir / probe.name
    try:
        os.rename(probe, moved)
    except OSError:
        probe.rmdir()
        return False
    moved.rmdir()
    return True


def _staging_prefix(name: str) -> str:
    return f".{name}.fxslice-"


def remove_stale_staging(where: Path, name: str) -> None:
    """Delete what saves of a folder called ``name`` that were killed midway left in ``where``
    (staging folders whose writing process no longer exists)."""
    prefix = _staging_prefix(name)
    for path in where.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(staging: Path, target: Path) -> None:
    """``staging`` becomes ``target``; a previous ``target`` is swapped out in one step and deleted."""
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
    else:
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "previous")
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old / "previous", target)  # put the previous folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)


def save(model: nn.Module, folder: str | os.PathLike, tokenizer=None, record: Optional[dict] = None,
         overwrite: bool = False, generator: Optional[nn.Module] = None) -> Path:
    """Export ``model`` (and the KV-cache ``generator`` program, if given) and write the folder atomically.

    ``fxslice.json`` holds the model's :class:`~fxslice.result.SliceResult` record (when it has one),
    updated by ``record``. With ``overwrite`` only an empty folder or one fxslice saved is replaced; a
    save that fails or is killed leaves the previous folder as it was."""
    from .. import __version__

    _check_save_inputs(model, tokenizer, record, generator)
    target = Path(folder)
    check_destination(target, overwrite)
    result = getattr(model, "fxslice", None)
    record = {**(result.to_record() if result is not None else {}), **(record or {})}
    vocab = int(record["vocab_size"]) if record.get("vocab_size") else vocab_size_of(model)
    programs = {PROGRAM: export_program(model, vocab)}
    if generator is not None:
        programs[GENERATOR] = export_generator(generator)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_folder(target)
    try:
        weights = write_weights(staging, programs)
        for name, program in programs.items():
            torch.export.save(program, staging / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        full = {
            **record,  # the reserved keys below win over a copied record (e.g. a fine-tuned folder's)
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fxslice_version": __version__,
            "torch_version": torch.__version__,
            "vocab_size": vocab,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "program_sha256": sha256(staging / PROGRAM),
            "weights": weights,
        }
        full.pop("generator", None)
        full.pop("compiled", None)  # packages belong to the programs they were compiled from
        if generator is not None:
            full["generator"] = {"max_cache_len": generator.max_cache_len, "batch_size": generator.cache_batch_size,
                                 "program_sha256": sha256(staging / GENERATOR)}
        (staging / RECORD).write_text(json.dumps(full, indent=2, default=str))
        check_destination(target, overwrite)  # nothing else appeared there meanwhile
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
        from .generate import generate

        if self.generator is None:
            raise FxSliceError("this folder has no generate.pt2 (saved without a KV-cache program)")
        return generate(self.generator, input_ids, max_new_tokens, **options)

    @property
    def compiled(self) -> bool:
        """Whether the programs are the folder's AOTInductor package (``fxslice compile``)."""
        return isinstance(self.program, CompiledProgram)

    def forward(self, input_ids: torch.Tensor):
        return causal_lm_output(self.program(input_ids))

    def train(self, mode: bool = True) -> "LoadedModel":
        """The program was captured in eval mode and has no train/eval switch (torch refuses one)."""
        self.training = mode
        return self


REQUIRED = {"vocab_size": int, "program_sha256": str}


def read_record(folder: str | os.PathLike) -> dict:
    """``fxslice.json`` of a saved folder, checked: format, version and the keys loading needs."""
    path = Path(folder)
    if not path.is_dir():
        raise FxSliceError(f"{path} is not a folder saved by fxslice")
    record_path = path / RECORD
    if not record_path.is_file():
        raise FxSliceError(f"{path} has no {RECORD}: not a folder saved by fxslice.save")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FxSliceError(f"{record_path} is corrupted: {exc}") from exc
    if not isinstance(record, dict):
        raise FxSliceError(f"{record_path} is corrupted: expected a JSON object, found a {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise FxSliceError(f"{record_path} describes format {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise FxSliceError(
            f"{record_path} has format version {record.get('format_version')}, this fxslice reads {FORMAT_VERSION}"
        )
    for key, kind in REQUIRED.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise FxSliceError(f"{record_path} is corrupted: '{key}' is missing or not a {kind.__name__}")
    check_index(record.get("weights"), str(record_path))
    generator = record.get("generator")
    if generator is not None and not (isinstance(generator, dict) and isinstance(generator.get("max_cache_len"), int)
                                      and isinstance(generator.get("program_sha256"), str)):
        raise FxSliceError(f"{record_path} is corrupted: 'generator' lacks max_cache_len or program_sha256")
    return record


def _load_program(path: Path, checksum: Optional[str], weights: dict, tensors: dict) -> nn.Module:
    if sha256(path) != checksum:
        raise FxSliceError(f"{path} does not match the checksum in {RECORD}: the file is corrupted or was replaced")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise FxSliceError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    fill_weights(program, weights["programs"].get(path.name), tensors, path)
    return program.module()


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", with_tokenizer: bool = True,
         compiled: Optional[bool] = None):
    """Load a saved sliced model: returns ``(model, tokenizer)`` (tokenizer None when absent or not wanted).

    ``compiled``: None uses the folder's AOTInductor package for ``device`` when it has one
    (``fxslice compile``), True requires it, False loads the exported programs."""
    path = Path(folder)
    record = read_record(path)
    device = torch.device(device)
    program_path = path / PROGRAM
    if not program_path.is_file():
        raise FxSliceError(f"{path} has no {PROGRAM}")
    tensors = read_weights(path, record["weights"])
    entry = compiled_entry(path, record, device.type, required=compiled is True) if compiled is not False else None
    info = record.get("generator") or {}
    if entry is not None:
        models = load_compiled(path, record, entry, device, tensors)
        program, generator = models[PREFILL], models.get(DECODE)
    else:
        program = _load_program(program_path, record.get("program_sha256"), record["weights"], tensors)
        generator = None
        if (path / GENERATOR).is_file():
            generator = _load_program(path / GENERATOR, info.get("program_sha256"), record["weights"], tensors)
    if generator is not None:
        generator.max_cache_len, generator.cache_batch_size = info.get("max_cache_len"), info.get("batch_size", 1)
    model = LoadedModel(program, record, generator).to(device)
    tokenizer = None
    if with_tokenizer and (path / "tokenizer_config.json").exists():
        from ..hf import load_tokenizer

        tokenizer = load_tokenizer(path)
        if len(tokenizer) > record["vocab_size"]:
            raise FxSliceError(
                f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary is {record['vocab_size']}"
            )
    return model, tokenizer
