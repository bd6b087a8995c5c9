"""Hugging Face checkpoints read tensor by tensor: a model larger than memory is never loaded whole.

A checkpoint is a folder with ``config.json`` and safetensors weights (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``), or a hub id fetched into the local cache. It
is checked before any work: every shard must exist and be as long as its header says. The model
is then built from its config with every parameter *unallocated* (``accelerate``'s empty-weights
init, then untouched ``torch.empty`` storage: address space, no resident memory) so that
``torch.export`` can trace it on real devices; tensors are read from the memory-mapped shards only
when a pass asks for them. The checkpoint is only ever opened for reading.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .errors import FxSliceError, dtype_named, whole

if TYPE_CHECKING:
    from .graph.store import Source, StreamedWeights

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers over 100 MB as well
ALWAYS_IGNORED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
"""Tensors older exports stored that from_pretrained drops whatever the model class declares (buffers
it recomputes)."""


@dataclass(frozen=True)
class Converted:
    """A model parameter transformers builds on load from several checkpoint tensors (per-expert
    weights stacked into one grouped ``[E, out, in]`` tensor, gate and up projections concatenated):
    ``sources`` lists, per source pattern of ``converter`` (a ``WeightConverter``), its tensors in
    expert order; :meth:`Checkpoint.read` applies the converter's own operations to them."""

    target: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    converter: object = field(compare=False, hash=False, repr=False)

    @property
    def keys(self) -> list[str]:
        return [key for _, keys in self.sources for key in keys]

    def __str__(self) -> str:
        keys = self.keys
        return f"{self.target} (converted from {len(keys)} tensors: {keys[0]}, ...)"

    def build(self, values: dict[str, torch.Tensor], config) -> torch.Tensor:
        tensors = {pattern: [values[key] for key in keys] for pattern, keys in self.sources}
        converter = self.converter
        for operation in converter.operations:
            try:
                tensors = operation.convert(tensors, source_patterns=converter.source_patterns,
                                            target_patterns=converter.target_patterns, full_layer_name=self.target,
                                            model=None, config=config)
            except Exception as exc:  # noqa: BLE001 — mismatched expert tensors, an operation that needs the model
                raise FxSliceError(f"cannot build {self} with transformers' {type(operation).__name__}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        if len(tensors) != 1:
            raise FxSliceError(f"transformers' conversion of {self} gave {len(tensors)} tensors, expected one")
        return next(iter(tensors.values()))


@dataclass
class Checkpoint:
    """A validated safetensors checkpoint: which file holds each tensor, and its config."""

    folder: Path
    config: object  # transformers.PretrainedConfig
    files: dict[str, Path]  # tensor name -> shard
    nbytes: int  # bytes of all shards

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Check ``path`` (a local folder, or a hub id when a hub is reachable) and read its config."""
        folder = Path(path)
        if not folder.is_dir():
            folder = _download(str(path))
        if not (folder / "config.json").is_file():
            raise FxSliceError(f"checkpoint {folder}: no config.json")
        check_config_file(folder / "config.json")
        files = _tensor_files(folder)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 — whatever transformers raises on a config it cannot build
            raise FxSliceError(f"checkpoint {folder}: cannot read config.json: {type(exc).__name__}: {exc}") from exc
        nbytes = sum(p.stat().st_size for p in set(files.values()))
        return cls(folder, config, files, nbytes)

    def read(self, names: list, dtype: Optional[torch.dtype] = None) -> dict:
        """The tensors ``names`` (tensor names, or :class:`Converted` parameters) as fresh CPU tensors (in
        ``dtype`` when given). Each shard is mapped only while its tensors are copied out, so reading
        never leaves the file resident."""
        converted = [name for name in names if isinstance(name, Converted)]
        out = self._read_tensors([name for name in names if not isinstance(name, Converted)], dtype)
        for parameter in converted:
            out[parameter] = parameter.build(self._read_tensors(parameter.keys, dtype), self.config)
        return out

    def _read_tensors(self, names: list[str], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise FxSliceError(f"checkpoint {self.folder} has no tensor '{name}'")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for key in keys:
                        tensor = handle.get_tensor(key)
                        out[key] = tensor.to(dtype=dtype or tensor.dtype, copy=True)
            except Exception as exc:  # noqa: BLE001 — a shard changed or damaged since it was checked
                raise FxSliceError(f"cannot read checkpoint shard {file}: {type(exc).__name__}: {exc}") from exc
        return out

    def empty_model(self, dtype: torch.dtype) -> tuple[nn.Module, dict[int, str]]:
        """The model of this config with unallocated parameters (buffers real) and, for each parameter
        storage, the checkpoint tensor holding its values (``untyped_storage().data_ptr() -> name``).
        Parameters of one dimension or less (norm scales, biases) and persistent buffers are read now."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        except (ValueError, KeyError, ImportError) as exc:
            raise FxSliceError(f"checkpoint {self.folder}: transformers cannot build a causal LM from its config: "
                               f"{exc}") from exc
        model.eval()
        model.tie_weights()  # the empty-weights init leaves declared ties (a head sharing the embedding) undone
        storage: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in storage:
                    storage[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
                module._parameters[name] = storage[id(param)]
        names = self.model_keys(model)
        sources: dict[int, str] = {}
        small: dict[str, nn.Parameter] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = names.get(name)
            ptr = param.untyped_storage().data_ptr()
            if key is not None:
                sources.setdefault(ptr, key)
                if param.dim() <= 1:
                    small[key] = param
        for name, param in model.named_parameters():
            if param.untyped_storage().data_ptr() not in sources:
                raise FxSliceError(f"checkpoint {self.folder} has no tensor for parameter '{name}' "
                                   f"{list(param.shape)} (shards: {sorted({p.name for p in self.files.values()})})")
        self._check_all_used(model, names)
        values = self.read(list(small), dtype)
        with torch.no_grad():
            for key, param in small.items():
                _check_shape(self, key, values[key], param.shape)
                param.copy_(values[key])
            persistent = {names[n]: n for n, _ in model.named_buffers() if n in names}
            for key, value in self.read(list(persistent)).items():
                buffer = model.get_buffer(persistent[key])
                _check_shape(self, key, value, buffer.shape)
                buffer.copy_(value)
        return model, sources

    def _check_all_used(self, model: nn.Module, names: dict[str, str]) -> None:
        """Refuse tensors of the checkpoint that no parameter or buffer of the config's model reads (a
        config with fewer layers than the shards hold would silently drop them), except those the
        model class declares ignorable (``_keys_to_ignore_on_load_unexpected``, as ``from_pretrained``)."""
        import re

        state = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        state |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
        used = {part for name, key in names.items() if name in state
                for part in (key.keys if isinstance(key, Converted) else [key])}
        patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []) + list(ALWAYS_IGNORED)
        ignored = [re.compile(pattern) for pattern in patterns]
        unused = sorted(key for key in self.files if key not in used and not any(p.search(key) for p in ignored))
        if unused:
            shown = ", ".join(f"'{key}'" for key in unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise FxSliceError(f"checkpoint {self.folder} holds {len(unused)} tensor(s) that the model config.json "
                               f"describes ({type(model).__name__}) has no parameter for: {shown}; does config.json "
                               "match the shards (e.g. its number of layers)?")

    def model_keys(self, model: nn.Module) -> dict:
        """model state-dict name -> checkpoint tensor name, through transformers' own key renamings
        (e.g. a GPT-NeoX checkpoint's ``embed_out`` is the model's ``lm_head``); or the
        :class:`Converted` tensors a parameter is built from (per-expert weights merged on load)."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
        except ImportError:  # an older transformers: checkpoint names are the model's
            return {name: name for name in self.files}
        try:
            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
            state = model.state_dict()
            renamed = {key: rename_source_key(key, renamings, converters, model.base_model_prefix, state)
                       for key in self.files}
        except Exception as exc:  # transformers' loading internals changed under us
            raise FxSliceError(f"checkpoint {self.folder}: cannot map its tensor names to {type(model).__name__}'s "
                               f"with this transformers version ({type(exc).__name__}: {exc})") from exc
        names: dict = {}
        merged: dict[str, tuple[object, dict[str, list[str]]]] = {}  # target -> (converter, pattern -> keys)
        for key, (name, pattern) in renamed.items():
            if pattern is None:
                names[name] = key
                continue
            converter = next((c for c in converters if pattern in c.source_patterns), None)
            if converter is None or len(converter.target_patterns) != 1:  # a split into several parameters
                raise FxSliceError(f"checkpoint {self.folder}: tensor '{key}' must be converted by transformers on "
                                   f"load ({pattern}) in a way fxslice cannot follow; load the model and pass it "
                                   "to compress() instead")
            merged.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)
        for name, (converter, by_pattern) in merged.items():
            sources = tuple((pattern, tuple(sorted(by_pattern[pattern], key=dot_natural_key)))
                            for pattern in converter.source_patterns if pattern in by_pattern)
            names[name] = Converted(name, sources, converter)
        return names


def _check_shape(checkpoint: Checkpoint, key: str, value: torch.Tensor, shape) -> None:
    if tuple(value.shape) != tuple(shape):
        raise FxSliceError(f"checkpoint {checkpoint.folder}: tensor '{key}' has shape {list(value.shape)}, "
                           f"the config's model expects {list(shape)}")


def is_checkpoint(model) -> bool:
    """A path or hub id (what :meth:`Checkpoint.open` takes) rather than a module."""
    return isinstance(model, (str, os.PathLike))


def _download(name: str) -> Path:
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")):  # not an owner/name hub id
        raise FxSliceError(f"model '{name}' is neither a torch.nn.Module nor a checkpoint folder (no such folder)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown id, no access: one message
        raise FxSliceError(f"'{name}' is neither a local checkpoint folder nor a reachable hub model: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> shard, every shard present and as long as its header says."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FxSliceError(f"checkpoint index {index} is not a safetensors index ({exc})") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) and shard for shard in weight_map.values()):
            raise FxSliceError(f"checkpoint index {index}: 'weight_map' must map tensor names to shard file names, "
                               f"got {type(weight_map).__name__}" + (" with values that are not file names"
                                                                     if isinstance(weight_map, dict) else ""))
        files = {name: folder / shard for name, shard in weight_map.items()}
    elif (folder / SINGLE).is_file():
        files = None
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(found)}: save it with save_pretrained(..., safe_serialization=True))" if found else ""
        raise FxSliceError(f"checkpoint {folder} has no {SINGLE} and no {INDEX}{hint}")
    headers = {}
    for shard in sorted(set(files.values()) if files else {folder / SINGLE}):
        if not shard.is_file():
            raise FxSliceError(f"checkpoint shard {shard} is missing (listed in {INDEX})")
        headers[shard] = _header(shard)
    if files is None:
        return {name: folder / SINGLE for name in headers[folder / SINGLE]}
    for name, shard in files.items():
        if name not in headers[shard]:
            raise FxSliceError(f"checkpoint shard {shard} does not hold tensor '{name}' that {INDEX} places there")
    return files


def _header(shard: Path) -> dict:
    """The tensor entries of a safetensors file; a clear error when the file is shorter than they need."""
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise FxSliceError(f"checkpoint shard {shard} is truncated ({size} bytes, no safetensors header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(HEADER_LIMIT, size - 8):
            raise FxSliceError(f"checkpoint shard {shard} is truncated or not a safetensors file "
                               f"(header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise FxSliceError(f"checkpoint shard {shard} has an unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise FxSliceError(f"checkpoint shard {shard}: its safetensors header is a JSON {type(header).__name__}, "
                           "not an object of tensor entries")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FxSliceError(f"checkpoint shard {shard}: its safetensors '__metadata__' is not an object of strings")
    for name, entry in header.items():
        _check_entry(shard, name, entry)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise FxSliceError(f"checkpoint shard {shard} is truncated: {size} bytes, its header needs {8 + length + end}")
    return header


def _check_entry(shard: Path, name: str, entry: object) -> None:
    """A safetensors header entry: ``dtype`` torch can read, ``shape`` of sizes >= 0, and
    ``data_offsets`` [begin, end] spanning exactly the bytes of that shape."""
    from safetensors import torch as safetensors_torch

    where = f"checkpoint shard {shard}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise FxSliceError(f"{where} has a header entry that is a JSON {type(entry).__name__}, not an object")
    known = getattr(safetensors_torch, "_TYPES", None)  # safetensors' dtype names -> torch dtypes
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or (known is not None and dtype not in known):
        raise FxSliceError(f"{where} has dtype {dtype!r}, which torch cannot read"
                           + (f" (known: {', '.join(sorted(known))})" if known else ""))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(whole(size) and size >= 0 for size in shape):
        raise FxSliceError(f"{where} has shape {shape!r}, not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise FxSliceError(f"{where} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
                           if "data_offsets" in entry else f"{where} has no data_offsets")
    if known is not None:
        nbytes = math.prod(shape) * known[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FxSliceError(f"{where} spans {offsets[1] - offsets[0]} bytes, its shape {shape} in {dtype} "
                               f"needs {nbytes}")


def check_config_file(path: Path) -> None:
    """``config.json`` is a JSON object whose dtype fields (``dtype``, ``torch_dtype``) name a torch dtype:
    transformers would fail on them with an ``AttributeError`` that names neither the file nor the field."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FxSliceError(f"checkpoint {path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise FxSliceError(f"checkpoint {path} is a JSON {type(config).__name__}, not an object")
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and value != "auto" and dtype_named(value) is None:
            raise FxSliceError(f"checkpoint {path}: '{key}' is {value!r}, not a torch dtype (e.g. 'bfloat16', "
                               "'float16', 'float32')")


def checkpoint_weights(gm: nn.Module, checkpoint: Checkpoint, storage_keys: dict[int, str], dtype: torch.dtype,
                       device: torch.device, offload: Optional[Path]) -> "StreamedWeights":
    """The weight store of a graph captured from :meth:`Checkpoint.empty_model`: each Linear and
    Embedding reads its parameters from the checkpoint when fetched (the same view of the stored
    tensor the graph took, e.g. a GPT-2 ``Conv1D`` weight transposed); every other unread tensor
    of the graph is read now."""
    from .graph.store import StreamedWeights, held, managed_modules

    managed = managed_modules(gm)
    sources: dict[str, dict[str, Source]] = {}
    for name in managed:
        sources[name] = {}
        for pname, param in gm.get_submodule(name).named_parameters(recurse=False):
            key = storage_keys.get(param.untyped_storage().data_ptr())
            sources[name][pname] = held(param.detach()) if key is None else tensor_source(checkpoint, param, key, dtype)
    read_unmanaged(gm, checkpoint, storage_keys, dtype)
    return StreamedWeights(gm, sources, device, dtype, offload)


def tensor_source(checkpoint: Checkpoint, param: torch.Tensor, key: str, dtype: torch.dtype) -> "Source":
    """How to read ``param`` (a view of an unallocated model parameter, e.g. a ``Conv1D`` weight
    transposed) from the checkpoint tensor ``key``: the same view of the stored values."""
    from .graph.store import Source

    shape, stride, offset = tuple(param.shape), tuple(param.stride()), param.storage_offset()
    elements = param.untyped_storage().nbytes() // param.element_size()

    def read() -> torch.Tensor:
        base = checkpoint.read([key], dtype)[key]
        if base.numel() != elements:
            raise FxSliceError(f"checkpoint {checkpoint.folder}: tensor '{key}' has shape {list(base.shape)}, "
                               f"the config's model expects {elements} values")
        return base.as_strided(shape, stride, offset).contiguous()
    return Source(read, param.numel() * param.element_size())


def read_unmanaged(gm: nn.Module, checkpoint: Checkpoint, storage_keys: dict[int, str], dtype: torch.dtype) -> None:
    """Read now every parameter of ``gm`` outside its Linear and Embedding modules that is still
    unallocated (a parameter of two or more dimensions used by some other op)."""
    from .graph.store import managed_modules

    skip = set(managed_modules(gm))
    for path, module in gm.named_modules():
        if path in skip:
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            key = storage_keys.get(param.untyped_storage().data_ptr())
            if key is not None:
                value = tensor_source(checkpoint, param, key, dtype).read()
                setattr(module, pname, nn.Parameter(value, requires_grad=False))
