"""Pass 4, attention queries and keys: find, from the graph, which head dimensions of an attention's
queries and keys can be dropped together.

An attention's scores are ``s = Σ_j q_j k_j`` over the head dimension ``d`` of its inputs. Between the
query Linear ``W_q`` (key Linear ``W_k``) and the attention stand ops that may mix dimensions: rotary
position embeddings rotate pairs of dimensions by an angle that depends on the token, a per-head norm
mixes all of them. A *unit* is a smallest set of head dimensions whose attention inputs depend only on
rows of ``W_q`` / ``W_k`` that feed no other unit. Dropping a unit ``u`` from key/value group ``g`` —
its rows of ``W_k`` and, for every query head of the group, the rows of ``W_q`` that feed it — removes
exactly the terms ``Σ_{j∈u} q_j k_j`` from the scores of the group's heads, and nothing else.

The units are not assumed from a rotary layout: they are *measured* by running each path's ops (the
graph's example shapes, float64, random stand-ins for the cosines, sines and every other input from
outside the path) with one output feature of the Linear perturbed per token, and reading which
attention inputs changed. RoPE's rotate-half layout gives the pairs ``(j, j + d/2)``, GPT-J's interleaved
one ``(2i, 2i + 1)``, partial rotary pairs and single dimensions, no rotary single dimensions; a per-head
query/key norm joins a head's dimensions into one unit — refused, naming its reduction.

Pass 7 (:mod:`.p7_rotate.keys`) keeps the paths' ops as they are: the kept rows of ``W_q`` (``W_k``) are
scattered back to the full width with zeros in the dropped rows, and after the path each head's kept
dimensions are gathered before the attention — for keys, before a KV cache, whose key buffers narrow.
The attention's scale stays the dense head's ``1/√d``. Keeping every unit changes nothing (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import GraphStructureError
from ..graph import ops
from ..graph.nodes import describe, fetch_attr
from .p4_attention import INDEX_COPY, PATH_OPS, concrete, example_shape, replay_path

PATH_LIMIT = 400
"""Nodes a query or key path may hold between its Linear and the attention."""
REDUCTIONS = frozenset({ops.aten.mean.dim, ops.aten.sum.dim_IntList, ops.aten.var.correction, ops.aten.var_mean.correction,
                        ops.aten.linalg_vector_norm.default, ops.aten.native_layer_norm.default,
                        ops.aten.layer_norm.default, ops.aten.amax.default, ops.aten._softmax.default})
"""Ops named when a path joins every dimension of a head (a per-head norm)."""


@dataclass
class HeadPath:
    """One of an attention's two inputs (queries or keys) back to its Linear."""

    linear: str  # W_q or W_k
    source: Node  # the Linear's call
    gather: Node  # where the kept dimensions are gathered: [B, n, T, d] (the attention's input, or a KV cache's new keys)
    heads: int  # n, the heads at ``gather``
    features: int  # the Linear's output features
    rows: list[list[list[int]]]  # [group][unit] -> output features of the Linear feeding that unit of the group's heads
    tail: list[Node] = field(default_factory=list)  # reshapes / expands after ``gather`` (the KV cache's side)
    buffers: list[str] = field(default_factory=list)  # KV-cache key buffers [..., d] (get_attr targets)

    def kept_rows(self, units: list[list[int]], kept: list[list[int]]) -> list[int]:
        """The Linear's output features left when group ``g`` keeps the head dimensions ``kept[g]`` (whole
        ``units``): all but those feeding a dropped unit of their group."""
        dropped = {feature for g, rows_of_unit in enumerate(self.rows) for unit, rows in zip(units, rows_of_unit)
                   if not set(unit) <= set(kept[g]) for feature in rows}
        return [f for f in range(self.features) if f not in dropped]


@dataclass
class QueryKey:
    """An attention whose query/key dimensions can be dropped by unit (module docstring)."""

    attention: Node  # the scaled_dot_product_attention call
    width: int  # d
    groups: int  # G, key/value groups
    units: list[list[int]]  # a partition of range(d)
    query: HeadPath
    key: HeadPath

    @property
    def unit_sizes(self) -> list[int]:
        return [len(u) for u in self.units]


def trace_query_key(gm: GraphModule, attention: Node, writer: str) -> QueryKey:
    """The queries and keys of ``attention`` (whose output ``W_o`` is ``writer``); ``GraphStructureError``
    naming the node where they cannot be narrowed."""

    def refuse(at: Node, why: str) -> GraphStructureError:
        return GraphStructureError(f"the attention queries and keys of '{writer}' cannot be narrowed: "
                                   f"{describe(at)} {why}")

    modules = dict(gm.named_modules())
    query_in, key_in = attention.args[0], attention.args[1]
    shape = example_shape(query_in)
    if shape is None or len(shape) != 4 or example_shape(key_in) is None:
        raise refuse(attention, "has no 4-D example shapes")
    heads, width = shape[1], shape[-1]
    shared = next((a for a in (query_in, key_in) if sum(b is a for b in attention.args[:3]) > 1), None)
    if shared is not None:
        raise refuse(shared, "is more than one of the attention's queries, keys and values")
    paths, dependencies = [], []
    for name, start in (("query", query_in), ("key", key_in)):
        gather, tail, buffers = _gather_point(start, refuse)
        source = _source_linear(gather, modules, refuse, name)
        depends = _dependencies(gm, source, gather, refuse)
        paths.append((source, gather, tail, buffers))
        dependencies.append(depends)
    key_features = modules[str(paths[1][0].target)].out_features
    if key_features % width:
        raise refuse(paths[1][0], f"does not hold whole key heads of {width} dimensions")
    groups = key_features // width
    if heads % groups:
        raise refuse(attention, f"has {heads} heads for {groups} key/value groups")
    units = _units(width, dependencies)
    if len(units) < 2:
        raise refuse(_joining_node(paths), f"joins all {width} dimensions of a head "
                     "(a per-head norm): no query/key dimension can be dropped alone")
    built = []
    for (source, gather, tail, buffers), depends in zip(paths, dependencies):
        at = example_shape(gather)[1]
        if len(gather.users) != 1:
            raise refuse(gather, "is read by more than the attention")
        if at % groups:
            raise refuse(gather, f"holds {at} heads for {groups} key/value groups")
        _verify_tail(gm, gather, tail, attention.args[len(built)], groups, width, refuse)
        rows = _rows(depends, units, at // groups, groups, width, refuse, source)
        built.append(HeadPath(str(source.target), source, gather, at, modules[str(source.target)].out_features, rows,
                              [n for n in tail if ops.calls(n, ops.SIZED)], [str(b.target) for b in buffers]))
    return QueryKey(attention, width, groups, units, *built)


def _gather_point(start: Node, refuse) -> tuple[Node, list[Node], list[Node]]:
    """``(gather, tail, buffers)``: the attention input ``start`` itself, or, where a KV cache holds the keys,
    the new keys written into it (``index_copy_``'s source) with the cache write and the reshapes/expands after it."""
    tail, current = [], start
    while ops.calls(current, PATH_OPS | INDEX_COPY) and len(current.users) == 1:
        if ops.calls(current, INDEX_COPY):
            buffer = current.args[0]
            if not isinstance(buffer, Node) or buffer.op != "get_attr" or len(buffer.users) != 1:
                raise refuse(current, "writes the keys into a cache that is not a buffer of its own")
            tail.append(current)
            return current.args[3], tail, [buffer]
        tail.append(current)
        current = current.args[0]
    return start, [], []


def _source_linear(gather: Node, modules: dict, refuse, name: str) -> Node:
    """The single Linear whose output the path to ``gather`` starts from (found walking back through
    every op; other inputs of the path are not Linears of this graph)."""
    seen, stack, found = set(), [gather], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > PATH_LIMIT:
            raise refuse(gather, f"is more than {PATH_LIMIT} ops away from its {name} Linear")
        if node.op == "call_module":
            if type(modules.get(str(node.target))) is nn.Linear:
                found.append(node)
            continue
        if node.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n for n in node.all_input_nodes if not _tensor_free(n))
    if len(found) != 1:
        raise refuse(gather, f"is computed from {len(found)} Linears ({', '.join(str(f.target) for f in found)}), "
                             f"not one {name} Linear")
    return found[0]


def _tensor_free(node: Node) -> bool:
    """A size (``sym_size``) or other number: not part of a data path (a split's tuple of tensors is)."""
    return isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _path(source: Node, end: Node, refuse) -> list[Node]:
    """The ops from ``source`` (exclusive) to ``end`` (inclusive) in graph order — those that both descend
    from ``source`` and lead to ``end`` —, every one's result (and ``source``'s) read only on the path."""
    descendants, stack = set(), list(source.users)
    while stack:
        node = stack.pop()
        if node in descendants or node.op == "output":
            continue
        descendants.add(node)
        if len(descendants) > PATH_LIMIT:
            raise refuse(source, f"is read by more than {PATH_LIMIT} ops: not a projection of its own")
        if node is not end:
            stack.extend(node.users)
    if end not in descendants:
        raise refuse(source, "does not reach the attention")
    members, stack = set(), [end]
    while stack:  # the descendants that lead to ``end``
        node = stack.pop()
        if node in members:
            continue
        members.add(node)
        stack.extend(n for n in node.all_input_nodes if n in descendants)
    for node in [source, *members]:
        outside = [u for u in node.users if u not in members] if node is not end else []
        if outside:
            raise refuse(outside[0], f"reads {describe(node)} outside the path to the attention (a fused projection)")
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    return sorted(members, key=order.__getitem__)


def _stand_ins(gm: GraphModule, path: list[Node], source: Node, refuse) -> dict:
    """A value for every tensor the path reads from outside it: a buffer or parameter its own value (random where
    not loaded), any other (floating) tensor random of its example shape, in float64, on the CPU; an integer one
    is refused."""
    members, values = set(path) | {source}, {}
    generator = torch.Generator().manual_seed(0)
    for node in path:
        for arg in node.all_input_nodes:
            if arg in members or arg in values or _tensor_free(arg):
                continue
            if arg.op == "get_attr" and not fetch_attr(gm, str(arg.target)).is_meta:
                tensor = fetch_attr(gm, str(arg.target)).detach().cpu().clone()  # the path may write in place
            else:  # a weight not loaded yet (a skeleton capture) is as good as random for the pattern
                example = arg.meta.get("val") if arg.op != "get_attr" else fetch_attr(gm, str(arg.target))
                if not isinstance(example, torch.Tensor):
                    continue
                if not example.dtype.is_floating_point:  # indices whose values would decide the units
                    raise refuse(arg, "is an integer tensor the query/key path reads from outside: its units "
                                      "cannot be measured without its values")
                tensor = torch.randn(concrete(list(example.shape)), generator=generator, dtype=torch.float64)
            values[arg] = tensor.to(torch.float64) if tensor.dtype.is_floating_point else tensor
    return values


def _dependencies(gm: GraphModule, source: Node, gather: Node, refuse) -> list[set[tuple[int, int]]]:
    """For every output feature of the Linear ``source``: the ``(head, dimension)`` inputs of the attention at
    ``gather`` ([B, n, T, d]) that change when that feature changes at its token."""
    path = _path(source, gather, refuse)
    features_shape, out_shape = example_shape(source), example_shape(gather)
    if features_shape is None or out_shape is None or len(out_shape) != 4:
        raise refuse(gather, "has no [batch, heads, tokens, dimension] example shape")
    batch, heads, tokens, width = out_shape
    count, features = math.prod(features_shape[:-1]), features_shape[-1]
    if count != batch * tokens:
        raise refuse(gather, f"holds {batch}×{tokens} tokens where its Linear has {count}")
    externals = _stand_ins(gm, path, source, refuse)
    generator = torch.Generator().manual_seed(1)
    base_input = torch.randn(count, features, generator=generator, dtype=torch.float64)

    def run(rows: torch.Tensor) -> torch.Tensor:  # [N, F] -> [N, n·d], tokens b-major
        try:
            out = replay_path(path, source, rows.reshape(features_shape), gm, externals)
        except Exception as exc:  # any op the replay cannot run: the attention stays whole, named
            raise refuse(gather, f"has a path its ops could not be replayed for ({type(exc).__name__}: {exc})") from exc
        return out.to(torch.float64).permute(0, 2, 1, 3).reshape(count, heads * width)

    base = run(base_input)
    scale = float(base.abs().max()) or 1.0
    for token in sorted({0, 1, count - 1} & set(range(count))):  # each moves its own row only (b-major order)
        moved = base_input.clone()
        moved[token] += torch.randn(features, generator=generator, dtype=torch.float64)
        changed = (run(moved) - base).abs().amax(dim=1) > 1e-9 * scale
        if changed.nonzero().flatten().tolist() not in ([token], []):
            raise refuse(gather, "mixes tokens on the way from its Linear, or holds them in another order")
    depends: list[set[tuple[int, int]]] = []
    for start in range(0, features, count):
        moved = base_input.clone()
        span = min(count, features - start)
        moved[torch.arange(span), start + torch.arange(span)] += 1.0
        changed = (run(moved) - base).abs() > 1e-9 * scale
        for token in range(span):
            depends.append({divmod(int(i), width) for i in changed[token].nonzero().flatten()})
    return depends


def _units(width: int, dependencies: list[list[set[tuple[int, int]]]]) -> list[list[int]]:
    """The finest partition of the head dimensions that no Linear feature's effect crosses."""
    parent = list(range(width))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for depends in dependencies:
        for touched in depends:
            dims = sorted({j for _, j in touched})
            for j in dims[1:]:
                parent[root(j)] = root(dims[0])
    classes: dict[int, list[int]] = {}
    for j in range(width):
        classes.setdefault(root(j), []).append(j)
    return sorted(classes.values())


def _rows(depends, units, repeats: int, groups: int, width: int, refuse, source: Node) -> list[list[list[int]]]:
    """``[group][unit]`` -> the Linear's features whose effect lies in that unit of that group's heads (``repeats``
    heads per group at the gather point); a feature reaching heads of two groups is refused."""
    unit_of = {j: k for k, unit in enumerate(units) for j in unit}
    rows = [[[] for _ in units] for _ in range(groups)]
    for feature, touched in enumerate(depends):
        if not touched:
            continue
        owners = {h // repeats for h, _ in touched}
        if len(owners) != 1:
            raise refuse(source, f"feature {feature} reaches the heads of {len(owners)} key/value groups")
        rows[owners.pop()][unit_of[next(iter(touched))[1]]].append(feature)
    return rows


def _verify_tail(gm: GraphModule, gather: Node, tail: list[Node], attention_input: Node, groups: int, width: int,
                 refuse) -> None:
    """Run the ops after the gather point on (head, dimension) indices: the attention's head ``h`` must read
    dimension ``j`` of the gather point's head of its group."""
    if not tail:
        return
    shape = example_shape(gather)
    at, target = shape[1], example_shape(attention_input)
    head, dim = torch.arange(at)[:, None], torch.arange(width)[None, :]
    filled = (head * width + dim).to(torch.float64)[None, :, None, :].expand(*shape).clone()
    try:
        reached = replay_path(list(reversed(tail)), gather, filled, gm)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise refuse(gather, f"has keys its cache ops could not be replayed for ({exc})") from exc
    heads = target[1]
    expected = ((torch.arange(heads)[:, None] // (heads // at)) * width + dim).to(torch.float64)
    if tuple(reached.shape[-3:-2]) != (heads,) or not bool((reached == expected[:, None, :]).all()):
        raise refuse(attention_input, "does not read the key heads in the layout they are cached in")


def _joining_node(paths) -> Node:
    """The first reduction on the query or the key path (what joins a head's dimensions), else the query path's end."""
    for source, gather, _, _ in paths:
        for node in _path(source, gather, lambda at, why: GraphStructureError(why)):
            if ops.calls(node, REDUCTIONS):
                return node
    return paths[0][1]


def features_left(path: HeadPath, keep: int, width: int) -> int:
    """The Linear's output features left when each group keeps ``keep`` of ``width`` dimensions (features
    that reach no attention input stay; the others in proportion — exact where each feeds one dimension)."""
    touched = sum(len(rows) for group in path.rows for rows in group)
    return path.features - touched + touched * keep // width


def choose_units(scores: torch.Tensor, sizes: list[int], keep: int) -> Optional[list[int]]:
    """The units (indices) whose sizes add up to exactly ``keep`` with the largest total score (a 0/1 knapsack
    over the head's few units), None when no choice adds up to ``keep``."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for k, size in enumerate(sizes):
        for total, (score, chosen) in list(best.items()):  # the sums before unit k: each unit once
            filled = total + size
            if filled <= keep and (filled not in best or best[filled][0] < score + float(scores[k])):
                best[filled] = (score + float(scores[k]), chosen + [k])
    return best[keep][1] if keep in best else None


def feasible_keep(sizes: list[int], keep: int) -> int:
    """The largest width ``≤ keep`` that whole units add up to (at least the smallest unit)."""
    reachable = {0}
    for size in sizes:
        reachable |= {r + size for r in reachable if r + size <= keep}
    reachable.discard(0)
    return max(reachable) if reachable else min(sizes)
