"""Data-parallel calibration over ``torch.distributed``: every rank calibrates on its own batches.

When a process group is initialised (``torchrun``: gloo on CPU, NCCL on GPU), the only values the
ranks exchange are the float64 covariances (summed, so the PCA is that of the union of the
shards), the token counts and a failure flag; every rank then computes the same basis and the
same sliced model. Without a process group (or with one rank) every helper is the identity.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import FxSliceError


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


def _reachable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the backend can reach it: NCCL needs the rank's GPU, gloo the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return tensor if tensor.device.type == "cuda" else tensor.cuda()
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (in place where the backend can reach it)."""
    if _group_size() == 1:
        return tensor
    import torch.distributed as dist

    local = _reachable(tensor)
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    if local is not tensor:
        tensor.copy_(local)
    return tensor


def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as rank 0 has it, on every rank (in place)."""
    if _group_size() == 1:
        return tensor
    import torch.distributed as dist

    local = _reachable(tensor)
    dist.broadcast(local, src=0)
    if local is not tensor:
        tensor.copy_(local)
    return tensor


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if _group_size() > 1:
        import torch.distributed as dist

        dist.barrier()


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

    size = os.environ.get("WORLD_SIZE", "1")
    if not size.strip().isdigit():
        raise FxSliceError(f"WORLD_SIZE={size!r} in the environment is not a number of processes")
    if int(size) <= 1 or dist.is_initialized():
        return _group_size() > 1
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise FxSliceError(f"WORLD_SIZE={size} is set but {', '.join(missing)} not: start the ranks with torchrun, "
                           "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process")
    number = os.environ["RANK"]
    if not number.strip().isdigit() or int(number) >= int(size):
        raise FxSliceError(f"RANK={number!r} in the environment is not a rank in [0, {size})")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as exc:  # no peer at MASTER_ADDR:MASTER_PORT, a port in use, a timeout
        raise FxSliceError(f"cannot join the process group of {size} ranks at {os.environ['MASTER_ADDR']}:"
                           f"{os.environ['MASTER_PORT']} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return True


def raise_together(error: Optional[BaseException]) -> None:
    """Every rank raises when one does: a rank failing alone would leave the others waiting in the
    next collective. Every rank raises the same message, naming the rank that failed and its error
    (an :class:`FxSliceError` of that rank's class on that rank, an ``FxSliceError`` on the others);
    an error that is not an ``FxSliceError`` is re-raised as it is on its own rank."""
    failed = total(0.0 if error is None else 1.0)
    if not failed:
        return
    if _group_size() == 1:
        raise error
    import torch.distributed as dist

    reports: list = [None] * _group_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}"
                           if not isinstance(error, FxSliceError) else str(error))
    ranks = [number for number, report in enumerate(reports) if report is not None]
    who = f"all {len(ranks)} ranks" if len(ranks) == len(reports) else \
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {len(reports)}"
    message = f"{who} failed, every rank stops: {reports[ranks[0]]}"
    if error is not None and not isinstance(error, FxSliceError):
        raise error
    raise (type(error) if error is not None else FxSliceError)(message) from error


def shutdown() -> None:
    """Leave the process group :func:`init_from_environment` joined, once every rank is done (a rank
    that exits while another still works can abort the other's communication threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
