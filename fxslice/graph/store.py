"""Where the weights of a graph's ``nn.Linear`` / ``nn.Embedding`` modules are while the passes edit them.

The fuse and rotate passes never touch a weight directly: they hand an *edit* (a function of the
module) to the graph's weight store.

- :class:`Weights` (a model in memory, computed where it is): edits apply at once.
- :class:`SkeletonWeights` (a graph whose weights are all replaced afterwards): edits are dropped.
- :class:`StreamedWeights` (a checkpoint read tensor by tensor, or a model calibrated on another
  device): a module's parameters are on the ``meta`` device until the segment that runs it is
  fetched; edits for an absent module wait in its queue and are replayed, in order, when it is
  loaded. A module whose positions are all rotated is finished: moved home (the CPU, or the
  model's device), or written to the offload folder (one per compression) and memory-mapped from
  there from then on (:class:`OffloadFiles` records which parameters map which file, so that a
  save copies the files). At most one block's dense weights are ever
  resident, plus the finished ones (at their sliced size) unless they are offloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import FxSliceError
from .modules import WEIGHTED
from .weights import meta_parameter, new_linear, share_embedding

Make = Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]  # builds (weight, bias) in float64


def managed_modules(gm: nn.Module) -> list[str]:
    """The modules whose weights a store manages: every Linear (experts' too) and Embedding."""
    return [name for name, m in gm.named_modules() if isinstance(m, WEIGHTED)]


class Weights:
    """Every module in memory where it computes: edits apply at once."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        first = next((p for p in gm.parameters() if p.is_floating_point()), None)
        self.like = torch.empty(0, dtype=first.dtype if first is not None else torch.float32,
                                device=first.device if first is not None else "cpu")
        self.home = self.like.device  # where finished weights live

    @property
    def device(self) -> torch.device:
        """Where calibration computes."""
        return self.like.device


    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(name)

    def edit(self, name: str, fn: Callable, *args) -> None:
        """``fn(module, *args)`` on module ``name`` (its weights replaced, never written in place)."""
        fn(self.module(name), *args)

    def add_linear(self, name: str, out_features: int, in_features: int, bias: bool, make: Make) -> nn.Linear:
        """A new Linear for the graph (not installed): ``make()`` gives its float64 weight and bias."""
        weight, b = make()
        return new_linear(weight, b, self.like)

    def meta_linear(self, out_features: int, in_features: int, bias: bool) -> nn.Linear:
        """A Linear of the graph's dtype whose weights are not there yet (on the meta device)."""
        return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=self.like.dtype)

    def tie(self, embedding: str, head: str) -> None:
        """The embedding reads the head's weight itself from now on."""
        share_embedding(self.module(embedding), self.module(head).weight)

    def drop(self, name: str) -> None:
        """Module ``name`` left the graph."""

    def manages(self, name: str) -> bool:
        """Whether module ``name``'s weights go through :meth:`fetch` / :meth:`finish`."""
        return False

    def _retie_shared(self) -> None:
        """A parameter the model shared between modules (a tied head no rotation edited) was loaded once
        per module: the copies that are still equal become one parameter again, as in the model."""
        for (first, first_name), *others in self.shared:
            if first not in self.sources or first in self.ties:
                continue
            kept = getattr(self.module(first), first_name)
            for name, pname in others:
                if name in self.sources and name not in self.ties:
                    copy = getattr(self.module(name), pname)
                    if copy is not kept and copy.shape == kept.shape and torch.equal(copy, kept):
                        setattr(self.module(name), pname, kept)

    def check_room(self, group_modules: list[list[str]], activation_bytes: int) -> None:
        """Refuse a device too small for calibration (weights in memory where they compute: nothing to check)."""

    def fetch(self, names: list[str]) -> None:
        """Make modules ``names`` resident on :attr:`device` (before a segment runs them)."""

    def finish(self, names: list[str]) -> None:
        """Modules ``names`` are final until :meth:`finalise` (their positions are all rotated)."""

    def finalise(self) -> None:
        """Every module resident at home, every waiting edit applied, ties restored."""


class SkeletonWeights(Weights):
    """A graph whose Linear/Embedding weights are all replaced afterwards (the KV-cache capture
    receives the sliced model's weights): edits are dropped, added Linears stay on the meta device,
    so that no dense copy is ever made."""

    def edit(self, name: str, fn: Callable, *args) -> None:
        """Dropped: the module's weights are replaced anyway."""

    def add_linear(self, name: str, out_features: int, in_features: int, bias: bool, make: Make) -> nn.Linear:
        """A meta Linear (``make`` is never called)."""
        return self.meta_linear(out_features, in_features, bias)


@dataclass
class Source:
    """How to produce one parameter of an absent module: ``read()`` gives its values (any dtype, CPU)."""

    read: Callable[[], torch.Tensor]
    nbytes: int = 0
    file: Optional[tuple[Path, str]] = None  # (safetensors file, key) when ``read()`` maps it from disk


class OffloadFiles:
    """The parameters a store mapped from its offload files, by address: ``data_ptr -> (file, key,
    shape, dtype)`` (an entry leaves with the parameter it was made for; views such as an exported
    program's state dict share the address). A save copies the files instead of reading the weights
    through memory (:mod:`fxslice.runtime.weightfiles`). Edits that replace a parameter (as every
    fxslice edit does) drop its entry; an in-place write through ``.data`` cannot be seen: save
    before such edits."""

    def __init__(self) -> None:
        self._mapped: dict[int, tuple[Path, str, tuple, torch.dtype]] = {}

    def __reduce__(self):
        """A copy (of a copied or pickled graph, whose parameters are new tensors) maps nothing."""
        return OffloadFiles, ()

    def record(self, param: nn.Parameter, file: tuple[Path, str]) -> None:
        """``param``'s memory is the mapping of ``file`` = (safetensors file, key)."""
        address = param.data_ptr()
        self._mapped[address] = (*file, tuple(param.shape), param.dtype)
        weakref.finalize(param, self._mapped.pop, address, None)

    def backing(self, tensor: torch.Tensor) -> Optional[tuple[Path, str]]:
        """The (file, key) ``tensor`` maps, if it is such a parameter (or shares its address) still holding
        that mapping."""
        entry = self._mapped.get(tensor.data_ptr()) if tensor.numel() else None
        if entry is None or entry[2] != tuple(tensor.shape) or entry[3] != tensor.dtype or not entry[0].exists():
            return None
        return entry[0], entry[1]


def held(tensor: torch.Tensor) -> Source:
    """A tensor already in memory (the caller's model, or a finished module moved home)."""
    return Source(lambda: tensor, tensor.numel() * tensor.element_size())


def offloaded(path: Path, key: str) -> Source:
    """A tensor written to the offload folder."""
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)  # memory-mapped: no second copy while the weights are gathered
    return Source(read, file=(path, key))


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def return_freed_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc ``malloc_trim``): the dense blocks
    freed after rotation would otherwise keep the resident size at its high-water mark."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class StreamedWeights(Weights):
    """Weights brought to ``device`` segment by segment from their sources (see module docstring).

    Args:
        gm: the canonical graph; its managed modules' parameters are replaced by meta tensors.
        sources: module name -> parameter name -> :class:`Source` (every managed module).
        device: where calibration computes; ``home``: where finished weights live (CPU).
        dtype: the model's dtype (every loaded parameter is cast to it).
        offload: a folder for finished modules (None: keep them in memory at ``home``).
    """

    def __init__(self, gm: GraphModule, sources: dict[str, dict[str, Source]], device: torch.device,
                 dtype: torch.dtype, offload: Optional[Path] = None, home: torch.device | str = "cpu"):
        self.gm = gm
        self.like = torch.empty(0, dtype=dtype, device=device)
        self.home = torch.device(home)
        self.offload = offload
        self.sources = sources
        self.pending: dict[str, list[tuple[Callable, tuple]]] = {}
        self.ties: dict[str, str] = {}
        self.absent: set[str] = set()
        self.written: list[Path] = []  # offload files, removed by finalise
        self.offload_files = OffloadFiles()  # which loaded parameters map them; the graph's after finalise
        placeholders: dict[int, nn.Parameter] = {}  # one per parameter: shared (tied) ones stay shared
        users: dict[int, list[tuple[str, str]]] = {}
        for name, params in sources.items():
            module = self.module(name)
            for pname in params:
                param = getattr(module, pname)
                if id(param) not in placeholders:
                    placeholders[id(param)] = meta_parameter(param, dtype)
                setattr(module, pname, placeholders[id(param)])
                users.setdefault(id(param), []).append((name, pname))
            self.absent.add(name)
        self.shared = [group for group in users.values() if len(group) > 1]  # tied parameters: (module, name)

    def edit(self, name: str, fn: Callable, *args) -> None:
        if name in self.absent:
            self.pending.setdefault(name, []).append((fn, args))
        else:
            fn(self.module(name), *args)

    def add_linear(self, name: str, out_features: int, in_features: int, bias: bool, make: Make) -> nn.Linear:
        linear = self.meta_linear(out_features, in_features, bias)
        built: dict[str, torch.Tensor] = {}

        def part(key: str) -> Source:
            def read() -> torch.Tensor:
                if not built:
                    built.update(zip(("weight", "bias"), make()))
                return built.pop(key)
            return Source(read)

        self.sources[name] = {"weight": part("weight")}
        if bias:
            self.sources[name]["bias"] = part("bias")
        self.absent.add(name)
        return linear

    def tie(self, embedding: str, head: str) -> None:
        if embedding not in self.absent and head not in self.absent:
            super().tie(embedding, head)
            return
        self.ties[embedding] = head  # restored by finalise; the embedding's own copy is dropped
        module = self.module(embedding)
        module.weight = meta_parameter(module.weight, self.like.dtype)
        self.absent.discard(embedding)
        self.sources.pop(embedding, None)
        self.pending.pop(embedding, None)

    def manages(self, name: str) -> bool:
        return name in self.sources

    def drop(self, name: str) -> None:
        for table in (self.sources, self.pending, self.ties):
            table.pop(name, None)
        self.absent.discard(name)

    def _load(self, name: str, device: torch.device) -> None:
        module = self.module(name)
        for pname, source in self.sources[name].items():
            read = source.read()
            value = read.to(device=device, dtype=self.like.dtype)
            param = nn.Parameter(value, requires_grad=False)
            if source.file is not None and value is read and param.numel():
                self.offload_files.record(param, source.file)
            setattr(module, pname, param)
        self.absent.discard(name)
        for fn, args in self.pending.pop(name, []):
            fn(module, *args)

    def fetch(self, names: list[str]) -> None:
        for name in names:
            if name in self.ties:
                continue
            if name in self.absent:
                self._load(name, self.like.device)
            else:
                self._move(name, self.like.device)

    def _move(self, name: str, device: torch.device) -> None:
        module = self.module(name)
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                setattr(module, pname, nn.Parameter(param.detach().to(device), requires_grad=False))

    def finish(self, names: list[str]) -> None:
        """Finished modules go home, or into one offload file per call (keys ``<module>.<param>``)."""
        from safetensors.torch import save_file

        names = [n for n in names if n in self.sources and n not in self.absent and n not in self.ties]
        if self.offload is None:
            for name in names:
                self._move(name, self.home)
            return
        if not names:
            return
        path = self.offload / f"weights-{len(self.written):05d}.safetensors"
        tensors = {f"{name}.{pname}": param.detach().contiguous().cpu()
                   for name in names for pname, param in self.module(name).named_parameters(recurse=False)}
        save_file(tensors, str(path))
        self.written.append(path)
        for name in names:
            module = self.module(name)
            params = dict(module.named_parameters(recurse=False))
            self.sources[name] = {k: offloaded(path, f"{name}.{k}") for k in params}
            for pname, param in params.items():
                setattr(module, pname, meta_parameter(param))
            self.absent.add(name)
        del tensors
        return_freed_memory()

    def finalise(self) -> None:
        return_freed_memory()
        for name in list(self.sources):
            if name in self.absent:
                self._load(name, self.home)
            else:
                self._move(name, self.home)
        for embedding, head in self.ties.items():
            share_embedding(self.module(embedding), self.module(head).weight)
        self._retie_shared()
        # the offload files now back the finished weights (memory-mapped): removed with the graph
        weakref.finalize(self.gm, _remove, list(self.written))
        self.written = []
        self.gm.fxslice_offload_files = self.offload_files

    def check_room(self, group_modules: list[list[str]], activation_bytes: int) -> None:
        """Refuse a CUDA device whose free memory cannot hold the largest basis group's weights (fetched
        together: a block, or every block under ``basis="model"``), one module copied to float64 twice
        while it is rotated, and the cached activations (a floor: the statistics of the block rewrites
        come on top), naming what is needed."""
        if self.like.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.like.device)
        sizes = [[s.nbytes for n in names for s in self.sources.get(n, {}).values()] for names in group_modules]
        largest_segment = max((sum(s) for s in sizes), default=0)
        largest_module = max((max(s, default=0) for s in sizes), default=0)
        rotation = 2 * largest_module * 8 // self.like.element_size()
        needed = largest_segment + rotation + activation_bytes
        if needed > free:
            raise FxSliceError(f"device {self.like.device} has {free / 2**30:.2f} GiB free; calibration needs at least "
                               f"{needed / 2**30:.2f} GiB (largest block {largest_segment / 2**30:.2f} GiB, its rotation "
                               f"in float64 {rotation / 2**30:.2f} GiB, cached activations "
                               f"{activation_bytes / 2**30:.2f} GiB): use fewer or shorter calibration batches, "
                               "or device='cpu'")


def memory_weights(gm: GraphModule, device: torch.device, offload: Optional[Path] = None) -> Weights:
    """The weight store of a graph captured from a model in memory: edited in place where the model
    is, or brought segment by segment to another ``device`` (or finished into ``offload``)."""
    store = Weights(gm)
    if store.device == torch.empty(0, device=device).device and offload is None:
        return store
    sources = {name: {p: held(t.detach()) for p, t in gm.get_submodule(name).named_parameters(recurse=False)}
               for name in managed_modules(gm)}
    return StreamedWeights(gm, sources, torch.device(device), store.like.dtype, offload, home=store.device)


def place_unmanaged(gm: GraphModule, device: torch.device) -> None:
    """Move the graph's tensors that no store manages (norm-free parameters, buffers such as rotary
    tables, constants) to ``device``; they are small."""
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0": compared with tensors' devices
    managed = set(managed_modules(gm))
    for path, module in gm.named_modules():
        if path in managed:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device and not param.is_meta:
                setattr(module, name, nn.Parameter(param.detach().to(device), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device != device:
                module.register_buffer(name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set)
        for name, value in list(vars(module).items()):  # constants the capture lifted (plain attributes)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device != device:
                setattr(module, name, value.to(device))
