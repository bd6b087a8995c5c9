"""The budget's split between the stream width and the MLP units: measured on held-out calibration windows
(fxslice/split.py), or a fixed stream sparsity with the MLP units meeting the rest."""

import pytest
import torch
import torch.nn.functional as F

import fxslice
from fxslice.calibration import prepare_batches
from fxslice.cli import main
from fxslice.errors import BudgetOutOfReach, FxSliceError, GraphStructureError
from fxslice.passes.p6_widths import TOLERANCE, slice_width
from fxslice.split import hold_out, held_out_score
from tiny_models import VOCAB, OneBlock, calibration, masked_calibration, seeded, tiny_model


@pytest.mark.parametrize("family,masked,dtype", [("llama", True, torch.float32),
                                                  pytest.param("gemma2", False, torch.float32, marks=pytest.mark.slow),
                                                  pytest.param("qwen2", True, torch.bfloat16, marks=pytest.mark.slow)])
def test_measured_split_compresses_the_candidate_closest_to_the_model(family, masked, dtype):
    model = tiny_model(family, dtype)
    batches = (masked_calibration if masked else calibration)(batches=8)
    sliced = fxslice.compress(model, batches, target_params=0.8, progress=False)
    search = sliced.fxslice.split_search
    assert search.criterion == "kl" and (search.calibration_windows, search.held_out_windows) == (1, 1)
    labels = [c.label for c in search.candidates]
    assert labels[0].startswith("fixed") and labels[-3:] == ["stream whole (basis none)",
                                                             "stream whole, MLP units by measured sensitivity",
                                                             "stream whole, attention values cut 25%"]
    widths = [c.stream_width for c in search.candidates]
    assert len(set(widths[:-2])) == len(widths) - 2  # no stream width tried twice
    values = search.candidates[-1]
    if family == "gemma2":  # eager attention (logit soft-capping): no value path to narrow, named
        assert "no attention's values can be narrowed" in values.refused and "matmul" in values.refused
    else:
        assert values.hidden_sparsity < search.candidates[-3].hidden_sparsity  # the values pay part of the budget
    scored = [c for c in search.candidates if c.score is not None]
    best = min(scored, key=lambda c: c.score)
    assert search.chosen == best.label
    for candidate in scored:  # every candidate meets the same budget
        assert 0.8 - TOLERANCE <= candidate.param_fraction <= 0.8
    result = sliced.fxslice
    assert 0.8 - TOLERANCE <= result.param_fraction <= 0.8
    assert min(result.widths) == best.stream_width  # the final slice is the chosen split, on every window
    assert (result.options["basis"] == "none") == best.label.startswith("stream whole")
    assert (result.options["allocation"] == "measured") == best.label.endswith("measured sensitivity")
    assert bool(result.value_widths) == best.label.startswith("stream whole, attention values")
    assert result.calibration_tokens == sum(int(b["attention_mask"].sum()) if masked else b.numel() for b in batches)
    assert torch.isfinite(sliced(batches[0]["input_ids"] if masked else batches[0]).logits).all()
    assert result.to_record()["split_search"]["chosen"] == best.label
    assert "budget split" in str(result)


def test_the_split_is_measured_on_windows_no_candidate_calibrated_on():
    items = calibration(batches=16)
    calibrated, held = hold_out(items)
    assert len(held) == 2 and len(calibrated) == 3
    assert not {id(b) for b in calibrated} & {id(b) for b in held}
    one_batch = hold_out([items[0]])  # a single batch: its rows
    assert [len(part) for part in one_batch] == [1, 1]
    assert torch.equal(one_batch[1][0]["input_ids"][0], items[0][-1])
    assert hold_out([items[0][:1]]) is None


def test_a_single_window_keeps_the_fixed_split_without_a_record():
    model = tiny_model("llama")
    sliced = fxslice.compress(model, [calibration(batches=1, batch_size=1)[0]], target_params=0.8, progress=False)
    fixed = fxslice.compress(model, [calibration(batches=1, batch_size=1)[0]], target_params=0.8, split="fixed",
                             progress=False)
    assert sliced.fxslice.split_search is None and fixed.fxslice.split_search is None
    assert sliced.fxslice.widths == fixed.fxslice.widths and sliced.fxslice.options["split"] == "fixed"


def test_held_out_scores_are_the_kl_and_the_cross_entropy_they_claim():
    model = tiny_model("llama")
    batches = prepare_batches(masked_calibration(batches=2), VOCAB, torch.device("cpu"))
    exact = fxslice.compress(model, calibration(), sparsity=0.0, progress=False)
    assert held_out_score(exact, model, batches) == pytest.approx(0.0, abs=1e-6)  # KL of a model to itself
    ids, mask = batches[0].input_ids, batches[0].attention_mask
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss  # HF's mean next-token loss over real tokens
    assert held_out_score(exact, None, batches[:1]) == pytest.approx(float(expected), rel=1e-5)
    sliced = fxslice.compress(model, calibration(), sparsity=0.25, progress=False)
    assert held_out_score(sliced, model, batches) > 1e-4


@pytest.mark.slow  # a whole measured search (~8 s)
def test_a_candidate_out_of_reach_is_recorded_and_skipped():
    model = tiny_model("llama")
    # MLP units are 54% of the tiny model: cutting all but one of them still keeps 46%
    sliced = fxslice.compress(model, calibration(batches=8), target_params=0.42, progress=False)
    search = sliced.fxslice.split_search
    whole = next(c for c in search.candidates if c.label.startswith("stream whole"))
    assert whole.refused and "out of reach" in whole.refused and whole.score is None
    assert search.chosen != whole.label and sliced.fxslice.param_fraction <= 0.42


@pytest.mark.slow  # four compressions refused (~5 s)
def test_a_budget_no_candidate_meets_is_refused_with_the_fixed_splits_reason():
    with pytest.raises(BudgetOutOfReach, match=r"target_params 0.05 is out of reach: the narrowest slice"):
        fxslice.compress(tiny_model("llama"), calibration(batches=8), target_params=0.05, progress=False)


def test_a_structure_refused_under_a_budget_stops_the_search_with_its_own_error():
    with pytest.raises(GraphStructureError, match=r"node 'tanh'.*consumes the residual stream"):
        fxslice.compress(seeded(OneBlock, outer=torch.tanh), calibration(batches=8), target_params=0.8, progress=False)


@pytest.mark.parametrize("stream_sparsity", [0.125, 0.25])
def test_stream_sparsity_fixes_the_stream_and_mlp_units_meet_the_budget(stream_sparsity):
    model = tiny_model("mistral")
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.7, stream_sparsity=stream_sparsity,
                              progress=False)
    result = sliced.fxslice
    assert result.split_search is None
    width = slice_width(64, stream_sparsity, 8)
    assert min(result.widths) == width and max(result.widths) == 64  # the head's input stays whole
    assert 0.7 - TOLERANCE <= result.param_fraction <= 0.7 and result.hidden_widths


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_params=0.8, split="greedy"), "split must be one of"),
    (dict(sparsity=0.2, stream_sparsity=0.1), "stream_sparsity fixes the stream's share of a target_params"),
    (dict(target_params=0.8, stream_sparsity=1.5), r"stream_sparsity must be a number in \[0, 1\)"),
    (dict(target_params=0.8, stream_sparsity=0.1, basis="none"), "basis='none' keeps the stream unrotated"),
    (dict(target_params=0.8, stream_sparsity=0.1, stock=True), "stock=True keeps the stream width"),
    (dict(target_params=0.95, stream_sparsity=0.6), "below what stream_sparsity 0.6 keeps with every MLP whole"),
])
def test_bad_split_options_are_refused_before_any_change(kwargs, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(model, calibration(), progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_refuses_a_bad_split_in_one_line(capsys):
    assert main(["compress", "--target-params", "0.8", "--stream-sparsity", "2", "--no-save"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stream_sparsity must be a number" in err[0]


@pytest.mark.slow  # six streamed compressions
def test_a_streamed_checkpoint_measures_its_split_by_held_out_cross_entropy(tmp_path):
    from tiny_models import folder_digest

    model = tiny_model("llama_tied")
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    before = folder_digest(folder)
    batches = masked_calibration(batches=8)
    streamed = fxslice.compress(str(folder), batches, target_params=0.8, progress=False)
    search = streamed.fxslice.split_search
    assert search.criterion == "cross-entropy" and search.chosen
    *scored, sensitivity, _values = search.candidates
    assert all(c.score is not None and c.score > 0 for c in scored)  # nats per held-out token
    assert "measures the dense model in memory" in sensitivity.refused  # never in memory when streamed
    in_memory = fxslice.compress(model, batches, target_params=0.8, split="fixed",
                                 stream_sparsity=None, progress=False)
    assert 0.8 - TOLERANCE <= streamed.fxslice.param_fraction <= 0.8
    assert in_memory.fxslice.split_search is None
    assert folder_digest(folder) == before


def test_measured_allocation_cuts_the_least_sensitive_mlps_most():
    from fxslice.passes.p6_widths import allocate_by_sensitivity

    model = tiny_model("llama")
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.75, basis="none", allocation="measured",
                              progress=False)
    assert 0.75 - TOLERANCE <= sliced.fxslice.param_fraction <= 0.75
    mlps = [type("M", (), {"writer": f"m{i}", "width": 128, "experts": 0})() for i in range(3)]
    kept = allocate_by_sensitivity(mlps, {"m0": 1.0, "m1": 2.0, "m2": -1e-9}, 3 * 64, 8)
    assert kept["m2"] < kept["m0"] < kept["m1"] <= 128  # ~0 sensitivity: cut most (to the cap)
    assert kept["m2"] == 16  # at most 85% of its units cut, rounded down to 8
    assert sum(kept.values()) <= 3 * 64
