"""A saved folder's weights: stored once, in safetensors files, for every program of the folder.

The programs (``model.pt2``, ``generate.pt2``) are saved with their parameters and buffers replaced
by ``meta`` tensors; the values live in ``weights.safetensors`` (and ``weights/*.safetensors``, the
offload files of a streamed compression, copied), and ``fxslice.json`` maps each
program's state-dict names to keys of those files. A tensor the two programs share (the KV-cache
program receives the sliced model's weights) is stored once; so is one that is equal under both
programs' names; an all-zero buffer (a static KV cache) is recorded by shape only. Weights that
are memory-mapped from fxslice's offload files (a streamed checkpoint; the graph's
:class:`~fxslice.graph.store.OffloadFiles` knows which) are written by copying those files, never
read through memory.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import FxSliceError, dtype_named, whole
from ..graph.store import OffloadFiles
from ..graph.weights import meta_parameter
from ..hf import STATIC_CACHE_PREFIX

REST = "weights.safetensors"  # the weights held in memory
SHARDS = "weights"  # a folder of the offload files of a streamed compression, one per finished block
ALIGNMENT = 64  # bytes: a cache line, what the widest vector load needs


def _identity(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    return meta_parameter(tensor) if isinstance(tensor, nn.Parameter) else torch.empty_like(tensor, device="meta")


def write_weights(folder: Path, programs: dict[str, torch.export.ExportedProgram],
                  offload_files: Optional[OffloadFiles] = None) -> dict:
    """Write the state of ``programs`` (file name -> program; the first one names the shared weights)
    into ``folder`` once and leave the programs with meta tensors; a tensor ``offload_files`` says is
    mapped from an offload file is stored by copying that file. Returns the index for ``fxslice.json``:
    ``{"programs": {file: {state name: key}}, "weight_map": {key: weight file}}``."""
    backing = offload_files.backing if offload_files is not None else _no_backing
    keys: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    buffers: set[str] = set()  # keys of buffers (a static KV cache may be all zeros; weights are never read)
    mapping: dict[str, dict[str, str]] = {label: {} for label in programs}
    first = next(iter(programs))
    for label, program in programs.items():
        prefix = "" if label == first else f"{Path(label).stem}."
        for name, tensor in list(program.state_dict.items()):
            key = keys.get(_identity(tensor))
            if key is None and label != first:  # a copy of a sliced-model weight under the cache program's name
                twin = tensors.get(name[len(STATIC_CACHE_PREFIX):] if name.startswith(STATIC_CACHE_PREFIX) else name)
                if twin is not None and twin.shape == tensor.shape and twin.dtype == tensor.dtype \
                        and torch.equal(twin, tensor.to(twin.device)):
                    key = name[len(STATIC_CACHE_PREFIX):] if name.startswith(STATIC_CACHE_PREFIX) else name
            if key is None:
                key = prefix + name
                tensors[key] = tensor
                keys[_identity(tensor)] = key
                if name in program.graph_signature.buffers:
                    buffers.add(key)
            mapping[label][name] = key
            program.state_dict[name] = _meta_like(tensor)
    zeros = {key: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
             for key, t in tensors.items() if key in buffers and backing(t) is None and _all_zero(t)}
    weight_map = _copy_offload_files(folder, tensors, backing)
    rest = {key: t.detach().cpu().contiguous() for key, t in tensors.items() if key not in weight_map
            and key not in zeros}
    if rest:
        from safetensors.torch import save_file

        save_file(rest, str(folder / REST), metadata={"format": "pt"})
        weight_map.update({key: REST for key in rest})
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
             for name in sorted(set(weight_map.values()))}
    return {"programs": mapping, "weight_map": weight_map, "zeros": zeros, "files": files}


def sha256(path: Path) -> str:
    """The file's SHA-256, read through the page cache in blocks (not mapped: no resident copy)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _all_zero(tensor: torch.Tensor) -> bool:
    """An empty buffer (a static KV cache): recorded by shape, not stored."""
    return not tensor.is_meta and tensor.numel() > 0 and not bool(tensor.detach().any())


def _no_backing(tensor: torch.Tensor) -> None:
    """No offload file maps ``tensor`` (a graph without offload files)."""
    return None


def _copy_offload_files(folder: Path, tensors: dict[str, torch.Tensor],
                        backing: Callable[[torch.Tensor], Optional[tuple[Path, str]]]) -> dict[str, str]:
    """Copy (kernel-side, not through this process's memory) every offload file whose tensors are all
    wanted here under the names they have there (``backing(tensor)``: the file and key it maps, or None)."""
    from safetensors import safe_open

    by_file: dict[Path, set[str]] = {}
    for key, tensor in tensors.items():
        mapped = backing(tensor)
        if mapped is not None and mapped[1] == key:
            by_file.setdefault(mapped[0], set()).add(key)
    weight_map: dict[str, str] = {}
    for number, (path, wanted) in enumerate(sorted(by_file.items())):
        with safe_open(str(path), framework="pt") as handle:
            if set(handle.keys()) != wanted:
                continue
        name = f"{SHARDS}/{number:05d}.safetensors"
        (folder / SHARDS).mkdir(exist_ok=True)
        shutil.copyfile(path, folder / name)
        weight_map.update({key: name for key in wanted})
    return weight_map


def inside(folder: Path, name: object, field: str) -> Path:
    """The file ``name`` that ``fxslice.json`` names in ``field``, refused unless it is a relative path
    that stays inside ``folder`` (no ``..``, no absolute path, no link out) — before anything is opened."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FxSliceError(f"{folder / 'fxslice.json'} is corrupted: {field} names {name!r}, not a file name")
    relative = Path(name)
    root = folder.resolve()
    if relative.is_absolute() or ".." in relative.parts or not (root / relative).resolve().is_relative_to(root):
        raise FxSliceError(f"{folder / 'fxslice.json'}: {field} names '{name}', outside the folder; "
                           "refusing to follow it")
    return folder / relative


def check_index(index: object, where: str) -> None:
    """Refuse a ``weights`` entry of ``fxslice.json`` that loading could not follow, naming the field:
    ``programs`` (file -> state name -> stored key), ``weight_map`` (stored key -> file, followed only
    by :func:`inside`), ``zeros`` (key -> shape and dtype) and ``files`` (file -> bytes and sha256)."""
    ok = isinstance(index, dict) and isinstance(index.get("programs"), dict) and isinstance(index.get("weight_map"), dict)
    if not ok:
        raise FxSliceError(f"{where} is corrupted: 'weights' lacks programs or weight_map")
    for label, names in index["programs"].items():
        if not isinstance(names, dict) or not all(isinstance(key, str) for key in names.values()):
            raise FxSliceError(f"{where} is corrupted: weights.programs['{label}'] is not a map of state names to "
                               "stored keys")
    zeros, files = index.get("zeros") or {}, index.get("files") or {}
    for field in ("zeros", "files"):
        value = index.get(field)
        if value is not None and not isinstance(value, dict):
            raise FxSliceError(f"{where} is corrupted: weights.{field} is a {type(value).__name__}, not an object")
    for key, spec in zeros.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if dtype_named(spec.get("dtype") if isinstance(spec, dict) else None) is None or not isinstance(shape, list) \
                or not all(whole(size) and size >= 0 for size in shape):
            raise FxSliceError(f"{where} is corrupted: weights.zeros['{key}'] has no valid shape (sizes >= 0) and "
                               f"dtype (a torch dtype name), got {spec!r}")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and whole(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
            raise FxSliceError(f"{where} is corrupted: weights.files['{name}'] lacks bytes (an integer) or sha256 "
                               f"(a string), got {entry!r}")


def read_weights(folder: Path, index: dict) -> dict[str, torch.Tensor]:
    """Every stored tensor by key, memory-mapped (copy-on-write: the files are never written)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    check_index(index, str(folder / "fxslice.json"))
    for key, spec in (index.get("zeros") or {}).items():
        try:
            out[key] = torch.zeros(spec["shape"], dtype=dtype_named(spec["dtype"]))
        except (RuntimeError, MemoryError) as exc:  # a shape no memory holds
            raise FxSliceError(f"{folder / 'fxslice.json'} is corrupted: weights.zeros['{key}'] has shape "
                               f"{spec['shape']}, which cannot be allocated ({type(exc).__name__})") from exc
    by_file: dict[str, list[str]] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, []).append(key)
    paths = {name: inside(folder, name, f"weights.weight_map['{keys[0]}']") for name, keys in by_file.items()}
    for name, keys in by_file.items():
        path = paths[name]
        if not path.is_file():
            raise FxSliceError(f"{path} is missing (listed in the folder's fxslice.json)")
        expected = (index.get("files") or {}).get(name, {})
        if path.stat().st_size != expected.get("bytes") or sha256(path) != expected.get("sha256"):
            raise FxSliceError(f"{path} does not match the size and checksum in fxslice.json: the file is "
                               "corrupted or was replaced")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in keys:
                    out[key] = aligned(handle.get_tensor(key))
        except Exception as exc:  # truncated or foreign file: one message naming it
            raise FxSliceError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    return out


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it where it holds integers at an address that is not a multiple of
    :data:`ALIGNMENT`: ATen's weight-only kernels (pass 8) read their int8/int4 weights with aligned
    vector loads and crash on a tensor mapped at an 8-byte offset of a safetensors file."""
    if tensor.is_floating_point() or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return tensor.clone()


def fill_weights(program: torch.export.ExportedProgram, names: Optional[dict], tensors: dict[str, torch.Tensor],
                 where: Path) -> None:
    """Put the stored values back into ``program``'s state dict (saved with meta tensors). A key
    read by several programs gives them one Parameter (``tensors`` is updated with it), so that
    moving the loaded model moves each weight once."""
    for name, placeholder in list(program.state_dict.items()):
        key = (names or {}).get(name)
        if key is None or key not in tensors:
            raise FxSliceError(f"{where}: no stored weight for '{name}' of the program")
        value = tensors[key]
        if tuple(value.shape) != tuple(placeholder.shape) or value.dtype != placeholder.dtype:
            raise FxSliceError(f"{where}: stored weight '{key}' is {list(value.shape)} {value.dtype}, the program "
                               f"expects {list(placeholder.shape)} {placeholder.dtype}")
        if isinstance(placeholder, nn.Parameter) and not isinstance(value, nn.Parameter):
            value = tensors[key] = nn.Parameter(value, requires_grad=False)
        program.state_dict[name] = value
