"""Perplexity: ``exp(total NLL / number of predicted tokens)`` over fixed-length windows; the eval job."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm.auto import tqdm

from ..errors import FxSliceError
from ..hf import device_of, logits_of


def next_token_loss(model, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting tokens 2..T of each row of ``ids`` from the preceding ones."""
    logits = logits_of(model, ids)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


def perplexity(model, windows: list[torch.Tensor], desc: str = "perplexity", progress: bool = True) -> float:
    """Each window predicts its tokens 2..T from the preceding ones; no window sees another."""
    total, count = 0.0, 0
    device = device_of(model)
    with torch.no_grad():
        for ids in tqdm(windows, desc=desc, unit="batch", disable=not progress):
            ids = ids.to(device)
            total += next_token_loss(model, ids, reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


@dataclass
class EvalJobResult:
    """Perplexities (or lm-eval results) of one model, as ``fxslice eval`` prints them."""

    label: str
    params: Optional[int]
    perplexities: dict[str, float] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    length: int = 0
    tasks: Optional[dict] = None  # lm-eval's results dict

    def table(self) -> str:
        if self.tasks is not None:
            from .lmeval import results_table

            return results_table(self.tasks)
        rows = [[name, f"{ppl:.3f}", self.windows[name], self.length] for name, ppl in self.perplexities.items()]
        return tabulate(rows, ["text", "perplexity", "windows", "tokens/window"], tablefmt="github")

    @property
    def title(self) -> str:
        return f"{self.label}: {self.params:,} parameters" if self.params and self.tasks is None else self.label


def open_model(reference: str, dtype: str = "float32"):
    """``(model, tokenizer, label, parameter count)`` for a folder saved by fxslice, a shipped name, a
    hub id or a Hugging Face folder."""
    from ..runtime.folder import RECORD
    from ..runtime.load import load
    from ..graph.weights import count_parameters
    from .assets import load_model, torch_dtype

    if (Path(reference) / RECORD).exists():
        model, tokenizer = load(reference)
        record = model.record
        label = f"sliced ({record.get('source_model')}, {record.get('sparsity')})"
        params = record.get("param_count")
    else:
        model, tokenizer = load_model(reference, torch_dtype(dtype))
        label, params = f"dense {reference}", count_parameters(model)
    if tokenizer is None:
        raise FxSliceError(f"{reference} has no tokenizer files")
    return model, tokenizer, label, params


def evaluate_job(reference: str, protocol, *, dtype: str = "float32", eval_batch_size: int = 4,
                 tasks: Optional[list[str]] = None, limit: Optional[float] = None, num_fewshot: Optional[int] = None,
                 batch_size: int = 4, max_length: int = 2048, progress: bool = True) -> EvalJobResult:
    """Perplexity on the protocol's evaluation texts, or the lm-eval ``tasks`` when given."""
    from .data import batches, protocol_data

    model, tokenizer, label, params = open_model(reference, dtype)
    result = EvalJobResult(label, params, length=protocol.length)
    if tasks:
        from .lmeval import evaluate_tasks

        result.tasks = evaluate_tasks(model, tokenizer, tasks, batch_size=batch_size, limit=limit,
                                      num_fewshot=num_fewshot, max_length=max_length)
        return result
    _, evaluations = protocol_data(tokenizer, protocol)
    for name, windows in evaluations.items():
        result.perplexities[name] = perplexity(model, batches(windows, eval_batch_size), f"ppl {name}", progress)
        result.windows[name] = len(windows)
    return result
