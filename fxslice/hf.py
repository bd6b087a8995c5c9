"""What fxslice assumes about Hugging Face transformers, in one place.

The passes see a graph and a :class:`ModelSpec`; only this module knows how a causal LM is called
(``input_ids``, ``use_cache``), what it returns (``CausalLMOutput`` with ``.logits``), how its
static KV cache is exported, and how checkpoints and tokenizers are loaded.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from transformers.modeling_outputs import CausalLMOutput

from .errors import FxSliceError, GraphStructureError
from .graph.weights import count_parameters
from .registry import capture_substitutions

STATIC_CACHE_PREFIX = "model."
"""transformers' exportable static-cache wrapper keeps the model as its ``model`` attribute."""
EXAMPLE_LENGTH = 16
"""Tokens per row of the example a model is first captured with (:func:`fxslice.passes.p1_capture.capture`)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the passes need to know about a model besides its graph."""

    class_name: str
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    param_count: int  # unique parameters, tied weights once
    accepts_use_cache: bool
    use_cache_via: Optional[str] = "use_cache"  # the forward parameter that takes it (a ``**kwargs`` name:
    # torch.export cannot be given a spec for it there, so ``config.use_cache`` is switched off instead)
    max_positions: Optional[int] = None  # config.max_position_embeddings, when the model says
    weights_loaded: bool = True  # False: a checkpoint's model, parameters unallocated until streamed in

    def example_input_ids(self, batch: int = 2, length: int = EXAMPLE_LENGTH) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab_size, (batch, length), generator=generator).to(self.device)

    def export_inputs(self, length: int = EXAMPLE_LENGTH) -> tuple[dict, dict]:
        """``(kwargs, dynamic_shapes)`` for ``torch.export`` of an example of ``length`` tokens: dynamic batch
        and length, no KV cache."""
        kwargs = {"input_ids": self.example_input_ids(length=length)}
        dynamic = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
        if self.accepts_use_cache and self.use_cache_via == "use_cache":
            kwargs["use_cache"], dynamic["use_cache"] = False, None
        return kwargs, dynamic


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes a model is calibrated and sliced in (float8 and integer formats are storage formats)."""


def check_compute_dtype(dtype: object, source: str, hint: str = "") -> torch.dtype:
    """``dtype`` (what ``source`` names) if the passes can compute in it, else an error naming it."""
    if not isinstance(dtype, torch.dtype) or dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in COMPUTE_DTYPES)
        raise FxSliceError(f"{source} must be a dtype fxslice computes in ({names}), got {dtype!r}{hint}")
    return dtype


def model_spec(model: nn.Module, weights_loaded: bool = True) -> ModelSpec:
    """Check that ``model`` is a module with parameters and an embedding; describe it.
    ``weights_loaded=False``: a checkpoint's model whose parameters are not read yet."""
    if not isinstance(model, nn.Module):
        raise FxSliceError(f"model must be a torch.nn.Module or a checkpoint path, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise FxSliceError(f"model {type(model).__name__} has no parameters")
    if any(p.is_meta for p in params):
        raise FxSliceError(f"model {type(model).__name__} has parameters on the meta device (no weights): load "
                           "its weights before compressing it")
    floats = [p for p in params if p.is_floating_point()]
    for dtype in dict.fromkeys(p.dtype for p in floats):
        check_compute_dtype(dtype, f"the parameters of model {type(model).__name__}",
                            "; convert the model first, e.g. model.to(torch.bfloat16)")
    return ModelSpec(
        class_name=type(model).__name__,
        vocab_size=vocab_size_of(model),
        dtype=floats[0].dtype if floats else torch.float32,
        device=params[0].device,
        param_count=count_parameters(model),
        accepts_use_cache=_accepts(model, "use_cache"),
        use_cache_via=_parameter_taking(model, "use_cache"),
        max_positions=getattr(getattr(model, "config", None), "max_position_embeddings", None),
        weights_loaded=weights_loaded,
    )


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the input embedding (``get_input_embeddings``, else ``config.vocab_size``, else the first
    ``nn.Embedding``)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if isinstance(embeddings, nn.Embedding):
        return int(embeddings.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is not None:
        return int(size)
    first = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if first is None:
        raise FxSliceError(
            f"cannot tell the vocabulary size of {type(model).__name__}: it has no get_input_embeddings(), "
            "no config.vocab_size and no nn.Embedding"
        )
    return int(first.num_embeddings)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _parameter_taking(model: nn.Module, name: str) -> Optional[str]:
    """The forward parameter that receives keyword ``name``: itself, or the ``**kwargs`` collecting it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return name
    if name in params:
        return name
    return next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)


EXPERTS_IMPLEMENTATION = "batched_mm"
"""How mixture-of-experts blocks are captured: every (token, expert) row gathers its expert's weight
(no data-dependent shapes; ``patterns/experts.py`` turns each gathered matmul into one module)."""


@contextmanager
def exportable(model: nn.Module, use_cache_via: Optional[str] = "use_cache"):
    """``model`` set up for ``torch.export``, restored afterwards: ``config.use_cache`` off where the
    model takes ``use_cache`` only through ``**kwargs`` (on a composite model's text config too), experts
    in their gathered-matmul form where the model lets its experts implementation be chosen, the
    registered capture patterns' verified substitutes in place (:func:`~fxslice.registry.capture_substitutions`),
    and ``torch.distributions``' argument checks off (they test values — BLT's patcher builds a
    ``Categorical`` of its logits —, which a trace cannot)."""
    switched = [c for c in _configs(model) if use_cache_via != "use_cache" and getattr(c, "use_cache", False)]
    for config in switched:
        config.use_cache = False
    validating = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with experts_implementation(model, EXPERTS_IMPLEMENTATION), capture_substitutions(model):
            yield model
    finally:
        torch.distributions.Distribution.set_default_validate_args(validating)
        for config in switched:
            config.use_cache = True


def _configs(model: nn.Module) -> list:
    """``model.config`` and, for a composite model, its text config (which decides ``use_cache`` there)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - not a transformers config, or one with several text configs
        text = None
    return [config] + ([text] if text is not None and text is not config else [])


@contextmanager
def experts_implementation(model: nn.Module, name: str):
    """``model``'s experts dispatched through transformers' implementation ``name`` inside (where the model
    lets it be chosen: ``set_experts_implementation``), restored afterwards."""
    chosen = callable(getattr(model, "set_experts_implementation", None)) and _has_experts(model)
    previous = model.get_experts_implementation() if chosen else None
    if chosen:
        model.set_experts_implementation(name)
    try:
        yield
    finally:
        if chosen:
            model.set_experts_implementation(previous)


def _has_experts(model: nn.Module) -> bool:
    """Whether a module of ``model`` dispatches through transformers' experts interface."""
    return any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in model.modules())


class CausalProbe:
    """Two inputs that differ only in their last token: in a causal model every earlier position
    gets the same values from both (an encoder such as BERT mixes the last token into all)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.ids = spec.example_input_ids(1, 8)
        self.changed = self.ids.clone()
        self.changed[:, -1] = (self.changed[:, -1] + 1) % spec.vocab_size

    def check(self, first: torch.Tensor, second: torch.Tensor, what: str = "logits") -> None:
        """Refuse the model if ``first`` and ``second`` (its values for the two inputs) differ before the
        last position by more than rounding."""
        first, second = first[:, :-1].float(), second[:, :-1].float()
        if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
            return  # nothing to compare; calibration names the position where the values overflow
        # in a causal model the earlier rows are computed by the same ops on the same values: equal to rounding
        dtype = self.spec.dtype
        rounding = 1e-5 if dtype in (torch.float32, torch.float64) else float(torch.finfo(dtype).eps)
        if float((first - second).abs().max()) > rounding * (1.0 + float(first.abs().max())):
            raise FxSliceError(f"{self.spec.class_name} is not a causal language model: its {what} at a position "
                               "change with later tokens (an encoder such as BERT? set config.is_decoder=True where "
                               "supported)")


def check_causal(model: nn.Module, spec: ModelSpec, logits_index: int) -> None:
    """Refuse a model whose outputs at a position depend on later tokens (an encoder such as BERT)."""
    probe = CausalProbe(spec)
    with torch.no_grad():
        first = model_logits(model, spec, probe.ids, logits_index)
        second = model_logits(model, spec, probe.changed, logits_index)
    probe.check(first, second)


def model_logits(model: nn.Module, spec: ModelSpec, input_ids: torch.Tensor, logits_index: int) -> torch.Tensor:
    """The model's own logits for ``input_ids`` (no KV cache where it takes ``use_cache``)."""
    kwargs = {"use_cache": False} if spec.accepts_use_cache else {}
    return pytree.tree_leaves(model(input_ids=input_ids, **kwargs))[logits_index]


def logits_leaf(output) -> int:
    """Index of the logits tensor among the flattened leaves of a model's output."""
    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, int):  # an output spec unflattened over leaf indices: a lone leaf
        return output
    leaves = pytree.tree_leaves(output)
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    for i, leaf in enumerate(leaves):
        if leaf is logits:
            return i
    raise FxSliceError(f"the model's output {type(output).__name__} has no logits tensor")


def logits(output) -> torch.Tensor:
    """The logits of a model output: a ``CausalLMOutput`` (HF models, sliced graphs) or a bare tensor
    (exported programs)."""
    return output.logits if hasattr(output, "logits") else output


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's device, else its first buffer's (a compiled program
    holds its weights as buffers), else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids)``'s logits, whatever kind of causal LM ``model`` is."""
    return logits(model(input_ids))


def causal_lm_output(logits: torch.Tensor) -> CausalLMOutput:
    """Output node of every fxslice graph: an object with ``.logits`` like a Hugging Face model's."""
    return CausalLMOutput(logits=logits)


def export_with_static_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> torch.export.ExportedProgram:
    """Export ``model`` wrapped in transformers' static KV cache:
    ``forward(input_ids [B, T], cache_position [T]) -> logits`` with dynamic ``T``. The model's
    generation config is restored afterwards."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    saved_config = copy.deepcopy(model.generation_config)
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    try:
        wrapper = TorchExportableModuleWithStaticCache(model, batch_size=batch_size, max_cache_len=max_cache_len)
        _match_written_heads(wrapper, model, batch_size)
        length = Dim("length", min=1, max=max_cache_len)
        example = torch.zeros(batch_size, 4, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad(), exportable(model):
            return torch.export.export(
                wrapper, (), kwargs={"input_ids": example, "cache_position": torch.arange(4, device=example.device)},
                dynamic_shapes={"input_ids": {1: length}, "cache_position": {0: length}}, strict=False)
    except Exception as exc:
        raise GraphStructureError(f"cannot capture {type(model).__name__} with a static KV cache: {exc}") from exc
    finally:
        model.generation_config = saved_config


def _match_written_heads(wrapper: nn.Module, model: nn.Module, batch_size: int) -> None:
    """Give every static cache layer the head count and head sizes the model really writes (one token
    through a dynamic cache; shapes only, so a model with unallocated weights works too): the
    wrapper sizes them from the config, which for Falcon (multi-query, or keys broadcast to every
    head by the new decoder architecture) is not what its attention stores."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), experts_implementation(model, "eager"):  # the grouped matmul refuses the
            # stride-0 weights a skeleton holds for what it left out; a loop of plain matmuls takes them
            written = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).past_key_values
        shapes = [(layer.keys.shape, layer.values.shape) for layer in written.layers]
    except Exception:  # the config's shapes stay; a mismatch surfaces in the export's own error
        return
    for i, (layer, (keys, values)) in enumerate(zip(wrapper.static_cache.layers, shapes)):
        if layer.keys is None or layer.max_cache_len == 0 or \
                (layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) == (keys[1], keys[-1], values[-1]):
            continue
        like = layer.keys
        layer.lazy_initialization(like.new_zeros(batch_size, keys[1], 1, keys[-1]),
                                  like.new_zeros(batch_size, values[1], 1, values[-1]))
        wrapper.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
        wrapper.register_buffer(f"value_cache_{i}", layer.values, persistent=False)


def load_pretrained(path: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` from a hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise FxSliceError(f"cannot load model '{path}': {exc}") from exc
    return model, tokenizer


def load_tokenizer(path) -> object:
    from transformers import AutoTokenizer

    _check_config(path)
    return AutoTokenizer.from_pretrained(path)


def _check_config(path) -> None:
    """A local folder's ``config.json``, which transformers reads first, checked so that a bad field is
    one error naming it (:func:`fxslice.checkpoint.check_config_file`)."""
    from .checkpoint import check_config_file

    config = Path(path) / "config.json"
    if config.is_file():
        check_config_file(config)
