"""Behaviour of the core pass beyond exactness: options, determinism, block caching, errors."""

import pytest
import torch
from torch import nn

import fxslice
from fxslice import CalibrationError, FxSliceError, GraphStructureError, NormSpec
from tiny_models import VOCAB, calibration, random_model, tiny_model
from toy_models import TOY_VOCAB, ToyLM, toy_calibration

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama_tied")


def test_two_runs_give_bit_identical_weights(llama):
    first = fxslice.compress(llama, calibration(), 0.3, progress=False).state_dict()
    second = fxslice.compress(llama, calibration(), 0.3, progress=False).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_each_block_runs_once_per_batch(llama):
    calls: dict[nn.Module, int] = {}

    def count(module, args, output):
        calls[module] = calls.get(module, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        batches = calibration(batches=4)
        sliced = fxslice.compress(llama, batches, 0.25, progress=False)
    finally:
        handle.remove()
    layout = sliced.fxslice.layout
    last = len(sliced.fxslice.widths) - 1
    block_linears = [n for n, (reads, _) in layout.items()
                     if reads is not None and reads < last and isinstance(sliced.get_submodule(n), nn.Linear)]
    assert len(block_linears) >= 10
    for name in block_linears:
        assert calls.get(sliced.get_submodule(name), 0) == len(batches), name


def test_result_reports_widths_and_true_parameter_counts(llama):
    sliced = fxslice.compress(llama, calibration(), 0.25, basis="position", progress=False)
    result = sliced.fxslice
    assert result.widths == [48, 48, 48, 48, 64]
    assert result.dense_param_count == sum(p.numel() for p in llama.parameters())
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    shortcuts = [m.name for m in result.inserted if m.kind == "shortcut"]
    assert shortcuts == ["model.layers.0.shortcut_1", "model.layers.0.shortcut_2", "model.layers.1.shortcut_3",
                         "model.layers.1.shortcut_4"]  # <module holding the residual add>.shortcut_<position>
    assert [(m.name, m.kind) for m in result.inserted if m.kind != "shortcut"] == [("model.norm_affine", "head_affine")]
    assert all(name in result.layout for name in shortcuts)
    assert result.added_param_count == sum(p.numel() for m in result.inserted
                                           for p in sliced.get_submodule(m.name).parameters())
    assert result.added_param_count == 3 * 48 * 48 + 48 * 64 + 64 * 64  # into the last position: 48 -> 64
    assert result.head == ["lm_head"]
    assert result.tied_embeddings
    assert sliced.get_submodule("model.embed_tokens").weight is sliced.get_submodule("lm_head").weight
    assert "sliced parameters" in result.table()


def test_round_to_and_slice_head_options(llama):
    plain = fxslice.compress(llama, calibration(), 0.3, round_to=1, progress=False).fxslice
    assert plain.widths[:4] == [44] * 4  # floor(64 * 0.7)
    rounded = fxslice.compress(llama, calibration(), 0.3, progress=False).fxslice
    assert rounded.widths[:4] == [40] * 4
    head = fxslice.compress(llama, calibration(), 0.25, slice_head=True, progress=False)
    assert head.fxslice.widths[-1] == 48
    assert torch.isfinite(head(IDS).logits).all()


def test_block_basis_shares_one_basis_per_layer(llama):
    per_position = fxslice.compress(llama, calibration(), 0.25, basis="position", progress=False)
    per_block = fxslice.compress(llama, calibration(), 0.25, basis="block", progress=False)
    result = per_block.fxslice
    assert [m.name for m in result.inserted if m.kind == "shortcut"] == ["model.layers.0.shortcut_2",
                                                                         "model.layers.1.shortcut_4"]
    assert per_position.fxslice.param_count - result.param_count == 2 * 48 * 48  # two 48x48 shortcuts fewer
    # attention input and MLP input of a layer: one spectrum, one basis
    assert torch.equal(result.eigenvalues[0], result.eigenvalues[1])
    assert not torch.equal(result.eigenvalues[1], result.eigenvalues[2])
    q = per_block.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert q.shape == (64, 48) and torch.isfinite(per_block(IDS).logits).all()
    with pytest.raises(FxSliceError, match="basis must be one of"):
        fxslice.compress(llama, calibration(), 0.25, basis="layer", progress=False)


def test_model_basis_leaves_only_the_shortcut_into_the_head(llama):
    """One basis for the whole stream: every shortcut between sliced positions is ``Q_dᵀ Q_d = I`` and goes;
    the head's position keeps its width, so the shortcut into it stays (``d × D``)."""
    per_block = fxslice.compress(llama, calibration(), 0.25, basis="block", progress=False)
    whole = fxslice.compress(llama, calibration(), 0.25, basis="model", progress=False)
    result = whole.fxslice
    shortcuts = [m.name for m in result.inserted if m.kind == "shortcut"]
    assert shortcuts == ["model.layers.1.shortcut_4"]
    assert whole.get_submodule(shortcuts[0]).weight.shape == (64, 48)
    assert per_block.fxslice.param_count - result.param_count == 48 * 48  # the block-to-block shortcut
    assert all(torch.equal(result.eigenvalues[0], e) for e in result.eigenvalues if e is not None)
    assert torch.isfinite(whole(IDS).logits).all()


@pytest.mark.parametrize("family", ["llama_tied", "gemma3_text"]
                         + [pytest.param(f, marks=pytest.mark.slow) for f in ("bloom", "phi", "falcon_old", "opt", "gpt2")])
def test_model_basis_is_exact_when_nothing_is_removed(family):
    model = tiny_model(family)
    exact = fxslice.compress(model, calibration(), 0.0, basis="model", progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS).logits).abs().max().item() < 1e-4
    assert not [m for m in exact.fxslice.inserted if m.kind == "shortcut"]


def _four_layers(family: str) -> torch.nn.Module:
    config = tiny_model(family).config
    config.num_hidden_layers = 4
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = (config.layer_types * 4)[:4]
    return random_model(config)


def test_basis_span_joins_consecutive_blocks():
    """``basis_span=2``: layers 0-1 and 2-3 each share one basis, so the shortcut between them goes; the one
    into the next pair and the one into the (whole-width) head stay."""
    model = _four_layers("llama")
    per_block = fxslice.compress(model, calibration(), 0.25, progress=False)
    spanned = fxslice.compress(model, calibration(), 0.25, basis_span=2, progress=False)
    result = spanned.fxslice
    assert [m.name for m in result.inserted if m.kind == "shortcut"] == ["model.layers.1.shortcut_4",
                                                                         "model.layers.3.shortcut_8"]
    assert per_block.fxslice.param_count - result.param_count == 2 * 48 * 48
    assert all(torch.equal(result.eigenvalues[0], result.eigenvalues[i]) for i in (1, 2, 3))
    assert not torch.equal(result.eigenvalues[3], result.eigenvalues[4])
    assert torch.isfinite(spanned(IDS).logits).all()


@pytest.mark.parametrize("family,span", [("llama", 3), *[pytest.param(f, 2, marks=pytest.mark.slow)
                                                         for f in ("gemma3_text", "opt")]])
def test_basis_span_is_exact_when_nothing_is_removed(family, span):
    model = _four_layers(family)
    exact = fxslice.compress(model, calibration(), 0.0, basis_span=span, progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS).logits).abs().max().item() < 1e-4
    per_block = fxslice.compress(model, calibration(), 0.0, progress=False)
    shortcuts = [len([m for m in g.fxslice.inserted if m.kind == "shortcut"]) for g in (exact, per_block)]
    assert shortcuts[0] < shortcuts[1]


@pytest.mark.parametrize("kwargs,message", [(dict(basis_span=0), "basis_span must be a positive integer"),
                                            (dict(basis="position", basis_span=2), "it needs basis='block'")])
def test_bad_basis_spans_are_refused(llama, kwargs, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(llama, calibration(), 0.25, progress=False, **kwargs)


@pytest.mark.slow
def test_pca_signal_norm_output_is_an_alternative(llama):
    stream = fxslice.compress(llama, calibration(), 0.25, progress=False)
    normed = fxslice.compress(llama, calibration(), 0.25, pca_signal="norm_output", progress=False)
    a = stream.get_submodule("model.layers.0.self_attn.q_proj").weight
    b = normed.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert a.shape == b.shape and not torch.allclose(a, b)
    exact = fxslice.compress(llama, calibration(), 0.0, pca_signal="norm_output", progress=False)
    assert (exact(IDS).logits - llama(IDS).logits).abs().max() < 1e-4


def test_masked_tokens_are_left_out_of_the_pca(llama):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
    padded = torch.cat([ids, torch.full((4, 8), 7)], dim=1)  # right padding: causal, so the prefix is unaffected
    mask = torch.cat([torch.ones(4, 16), torch.zeros(4, 8)], dim=1).long()
    with_mask = fxslice.compress(llama, [{"input_ids": padded, "attention_mask": mask}], 0.25, progress=False)
    truncated = fxslice.compress(llama, [ids], 0.25, progress=False)
    without_mask = fxslice.compress(llama, [padded], 0.25, progress=False)
    name = "model.layers.1.mlp.gate_proj"
    w_mask, w_trunc = with_mask.get_submodule(name).weight, truncated.get_submodule(name).weight
    assert torch.allclose(w_mask, w_trunc, atol=1e-4)
    assert not torch.allclose(without_mask.get_submodule(name).weight, w_trunc, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = tiny_model("gemma3_text", dtype=dtype)
    reference = tiny_model("gemma3_text")
    sliced = fxslice.compress(model, calibration(), 0.0, progress=False)
    assert {p.dtype for p in sliced.parameters()} == {dtype}
    noise = (model(IDS).logits.float() - reference(IDS).logits).abs().max()
    error = (sliced(IDS).logits.float() - model(IDS).logits.float()).abs().max()
    assert error <= 4 * noise + 1e-3
    quarter = fxslice.compress(model, calibration(), 0.25, progress=False)
    assert torch.isfinite(quarter(IDS).logits.float()).all()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.2", True, None])
def test_bad_sparsity(llama, sparsity):
    with pytest.raises(FxSliceError, match="sparsity"):
        fxslice.compress(llama, calibration(), sparsity, progress=False)


@pytest.mark.parametrize(
    "loader, message",
    [
        ([], "no batches"),
        (None, "iterable of batches"),
        (torch.randint(0, VOCAB, (4, 16)), "single \\[B, T\\] tensor"),
        ([torch.randint(0, VOCAB, (16,))], "shape \\[B, T\\]"),
        ([torch.randint(0, VOCAB, (2, 3, 4))], "shape \\[B, T\\]"),
        ([torch.rand(2, 8)], "integer tensor"),
        ([torch.full((2, 8), VOCAB)], f"token id {VOCAB} is outside the vocabulary"),
        ([torch.full((2, 8), -1)], "outside the vocabulary"),
        ([{"ids": torch.zeros(2, 8, dtype=torch.long)}], "without 'input_ids'"),
        ([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}], "same shape"),
        ([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.zeros(2, 8)}], "masked out"),
        (["some text"], "expected a LongTensor"),
    ],
)
def test_bad_calibration_data(llama, loader, message):
    with pytest.raises(CalibrationError, match=message):
        fxslice.compress(llama, loader, 0.25, progress=False)


def test_non_finite_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="non-finite activations at stream position 2"):
        fxslice.compress(model, calibration(), 0.25, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nonlinear_stream_is_rejected_before_any_weight_changes():
    model = ToyLM(squash=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GraphStructureError) as info:
        fxslice.compress(model, toy_calibration(), 0.25, progress=False)
    message = str(info.value)
    assert "'tanh'" in message and "aten.tanh.default" in message and "'blocks.0' (ToyBlock)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_toy_model_without_hf_code_compresses_exactly():
    model = ToyLM().eval()
    sliced = fxslice.compress(model, toy_calibration(), 0.0, progress=False)
    ids = torch.randint(0, TOY_VOCAB, (3, 7))
    assert (sliced(ids).logits - model(ids)).abs().max() < 1e-4


def test_registering_a_norm_pattern_makes_a_rejected_model_compress():
    model = ToyLM(norm="scale").eval()
    with pytest.raises(GraphStructureError, match="ToyScaleNorm.*matches no registered norm pattern"):
        fxslice.compress(model, toy_calibration(), 0.25, progress=False)

    @fxslice.register_norm_pattern("toy_scale_norm")
    def toy_scale_norm(region):
        if not region.uses(torch.ops.aten.linalg_vector_norm.default):
            return None
        gain = region.param("gain")
        if gain is None or gain.numel() != 1:
            return None
        # gain * x / ||x|| == (gain / sqrt(D)) * x / rms(x)
        return NormSpec(centered=False, scale=gain.float() * torch.ones(region.width) / region.width ** 0.5, eps=0.0)

    try:
        sliced = fxslice.compress(model, toy_calibration(), 0.0, progress=False)
        ids = torch.randint(0, TOY_VOCAB, (3, 7))
        assert (sliced(ids).logits - model(ids)).abs().max() < 1e-4
        quarter = fxslice.compress(model, toy_calibration(), 0.25, progress=False)
        assert quarter.fxslice.widths == [24, 24, 32]
    finally:
        fxslice.unregister_pattern("toy_scale_norm")


def test_a_wrong_pattern_is_refused_by_verification():
    @fxslice.register_norm_pattern("wrong_rms", first=True)
    def wrong(region):
        if region.uses("aten.rsqrt.default"):
            return NormSpec(centered=False, scale=2 * torch.ones(region.width), eps=1e-6)
        return None

    try:
        model = ToyLM().eval()
        structure = fxslice.inspect(model, show=False)
        assert {s.pattern for p in structure.positions for s in p.norms} == {"rms_norm"}
        sliced = fxslice.compress(model, toy_calibration(), 0.0, progress=False)
        ids = torch.randint(0, TOY_VOCAB, (2, 5))
        assert (sliced(ids).logits - model(ids)).abs().max() < 1e-4
    finally:
        fxslice.unregister_pattern("wrong_rms")


def test_inspect_prints_the_structure(capsys):
    structure = fxslice.inspect(tiny_model("gemma2"))
    printed = capsys.readouterr().out
    assert "model.layers.0.input_layernorm [offset_rms_norm]" in printed
    assert "post_attention_layernorm" in printed and "rotated" in printed
    assert len(structure.positions) == 5
    assert [p.skip.source if p.skip else None for p in structure.positions] == [None, 0, 1, 2, 3]


def test_sliced_graph_names_linears_after_the_model():
    sliced = fxslice.compress(tiny_model("qwen3"), calibration(), 0.25, progress=False)
    names = {n for n, m in sliced.named_modules() if isinstance(m, nn.Linear)}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"} <= names
    # q/k norms inside attention are not stream norms: left alone
    assert "q_norm" in sliced.code


def test_masked_calibration_of_a_flattened_stream():
    """OPT flattens the stream to [B·T, D] around its MLP: masks must follow that layout."""
    model = tiny_model("opt")
    ids = calibration(batches=1)[0]
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    with_mask = fxslice.compress(model, [{"input_ids": ids, "attention_mask": mask}], 0.25, progress=False)
    truncated = fxslice.compress(model, [ids[:, :12]], 0.25, progress=False)
    name = "model.decoder.layers.1.fc1"
    assert torch.allclose(with_mask.get_submodule(name).weight, truncated.get_submodule(name).weight, atol=1e-4)


def test_sparsity_zero_is_exact_for_a_width_that_is_no_multiple_of_round_to():
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**COMMON, "hidden_size": 60, "head_dim": 16,
                                                                                  "num_attention_heads": 4})).eval()
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    assert exact.fxslice.widths == [60] * 5
    assert (exact(IDS).logits - model(IDS).logits).abs().max() < 1e-4
    assert fxslice.compress(model, calibration(), 0.25, progress=False).fxslice.widths[:4] == [40] * 4  # 45 -> 40


def test_embedding_projected_to_the_stream_width():
    """OPT with word_embed_proj_dim != hidden_size: the stream starts after project_in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                  word_embed_proj_dim=32, num_hidden_layers=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    structure = fxslice.inspect(model, show=False)
    assert structure.hidden_size == 64 and len(structure.positions) == 5
    assert [str(w.target) for w in structure.positions[0].writers] == ["model.decoder.project_in",
                                                                      "model.decoder.embed_positions"]
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    assert (exact(IDS).logits - model(IDS).logits).abs().max() < 1e-4
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    assert sliced.fxslice.widths == [48, 48, 48, 48, 63]
    assert sliced.get_submodule("model.decoder.project_in").out_features == 48
    assert sliced.fxslice.param_count < sliced.fxslice.dense_param_count


def test_a_tied_head_on_a_raw_position_stays_tied():
    """Bloom's embedding feeds a norm (a raw position): the head stays tied to the unrotated table."""
    model = tiny_model("bloom")
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    assert sliced.fxslice.tied_embeddings
    embedding = sliced.get_submodule("transformer.word_embeddings").weight
    assert embedding is sliced.get_submodule("lm_head").weight
    assert embedding.data_ptr() != model.transformer.word_embeddings.weight.data_ptr()  # not the caller's memory
    assert sliced.fxslice.param_count == sum(p.numel() for p in sliced.parameters())
