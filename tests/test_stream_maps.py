"""Per-dimension affine maps of the stream, and a norm's output carried into a later residual add.

Per-dimension affine maps of the stream: residual gates on the skip edge (Doge ``g ⊙ x + y``, Ergo
``r(w) ⊙ x + b(w) ⊙ y``), a scale and bias on both sides of the add (Zaya ``(x + c) ⊙ s + (y + c') ⊙ s'``)
and on the embedding before the first block (Zaya). They commute with no rotation: fuse moves them into
the shortcut (``diag(s)`` and a bias, never removed) and the branch's writers."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import (VOCAB, calibration, check_exact_in_dtype, check_saved_generation, masked_calibration,
                         random_model, seeded)

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "doge": dict(SMALL, intermediate_size=96, num_key_value_heads=4),  # g ⊙ x + attn(x)
    "ergo": dict(SMALL, first_dense_intermediate_size=96, moe_intermediate_size=32, shared_intermediate_size=48,
                 num_experts=4, num_experts_per_tok=2, sliding_window=8),  # gates on both sides, post-norms
    # identity ("zero") experts: w ⊙ norm(x) of the MoE's input joins the MoE's output, added a sublayer later
    "longcat_flash": dict({k: v for k, v in SMALL.items() if k != "num_hidden_layers"}, num_layers=2,
                          num_key_value_heads=4, ffn_hidden_size=96, q_lora_rank=32,
                          kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=16,
                          moe_topk=2, n_routed_experts=4, zero_expert_num=4, expert_ffn_hidden_size=32),
    "zaya": dict(SMALL, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1,
                 router_hidden_size=32),  # (x + c) ⊙ s on both sides, and on the embedding; tied head
}


def tiny(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Gates, scales and biases away from their initial ones and zeros."""
    return random_model(AutoConfig.for_model(family, **CONFIGS[family]), dtype)


def shortcuts(sliced) -> dict[str, nn.Module]:
    return {name: module for name, module in sliced.named_modules() if name.rsplit(".", 1)[-1].startswith("shortcut_")}


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_stream_maps_are_exact_and_leave_the_model_as_it_was(family, masked):
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    with torch.no_grad():
        for ids in (IDS, IDS[:1, :5]):
            assert (exact(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = {n for n, _ in exact.named_parameters()}
    gates = [n for n in before if n.endswith(("input_residual", "residual_gate.weight", "residual_scale",
                                               "residual_bias", "input_hidden_states_scale"))]
    assert not any(g in names for g in gates), "the per-dimension maps left the graph"


@pytest.mark.parametrize("family", [f if f in ("doge", "longcat_flash") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(CONFIGS)])
def test_stream_maps_slice_and_keep_their_shortcuts(family):
    model = tiny(family)
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    result = sliced.fxslice
    kept = shortcuts(sliced)
    # the block basis makes a plain shortcut inside a block the identity (removed); a mapped one stays:
    # every residual add here is mapped (and Zaya's embedding), the head's position keeps its width
    if family == "longcat_flash":  # no map: the block's shortcuts go; the identity experts' diag(γ) stays
        passthroughs = [m for m in result.inserted if m.kind == "passthrough"]
        assert [(m.reads, m.writes) for m in passthroughs] == [(1, 4), (5, 8)]
        assert all(sliced.get_submodule(m.name).weight.shape == (result.widths[m.writes], result.widths[m.reads])
                   for m in passthroughs) and result.widths[1] == 48
        return
    assert len(kept) == (5 if family == "zaya" else 4)
    assert all(m.in_features == 48 and m.out_features in (48, 64) for m in kept.values())
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    with torch.no_grad():
        logits, dense = sliced(IDS).logits, model(IDS).logits
    assert logits.shape == (3, 11, VOCAB) and torch.isfinite(logits).all()
    agreement = (logits.argmax(-1) == dense.argmax(-1)).float().mean()
    assert agreement > 0.3, agreement


def test_gated_skip_shortcut_holds_the_rotated_gate():
    """Doge's ``g ⊙ x`` inside one block basis: the shortcut between the block's attention input and
    MLP input is ``Qᵀ diag(g) Q`` (kept, not the identity): its eigenvalues are the gate's values."""
    model = tiny("doge")
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    gate = model.model.layers[0].input_residual.detach().double()
    inner = exact.get_submodule("model.layers.0.shortcut_1").weight.detach().double()
    torch.testing.assert_close(inner, inner.T, atol=1e-5, rtol=1e-5)  # one basis on both sides
    torch.testing.assert_close(torch.linalg.eigvalsh(inner), gate.sort().values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["doge", "zaya", pytest.param("ergo", marks=pytest.mark.slow),
                                    pytest.param("longcat_flash", marks=pytest.mark.slow)])
def test_bfloat16_stream_maps_are_exact_to_their_own_rounding(family):
    """Zaya keeps its stream in float32 (``residual_in_fp32``) around bfloat16 blocks: the casts that
    leave with its maps are put back around the shortcuts."""
    check_exact_in_dtype(lambda dtype: tiny(family, dtype), torch.bfloat16, IDS)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["doge", "longcat_flash", "ergo"])
def test_kv_cache_program_save_and_reload(family, tmp_path):
    sliced = fxslice.compress(tiny(family), masked_calibration(), 0.25, progress=False)
    check_saved_generation(sliced, tmp_path / "sliced", IDS[:1, :6])


class Norm(nn.Module):
    def __init__(self, width: int, centred: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if centred else nn.RMSNorm(width)

    def forward(self, x):
        return self.norm(x)


class MappedBlocks(nn.Module):
    """Pre-norm blocks whose skip edge and branch go through every kind of elementwise step with a
    constant per hidden coordinate: ``k - x``, ``x / k``, ``x * k``, ``x + k`` and casts between them."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 2, centred: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(Norm(width, centred) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.gates = nn.Parameter(torch.rand(blocks, width) + 0.5)
        self.shift = nn.Parameter(torch.randn(width))
        self.final = Norm(width, centred)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = (self.shift - self.embed(input_ids)) / 2.0  # nothing added: the stream goes on mapped
        for i in range(len(self.ups)):
            y = self.downs[i](torch.relu(self.ups[i](self.norms[i](x))))
            x = (x.float() / self.gates[i]).to(x.dtype) + (y * self.gates[i] + self.shift)
        return self.head(self.final(x))


class GatedParallel(nn.Module):
    """Parallel blocks ``x + g ⊙ attn(n(x)) + mlp(n(x))``: the gated branch's sum has no reader of its own,
    and the final norm reads ``x ⊙ s``."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width) for _ in range(blocks))
        self.attns = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.gates = nn.Parameter(torch.rand(blocks, width) + 0.5)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i in range(len(self.attns)):
            h = self.norms[i](x)
            x = x + self.gates[i] * self.attns[i](h) + self.downs[i](torch.relu(self.ups[i](h)))
        return self.head(self.final(x * self.scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gated_branch_summed_with_another_and_a_scaled_final_norm(dtype):
    exact = check_exact_in_dtype(lambda dt: seeded(GatedParallel).to(dt), dtype, IDS)
    assert "gates" not in dict(exact.named_parameters())


def test_every_elementwise_step_composes_exactly():
    torch.manual_seed(0)
    model = MappedBlocks().eval()
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS)).abs().max().item() < 1e-4
        assert torch.isfinite(sliced(IDS).logits).all()
    assert "gates" not in dict(exact.named_parameters()) and "shift" not in dict(exact.named_parameters())


def test_a_stream_map_in_a_layernorm_model_is_refused_naming_the_node():
    torch.manual_seed(0)
    model = MappedBlocks(centred=True).eval()
    with pytest.raises(GraphStructureError, match=r"node '.*'.*per dimension.*LayerNorm"):
        fxslice.compress(model, calibration(), 0.25, progress=False)


@pytest.mark.slow
def test_streamed_checkpoint_slices_like_the_model_in_memory(tmp_path):
    """The gates are read with the checkpoint's small tensors before fuse moves them into the shortcuts."""
    model = tiny("ergo")
    model.save_pretrained(tmp_path / "ergo")
    streamed = fxslice.compress(tmp_path / "ergo", calibration(), 0.25, progress=False)
    in_memory = fxslice.compress(model, calibration(), 0.25, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(streamed(IDS).logits, in_memory(IDS).logits, atol=1e-4, rtol=1e-4)


class StrayNormOutput(nn.Module):
    """A pre-norm block whose norm output, besides its Linear reader, is summed with something that
    never reaches the stream: no residual add owns that path."""

    def __init__(self, vocab: int = VOCAB, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, width)
        self.probe = nn.Linear(width, width)
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = self.norm(x)
        x = x + self.up(h)
        side = self.probe(x) + h * 0.5  # the norm output leaves the stream's algebra
        return self.head(self.final(x)) + side.sum(-1, keepdim=True)


def test_a_norm_output_summed_outside_the_stream_is_refused_naming_the_norm():
    torch.manual_seed(0)
    with pytest.raises(GraphStructureError, match=r"norm 'norm'"):
        fxslice.compress(StrayNormOutput().eval(), calibration(), 0.25, progress=False)
