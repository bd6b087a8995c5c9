"""Pass 1 — capture: a causal LM becomes one flat ``torch.fx.GraphModule``.

``torch.export`` (non-strict, dynamic batch and sequence length) traces the model; the resulting
graph is cleaned into ``forward(input_ids) -> CausalLMOutput`` (no guards, no ``use_cache``
placeholder, only the logits as output). Tracing needs no weight values (a checkpoint's model is
captured with unallocated parameters); a model in memory is also run once to check that it is
causal (in eval mode, restored afterwards). It is never modified; the graph's parameters still
share its storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..errors import FxSliceError, GraphStructureError
from ..graph.edit import plain_graph_module, strip_guards
from ..hf import ModelSpec, causal_lm_output, check_causal, exportable, logits_leaf

if TYPE_CHECKING:
    from .run import Run

GRAPH_CLASS = "SlicedCausalLM"


def capture(model: nn.Module, spec: ModelSpec) -> GraphModule:
    """Export ``model`` (described by ``spec``) into a clean graph ``forward(input_ids) -> CausalLMOutput``."""
    kwargs, dynamic = spec.export_inputs()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with exportable(model, spec.use_cache_via):
                program = torch.export.export(model, (), kwargs=kwargs, strict=False, dynamic_shapes=dynamic)
            out_spec = program.call_spec.out_spec
            leaf = logits_leaf(pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec))
            if spec.weights_loaded:  # a streamed checkpoint's model has no values to probe
                check_causal(model, spec, leaf)
    except FxSliceError:
        raise
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise GraphStructureError(
            f"torch.export could not capture {spec.class_name} with input_ids only: {type(exc).__name__}: {first_line}"
        ) from exc
    finally:
        model.train(was_training)
    gm = program.module()
    graph = gm.graph
    strip_guards(graph)
    _keep_only_input_ids(graph)
    _check_dynamic(graph, spec)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = pytree.tree_leaves(output.args[0])[leaf]
    with graph.inserting_before(output):
        wrapped = graph.call_function(causal_lm_output, (logits,))
    output.args = (wrapped,)
    graph.eliminate_dead_code()
    return plain_graph_module(gm, graph, GRAPH_CLASS)


def _check_dynamic(graph, spec: ModelSpec) -> None:
    """Refuse a graph that only runs on the example's batch size or length (``torch.export``
    specialised it: a Python loop over the tokens, such as a recurrent scan, unrolled)."""
    ids = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    shape = ids.meta["val"].shape
    fixed = [(axis, int(size)) for axis, size in zip(("batch size", "sequence length"), shape) if is_concrete_int(size)]
    if fixed:
        what = ", ".join(f"the {axis} to {size}" for axis, size in fixed)
        raise GraphStructureError(f"torch.export fixed {what} when capturing {spec.class_name} (a Python loop over "
                                  "the tokens, such as a recurrent scan, was unrolled): the graph would only run on "
                                  "inputs of that shape")


def _keep_only_input_ids(graph) -> None:
    """Drop unused placeholders (``use_cache``); refuse a graph that reads any input but ``input_ids``."""
    found = False
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        if node.target == "input_ids":
            found = True
        elif node.users:
            raise GraphStructureError(f"the captured graph reads input '{node.target}', expected input_ids only")
        else:
            graph.erase_node(node)
    if not found:
        raise GraphStructureError("the captured graph has no input_ids placeholder")


NAME = "capture"


def step(run: "Run") -> None:
    with run.watch(NAME):
        run.gm = capture(run.module, run.spec)
