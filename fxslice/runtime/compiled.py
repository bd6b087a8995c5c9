"""AOTInductor packages of a saved folder: the prefill and decode programs compiled ahead of time.

``compile_folder`` writes ``compiled-<device>.pt2`` beside the exported programs: one AOTInductor
package holding two models named like the programs they are compiled from: ``model`` (the prefill
program ``model.pt2``: dynamic batch and length -> logits; the package's default model, which
``torch._inductor.aoti_load_package`` loads) and ``generate`` (the decode program ``generate.pt2``,
with its static KV cache). They are compiled with
``aot_inductor.package_constants_in_so=False``, so the package holds code only: at load time each
model receives its constants (the weights, the KV cache) from the folder's safetensors files through
``load_constants(..., user_managed=True)`` — the weights stay stored once and memory-mapped, and the
two models share them. ``fxslice.json`` records, per device type: the file, its SHA-256, the torch
version that built it, and for each model the map constant name -> stored key, which is all a
process without fxslice needs (see the README's "Deploy").
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import FxSliceError
from ..tempfolders import private_folder
from .generate import check_token_ids
from .folder import GENERATOR, PROGRAM, RECORD, current_umask, read_record, write_record
from .programs import export_generator, export_program, load_programs, program_file
from .weightfiles import inside, read_weights, sha256

PREFILL, DECODE = "model", "generate"  # model names in the package: "model" is what aoti_load_package loads
PROGRAM_OF = {PREFILL: PROGRAM, DECODE: GENERATOR}
OPTIONS = {"aot_inductor.package_constants_in_so": False, "aot_inductor.package": True}


def package_name(device_type: str) -> str:
    return f"compiled-{device_type}.pt2"


@dataclass
class CompileOutcome:
    """What :func:`compile_folder` did for one device: the package written, or why it was not."""

    device: str
    package: Optional[Path] = None
    seconds: float = 0.0
    failure: Optional[str] = None
    skipped: Optional[str] = None  # why nothing was compiled on purpose (a scheme AOTInductor cannot package)

    @property
    def warning(self) -> str:
        if self.skipped:
            return f"no AOTInductor package for {self.device} ({self.skipped}); the folder uses its exported programs"
        return (f"AOTInductor compilation for {self.device} failed ({self.failure}); the folder keeps using its "
                "exported programs")


def cpp_compiler() -> Optional[str]:
    """The C++ compiler AOTInductor would use (its own search: ``$CXX``, then g++/clang++), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 — inductor raises its own error types when it finds none
        return None


def default_devices() -> list[str]:
    """CPU always, CUDA when this machine has it."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def compile_folder(folder: str | os.PathLike, devices: Optional[list[str]] = None,
                   progress: bool = True) -> list[CompileOutcome]:
    """Compile the saved folder's programs for every device in ``devices`` (default: CPU, and CUDA
    when present). A compilation that fails (no C++ compiler, an op AOTInductor cannot lower) is
    returned as a failed :class:`CompileOutcome` — the folder is left as it was — never raised."""
    path = Path(folder)
    record = read_record(path)  # refuse a folder fxslice did not save before compiling anything
    quantization = record.get("quantization") or {}
    packed_for = quantization.get("packed_for")
    device_types = check_compile_devices(devices or ([packed_for] if packed_for else default_devices()))
    for device_type in device_types:  # all checked first
        if packed_for and device_type != packed_for:
            raise FxSliceError(f"compile: {path} holds weights packed for {packed_for} kernels; it cannot be "
                               f"compiled for {device_type}")
    scheme = quantization.get("scheme")
    if scheme in UNCOMPILABLE_SCHEMES:
        return [CompileOutcome(device_type, skipped=f"scheme {scheme}: {UNCOMPILABLE_SCHEMES[scheme]}")
                for device_type in device_types]
    return [_compile_for(path, device_type, progress) for device_type in device_types]


def check_compile_devices(devices: list[str]) -> list[str]:
    """The device types of ``devices``, each a torch device this machine has (refused otherwise)."""
    return [_device_type(device) for device in devices]


def _device_type(device: str) -> str:
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise FxSliceError(f"compile: '{device}' is not a torch device") from exc
    if device_type not in ("cpu", "cuda"):
        raise FxSliceError(f"compile: AOTInductor packages are built for cpu or cuda, not '{device}'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise FxSliceError("compile: --device cuda asked for, but this torch build or machine has no CUDA device")
    return device_type


UNCOMPILABLE_SCHEMES = {"int4": "AOTInductor lowers the int4 kernel with a group-size constant of its own, which a "
                                "package compiled without its weights cannot be given"}
"""Quantisation schemes (pass 8) whose folders keep their exported programs, and why."""


def _compile_for(folder: Path, device_type: str, progress: bool) -> CompileOutcome:
    started = time.perf_counter()
    outcome = CompileOutcome(device_type)
    staging = private_folder("fxslice-aoti-")
    try:
        with warnings.catch_warnings():  # torch-internal deprecation noise of export and inductor
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                package, constants = _build(folder, device_type, staging, progress)
            except FxSliceError:
                raise
            except Exception as exc:  # noqa: BLE001 — any compiler failure falls back to the exported programs
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                outcome.failure = f"{type(exc).__name__}: {message}"
                return outcome
        target = folder / package.name
        entry = {"file": package.name, "sha256": sha256(package), "torch_version": torch.__version__,
                 "device": device_type, "constants": constants}
        temporary = folder / f".{package.name}.{os.getpid()}.tmp"
        shutil.copyfile(package, temporary)
        temporary.chmod(0o666 & ~current_umask())
        os.replace(temporary, target)
        _update_record(folder, device_type, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outcome.package, outcome.seconds = target, time.perf_counter() - started
    return outcome


def _build(folder: Path, device_type: str, staging: Path, progress: bool) -> tuple[Path, dict]:
    """The folder's programs re-exported on the device and compiled into ``staging``; with the constant
    name -> stored key map of each model."""
    record = read_record(folder)
    program_file(folder)  # refused before any weight is read
    program, generator = load_programs(folder, record, read_weights(folder, record["weights"]))
    programs = {PREFILL: export_program(program.to(device_type), record["vocab_size"])}
    if generator is not None:
        programs[DECODE] = export_generator(generator.to(device_type))
    package = build_package(programs, staging / package_name(device_type), progress)
    constants = {name: _constant_keys(package, name, record["weights"]["programs"][PROGRAM_OF[name]])
                 for name in programs}
    return package, constants


def build_package(programs: dict[str, torch.export.ExportedProgram], package: Path, progress: bool = False) -> Path:
    """Compile every program (name -> exported program with example inputs) with AOTInductor, without its
    constants, into one package file."""
    from torch._inductor.package import package_aoti

    files = {}
    for name, program in programs.items():
        if progress:
            print(f"compiling {name} with AOTInductor ...", flush=True)
        files[name] = _aot_compile(program)
    package_aoti(str(package), files)
    return package


def load_with_own_constants(package: Path, programs: dict[str, torch.export.ExportedProgram]) -> dict[str, "CompiledProgram"]:
    """The package's models, each given the state of the program it was compiled from (buffers such as a
    KV cache copied, so that the compiled model and the program do not share one). For in-process use
    (benchmarks); a saved folder's package takes its constants from the folder (:func:`load_compiled`)."""
    from torch._inductor.package import load_package

    models = {}
    for name, program in programs.items():
        runner = load_package(str(package), name)
        state = {**program.state_dict, **program.constants}
        buffers = set(program.graph_signature.buffers)
        models[name] = CompiledProgram(runner, {fqn: state[fqn].detach().clone() if fqn in buffers else state[fqn].detach()
                                                for fqn in runner.get_constant_fqns()})
    return models


def _aot_compile(program: torch.export.ExportedProgram) -> list:
    """AOTInductor's files for one exported program (what ``aoti_compile_and_package`` packages)."""
    args, kwargs = program.example_inputs
    with torch.no_grad():
        return torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs, options=dict(OPTIONS))


def _constant_keys(package: Path, model_name: str, stored: dict[str, str]) -> dict[str, str]:
    """Constant name of the compiled model -> key of the folder's stored tensor."""
    from torch._inductor.package import load_package

    names = load_package(str(package), model_name).get_constant_fqns()
    missing = [name for name in names if name not in stored]
    if missing:
        raise RuntimeError(f"the compiled {model_name} model needs constants the folder does not store: {missing[:3]}")
    return {name: stored[name] for name in sorted(names)}


def _update_record(folder: Path, device_type: str, entry: dict) -> None:
    """Add ``entry`` under ``compiled[device_type]`` of ``fxslice.json``, replacing the file atomically."""
    record = json.loads((folder / RECORD).read_text())
    record.setdefault("compiled", {})[device_type] = entry
    write_record(folder, record)


class CompiledProgram(nn.Module):
    """One model of an AOTInductor package with its constants handed over (kept alive here as
    non-persistent buffers: the package holds pointers to them, so they may not be moved)."""

    def __init__(self, runner, constants: dict[str, torch.Tensor], vocab_size: Optional[int] = None):
        super().__init__()
        self.runner = runner
        self.vocab_size = vocab_size  # token ids are checked against it before the compiled kernels run
        for number, tensor in enumerate(constants.values()):
            self.register_buffer(f"constant_{number}", tensor, persistent=False)
        runner.load_constants(constants, check_full_update=True, user_managed=True)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Token ids (and cache positions): made int64 and contiguous — compiled kernels index their inputs as
        laid out when traced, so a view such as ``ids[:, :7]`` is copied first."""
        check_token_ids(inputs[0] if inputs else None, self.vocab_size)  # a bad id must never reach a kernel
        device = next(self.buffers()).device
        for tensor in inputs:
            if tensor.device != device:
                raise FxSliceError(f"this compiled program runs on {device}; got an input on {tensor.device}")
        return self.runner(*(tensor.to(torch.long).contiguous() for tensor in inputs))

    def _apply(self, fn, recurse=True):
        for buffer in self.buffers():
            moved = fn(buffer)
            if moved is not buffer and (moved.device != buffer.device or moved.dtype != buffer.dtype):
                raise FxSliceError(f"a compiled program runs on {buffer.device} in {buffer.dtype}; load the folder "
                                   "again for another device (fxslice.load(folder, device=...)) instead of moving it")
        return self


def compiled_entry(folder: Path, record: dict, device_type: str, required: bool = False) -> Optional[dict]:
    """The folder's package for ``device_type`` after checking that it can be loaded here: None where there
    is none (an :class:`FxSliceError` if ``required``); an error where it was built by another torch or
    its file is not the recorded one."""
    entry = (record.get("compiled") or {}).get(device_type)
    if entry is None and required:
        built = ", ".join(sorted(record.get("compiled") or {})) or "none"
        raise FxSliceError(f"{folder} has no package compiled for {device_type} (built: {built}); "
                           f"build one with: fxslice compile {folder} --device {device_type}")
    if entry is None:
        return None
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("constants"), dict)):
        raise FxSliceError(f"{folder / RECORD} is corrupted: 'compiled.{device_type}' lacks file or constants")
    for name, keys in entry["constants"].items():
        if not (isinstance(keys, dict) and all(isinstance(key, str) for key in keys.values())):
            raise FxSliceError(f"{folder / RECORD} is corrupted: compiled.{device_type}.constants['{name}'] is not a "
                               "map of constant names to stored keys")
    if entry.get("device") != device_type:
        raise FxSliceError(f"{folder / entry['file']} was built for {entry.get('device')}, not {device_type}; "
                           f"rebuild it with: fxslice compile {folder} --device {device_type}")
    if entry.get("torch_version") != torch.__version__:
        raise FxSliceError(f"{folder / entry['file']} was built with torch {entry.get('torch_version')}, this is torch "
                           f"{torch.__version__}; rebuild it with: fxslice compile {folder} (or load with compiled=False)")
    path = inside(folder, entry["file"], f"compiled.{device_type}.file")
    if not path.is_file() or sha256(path) != entry.get("sha256"):
        raise FxSliceError(f"{path} is missing or does not match the checksum in fxslice.json; rebuild it with: "
                           f"fxslice compile {folder}")
    return entry


def load_compiled(folder: Path, record: dict, entry: dict, device: torch.device,
                  tensors: Optional[dict[str, torch.Tensor]] = None) -> dict[str, CompiledProgram]:
    """The package's models by name, each with its constants from the folder's weights on ``device``."""
    from torch._inductor.package import load_package

    tensors = tensors if tensors is not None else read_weights(folder, record["weights"])
    on_device: dict[str, torch.Tensor] = {}
    models = {}
    for name, keys in entry["constants"].items():
        try:
            runner = load_package(str(folder / entry["file"]), name)
        except Exception as exc:  # noqa: BLE001 — a package this torch or device cannot load
            raise FxSliceError(f"cannot load {folder / entry['file']} ({name}): {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; rebuild it with: "
                               f"fxslice compile {folder}") from exc
        constants = {}
        for constant, key in keys.items():
            if key not in tensors:
                raise FxSliceError(f"{folder / entry['file']}: constant '{constant}' names stored tensor '{key}', "
                                   "which the folder does not have")
            if key not in on_device:
                value = tensors[key].detach()
                on_device[key] = value.to(device) if value.device != device else value
            constants[constant] = on_device[key]
        models[name] = CompiledProgram(runner, constants, record.get("vocab_size"))
    return models
