"""Pass 1 — capture: a causal LM becomes one flat ``torch.fx.GraphModule``.

``torch.export`` (non-strict, dynamic batch and sequence length) traces the model; the resulting
graph is cleaned into ``forward(input_ids) -> CausalLMOutput`` (no guards — checked first at a range of
sequence lengths, so that a graph valid only for the example's length is refused —, no ``use_cache``
placeholder, only the logits as output). Tracing needs no weight values (a checkpoint's model is
captured with unallocated parameters); a model in memory is also run once to check that it is
causal (in eval mode, restored afterwards). It is never modified; the graph's parameters still
share its storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..errors import FxSliceError, GraphStructureError
from ..graph.edit import is_guard, plain_graph_module, strip_guards
from ..hf import EXAMPLE_LENGTH, ModelSpec, causal_lm_output, check_causal, exportable, logits_leaf, model_logits

if TYPE_CHECKING:
    from .run import Run

GRAPH_CLASS = "SlicedCausalLM"


def capture(model: nn.Module, spec: ModelSpec) -> GraphModule:
    """Export ``model`` (described by ``spec``) into a clean graph ``forward(input_ids) -> CausalLMOutput``.

    A graph traced on the short example that is wrong at longer lengths its guards exclude (a chunked scan
    traced as one chunk: Mamba-2 with chunks of 256) is traced once more on the longest such length, where
    the general branch runs; the first refusal stands when that one is wrong too."""
    try:
        return _captured(model, spec, EXAMPLE_LENGTH)
    except LongerExample as refused:
        try:
            return _captured(model, spec, refused.length)
        except GraphStructureError as again:
            raise GraphStructureError(f"{refused} (traced again on {refused.length} tokens: {again})") from None


class LongerExample(GraphStructureError):
    """The graph's guards exclude lengths it is wrong at, some longer than the example (``length``: the
    longest): an example that long may trace the general branch."""

    def __init__(self, message: str, length: int):
        super().__init__(message)
        self.length = length


def _captured(model: nn.Module, spec: ModelSpec, length: int) -> GraphModule:
    """:func:`capture` with an example of ``length`` tokens."""
    kwargs, dynamic = spec.export_inputs(length)
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
    _check_dynamic(graph, spec)
    unguarded = failing_guards(gm, spec, kwargs)
    strip_guards(graph)
    _keep_only_input_ids(graph)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = pytree.tree_leaves(output.args[0])[leaf]
    with graph.inserting_before(output):
        wrapped = graph.call_function(causal_lm_output, (logits,))
    output.args = (wrapped,)
    graph.eliminate_dead_code()
    captured = plain_graph_module(gm, graph, GRAPH_CLASS)
    if unguarded:
        _check_unguarded_lengths(captured, model, spec, leaf, unguarded, length)
    return captured


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


CHECKED_LENGTHS = (2, 3, 5, 7, 11, 13, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257)
"""Sequence lengths at which the captured graph's shape guards are evaluated (up to the model's limit)."""


def checked_lengths(spec: ModelSpec) -> list[int]:
    """:data:`CHECKED_LENGTHS` up to the model's limit."""
    return [n for n in CHECKED_LENGTHS if n <= (spec.max_positions or max(CHECKED_LENGTHS))]


def failing_guards(gm: GraphModule, spec: ModelSpec, kwargs: dict) -> list[int]:
    """The lengths of :func:`checked_lengths` at which the graph's shape guards — what ``torch.export``
    assumed about the input while tracing, and later passes drop — fail: a branch taken for the example's
    length (a chunked computation that needed padding, or did not)."""
    guard = next((n for n in gm.graph.nodes if is_guard(n)), None)
    if guard is None:
        return []
    check = gm.get_submodule(str(guard.target))
    failed = []
    for length in checked_lengths(spec):
        values = {**kwargs, "input_ids": spec.example_input_ids(2, length)}
        try:
            check(*[values.get(str(arg.target)) if isinstance(arg, torch.fx.Node) else arg for arg in guard.args])
        except Exception:  # noqa: BLE001 - a failed guard raises; which exception type is torch's business
            failed.append(length)
    return failed


def _check_unguarded_lengths(captured: GraphModule, model: nn.Module, spec: ModelSpec, leaf: int,
                             failed: list[int], length: int) -> None:
    """Refuse a graph that computes wrong values at a length its guards exclude. A model in memory is run
    at the shortest and the longest such length and compared with the graph (a branch taken for the
    example's length is often the general one — padding up to a chunk, a no-op where none is needed —, but
    guards below the example's length and above it come from different branches: DeepSeek-V4's compressors
    need a full window of 4 tokens and skip windows of 128 the example never filled); without weights, a
    graph whose guards fail at most lengths is refused (the example's length took the special branch)."""
    if spec.weights_loaded:
        was_training = model.training
        model.eval()
        try:  # compared at the shortest and the longest such length the model itself runs
            verdicts = [next((v for v in (_agrees(captured, model, spec, leaf, n) for n in lengths) if v is not None),
                             True) for lengths in (failed, failed[::-1])]
        finally:
            model.train(was_training)
        if all(verdicts):
            return
    elif 2 * len(failed) <= len(checked_lengths(spec)):
        return
    message = (f"torch.export specialised {spec.class_name} to the example's sequence length "
               f"{length}: its shape guards fail at length(s) {', '.join(map(str, failed))}"
               + (", where the graph's logits differ from the model's" if spec.weights_loaded else "")
               + " (a computation in chunks whose padding step that length skipped?); a config whose chunk size "
               "does not divide the example length captures the general case")
    longer = [n for n in failed if n > length]
    raise LongerExample(message, max(longer)) if longer else GraphStructureError(message)


def _agrees(captured: GraphModule, model: nn.Module, spec: ModelSpec, leaf: int, length: int) -> Optional[bool]:
    """Whether the captured graph gives the model's logits (to rounding) on a batch of ``length`` tokens; None
    where the model itself cannot run that length (a limit of the model, not of the capture)."""
    ids = spec.example_input_ids(2, length)
    with torch.no_grad():
        try:
            want = model_logits(model, spec, ids, leaf).float()
        except Exception:  # noqa: BLE001 - past the model's own positions
            return None
        try:
            got = captured(ids).logits.float()
        except Exception:  # noqa: BLE001 - the graph cannot even run there: as wrong as wrong values
            return False
    rounding = 1e-4 if spec.dtype in (torch.float32, torch.float64) else 10 * float(torch.finfo(spec.dtype).eps)
    return got.shape == want.shape and float((got - want).abs().max()) <= rounding * (1.0 + float(want.abs().max()))


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
