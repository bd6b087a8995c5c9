"""Perplexity: ``exp(total NLL / number of predicted tokens)`` over fixed-length windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if not isinstance(model, torch.fx.GraphModule) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def perplexity(model, windows: list[torch.Tensor], desc: str = "perplexity", progress: bool = True) -> float:
    """Each window predicts its tokens 2..T from the preceding ones; no window sees another."""
    total, count = 0.0, 0
    device = next(iter(model.parameters())).device
    with torch.no_grad():
        for ids in tqdm(windows, desc=desc, unit="batch", disable=not progress):
            ids = ids.to(device)
            logits = _logits(model, ids)[:, :-1].float()
            targets = ids[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)
