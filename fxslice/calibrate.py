"""Block-wise execution of a flat graph for calibration.

The graph is cut at the nodes holding the rotated stream positions. Segment ``k`` computes
position ``k`` from position ``k-1`` (segment 0: the embeddings and everything that depends only
on ``input_ids``, such as masks and rotary tables). Each batch keeps an environment with just the
values later segments still need, so calibration runs every block once per batch: position ``k``
is computed from the cached, already rotated position ``k-1``, never by re-running the prefix.
Parameters (``get_attr``) are fetched afresh on every run because rotation replaces them.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter, Node

from .errors import GraphStructureError, describe


class SegmentRunner(Interpreter):
    def __init__(self, gm: GraphModule, boundaries: list[Node]):
        super().__init__(gm, garbage_collect_values=False)
        self.boundaries = boundaries
        index = {node: i for i, node in enumerate(boundaries)}
        level: dict[Node, int] = {}
        segment: dict[Node, int] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                level[node] = 0
                continue
            lv = max((level[a] for a in node.all_input_nodes if a.op != "get_attr"), default=0)
            segment[node] = lv
            if node in index:
                if lv != index[node]:
                    raise GraphStructureError(
                        f"stream position {index[node]} at {describe(node)} is computed from position {lv - 1}; "
                        "the positions are not in order"
                    )
                level[node] = lv + 1
            else:
                level[node] = lv
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
        self.drop[count - 1] = []  # nothing after the last boundary is run here; keep the tail small anyway

    def run_segment(self, k: int, env: dict) -> torch.Tensor:
        """Run segment ``k`` on one batch's environment; returns the value of boundary ``k``."""
        self.env = env
        for node in self.nodes[k]:
            env[node] = self.run_node(node)
        value = env[self.boundaries[k]]
        for node in self.drop[k]:
            if node is not self.boundaries[k]:
                env.pop(node, None)
        for node in self.nodes[k]:
            if node.op == "get_attr":
                env.pop(node, None)
        return value
