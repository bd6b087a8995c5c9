"""Capture patterns: modules whose own forward torch.export cannot trace (a loop over the experts a batch
reaches) are captured through a substitute that was checked against them, and then slice like any other."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import fxslice
from fxslice.errors import FxSliceError, GraphStructureError
from fxslice.graph.modules import ExpertLinear
from fxslice.registry import Substitution, capture_substitutions, verify_substitution
from tiny_models import VOCAB, calibration, masked_calibration, random_model

INPUTS = [torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5)),
          torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(6))]

CONFIGS = {
    # experts stored as [E·F, H] matrices, looped over the experts a batch reaches (nonzero)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}),
    # rows sorted by expert and split by .tolist() counts; experts in the attention too (map / reduce)
    "jetmoe": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                   intermediate_size=48, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                   bos_token_id=1, eos_token_id=2),
}


def tiny(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Norm scales and the blocks' biases away from their initial values."""
    return random_model(AutoConfig.for_model(family, **CONFIGS[family]), dtype)


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_looped_experts_are_captured_exactly_and_left_as_they_were(family, masked):
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    for ids in INPUTS:
        with torch.no_grad():
            assert (exact(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    assert any(isinstance(m, ExpertLinear) for m in exact.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) and "map" not in vars(m) for m in model.modules()), "substitute left behind"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_looped_experts_lose_stream_width_and_hidden_units(family):
    model = tiny(family)
    sliced = fxslice.compress(model, calibration(), 0.25, hidden_sparsity=0.25, progress=False)
    result = sliced.fxslice
    experts = [(name, m) for name, m in sliced.named_modules() if isinstance(m, ExpertLinear)]
    readers = [m for name, m in experts if result.layout.get(name, (None, None))[0] is not None]
    assert readers and all(m.in_features == 48 for m in readers)
    assert result.hidden_widths and all(sliced.get_submodule(n).in_features < 48 for n in result.hidden_widths)
    assert result.param_count == sum(p.numel() for p in sliced.parameters()) and result.param_fraction < 0.9
    with torch.no_grad():
        logits = sliced(INPUTS[0]).logits
    assert logits.shape == (3, 11, VOCAB) and torch.isfinite(logits).all()


def test_bfloat16_looped_experts_are_exact_to_their_own_rounding():
    model, reference = tiny("dbrx", torch.bfloat16), tiny("dbrx")
    sliced = fxslice.compress(model, calibration(), 0.0, progress=False)
    ids = INPUTS[0]
    with torch.no_grad():
        noise = (model(ids).logits.float() - reference(ids).logits).abs().max()
        error = (sliced(ids).logits.float() - model(ids).logits.float()).abs().max()
    assert error <= 4 * noise + 1e-3


class LoopedExperts(nn.Module):
    """Two experts run on the tokens routed to them (``nonzero``, ``index_add``): captured, the weights are
    indexed per expert and the rows scattered back, which no linear pattern recognises."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.router = nn.Linear(width, 2)
        self.up, self.down = nn.Parameter(torch.randn(2, 48, width) / 6), nn.Parameter(torch.randn(2, width, 48) / 7)

    def forward(self, x):
        rows, out = x.reshape(-1, x.shape[-1]), torch.zeros_like(x.reshape(-1, x.shape[-1]))
        choice = self.router(rows).argmax(-1)
        for expert in range(2):
            picked = (choice == expert).nonzero().squeeze(-1)
            out = out.index_add(0, picked, torch.relu(rows[picked] @ self.up[expert].T) @ self.down[expert].T)
        return out.view_as(x)


def gathered(self, x):
    """``LoopedExperts`` with every row gathering its expert's weights (what ``patterns/experts.py`` finds)."""
    rows = x.reshape(-1, x.shape[-1])
    ids = self.router(rows).argmax(-1)
    hidden = torch.relu(torch.bmm(self.up[ids], rows.unsqueeze(-1)).squeeze(-1))
    return torch.bmm(self.down[ids], hidden.unsqueeze(-1)).squeeze(-1).view(x.shape)


class ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.final = nn.Embedding(VOCAB, 32), nn.RMSNorm(32), nn.RMSNorm(32)
        self.experts, self.head = LoopedExperts(), nn.Linear(32, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.experts(self.norm(x))
        return self.head(self.final(x))


def _propose(forward):
    def propose(module):
        if not isinstance(module, LoopedExperts):
            return None
        return Substitution({"forward": forward},
                            lambda call, generator: call("forward", torch.randn(2, 9, 32, generator=generator)))
    return propose


def test_a_registered_capture_pattern_makes_a_looped_module_capturable():
    torch.manual_seed(0)
    model = ToyMoE().eval()
    with pytest.raises(GraphStructureError, match=r"in module 'experts' \(LoopedExperts\)"):
        fxslice.compress(model, calibration(), 0.0, progress=False)
    fxslice.register_capture_pattern("toy_looped_experts", _propose(gathered))
    try:
        exact = fxslice.compress(model, calibration(), 0.0, progress=False)
        sliced = fxslice.compress(model, calibration(), 0.25, slice_head=True, progress=False)
    finally:
        fxslice.unregister_pattern("toy_looped_experts")
    with torch.no_grad():
        assert (exact(INPUTS[0]).logits - model(INPUTS[0])).abs().max() < 1e-4
        assert torch.isfinite(sliced(INPUTS[0]).logits).all()
    assert sliced.get_submodule("experts.up").in_features == 24


def test_a_substitute_that_computes_something_else_is_not_used():
    torch.manual_seed(0)
    module = LoopedExperts().eval()
    wrong = _propose(lambda self, x: 1.01 * gathered(self, x))(module)
    assert verify_substitution(module, wrong) > 1e-3
    fxslice.register_capture_pattern("toy_wrong", _propose(lambda self, x: 1.01 * gathered(self, x)))
    try:
        with capture_substitutions(module):
            assert "forward" not in vars(module)
        with pytest.raises(GraphStructureError, match=r"in module 'experts' \(LoopedExperts\)"):
            fxslice.compress(ToyMoE().eval(), calibration(), 0.0, progress=False)
    finally:
        fxslice.unregister_pattern("toy_wrong")


def test_unloaded_weights_are_refused_naming_the_module_and_pattern():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("dbrx", **CONFIGS["dbrx"]))
    with pytest.raises(FxSliceError, match=r"module 'transformer.blocks.0.ffn.experts' \(DbrxExperts\) is captured "
                                           r"through capture pattern 'row_stacked_glu_experts'.*not loaded"):
        with capture_substitutions(model):
            pass
