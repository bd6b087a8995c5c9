"""The budget's split, measured: how much of ``target_params`` the stream width pays and how much the MLP units.

Narrowing the stream (PCA) and deleting MLP units (selection + ridge refit) cost a model differently
per parameter removed, and which costs less is a property of the model, not a constant. Under
``target_params`` with ``split="measured"`` (the default), :func:`measure_split` slices a few
candidate splits of the *same* budget on a quarter of the calibration windows and keeps the one whose
slice stays closest to the model on calibration windows none of them was calibrated on:

- the fixed split of pass 6 (stream sparsity ``s_f``, MLP hidden sparsity ``2.3 s_f``, units refilled
  to the budget: :func:`fxslice.passes.p6_widths.plan_budget`),
- the stream narrowed by ``⅔ s_f`` and ``⅓ s_f`` (when the rounding makes them new widths), the same fraction of every MLP's units meeting the
  rest (:func:`~fxslice.passes.p6_widths.fixed_stream_budget`),
- the stream whole and unrotated (``basis="none"``: no PCA, no shortcut, MLP units only) when the
  caller left ``basis`` to its default: the same share of every MLP's units, and (``allocation="measured"``)
  each MLP's share set by the divergence its cut alone causes (:func:`~fxslice.passes.p6_widths.mlp_sensitivities`),
  and a quarter of every attention's value dimensions cut as well (:mod:`fxslice.passes.p7_rotate.values`).

Score, per held-out token (masked tokens left out, summed over ``torch.distributed`` ranks): the
divergence ``KL(p_dense ‖ p_slice)`` of the next-token distributions when the dense model is in memory;
for a streamed checkpoint (never in memory) the slice's next-token cross-entropy, which differs from
the KL to the data only by the data's own entropy — the same for every candidate. The winner is then
compressed again on every calibration window; ``sliced.fxslice.split_search`` lists the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from .calibration import Batch, ids_and_mask, prepare_batches
from .distributed import total
from .errors import BudgetOutOfReach, FxSliceError
from .options import Options
from .passes.p6_widths import slice_width

STREAM_SHARES = (2 / 3, 1 / 3)
"""Stream sparsities tried besides the fixed split's ``s_f`` and the whole stream, as fractions of ``s_f``."""
VALUE_SHARE = 0.25
"""The share of every attention's value dimensions the value candidate cuts (MLP units meet the rest)."""
HELD_OUT = 8  # one calibration window (or batch) in this many scores the candidates
CALIBRATED = 4  # the candidates calibrate on one in this many of the others


@dataclass
class Candidate:
    """One split of the budget and how its slice scored on the held-out windows."""

    label: str
    options: Options  # what compress runs for it (``split="fixed"`` or an explicit ``stream_sparsity``)
    stream_sparsity: Optional[float] = None  # what its slice cut of the stream
    stream_width: Optional[int] = None  # the narrowest stream position of its slice
    hidden_size: Optional[int] = None
    hidden_sparsity: Optional[float] = None
    param_fraction: Optional[float] = None
    score: Optional[float] = None
    refused: Optional[str] = None  # why this split cannot meet the budget


@dataclass
class SplitSearch:
    """What :func:`measure_split` tried and chose (``sliced.fxslice.split_search``)."""

    criterion: str  # "kl" or "cross-entropy"
    calibration_windows: int
    held_out_windows: int
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Optional[str] = None

    def table(self) -> str:
        rows = [[c.label + (" (chosen)" if c.label == self.chosen else ""),
                 c.stream_width if c.stream_width is not None else "-",
                 "-" if c.hidden_sparsity is None else f"{c.hidden_sparsity:.1%}",
                 "-" if c.param_fraction is None else f"{c.param_fraction:.1%}",
                 c.refused or f"{c.score:.4g}"] for c in self.candidates]
        return tabulate(rows, headers=["split", "stream width", "MLP units cut", "params", f"held-out {self.criterion}"])

    def to_record(self) -> dict:
        return {"criterion": self.criterion, "chosen": self.chosen, "calibration_windows": self.calibration_windows,
                "held_out_windows": self.held_out_windows,
                "candidates": [{"label": c.label, "stream_width": c.stream_width, "hidden_sparsity": c.hidden_sparsity,
                                "param_fraction": c.param_fraction, "score": c.score, "refused": c.refused}
                               for c in self.candidates]}


def hold_out(items: list) -> Optional[tuple[list, list]]:
    """``(calibration, held_out)``: disjoint calibration items for the candidates — the batches when
    there are two or more, else the rows of the one batch; None when there is a single window."""
    if len(items) < 2:
        try:
            ids, mask = ids_and_mask(items[0], 0)
        except FxSliceError:
            return None  # the compression itself names what is wrong with it
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 2:
            return None
        items = [{"input_ids": ids[i:i + 1], **({} if mask is None else {"attention_mask": mask[i:i + 1]})}
                 for i in range(ids.shape[0])]
    held = max(1, len(items) // HELD_OUT)
    rest = items[:-held]
    return rest[:max(1, len(rest) // CALIBRATED)], items[-held:]


def held_out_score(sliced: nn.Module, teacher: Optional[nn.Module], batches: list[Batch]) -> float:
    """Mean ``KL(teacher ‖ sliced)`` over the held-out tokens, or without a teacher the sliced model's
    next-token cross-entropy (nats per token)."""
    summed, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids = batch.input_ids
            real = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            logits = sliced(ids).logits
            for row in range(ids.shape[0]):
                log_q = logits[row].float().log_softmax(-1)
                if teacher is not None:
                    device = next(teacher.parameters()).device
                    reference = teacher(input_ids=ids[row:row + 1].to(device), use_cache=False).logits[0]
                    log_p = reference.to(log_q.device).float().log_softmax(-1)
                    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
                    keep = real[row]
                else:  # position t predicts token t + 1 (both real)
                    per_token = -log_q[:-1].gather(-1, ids[row, 1:, None].to(log_q.device))[:, 0]
                    keep = real[row, :-1] & real[row, 1:]
                summed += float(per_token[keep.to(per_token.device)].sum())
                tokens += int(keep.sum())
    tokens = total(tokens)
    if tokens == 0:
        raise FxSliceError("split='measured': every held-out calibration token is masked out; give more windows "
                           "or split='fixed'")
    return total(summed) / tokens


def candidates(options: Options, fixed: Candidate, hidden_size: int, free_basis: bool) -> list[Candidate]:
    """The splits tried besides the fixed one (already run): the stream narrowed less (widths the rounding
    makes equal to one already tried left out), then whole."""
    found, widths = [], {fixed.stream_width}
    for share in STREAM_SHARES if fixed.stream_sparsity else ():
        sparsity = share * fixed.stream_sparsity
        width = slice_width(hidden_size, sparsity, options.round_to)
        if width not in widths and width < hidden_size:
            widths.add(width)
            found.append(Candidate(f"stream {width} of {hidden_size}", replace(options, stream_sparsity=sparsity)))
    if free_basis and not options.slice_head:
        found.append(Candidate("stream whole (basis none)", unrotated(options)))
        if options.allocation == "uniform":
            found.append(Candidate("stream whole, MLP units by measured sensitivity",
                                   unrotated(options, allocation="measured")))
        if not options.value_sparsity:
            found.append(Candidate(f"stream whole, attention values cut {VALUE_SHARE:.0%}",
                                   unrotated(options, value_sparsity=VALUE_SHARE)))
    return found


def unrotated(options: Options, **changes) -> Options:
    """``options`` with the stream whole and unrotated (``basis="none"``, no basis span), and ``changes``."""
    return replace(options, basis="none", basis_span=1, **changes)


def measure_split(options: Options, items: list, teacher: Optional[nn.Module], free_basis: bool,
                  run_candidate: Callable[[Options, list], GraphModule],
                  progress: bool) -> tuple[Options, Optional[SplitSearch]]:
    """The options the final compression runs with (the best candidate's) and the search's record.

    ``run_candidate(options, items)`` compresses with ``options`` on the calibration ``items`` and
    returns the slice (an :class:`FxSliceError` means the split cannot meet the budget). A single
    calibration window leaves nothing to hold out: the fixed split, and no record."""
    windows = hold_out(items)
    if windows is None:
        return replace(options, split="fixed"), None
    calibration, held_out = windows
    search = SplitSearch("kl" if teacher is not None else "cross-entropy", len(calibration), len(held_out))
    fixed = Candidate("fixed (hidden 2.3x stream)", replace(options, split="fixed"))
    bar = tqdm(total=len(STREAM_SHARES) + 4, desc="measuring the budget's split", disable=not progress)
    out_of_reach: Optional[BudgetOutOfReach] = None
    try:
        try:  # out of reach where the rotation's own Linears cost more than narrowing saves (AXK2's read maps)
            _score(fixed, run_candidate, calibration, held_out, teacher)
        except BudgetOutOfReach as exc:  # the stream-whole candidates may still meet it; anything else stops here
            fixed.refused, out_of_reach = str(exc), exc
        bar.update()
        search.candidates.append(fixed)
        for candidate in candidates(options, fixed, fixed.hidden_size, free_basis):
            try:
                _score(candidate, run_candidate, calibration, held_out, teacher)
            except FxSliceError as exc:
                candidate.refused = str(exc)
            search.candidates.append(candidate)
            bar.update()
    finally:
        bar.close()
    scored = [c for c in search.candidates if c.score is not None]
    if not scored:  # the fixed split's refusal speaks for the budget
        raise out_of_reach
    best = min(scored, key=lambda c: c.score)
    search.chosen = best.label
    return best.options, search


def _score(candidate: Candidate, run_candidate, calibration: list, held_out: list,
           teacher: Optional[nn.Module]) -> None:
    """Compress ``candidate`` on the calibration items and score its slice on the held-out ones."""
    sliced = run_candidate(candidate.options, calibration)
    result = sliced.fxslice
    if candidate.options.value_sparsity and not result.value_widths:
        reasons = sorted(set(result.skipped_attentions.values()))
        raise FxSliceError("no attention's values can be narrowed" + (f" ({reasons[0]})" if reasons else ""))
    held_out = prepare_batches(held_out, result.vocab_size, next(sliced.parameters()).device)
    candidate.stream_sparsity = result.sparsity
    candidate.hidden_size = result.hidden_size
    candidate.stream_width = min(result.widths)
    candidate.hidden_sparsity = result.hidden_sparsity
    candidate.param_fraction = result.param_count / result.dense_param_count
    candidate.score = held_out_score(sliced, teacher, held_out)
