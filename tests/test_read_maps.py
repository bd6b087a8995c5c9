"""Norm outputs read in the model's coordinates: an op that gates a reader-side norm's output per
coordinate by a value computed from the input (AXK2's ``y ⊙ σ(g(y))``, ``y = RMSNorm(x)``) commutes with no
rotation, so fuse puts the norm's ``diag(γ)`` (+ ``β``) on that edge as a Linear, ``<norm>_read`` — a reader of
the stream like any other, ``Q_pᵀ diag(γ)`` after rotation, ``D × d_p`` once sliced — and the gate sees the
values it saw. The Linears reading the norm's output directly (the gate's own projection) stay rotated."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import (VOCAB, OneBlock, calibration, check_exact_and_sliced, check_exact_in_dtype,
                         check_saved_generation, check_sliced, check_streamed_equals_in_memory, masked_calibration,
                         perturb_norms, random_model, seeded)

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(7))
# experts dominate, as in the real model (128 of 512 units at width 2048): their inputs are the gated norm's,
# so only their outputs are sliced
AXK2 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=2,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
            qk_nope_head_dim=16, head_dim=8, index_topk=8, index_head_dim=16, index_n_heads=2, gated_norm_rank=4,
            mlp_layer_types=["dense", "sparse", "sparse"], max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


class GatedNorms(nn.Module):
    """Pre-norm blocks whose norms' outputs are gated per coordinate by a low-rank projection of themselves,
    ``y ⊙ σ(up(silu(down(y))))``, before the attention-like and MLP Linears read them."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 2, rank: int = 4, layer_norm: bool = False):
        super().__init__()
        norm = (lambda: nn.LayerNorm(width)) if layer_norm else (lambda: nn.RMSNorm(width))
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(norm() for _ in range(2 * blocks))
        self.gate_downs = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(2 * blocks))
        self.gate_ups = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(2 * blocks))
        self.outs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.final = norm()
        self.head = nn.Linear(width, vocab, bias=False)
        perturb_norms(self)

    def gated(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = self.norms[i](x)
        return y * torch.sigmoid(self.gate_ups[i](F.silu(self.gate_downs[i](y))))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i in range(len(self.outs)):
            x = x + self.outs[i](self.gated(2 * i, x))
            x = x + self.downs[i](torch.relu(self.ups[i](self.gated(2 * i + 1, x))))
        return self.head(self.final(x))


def read_maps(sliced) -> list:
    return [m for m in sliced.fxslice.inserted if m.kind == "read_map"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["rmsnorm", "layernorm"])
def test_gated_norm_outputs_are_exact(dtype, layer_norm):
    exact = check_exact_in_dtype(lambda dt: seeded(GatedNorms, layer_norm=layer_norm).to(dt), dtype, IDS)
    maps = read_maps(exact)
    assert [(m.name, m.reads, m.writes) for m in maps] == [(f"norms.{i}_read", i, None) for i in range(4)]
    if layer_norm:  # the norm's shift β is the map's bias
        assert exact.get_submodule("norms.0_read").bias is not None


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_read_maps_are_sliced_to_the_position_they_read(masked):
    torch.manual_seed(0)
    model = seeded(GatedNorms)
    sliced = check_sliced(model, masked_calibration() if masked else calibration(), IDS)
    result = sliced.fxslice
    for m in read_maps(sliced):  # the position's width in, the model's coordinates out
        assert sliced.get_submodule(m.name).weight.shape == (32, result.widths[m.reads])
    for i in range(4):  # the gate's own projection reads the rotated norm output, sliced like any reader
        assert sliced.get_submodule(f"gate_downs.{i}").weight.shape == (4, result.widths[i])


def test_other_ops_on_a_norm_output_are_still_refused_naming_the_node():
    with pytest.raises(GraphStructureError, match=r"norm 'norm' is read by node 'cumsum'"):
        fxslice.compress(seeded(OneBlock, inner=partial(torch.cumsum, dim=1)), calibration(), 0.25, progress=False)


def axk2(dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    return random_model(AutoConfig.for_model("axk2", **{**AXK2, **overrides}), dtype)


@pytest.mark.slow  # the toys above keep the mechanism in the quick profile
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_axk2_is_exact_and_slices(masked):
    exact = check_exact_and_sliced(axk2(), masked_calibration() if masked else calibration(), IDS)
    # both norms of the sparse layers and the attention norm of the dense one are gated
    assert sorted(m.name for m in read_maps(exact)) == sorted(
        [f"model.layers.{i}.input_layernorm.norm_read" for i in range(3)]
        + [f"model.layers.{i}.post_attention_layernorm.norm_read" for i in (1, 2)])


@pytest.mark.slow
def test_bfloat16_axk2_is_exact_to_its_own_rounding():
    """With its indexer's top-k over every token: with a selection among 11 tokens active, the bf16 graph's
    logits differ from the float32 model's by 0.010 against the bf16 model's own 0.002 (a selection flipped by
    rounding); without it by 0.003 against 0.002."""
    check_exact_in_dtype(lambda dtype: axk2(dtype, index_topk=64), torch.bfloat16, IDS)


@pytest.mark.slow
def test_axk2_slice_generates_from_its_saved_folder(tmp_path):
    sliced = fxslice.compress(axk2(), masked_calibration(), 0.25, progress=False)
    check_saved_generation(sliced, tmp_path / "sliced", IDS[:1, :6])


@pytest.mark.slow
def test_a_budget_out_of_reach_of_the_rotated_split_is_met_with_the_stream_whole():
    """AXK2's narrowest rotated slice keeps 38% of the tiny model (its experts read the gate's model-coordinate
    output, so only their writers narrow), its stream whole with every MLP and expert cut to 8 units 25%."""
    model = axk2()
    sliced = fxslice.compress(model, calibration(batches=8), target_params=0.3, progress=False)
    search = sliced.fxslice.split_search
    fixed = search.candidates[0]
    assert fixed.label.startswith("fixed") and "out of reach" in fixed.refused and fixed.score is None
    assert search.chosen.startswith("stream whole") and sliced.fxslice.param_fraction <= 0.3 + 0.005
    assert sliced.fxslice.param_count == sum(p.numel() for p in sliced.parameters())


@pytest.mark.slow
def test_a_streamed_axk2_checkpoint_equals_the_model_in_memory(tmp_path):
    """The read maps are inserted modules like the shortcuts: created from the norm's weight as it streams in."""
    check_streamed_equals_in_memory(axk2(), masked_calibration(), IDS, tmp_path / "ckpt")


class GatedOnce(nn.Module):
    """One pre-norm block whose norm output goes through ``mix`` before the output Linear."""

    def __init__(self, layer_norm: bool = False, width: int = 32):
        super().__init__()
        norm = (lambda: nn.LayerNorm(width)) if layer_norm else (lambda: nn.RMSNorm(width))
        self.embed = nn.Embedding(VOCAB, width)
        self.norm, self.final = norm(), norm()
        self.down, self.up = nn.Linear(width, 4, bias=False), nn.Linear(4, width, bias=False)
        self.route = nn.Linear(width, 1)
        self.out = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        with torch.no_grad():
            for module in (self.norm, self.final):
                module.weight.normal_(1.0, 0.3)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.3)

    def mix(self, y):
        return y

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.out(self.mix(self.norm(x)))
        return self.head(self.final(x))


class GatedBySelf(GatedOnce):
    def mix(self, y):  # both factors rotated values: no read map can serve both
        return y * y[:, :1]


class RowScaledThenGated(GatedOnce):
    def mix(self, y):  # a per-token weight before the gate: a LayerNorm's shift β cannot move past it
        return (torch.sigmoid(self.route(y)) * y) * torch.sigmoid(self.up(F.silu(self.down(y))))


class RowScaledThenRead(GatedOnce):
    def mix(self, y):  # the same before a plain reader (refused since this change; silently inexact before)
        return torch.sigmoid(self.route(y)) * y


class ScaledPerDimension(GatedOnce):
    def mix(self, y):  # a per-dimension map after a reader-side norm that no residual add follows
        return y * self.scale


@pytest.mark.parametrize("model, message", [
    (GatedBySelf, r"norm 'norm' is read by node 'mul'.* as both of its factors"),
    (ScaledPerDimension, r"norm 'norm' is read by node 'mul'"),
])
def test_gates_no_read_map_can_serve_are_refused_naming_the_node(model, message):
    with pytest.raises(GraphStructureError, match=message):
        fxslice.compress(seeded(model), calibration(), 0.0, progress=False)


@pytest.mark.parametrize("model", [RowScaledThenGated, RowScaledThenRead])
def test_a_shift_past_a_row_scaling_is_refused_naming_both_nodes(model):
    with pytest.raises(GraphStructureError, match=r"norm 'norm' has a shift β and node 'mul'.* before node"):
        fxslice.compress(seeded(model, layer_norm=True), calibration(), 0.0, progress=False)
    exact = check_exact_in_dtype(lambda dt: seeded(model).to(dt), torch.float32, IDS)  # RMSNorm: no shift
    assert len(read_maps(exact)) == (model is RowScaledThenGated)
