"""The activations pass 7 keeps between segments: one environment per calibration batch and per probe.

Each environment maps graph nodes to the values later segments still need (the cached, already
rotated stream value above all). They live on the calibration device, or — with a folder — on
disk between segments (``torch.save``), read back before the batch runs again. When a position is
rotated, every cached value of it is projected into the sliced basis, ``X ← X Q[:, :d]``; a value
waiting on disk keeps its projections and receives them when it is read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.fx import Node

from ...calibration import Batch


@dataclass
class OnDisk:
    """A cached value written to the activation folder with the projections it received since."""

    path: Path
    projections: list[torch.Tensor] = field(default_factory=list)

    def read(self, device: torch.device) -> torch.Tensor:
        value = torch.load(self.path, map_location=device)
        for projection in self.projections:
            value = project(value, projection)
        self.path.unlink()
        return value


def project(value: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """A cached stream value in the rotated, sliced basis: ``X Q[:, :d]`` (in its own dtype)."""
    return (value.to(torch.float32) @ projection).to(value.dtype)


class ActivationCache:
    """Environments of the calibration batches (statistics are taken on them) and of the probe inputs
    (run alongside, never watched); ``folder``: where batch values wait between segments."""

    def __init__(self, input_node: Node, batches: list[Batch], probes: list[torch.Tensor], device: torch.device,
                 folder: Optional[Path] = None):
        self.device = device
        self.folder = folder
        self.batches = batches
        self.envs: list[dict] = [{input_node: batch.input_ids} for batch in batches]
        self.probe_envs: list[dict] = [{input_node: ids.to(device)} for ids in probes]

    def each_batch(self, keep: list[Node]) -> Iterator[tuple[int, Batch, dict]]:
        """``(number, batch, environment)`` of every calibration batch, read back from disk before it is
        handed out; afterwards the values of ``keep`` (the boundaries just computed) go to disk."""
        for number, (batch, env) in enumerate(zip(self.batches, self.envs)):
            if self.folder is not None:
                for node, value in list(env.items()):
                    if isinstance(value, OnDisk):
                        env[node] = value.read(self.device)
            yield number, batch, env
            if self.folder is not None:
                for node in keep:
                    if node in env:  # a group's earlier position that no later segment reads is gone already
                        path = self.folder / f"activation-{node.name}-{number}.pt"
                        torch.save(env[node], path)
                        env[node] = OnDisk(path)

    def project(self, node: Node, projection: torch.Tensor) -> None:
        """Every cached value of ``node`` (a rotated position) in its sliced basis."""
        for env in self.envs + self.probe_envs:
            value = env.get(node)
            if isinstance(value, OnDisk):
                value.projections.append(projection)
            elif value is not None:
                env[node] = project(value, projection)

    def close(self) -> None:
        """Remove what the last segments left on disk."""
        for env in self.envs:
            for value in env.values():
                if isinstance(value, OnDisk):
                    value.path.unlink(missing_ok=True)
