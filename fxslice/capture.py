"""Pass 1 — capture: a Hugging Face causal LM becomes one flat ``torch.fx.GraphModule``.

``torch.export`` (non-strict, dynamic batch and sequence length) traces the model; the resulting
graph is cleaned into ``forward(input_ids) -> CausalLMOutput`` (no guards, no ``use_cache``
placeholder, only the logits as output).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.fx import CodeGen, GraphModule

from .errors import FxSliceError, GraphStructureError
from .modules import causal_lm_output


@dataclass
class Captured:
    gm: GraphModule
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    dense_param_count: int


def vocab_size_of(model: nn.Module) -> int:
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


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in module.parameters())


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _logits_leaf(output) -> int:
    """Index of the logits tensor among the flattened leaves of the eager output."""
    leaves = pytree.tree_leaves(output)
    if isinstance(output, torch.Tensor):
        return 0
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    for i, leaf in enumerate(leaves):
        if leaf is logits:
            return i
    raise FxSliceError(f"the model's output {type(output).__name__} has no logits tensor")


def capture(model: nn.Module) -> Captured:
    """Export ``model`` and return a clean graph ``forward(input_ids) -> CausalLMOutput``.

    The caller's model is only run (in eval mode, restored afterwards), never modified.
    """
    if not isinstance(model, nn.Module):
        raise FxSliceError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise FxSliceError(f"model {type(model).__name__} has no parameters")
    float_params = [p for p in params if p.is_floating_point()]
    dtype = float_params[0].dtype if float_params else torch.float32
    device = params[0].device
    vocab = vocab_size_of(model)
    example = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"input_ids": example}
    dynamic = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
        dynamic["use_cache"] = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits_index = _logits_leaf(model(**kwargs))
            program = torch.export.export(model, (), kwargs=kwargs, strict=False, dynamic_shapes=dynamic)
    except FxSliceError:
        raise
    except Exception as exc:
        raise GraphStructureError(
            f"torch.export could not capture {type(model).__name__} with input_ids only: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        model.train(was_training)
    gm = program.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    input_node = None
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        if node.target == "input_ids":
            input_node = node
        elif node.users:
            raise GraphStructureError(f"the captured graph reads input '{node.target}', expected input_ids only")
        else:
            graph.erase_node(node)
    if input_node is None:
        raise GraphStructureError("the captured graph has no input_ids placeholder")
    output = next(n for n in graph.nodes if n.op == "output")
    logits = pytree.tree_leaves(output.args[0])[logits_index]
    with graph.inserting_before(output):
        wrapped = graph.call_function(causal_lm_output, (logits,))
    output.args = (wrapped,)
    graph._codegen = CodeGen()
    graph.eliminate_dead_code()
    clean = GraphModule(gm, graph, class_name="SlicedCausalLM")
    return Captured(clean, vocab, dtype, device, count_parameters(model))
