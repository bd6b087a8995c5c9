"""Property-based fuzzing: random small models of every supported family (tests/fuzz_models.py).

For every drawn case:
(a) sparsity 0 is exact on an input of another batch size and length than the calibration
    (fp32: 1e-4 absolute; bf16: against an fp32 copy of the same weights, the sliced error at most
    4x the bf16 model's own error + 1e-2);
(b) at the drawn sparsity the logits are finite, every rotated position but the last has width
    ``floor(D (1 - s))`` rounded down to a multiple of 8, the last keeps ``D`` (``D - 1`` in a centred
    stream), raw positions keep ``D``, every Linear of ``result.layout`` has the width of the
    positions it reads and writes, and ``result.param_count`` counts the parameters of the graph;
(c) the caller's model is bit-identical before and after both compressions.

FXSLICE_FUZZ_EXAMPLES sets the number of examples (default 30, ~1.5 minutes on 2 cores).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import fxslice
from fuzz_models import FuzzCase, expected_width, fuzz_cases
from tiny_models import VOCAB

FP32_TOLERANCE = 1e-4


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_exact(case: FuzzCase, model: nn.Module, sliced: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(ids).logits
        got = sliced(ids).logits
    assert got.shape == expected.shape == (case.eval_batch_size, case.eval_length, model.config.vocab_size), \
        (got.shape, expected.shape)
    if case.torch_dtype == torch.float32:
        error = _max_error(got, expected)
        assert error < FP32_TOLERANCE, f"sparsity 0 is not exact: max |sliced - model| = {error:.3g}"
        return
    reference = case.build(torch.float32)  # the same weights in fp32
    with torch.no_grad():
        exact = reference(ids).logits
    noise = _max_error(expected, exact)
    error = _max_error(got, exact)
    assert error <= 4 * noise + 1e-2, (f"sparsity 0 in {case.dtype}: max |sliced - fp32| = {error:.3g} > "
                                       f"4 x max |model - fp32| ({noise:.3g}) + 1e-2")


def check_sliced(case: FuzzCase, sliced: nn.Module, ids: torch.Tensor) -> None:
    result = sliced.fxslice
    hidden = result.hidden_size
    d = expected_width(hidden, case.sparsity)
    last = len(result.widths) - 1
    rotated = [i for i, spectrum in enumerate(result.eigenvalues) if spectrum is not None]
    assert rotated, "no stream position was rotated"
    for index, width in enumerate(result.widths):
        if index not in rotated:
            want = hidden
        elif index == last:
            want = hidden - 1 if result.centered else hidden
        else:
            want = min(d, hidden - 1) if result.centered else d
        assert width == want, f"position {index} has width {width}, expected {want} (widths {result.widths})"
    assert result.layout, "no module touches the stream"
    for name, (reads, writes) in result.layout.items():
        module = sliced.get_submodule(name)
        if reads is not None:
            assert module.weight.shape[-1] == result.widths[reads], \
                f"{name} reads position {reads} with {module.weight.shape[-1]} columns, width {result.widths[reads]}"
        if writes is not None:
            width = module.weight.shape[1] if isinstance(module, nn.Embedding) else module.out_features
            assert width == result.widths[writes], \
                f"{name} writes position {writes} with width {width}, expected {result.widths[writes]}"
    assert result.param_count == sum(p.numel() for p in sliced.parameters()), \
        (result.param_count, sum(p.numel() for p in sliced.parameters()))
    with torch.no_grad():
        logits = sliced(ids).logits
    assert logits.shape == (case.eval_batch_size, case.eval_length, VOCAB), logits.shape
    assert torch.isfinite(logits.float()).all(), "non-finite logits after slicing"


def _hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


def check_case(case: FuzzCase) -> None:
    """Properties (a), (b) and (c) for one drawn case; raises AssertionError (or the library's error)."""
    model = case.build()
    before = _snapshot(model)
    calib, ids = case.calibration(), case.eval_input()
    hidden = _hidden_size(model)
    exact = fxslice.compress(model, calib, 0.0, progress=False)  # whole widths whatever D is (no rounding)
    assert exact.fxslice.hidden_size == hidden
    check_exact(case, model, exact, ids)
    del exact
    sliced = fxslice.compress(model, calib, case.sparsity, progress=False)
    check_sliced(case, sliced, ids)
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"compress changed the caller's model: {changed[:5]}"


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("FXSLICE_FUZZ_EXAMPLES", 30)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases())
def test_fuzz(case: FuzzCase) -> None:
    try:
        check_case(case)
    except Exception as exc:
        exc.add_note(f"case: {case.describe()}\nreproducer:\n{case.reproducer()}")
        raise
