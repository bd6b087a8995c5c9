"""Branches kept in the model's coordinates: a value added to the stream that fxslice cannot trace to
rotatable writers (an op after them that is not linear in the stream's coordinates, or a writer whose
output is also used elsewhere) is mapped into the position's basis as a whole by an inserted Linear,
``<block>.branch_<p>`` (the identity, later ``Q_pᵀ``). Inkling's causal convolution over the attention
and MLP outputs, ``o + conv_t(o)`` per channel, is the family that needs it."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import (VOCAB, OneBlock, calibration, check_exact_and_sliced, check_exact_in_dtype, check_sliced,
                         masked_calibration, random_model, seeded)

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
INKLING = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
               sliding_window_size=8, d_rel=8, rel_extent=64, max_position_embeddings=64,
               layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["dense", "sparse"], intermediate_size=192,
               moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def inkling(dtype: torch.dtype = torch.float32) -> nn.Module:
    return random_model(AutoConfig.for_model("inkling_text", **INKLING), dtype)


class TimeMixedBranches(nn.Module):
    """Pre-norm blocks whose branches end in ops fxslice cannot rotate: ``o + conv_t(o)`` (a causal
    depthwise convolution over the tokens, each channel its own kernel) and ``tanh(mlp(h)) * 2``."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 2, kernel: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width) for _ in range(2 * blocks))
        self.outs = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)
                                   for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, conv in enumerate(self.convs):
            o = self.outs[i](self.norms[2 * i](x))
            x = x + o + conv(o.transpose(1, 2))[..., :o.shape[1]].transpose(1, 2)
            x = x + torch.tanh(self.downs[i](torch.relu(self.ups[i](self.norms[2 * i + 1](x))))) * 2.0
        return self.head(self.final(x))


def branch_maps(sliced) -> list:
    return [m for m in sliced.fxslice.inserted if m.kind == "branch_map"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_branches_kept_in_model_coordinates_are_exact(dtype):
    exact = check_exact_in_dtype(lambda dt: seeded(TimeMixedBranches).to(dt), dtype, IDS)
    # ``x + o + conv(o)``: ``o`` (used twice) and the convolution each get one; the MLP's tanh one
    assert [(m.reads, m.writes) for m in branch_maps(exact)] == [(None, p) for p in (1, 1, 2, 3, 3, 4)]


def test_branch_maps_are_sliced_to_the_position_they_write():
    torch.manual_seed(0)
    model = TimeMixedBranches().eval()
    sliced = check_sliced(model, calibration(), IDS)
    result = sliced.fxslice
    for m in branch_maps(sliced):  # full-width input (the model's coordinates), the position's width out
        assert sliced.get_submodule(m.name).weight.shape == (result.widths[m.writes], 32)


def test_a_branch_reading_the_stream_itself_is_still_refused_naming_the_node():
    torch.manual_seed(0)
    with pytest.raises(GraphStructureError, match=r"node 'tanh'.*consumes the residual stream"):
        fxslice.compress(seeded(OneBlock, outer=torch.tanh), calibration(), 0.25, progress=False)


@pytest.mark.slow  # the toys above keep the mechanism in the quick profile
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_inkling_is_exact_and_slices(masked):
    exact = check_exact_and_sliced(inkling(), masked_calibration() if masked else calibration(), IDS)
    assert len(branch_maps(exact)) == 4  # attention and MLP outputs of both layers go through a convolution


@pytest.mark.slow
def test_bfloat16_inkling_is_exact_to_its_own_rounding():
    check_exact_in_dtype(inkling, torch.bfloat16, IDS)


@pytest.mark.slow
def test_inkling_saves_and_reloads_without_a_kv_cache_program(tmp_path):
    """transformers' static cache holds no convolution state for Inkling (as for Zaya): the folder runs
    the full-sequence program and ``save`` says why it has no ``generate.pt2``."""
    from fxslice.runtime.load import load
    from fxslice.runtime.save import save

    sliced = fxslice.compress(inkling(), masked_calibration(), 0.25, progress=False)
    with pytest.warns(UserWarning, match="no generate.pt2.*conv state"):
        folder = save(sliced, tmp_path / "sliced")
    loaded, _ = load(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, sliced(IDS).logits, atol=1e-5, rtol=1e-5)
