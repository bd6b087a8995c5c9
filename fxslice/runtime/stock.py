"""A stock Transformers checkpoint of an unrotated slice: ``from_pretrained`` loads it without fxslice.

A slice made with ``basis="none"`` (``compress(..., stock=True)``) keeps the residual stream in its
own coordinates and at its width ``D``: fuse left the graph as it was (norms with their weights, the
head still tied, no shortcut) and pass 7 removed MLP hidden units only (rows of the MLP's readers,
columns of its refitted writer). So the stock model of the same type computes the same function once
its config says how many units each MLP keeps and its weights are the slice's:

- the config is the original with its MLP widths replaced: every integer attribute whose value is a
  dense MLP width (``intermediate_size``, ``shared_expert_intermediate_size``, …) takes the width
  kept; where the config leaves the width unset (GPT-2's ``n_inner``: derived from the hidden size),
  the attribute that holds it is named in :mod:`patterns.configs`. Shapes decide: other attributes
  are tried one by one when replacing them all does not give the slice's shapes;
- the weights reach the stock model through a capture of it: its canonical graph's Linear and
  Embedding modules are views of the model's parameters (a transposed ``Conv1D``, the halves of a
  fused matrix), so copying the slice's module weights into them writes the parameters in whatever
  layout the model keeps them; every other tensor the graph reads (norm weights, biases, position
  tables) is copied by name, and no parameter may be left unwritten.

The model is then written by ``save_pretrained``, loaded back by ``from_pretrained`` and must
reproduce the slice's logits — otherwise the save is refused and nothing is written. A rotated slice
(PCA basis, shortcuts, a narrower stream) is refused with the option that would make it stock.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import FxSliceError, whole
from ..graph.modules import WEIGHTED
from ..graph.nodes import fetch_attr
from ..hf import model_spec
from ..passes.p1_capture import capture
from ..passes.p2_canonicalise import canonicalise
from ..registry import REGISTRY
from ..version import __version__
from .folder import STOCK_FORMAT, STOCK_RECORD, check_destination, move_into_place, share_files, staging_folder

PROBE = (2, 12)  # batch, length of the probe inputs the stock model must reproduce the slice on


def tolerance(dtype: torch.dtype) -> float:
    """Largest ``max |Δ logits| / max(1, max |logits|)`` accepted between the slice and its stock model."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


# --- what a stock config can express ---------------------------------------------------------------
def check_stock_expressible(result) -> None:
    """Refuse a slice that no stock config expresses, with the reason and the option that would. An
    unrotated slice keeps the stream whole and inserts nothing; a rotated one has shortcuts, folded
    norms and (usually) a narrower stream."""
    if result.slice is None or result.slice.rotate:
        raise FxSliceError(f"the slice rotates the residual stream (basis={result.options.get('basis')!r}): a stock "
                           "Transformers config has no rotation or shortcut on the residual path; compress with "
                           "stock=True (CLI --stock) to cut MLP units of an unrotated stream")


def mlp_widths(result) -> dict[int, int]:
    """Dense MLP width -> width kept, one per dense width (a stock config has one per kind of MLP)."""
    kept: dict[int, set[int]] = {}
    for kept_units, full in result.hidden_widths.values():
        kept.setdefault(full, set()).add(kept_units)
    for full, widths in kept.items():
        if len(widths) > 1:
            raise FxSliceError(f"the MLPs of {full} units keep {sorted(widths)} units in different layers: a stock "
                               "config has one width for them; compress with stock=True (the same fraction "
                               "everywhere, allocation='uniform')")
    return {full: widths.pop() for full, widths in kept.items()}


def integer_attributes(config, value: int, prefix: str = "") -> list[str]:
    """Dotted names of the config's integer attributes (sub-configs included) equal to ``value``."""
    found = []
    for key, item in vars(config).items():
        if key.startswith("_"):
            continue
        if whole(item) and item == value:
            found.append(prefix + key)
        elif hasattr(item, "to_dict") and hasattr(item, "model_type"):  # a nested PretrainedConfig
            found.extend(integer_attributes(item, value, f"{prefix}{key}."))
    return found


def unset_width_attributes(config) -> list[str]:
    """The attributes :mod:`patterns.configs` names that this config has and leaves unset."""
    return [name for name in REGISTRY.width_attributes if hasattr(config, name) and getattr(config, name) is None]


def set_attribute(config, dotted: str, value: int) -> None:
    *owners, last = dotted.split(".")
    for owner in owners:
        config = getattr(config, owner)
    setattr(config, last, value)


def candidate_configs(config, widths: dict[int, int]):
    """``(config, changes)`` to try, most likely first: every attribute holding a dense width
    replaced, then one attribute per width (a coincidence of values replaced nothing it should not)."""
    options = []
    for full, kept in widths.items():
        names = integer_attributes(config, full) or unset_width_attributes(config)
        if not names:
            raise FxSliceError(f"no attribute of the {type(config).__name__} holds the MLP width {full}: the stock "
                               f"config cannot say that it keeps {kept} (name the attribute with "
                               "fxslice.registry.register_width_attribute if the config has one)")
        options.append([(names, kept)] + ([([name], kept) for name in names] if len(names) > 1 else []))
    for choice in itertools.product(*options):
        candidate = copy.deepcopy(config)
        changes = {}
        for names, kept in choice:
            for name in names:
                set_attribute(candidate, name, kept)
                changes[name] = kept
        yield candidate, changes


# --- the stock model -------------------------------------------------------------------------------
def capture_stock(config, dtype: torch.dtype) -> tuple[nn.Module, GraphModule]:
    """The stock model of ``config`` and its canonical capture (whose modules view its parameters)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 — whatever the config class refuses
        raise FxSliceError(f"transformers cannot build a {config.model_type} model from the stock config: "
                           f"{type(exc).__name__}: {exc}") from exc
    return model, canonicalise(capture(model, model_spec(model)))


def shape_mismatch(stock_gm: GraphModule, sliced: nn.Module) -> Optional[str]:
    """The first module whose weight shape differs between the stock capture and the slice (None: all agree)."""
    ours = dict(sliced.named_modules())
    theirs = dict(stock_gm.named_modules())
    for name, module in theirs.items():
        if isinstance(module, WEIGHTED):
            twin = ours.get(name)
            if not isinstance(twin, type(module)):
                return f"module '{name}' of the stock model has no counterpart in the slice"
            if twin.weight.shape != module.weight.shape:
                return (f"'{name}.weight' is {list(module.weight.shape)} in the stock model and "
                        f"{list(twin.weight.shape)} in the slice")
    for name, module in ours.items():
        if isinstance(module, WEIGHTED) and name not in theirs:
            return f"module '{name}' of the slice has no counterpart in the stock model"
    return None


class StockFiller:
    """Writes the sliced graph's values into the stock model's parameters (through its capture)."""

    def __init__(self, stock: nn.Module, stock_gm: GraphModule, sliced: nn.Module):
        self.stock, self.gm, self.sliced = stock, stock_gm, sliced
        self.covered: dict[int, int] = {}  # storage address -> elements written

    def write(self, target: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(target.shape) != tuple(value.shape):
            raise FxSliceError(f"{what} is {list(target.shape)} in the stock model and {list(value.shape)} in the slice")
        with torch.no_grad():
            target.copy_(value.detach().to(dtype=target.dtype, device=target.device))
        address = target.untyped_storage().data_ptr()
        self.covered[address] = self.covered.get(address, 0) + target.numel()

    def modules(self) -> None:
        """Every Linear / Embedding / expert weight (and bias) from the same-named module of the slice."""
        ours = dict(self.sliced.named_modules())
        for name, module in self.gm.named_modules():
            if not isinstance(module, WEIGHTED):
                continue
            twin = ours[name]
            self.write(module.weight, twin.weight, f"'{name}.weight'")
            bias, twin_bias = getattr(module, "bias", None), getattr(twin, "bias", None)
            if bias is not None:
                self.write(bias, twin_bias if twin_bias is not None else torch.zeros_like(bias), f"'{name}.bias'")
            elif twin_bias is not None:
                raise FxSliceError(f"'{name}' has a bias in the slice but none in the stock model")

    def attributes(self) -> None:
        """Every other tensor the stock graph reads, from the same name in the slice (norm weights,
        biases, position tables)."""
        for node in self.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            try:
                value = fetch_attr(self.sliced, str(node.target))
            except AttributeError:
                continue  # computed by the stock model itself (e.g. a table derived from the config)
            if isinstance(value, torch.Tensor):
                self.write(fetch_attr(self.gm, str(node.target)), value, f"'{node.target}'")

    def check_covered(self) -> None:
        """Every parameter of the stock model was written (none keeps its random initialisation)."""
        for name, param in self.stock.named_parameters():
            if self.covered.get(param.untyped_storage().data_ptr(), 0) < param.numel():
                raise FxSliceError(f"the slice gives no value for parameter '{name}' of the stock model")


class Probe:
    """Seeded probe tokens and the slice's logits on them, computed once; :meth:`error` of a model:
    ``max |Δ logits| / max(1, max |logits|)``."""

    def __init__(self, sliced: nn.Module, vocab: int):
        self.ids = torch.randint(0, vocab, PROBE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.want = sliced(self.ids.to(next(sliced.parameters()).device)).logits.double().cpu()

    def error(self, stock: nn.Module) -> float:
        with torch.no_grad():
            got = stock(input_ids=self.ids.to(next(stock.parameters()).device), use_cache=False).logits.double().cpu()
        if got.shape != self.want.shape:
            return float("inf")
        return float((got - self.want).abs().max()) / max(1.0, float(self.want.abs().max()))


def stock_model(sliced: nn.Module, probe: Probe) -> tuple[nn.Module, dict[str, int]]:
    """The stock Transformers model computing what ``sliced`` (a slice :func:`check_stock_expressible`
    accepted) computes, checked on ``probe``, and the config attributes changed."""
    result = sliced.fxslice
    config, generation = result.source.configs()
    like = next(p for p in sliced.parameters() if p.is_floating_point())
    problem = None
    for candidate, changes in candidate_configs(config, mlp_widths(result)):
        stock, stock_gm = capture_stock(candidate, like.dtype)
        problem = shape_mismatch(stock_gm, sliced)
        if problem is None:
            break
    if problem is not None:
        raise FxSliceError(f"no stock {config.model_type} config reproduces the slice's shapes: {problem}")
    filler = StockFiller(stock, stock_gm, sliced)
    filler.modules()
    filler.attributes()
    filler.check_covered()
    if generation is not None:
        stock.generation_config = generation
    error = probe.error(stock)
    if error > tolerance(like.dtype):
        raise FxSliceError(f"the stock {config.model_type} model differs from the slice by {error:.2e} (relative "
                           f"logits) although every weight was copied: the config derives something from the "
                           f"changed sizes {changes}")
    return stock, changes


def first_difference(saved: nn.Module, built: nn.Module) -> Optional[str]:
    """The first parameter or buffer whose values differ between the reloaded and the built model."""
    theirs = built.state_dict()
    for name, value in saved.state_dict().items():
        twin = theirs.get(name)
        if twin is None or twin.shape != value.shape or not torch.equal(twin.cpu(), value.cpu()):
            return name
    return None


def save_transformers(model: nn.Module, folder: str | os.PathLike, tokenizer=None, record: Optional[dict] = None,
                      overwrite: bool = False, max_shard_size: str | int = "2GB") -> Path:
    """Write ``model`` (a slice ``fxslice.compress(..., stock=True)`` returned) as a stock Transformers
    checkpoint: ``config.json`` of the original model type with the new MLP widths, sharded safetensors
    under the original parameter names, the tokenizer, the generation config, and
    ``fxslice_stock.json`` (what the slice was). It is loaded back with ``from_pretrained`` and must
    reproduce the slice's logits before it is moved into place; nothing is written otherwise."""
    from transformers import AutoModelForCausalLM

    target = Path(folder)
    check_destination(target, overwrite)
    result = getattr(model, "fxslice", None)
    if result is None or result.source is None:
        raise FxSliceError("a stock checkpoint needs the GraphModule returned by fxslice.compress (it carries "
                           ".fxslice with the slice and its source model)")
    check_stock_expressible(result)
    probe = Probe(model, result.vocab_size)
    stock, changes = stock_model(model, probe)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        stock.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        summary = {**result.to_record(), **(record or {}), "format": STOCK_FORMAT, "fxslice_version": __version__,
                   "model_type": stock.config.model_type, "config_changes": changes,
                   "param_count": sum(p.numel() for p in stock.parameters())}
        (staging / STOCK_RECORD).write_text(json.dumps(summary, indent=2, default=str))
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype).eval()
        error = probe.error(reloaded)
        if error > tolerance(dtype):
            where = first_difference(reloaded, stock)
            raise FxSliceError(f"the checkpoint loaded back by from_pretrained differs from the slice by {error:.2e}"
                               + (f": parameter '{where}' did not survive the save" if where else ""))
        del reloaded
        share_files(staging)
        check_destination(target, overwrite)
        move_into_place(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
