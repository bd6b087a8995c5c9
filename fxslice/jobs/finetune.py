"""Recovery fine-tuning: LoRA adapters (peft) on a sliced model's Linear modules, then merged.

Defaults follow SliceGPT's recovery fine-tuning (lora_r 32, lora_alpha 10, peft defaults
elsewhere), with a budget that fits a few CPU minutes. Adapters go on the attention and MLP
linears; the shortcut matrices and norm affines fxslice inserted are optional targets, the head
never (it is tied to the embedding in most small models). Validation loss drives early stopping,
and the best adapters are merged into the weights, so the result is again a plain GraphModule.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tabulate import tabulate
from tqdm.auto import tqdm

from ..errors import FxSliceError
from .evaluate import next_token_loss


@dataclass
class FinetuneReport:
    targets: list[str]
    lora_parameters: int
    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def initial_val_loss(self) -> float:
        return self.val_losses[0][1]

    @property
    def best_val_loss(self) -> float:
        return min(loss for _, loss in self.val_losses)

    def to_dict(self) -> dict:
        return {"targets": len(self.targets), "lora_parameters": self.lora_parameters, "steps": self.steps,
                "best_step": self.best_step, "stopped_early": self.stopped_early, "seconds": round(self.seconds, 1),
                "val_loss": self.val_losses, "initial_val_ppl": math.exp(self.initial_val_loss),
                "best_val_ppl": math.exp(self.best_val_loss)}


def trainable_copy(model: nn.Module) -> torch.fx.GraphModule:
    """A private GraphModule with real ``nn.Linear`` layers: a copy of a sliced graph, or a loaded
    ``.pt2`` program canonicalised back into modules (its module names are the sliced graph's)."""
    from ..passes.p2_canonicalise import canonicalise
    from ..runtime.load import LoadedModel

    if isinstance(model, LoadedModel):
        return canonicalise(copy.deepcopy(model.program))
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model)
    raise FxSliceError(f"finetune expects a sliced GraphModule or a model loaded with fxslice.load, got {type(model).__name__}")


def sliced_record(model: nn.Module) -> dict:
    """The compression record of a sliced graph (``.fxslice``) or a loaded folder (``.record``)."""
    result = getattr(model, "fxslice", None)
    record = result.to_record() if result is not None else getattr(model, "record", None)
    if not isinstance(record, dict) or "inserted" not in record or "head" not in record:
        raise FxSliceError(
            f"{type(model).__name__} carries no record of the modules fxslice inserted and of the head "
            "(not returned by fxslice.compress, or saved by an older fxslice): compress the model again"
        )
    return record


def lora_targets(model: nn.Module, record: dict, include_shortcuts: bool = False) -> list[str]:
    """Names of the Linear modules that get adapters: every Linear but the head and the modules
    fxslice inserted (those too with ``include_shortcuts``), as listed in the compression ``record``."""
    head = set(record["head"])
    inserted = {m["name"] for m in record["inserted"]}
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name not in head and (include_shortcuts or name not in inserted)]
    if not names:
        raise FxSliceError("the model has no Linear module to put LoRA adapters on")
    return names


def _validation_loss(model, batches) -> float:
    with torch.no_grad():
        losses = [(next_token_loss(model, ids).item(), ids[:, 1:].numel()) for ids in batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def finetune(model: nn.Module, train_batches: list[torch.Tensor], val_batches: list[torch.Tensor],
             **options) -> tuple[torch.fx.GraphModule, FinetuneReport]:
    """Train LoRA adapters (see :func:`train_adapters`), keep the best by validation loss and merge them
    into the weights. The input model is untouched; the result is a plain GraphModule."""
    peft_model, report = train_adapters(model, train_batches, val_batches, **options)
    return merge(peft_model), report


def merge(peft_model) -> torch.fx.GraphModule:
    """Fold the adapters into the base weights (``W + (alpha / r) B A``) and drop peft's wrappers."""
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


def train_adapters(model: nn.Module, train_batches: list[torch.Tensor], val_batches: list[torch.Tensor], *,
                   lora_r: int = 32, lora_alpha: float = 10.0, lora_dropout: float = 0.0, lr: float = 5e-4,
                   epochs: int = 1, eval_every: int = 4, patience: int = 2, include_shortcuts: bool = False,
                   seed: int = 0, progress: bool = True):
    """Train LoRA adapters on a private copy of ``model``; returns (peft model with the best adapters, report)."""
    from peft import LoraConfig, get_peft_model

    if not train_batches or not val_batches:
        raise FxSliceError("finetune needs at least one training and one validation batch")
    if lora_r < 1 or epochs < 1 or eval_every < 1 or patience < 1 or lr <= 0:
        raise FxSliceError("lora_r, epochs, eval_every and patience must be positive, and lr > 0")
    torch.manual_seed(seed)
    record = sliced_record(model)
    base = trainable_copy(model)
    targets = lora_targets(base, record, include_shortcuts)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(base, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    report = FinetuneReport(targets, sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    peft_model.eval()  # no dropout anywhere in the captured graph; LoRA dropout follows lora_dropout
    best = _validation_loss(peft_model, val_batches)
    report.val_losses.append((0, best))
    best_state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    stale = 0
    total = epochs * len(train_batches)
    bar = tqdm(total=total, desc="fxslice: LoRA fine-tune", unit="step", disable=not progress)
    for _ in range(epochs):
        for ids in train_batches:
            loss = next_token_loss(peft_model, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report.steps += 1
            report.train_losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{best:.3f}")
            if report.steps % eval_every == 0 or report.steps == total:
                val = _validation_loss(peft_model, val_batches)
                report.val_losses.append((report.steps, val))
                if val < best:
                    best, stale, report.best_step = val, 0, report.steps
                    best_state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
                else:
                    stale += 1
                    if stale >= patience:
                        report.stopped_early = True
                        break
        if report.stopped_early:
            break
    bar.close()
    peft_model.load_state_dict(best_state, strict=False)
    report.seconds = time.perf_counter() - started
    return peft_model.eval(), report


@dataclass
class FinetuneJobResult:
    """What ``fxslice finetune`` measured and wrote."""

    report: FinetuneReport
    output: Path
    record: dict  # the fine-tuned folder's fxslice.json content (without versions and checksums)
    perplexities_before: dict[str, float] = field(default_factory=dict)
    perplexities_after: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [[name, f"{self.perplexities_before[name]:.2f}", f"{after:.2f}"]
                for name, after in self.perplexities_after.items()]
        return tabulate(rows, ["text", "ppl sliced", "ppl sliced + LoRA"], tablefmt="github")

    @property
    def summary(self) -> str:
        figures = self.report.to_dict()
        return (f"fine-tuned {self.report.steps} steps in {self.report.seconds:.0f}s (best at step "
                f"{self.report.best_step}, validation ppl {figures['initial_val_ppl']:.2f} -> "
                f"{figures['best_val_ppl']:.2f}); saved to {self.output}")


def finetune_job(folder: str, protocol, *, output: Optional[str] = None, overwrite: bool = False,
                 train_windows: int = 64, val_windows: int = 8, batch_size: int = 4, eval_batch_size: int = 4,
                 evaluate: bool = True, progress: bool = True, **options) -> FinetuneJobResult:
    """LoRA-fine-tune a saved sliced folder on the windows after its calibration windows, evaluate
    before and after, save the merged model (and its KV-cache program) to ``output``."""
    from ..runtime.folder import check_destination, read_record
    from ..runtime.quantize import check_not_quantized
    from ..runtime.load import load
    from ..runtime.save import save
    from .data import batches, finetune_data, protocol_data
    from .evaluate import perplexity

    target = Path(output or f"{str(folder).rstrip('/')}-ft")
    check_not_quantized(Path(folder), read_record(folder), "fine-tune")
    check_destination(target, overwrite)
    sliced, tokenizer = load(folder, compiled=False)  # fine-tuning needs the graph, not compiled code
    if tokenizer is None:
        raise FxSliceError(f"{folder} has no tokenizer files")
    train, val = finetune_data(tokenizer, protocol, train_windows, val_windows)
    merged, report = finetune(sliced, batches(train, batch_size), batches(val, batch_size), progress=progress, **options)
    result = FinetuneJobResult(report, target, {k: v for k, v in sliced.record.items() if k != "program_sha256"})
    if evaluate:
        _, evaluations = protocol_data(tokenizer, protocol)
        for name, windows in evaluations.items():
            chunks = batches(windows, eval_batch_size)
            result.perplexities_before[name] = perplexity(sliced, chunks, f"sliced ppl {name}", progress)
            result.perplexities_after[name] = perplexity(merged, chunks, f"fine-tuned ppl {name}", progress)
    result.record.update({
        "perplexity_before_finetune": result.record.get("perplexity"),
        "perplexity": result.perplexities_after,
        "finetune": {**report.to_dict(), "train_windows": train_windows, "val_windows": val_windows,
                     "batch_size": batch_size, **options},
    })
    generator = None
    if sliced.generator is not None:
        from ..runtime.generate import retarget

        generator = retarget(sliced.generator, merged)
    save(merged, target, tokenizer, result.record, overwrite=overwrite, generator=generator)
    return result
