"""Pass 8 (optional, after the slice): weight-only quantisation of the sliced program's Linears.

torchao chooses the integers: ``Int8WeightOnlyConfig`` (symmetric, one scale per output row:
``q = round(W / s)``, ``s = max|W_row| / 127``) for ``int8``; ``PrototypeInt4WeightOnlyConfig``
(asymmetric, a scale and a zero point per ``group_size`` inputs, tinygemm's CPU layout) for ``int4``.
Each ``nn.Linear`` becomes a :mod:`fxslice.graph.quantized` module that runs ATen's CPU weight-only
kernel on those integers. Before a module is put in place, its kernel's output on a random input is
compared with torchao's own dequantised weight, ``x Ŵᵀ``; a shape where the kernel disagrees keeps
its float weight, and the report says so — as it does for the modules that are not plain Linears
(grouped experts, routers that compute in float32). Input widths a kernel cannot take are padded
with zero columns (ATen's bf16 int8 kernel misreads — or crashes on — widths that are not multiples
of 16; int4 groups need a multiple of ``group_size``). Under ``int4``, Linears whose rows are not a multiple of 16 become int8.
The head and the modules fxslice inserted stay off the integer grid (:func:`half_precision_modules`):
bfloat16 weights in a float32 model (as llama.cpp keeps its output matrix above 4 bits).

The slice is not touched: the rotated, sliced weights are quantised as they are, so the record's
widths, layout and KV-cache replay stay valid; a quantised graph saved with :func:`fxslice.save`
gets its KV-cache program from the same quantised modules (:func:`~fxslice.runtime.generate.transfer_weights`).
"""

from __future__ import annotations

import copy
import dataclasses
import platform
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import FxSliceError, whole
from ..graph.modules import LINEARS
from ..graph.quantized import (QUANTIZED_LINEARS, HalfWeightLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear,
                               model_dtype)
from ..options import QUANT_SCHEMES

INT4_ROWS = 16  # tinygemm's CPU layout packs the output rows in tiles of 16
INT8_INPUTS = 16  # ATen's bf16 int8 kernel reads past the row (garbage or a crash) at other input widths: padded
KERNEL_TOLERANCE = 2e-2  # max |kernel - x Ŵᵀ| / max |x Ŵᵀ|: bf16 activations and output round at ~4e-3
HALF_REASON = "a row with one dominant entry loses its small ones on the integer grid"
GRID_TOLERANCE = 0.25  # ‖Ŵ - W‖ / ‖W‖: int4 groups of Gaussian weights lose ~6%, int8 rows ~0.5%


@dataclass
class QuantizationReport:
    """What pass 8 did: the scheme, and for every Linear-like module the format it holds."""

    scheme: str
    group_size: Optional[int]
    compute_dtype: str
    formats: dict[str, str] = field(default_factory=dict)  # module -> "int8" | "int4"
    kept: dict[str, str] = field(default_factory=dict)  # module -> why it keeps its float weight
    float_bytes: int = 0  # bytes of the quantised modules' weights before
    quantized_bytes: int = 0  # ... and after (integers, scales, zero points)

    def to_record(self) -> dict:
        import torchao

        return {"scheme": self.scheme, "group_size": self.group_size, "compute_dtype": self.compute_dtype,
                "torchao_version": torchao.__version__, "packed_for": "cpu",
                "modules": dict(sorted(self.formats.items())), "kept_float": dict(sorted(self.kept.items())),
                "float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes}


def torchao_configs():
    """torchao's ``quantize_`` and the two configs, or a clear error naming the package (its import-time
    log lines about CUDA-only kernel libraries are filtered: :mod:`fxslice.noise`)."""
    try:
        import torchao  # noqa: F401
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise FxSliceError(f"quantisation needs the package torchao (pip install 'fxslice[quantize]' or "
                           f"pip install torchao==0.18.0): {exc}") from exc
    return quantize_, Int8WeightOnlyConfig, PrototypeInt4WeightOnlyConfig


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the weight-only kernels for a model of ``dtype``."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def check_scheme(scheme: object, device: torch.device | str = "cpu", group_size: object = 32) -> None:
    """Refuse a scheme fxslice does not have, or one this platform cannot run, before any work."""
    if scheme not in QUANT_SCHEMES:
        raise FxSliceError(f"quantisation scheme must be one of {QUANT_SCHEMES}, got {scheme!r}")
    if not whole(group_size) or group_size not in (32, 64, 128, 256):
        raise FxSliceError(f"group_size must be 32, 64, 128 or 256 (int4 groups of inputs), got {group_size!r}")
    device = torch.device(device)
    if device.type != "cpu":
        raise FxSliceError(f"scheme {scheme} runs ATen's CPU weight-only kernels (its weights are packed for them); "
                           f"it cannot run on {device.type}: quantise for cpu, or keep the float folder for {device.type}")
    torchao_configs()
    probe = _probe_module(scheme, group_size)
    try:
        probe(torch.ones(1, probe.in_features))
    except (RuntimeError, NotImplementedError) as exc:
        raise FxSliceError(f"scheme {scheme} cannot run on this platform ({platform.machine()}, torch "
                           f"{torch.__version__}): {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def _probe_module(scheme: str, group_size: int) -> nn.Module:
    linear = nn.Linear(group_size * 2, INT4_ROWS, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.linspace(-1, 1, linear.weight.numel()).reshape(linear.weight.shape))
    module, _ = _quantized_module(linear, scheme, group_size, torch.bfloat16)
    if module is None:
        raise FxSliceError(f"scheme {scheme}: torchao quantised no weight of a {INT4_ROWS}x{group_size * 2} probe")
    return module


def _torchao_weight(weight: torch.Tensor, config) -> torch.Tensor:
    """torchao's quantised tensor of ``weight`` (a copy: the caller's module is not touched)."""
    quantize_, _, _ = torchao_configs()
    probe = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    probe.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    quantize_(probe, config)
    return probe.weight


def _padded(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """``weight`` with zero columns appended up to a multiple of ``multiple`` inputs."""
    extra = -weight.shape[1] % multiple
    return nn.functional.pad(weight.detach(), (0, extra)) if extra else weight.detach()


def _quantized_module(linear: nn.Linear, fmt: str, group_size: int, compute_dtype: torch.dtype):
    """``(module, None)``, or ``(None, reason)`` where ``fmt`` cannot hold this Linear's weight."""
    _, Int8WeightOnlyConfig, PrototypeInt4WeightOnlyConfig = torchao_configs()
    rows, inputs = linear.out_features, linear.in_features
    if fmt == "int4" and rows % INT4_ROWS:
        return None, f"int4 needs rows % {INT4_ROWS} == 0, shape {rows}x{inputs}"
    padded = _padded(linear.weight, INT8_INPUTS if fmt == "int8" else group_size)
    config = Int8WeightOnlyConfig() if fmt == "int8" else PrototypeInt4WeightOnlyConfig(group_size=group_size)
    weight = _torchao_weight(padded, config)
    if not hasattr(weight, "qdata"):
        return None, f"torchao left the {rows}x{inputs} weight unquantised under {fmt}"
    if fmt == "int8":
        module = Int8WeightOnlyLinear(weight.qdata, weight.scale, linear.bias, compute_dtype, in_features=inputs)
    else:
        module = Int4WeightOnlyLinear(weight.qdata, weight.scale_and_zero, group_size, inputs, linear.bias,
                                      compute_dtype, padded_features=padded.shape[1])
    dequantized = _dequantized(weight, module)[:, :inputs]
    mismatch = _kernel_mismatch(module, dequantized)
    if mismatch is not None:
        return None, f"ATen's {fmt} kernel disagrees with the dequantised weight at {rows}x{inputs} ({mismatch})"
    grid_error = ((dequantized - linear.weight.detach().float()).norm() /
                  linear.weight.detach().float().norm().clamp_min(1e-12)).item()
    if not grid_error <= GRID_TOLERANCE:
        return None, f"{fmt} loses {grid_error:.0%} of the {rows}x{inputs} weight (relative error)"
    return module, None


def _dequantized(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``Ŵ`` ``[N, padded inputs]`` in float32: torchao's ``dequantize`` (int8), or, for the int4 layout
    torchao gives no inverse of, ATen's float32 int4 kernel applied to the identity."""
    if isinstance(module, Int8WeightOnlyLinear):
        return weight.dequantize().float()
    eye = torch.eye(module.padded_features, device=module.qdata.device)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, module.qdata, module.group_size,
                                                       module.scale_and_zero.float()).t()


def _kernel_mismatch(module: nn.Module, dequantized: torch.Tensor) -> Optional[str]:
    """None when the module computes ``x Ŵᵀ + b`` on a random input; else the relative error."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, module.in_features, generator=generator).to(module.compute_dtype).to(dequantized.device)
    with torch.no_grad():
        got = module(x).float()
        want = x.float() @ dequantized.t() + (0 if module.bias is None else module.bias.float())
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    return None if error <= KERNEL_TOLERANCE else f"relative error {error:.2g}"


def _tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_modules(gm: nn.Module, scheme: str, *, group_size: int = 32, half_modules: tuple[str, ...] = ()
                     ) -> QuantizationReport:
    """Replace every plain ``nn.Linear`` of ``gm`` (in place) by its quantised module; Linears that
    share one weight share one quantised module. ``half_modules`` (the head, the modules fxslice
    inserted) stay off the integer grid: bfloat16 in a float32 model (:class:`HalfWeightLinear`), as
    they are in a half-precision one."""
    check_scheme(scheme, "cpu", group_size)
    compute_dtype = compute_dtype_for(model_dtype(gm))
    report = QuantizationReport(scheme, group_size if scheme == "int4" else None, str(compute_dtype).replace("torch.", ""))
    by_weight: dict[int, tuple[nn.Module, str]] = {}
    for name, module in list(gm.named_modules()):
        if isinstance(module, QUANTIZED_LINEARS):
            raise FxSliceError(f"module '{name}' is quantised already: quantise the float model it came from")
        if isinstance(module, LINEARS) and type(module) is not nn.Linear:
            report.kept[name] = f"{type(module).__name__} (not a plain Linear)"
            continue
        if type(module) is not nn.Linear:
            continue
        if id(module.weight) in by_weight:
            quantized, fmt = by_weight[id(module.weight)]
            gm.set_submodule(name, quantized)
            report.formats[name] = fmt
            continue
        if name in half_modules:
            if module.weight.dtype == compute_dtype:
                report.kept[name] = f"kept in {report.compute_dtype}: {HALF_REASON}"
                continue
            quantized, fmt = HalfWeightLinear(module.weight, module.bias, compute_dtype), report.compute_dtype
            report.kept[name] = f"{fmt} weights: {HALF_REASON}"
            _replace(gm, name, module, quantized, fmt, report, by_weight)
            continue
        wanted = scheme
        quantized, reason = _quantized_module(module, wanted, group_size, compute_dtype)
        fmt = wanted
        if quantized is None and wanted == "int4":
            fmt = "int8"
            quantized, second = _quantized_module(module, "int8", group_size, compute_dtype)
            reason = reason if quantized is not None else f"{reason}; {second}"
            if quantized is not None:
                report.kept[name] = f"int8 instead of int4: {reason}"
        if quantized is None:
            report.kept[name] = reason
            continue
        _replace(gm, name, module, quantized, fmt, report, by_weight)
    if not report.formats:
        raise FxSliceError(f"scheme {scheme}: the model has no Linear module that can be quantised")
    return report


def half_precision_modules(record: dict) -> tuple[str, ...]:
    """The modules of a slice (its record) pass 8 keeps off the integer grid: the head and every module
    fxslice inserted (shortcuts, norm and head affines). Their rows have one dominant entry — a
    shortcut ``Q_aᵀ Q_p`` is close to a signed permutation, the rotated embedding a tied head reads
    has its mass in the leading principal coordinates — so per-row int8 scales resolve the rest
    poorly: on SmolLM2 at 80%, int8 shortcuts cost +1.9% perplexity and an int8 head +0.9%, the
    other Linears together +0.4%."""
    return tuple(record.get("head") or ()) + tuple(m["name"] for m in record.get("inserted") or ())


def _replace(gm: nn.Module, name: str, module: nn.Linear, quantized: nn.Module, fmt: str,
             report: QuantizationReport, by_weight: dict) -> None:
    by_weight[id(module.weight)] = (quantized, fmt)
    report.float_bytes += _tensor_bytes(module.weight, module.bias)
    report.quantized_bytes += _tensor_bytes(*quantized.parameters())
    gm.set_submodule(name, quantized)
    report.formats[name] = fmt


def _shallow_copy(gm: GraphModule) -> GraphModule:
    """A copy of ``gm``'s modules and graph sharing its tensors (the caller's model stays as it was)."""
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    return copy.deepcopy(gm, memo)


def quantize(sliced: GraphModule, scheme: str = "int8", *, group_size: int = 32) -> GraphModule:
    """A copy of the sliced graph with its Linears quantised by ``scheme`` (``"int8"``: int8 weights,
    one scale per row; ``"int4"``: int4 in groups of ``group_size`` inputs, the head int8).

    The copy shares the float tensors it keeps with ``sliced``, which is left as it was; its
    ``.fxslice`` result carries the quantisation report, so :func:`fxslice.save` records it and builds
    the KV-cache program from the quantised modules."""
    if not isinstance(sliced, GraphModule):
        raise FxSliceError(f"quantize expects the GraphModule fxslice.compress returned (or fxslice.quantize_folder "
                           f"for a saved folder), got {type(sliced).__name__}")
    check_scheme(scheme, next(sliced.parameters()).device, group_size)
    quantized = _shallow_copy(sliced)
    result = getattr(sliced, "fxslice", None)
    report = quantize_modules(quantized, scheme, group_size=group_size, half_modules=half_precision_modules(
        result.to_record() if result is not None else {}))
    quantized.recompile()
    if result is not None:
        quantized.fxslice = dataclasses.replace(result, quantization=report.to_record())
    return quantized
