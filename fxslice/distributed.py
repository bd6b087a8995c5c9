"""Data-parallel calibration over ``torch.distributed``: every rank calibrates on its own batches.

When a process group is initialised (``torchrun``: gloo on CPU, NCCL on GPU), the only values the
ranks exchange are the float64 covariances (summed, so the PCA is that of the union of the
shards), the token counts and a failure flag; every rank then computes the same basis and the
same sliced model. Without a process group (or with one rank) every helper is the identity.
"""

from __future__ import annotations

import torch


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group_size() > 1 else 0


def world_size() -> int:
    return _group_size()


def is_writer() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (in place where the backend can reach it)."""
    if _group_size() == 1:
        return tensor
    import torch.distributed as dist

    backend = dist.get_backend()
    local = tensor if (backend == "nccl") == (tensor.device.type == "cuda") else (
        tensor.cuda() if backend == "nccl" else tensor.cpu())
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    if local is not tensor:
        tensor.copy_(local)
    return tensor


def total(count: float) -> float:
    """``count`` summed over all ranks."""
    if _group_size() == 1:
        return count
    return float(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): NCCL
    for a CUDA device, gloo otherwise. Returns whether this process is one of several."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return _group_size() > 1
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True
