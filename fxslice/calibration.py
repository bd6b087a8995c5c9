"""Calibration data: validated before anything is captured or changed, handed to the passes as batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .distributed import rank, world_size
from .errors import CalibrationError, FxSliceError

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64 on the model's device
    attention_mask: Optional[torch.Tensor]  # [B, T] bool (True: a real token), or None

    @property
    def tokens(self) -> int:
        """Tokens that enter the PCA (masked positions left out)."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()


def token_rows(value: torch.Tensor, batch: Optional[Batch]) -> torch.Tensor:
    """``value`` (``[B, T, D]``, or ``[B·T, D]`` where a model flattens its tokens: B-major either way; ``[B, T,
    N, D]`` for a stream of ``N`` copies per token) as one row per token (and copy), the tokens ``batch``
    masks out left out."""
    rows = value.reshape(-1, value.shape[-1])
    if batch is not None and batch.attention_mask is not None:
        mask = batch.attention_mask
        if value.dim() > 3 or rows.shape[0] != mask.numel():  # copies per token: each token's mask covers them
            if tuple(value.shape[:2]) != tuple(mask.shape):
                raise CalibrationError(f"a stream value of shape {list(value.shape)} does not start with the "
                                       f"batch's [batch, tokens] {list(mask.shape)}: its padded tokens cannot be "
                                       "left out (calibrate without an attention mask)")
            mask = mask.reshape(*mask.shape, *[1] * (value.dim() - 3)).expand(value.shape[:-1])
        rows = rows[mask.reshape(-1)]
    return rows


def token_count(batches: list[Batch]) -> int:
    return sum(b.tokens for b in batches)


def ids_and_mask(batch, i: int) -> tuple[object, object]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise CalibrationError(f"calibration batch {i} is a mapping without 'input_ids' (keys: {sorted(batch)})")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise CalibrationError(
        f"calibration batch {i} is a {type(batch).__name__}; expected a LongTensor [B, T] or a mapping "
        "with 'input_ids' (and optionally 'attention_mask')"
    )


def _check_ids(ids, i: int, vocab_size: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in INTEGER_DTYPES:
        raise CalibrationError(f"calibration batch {i}: input_ids must be an integer tensor, got "
                               f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise CalibrationError(f"calibration batch {i}: input_ids must have shape [B, T] with B, T > 0, got {list(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise CalibrationError(f"calibration batch {i}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def _check_mask(mask, ids: torch.Tensor, i: int) -> None:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise CalibrationError(
            f"calibration batch {i}: attention_mask must be a tensor of the same shape as input_ids "
            f"{list(ids.shape)}, got {list(getattr(mask, 'shape', []))}"
        )
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise CalibrationError(f"calibration batch {i}: attention_mask must contain only 0 and 1")


def check_lengths(batches: list[Batch], max_positions: Optional[int]) -> None:
    """Refuse sequences longer than a learned position table of ``max_positions`` rows."""
    if max_positions is None:
        return
    for i, batch in enumerate(batches):
        if batch.input_ids.shape[1] > max_positions:
            raise CalibrationError(
                f"calibration batch {i} has sequences of {batch.input_ids.shape[1]} tokens but the model's position "
                f"table holds {max_positions} (config.max_position_embeddings): use shorter windows"
            )


def prepare_batches(calib_loader: Iterable, vocab_size: int, device: torch.device) -> list[Batch]:
    """Validate and materialise the calibration batches (before anything is captured or changed)."""
    if isinstance(calib_loader, torch.Tensor) and calib_loader.dim() == 2:
        raise CalibrationError(
            "calib_loader is a single [B, T] tensor; pass an iterable of batches, e.g. [input_ids] or input_ids.split(8)"
        )
    if calib_loader is None or isinstance(calib_loader, (str, bytes)):
        raise CalibrationError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}")
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise CalibrationError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}") from None
    batches = []
    for i, batch in enumerate(iterator):
        ids, mask = ids_and_mask(batch, i)
        _check_ids(ids, i, vocab_size)
        if mask is not None:
            _check_mask(mask, ids, i)
            mask = mask.to(device=device, dtype=torch.bool)
        batches.append(Batch(ids.to(device=device, dtype=torch.long), mask))
    if not batches:
        shared = f" on rank {rank()} of {world_size()} (under torch.distributed every rank calibrates on its own " \
                 "batches: give each rank at least one)" if world_size() > 1 else ""
        raise CalibrationError(f"calib_loader yielded no batches{shared}")
    if token_count(batches) == 0:
        raise CalibrationError("every calibration token is masked out by attention_mask")
    return batches


def check_device(device: str) -> None:
    """A torch device name that exists on this machine."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FxSliceError(f"device must be a torch device such as cpu or cuda, got {device!r}") from exc
    if where.type == "cpu":
        return
    backend = getattr(torch, where.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise FxSliceError(f"device {device!r} requested but {where.type} is not available on this machine")
    count = getattr(backend, "device_count", None)
    if where.index is not None and callable(count) and where.index >= count():
        raise FxSliceError(f"device {device!r} requested but this machine has {count()} {where.type} device(s)")
