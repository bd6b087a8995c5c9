"""Capture patterns for sparse-attention indexers whose token selection is data-dependent control flow.

An indexer scores blocks or tokens for every query and keeps the best; the ones below write that as a Python
loop over batch rows and query groups (``unique().tolist()``, ``nonzero`` of each mask row, ``if not rows.any():
continue``), which ``torch.export`` cannot trace. While the model is captured their selection methods are
replaced by dense equivalents over ``[batch, queries, keys]`` masks — ranks by ``cumsum``, ``topk`` over scores
padded with ``-inf`` (so that ``k`` never depends on a symbolic size), no Python branch on a tensor value —,
verified against the originals on inputs that really select. They are exact for masks whose long queries share
their first visible key (causal masks, with left or right key padding): what fxslice captures, ``input_ids``
only. The dense forms hold whole ``[T, K]`` score matrices where the originals chunk them.

Kolibri 1.1 (``Kolibri1_1Indexer.select_pool`` / ``select_tokens``):

- ``select_tokens``: key positions are counted from each query's own first visible key (``arange - starts``), the
  routing scores of every query against every key are computed at once (NVFP4-rounded, ReLU summed head by head
  as ``score`` does), non-candidates are ``-inf`` and the module's tie rule (lowest index first, cumsum ranks) picks
  the top k; rows no longer than the budget keep ``visible``, as the original's skipped rows do.
- ``select_pool``: the keys of each batch row are shifted (``gather``) so that its blocks of ``compression`` keys
  start at the first visible key of its longest query, summed, averaged and rounded as the original does; block
  scores, the incomplete-block zero and ``-inf`` past a query's last block are computed for every query at once,
  and each key reads its block's choice back through ``gather``.

Qwen4-Exp's QSA indexer (``_select_tokens``, the same kind of loop) has no pattern: a dense form written for it
agreed with the loop on short inputs only (logits apart by 0.1 at lengths 63 and 64 of a tiny model).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fxslice.registry import Substitution, register_capture_pattern

_BUDGETS = ("topk", "pool_size", "compression", "num_local_tokens", "num_sink_tokens", "num_heads")


def _quantizer(module: nn.Module):
    """The NVFP4 rounding of the module's own modelling file (the one its methods call)."""
    return getattr(sys.modules.get(type(module).__module__), "nvfp4_fake_quantize", None)


def _rows(visible: torch.Tensor):
    """``(starts, lengths)`` of every query ``[B, T]``: its first visible key, and the number of keys from its
    first to its last visible one (0 for a query that sees nothing), as ``query_groups`` computes them."""
    starts = visible.int().argmax(-1)
    ends = visible.shape[-1] - visible.flip(-1).int().argmax(-1)
    return starts, (ends - starts) * visible.any(-1)


def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``score`` for every batch row at once: ``[B, H, T, d]`` queries against ``[B, K, d]`` keys, ReLU of each
    head's logits summed head by head in the same order, times ``head_weight``."""
    scores = queries.new_zeros(queries.shape[0], queries.shape[2], keys.shape[1])
    keys_t = keys.transpose(-1, -2)
    for head in range(queries.shape[1]):
        scores = scores + (queries[:, head] @ keys_t).relu()
    return scores * self.head_weight


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``top_k_mask`` (the ``k`` highest finite scores, ties to the lowest indices) without ``min(k, size)``: the
    row is padded with ``-inf`` so that ``topk`` always has ``k`` entries (padding is never kept nor counted)."""
    size = scores.shape[-1]
    padded = nn.functional.pad(scores, (0, k), value=float("-inf"))
    kth_score = padded.topk(k, dim=-1).values[..., -1:]
    above = padded > kth_score
    tied = (padded == kth_score) & (kth_score > float("-inf"))
    free_slots = k - above.sum(-1, keepdim=True)
    tie_rank = tied.cumsum(-1, dtype=torch.int32)
    return (above | (tied & (tie_rank <= free_slots)))[..., :size]


def _dense_select_pool(self, queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    quantize, c = _quantizer(self), self.compression
    batch, length, num_keys = visible.shape
    starts, lengths = _rows(visible)
    unseen = ~visible.any(1)                                               # [B, K] keys no query sees
    start = starts.gather(1, lengths.argmax(1, keepdim=True))              # [B, 1] first key of the longest query
    source = torch.arange(num_keys, device=visible.device) + start         # [B, K] key read at shifted position i
    inside = source < num_keys
    source = source.clamp(max=num_keys - 1)
    width = keys.shape[-1]
    document_keys = keys[:, 0].gather(1, source[..., None].expand(-1, -1, width))
    document_keys = document_keys.masked_fill((unseen.gather(1, source) | ~inside)[..., None], 0.0)
    # Blocks of c keys as a strided view (reshaping a symbolic length guards on it), two more than fit the keys
    # (zeros past them: N >= 2 is known, so no guard on N == 1 either). That is at least as many as any row's,
    # and blocks past a row's keys score 0 (incomplete) or -inf as the original's do
    document_keys = nn.functional.pad(document_keys, (0, 0, 0, 2 * c))
    blocks = document_keys.float().unfold(1, c, c)                         # [B, N, d, c], N = K // c + 2
    num_blocks = blocks.shape[1]
    summaries = quantize(blocks.sum(-1) / c)                               # [B, N, d]
    routing_queries = quantize(queries[:, : self.num_heads]).float()      # [B, H, T, d]
    scores = _scores(self, routing_queries, summaries)                    # [B, T, N]
    block_ids = torch.arange(num_blocks, device=scores.device)
    spans = lengths[..., None]
    scores = torch.where(block_ids < spans // c, scores, 0.0)
    scores = scores.masked_fill(block_ids >= (spans + c - 1) // c, float("-inf"))
    chosen = _top_k_mask(scores, self.pool_size // c)                      # [B, T, N]
    relative = torch.arange(num_keys, device=visible.device) - start       # [B, K]
    key_block = (relative.clamp(min=0) // c)[:, None, :].expand(batch, length, num_keys)
    chosen_keys = chosen.gather(-1, key_block) & (relative >= 0)[:, None, :]
    long_rows = (lengths > self.pool_size)[..., None]
    return torch.where(long_rows, chosen_keys & visible, visible)


def _dense_select_tokens(self, queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                         pool: torch.Tensor) -> torch.Tensor:
    quantize = _quantizer(self)
    budget = self.topk + self.num_local_tokens + self.num_sink_tokens
    starts, lengths = _rows(visible)
    starts, lengths = starts[..., None], lengths[..., None]
    routing_keys = quantize(keys[:, 0]).float()                            # [B, K, d]
    routing_queries = quantize(queries[:, : self.num_heads]).float()      # [B, H, T, d]
    scores = _scores(self, routing_queries, routing_keys)                  # [B, T, K]
    positions = torch.arange(visible.shape[-1], device=visible.device) - starts  # from each query's first key
    counted = positions >= 0
    sinks = counted & (positions < self.num_sink_tokens)
    local = (positions >= lengths - self.num_local_tokens) & (positions < lengths)
    candidates = pool & counted & ~sinks & (positions < lengths - self.num_local_tokens)
    chosen = _top_k_mask(scores.masked_fill(~candidates, float("-inf")), self.topk)
    return torch.where(lengths > budget, (chosen | sinks | local) & visible, visible)


@register_capture_pattern("kolibri_indexer_dense")
def kolibri_indexer_dense(module: nn.Module):
    """A weightless module with integer ``topk``, ``pool_size``, ``compression``, ``num_local_tokens``,
    ``num_sink_tokens``, ``num_heads``, a float ``head_weight``, ``select_pool(queries, keys, visible)`` and
    ``select_tokens(queries, keys, visible, pool)``, defined next to an ``nvfp4_fake_quantize``."""
    if not all(isinstance(getattr(module, name, None), int) for name in _BUDGETS):
        return None
    if not isinstance(getattr(module, "head_weight", None), float) or _quantizer(module) is None:
        return None
    if not all(callable(getattr(module, name, None)) for name in ("select_pool", "select_tokens")):
        return None
    if any(True for _ in module.parameters()):
        return None
    c, heads = module.compression, module.num_heads

    def example(call, generator):
        # Small budgets (restored afterwards) so that a short sequence is longer than the pool and the token budget:
        # blocks and tokens are really chosen, and early queries stay short (their rows keep the visible keys)
        saved = {name: getattr(module, name) for name in ("topk", "pool_size", "num_local_tokens", "num_sink_tokens")}
        try:
            module.topk, module.pool_size, module.num_local_tokens, module.num_sink_tokens = 5, 2 * c, 3, 2
            batch, length, width = 2, 4 * c + 7, 32
            queries = torch.randn(batch, heads + 1, length, width, generator=generator)
            keys = torch.randn(batch, 2, length, width, generator=generator)
            visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(batch, 1, 1)
            visible[1, :, :5] = False                          # left padding of the second row
            pool = call("select_pool", queries, keys, visible)
            other = torch.rand(batch, length, length, generator=generator) < 0.6  # another indexer's pool
            return pool, call("select_tokens", queries, keys, visible, pool), \
                call("select_tokens", queries, keys, visible, other & visible)
        finally:
            for name, value in saved.items():
                setattr(module, name, value)

    return Substitution({"select_pool": _dense_select_pool, "select_tokens": _dense_select_tokens}, example)

