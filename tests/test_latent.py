"""Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite): the latent down-projections
(``q_a_proj``, ``kv_a_proj_with_mqa``) read the stream like any other reader; the norms inside the latent
path (``q_a_layernorm``, ``kv_a_layernorm``) normalise a latent, not the stream, and are left alone."""

import pytest
import torch

import fxslice
from tiny_models import LATENT, LATENT_FAMILIES, VOCAB, calibration, check_saved_generation, masked_calibration, tiny_model

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
QUICK = ["deepseek_v3", "deepseek_v2_lite"]  # latent queries + MoE after a dense layer; direct queries
FAMILIES = [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in sorted(LATENT_FAMILIES)]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_is_exact(family, masked):
    model = tiny_model(family)
    exact = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    with torch.no_grad():
        error = (exact(IDS).logits - model(IDS).logits).abs().max().item()
    assert error < 1e-4, error


@pytest.mark.parametrize("family", FAMILIES)
def test_quarter_sparsity_slices_the_latent_readers_and_keeps_the_latent_norms(family):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), 0.25, progress=False)
    result = sliced.fxslice
    latent_readers = [n for n in result.layout if n.endswith(("q_a_proj", "kv_a_proj_with_mqa", "q_proj"))]
    assert len(latent_readers) >= model.config.num_hidden_layers
    for name in latent_readers:
        reads, _ = result.layout[name]
        assert sliced.get_submodule(name).weight.shape[-1] == result.widths[reads] == 48, name
    for layer in range(model.config.num_hidden_layers):
        attention = f"model.layers.{layer}.self_attn"
        dense = model.get_submodule(attention)
        for norm, rank in (("kv_a_layernorm", LATENT["kv_lora_rank"]), ("q_a_layernorm", LATENT["q_lora_rank"])):
            if getattr(dense, norm, None) is not None:  # the latent's own scale, as it was
                weight = sliced.get_submodule(f"{attention}.{norm}").weight
                assert weight.shape == (rank,) and torch.equal(weight, getattr(dense, norm).weight), norm
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    assert result.param_fraction < 0.95
    with torch.no_grad():
        logits = sliced(IDS).logits
    assert logits.shape == (3, 11, VOCAB) and torch.isfinite(logits).all()


def test_bfloat16_latent_attention_is_exact_to_its_own_rounding():
    model = tiny_model("deepseek_v3", torch.bfloat16)
    reference = tiny_model("deepseek_v3")
    exact = fxslice.compress(model, masked_calibration(), 0.0, progress=False)
    with torch.no_grad():
        truth = reference(IDS).logits
        noise = (model(IDS).logits.float() - truth).abs().max().item()
        error = (exact(IDS).logits.float() - truth).abs().max().item()
    assert error <= 4 * noise + 1e-2, (error, noise)


def test_kv_cache_program_save_and_reload(tmp_path):
    sliced = fxslice.compress(tiny_model("deepseek_v3"), masked_calibration(), 0.25, progress=False)
    check_saved_generation(sliced, tmp_path / "sliced", IDS[:1, :6])
