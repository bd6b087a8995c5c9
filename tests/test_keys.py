"""Attention queries and keys narrowed by unit (pass 4 measures which head dimensions go together, pass 7 drops
each group's weakest): units measured from the graph for rotate-half, interleaved and partial rotary and no
rotary, per-head norms and fused projections refused with the node named, the narrowed model equal to the
model with the dropped rows of W_q and W_k zeroed, replayed onto the KV-cache program (keys' cache narrower),
saved (streamed and counted by a budget: tests/test_values.py)."""

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError
from fxslice.passes.p4_keys import choose_units, feasible_keep
from fxslice.passes.slice_record import NarrowKeys
from fxslice.runtime.generate import with_cache
from tiny_models import (VOCAB, attention_search, calibration, canonical_graph, check_cache_program_and_folder,
                         masked_calibration, tiny_model)

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(8))
PROMPT = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
SLOW = pytest.mark.slow
D = 16  # head dimension of every tiny config
ROTATE_HALF = [[j, j + D // 2] for j in range(D // 2)]
UNITS = {
    "llama": ROTATE_HALF,  # GQA, rotate-half rotary
    "opt": [[j] for j in range(D)],  # no rotary, biases
    "gptj": [[2 * i, 2 * i + 1] for i in range(4)] + [[j] for j in range(8, D)],  # interleaved rotary on 8 dims
    "phi": [[j, j + 4] for j in range(4)] + [[j] for j in range(8, D)],  # rotate-half on the first 8 dims
    "cohere": [[2 * i, 2 * i + 1] for i in range(D // 2)],  # interleaved, parallel block
}
SLOW_UNITS = {"stablelm": [[0, 2], [1, 3]] + [[j] for j in range(4, D)], "qwen2": ROTATE_HALF, "mixtral": ROTATE_HALF}


QUICK_UNITS = ("llama", "gptj")


@pytest.mark.parametrize("family", [*QUICK_UNITS, *[pytest.param(f, marks=SLOW) for f in {**UNITS, **SLOW_UNITS}
                                                     if f not in QUICK_UNITS]])
def test_units_are_measured_from_the_graph(family):
    model, search = attention_search(family)
    assert len(search.attentions) == model.config.num_hidden_layers
    for attention in search.attentions:
        keys = attention.query_key
        assert keys is not None, attention.query_key_refused
        assert keys.units == {**UNITS, **SLOW_UNITS}[family] and keys.width == D
        assert keys.groups == attention.groups
        # every query/key feature of the Linears feeds exactly one unit of one group
        for path, heads_per_group in ((keys.query, attention.heads // keys.groups), (keys.key, 1)):
            features = sorted(f for group in path.rows for rows in group for f in rows)
            assert features == list(range(path.features)) == list(range(keys.groups * heads_per_group * D))


@pytest.mark.parametrize("family,node", [("qwen3", "aten.mean.dim"),
                                         *[pytest.param(f, "aten.mean.dim", marks=SLOW) for f in ("olmo2", "gemma3_text")]])
def test_per_head_norms_are_refused_naming_their_reduction(family, node):
    _, search = attention_search(family)
    assert search.attentions and all(a.query_key is None for a in search.attentions)
    for attention in search.attentions:
        assert f"({'call_function'}: {node})" in attention.query_key_refused and "q_norm" in attention.query_key_refused
        assert "joins all 16 dimensions of a head" in attention.query_key_refused


def _heads_and_groups(model) -> tuple[int, int]:
    """Query heads and key/value groups, read off the projections' widths."""
    query, key = (next(m for n, m in model.named_modules() if n.endswith(name)) for name in ("q_proj", "k_proj"))
    return query.out_features // D, key.out_features // D


def _zeroed_reference(model, sliced):
    """The dense model with the rows of ``q_proj`` / ``k_proj`` that feed the dropped dimensions zeroed: what
    dropping them means, written out for the layout ``feature = head · d + dimension``."""
    import copy

    reference = copy.deepcopy(model)
    config = model.config
    heads, groups = _heads_and_groups(model)
    edits = sorted((e for e in sliced.fxslice.slice.edits if isinstance(e, NarrowKeys)), key=lambda e: e.attention)
    queries = [m for n, m in reference.named_modules() if n.endswith("q_proj")]
    keys = [m for n, m in reference.named_modules() if n.endswith("k_proj")]
    assert len(edits) == len(queries) == len(keys) == config.num_hidden_layers
    with torch.no_grad():
        for edit, query, key in zip(edits, queries, keys):
            for g, kept in enumerate(edit.kept):
                dropped = sorted(set(range(D)) - set(kept))
                rows = [g * D + j for j in dropped]
                key.weight[rows] = 0
                if key.bias is not None:
                    key.bias[rows] = 0
                for h in range(g * heads // groups, (g + 1) * heads // groups):
                    rows = [h * D + j for j in dropped]
                    query.weight[rows] = 0
                    if query.bias is not None:
                        query.bias[rows] = 0
    return reference


@pytest.mark.parametrize("family,masked,basis", [("llama", True, "none"), pytest.param("gptj", True, "block", marks=SLOW),
                                                 pytest.param("opt", False, "none", marks=SLOW),
                                                 pytest.param("phi", False, "none", marks=SLOW),
                                                 pytest.param("cohere", True, "block", marks=SLOW),
                                                 pytest.param("qwen2", True, "none", marks=SLOW)])
def test_narrowed_keys_equal_the_model_with_their_rows_zeroed(family, masked, basis):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = masked_calibration() if masked else calibration()
    whole = fxslice.compress(model, batches, 0.0, basis=basis, progress=False)
    cut = fxslice.compress(model, batches, 0.0, basis=basis, key_sparsity=0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = cut.fxslice
    layers = model.config.num_hidden_layers
    assert set(result.key_widths.values()) == {(8, D)} and len(result.key_widths) == layers
    assert result.param_count == sum(p.numel() for p in cut.parameters()) < whole.fxslice.param_count
    heads, groups = _heads_and_groups(model)
    query = cut.get_submodule(next(n for n, _ in cut.named_modules() if n.endswith("q_proj")))
    rows_cut = layers * (heads + groups) * 8  # per group 8 rows of W_k and 8 of each query head's W_q rows
    assert whole.fxslice.param_count - result.param_count == rows_cut * (query.in_features + (query.bias is not None))
    with torch.no_grad():
        expected, got = _zeroed_reference(model, cut)(IDS).logits, cut(IDS).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # something was dropped: the zeroed rows move the logits far more than the slice's rounding does
        assert (expected - model(IDS).logits).abs().max() > 20 * (got - expected).abs().max()


@pytest.mark.slow
def test_the_strongest_units_are_kept():
    model = tiny_model("llama")
    with torch.no_grad():  # make dimension pair (3, 11) of every head carry most of the scores
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.view(-1, D, module.in_features)[:, [3, 11]] *= 20
    cut = fxslice.compress(model, calibration(), 0.0, basis="none", key_sparsity=0.75, round_to=2, progress=False)
    edits = [e for e in cut.fxslice.slice.edits if isinstance(e, NarrowKeys)]
    assert edits and all(3 in kept and 11 in kept and len(kept) == 4 for e in edits for kept in e.kept)


@pytest.mark.slow
def test_bf16_narrowed_keys_stay_near_the_zeroed_model():
    model = tiny_model("llama", torch.bfloat16)
    cut = fxslice.compress(model, masked_calibration(), 0.0, basis="none", key_sparsity=0.5, progress=False)
    assert next(cut.parameters()).dtype == torch.bfloat16 and cut.fxslice.key_widths
    with torch.no_grad():
        expected = _zeroed_reference(model, cut)(IDS).logits.float()
        got = cut(IDS).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_the_kv_cache_program_caches_narrow_keys_and_saves(tmp_path):
    model = tiny_model("llama")
    sliced = fxslice.compress(model, masked_calibration(), 0.25, key_sparsity=0.5, value_sparsity=0.25, round_to=4,
                              progress=False)
    assert sliced.fxslice.key_widths and sliced.fxslice.value_widths
    program = with_cache(sliced, max_cache_len=32)
    layers, groups = model.config.num_hidden_layers, model.config.num_key_value_heads
    widths = sorted(b.shape[-1] for b in program.buffers() if b.dim() == 4 and b.is_floating_point())
    assert widths == [8] * layers + [12] * layers  # keys at 8 of 16 dims, values at 12
    record = check_cache_program_and_folder(sliced, program, PROMPT, IDS, tmp_path / "keys")
    assert record["generator"]["kv_cache_bytes_per_token"] == layers * groups * (8 + 12) * 4
    assert record["key_widths"] and all(v == [8, D] for v in record["key_widths"].values())


def test_unit_choice_meets_the_width_with_the_best_score():
    sizes = [2, 2, 1, 1, 2]
    scores = torch.tensor([5.0, 1.0, 2.5, 2.0, 3.0])
    assert sorted(choose_units(scores, sizes, 4)) == [0, 2, 3]  # 5 + 2.5 + 2 beats the two best pairs' 5 + 3
    assert sorted(choose_units(scores, sizes, 3)) == [0, 2]
    assert sorted(choose_units(scores, sizes, 8)) == [0, 1, 2, 3, 4]
    assert choose_units(scores, [2, 2], 3) is None
    assert feasible_keep([2, 2, 2], 5) == 4 and feasible_keep([2, 1, 2], 4) == 4 and feasible_keep([4, 4], 2) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=0.0, key_sparsity=1.0), r"key_sparsity must be a number in \[0, 1\)"),
    (dict(target_params=0.8, stock=True, key_sparsity=0.25), "stock=True keeps every attention's query and key heads"),
])
def test_bad_key_options_are_refused(kwargs, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(tiny_model("llama"), calibration(), progress=False, **kwargs)


@pytest.mark.parametrize("family,why", [("qwen3", "aten.mean.dim"), ("falcon_old", "getitem")])
def test_models_whose_keys_cannot_be_narrowed_name_why(family, why):
    sliced = fxslice.compress(tiny_model(family), calibration(), 0.0, key_sparsity=0.25, progress=False)
    assert not sliced.fxslice.key_widths
    reasons = sliced.fxslice.skipped_attentions
    assert reasons and all(why in reason and "cannot be narrowed: node '" in reason for reason in reasons.values())
    assert all(reason.startswith("the attention queries and keys of ") for reason in reasons.values())


def test_a_slice_that_does_not_fit_the_capture_is_refused_naming_the_attention():
    model = tiny_model("llama")
    sliced = fxslice.compress(model, calibration(), 0.0, basis="none", key_sparsity=0.5, progress=False)
    edit = next(e for e in sliced.fxslice.slice.edits if isinstance(e, NarrowKeys))
    plan = _plan(model)
    for bad in (NarrowKeys(edit.attention, edit.width, edit.kept[:1]),  # one group of two
                NarrowKeys(edit.attention, edit.width, [[0, 1, 2, 3, 4, 5, 6, 7]] * 2)):  # half pairs (0, 8) ...
        with pytest.raises(FxSliceError, match="narrows the queries and keys of 'model.layers.0.self_attn.o_proj'"):
            bad.apply(plan)


def _plan(model):
    from fxslice.passes.p3_analyse import analyse
    from fxslice.passes.p5_fuse import fuse

    return fuse(analyse(canonical_graph(model)))


@pytest.mark.parametrize("kind,why", [
    ("plain", None),
    ("fused_qk", "outside the path to the attention (a fused projection)"),
    ("shared_qk", "is more than one of the attention's queries, keys and values"),
    ("shifted_k", "mixes tokens on the way from its Linear"),
])
def test_query_key_paths_of_another_structure_are_refused_naming_the_node(kind, why):
    from fxslice.passes.p3_analyse import analyse
    from fxslice.passes.p4_attention import find_attentions
    from toy_models import ToyAttentionLM

    torch.manual_seed(0)
    model = ToyAttentionLM(kind).eval()
    search = find_attentions(analyse(canonical_graph(model)))
    assert len(search.attentions) == 2, search.skipped
    for attention in search.attentions:
        if why is None:  # no rotary: every head dimension is a unit of its own
            assert attention.query_key.units == [[j] for j in range(16)]
        else:
            assert attention.query_key is None
            assert why in attention.query_key_refused and "cannot be narrowed: node '" in attention.query_key_refused
