"""Residual updates written as interpolations: nGPT keeps the stream on the unit sphere and moves it
towards each normalised branch at a learned rate per dimension, ``h ← norm(h + r ⊙ (norm(y) − h))`` (Dory's
blocks). Canonicalise writes ``x + r ⊙ (y − x)`` as ``(1 − r) ⊙ x + r ⊙ y`` — a per-dimension map on the skip
edge and one on the branch — and the analysis follows a norm's output that continues the stream through such
a map. Exact at sparsity 0 in float32 and bf16, sliced at 25%."""

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import GraphStructureError
from fxslice.passes.p1_capture import capture
from fxslice.passes.p2_canonicalise import canonicalise
from fxslice.graph import ops
from fxslice.hf import model_spec
from tiny_models import VOCAB, calibration, check_exact_in_dtype, check_sliced, masked_calibration, seeded

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(9))


class L2Norm(nn.Module):
    """Onto the unit sphere (a sum of squares, not a mean), computed in float32."""

    def forward(self, x):
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6)).type_as(x)


class Interpolated(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 3, lerp: bool = False):
        super().__init__()
        self.lerp = lerp
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(L2Norm() for _ in range(4 * blocks + 1))
        self.outs = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width, bias=False) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width, bias=False) for _ in range(blocks))
        self.rates = nn.ParameterList(nn.Parameter(torch.rand(width) * 0.5) for _ in range(2 * blocks))
        self.head = nn.Linear(width, vocab, bias=False)

    def update(self, h, y, i):
        rate = self.rates[i].abs()
        return torch.lerp(h, y, rate) if self.lerp else h + rate * (y - h)

    def forward(self, input_ids):
        h = self.norms[0](self.embed(input_ids))
        for i in range(len(self.outs)):
            a = self.norms[4 * i + 1](self.outs[i](h))
            h = self.norms[4 * i + 2](self.update(h, a, 2 * i))
            m = self.norms[4 * i + 3](self.downs[i](torch.relu(self.ups[i](h))))
            h = self.norms[4 * i + 4](self.update(h, m, 2 * i + 1))
        return self.head(h)


@pytest.mark.parametrize("lerp", [False, True], ids=["written-out", "torch.lerp"])
def test_interpolations_become_sums(lerp):
    model = seeded(Interpolated, lerp=lerp)
    graph = canonicalise(capture(model, model_spec(model))).graph
    assert not any(ops.calls(node, {ops.aten.sub.Tensor, ops.aten.lerp.Tensor}) for node in graph.nodes)
    assert sum(ops.calls(node, ops.aten.rsub.Scalar) for node in graph.nodes) == 6  # 1 - r, once per update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lerp", [False, True], ids=["written-out", "torch.lerp"])
def test_interpolated_updates_are_exact(dtype, lerp):
    check_exact_in_dtype(lambda dt: seeded(Interpolated, lerp=lerp).to(dt), dtype, IDS)


class InputDependentRate(Interpolated):
    def update(self, h, y, i):  # a rate computed from the branch: no per-dimension map, still refused
        return h + torch.sigmoid(y) * (y - h)


def test_an_input_dependent_rate_is_refused_naming_the_node():
    with pytest.raises(GraphStructureError, match=r"node 'sub(_\d+)?'.*consumes the residual stream"):
        fxslice.compress(seeded(InputDependentRate), calibration(), 0.25, progress=False)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_interpolated_updates_slice(masked):
    model = seeded(Interpolated)
    sliced = check_sliced(model, masked_calibration() if masked else calibration(), IDS)
    assert min(sliced.fxslice.widths) < 32


class NotInterpolations(Interpolated):
    """Sums that look like interpolations but are not the same as ``(1 − r) ⊙ x + r ⊙ y`` — and one that is,
    at a rate that is a number."""

    def __init__(self, kind: str):
        super().__init__(blocks=1)
        self.kind = kind

    def update(self, h, y, i):
        rate = self.rates[i].abs()
        if self.kind == "number":  # a rate that is a number (aten.lerp.Scalar): rewritten like a tensor's
            return torch.lerp(h, y, 0.25)
        if self.kind == "alpha":
            return torch.add(h, rate * (y - h), alpha=2.0)
        return h + rate * (y[:, :1] - h)  # y broadcast over the tokens: the result is not y's shape


@pytest.mark.parametrize("kind", ["alpha", "broadcast"])
def test_look_alike_sums_are_left_as_they_are(kind):
    model = seeded(NotInterpolations, kind=kind)
    graph = canonicalise(capture(model, model_spec(model))).graph
    assert any(ops.calls(node, ops.aten.sub.Tensor) for node in graph.nodes)
    assert not any(ops.calls(node, ops.aten.rsub.Scalar) for node in graph.nodes)


def test_an_interpolation_at_a_number_rate_is_exact():
    model = seeded(NotInterpolations, kind="number")
    graph = canonicalise(capture(model, model_spec(model))).graph
    assert not any(ops.calls(node, {ops.aten.lerp.Scalar, ops.aten.sub.Tensor}) for node in graph.nodes)
    check_exact_in_dtype(lambda dt: seeded(NotInterpolations, kind="number").to(dt), torch.float32, IDS)
