"""Pass 4 — fuse: an exactly equivalent graph whose stream algebra lives in module weights.

- Reader-side norms become weightless :class:`StreamNorm` modules; their scale ``γ`` and shift
  ``β`` fold into the linears behind them: ``W ← W diag(γ)``, ``b ← b + W β``.
- Writer-side norms (Gemma 2/3 and OLMo 2 post-norms, Bloom's embedding norm) have no weight
  behind them to absorb a rotation: they become a weightless norm followed by a new Linear
  ``diag(γ)`` (+ ``β``), named ``<norm path>_affine``, which later becomes ``diag(γ) Q[:, :d]``.
- Every residual add gets a shortcut Linear on its skip edge (``<block path>.skip_<k>``), the
  identity for now and ``Q_aᵀ Q_b`` once both sides are rotated.
- LayerNorm models: every writer is centred, ``W_out ← M W_out`` with ``M = I - 11ᵀ/D``, and so is
  every embedding, so that the stream is mean-free and each LayerNorm is an RMSNorm.
- A head tied to the embedding keeps its weight: the final norm's ``diag(γ)`` (+ ``β``) becomes a
  Linear in front of the head instead, and the embedding gets a private copy until rotation
  re-ties the two.

Nothing here depends on calibration; the result computes the same logits (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.fx import Node

from .analyse import NormSite, Structure
from .modules import StreamNorm


@dataclass
class TiedHead:
    embedding: str  # nn.Embedding writing the first position
    head: str  # nn.Linear sharing its weight
    affine: str  # Linear in front of the head holding the final norm's diag(γ), β
    position: int  # the position the embedding writes
    width_slice: Optional[Node] = None  # ``emb[..., :d]`` after the embedding (rotated positions only)


@dataclass
class Plan:
    """What rotation must touch at each position (module names, by position index)."""

    structure: Structure
    centered: bool
    writers: dict[int, list[str]] = field(default_factory=dict)  # output side rotated by Q_p
    readers: dict[int, list[str]] = field(default_factory=dict)  # input side rotated by Q_p
    shortcuts: dict[int, str] = field(default_factory=dict)  # the skip Linear producing position p
    norm_eps: dict[int, float] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # modules fxslice added (shortcuts, affines)
    roots: dict[int, Node] = field(default_factory=dict)  # the node holding each position's value
    reshapes: dict[int, list[Node]] = field(default_factory=dict)
    tied: Optional[TiedHead] = None

    @property
    def rotated(self) -> list[int]:
        return [p.index for p in self.structure.positions if p.rotated]


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Write float64 results back as fresh parameters in the layer's dtype (never in place)."""
    dtype, device = linear.weight.dtype, linear.weight.device
    linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)


def set_embedding(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    dtype, device = embedding.weight.dtype, embedding.weight.device
    embedding.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    embedding.embedding_dim = weight.shape[1]


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def _new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], like: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(device=like.device, dtype=like.dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device=like.device, dtype=like.dtype), requires_grad=False)
    return linear


class Fuser:
    def __init__(self, structure: Structure):
        self.s = structure
        self.gm = structure.gm
        self.graph = structure.gm.graph
        self.D = structure.hidden_size
        self.plan = Plan(structure, structure.centered)
        like = next(self.gm.parameters())
        self.dtype, self.device = like.dtype, like.device
        self.replaced: dict[Node, Node] = {}  # erased norm outputs -> the nodes now standing for them

    def resolve(self, node: Node) -> Node:
        while node in self.replaced:
            node = self.replaced[node]
        return node

    def add_module(self, name: str, module: nn.Module) -> str:
        base, k = name, 1
        while self._exists(name):
            name, k = f"{base}_{k}", k + 1
        module.to(self.device)
        self.gm.add_submodule(name, module)
        return name

    def _exists(self, name: str) -> bool:
        try:
            self.gm.get_submodule(name)
            return True
        except AttributeError:
            return False

    def call(self, name: str, arg: Node, after: Node, like: Node) -> Node:
        with self.graph.inserting_after(after):
            node = self.graph.create_node("call_module", name, (arg,))
        node.meta.update({k: like.meta[k] for k in ("val", "nn_module_stack") if k in like.meta})
        return node

    def replace_norm(self, site: NormSite, center: bool) -> tuple[Node, str]:
        """Swap a norm region for a weightless StreamNorm; returns the new node and its module name."""
        region = site.region
        name = self.add_module(site.path if site.region.path else f"stream_norm_{region.output.name}",
                               StreamNorm(self.D, site.spec.eps, center=center))
        node = self.call(name, self.resolve(region.input), region.output, region.output)
        region.output.replace_all_uses_with(node)
        self.replaced[region.output] = node
        for dead in reversed(region.nodes):
            if not dead.users:
                self.graph.erase_node(dead)
        return node, name

    def affine(self, site: NormSite, at: Node, before: bool = False) -> tuple[Node, str]:
        """Insert ``Linear(diag(γ), β)`` after node ``at`` (a weightless norm), rerouting its users;
        with ``before=True`` on the input edge of ``at`` (a tied head) instead."""
        weight = torch.diag(_f64(site.spec.scale))
        linear = _new_linear(weight, _f64(site.spec.shift), torch.empty(0, dtype=self.dtype, device=self.device))
        name = self.add_module(f"{site.path}_affine", linear)
        if before:
            source = at.args[0]
            with self.graph.inserting_before(at):
                node = self.graph.create_node("call_module", name, (source,))
            node.meta.update({k: at.meta[k] for k in ("nn_module_stack",) if k in at.meta})
            at.replace_input_with(source, node)
            self.plan.added.append(name)
            return node, name
        users = list(at.users)
        node = self.call(name, at, at, at)
        for user in users:
            user.replace_input_with(at, node)
        self.replaced[at] = node
        self.plan.added.append(name)
        return node, name

    def fold(self, site: NormSite, reader: str) -> None:
        """``W ← W diag(γ)``, ``b ← b + W β`` (Eq. 3 of the paper: the norm scale moves into its readers)."""
        linear = self.gm.get_submodule(reader)
        weight, bias = _f64(linear.weight), _f64(linear.bias)
        if site.spec.shift is not None:
            extra = weight @ _f64(site.spec.shift)
            bias = extra if bias is None else bias + extra
        set_linear(linear, weight * _f64(site.spec.scale)[None, :], bias)

    def shortcut(self, position) -> str:
        add, operand = position.skip.add, self.resolve(position.skip.operand)
        layer = (add.meta.get("nn_module_stack") or {None: ("", None)})
        path = list(layer.values())[-1][0] if layer else ""
        eye = torch.eye(self.D, dtype=torch.float64)
        name = self.add_module(f"{path}.skip_0" if path else f"skip_{position.index}",
                               _new_linear(eye, None, torch.empty(0, dtype=self.dtype, device=self.device)))
        with self.graph.inserting_before(add):
            node = self.graph.create_node("call_module", name, (operand,))
        node.meta.update({k: operand.meta[k] for k in ("val",) if k in operand.meta})
        node.meta["nn_module_stack"] = add.meta.get("nn_module_stack", {})
        add.replace_input_with(operand, node)
        self.plan.added.append(name)
        return name

    def run(self) -> Plan:
        plan, s = self.plan, self.s
        tie = s.tied_head()
        tied_slice = None
        if tie is not None:
            embedding = self.gm.get_submodule(str(tie[0].target))
            set_embedding(embedding, _f64(embedding.weight))  # private copy until rotation re-ties it
            if s.positions[0].rotated:
                tied_slice = self.width_slice(tie[0])
        for p in s.positions:
            writers = [str(w.target) for w in p.writers]
            readers = [str(r.target) for r in p.direct_readers]
            for site in p.writer_norms:
                norm_node, _ = self.replace_norm(site, center=site.spec.centered)
                writers.append(self.affine(site, norm_node)[1])
            for site in p.norms:
                norm_node, _ = self.replace_norm(site, center=False)
                plan.norm_eps.setdefault(p.index, site.spec.eps)
                for reader in site.readers:
                    name = str(reader.target)
                    if tie is not None and reader is tie[1]:
                        affine = self.affine(site, reader, before=True)[1]
                        plan.tied = TiedHead(str(tie[0].target), name, affine, s.positions[0].index, tied_slice)
                        readers.append(affine)
                    else:
                        self.fold(site, name)
                        readers.append(name)
            if p.skip is not None:
                name = self.shortcut(p)
                plan.shortcuts[p.index] = name
                plan.readers.setdefault(p.skip.source, []).append(name)
            plan.writers[p.index] = writers
            plan.readers.setdefault(p.index, []).extend(readers)
        if plan.centered:
            for index in plan.rotated:
                for name in plan.writers[index]:
                    self.center(name)
        plan.roots = {p.index: self.resolve(p.root) for p in s.positions}
        plan.reshapes = {p.index: list(p.reshapes) for p in s.positions}
        self.gm.recompile()
        return plan

    def width_slice(self, embedding: Node) -> Node:
        """``emb[..., :D]`` after a tied embedding; rotation narrows it to the position's width."""
        users = list(embedding.users)
        with self.graph.inserting_after(embedding):
            node = self.graph.call_function(torch.ops.aten.slice.Tensor, (embedding, -1, 0, self.D))
        node.meta.update({k: embedding.meta[k] for k in ("val", "nn_module_stack") if k in embedding.meta})
        for user in users:
            user.replace_input_with(embedding, node)
        self.replaced[embedding] = node
        return node

    def center(self, name: str) -> None:
        """``W_out ← M W_out``, ``b ← b M``, ``E ← E M`` with ``M = I - 11ᵀ/D``: the written value is mean-free."""
        module = self.gm.get_submodule(name)
        if isinstance(module, nn.Embedding):
            weight = _f64(module.weight)
            set_embedding(module, weight - weight.mean(1, keepdim=True))
        else:
            weight, bias = _f64(module.weight), _f64(module.bias)
            set_linear(module, weight - weight.mean(0, keepdim=True), None if bias is None else bias - bias.mean())


def fuse(structure: Structure) -> Plan:
    return Fuser(structure).run()
