"""Pass 3 — analyse: find the residual stream in a canonical graph.

The stream is followed forward from the token embedding. A *position* is one value of the stream
(the output of a residual add, or the embedding sum at the start). For every position the analysis
records its readers (norms and the linears behind them, or linears reading it directly), its
writers (linears, embeddings or writer-side norms whose outputs are summed into it), the skip edge
of the residual add that produced it, and the reshapes that carry its width. Walk-through ops that
do not mix the hidden dimension (dtype casts, leading-dim reshapes, slices of leading dims, scalar
multiplies) are followed. Anything else touching the stream raises ``GraphStructureError`` naming
the node — before any weight is changed.

Positions are *rotated* (PCA basis, sliced) or *raw* (full width, original basis): a raw position
is one whose only reader is a writer-side norm (Bloom's embedding LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule, Node

from .errors import GraphStructureError, describe, module_path
from .registry import NormSpec, Region, match_norm, module_index, region_of

CASTS = ("aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.device", "aten.type_as.default")
RESHAPES = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
LEADING_INDEXING = ("aten.slice.Tensor", "aten.select.int")
SCALINGS = ("aten.mul.Tensor", "aten.div.Tensor")
ADD = "aten.add.Tensor"


@dataclass
class NormSite:
    """A matched norm region: ``output = spec.apply(input)``."""

    region: Region
    pattern: str
    spec: NormSpec
    readers: list[Node] = field(default_factory=list)  # Linear call_module nodes behind a reader-side norm
    reshapes: list[Node] = field(default_factory=list)  # width-carrying reshapes between the norm and them

    @property
    def path(self) -> str:
        return self.region.path or self.region.output.name


@dataclass
class Skip:
    add: Node  # the residual add
    operand: Node  # the stream-side argument of the add
    source: int  # index of the position it comes from


@dataclass
class Position:
    index: int
    root: Node
    rotated: bool = True
    aliases: list[Node] = field(default_factory=list)
    writers: list[Node] = field(default_factory=list)  # Linear / Embedding call_module nodes
    writer_norms: list[NormSite] = field(default_factory=list)
    skip: Optional[Skip] = None
    norms: list[NormSite] = field(default_factory=list)  # reader-side norms
    direct_readers: list[Node] = field(default_factory=list)
    reshapes: list[Node] = field(default_factory=list)  # reshapes that carry the width (last dim)

    @property
    def readers(self) -> list[Node]:
        return [r for site in self.norms for r in site.readers] + self.direct_readers


@dataclass
class Structure:
    gm: GraphModule
    hidden_size: int
    positions: list[Position]

    @property
    def last(self) -> Position:
        return self.positions[-1]

    @property
    def centered(self) -> bool:
        """LayerNorm readers: the stream must be made mean-free so that they become RMSNorms."""
        return any(site.spec.centered for p in self.positions if p.rotated for site in p.norms)

    def module(self, node: Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def tied_head(self) -> Optional[tuple[Node, Node]]:
        """(embedding node, head node) when a reader of the last position shares the embedding's weight."""
        for writer in self.positions[0].writers:
            embedding = self.module(writer)
            if not isinstance(embedding, nn.Embedding):
                continue
            for reader in self.last.readers:
                if self.module(reader).weight is embedding.weight:
                    return writer, reader
        return None

    def block_groups(self) -> list[list[int]]:
        """Rotated positions grouped by the block that reads them.

        A position belongs to the module holding the residual add it feeds (the add of the position
        whose skip starts there). Consecutive positions fed into the same module, such as the
        attention input and the MLP input of one pre-norm decoder layer, form one group; the last
        position and positions whose add has no module path stand alone.
        """
        consumer = {p.skip.source: module_path(p.skip.add)[0] for p in self.positions if p.skip is not None}
        groups: list[list[int]] = []
        for p in self.positions:
            if not p.rotated:
                continue
            block = consumer.get(p.index) or None
            previous = groups[-1][-1] if groups else None
            follows = previous is not None and p.skip is not None and p.skip.source == previous
            if follows and block is not None and consumer.get(previous) == block:
                groups[-1].append(p.index)
            else:
                groups.append([p.index])
        return groups

    def table(self) -> str:
        rows = []
        for p in self.positions:
            writers = [str(w.target) for w in p.writers] + [f"{s.path} [{s.pattern}]" for s in p.writer_norms]
            rows.append([
                p.index,
                p.root.name,
                "rotated" if p.rotated else "raw",
                "-" if p.skip is None else f"#{p.skip.source}",
                _short(writers),
                ", ".join(f"{s.path} [{s.pattern}]" for s in p.norms) or "-",
                _short([str(r.target) for r in p.readers]),
            ])
        head = ["#", "root node", "kind", "skip from", "writers", "reader norms", "readers"]
        return f"residual stream of width {self.hidden_size}, {len(self.positions)} positions\n" + tabulate(rows, head)

    def __str__(self) -> str:
        return self.table()


def _short(names: list[str]) -> str:
    """``a.b.{q,k,v}`` for names sharing a prefix."""
    if not names:
        return "-"
    prefix = names[0].rsplit(".", 1)[0] + "." if len(names) > 1 and "." in names[0] else ""
    if prefix and all(n.startswith(prefix) for n in names):
        return prefix + "{" + ",".join(n[len(prefix):] for n in names) + "}"
    return ", ".join(names)


def _val(node) -> Optional[torch.Tensor]:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


class Analyser:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self._constant_cache: dict[Node, bool] = {}
        self._norm_cache: dict[Node, Optional[NormSite]] = {}
        self._index = module_index(gm)

    # --- node classification -------------------------------------------------------------
    def kind(self, node: Node) -> Optional[str]:
        if node.op != "call_module":
            return None
        module = self.modules.get(str(node.target))
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.Embedding):
            return "embedding"
        return None

    def constant_scalar(self, value) -> bool:
        """A number, or a one-element tensor computed from parameters/constants only (not from the input)."""
        if isinstance(value, (int, float)):
            return True
        if not isinstance(value, Node):
            return False
        if value not in self._constant_cache:
            v = _val(value)
            ok = v is not None and v.numel() == 1
            if ok and value.op == "placeholder":
                ok = False
            elif ok and value.op != "get_attr":
                ok = all(self.constant_scalar(a) or (a.op == "get_attr") for a in value.all_input_nodes)
            self._constant_cache[value] = ok
        return self._constant_cache[value]

    def walk_through(self, node: Node, src: Node) -> bool:
        """Whether ``node`` passes ``src`` on without mixing the hidden (last) dimension."""
        if node.op != "call_function":
            return False
        target = str(node.target)
        vin, vout = _val(src), _val(node)
        if vin is None or vout is None or vin.dim() == 0 or vout.dim() == 0 or vin.shape[-1] != vout.shape[-1]:
            return False
        if target in CASTS or target in RESHAPES:
            return node.args[0] is src
        if target in LEADING_INDEXING:
            dim = node.args[1] if len(node.args) > 1 else 0
            return node.args[0] is src and dim not in (-1, vin.dim() - 1)
        if target in SCALINGS and len(node.args) == 2:
            a, b = node.args
            if a is src:
                return self.constant_scalar(b)
            return target == "aten.mul.Tensor" and b is src and self.constant_scalar(a)
        return False

    def data_input(self, node: Node) -> Optional[Node]:
        """The tensor a walk-through node passes on (inverse of :meth:`walk_through`)."""
        for arg in node.args[:2]:
            if isinstance(arg, Node) and self.walk_through(node, arg):
                return arg
        return None

    def norm_site(self, node: Node) -> Optional[NormSite]:
        if node.op != "call_function":
            return None
        region = region_of(self.gm, node, self._index)
        if region is None:
            return None
        if region.output not in self._norm_cache:
            name, spec, _ = match_norm(region)
            self._norm_cache[region.output] = None if spec is None else NormSite(region, name, spec)
        return self._norm_cache[region.output]

    def why_not_norm(self, node: Node) -> str:
        region = region_of(self.gm, node, self._index)
        if region is None:
            return ""
        _, _, notes = match_norm(region)
        detail = f" ({'; '.join(notes)})" if notes else ""
        return (f". Its module '{region.path}' ({region.cls}) matches no registered norm pattern{detail}; "
                "register one with fxslice.register_norm_pattern")

    # --- the walk ----------------------------------------------------------------------------
    def token_embedding(self) -> Node:
        for node in self.gm.graph.nodes:
            if self.kind(node) == "embedding":
                ids = node.args[0]
                while isinstance(ids, Node) and ids.op == "call_function" and str(ids.target) in RESHAPES + CASTS:
                    ids = ids.args[0]
                if isinstance(ids, Node) and ids.op == "placeholder":
                    return node
        raise GraphStructureError("no token embedding (an nn.Embedding reading input_ids) found in the graph")

    def run(self) -> Structure:
        start = self.token_embedding()
        hidden = int(_val(start).shape[-1])
        positions: list[Position] = []
        current = Position(0, start, writers=[start])
        while True:
            adds, writer_norm = self.collect_consumers(current)
            add = adds[0] if adds else None
            has_readers = bool(current.norms or current.direct_readers)
            if writer_norm is not None:
                # the whole position feeds one norm whose output continues the stream: a raw position
                current.rotated = False
                positions.append(current)
                nxt = Position(len(positions), writer_norm.region.output, writer_norms=[writer_norm])
            elif add is None:
                if not has_readers:
                    raise GraphStructureError(f"the residual stream ends at {describe(current.root)} with no reader")
                positions.append(current)
                break
            else:
                branch = add.args[1] if add.args[0] in current.aliases else add.args[0]
                writers, writer_norms, reshapes = self.trace_writers(branch, current)
                if has_readers:
                    positions.append(current)
                    nxt = Position(len(positions), add, writers=writers, writer_norms=writer_norms, reshapes=reshapes,
                                   skip=Skip(add, add.args[0] if branch is add.args[1] else add.args[1], current.index))
                else:  # nothing reads this value: one sum with the next (token + position embeddings, x + a + b)
                    nxt = Position(current.index, add, writers=current.writers + writers,
                                   writer_norms=current.writer_norms + writer_norms, skip=current.skip,
                                   reshapes=current.reshapes + reshapes)
            current = nxt
        for i, p in enumerate(positions):
            p.index = i
        for p in positions:
            if p.skip is not None:
                p.skip.source = positions.index(next(q for q in positions if p.skip.operand in q.aliases))
        structure = Structure(self.gm, hidden, positions)
        self.check(structure)
        return structure

    def collect_consumers(self, position: Position) -> tuple[list[Node], Optional[NormSite]]:
        """Fill aliases, readers, reshapes of ``position``; return its residual add (at most one) and
        the norm whose output continues the stream (a writer-side norm), if any."""
        aliases, frontier = [position.root], [position.root]
        adds: list[Node] = []
        sites: list[NormSite] = []
        while frontier:
            src = frontier.pop()
            for user in list(src.users):
                if user in aliases or user in adds:
                    continue
                site = self.norm_site(user)
                if site is not None and site.region.input is src:
                    if site not in sites:
                        sites.append(site)
                elif self.kind(user) == "linear":
                    position.direct_readers.append(user)
                elif user.op == "call_function" and str(user.target) == ADD and all(isinstance(a, Node) for a in user.args[:2]):
                    if user.args[0] in aliases and user.args[1] in aliases:
                        raise GraphStructureError(f"{describe(user)} adds the residual stream to itself")
                    adds.append(user)
                elif self.walk_through(user, src):
                    aliases.append(user)
                    frontier.append(user)
                    if str(user.target) in RESHAPES:
                        position.reshapes.append(user)
                elif user.op == "call_function" and str(user.target) == "aten.sym_size.int" and user.args[1] not in (-1, _val(src).dim() - 1):
                    continue
                else:
                    raise GraphStructureError(
                        f"{describe(user)} consumes the residual stream (position {position.index}, "
                        f"value '{src.name}'); only norms matched by a registered pattern, linear layers, "
                        "residual adds and ops that keep the hidden dimension may read it" + self.why_not_norm(user)
                    )
        position.aliases = aliases
        if len(adds) > 1:
            raise GraphStructureError(
                f"position {position.index} ('{position.root.name}') feeds {len(adds)} residual adds: "
                + "; ".join(describe(a) for a in adds)
            )
        stream_norm = None
        for site in sites:
            readers, continues = self.norm_readers(site)
            if continues:
                if len(sites) > 1 or adds or position.direct_readers:
                    raise GraphStructureError(
                        f"the output of norm '{site.path}' is used as the residual stream while position "
                        f"{position.index} is read elsewhere too (post-norm residual): {describe(site.region.output)}"
                    )
                stream_norm = site
            else:
                site.readers = readers
                position.norms.append(site)
                position.reshapes.extend(site.reshapes)
        return adds, stream_norm

    def norm_readers(self, site: NormSite) -> tuple[list[Node], bool]:
        """Linears reading a norm's output; ``continues`` when the output is used as the stream instead."""
        readers, frontier, seen = [], [site.region.output], {site.region.output}
        while frontier:
            src = frontier.pop()
            for user in src.users:
                if user in seen:
                    continue
                seen.add(user)
                if self.walk_through(user, src):
                    frontier.append(user)
                    if str(user.target) in RESHAPES:
                        site.reshapes.append(user)
                elif self.kind(user) == "linear":
                    readers.append(user)
                else:
                    return [], True
        return readers, False

    def trace_writers(self, branch: Node, position: Position) -> tuple[list[Node], list[NormSite], list[Node]]:
        """Walk back from the non-stream operand of a residual add to the layers that wrote it.

        Returns the writer modules, writer-side norms and the width-carrying reshapes on the way.
        """
        writers: list[Node] = []
        reshapes: list[Node] = []
        norms: list[NormSite] = []
        frontier = [branch]
        while frontier:
            node = frontier.pop()
            if node in position.aliases:
                raise GraphStructureError(f"the residual stream reaches residual add through {describe(node)}")
            kind = self.kind(node)
            if len(node.users) != 1:
                raise GraphStructureError(
                    f"{describe(node)} writes into the residual stream but its value is also used elsewhere "
                    f"({', '.join(u.name for u in node.users)}); its output cannot be rotated"
                )
            site = self.norm_site(node)
            if site is not None and site.region.output is node:
                norms.append(site)
            elif kind in ("linear", "embedding"):
                writers.append(node)
            elif node.op == "call_function" and str(node.target) == ADD and all(isinstance(a, Node) for a in node.args[:2]):
                frontier.extend(node.args[:2])
            elif node.op == "call_function" and self.data_input(node) is not None:
                if str(node.target) in RESHAPES:
                    reshapes.append(node)
                frontier.append(self.data_input(node))
            else:
                raise GraphStructureError(
                    f"{describe(node)} produces a value that is added to the residual stream; fxslice can "
                    "only rotate linear layers, embeddings and norms matched by a registered pattern there"
                )
        return writers, norms, reshapes

    def check(self, structure: Structure) -> None:
        rotated = [p for p in structure.positions if p.rotated]
        if structure.centered:
            for p in rotated:
                if p.direct_readers:
                    raise GraphStructureError(
                        f"position {p.index} is read by linears without a norm ({_short([str(r.target) for r in p.direct_readers])}) in a "
                        "LayerNorm model; the stream cannot be centred"
                    )
                plain = [s.path for s in p.norms if not s.spec.centered]
                if plain:
                    raise GraphStructureError(f"LayerNorm and RMSNorm readers mixed on the stream ({', '.join(plain)})")
        seen: dict[int, str] = {}
        tie = structure.tied_head()
        for p in structure.positions:
            for node in p.writers + p.readers:
                weight = structure.module(node).weight
                if id(weight) in seen and seen[id(weight)] != str(node.target):
                    if tie is None or {str(tie[0].target), str(tie[1].target)} != {seen[id(weight)], str(node.target)}:
                        raise GraphStructureError(
                            f"modules '{seen[id(weight)]}' and '{node.target}' share one weight on the stream"
                        )
                seen[id(weight)] = str(node.target)


def analyse(gm: GraphModule) -> Structure:
    """Find the residual stream of a canonical graph (see module docstring)."""
    return Analyser(gm).run()
