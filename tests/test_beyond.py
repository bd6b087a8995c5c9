"""Beyond SliceGPT: MLP hidden units (found from the graph, refitted), post-norm branches in their own
basis, the parameter budget."""

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import FxSliceError, GraphStructureError
from fxslice.hf import model_spec
from fxslice.passes.p1_capture import capture
from fxslice.passes.p2_canonicalise import canonicalise
from fxslice.passes.p3_analyse import analyse
from fxslice.passes.p4_mlps import find_mlps, trace_mlp
from fxslice.passes.p5_fuse import fuse
from fxslice.passes.p6_widths import basis_groups, plan_budget, sliced_parameter_count, uniform_widths
from fxslice.passes.p7_rotate.branches import BranchRotator
from fxslice.passes.p7_rotate.hidden import refit, select_units
from fxslice.passes.slice_record import Slice
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from fxslice.runtime.generate import generate, with_cache
from tiny_models import FAMILIES, VOCAB, calibration, masked_calibration, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
GATED = {"llama", "llama_tied", "mistral", "qwen2", "qwen3", "granite", "smollm3", "cohere", "stablelm", "gemma",
         "gemma2", "gemma3_text", "olmo", "olmo2"}
FUSED_GATE_UP = {"phi3"}
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}


def _plan(family):
    model = tiny_model(family)
    return model, fuse(analyse(canonicalise(capture(model, model_spec(model)))))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_one_mlp_per_layer_found_from_the_graph(family):
    model = tiny_model(family)
    structure = analyse(canonicalise(capture(model, model_spec(model))))
    search = find_mlps(structure)
    plan = fuse(structure, mlps=search.mlps)
    assert plan.mlps == search.mlps
    layers = model.config.num_hidden_layers
    assert len(search.mlps) == layers, search.skipped
    for mlp in search.mlps:
        readers = [plan.gm.get_submodule(r) for r in mlp.readers]
        writer = plan.gm.get_submodule(mlp.writer)
        assert writer.in_features == mlp.width
        assert all(r.out_features == parts * mlp.width for r, parts in zip(readers, mlp.readers.values()))
        expected = 1 if family in FUSED_GATE_UP else 2 if family in GATED else 1
        assert len(mlp.readers) == expected, mlp.readers
        assert list(mlp.readers.values()) == [2 if family in FUSED_GATE_UP else 1] * expected
    assert len(search.skipped) == layers  # the attention outputs, with the reason
    assert all("cannot be sliced" in why for why in search.skipped.values())


def test_a_hidden_unit_meeting_a_non_elementwise_op_is_refused_with_the_node():
    _, plan = _plan("llama")
    with pytest.raises(GraphStructureError, match=r"o_proj' cannot be sliced: node '.*' \(call_function: aten\.\w+"):
        trace_mlp(plan.gm, "model.layers.0.self_attn.o_proj", 1)

    class SoftmaxMLP(nn.Module):  # softmax mixes the hidden units
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.down(torch.softmax(self.up(x), -1))

    gm = canonicalise(torch.export.export(SoftmaxMLP(), (torch.randn(2, 8),)).module())

    with pytest.raises(GraphStructureError, match=r"'down' cannot be sliced: node '.*softmax.*' .* is not elementwise"):
        trace_mlp(gm, "down", 1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma2", "falcon_new"])
def test_keeping_every_unit_and_every_branch_direction_is_exact(family):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), 0.0, hidden_sparsity=0.0, progress=False)
    with torch.no_grad():
        assert (sliced(IDS).logits - model(IDS).logits).abs().max() < 1e-4
    # a full-width branch basis (rotated, nothing deleted) is exact too
    _, plan = _plan(family)
    if plan.branches:
        reference = plan.gm(IDS)
        reference = getattr(reference, "logits", reference)
        rotator = BranchRotator(plan, [plan.hidden_size] * len(plan.positions))
        rotator.branches = list(plan.branches)
        record = Slice(len(plan.positions))
        for number in range(len(plan.branches)):
            summed = torch.randn(plan.hidden_size, plan.hidden_size, dtype=torch.float64)
            rotator.rotate(number, summed @ summed.T, 100.0, record)
        plan.gm.recompile()
        out = plan.gm(IDS)
        assert (getattr(out, "logits", out) - reference).abs().max() < 1e-4


def _hidden_statistics(family):
    model = tiny_model(family)
    sliced = fxslice.compress(model, calibration(), 0.0, progress=False)
    mlp = find_mlps(analyse(canonicalise(capture(model, model_spec(model))))).mlps[0]
    seen = []
    module = sliced.get_submodule(mlp.writer)
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calibration(batches=4, length=32, seed=7):
            sliced(batch)
    handle.remove()
    rows = torch.cat(seen).double()
    return rows.T @ rows, module.weight.detach().double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_refit_reconstructs_the_block_output_better_than_deleting(family):
    gram, weight = _hidden_statistics(family)
    keep = weight.shape[1] // 2
    kept, refitted, relative = select_units(gram, weight, keep)
    assert refitted.shape == (weight.shape[0], keep) and len(kept) == keep
    total = float((weight @ gram * weight).sum())
    deleted = weight[:, kept]
    delete_error = float(((weight @ gram * weight).sum() - 2 * (deleted * (weight @ gram[:, kept])).sum()
                          + ((deleted @ gram[kept][:, kept]) * deleted).sum()) / total)
    assert 0 <= relative < delete_error
    _, error_all = refit(gram, weight, torch.arange(weight.shape[1]), 0.0)
    assert abs(error_all) / total < 1e-8  # every unit kept: nothing lost


@pytest.mark.parametrize("family", ["llama_tied", "gpt2", "bloom", "gemma2", "phi3", "opt"])
@pytest.mark.parametrize("basis", ["block", "position", pytest.param("model", marks=pytest.mark.slow)])
def test_predicted_count_is_the_true_count(family, basis):
    model = tiny_model(family)
    sliced = fxslice.compress(model, calibration(), 0.25, hidden_sparsity=0.3, basis=basis, progress=False)
    result = sliced.fxslice
    _, plan = _plan(family)
    widths = uniform_widths(plan, 0.25, 0.3, 8, False, basis_groups(plan, basis))
    assert sliced_parameter_count(plan, widths) == result.param_count
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    assert all(kept < full for kept, full in result.hidden_widths.values()) and result.hidden_widths
    with torch.no_grad():
        assert torch.isfinite(sliced(IDS).logits).all()


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gemma2", "gpt2", "phi3"])
@pytest.mark.parametrize("target", [0.9, 0.75])
def test_target_params_is_met_within_half_a_percent(family, target):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), target_params=target, round_to=1, split="fixed",
                              progress=False)
    fraction = sliced.fxslice.param_fraction
    assert target - 0.005 <= fraction <= target, fraction
    assert sliced.fxslice.options["target_params"] == target


def test_target_params_refusals():
    model = tiny_model("llama")
    with pytest.raises(FxSliceError, match="give either sparsity .* or target_params .*not both"):
        fxslice.compress(model, calibration(), 0.25, target_params=0.8)
    with pytest.raises(FxSliceError, match="not neither"):
        fxslice.compress(model, calibration())
    with pytest.raises(FxSliceError, match=r"target_params must be a number in \(0, 1\], got 1.5"):
        fxslice.compress(model, calibration(), target_params=1.5)
    with pytest.raises(FxSliceError, match="hidden_sparsity is chosen by target_params"):
        fxslice.compress(model, calibration(), target_params=0.8, hidden_sparsity=0.2)
    with pytest.raises(FxSliceError, match="target_params 0.01 is out of reach"):
        fxslice.compress(model, calibration(), target_params=0.01)
    with pytest.raises(FxSliceError, match=r"hidden_sparsity must be a number in \[0, 1\)"):
        fxslice.compress(model, calibration(), 0.2, hidden_sparsity=1.0)
    _, plan = _plan("llama")
    dense = sum(p.numel() for p in tiny_model("llama").parameters())
    with pytest.raises(FxSliceError, match=r"out of reach: the narrowest slice \(64 stream columns\)"):
        plan_budget(plan, 0.8, dense, 64, False, basis_groups(plan, "block"))


@pytest.mark.slow  # budget slices are saved and reloaded in the quick profile by tests/test_stock.py
@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_budget_slices_generate_save_and_reload(family, tmp_path):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.8, split="fixed", progress=False)
    assert sliced.fxslice.hidden_widths and (family != "gemma2" or sliced.fxslice.norm_eps)
    program = with_cache(sliced, max_cache_len=32)
    prompt = IDS[:1, :7]
    with torch.no_grad():
        assert (program(prompt, torch.arange(7)) - sliced(prompt).logits).abs().max() < 1e-4
    folder = save(sliced, tmp_path / "sliced", tokenizer=tiny_tokenizer(), record={"target_params": 0.8},
                  generator=program)
    loaded, _ = load(folder)
    with torch.no_grad():
        assert (loaded(IDS).logits - sliced(IDS).logits).abs().max() < 1e-5
    assert torch.equal(loaded.generate(prompt, 6), generate(program, prompt, 6))
