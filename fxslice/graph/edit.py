"""Editing graphs: cleaning an exported program's graph, inserting and removing module calls."""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn
from torch.fx import CodeGen, Graph, GraphModule, Node

from .nodes import copy_meta


def is_guard(node: Node) -> bool:
    """Whether ``node`` calls the shape-guard submodule ``torch.export``'s ``.module()`` adds."""
    return node.op == "call_module" and str(node.target).startswith("_guards")


def strip_guards(graph: Graph) -> None:
    """Drop the shape-guard submodule calls ``torch.export``'s ``.module()`` adds."""
    for node in list(graph.nodes):
        if is_guard(node):
            graph.erase_node(node)


def plain_graph_module(root: nn.Module, graph: Graph, class_name: str) -> GraphModule:
    """A GraphModule with plain positional calling convention (no pytree codegen) over ``graph``."""
    graph._codegen = CodeGen()
    return GraphModule(root, graph, class_name=class_name)


def submodule_exists(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def mark_module_call(node: Node, name: str, module: nn.Module) -> None:
    """Record in ``nn_module_stack`` that ``node`` is the call of module ``name``: the innermost
    module path of the node (and of what a re-export makes of it) is then the module's own name."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    cls = type(module)
    stack[name] = (name, f"{cls.__module__}.{cls.__qualname__}")
    node.meta["nn_module_stack"] = stack


def call_module_after(gm: GraphModule, name: str, module: nn.Module, arg: Node, after: Node, like: Node) -> Node:
    """Insert a call of ``module`` (submodule ``name``) on ``arg`` after node ``after``, with the
    metadata of ``like``."""
    with gm.graph.inserting_after(after):
        node = gm.graph.create_node("call_module", name, (arg,))
    copy_meta(node, like, ("val", "nn_module_stack"))
    mark_module_call(node, name, module)
    return node


def call_module_on_edge(gm: GraphModule, name: str, module: nn.Module, source: Node, user: Node,
                        replaced: Optional[Node] = None) -> Node:
    """Insert a call of ``module`` (submodule ``name``) on the edge ``source -> user`` only (other
    users keep ``source``); with ``replaced``, the call on ``source`` takes that input's place in ``user``."""
    replaced = source if replaced is None else replaced
    with gm.graph.inserting_before(user):
        node = gm.graph.create_node("call_module", name, (source,))
    copy_meta(node, replaced, ("val",))
    copy_meta(node, user, ("nn_module_stack",))
    mark_module_call(node, name, module)
    user.replace_input_with(replaced, node)
    return node


def erase_unused(gm: GraphModule, nodes: Iterable[Node]) -> None:
    """Erase those of ``nodes`` nothing uses any more and, in turn, their inputs that nothing else
    uses (a parameter's attribute goes with its ``get_attr``); placeholders stay."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    pending = set(nodes)
    while pending:
        node = max(pending, key=lambda n: order.get(n, -1))  # users before their inputs
        pending.discard(node)
        if node.users or node.op not in ("call_function", "get_attr") or node not in order:
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            drop_attribute(gm, node)
        else:
            gm.graph.erase_node(node)
        del order[node]
        pending.update(inputs)


def remove_module_call(gm: GraphModule, name: str) -> None:
    """Replace every call of module ``name`` (one input, same shape out) by its input; drop the module.
    The caller recompiles ``gm`` once its edits are done."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == name:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_submodule(name)


def drop_attribute(gm: GraphModule, node: Node) -> None:
    """Erase an unused ``get_attr`` node and delete the attribute it read from ``gm``."""
    owner_path, _, attr = str(node.target).rpartition(".")
    target = node.target
    gm.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)
