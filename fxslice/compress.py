"""``fxslice.compress``: the graph pass, one pass after the other.

    capture → canonicalise → analyse → mlps → fuse → widths → rotate (post-norm branches, MLP units inside)

The order is :data:`fxslice.passes.PASSES`; each pass lives in its own module of
:mod:`fxslice.passes` and hands the next one an explicit value (fields of a
:class:`~fxslice.passes.run.Run`): a captured graph, a canonical graph, a
:class:`~fxslice.passes.p3_analyse.Structure`, the MLPs, a :class:`~fxslice.passes.p5_fuse.Plan`,
:class:`~fxslice.passes.p6_widths.Widths`, the :class:`~fxslice.passes.slice_record.Slice` and the
eigenvalues. What the user asked for travels as :class:`~fxslice.options.Options`.
"""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from .calibration import check_device, prepare_batches, token_count
from .checkpoint import Checkpoint, checkpoint_weights, is_checkpoint
from .distributed import raise_together, total
from .errors import FxSliceError, dtype_named
from .graph.store import memory_weights
from .graph.weights import count_parameters, reads_an_embedding, release_shared_storage
from .hf import check_compute_dtype, model_spec
from .options import Options
from .passes import PASSES
from .passes.p1_capture import capture
from .passes.p2_canonicalise import canonicalise
from .passes.p3_analyse import Structure, analyse
from .passes.run import Run
from .result import SliceResult, Stopwatch
from .split import SplitSearch, measure_split
from .source import CheckpointSource
from .tempfolders import private_folder


def inspect(model: nn.Module, show: bool = True) -> Structure:
    """Print (and return) the residual-stream structure fxslice finds in ``model`` (no weight changes)."""
    structure = analyse(canonicalise(capture(model, model_spec(model))))
    if show:
        print(structure.table())
    return structure


def compress(
    model: nn.Module | str | os.PathLike,
    calib_loader: Iterable,
    sparsity: Optional[float] = None,
    *,
    target_params: Optional[float] = None,
    hidden_sparsity: Optional[float] = None,
    round_to: int = 8,
    pca_signal: str = "stream",
    slice_head: bool = False,
    basis: Optional[str] = None,
    allocation: str = "uniform",
    stock: bool = False,
    split: str = "measured",
    stream_sparsity: Optional[float] = None,
    value_sparsity: Optional[float] = None,
    key_sparsity: Optional[float] = None,
    basis_span: int = 1,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    offload_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> GraphModule:
    """Slice ``model`` and return the sliced ``torch.fx.GraphModule``.

    Args:
        model: a causal LM (any ``AutoModelForCausalLM``) in fp32, fp16 or bf16, left unchanged; or
            the path of a Hugging Face checkpoint folder (``config.json`` + safetensors; a hub id when
            a hub is reachable), which is streamed: captured without weights and read one block at a
            time, so that the dense model is never in memory.
        calib_loader: iterable of batches: LongTensor ``[B, T]`` or mappings with ``input_ids`` and an
            optional ``attention_mask`` (zero positions are left out of the PCA). Under
            ``torch.distributed`` each rank passes its own share; covariances are summed over ranks.
        sparsity: fraction of the stream width to delete, in [0, 1) (SliceGPT's knob). Give this or
            ``target_params``.
        target_params: fraction of the dense parameter count to keep, in (0, 1]: the true count of
            the result (inserted modules included, a tied head once) is at most that, within 0.5%.
            The stream and the MLP hidden units are sliced together (:mod:`fxslice.passes.p6_widths`).
        hidden_sparsity: with ``sparsity``, the fraction of every MLP's hidden units to delete
            (default 0: SliceGPT alone); the down projection is refitted by ridge least squares
            (:mod:`fxslice.passes.p7_rotate.hidden`).
        round_to: slice widths are rounded down to a multiple of this (1 disables rounding).
        pca_signal: ``"stream"`` (PCA of the residual stream itself, the reference code's choice) or
            ``"norm_output"`` (PCA of the normalised stream, Eq. 8 of the paper).
        slice_head: also slice the last position (the head's input); by default it keeps full width.
        basis: ``"block"`` (default: one basis for the positions a block reads, from their summed
            covariances: the block's inner shortcut ``Q_aᵀ Q_b`` is then the identity and is removed —
            fewer parameters and FLOPs, and lower perplexity on the shipped protocol) or
            ``"position"`` (a PCA basis per stream position, the SliceGPT paper's mode), ``"model"`` (one
            basis for the whole stream, from every position's covariance: no shortcut is left, the fewest
            parameters, and every block is calibrated before any is sliced — a streamed checkpoint is
            then read whole) or ``"none"``
            (the stream keeps its coordinates and width, only MLP hidden units are cut: no PCA, no
            shortcut; needs ``sparsity=0`` or ``target_params``). Default: ``"none"`` under ``stock``,
            else ``"block"``.
        basis_span: with ``basis="block"``, this many consecutive blocks share one basis (default 1): the
            shortcuts between them are removed — fewer parameters at a sparsity, one basis fitting more
            positions (calibrated and held together).
        allocation: how the kept MLP hidden units are spread over the blocks: ``"uniform"`` (the
            same fraction everywhere), ``"energy"`` (by each unit's share of its block's output
            energy, measured by one extra forward of the dense model) or ``"measured"`` (each MLP's
            share of the cut inversely proportional to the divergence of the logits its cut alone
            causes, on the last calibration windows); the last two: dense MLPs of in-memory models.
        split: how ``target_params`` divides the budget between the stream width and the MLP hidden
            units: ``"measured"`` (default: a few candidate splits — the fixed one, the stream narrowed
            less, the stream whole and unrotated when ``basis`` is left to its default — are sliced on a
            quarter of the calibration windows and the one closest to the model on held-out windows
            (KL of the next-token distributions; a streamed checkpoint: cross-entropy) is compressed;
            :mod:`fxslice.split`) or ``"fixed"`` (MLP hidden sparsity 2.3 × the stream's, no search).
        stream_sparsity: with ``target_params``, the fraction of the stream width to delete; the same
            fraction of every MLP's units is cut to meet the rest of the budget (no search).
        value_sparsity: the fraction of every attention's value dimensions to delete, per key/value
            group, the output projection refitted (:mod:`fxslice.passes.p7_rotate.values`; attentions
            pass 4 recognises — ``scaled_dot_product_attention`` with a value Linear of its own —,
            the others left whole, each named with the reason in ``sliced.fxslice.skipped_attentions``).
            The KV cache's values shrink with it.
        key_sparsity: the fraction of every attention's query/key dimensions to delete, per key/value group,
            in whole units — the dimensions a rotary embedding rotates together, measured from the graph
            (:mod:`fxslice.passes.p4_keys`) — chosen by the product of their query and key norms on the
            calibration data (:mod:`fxslice.passes.p7_rotate.keys`); the KV cache's keys shrink with it.
            Attentions whose paths join every head dimension (a per-head query/key norm) stay whole, named
            with the reason in ``sliced.fxslice.skipped_attentions``.
        stock: keep the slice expressible by a stock Transformers config of the model's own type
            (one hidden size, one MLP width, nothing on the residual path), so that
            ``fxslice.save(..., format="transformers")`` writes a checkpoint ``from_pretrained``
            loads without fxslice: the stream stays unrotated and every MLP keeps the same number
            of units; ``target_params`` then counts the stock model's parameters.
        device: where calibration runs (default: the model's device; a checkpoint's: ``cpu``). The
            block being calibrated and the cached activations live there, everything else on the CPU.
        dtype: a checkpoint's compute dtype (default: the dtype its config names, else float32).
        offload_dir: a folder in which finished (sliced) weights, and the cached activations
            between blocks, are kept on disk instead of in memory (a subfolder per compression,
            removed when the returned graph is garbage-collected, or at once if compression fails).
            A checkpoint's finished weights go to a temporary folder by default; they end
            memory-mapped from there.
        progress: show a tqdm bar.

    Returns:
        A GraphModule ``forward(input_ids) -> CausalLMOutput`` on the CPU for a checkpoint, on the
        model's device otherwise; ``result.fxslice`` holds a :class:`SliceResult` (widths, true
        parameter counts, inserted modules, timings, eigenvalues).
    """
    error, options = None, None
    try:
        options = Options(sparsity, target_params, hidden_sparsity, round_to, pca_signal, slice_head, basis,
                          allocation, stock, split, stream_sparsity, value_sparsity, key_sparsity, basis_span).check()
        if device is not None:
            check_device(device)
        if dtype is not None:
            check_compute_dtype(dtype, "dtype")
        _check_offload_dir(offload_dir)
    except FxSliceError as exc:  # under torch.distributed every rank stops, with the same message
        error = exc
    raise_together(error)
    watch = Stopwatch()
    search: Optional[SplitSearch] = None
    if options.searches_split:
        calib_loader = _materialised(calib_loader)
        with watch("split search"):
            options, search = measure_split(
                options, calib_loader, model if isinstance(model, nn.Module) else None, free_basis=basis is None,
                run_candidate=lambda candidate, items: _compress_once(model, items, candidate, device, dtype,
                                                                      offload_dir, False, Stopwatch()),
                progress=progress)
    gm = _compress_once(model, calib_loader, options, device, dtype, offload_dir, progress, watch)
    gm.fxslice.split_search = search
    return gm


def _materialised(calib_loader):
    """The calibration batches as a list the split search can go over several times (what a single
    tensor or a non-iterable would be refused for is left to the compression to say)."""
    if calib_loader is None or isinstance(calib_loader, (torch.Tensor, str, bytes, list, tuple)):
        return calib_loader
    try:
        return list(calib_loader)
    except TypeError:
        return calib_loader


def _compress_once(model, calib_loader, options: Options, device, dtype, offload_dir, progress,
                   watch: Stopwatch) -> GraphModule:
    """Every pass once with ``options``; the sliced graph with its :class:`SliceResult`. The offload
    folders it made are removed with the graph (at once if it fails)."""
    temporary: list[Path] = []  # offload folders fxslice made: they back the result's weights
    try:
        run = _run_passes(model, calib_loader, options, device, dtype, offload_dir, progress, watch, temporary)
    except BaseException:
        for folder in temporary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    gm, plan, widths, record = run.gm, run.plan, run.widths, run.slice
    for folder in temporary:
        weakref.finalize(gm, shutil.rmtree, folder, True)
    timings = dict(watch.seconds)
    timings["total"] = timings.pop("total") + timings.get("split search", 0.0)  # listed last
    gm.fxslice = SliceResult(
        hidden_size=plan.hidden_size,
        vocab_size=run.spec.vocab_size,
        sparsity=widths.stream_sparsity,
        widths=record.widths(plan),
        dense_param_count=run.spec.param_count,
        param_count=count_parameters(gm),
        tied_embeddings=plan.tied is not None or reads_an_embedding(gm, plan.head),
        centered=plan.centered,
        options=options.to_record(),
        calibration_tokens=int(total(token_count(run.batches))),
        inserted=list(plan.inserted),
        head=list(plan.head),
        layout=plan.layout(),
        timings=timings,
        eigenvalues=run.eigenvalues,
        added_param_count=sum(p.numel() for m in plan.inserted for p in gm.get_submodule(m.name).parameters()),
        hidden_sparsity=widths.hidden_sparsity,
        hidden_widths={m.writer: (widths.hidden[m.writer], m.width) for m in plan.mlps
                       if widths.hidden.get(m.writer, m.width) < m.width},
        refit_errors=dict(record.refit_errors),
        value_widths=record.value_widths(plan),
        key_widths=record.key_widths(plan),
        skipped_attentions=run.attentions.refusals(bool(options.value_sparsity), bool(options.key_sparsity)),
        value_errors=dict(record.value_errors),
        norm_eps=record.norm_eps(plan),
        slice=record,
        source=run.source,
    )
    return gm


def _run_passes(model, calib_loader, options: Options, device, dtype, offload_dir, progress, watch,
                temporary) -> Run:
    """Prepare the run (model or empty checkpoint model, calibration batches, weight store), then
    every pass of ``PASSES`` in order."""
    with watch("total"):
        error = None
        try:  # a bad checkpoint, model or calibration shard of one rank stops every rank
            if is_checkpoint(model):
                checkpoint = Checkpoint.open(model)
                dtype = checkpoint_dtype(checkpoint, dtype)
                with watch("capture"):
                    module, storage_keys = checkpoint.empty_model(dtype)
                    spec = model_spec(module, weights_loaded=False)
            else:
                if dtype is not None:
                    raise FxSliceError("dtype applies to a checkpoint path; convert an in-memory model with "
                                       "model.to(dtype)")
                module, checkpoint, spec = model, None, model_spec(model)
            compute = torch.device(device) if device is not None else spec.device
            batches = prepare_batches(calib_loader, spec.vocab_size, compute)
        except FxSliceError as exc:
            error = exc
        raise_together(error)
        offload = _offload_folder(offload_dir, temporary, needed=checkpoint is not None)

        def store(gm: GraphModule):
            if checkpoint is not None:  # the empty model's parameters were never allocated: read the checkpoint
                return checkpoint_weights(gm, checkpoint, storage_keys, dtype, compute, offload)
            return memory_weights(gm, compute, offload)

        run = Run(module, spec, options, batches, store, compute, watch, progress,
                  activation_dir=offload if offload_dir is not None else None,
                  source=CheckpointSource(checkpoint.folder.resolve()) if checkpoint is not None else None)
        del module  # the run holds it until the graph does
        for step in PASSES:
            step.step(run)
        if checkpoint is None:
            release_shared_storage(run.gm, model)
    return run


def _offload_folder(offload_dir, made: list[Path], needed: bool) -> Optional[Path]:
    """A fresh folder of this compression inside ``offload_dir`` (or the system's temporary folder
    when a checkpoint needs one): concurrent runs and ranks never share files, a failed run
    leaves nothing, a finished one keeps it as long as the sliced graph maps its files (one killed
    outright is removed by the next compression, :mod:`fxslice.tempfolders`)."""
    if offload_dir is None and not needed:
        return None
    folder = private_folder("fxslice-offload-", offload_dir)  # offload_dir checked by compress
    made.append(folder)
    return folder


def _check_offload_dir(offload_dir) -> None:
    """None, or the path (``str`` / ``os.PathLike``) of an existing folder."""
    if offload_dir is None:
        return
    if not isinstance(offload_dir, (str, os.PathLike)):
        raise FxSliceError(f"offload_dir must be a folder path (str or os.PathLike), got {type(offload_dir).__name__}")
    if not Path(offload_dir).is_dir():
        raise FxSliceError(f"offload_dir {offload_dir} is not an existing folder")


def checkpoint_dtype(checkpoint: Checkpoint, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The requested dtype, else the checkpoint config's, else float32."""
    if dtype is not None:
        return check_compute_dtype(dtype, "dtype")
    named = getattr(checkpoint.config, "dtype", None) or getattr(checkpoint.config, "torch_dtype", None)
    named = dtype_named(named) if isinstance(named, str) else named
    if named is None:
        return torch.float32
    return check_compute_dtype(named, f"the dtype {checkpoint.folder / 'config.json'} names",
                               "; pass dtype= (--dtype) to compute in another one")
