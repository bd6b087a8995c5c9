"""Mixture-of-experts patterns: grouped expert weights ``[E, out, in]`` applied row by row.

transformers' experts modules (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE,
GraniteMoE, PhiMoE, DeepSeek-V2/V3, GPT-OSS, …) are captured in their ``batched_mm`` form
(:func:`fxslice.hf.exportable` selects it), where every (token, expert) row gathers its expert's
weight and multiplies it:

    y = squeeze(bmm(W[ids], unsqueeze(x, -1)), -1)  [+ b[ids]]      W: [E, out, in]
    y = squeeze(bmm(unsqueeze(x, 1), W[ids]), 1)    [+ b[ids]]      W: [E, in, out] (transposed)

Each becomes one :class:`~fxslice.graph.modules.ExpertLinear` reading ``(x, ids)``, so that the
passes see the experts' up/gate weights as readers of the stream and their down weights as writers.
The routing around them (``repeat_interleave`` of the tokens, the per-row routing weights, the
sum over the top-k) only gathers, scales and sums rows: the analysis walks through it.

Experts that see every token (Llama 4: the tokens ``repeat``-ed once per expert, scaled by their
routing weight, viewed ``[E, T, in]``) are a plain batched product with the 3-D parameter,

    y = bmm(x, W)                                                   x: [E, T, in], W: [E, in, out]

which becomes a :class:`~fxslice.graph.modules.BatchedExpertLinear` (the sum over experts after it
is a sum over a leading dimension).

Experts written as a loop over the experts a batch reaches (DBRX: ``nonzero`` of the routing mask;
JetMoE: rows sorted by expert, split by ``expert_size.tolist()``, put back with ``index_add``) cannot
be traced by ``torch.export``. Capture patterns (:func:`fxslice.register_capture_pattern`) substitute
the gathered form above for their forward while the model is captured, after checking that it gives the
module's own results on random routings; the gathered weights may then be views of 2-D parameters
(DBRX stores ``[E·F, H]``), and a bias shared by every expert is gathered like a per-expert one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxslice.graph import ops
from fxslice.graph.nodes import example_value, parameter_of
from fxslice.registry import LinearMatch, Substitution, register_capture_pattern, register_linear_pattern

aten = ops.aten


def _parameter_or_view(gm: GraphModule, node: object):
    """The tensor of a parameter, of a ``view`` of one (sharing its storage) or of an ``expand`` of one
    to a constant shape (a bias shared by every expert, copied per expert); None for anything else."""
    found = parameter_of(gm, node)
    if found is not None or not ops.calls(node, ops.RESHAPES | {aten.expand.default}):
        return found
    base, shape = parameter_of(gm, node.args[0]), node.args[1]
    if base is None or not all(isinstance(size, int) for size in shape):
        return None
    return base.expand(shape).contiguous() if node.target is aten.expand.default else base.view(shape)


def _gathered_weight(gm: GraphModule, node: object):
    """``(W, ids, index node)`` for ``W[ids]`` with ``W`` a 3-D parameter (or view of one), else None."""
    if not ops.calls(node, aten.index.Tensor) or len(node.args[1]) != 1:
        return None
    weight, ids = _parameter_or_view(gm, node.args[0]), node.args[1][0]
    if weight is None or weight.dim() != 3 or not isinstance(ids, Node):
        return None
    return weight, ids, node


def _unsqueezed(node: object, dims: tuple[int, ...]):
    """``x`` for ``unsqueeze(x, d)`` with ``d`` in ``dims``, else None."""
    if ops.calls(node, aten.unsqueeze.default) and node.args[1] in dims:
        return node.args[0]
    return None


def _single_user(node: Node, op, dims: tuple[int, ...]):
    """The one user of ``node`` when it is ``op(node, d)`` with ``d`` in ``dims``."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if ops.calls(user, op) and user.args[0] is node and user.args[1] in dims else None


@register_linear_pattern("expert_bmm")
def expert_bmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``bmm`` of gathered expert weights with one input row each (either operand order)."""
    if not ops.calls(node, aten.bmm.default):
        return None
    left, right = node.args[0], node.args[1]
    gathered, x = _gathered_weight(gm, left), _unsqueezed(right, (-1, 2))
    transposed = gathered is None
    if transposed:
        gathered, x = _gathered_weight(gm, right), _unsqueezed(left, (1, -2))
    if gathered is None or x is None:
        return None
    weight, ids, index = gathered
    squeeze = _single_user(node, aten.squeeze.dim, (1, -2) if transposed else (-1, 2))
    value = example_value(x)
    if squeeze is None or value is None or value.dim() != 2:
        return None
    weight = weight.transpose(1, 2) if transposed else weight
    unsqueeze = right if not transposed else left
    nodes = [n for n in (index, unsqueeze) if len(n.users) == 1] + [node, squeeze]
    output, bias = squeeze, None
    if len(squeeze.users) == 1:
        add = next(iter(squeeze.users))
        gathered_bias = add.args[1] if ops.calls(add, ops.ADD) and add.args[0] is squeeze else None
        if ops.calls(gathered_bias, aten.index.Tensor) and list(gathered_bias.args[1]) == [ids]:
            candidate = _parameter_or_view(gm, gathered_bias.args[0])
            if candidate is not None and candidate.shape == weight.shape[:2]:
                bias, output = candidate, add
                nodes += ([gathered_bias] if len(gathered_bias.users) == 1 else []) + [add]
    return LinearMatch(nodes, x, output, weight, bias, _source_name(index.args[0]), expert_ids=ids)


def _source_name(node: Node) -> str:
    """The parameter a gathered weight comes from (through a view): the module's name."""
    return str(node.target if node.op == "get_attr" else node.args[0].target)


def _swapped_last_two(node: object) -> bool:
    """Whether ``node`` is ``transpose(p, 1, 2)`` (or the same ``permute``) of a 3-D value."""
    if ops.calls(node, aten.transpose.int):
        return sorted(d % 3 for d in node.args[1:3]) == [1, 2]
    return ops.calls(node, aten.permute.default) and [d % 3 for d in node.args[1]] == [0, 2, 1]


@register_linear_pattern("batched_experts_bmm")
def batched_experts_bmm(gm: GraphModule, node: Node) -> LinearMatch | None:
    """``bmm(x [E, T, in], W [E, in, out])`` with ``W`` a 3-D parameter, or the transpose of one stored
    ``[E, out, in]`` (Inkling's shared experts): every expert's rows at once."""
    if not ops.calls(node, aten.bmm.default):
        return None
    right, nodes = node.args[1], [node]
    stored_transposed = _swapped_last_two(right)
    weight = parameter_of(gm, right.args[0] if stored_transposed else right)
    value = example_value(node.args[0])
    if weight is None or weight.dim() != 3 or value is None or value.dim() != 3:
        return None
    if stored_transposed:  # a transpose used elsewhere too stays in the graph, reading the parameter itself
        nodes = ([right] if len(right.users) == 1 else []) + nodes
        right = right.args[0]
    return LinearMatch(nodes, node.args[0], node, weight if stored_transposed else weight.transpose(1, 2), None,
                       str(right.target), batched_experts=True)


def gathered_experts(weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, transposed: bool = False):
    """``W[ids_s] x_s`` for every row ``s`` in the form :func:`expert_bmm` finds (``W``: ``[E, out, in]``, or
    ``[E, in, out]`` with ``transposed``)."""
    if transposed:
        return torch.bmm(rows.unsqueeze(1), weight[ids]).squeeze(1)
    return torch.bmm(weight[ids], rows.unsqueeze(-1)).squeeze(-1)


def _random_routing(generator: torch.Generator, tokens: int, experts: int, k: int, dtype: torch.dtype):
    """Every token's ``k`` distinct experts and their routing weights (a softmax, as routers give)."""
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    return ids, torch.softmax(torch.randn(tokens, k, generator=generator), -1).to(dtype)


# -- DBRX: experts stored as [E·F, H] matrices, run expert by expert over the ones a batch reaches ------------

def _row_stacked_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts in gathered form: gate ``w1``, up ``v1`` ([E·F, H] viewed [E, F, H]), down ``w2`` (its
    transpose stored the same way), every (token, expert) row weighted and summed over the top k."""
    width, k = self.hidden_size, top_k_index.shape[-1]
    grouped = (self.num_experts, self.ffn_hidden_size, width)
    gate_weight, up_weight, down_weight = (w.view(grouped) for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
    rows = hidden_states.reshape(-1, width).repeat_interleave(k, dim=0)
    ids = top_k_index.reshape(-1)
    hidden = self.mlp.activation_fn(gathered_experts(gate_weight, rows, ids)) * gathered_experts(up_weight, rows, ids)
    written = gathered_experts(down_weight, hidden, ids, transposed=True) * top_k_weights.reshape(-1, 1)
    return written.view(-1, k, width).sum(1).view(hidden_states.shape[0], -1, width)


@register_capture_pattern("row_stacked_glu_experts")
def row_stacked_glu_experts(module: nn.Module):
    """A module with ``num_experts``, ``ffn_hidden_size``, ``hidden_size`` and ``mlp.w1/v1/w2`` parameters of
    shape ``[E·F, H]`` whose ``forward(hidden_states, top_k_index, top_k_weights)`` loops over experts."""
    mlp = getattr(module, "mlp", None)
    sizes = [getattr(module, name, None) for name in ("num_experts", "ffn_hidden_size", "hidden_size")]
    if mlp is None or not all(isinstance(size, int) for size in sizes):
        return None
    experts, hidden, width = sizes
    weights = [getattr(mlp, name, None) for name in ("w1", "v1", "w2")]
    if not all(isinstance(w, nn.Parameter) and tuple(w.shape) == (experts * hidden, width) for w in weights):
        return None

    def example(call, generator):  # few rows: each gathers whole expert matrices
        ids, routing = _random_routing(generator, 3, experts, min(2, experts), weights[0].dtype)
        x = torch.randn(1, 3, width, generator=generator).to(weights[0].dtype)
        return call("forward", x, ids, routing)

    return Substitution({"forward": _row_stacked_forward}, example)


# -- JetMoE: rows sorted by expert, split by routing counts, put back with index_add -------------------------

def _route(self, rows):
    """Top-k experts per token in token order: ``(ids [T·k], gates [T·k], logits)`` (the router's own math)."""
    logits = self.router.layer(rows).float()
    top_logits, top = logits.topk(self.router.top_k, dim=1)
    return top.reshape(-1), torch.softmax(top_logits, dim=1).type_as(rows).reshape(-1), logits


def _experts_out(self, hidden, ids, gates, tokens):
    """The output experts of every (token, expert) row, gated and summed over the top k. The block's bias is
    added inside every expert: the gates are a softmax over the top k, so it is added once per token."""
    bias = self.bias.expand(self.output_linear.num_experts, -1)[ids]
    written = (gathered_experts(self.output_linear.weight, hidden, ids) + bias) * gates[:, None]
    return written.view(tokens, -1, self.input_size).sum(1)


def _sorted_moe_forward(self, layer_input):
    batch, length, width = layer_input.size()
    rows = layer_input.reshape(-1, width)
    ids, gates, _ = _route(self, rows)
    up = gathered_experts(self.input_linear.weight, rows.repeat_interleave(self.router.top_k, dim=0), ids)
    gate, value = up.chunk(2, dim=-1)
    return _experts_out(self, self.activation(gate) * value, ids, gates, batch * length).view(batch, length, width)


def _sorted_attention_map(self, layer_input):
    batch, length, width = layer_input.size()
    rows = layer_input.reshape(-1, width)
    ids, gates, logits = _route(self, rows)
    queries = gathered_experts(self.input_linear.weight, rows.repeat_interleave(self.top_k, dim=0), ids)
    return queries.view(batch, length, self.top_k, -1), logits, (ids, gates)


def _sorted_attention_reduce(self, layer_input, routing):
    batch, length, k, hidden = layer_input.size()
    ids, gates = routing
    return _experts_out(self, layer_input.reshape(-1, hidden), ids, gates, batch * length).view(batch, length, -1)


@register_capture_pattern("sorted_dispatch_experts")
def sorted_dispatch_experts(module: nn.Module):
    """A block with ``router.layer`` (a Linear), ``input_linear``/``output_linear`` holding ``[E, out, in]``
    weights and a ``bias`` of the stream's width, as a mixture of MLPs (``forward``) or of attention
    projections (``map`` before the attention, ``reduce`` after it)."""
    router, parts = getattr(module, "router", None), [getattr(module, n, None) for n in ("input_linear", "output_linear")]
    if not isinstance(getattr(router, "layer", None), nn.Linear) or not isinstance(getattr(module, "bias", None), nn.Parameter):
        return None
    if not all(isinstance(getattr(part, "weight", None), nn.Parameter) and part.weight.dim() == 3 for part in parts):
        return None
    width, dtype = router.layer.in_features, parts[0].weight.dtype
    attention = callable(getattr(module, "map", None)) and callable(getattr(module, "reduce", None))

    def example(call, generator):
        x = torch.randn(2, 5, width, generator=generator).to(dtype)
        if not attention:
            return call("forward", x)
        queries, _, routing = call("map", x)
        heads = queries.shape[2]  # the attention between map and reduce mixes the k heads of a token
        mixed = torch.einsum("btkh,kj->btjh", queries, torch.randn(heads, heads, generator=generator).to(dtype))
        return queries, call("reduce", mixed, routing)

    methods = ({"map": _sorted_attention_map, "reduce": _sorted_attention_reduce} if attention
               else {"forward": _sorted_moe_forward})
    return Substitution(methods, example)
