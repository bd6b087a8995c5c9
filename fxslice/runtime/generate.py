"""Text generation with a KV cache from a sliced model.

The model is captured a second time with a static KV cache (:func:`fxslice.hf.export_with_static_cache`):
``forward(input_ids [B, T], cache_position [T]) -> logits`` with the keys and values kept in
buffers, so the same program serves prefill (T tokens) and one-token decode steps. The capture is
rebuilt from what ``compress`` kept of the model (:mod:`fxslice.source`: no caller's model needed),
goes through the same canonicalise / analyse / fuse passes, takes the sliced shapes by replaying the
slice (:meth:`~fxslice.passes.slice_record.Slice.replay`, the one function that applies a slice)
and receives the sliced model's weights module by module (the inserted modules are named alike in
both captures, :mod:`fxslice.graph.inserted`). ``fxslice.save`` exports it beside the sliced program
(``generate.pt2``); it needs no model code.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule

from ..errors import FxSliceError, GraphStructureError, whole
from ..graph.edit import plain_graph_module, strip_guards
from ..graph.modules import LINEARS, WEIGHTED
from ..graph.quantized import QUANTIZED_LINEARS, model_dtype
from ..graph.store import SkeletonWeights
from ..graph.weights import sync_features
from ..hf import STATIC_CACHE_PREFIX, export_with_static_cache
from ..passes.p2_canonicalise import canonicalise
from ..passes.p3_analyse import analyse
from ..passes.p5_fuse import fuse

GRAPH_CLASS = "SlicedCausalLMWithCache"
SEEDS = (-2**63, 2**64)  # torch.Generator.manual_seed's range


def capture_with_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> GraphModule:
    """Export ``model`` with a static KV cache: ``forward(input_ids, cache_position) -> logits``."""
    gm = export_with_static_cache(model, batch_size, max_cache_len).module()
    strip_guards(gm.graph)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    if len(leaves) != 1:
        raise GraphStructureError(f"the static-cache capture returns {len(leaves)} values, expected the logits only")
    output.args = (leaves[0],)
    return plain_graph_module(gm, gm.graph, GRAPH_CLASS)


def with_cache(sliced: GraphModule, batch_size: int = 1, max_cache_len: int = 1024,
               share_weights: bool = False) -> GraphModule:
    """The KV-cache program of the model ``sliced`` (a graph returned by :func:`fxslice.compress`)
    was made from, with its slice replayed and its weights: the capture's own Linear and Embedding
    weights are never read, every one is replaced by the sliced model's (shared with ``sliced`` when
    ``share_weights``, else copied)."""
    result = getattr(sliced, "fxslice", None)
    if result is None or result.slice is None or result.source is None:
        raise FxSliceError("a KV-cache program needs the GraphModule returned by fxslice.compress (it carries "
                           ".fxslice with the slice and its source model)")
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if not whole(value) or value < 1:
            raise FxSliceError(f"{name} must be a positive integer, got {value!r}")
    module, fill = result.source.build(model_dtype(sliced), next(sliced.parameters()).device)
    gm = canonicalise(capture_with_cache(module, batch_size, max_cache_len))
    del module
    fill(gm)  # what transfer_weights will not replace holds the model's values
    plan = fuse(analyse(gm), SkeletonWeights(gm), mlps=[], rotate=result.slice.rotate)
    result.slice.replay(plan)
    transfer_weights(gm, sliced, strip=STATIC_CACHE_PREFIX, clone=not share_weights)
    gm.recompile()
    gm.cache_batch_size, gm.max_cache_len, gm.vocab_size = batch_size, max_cache_len, result.vocab_size
    return gm


def kv_cache_bytes_per_token(program: nn.Module) -> int:
    """Bytes of keys and values one token adds to a KV-cache program's cache: its ``[B, heads, length, d]``
    buffers per sequence and position (what narrowing attention values or keys shrinks)."""
    batch = program.cache_batch_size
    return sum(b.shape[1] * b.shape[3] * b.element_size() for b in program.buffers()
               if b.dim() == 4 and b.is_floating_point() and b.shape[0] == batch and b.shape[2] <= program.max_cache_len)


def retarget(generator: nn.Module, weights: nn.Module) -> GraphModule:
    """A copy of a loaded KV-cache program carrying the weights of ``weights`` (e.g. after fine-tuning)."""
    target = canonicalise(copy.deepcopy(generator))
    transfer_weights(target, weights, strip=STATIC_CACHE_PREFIX)
    target.recompile()
    target.cache_batch_size, target.max_cache_len = generator.cache_batch_size, generator.max_cache_len
    target.vocab_size = getattr(generator, "vocab_size", None)
    return target


def transfer_weights(target: nn.Module, source: nn.Module, strip: str = "", clone: bool = True) -> None:
    """Give every Linear/Embedding of ``target`` the parameters of the same-named module of ``source``
    (``strip`` removed from target names; copies unless ``clone=False``), keeping parameters that
    ``source`` shares shared. A Linear whose twin is quantised (pass 8) is replaced by that module."""
    modules = dict(source.named_modules())
    shared: dict[int, nn.Parameter] = {}
    for name, module in list(target.named_modules()):
        if not isinstance(module, WEIGHTED):
            continue
        twin = modules.get(name[len(strip):] if strip and name.startswith(strip) else name)
        if isinstance(twin, QUANTIZED_LINEARS) and type(module) is nn.Linear:
            target.set_submodule(name, twin)  # frozen integers: shared, never copied
            continue
        if twin is None or not isinstance(twin, type(module)):
            raise GraphStructureError(f"module '{name}' has no counterpart in the model that holds the weights")
        for attr in ("weight", "bias"):
            param = getattr(twin, attr, None)
            if param is not None:
                if id(param) not in shared:
                    shared[id(param)] = nn.Parameter(param.detach().clone() if clone else param.detach(),
                                                     requires_grad=False)
                setattr(module, attr, shared[id(param)])
        if isinstance(module, LINEARS):
            sync_features(module)
        else:
            module.embedding_dim = module.weight.shape[1]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not _number(temperature) or not 0 < temperature < float("inf"):
        raise FxSliceError(f"temperature must be > 0 and finite, got {temperature!r}")
    if not whole(top_k) or top_k < 0:
        raise FxSliceError(f"top_k must be an integer >= 0 (0: all tokens), got {top_k!r}")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise FxSliceError(f"top_p must be in (0, 1], got {top_p!r}")


def check_token_ids(input_ids: object, vocab_size: Optional[int]) -> None:
    """Refuse what no program should be handed (a kernel may abort the process on an id out of range):
    anything but a non-empty integer tensor ``[B, T]`` of ids in ``[0, vocab_size)``."""
    integer = isinstance(input_ids, torch.Tensor) and not input_ids.is_floating_point() \
        and not input_ids.is_complex() and input_ids.dtype != torch.bool
    if not integer or input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        described = f"{input_ids.dtype} of shape {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise FxSliceError(f"input_ids must be an integer tensor of shape [B, T] with B, T > 0, got {described}")
    low, high = int(input_ids.min()), int(input_ids.max())
    bad = low if low < 0 else high if vocab_size is not None and high >= vocab_size else None
    if bad is not None:
        raise FxSliceError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size or '...'})")


def check_generation(program: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse bad token ids and what the static cache cannot hold: a batch other than the cache's, more
    tokens than its length."""
    check_token_ids(input_ids, getattr(program, "vocab_size", None))
    if not whole(max_new_tokens) or max_new_tokens < 0:
        raise FxSliceError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    batch, length = getattr(program, "cache_batch_size", None), getattr(program, "max_cache_len", None)
    rebuild = "rebuild it with a larger one: fxslice compress ... --cache-batch-size N --max-cache-len L " \
              "(fxslice.save(sliced, folder, cache_batch_size=N, max_cache_len=L))"
    if batch is not None and input_ids.shape[0] > batch:
        raise FxSliceError(f"the KV-cache program holds at most {batch} sequence(s), got input_ids with "
                           f"{input_ids.shape[0]} rows; {rebuild}")
    if length is not None and input_ids.shape[1] > length:
        raise FxSliceError(f"the prompt has {input_ids.shape[1]} tokens, more than the KV cache length {length}; "
                           f"{rebuild}")
    if length is not None and input_ids.shape[1] + max_new_tokens - 1 > length:  # the last token is not fed back
        raise FxSliceError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) needs "
                           f"{input_ids.shape[1] + max_new_tokens - 1} cache slots, more than the KV cache length "
                           f"{length}: ask for at most {length - input_ids.shape[1] + 1} new tokens, or {rebuild}")


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        remove = cumulative - ordered.softmax(-1) > top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate(program: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             seed: Optional[int] = None) -> torch.Tensor:
    """Prefill ``input_ids`` ``[B, T]`` once, then decode one token per step from the KV cache.

    ``program`` is a cache program (:func:`with_cache`, or ``generate.pt2`` loaded by :func:`fxslice.load`).
    Greedy by default; ``do_sample`` with temperature / top-k / top-p (seeded by ``seed``). Fewer
    rows than the program's cache holds are padded (with the first prompt) and dropped again.
    Returns the prompt followed by the generated tokens.
    """
    check_generation(program, input_ids, max_new_tokens)
    if not isinstance(do_sample, bool):
        raise FxSliceError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample:
        check_sampling(temperature, top_k, top_p)
    if seed is not None and not (whole(seed) and SEEDS[0] <= seed < SEEDS[1]):
        raise FxSliceError(f"seed must be an integer or None, got {seed!r} (torch.Generator takes integers in "
                           f"[{SEEDS[0]}, {SEEDS[1]}))")
    vocab_size = getattr(program, "vocab_size", None)
    if eos_token_id is not None and not (whole(eos_token_id) and 0 <= eos_token_id < (vocab_size or eos_token_id + 1)):
        raise FxSliceError(f"eos_token_id must be None or a token id in [0, {vocab_size or '...'}) (finished rows are "
                           f"fed it), got {eos_token_id!r}")
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    rows, length = input_ids.shape
    batch = getattr(program, "cache_batch_size", None) or rows
    device = input_ids.device
    # fewer prompts than the cache holds: the free rows repeat the first prompt and are dropped at the end
    tokens = torch.cat([input_ids, input_ids[:1].expand(batch - rows, -1)]) if batch > rows else input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    finished[rows:] = True
    with torch.no_grad():
        logits = program(tokens, torch.arange(length, device=device))
        for step in range(max_new_tokens):
            nxt = _pick(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if finished.all() or step == max_new_tokens - 1:
                break
            logits = program(nxt[:, None], torch.tensor([length + step], device=device))
    return tokens[:rows]
