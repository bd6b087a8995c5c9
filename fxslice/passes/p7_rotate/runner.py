"""Block-wise execution of a fused graph: segments cut at the rotated stream positions.

:class:`SegmentRunner` computes position ``k`` from the cached position ``k-1`` (each block runs
once per calibration batch); :func:`finishing_schedule` says which weights each segment needs and
when a module is final (so a streamed store can bring it in and write it out).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Interpreter, Node

from ...calibration import Batch
from ...errors import GraphStructureError
from ...graph.nodes import describe
from ..p5_fuse import Plan

Tap = Callable[[torch.Tensor, Batch], None]
"""Watches a node's value while a calibration batch runs (pass 7's inner rewrites collect statistics)."""


class SegmentRunner(Interpreter):
    """Runs a flat graph segment by segment, cut at the nodes holding the rotated positions.

    Segment ``k`` computes position ``k`` from position ``k-1`` (segment 0: the embeddings and
    everything that depends only on ``input_ids``, such as masks and rotary tables). Each batch
    keeps an environment with just the values later segments still need, so calibration runs every
    block once per batch: position ``k`` is computed from the cached, already rotated position
    ``k-1``, never by re-running the prefix. Parameters (``get_attr``) are fetched afresh on every
    run because rotation replaces them.
    """

    def __init__(self, gm: GraphModule, boundaries: list[Node]):
        super().__init__(gm, garbage_collect_values=False)
        self.boundaries = boundaries
        self.taps: dict[Node, Tap] = {}  # node -> sees its value (and the batch) when computed
        segment = self._segments(gm, boundaries)
        count = len(boundaries)
        self.nodes: list[list[Node]] = [[] for _ in range(count)]
        for node in gm.graph.nodes:
            seg = segment.get(node)
            if seg is None or seg >= count or node.op == "output":
                continue
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg not in self.nodes[seg]:
                    self.nodes[seg].append(arg)
            self.nodes[seg].append(node)
        last_use: dict[Node, int] = {}
        for node, seg in segment.items():
            for arg in node.all_input_nodes:
                last_use[arg] = max(last_use.get(arg, -1), seg)
        # values to drop after segment k: produced by segments <= k and not used after k
        self.drop: list[list[Node]] = [[] for _ in range(count)]
        for node, seg in segment.items():
            if seg < count:
                self.drop[min(max(last_use.get(node, seg), seg), count - 1)].append(node)
        self.drop[count - 1] = []  # nothing after the last boundary is run here

    @staticmethod
    def _segments(gm: GraphModule, boundaries: list[Node]) -> dict[Node, int]:
        """The segment of every computed node: how many boundaries lie on its deepest input path."""
        index = {node: i for i, node in enumerate(boundaries)}
        level: dict[Node, int] = {}
        segment: dict[Node, int] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                level[node] = 0
                continue
            lv = max((level[a] for a in node.all_input_nodes if a.op != "get_attr"), default=0)
            segment[node] = lv
            if node in index and lv != index[node]:
                raise GraphStructureError(
                    f"stream position {index[node]} at {describe(node)} is computed from position {lv - 1}; "
                    "the positions are not in order"
                )
            level[node] = lv + 1 if node in index else lv
        return segment

    def run_segment(self, k: int, env: dict, batch: Optional[Batch] = None) -> torch.Tensor:
        """Run segment ``k`` on one batch's environment; returns the value of boundary ``k``. The
        taps see their nodes' values with ``batch`` (None: a probe, not watched)."""
        self.env = env
        for node in self.nodes[k]:
            env[node] = self.run_node(node)
            if batch is not None and node in self.taps:
                self.taps[node](env[node], batch)
        value = env[self.boundaries[k]]
        for node in self.drop[k]:
            if node is not self.boundaries[k]:
                env.pop(node, None)
        for node in self.nodes[k]:
            if node.op == "get_attr":
                env.pop(node, None)
        return value




def finishing_schedule(plan: Plan, runner: SegmentRunner, groups: list[list[int]]) -> tuple[list[list[str]], list[list[str]]]:
    """Per segment, the managed modules it runs; per group, the modules final once it is rotated
    (every position a module computes, reads or writes is rotated). Modules run after the last
    position (the head) are neither: they are completed by ``weights.finalise()``."""
    layout = plan.layout()
    segment_modules: list[list[str]] = []
    last: dict[str, int] = {}
    for k, nodes in enumerate(runner.nodes):
        names = [str(n.target) for n in nodes if n.op == "call_module" and plan.weights.manages(str(n.target))]
        segment_modules.append(names)
        for name in names:
            reads, writes = layout.get(name, (None, None))
            touched = [i for i in (reads, writes) if i is not None and plan.positions[i].rotated]
            last[name] = max([last.get(name, -1), plan.rotated[k].index] + touched)
    group_of = {index: g for g, group in enumerate(groups) for index in group}
    finished: list[list[str]] = [[] for _ in groups]
    for name, index in last.items():
        finished[group_of[index]].append(name)
    return segment_modules, finished
