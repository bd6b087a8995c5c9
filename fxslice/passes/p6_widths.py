"""Pass 6 — widths: how wide every stream position and every MLP stays, and which positions share a basis.

The width policy, one pass between fuse and rotate: :func:`choose_widths` takes the plan and the
options and returns :class:`Widths` (stream widths, MLP units kept, basis groups). Widths from a
sparsity or a parameter budget are a function of the fused plan alone (no calibration), because a
parameter count is; ``allocation="energy"`` also measures each unit's output energy with one
forward of the fused graph (:func:`unit_energies`). :func:`sliced_parameter_count` predicts the true count of the sliced
graph (inserted modules included, a tied head once, shortcuts that rotation removes left out)
for any widths; :func:`plan_budget` searches the widths meeting ``target_params``.

The budget's two knobs move together: a stream sparsity ``s`` and an MLP hidden sparsity
``h = HIDDEN_PER_STREAM · s`` (capped at ``MAX_HIDDEN``). The ratio is the measured best mix on the
shipped protocol (``scripts/bench_pareto.py``): deleting hidden units with a refit costs less
perplexity per parameter than narrowing the stream, until it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..calibration import Batch, token_rows
from ..distributed import all_reduce_sum
from ..errors import BudgetOutOfReach, FxSliceError
from ..graph.modules import WEIGHTED
from ..graph.weights import f64, set_linear, sync_features
from .p4_keys import feasible_keep, features_left
from .p4_mlps import MLP
from .p5_fuse import Plan

if TYPE_CHECKING:
    from ..options import Options
    from .run import Run


HIDDEN_PER_STREAM = 2.3
MAX_HIDDEN = 0.6
EXPERT_UNIT_STEP = 8
"""A stock checkpoint's experts keep a multiple of this many units: transformers' grouped expert kernels
(``torch._grouped_mm``), which ``from_pretrained`` models run, need row strides a multiple of 16 bytes."""
TOLERANCE = 0.005  # the budget is met within this fraction of the dense count (from below)


@dataclass
class Widths:
    """The hand-over value to rotation: a width per stream position, a kept-unit count per MLP writer,
    and the groups of positions that share one PCA basis."""

    stream: list[int]
    hidden: dict[str, int] = field(default_factory=dict)
    stream_sparsity: float = 0.0
    hidden_sparsity: float = 0.0
    groups: list[list[int]] = field(default_factory=list)
    rotate: bool = True  # False: the stream keeps its coordinates (``basis="none"``), no PCA
    values: dict[str, int] = field(default_factory=dict)  # attention W_o -> value dimensions kept per group
    query_keys: dict[str, int] = field(default_factory=dict)  # attention W_o -> query/key dimensions kept per group


def basis_groups(plan: Plan, basis: str, span: int = 1) -> list[list[int]]:
    """Positions sharing one PCA basis: each rotated position alone, the plan's block groups (also the
    calibration order of an unrotated stream, ``basis="none"``) — ``span`` consecutive ones joined —, or
    every rotated position at once."""
    if basis == "position":
        return [[p.index] for p in plan.rotated]
    if basis == "model":
        return [[p.index for p in plan.rotated]]
    return join_blocks(plan, plan.block_groups, span) if basis == "block" else plan.block_groups


def join_blocks(plan: Plan, groups: list[list[int]], span: int) -> list[list[int]]:
    """Runs of up to ``span`` consecutive block groups as one group: a group joins the run before it where
    its first position's skip edge starts at the run's last position and both are centred alike. The
    shortcuts between them become the identity and are removed (:func:`identity_shortcuts`); one basis
    then fits ``span`` blocks' positions."""
    joined: list[list[int]] = []
    runs: list[int] = []
    for group in groups:
        first = plan.positions[group[0]]
        if joined and runs[-1] < span and first.skip_source == joined[-1][-1] \
                and first.centered == plan.positions[joined[-1][-1]].centered:
            joined[-1].extend(group)
            runs[-1] += 1
        else:
            joined.append(list(group))
            runs.append(1)
    return joined


def choose_widths(plan: Plan, options: "Options", dense_count: int, batches: list[Batch]) -> Widths:
    """The widths ``options`` ask for: a sparsity, or the widths meeting a parameter budget; MLP units
    spread uniformly or by measured energy (the budget's leftover units then refilled one by one)."""
    groups = basis_groups(plan, options.basis, options.basis_span)
    cuts = HeadCuts(value_widths(plan, float(options.value_sparsity or 0.0), options.round_to),
                    key_widths(plan, float(options.key_sparsity or 0.0), options.round_to))
    if options.basis == "none":
        widths = unrotated_widths(plan, options, dense_count, groups, cuts)
    elif options.target_params is not None and options.stream_sparsity is not None:
        widths = fixed_stream_budget(plan, options.target_params, dense_count, float(options.stream_sparsity),
                                     options.round_to, options.slice_head, groups, cuts=cuts)
    elif options.target_params is not None:
        widths = plan_budget(plan, options.target_params, dense_count, options.round_to, options.slice_head, groups,
                             cuts)
    else:
        widths = uniform_widths(plan, float(options.sparsity), float(options.hidden_sparsity or 0.0),
                                options.round_to, options.slice_head, groups, cuts)
    if options.allocation != "uniform" and any(widths.hidden[m.writer] < m.width for m in plan.mlps):
        widths.hidden = reallocate_units(plan, widths.hidden, options.allocation, batches, options.round_to)
        if options.target_params is not None:  # units the rounding left over, one at a time
            widths, _ = fill_hidden(widths, plan.mlps, options.target_params * dense_count, 1,
                                    lambda w: sliced_parameter_count(plan, w))
    return widths


def reallocate_units(plan: Plan, uniform: dict[str, int], allocation: str, batches: list[Batch],
                     round_to: int) -> dict[str, int]:
    """The units of the uniform widths ``uniform``, as many in all, spread over the MLPs by measured
    output energy (``"energy"``) or by measured sensitivity (``"measured"``); both measure the dense
    model in memory and rank the units of dense MLPs."""
    experts = next((m.writer for m in plan.mlps if m.experts), None)
    if experts is not None:
        raise FxSliceError(f"allocation={allocation!r} ranks the units of dense MLPs; a mixture of experts "
                           f"('{experts}') takes allocation='uniform'")
    if any(plan.weights.manages(m.writer) for m in plan.mlps):
        raise FxSliceError(f"allocation={allocation!r} measures the dense model in memory; a streamed or "
                           "offloaded compression takes allocation='uniform'")
    total = sum(uniform.values())
    if allocation == "energy":
        return allocate_units(plan.mlps, unit_energies(plan, batches), total, round_to)
    return allocate_by_sensitivity(plan.mlps, mlp_sensitivities(plan, batches, uniform), total, round_to)


@dataclass(frozen=True)
class HeadCuts:
    """What each attention keeps per key/value group: value dimensions (:func:`value_widths`) and query/key
    dimensions (:func:`key_widths`), by output Linear ``W_o``; an attention not listed stays whole."""

    values: dict[str, int] = field(default_factory=dict)
    query_keys: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def fields_of(cuts: Optional["HeadCuts"]) -> dict:
        """``Widths`` keyword arguments (fresh dicts) for ``cuts`` (None: nothing cut)."""
        cuts = cuts or HeadCuts()
        return {"values": dict(cuts.values), "query_keys": dict(cuts.query_keys)}


def key_widths(plan: Plan, key_sparsity: float, round_to: int) -> dict[str, int]:
    """Query/key dimensions kept per key/value group of every attention whose units pass 4 measured
    (:mod:`.p4_keys`): the same fraction of each, rounded down to ``round_to`` (at least one step), then to the
    widest width at most that which whole units add up to (at least the smallest unit); none for
    ``key_sparsity`` 0."""
    if not key_sparsity:
        return {}
    kept = {}
    for attention in plan.attentions:
        keys = attention.query_key
        if keys is not None:
            keep = feasible_keep(keys.unit_sizes, head_width(keys.width, key_sparsity, round_to))
            if keep < keys.width:
                kept[attention.writer] = keep
    return kept


def value_widths(plan: Plan, value_sparsity: float, round_to: int) -> dict[str, int]:
    """Value dimensions kept per key/value group of every attention (pass 4 found): the same fraction of
    each, rounded down to ``round_to`` (at least one step); none for ``value_sparsity`` 0."""
    if not value_sparsity:
        return {}
    return {a.writer: head_width(a.width, value_sparsity, round_to) for a in plan.attentions}


def head_width(full: int, sparsity: float, round_to: int) -> int:
    """A head dimension cut by ``sparsity``, rounded down to ``round_to``, never below one rounding step."""
    return max(slice_width(full, sparsity, round_to), min(round_to, full))


def unrotated_widths(plan: Plan, options: "Options", dense_count: int, groups: list[list[int]],
                     cuts: Optional[HeadCuts] = None) -> Widths:
    """Widths of an unrotated stream (``basis="none"``): every position whole, MLP units cut by
    ``hidden_sparsity`` or to meet ``target_params`` (:func:`fixed_stream_budget`). The graph then has the
    stock model's parameters exactly; rotation runs without PCA."""
    expert_step = EXPERT_UNIT_STEP if options.stock else 1
    if options.target_params is None:
        stream = stream_widths(plan, 0.0, options.round_to, False)
        sparsity = float(options.hidden_sparsity or 0.0)
        return Widths(stream, hidden_widths(plan.mlps, sparsity, options.round_to, expert_step), 0.0, sparsity, groups,
                      rotate=False, **HeadCuts.fields_of(cuts))
    return fixed_stream_budget(plan, options.target_params, dense_count, 0.0, options.round_to, False, groups,
                               rotate=False, expert_step=expert_step, cuts=cuts)


def fixed_stream_budget(plan: Plan, target: float, dense_count: int, stream_sparsity: float, round_to: int,
                        slice_head: bool, groups: list[list[int]], rotate: bool = True, expert_step: int = 1,
                        cuts: Optional[HeadCuts] = None) -> Widths:
    """Widths meeting ``target_params`` with the stream cut by ``stream_sparsity`` (0 and ``rotate=False``:
    the stream whole and unrotated) and the same fraction of every MLP's units cut for the rest — the
    rounding's steps, else single units; found by bisection on the hidden sparsity."""
    stream = stream_widths(plan, stream_sparsity, round_to, slice_head)

    def at(sparsity: float, step: int) -> Widths:
        return Widths(list(stream), hidden_widths(plan.mlps, sparsity, step, expert_step), stream_sparsity, sparsity,
                      groups, rotate=rotate, **HeadCuts.fields_of(cuts))

    def count(widths: Widths) -> int:
        return sliced_parameter_count(plan, widths)

    what = "with the stream whole (basis='none')" if not rotate else f"with stream_sparsity {stream_sparsity:g}"
    goal = target * dense_count
    chosen = at(0.0, round_to)
    if count(chosen) <= goal:
        if count(chosen) < goal - TOLERANCE * dense_count and rotate:
            raise FxSliceError(f"target_params {target} is below what stream_sparsity {stream_sparsity:g} keeps with "
                               f"every MLP whole ({count(chosen) / dense_count:.1%} of dense): lower stream_sparsity")
        return chosen
    for step in dict.fromkeys((round_to, 1)):  # the rounding's steps, then single units
        narrowest = count(at(1.0 - 1e-9, step))
        if narrowest > goal:
            raise BudgetOutOfReach(f"target_params {target} is out of reach {what}: cutting every MLP to {step} "
                                   f"unit(s) keeps {narrowest / dense_count:.1%} of the dense parameters")
        chosen = at(least_sparsity(lambda h: count(at(h, step)), goal, 0.0, 1.0), step)
        if count(chosen) >= goal - TOLERANCE * dense_count:
            chosen.hidden_sparsity = removed_unit_fraction(chosen, plan.mlps)
            return chosen
    steps = f" (a stock checkpoint's experts keep multiples of {expert_step} units)" \
        if expert_step > 1 and any(m.experts for m in plan.mlps) else ""
    raise FxSliceError(f"target_params {target} cannot be met within {TOLERANCE:.1%} {what} by cutting the same "
                       f"fraction of every MLP: the nearest count below it is {count(chosen) / dense_count:.2%} of dense"
                       + steps)


def least_sparsity(count_at, goal: float, low: float, high: float) -> float:
    """The least sparsity in ``[low, high]`` whose count ``count_at(s)`` is within ``goal``, by bisection
    (the count falls, in steps, as the sparsity grows; ``count_at(high) <= goal``)."""
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if count_at(middle) <= goal else (middle, high)
    return high


def removed_unit_fraction(widths: Widths, mlps: list[MLP]) -> float:
    """The share of all MLP hidden units that ``widths`` deletes."""
    full = sum(m.width for m in mlps)
    return 1.0 - sum(widths.hidden[m.writer] for m in mlps) / full if full else 0.0


def slice_width(full: int, sparsity: float, round_to: int) -> int:
    """``floor(full (1 - sparsity))`` rounded down to a multiple of ``round_to`` when it deletes
    anything (``full`` stays ``full``: sparsity 0 is exact whatever the size)."""
    width = math.floor(full * (1.0 - sparsity) + 1e-9)
    if round_to > 1 and width < full:
        width -= width % round_to
    return width


def stream_widths(plan: Plan, sparsity: float, round_to: int, slice_head: bool) -> list[int]:
    """The width of every stream position: ``d`` for rotated positions, ``D`` for raw ones, the head's
    input kept whole unless ``slice_head``. A centred position never keeps more than ``D - 1``
    coordinates (the last one, along ``1/√D``, is always zero)."""
    hidden = plan.hidden_size
    width = slice_width(hidden, sparsity, round_to)
    if width < 1:
        raise FxSliceError(f"sparsity {sparsity} leaves no column of the hidden size {hidden} (round_to={round_to})")
    widths = []
    for p in plan.positions:
        cap = hidden - 1 if p.centered else hidden
        if not p.rotated:
            widths.append(hidden)
        elif p is plan.last and not slice_head:
            widths.append(cap)
        else:
            widths.append(min(width, cap))
    return widths


def unit_step(mlp: MLP, round_to: int, expert_step: int = 1) -> int:
    """The rounding of an MLP's kept units: ``round_to``, and at least ``expert_step`` for experts."""
    return max(round_to, expert_step) if mlp.experts else round_to


def hidden_widths(mlps: list[MLP], sparsity: float, round_to: int, expert_step: int = 1) -> dict[str, int]:
    """Units kept per MLP writer: the same fraction of each (at least one rounding step, or one unit)."""
    steps = {m.writer: unit_step(m, round_to, expert_step) for m in mlps}
    return {m.writer: max(slice_width(m.width, sparsity, steps[m.writer]), min(steps[m.writer], m.width)) for m in mlps}


def uniform_widths(plan: Plan, sparsity: float, hidden_sparsity: float, round_to: int, slice_head: bool,
                   groups: list[list[int]], cuts: Optional[HeadCuts] = None) -> Widths:
    """Widths for a stream sparsity and an MLP hidden sparsity, the same everywhere (attention value and
    query/key dimensions: ``cuts``)."""
    return Widths(stream_widths(plan, sparsity, round_to, slice_head), hidden_widths(plan.mlps, hidden_sparsity, round_to),
                  sparsity, hidden_sparsity, groups, **HeadCuts.fields_of(cuts))


def identity_shortcuts(plan: Plan, group: list[int], widths: Widths) -> list[int]:
    """The positions of a basis group whose incoming shortcut is the identity once the group is
    rotated: fed by another member of the group at the same width (``Q_dᵀ Q_d = I``), unless the
    shortcut holds a per-dimension map. An unrotated plan has no shortcut at all."""
    stream, members = widths.stream, set(group)
    return [index for index in group
            if plan.positions[index].shortcut is not None and not plan.positions[index].mapped_shortcut
            and plan.positions[index].skip_source in members
            and stream[index] == stream[plan.positions[index].skip_source]]


def removed_shortcuts(plan: Plan, widths: Widths) -> set[str]:
    """The names of the shortcuts rotation removes (:func:`identity_shortcuts` of every group)."""
    return {plan.positions[index].shortcut for group in widths.groups for index in identity_shortcuts(plan, group, widths)}


def sliced_parameter_count(plan: Plan, widths: Widths) -> int:
    """The unique parameter count the sliced graph will have (tied weights once, inserted modules
    included, shortcuts that rotation removes left out)."""
    layout = plan.layout()
    gone = removed_shortcuts(plan, widths)
    units_in = dict(widths.hidden)  # MLP writer -> kept units (its input features)
    units_out = {reader: parts * widths.hidden[m.writer] for m in plan.mlps if m.writer in widths.hidden
                 for reader, parts in m.readers.items()}
    for attention in plan.attentions:  # value dimensions kept per key/value group
        kept = widths.values.get(attention.writer, attention.width)
        units_out[attention.reader] = attention.groups * kept
        units_in[attention.writer] = attention.heads * kept
        if attention.writer in widths.query_keys:  # query/key dimensions kept per group: W_q's and W_k's features
            for path in (attention.query_key.query, attention.query_key.key):
                units_out[path.linear] = features_left(path, widths.query_keys[attention.writer], attention.query_key.width)
    for branch in plan.branches:  # pass 7: y and the norm's affine at the position's width
        units_in[branch.affine] = widths.stream[branch.position]
        units_out.update({writer: widths.stream[branch.position] for writer in branch.writers})
    tied_embedding = plan.tied.embedding if plan.tied is not None else None
    total, seen = 0, set()
    for name, module in plan.gm.named_modules():
        direct = [p for _, p in module.named_parameters(recurse=False)]
        if isinstance(module, WEIGHTED):
            if direct and all(id(p) in seen for p in direct):
                continue  # a head sharing the embedding's parameter (an unrotated tied model): counted once
            seen.update(id(p) for p in direct)
            reads, writes = layout.get(name, (None, None))
            if isinstance(module, nn.Embedding):
                if name != tied_embedding:
                    total += module.num_embeddings * (widths.stream[writes] if writes is not None
                                                      else module.embedding_dim)
            elif name not in gone:
                copies = module.in_features // plan.hidden_size if reads is not None else 1  # merged copies
                fan_in = units_in.get(name, copies * widths.stream[reads] if reads is not None else module.in_features)
                fan_out = units_out.get(name, widths.stream[writes] if writes is not None else module.out_features)
                experts = getattr(module, "num_experts", 1)  # an ExpertLinear: one matrix per expert
                biased = module.bias is not None or name in plan.folded_biases
                total += experts * (fan_in * fan_out + (fan_out if biased else 0))
        else:
            total += sum(p.numel() for p in direct if id(p) not in seen)
            seen.update(id(p) for p in direct)
    return total


def plan_budget(plan: Plan, target: float, dense_count: int, round_to: int, slice_head: bool,
                groups: list[list[int]], cuts: Optional[HeadCuts] = None) -> Widths:
    """Widths whose sliced count is at most ``target · dense_count`` and within ``TOLERANCE`` of it.

    First the least sparsity ``s`` (hidden ``min(HIDDEN_PER_STREAM · s, MAX_HIDDEN)``) within the
    budget, by bisection; then hidden units are given back (:func:`fill_hidden`) while the count
    stays within the budget (a stream column costs hundreds of parameters per block, a hidden unit
    a few: this is what makes the budget exact). Where the stream's rounding step is too coarse for
    that, the stream one step wider with the MLPs cut to ``MAX_HIDDEN`` and refilled is tried too,
    and the last units are given back one at a time if ``round_to`` units are still too many.
    Refused when the budget is out of reach or the rounding cannot meet it.
    """
    goal = target * dense_count
    mlps = plan.mlps

    def widths_at(s: float) -> Widths:
        return uniform_widths(plan, s, min(HIDDEN_PER_STREAM * s, MAX_HIDDEN) if mlps else 0.0, round_to,
                              slice_head, groups, cuts)

    def count(widths: Widths) -> int:
        return sliced_parameter_count(plan, widths)

    low, high = 0.0, 1.0 - min(round_to, plan.hidden_size) / plan.hidden_size  # keep one rounding step
    if count(widths_at(low)) <= goal:
        return widths_at(low)
    if count(widths_at(high)) > goal:
        raise BudgetOutOfReach(f"target_params {target} is out of reach: the narrowest slice ({round_to} stream "
                               f"columns) keeps {count(widths_at(high)) / dense_count:.1%} of the dense parameters")
    high = least_sparsity(lambda s: count(widths_at(s)), goal, low, high)
    floor = goal - TOLERANCE * dense_count
    chosen, total = fill_hidden(widths_at(high), mlps, goal, round_to, count)
    if total < floor:  # one rounding step wider, the MLPs cut harder
        wider = uniform_widths(plan, max(high - round_to / plan.hidden_size, 0.0), MAX_HIDDEN, round_to,
                               slice_head, groups, cuts)
        if count(wider) <= goal:
            candidate, reached = fill_hidden(wider, mlps, goal, round_to, count)
            if reached > total:
                chosen, total = candidate, reached
    if total < floor and round_to > 1:  # the last units one at a time (small models)
        chosen, total = fill_hidden(chosen, mlps, goal, 1, count)
    chosen.hidden_sparsity = removed_unit_fraction(chosen, mlps)
    reached = total / dense_count
    if reached < target - TOLERANCE:
        raise FxSliceError(f"target_params {target} cannot be met within {TOLERANCE:.1%}: the nearest count "
                           f"below it is {reached:.2%} of dense (round_to={round_to})")
    return chosen


def fill_hidden(widths: Widths, mlps: list[MLP], goal: float, round_to: int, count,
                expert_step: int = 1) -> tuple[Widths, int]:
    """Give hidden units back, a rounding step (:func:`unit_step`) at a time to the MLP keeping the smallest fraction, while
    the count stays within ``goal``; returns the widths and their count."""
    total = count(widths)
    step_cost, step = {}, {m.writer: unit_step(m, round_to, expert_step) for m in mlps}
    for mlp in mlps:  # parameters of one more step of units of one MLP (linear in the units)
        wider = Widths(widths.stream, {**widths.hidden, mlp.writer: widths.hidden[mlp.writer] + 1}, groups=widths.groups,
                       values=widths.values, query_keys=widths.query_keys)
        step_cost[mlp.writer] = (count(wider) - total) * step[mlp.writer]
    width_of = {m.writer: m.width for m in mlps}
    while True:
        open_mlps = [w for w, kept in widths.hidden.items()
                     if kept + step[w] <= width_of[w] and total + step_cost[w] <= goal]
        if not open_mlps:
            return widths, total
        writer = min(open_mlps, key=lambda w: (widths.hidden[w] / width_of[w], w))
        widths.hidden[writer] += step[writer]
        total += step_cost[writer]


# --- allocation across MLPs (allocation="energy") ------------------------------------------------------
def unit_energies(plan: Plan, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """``E[h_j²] ‖W_j‖²`` for every unit of every MLP: what deleting it alone removes from its block's
    output, measured by one forward of the dense (fused, not yet rotated) graph over the batches."""
    grams = hidden_grams(plan, batches, plan.mlps)
    return {writer: gram.diagonal() * f64(plan.gm.get_submodule(writer).weight).pow(2).sum(0).to(gram.device)
            for writer, gram in grams.items()}


def allocate_units(mlps: list[MLP], energies: dict[str, torch.Tensor], total: int, round_to: int,
                   floor: float = 0.1) -> dict[str, int]:
    """Units kept per MLP, ``total`` in all: the units of largest *share* of their block's output
    energy ``e_j / Σ e`` win, every MLP keeping at least ``floor`` of its units; counts rounded to
    ``round_to`` (largest remainders first) so that they still add up to ``total``."""
    shares = torch.cat([energies[m.writer] / energies[m.writer].sum().clamp_min(1e-30) for m in mlps])
    owner = torch.cat([torch.full((m.width,), i) for i, m in enumerate(mlps)])
    minimum = [max(int(floor * m.width), 1) for m in mlps]
    order = torch.argsort(shares, descending=True)
    counts = list(minimum)
    budget = total - sum(minimum)
    taken = [0] * len(mlps)
    for unit in order.tolist():  # the floors count as the owners' best units
        i = int(owner[unit])
        taken[i] += 1
        if taken[i] <= minimum[i]:
            continue
        if budget <= 0:
            break
        counts[i] += 1
        budget -= 1
    rounded = [max(round_to * (c // round_to), min(round_to, m.width)) for c, m in zip(counts, mlps)]
    spare = total - sum(rounded)
    for i in sorted(range(len(mlps)), key=lambda i: counts[i] - rounded[i], reverse=True):
        if spare >= round_to and rounded[i] + round_to <= mlps[i].width:
            rounded[i] += round_to
            spare -= round_to
    return {m.writer: c for m, c in zip(mlps, rounded)}


# --- allocation by measured sensitivity (allocation="measured") -------------------------------------
SENSITIVITY_WINDOWS = 4  # calibration windows (the last ones) the sensitivities are measured on
MAX_MEASURED_CUT = 0.85  # no MLP loses more than this share of its units


def hidden_grams(plan: Plan, batches: list[Batch], mlps: list[MLP]) -> dict[str, torch.Tensor]:
    """``C = Σ hᵀh`` of every MLP's hidden value in the dense (fused, not yet rotated) graph."""
    grams = {m.writer: torch.zeros(m.width, m.width, dtype=torch.float64, device=plan.weights.device) for m in mlps}
    current = {}
    handles = []
    for mlp in mlps:
        def hook(_module, args, writer=mlp.writer):
            rows = token_rows(args[0], current.get("batch")).to(torch.float32)
            grams[writer] += (rows.T @ rows).to(torch.float64)
        handles.append(plan.gm.get_submodule(mlp.writer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = batch
                plan.gm(batch.input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {writer: all_reduce_sum(gram) for writer, gram in grams.items()}


def sensitivity_windows(batches: list[Batch]) -> list[Batch]:
    """The last :data:`SENSITIVITY_WINDOWS` calibration windows, as batches."""
    chosen, rows = [], 0
    for batch in reversed(batches):
        take = min(batch.input_ids.shape[0], SENSITIVITY_WINDOWS - rows)
        mask = None if batch.attention_mask is None else batch.attention_mask[-take:]
        chosen.append(Batch(batch.input_ids[-take:], mask))
        rows += take
        if rows == SENSITIVITY_WINDOWS:
            break
    return chosen


def mlp_sensitivities(plan: Plan, batches: list[Batch], keep: dict[str, int]) -> dict[str, float]:
    """For every MLP cut in ``keep``: ``KL(dense ‖ dense with this MLP alone cut to keep[m] units)`` per
    token, the MLP selected and refitted as pass 7 does (:mod:`.p7_rotate.hidden`, on the dense
    model's ``C``), on the last calibration windows; the graph is restored after each."""
    from .p7_rotate.hidden import keep_rows, select_units

    gm = plan.gm
    cut = [m for m in plan.mlps if keep[m.writer] < m.width]
    grams = hidden_grams(plan, batches, cut)
    windows = sensitivity_windows(batches)
    with torch.no_grad():
        references = [gm(b.input_ids).logits.float().log_softmax(-1) for b in windows]

    def divergence() -> list[float]:  # [summed KL, tokens]
        summed, tokens = 0.0, 0
        with torch.no_grad():
            for batch, reference in zip(windows, references):
                log_q = gm(batch.input_ids).logits.float().log_softmax(-1)
                per_token = (reference.exp() * (reference - log_q)).sum(-1)
                real = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(per_token, dtype=torch.bool)
                summed += float(per_token[real].sum())
                tokens += int(real.sum())
        return all_reduce_sum(torch.tensor([summed, tokens], dtype=torch.float64)).tolist()

    sensitivities = {}
    for mlp in cut:
        modules = [gm.get_submodule(name) for name in (mlp.writer, *mlp.readers)]
        saved = [(m.weight, m.bias) for m in modules]
        kept, x, _ = select_units(grams[mlp.writer], f64(modules[0].weight), keep[mlp.writer])
        for reader, parts in mlp.readers.items():
            keep_rows(gm.get_submodule(reader), kept, parts, reader in mlp.interleaved)
        set_linear(modules[0], x.to(modules[0].weight.device), None)
        try:
            summed, tokens = divergence()
        finally:
            for module, (weight, bias) in zip(modules, saved):
                module.weight, module.bias = weight, bias
                sync_features(module)
        sensitivities[mlp.writer] = summed / max(tokens, 1.0)
    return sensitivities


def allocate_by_sensitivity(mlps: list[MLP], sensitivities: dict[str, float], total: int,
                            round_to: int) -> dict[str, int]:
    """Units kept per MLP, ``total`` in all, the cut share ``h_m`` of each inversely proportional to its
    measured sensitivity ``s_m`` (the minimiser of ``Σ s_m (h_m / h)²`` — each MLP's divergence growing
    quadratically in its cut, from ``s_m`` at the uniform cut ``h`` — under the budget), at most
    :data:`MAX_MEASURED_CUT`; counts rounded down to ``round_to``, the remainder given back by
    :func:`fill_hidden`. MLPs the uniform widths left whole stay whole."""
    cut = [m for m in mlps if m.writer in sensitivities]
    removed = sum(m.width for m in mlps) - total
    floor = max(max(sensitivities.values(), default=0.0) * 1e-3, 1e-12)  # rounding noise reads as ~0 or below
    weight = {m.writer: 1.0 / max(sensitivities[m.writer], floor) for m in cut}

    def removed_at(scale: float) -> float:
        return sum(min(MAX_MEASURED_CUT, scale * weight[m.writer]) * m.width for m in cut)

    low, high = 0.0, 1.0
    while removed_at(high) < removed and high < 1e12:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if removed_at(middle) < removed else (low, middle)
    kept = {m.writer: m.width for m in mlps}
    for m in cut:
        units = m.width - math.ceil(min(MAX_MEASURED_CUT, high * weight[m.writer]) * m.width)
        kept[m.writer] = min(max(round_to * (units // round_to), min(round_to, m.width)), m.width)
    return kept


NAME = "widths"


def step(run: "Run") -> None:
    with run.watch(NAME):
        run.widths = choose_widths(run.plan, run.options, run.spec.param_count, run.batches)
