"""Attention values narrowed per key/value group (pass 4 finds them, pass 7 narrows them and refits the
output Linear): found from the graph with the layout verified, refused with the node named, exact when
nothing is cut, better than deleting dimensions, replayed onto the KV-cache program, saved and streamed."""

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError
from fxslice.passes.p7_rotate.values import reduced_rank
from fxslice.runtime.generate import with_cache
from tiny_models import (VOCAB, attention_search, calibration, check_cache_program_and_folder, folder_digest,
                         masked_calibration, tiny_model)

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(8))
PROMPT = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
# GQA, MHA with biases (opt), qk-norm (qwen3), value bias (qwen2), parallel block (gptj), post-norms (olmo2),
# sandwich norms (gemma3_text), experts beside it (mixtral)
SLOW = pytest.mark.slow
FOUND = ["llama", "opt", "olmo2", *[pytest.param(f, marks=SLOW) for f in ("qwen3", "qwen2", "gptj", "gemma3_text",
                                                                          "mixtral")]]
REFUSED = [("falcon_new", "aten.select.int"), ("gemma2", "aten.matmul"),
           *[pytest.param(f, op, marks=SLOW) for f, op in (("gpt2", "getitem"), ("bloom", "aten.bmm"),
                                                            ("phi3", "aten.slice"))]]


@pytest.mark.parametrize("family", FOUND)
def test_attentions_are_found_from_the_graph_with_their_heads(family):
    model, search = attention_search(family)
    config = model.config
    assert len(search.attentions) == config.num_hidden_layers, search.skipped
    heads = config.num_attention_heads
    groups = heads if family in ("opt", "gptj") else config.num_key_value_heads  # MHA / GQA
    for attention in search.attentions:
        assert (attention.heads, attention.groups) == (heads, groups)
        assert attention.width * heads == model.get_submodule(attention.writer).in_features
        assert not attention.buffers  # no cache in the prefill capture


@pytest.mark.parametrize("family,op", REFUSED)
def test_attentions_of_another_structure_are_refused_with_the_node(family, op):
    _, search = attention_search(family)
    assert not search.attentions
    attention_writers = {w: why for w, why in search.skipped.items() if ".mlp." not in w}
    assert attention_writers and all(op in why and "cannot be narrowed: node '" in why
                                     for why in attention_writers.values())


def test_reduced_rank_is_exact_at_full_width_and_beats_deleting_dimensions():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(200, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 8, generator=generator, dtype=torch.float64)
    output = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    gram, metric = values.T @ values, output.T @ output
    t, b, error = reduced_rank(gram, metric, 8)
    assert torch.allclose(t @ b, torch.eye(8, dtype=torch.float64), atol=1e-6) and error < 1e-9
    t, b, error = reduced_rank(gram, metric, 3)

    def loss(approx):
        return float(((values - values @ approx) @ output.T).pow(2).sum() / (values @ output.T).pow(2).sum())

    assert loss(t @ b) == pytest.approx(error, rel=1e-4)
    deleted = torch.diag(torch.tensor([1.0] * 3 + [0.0] * 5, dtype=torch.float64))
    assert loss(t @ b) < 0.8 * loss(deleted)


@pytest.mark.parametrize("family,masked,dtype", [("llama", True, torch.float32), ("qwen2", True, torch.bfloat16),
                                                  pytest.param("opt", False, torch.float32, marks=pytest.mark.slow),
                                                  pytest.param("gptj", False, torch.float32, marks=pytest.mark.slow),
                                                  pytest.param("qwen3", True, torch.float32, marks=pytest.mark.slow),
                                                  pytest.param("olmo2", False, torch.float32, marks=pytest.mark.slow)])
def test_narrowed_values_cut_parameters_and_stay_near_the_model(family, masked, dtype):
    model = tiny_model(family, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = masked_calibration() if masked else calibration()
    whole = fxslice.compress(model, batches, 0.0, basis="none", progress=False)
    cut = fxslice.compress(model, batches, 0.0, basis="none", value_sparsity=0.5, round_to=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = cut.fxslice
    assert set(result.value_widths.values()) == {(8, 16)} and len(result.value_widths) == model.config.num_hidden_layers
    assert result.param_count == sum(p.numel() for p in cut.parameters()) < whole.fxslice.param_count
    with torch.no_grad():
        reference = model(IDS).logits.float()
        assert torch.allclose(whole(IDS).logits.float(), reference, atol=1e-4 if dtype == torch.float32 else 0.05)
        error = (cut(IDS).logits.float() - reference).norm() / reference.norm()
    assert torch.isfinite(error) and error < 0.9
    assert all(0 <= e < 1 for e in result.value_errors.values())


def test_narrowed_values_beat_deleting_the_same_dimensions():
    model = tiny_model("llama")
    cut = fxslice.compress(model, calibration(batches=6), 0.0, basis="none", value_sparsity=0.5, round_to=1,
                           progress=False)
    deleted = fxslice.compress(model, calibration(batches=6), 0.0, basis="none", progress=False)
    with torch.no_grad():
        for name, module in deleted.named_modules():  # zero the last half of every value head instead
            if name.endswith("v_proj"):
                module.weight.view(2, 16, -1)[:, 8:] = 0
        reference = model(IDS).logits
        assert (cut(IDS).logits - reference).norm() < (deleted(IDS).logits - reference).norm()


@pytest.mark.parametrize("family", ["llama", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_the_kv_cache_program_takes_narrow_value_buffers_and_saves(family, tmp_path):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), 0.25, value_sparsity=0.5, round_to=4, progress=False)
    program = with_cache(sliced, max_cache_len=32)
    value_buffers = [b for name, b in program.named_buffers() if b.dim() == 4 and b.shape[-1] == 8]
    key_buffers = [b for name, b in program.named_buffers() if b.dim() == 4 and b.shape[-1] == 16]
    assert len(value_buffers) == len(key_buffers) == model.config.num_hidden_layers  # values' cache halved
    record = check_cache_program_and_folder(sliced, program, PROMPT, IDS, tmp_path / "values")
    config = model.config
    keys = config.num_hidden_layers * config.num_key_value_heads * 16 * 4  # float32 keys, 16 dims per head
    assert record["generator"]["kv_cache_bytes_per_token"] == keys + keys // 2  # values at 8 of 16 dims


# attention values, and queries and keys (tests/test_keys.py): the option and the result's record of it
CUTS = [("value_sparsity", "value_widths"), pytest.param("key_sparsity", "key_widths", marks=SLOW)]


@pytest.mark.parametrize("option,record", CUTS)
def test_a_streamed_checkpoint_narrows_attentions_like_the_model_in_memory(tmp_path, option, record):
    model = tiny_model("qwen2")
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    before = folder_digest(folder)
    options = {"sparsity": 0.25, option: 0.25, "round_to": 4, "progress": False}
    streamed = fxslice.compress(str(folder), masked_calibration(), **options)
    in_memory = fxslice.compress(model, masked_calibration(), **options)
    assert getattr(streamed.fxslice, record) == getattr(in_memory.fxslice, record) and getattr(streamed.fxslice, record)
    assert streamed.fxslice.param_count == in_memory.fxslice.param_count
    with torch.no_grad():
        assert (streamed(IDS).logits - in_memory(IDS).logits).abs().max() < 1e-4
    assert folder_digest(folder) == before


@pytest.mark.parametrize("option,record", CUTS)
def test_a_budget_counts_the_narrowed_attentions(option, record):
    model = tiny_model("mistral")
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.75, basis="none", round_to=1,
                              progress=False, **{option: 0.5})
    result = sliced.fxslice
    assert getattr(result, record) and 0.745 <= result.param_fraction <= 0.75
    assert result.param_count == sum(p.numel() for p in sliced.parameters())


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=0.0, value_sparsity=1.0), r"value_sparsity must be a number in \[0, 1\)"),
    (dict(target_params=0.8, stock=True, value_sparsity=0.25), "stock=True keeps every attention's value heads"),
])
def test_bad_value_options_are_refused(kwargs, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(tiny_model("llama"), calibration(), progress=False, **kwargs)


def test_models_without_a_narrowable_attention_name_why():
    sliced = fxslice.compress(tiny_model("falcon_new"), calibration(), 0.0, value_sparsity=0.25, progress=False)
    assert not sliced.fxslice.value_widths
    assert sliced.fxslice.skipped_attentions and all("aten.select.int" in why
                                                     for why in sliced.fxslice.skipped_attentions.values())
