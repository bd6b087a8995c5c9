"""Recovery fine-tuning of a sliced model: LoRA adapters (peft, then merged) or every weight, trained
on the language-model loss or distilled from the dense model's logits.

Defaults follow SliceGPT's recovery fine-tuning (lora_r 32, lora_alpha 10, peft defaults
elsewhere), with a budget that fits a few CPU minutes. Adapters go on the attention and MLP
linears; the shortcut matrices and norm affines fxslice inserted are optional targets, the head
never (it is tied to the embedding in most small models). ``method="full"`` trains every weight
instead. Validation loss (next-token cross-entropy on held-out windows, whatever the training
objective) drives early stopping; the best state is kept, so the result is again a plain GraphModule.

Distillation (``teacher=``, Hinton et al. 2015): the loss of a batch is
``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` averaged over its positions, ``z_t`` the teacher's
logits and ``z_s`` the slice's; ``T²`` keeps the gradient's scale independent of the temperature.
The teacher's logits are computed batch by batch as training goes (streamed, never stored for the
whole training set: ``[windows, length, vocab]`` floats would outweigh both models).
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
from torch.nn import functional as F
from tabulate import tabulate
from tqdm.auto import tqdm

from ..errors import FxSliceError
from ..graph.quantized import model_dtype
from ..hf import device_of, logits_of
from ..options import FINETUNE_METHODS as METHODS
from .evaluate import next_token_loss


@dataclass
class FinetuneReport:
    targets: list[str]
    trained_parameters: int  # the parameters trained (adapters, or every weight with method "full")
    method: str = "lora"
    teacher: Optional[str] = None  # what the slice was distilled from (None: the language-model loss)
    temperature: Optional[float] = None
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
        return {"method": self.method, "objective": "distillation" if self.teacher else "language model",
                **({"teacher": self.teacher, "temperature": self.temperature} if self.teacher else {}),
                "targets": len(self.targets), "trained_parameters": self.trained_parameters, "steps": self.steps,
                "best_step": self.best_step, "stopped_early": self.stopped_early, "seconds": round(self.seconds, 1),
                "val_loss": self.val_losses, **self._validation_figures()}

    def _validation_figures(self) -> dict:
        """The held-out objective before and at its best: perplexity, or the distillation loss (KL)."""
        if self.teacher:
            return {"initial_val_kl": self.initial_val_loss, "best_val_kl": self.best_val_loss}
        return {"initial_val_ppl": math.exp(self.initial_val_loss), "best_val_ppl": math.exp(self.best_val_loss)}


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


def _validation_loss(model, batches, teacher: Optional[nn.Module] = None, temperature: float = 1.0) -> float:
    """Held-out loss per position: next-token cross-entropy, or with ``teacher`` the distillation loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            if teacher is None:
                total += next_token_loss(model, ids, reduction="sum").item()
                count += ids[:, 1:].numel()
            else:
                target = logits_of(teacher, ids.to(device_of(teacher))).to(ids.device)
                total += distillation_loss(logits_of(model, ids), target, temperature).item() * ids.numel()
                count += ids.numel()
    return total / count


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_t ‖ p_s)`` per position, averaged over positions; ``p = softmax(logits / T)``."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def _teacher_name(teacher: nn.Module) -> str:
    config = getattr(teacher, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(teacher).__name__


def check_temperature(temperature: object) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise FxSliceError(f"temperature must be a positive number, got {temperature!r}")


def _check_teacher(teacher: nn.Module, student: nn.Module, ids: torch.Tensor, temperature: float) -> None:
    """Refuse a teacher whose vocabulary differs from the slice's, or a temperature that is not > 0."""
    check_temperature(temperature)
    if not isinstance(teacher, nn.Module):
        raise FxSliceError(f"teacher must be the dense model (an nn.Module), got {type(teacher).__name__}")
    with torch.no_grad():
        want, got = logits_of(student, ids[:1, :2]).shape[-1], logits_of(teacher, ids[:1, :2]).shape[-1]
    if want != got:
        raise FxSliceError(f"teacher {_teacher_name(teacher)!r} predicts {got} tokens but the slice {want}: "
                           "distil from the dense model the slice was compressed from")


def finetune(model: nn.Module, train_batches: list[torch.Tensor], val_batches: list[torch.Tensor], *,
             method: str = "lora", **options) -> tuple[torch.fx.GraphModule, FinetuneReport]:
    """Recover a slice: ``method="lora"`` trains adapters (:func:`train_adapters`) and merges the best
    into the weights; ``"full"`` trains every weight (:func:`train_weights`). ``teacher=`` (the dense
    model) and ``temperature=`` distil instead of the language-model loss. The input model is
    untouched; the result is a plain GraphModule."""
    if method not in METHODS:
        raise FxSliceError(f"method must be one of {METHODS}, got {method!r}")
    if method == "full":
        tuned, report = train_weights(model, train_batches, val_batches, **options)
    else:
        peft_model, report = train_adapters(model, train_batches, val_batches, **options)
        tuned = merge(peft_model)
    if getattr(model, "fxslice", None) is not None:  # the same slice (widths, counts): fxslice.save records it
        tuned.fxslice = model.fxslice
    return tuned, report


def merge(peft_model) -> torch.fx.GraphModule:
    """Fold the adapters into the base weights (``W + (alpha / r) B A``) and drop peft's wrappers."""
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


def _check_budget(train_batches, val_batches, lr, epochs, eval_every, patience) -> None:
    if not train_batches or not val_batches:
        raise FxSliceError("finetune needs at least one training and one validation batch")
    if epochs < 1 or eval_every < 1 or patience < 1 or not lr > 0:
        raise FxSliceError(f"epochs, eval_every and patience must be positive and lr > 0, got epochs={epochs}, "
                           f"eval_every={eval_every}, patience={patience}, lr={lr}")


def train_adapters(model: nn.Module, train_batches: list[torch.Tensor], val_batches: list[torch.Tensor], *,
                   lora_r: int = 32, lora_alpha: float = 10.0, lora_dropout: float = 0.0, lr: float = 5e-4,
                   include_shortcuts: bool = False, seed: int = 0, **loop):
    """Train LoRA adapters on a private copy of ``model``; returns (peft model with the best adapters,
    report). ``loop``: :func:`_train` (epochs, eval_every, patience, teacher, temperature, progress)."""
    from peft import LoraConfig, get_peft_model

    if lora_r < 1:
        raise FxSliceError(f"lora_r must be a positive integer, got {lora_r}")
    torch.manual_seed(seed)
    record = sliced_record(model)
    base = trainable_copy(model)
    targets = lora_targets(base, record, include_shortcuts)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(base, config)
    report = _train(peft_model, FinetuneReport(targets, 0, "lora"), train_batches, val_batches, lr=lr,
                    kept=lambda key: "lora_" in key, **loop)
    return peft_model, report


def train_weights(model: nn.Module, train_batches: list[torch.Tensor], val_batches: list[torch.Tensor], *,
                  lr: float = 2e-5, seed: int = 0, **loop) -> tuple[torch.fx.GraphModule, FinetuneReport]:
    """Train every floating-point weight of a private copy of ``model`` (AdamW); returns (the copy at
    its best validation loss, report). ``loop``: :func:`_train`."""
    torch.manual_seed(seed)
    sliced_record(model)
    base = trainable_copy(model)
    names = []
    for name, param in base.named_parameters():
        param.requires_grad_(param.is_floating_point())
        if param.is_floating_point():
            names.append(name)
    report = _train(base, FinetuneReport(names, 0, "full"), train_batches, val_batches, lr=lr,
                    kept=lambda key: True, **loop)
    for param in base.parameters():
        param.requires_grad_(False)
    return base.eval(), report


def _train(net: nn.Module, report: FinetuneReport, train_batches, val_batches, *, lr: float, kept,
           epochs: int = 1, eval_every: int = 4, patience: int = 2, teacher: Optional[nn.Module] = None,
           temperature: float = 2.0, progress: bool = True) -> FinetuneReport:
    """AdamW on ``net``'s trainable parameters, the language-model loss or distillation from
    ``teacher``; validation every ``eval_every`` steps, stopping after ``patience`` passes without
    improvement; ``net`` is left holding the best state (the entries ``kept`` selects)."""
    _check_budget(train_batches, val_batches, lr, epochs, eval_every, patience)
    trainable = [p for p in net.parameters() if p.requires_grad]
    report.trained_parameters = sum(p.numel() for p in trainable)
    if teacher is not None:
        _check_teacher(teacher, net, train_batches[0], temperature)
        teacher.eval()
        report.teacher, report.temperature = _teacher_name(teacher), float(temperature)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    net.eval()  # no dropout anywhere in the captured graph; LoRA dropout follows lora_dropout

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in net.state_dict().items() if kept(k)}

    def validation() -> float:
        return _validation_loss(net, val_batches, teacher, temperature)

    best = validation()
    report.val_losses.append((0, best))
    best_state = snapshot()
    stale = 0
    total = epochs * len(train_batches)
    objective = "distil" if teacher is not None else "LM"
    bar = tqdm(total=total, desc=f"fxslice: {report.method} fine-tune ({objective})", unit="step",
               disable=not progress)
    for _ in range(epochs):
        for ids in train_batches:
            if teacher is None:
                loss = next_token_loss(net, ids)
            else:
                with torch.no_grad():
                    target = logits_of(teacher, ids.to(device_of(teacher))).to(ids.device)
                loss = distillation_loss(logits_of(net, ids), target, temperature)
                del target
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report.steps += 1
            report.train_losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{best:.3f}")
            if report.steps % eval_every == 0 or report.steps == total:
                val = validation()
                report.val_losses.append((report.steps, val))
                if val < best:
                    best, stale, report.best_step = val, 0, report.steps
                    best_state = snapshot()
                else:
                    stale += 1
                    if stale >= patience:
                        report.stopped_early = True
                        break
        if report.stopped_early:
            break
    bar.close()
    net.load_state_dict(best_state, strict=False)
    report.seconds = time.perf_counter() - started
    return report


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
        trained = "LoRA" if self.report.method == "lora" else "full fine-tune"
        distilled = " (distilled)" if self.report.teacher else ""
        return tabulate(rows, ["text", "ppl sliced", f"ppl sliced + {trained}{distilled}"], tablefmt="github")

    @property
    def summary(self) -> str:
        (_, before), (name, best) = self.report._validation_figures().items()
        what = "KL to the teacher" if self.report.teacher else "ppl"
        return (f"fine-tuned {self.report.steps} steps in {self.report.seconds:.0f}s (best at step "
                f"{self.report.best_step}, validation {what} {before:.4g} -> {best:.4g}); saved to {self.output}")


def finetune_job(folder: str, protocol, *, output: Optional[str] = None, overwrite: bool = False,
                 train_windows: int = 64, val_windows: int = 8, batch_size: int = 4, eval_batch_size: int = 4,
                 evaluate: bool = True, progress: bool = True, distill: bool = False, teacher: Optional[str] = None,
                 **options) -> FinetuneJobResult:
    """Fine-tune a saved sliced folder on the windows after its calibration windows (``options``: of
    :func:`finetune`), evaluate before and after, save the result (and its KV-cache program) to
    ``output``. ``distill``: learn the logits of ``teacher`` (a shipped name, hub id or folder;
    default: the dense model the folder was compressed from, its record's ``source_model``)."""
    from ..runtime.folder import check_destination, read_record
    from ..runtime.quantize import check_not_quantized
    from ..runtime.load import load
    from ..runtime.save import save
    from .data import batches, finetune_data, protocol_data
    from .evaluate import perplexity

    target = Path(output or f"{str(folder).rstrip('/')}-ft")
    record = read_record(folder)
    check_not_quantized(Path(folder), record, "fine-tune")
    check_destination(target, overwrite)
    teacher_name = (teacher or record.get("source_model")) if distill else None
    if teacher is not None and not distill:
        raise FxSliceError("--teacher names what --distill learns from: give --distill too")
    if distill:
        check_temperature(options.get("temperature", 2.0))
    if distill and not teacher_name:
        raise FxSliceError(f"{folder}'s fxslice.json names no source model to distil from: give the dense model "
                           "(--teacher MODEL)")
    sliced, tokenizer = load(folder, compiled=False)  # fine-tuning needs the graph, not compiled code
    if tokenizer is None:
        raise FxSliceError(f"{folder} has no tokenizer files")
    if distill:
        from .assets import load_model

        options["teacher"], _ = load_model(teacher_name, model_dtype(sliced))
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
                     "batch_size": batch_size, **{k: v for k, v in options.items() if k != "teacher"},
                     **({"teacher": teacher_name} if distill else {})},
    })
    generator = None
    if sliced.generator is not None:
        from ..runtime.generate import retarget

        generator = retarget(sliced.generator, merged)
    save(merged, target, tokenizer, result.record, overwrite=overwrite, generator=generator)
    return result

