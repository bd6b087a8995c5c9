"""One slice value, one replay: the KV-cache program takes every shape the rotation decided from the
recorded slice alone, for every option combination; ``fxslice.save`` builds it with nothing else."""

import json

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError
from fxslice.passes import PASSES
from fxslice.passes.slice_record import RemoveShortcut, Resize, ResizeBranch, Slice
from fxslice.runtime.generate import generate, with_cache
from tiny_models import VOCAB, calibration, masked_calibration, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))
PROMPT = IDS[:1, :6]

# family -> options: every kind of shape change (block/position bases, centred tied streams, learned
# positions, raw positions, post-norm branches, MLP units, budgets, parallel blocks, MQA, MoE)
SLOW = pytest.mark.slow  # the quick profile keeps one of each mechanism: block basis, post-norm branch with MLP
COMBINATIONS = [  # units, offloaded centred tied stream
    ("llama", dict(sparsity=0.25)),
    pytest.param("llama_tied", dict(sparsity=0.25, basis="position", pca_signal="norm_output"), marks=SLOW),
    pytest.param("gpt2", dict(sparsity=0.25, slice_head=True), marks=SLOW),
    pytest.param("gpt_neox_parallel", dict(sparsity=0.3, hidden_sparsity=0.25, basis="position"), marks=SLOW),
    pytest.param("bloom", dict(sparsity=0.25), marks=SLOW),
    ("gemma2", dict(sparsity=0.25, hidden_sparsity=0.3)),
    pytest.param("olmo2", dict(target_params=0.8), marks=SLOW),
    pytest.param("gemma3_text", dict(target_params=0.75, basis="position"), marks=SLOW),
    pytest.param("phi", dict(sparsity=0.2, hidden_sparsity=0.2), marks=SLOW),
    pytest.param("falcon_old", dict(sparsity=0.25), marks=SLOW),
    pytest.param("qwen3", dict(sparsity=0.0), marks=SLOW),
    pytest.param("mixtral", dict(sparsity=0.25), marks=SLOW),  # quick: test_moe's KV-cache program
    pytest.param("llama", dict(sparsity=0.2, hidden_sparsity=0.3, allocation="energy"), marks=SLOW),
    ("gpt2", dict(sparsity=0.25, offload_dir="<tmp>")),
    pytest.param("qwen2_moe", dict(target_params=0.85), marks=SLOW),
    pytest.param("gemma3_text", dict(sparsity=0.0, hidden_sparsity=0.3, stock=True), marks=SLOW),  # unrotated (quick: test_stock)
    pytest.param("gpt2", dict(target_params=0.8, basis="none"), marks=SLOW),
]


def _case_id(case) -> str:
    family, options = case.values if hasattr(case, "values") else case
    return f"{family}-{'-'.join(map(str, options.values()))}"


def _prefill(program, ids):
    with torch.no_grad():
        return program(ids, torch.arange(ids.shape[1]))


@pytest.mark.parametrize("family,options", COMBINATIONS, ids=[_case_id(c) for c in COMBINATIONS])
def test_the_saved_cache_program_replays_the_slice_exactly(family, options, tmp_path):
    """generate.pt2 == model.pt2: the KV-cache program, built by save from the recorded slice alone."""
    model = tiny_model(family)
    if options.get("offload_dir") == "<tmp>":
        options = {**options, "offload_dir": tmp_path}
    sliced = fxslice.compress(model, masked_calibration(), progress=False, **options)
    del model
    loaded, _ = fxslice.load(fxslice.save(sliced, tmp_path / family, max_cache_len=32, cache_batch_size=2))
    with torch.no_grad():
        program_logits = loaded(IDS).logits
        assert (program_logits - sliced(IDS).logits).abs().max() < 1e-4
    assert (_prefill(loaded.generator, IDS) - program_logits).abs().max() < 1e-4
    record = sliced.fxslice.slice
    resized = {e.position: e.width for e in record.edits if isinstance(e, Resize)}
    assert [resized.get(i, sliced.fxslice.hidden_size) for i in range(len(sliced.fxslice.widths))] \
        == sliced.fxslice.widths
    if family in ("gemma2", "olmo2") and min(sliced.fxslice.widths) < sliced.fxslice.hidden_size:
        assert any(isinstance(e, ResizeBranch) for e in record.edits)  # (a budget may keep the stream whole)
    if family == "llama" and "allocation" not in options:  # a block's two positions share a basis: no shortcut
        assert sum(isinstance(e, RemoveShortcut) for e in record.edits) == 2
    stored = {key.split(".shortcut_")[0] + ".shortcut_" + key.split(".shortcut_")[1].split(".")[0]
              for key in loaded.record["weights"]["programs"]["generate.pt2"] if ".shortcut_" in key}
    assert {name.removeprefix("model.") for name in stored} \
        == {m.name for m in sliced.fxslice.inserted if m.kind == "shortcut"}


def test_the_slice_record_round_trips_through_json():
    model = tiny_model("gemma2")
    sliced = fxslice.compress(model, calibration(), 0.25, hidden_sparsity=0.25, progress=False)
    record = sliced.fxslice.slice
    again = Slice.from_record(json.loads(json.dumps(record.to_record())))
    assert again == record
    assert set(again.hidden_units) == set(sliced.fxslice.hidden_widths)
    assert all(len(units) == sliced.fxslice.hidden_widths[w][0] for w, units in again.hidden_units.items())
    with pytest.raises(FxSliceError, match="slice record is malformed"):
        Slice.from_record({"positions": 5, "edits": [{"kind": "rotate_everything"}]})
    with pytest.raises(FxSliceError, match="slice record is malformed.*rotate"):
        Slice.from_record({"positions": 5, "rotate": "no", "edits": []})
    assert Slice.from_record({"positions": 5, "rotate": False}).rotate is False


def test_a_replay_onto_a_capture_of_another_shape_is_refused():
    sliced = fxslice.compress(tiny_model("llama"), calibration(), 0.25, progress=False)  # 5 positions
    bloom = fxslice.compress(tiny_model("bloom"), calibration(), 0.25, progress=False)  # 6 positions
    bloom.fxslice.source = sliced.fxslice.source
    with pytest.raises(FxSliceError, match="made on a graph with 6 stream positions, this capture has 5"):
        with_cache(bloom, max_cache_len=16)


def test_save_with_nothing_else_writes_a_folder_that_generates(tmp_path):
    model = tiny_model("llama_tied")
    sliced = fxslice.compress(model, masked_calibration(), 0.25, progress=False)
    del model  # the caller's model is not needed any more
    folder = fxslice.save(sliced, tmp_path / "sliced", tiny_tokenizer())
    loaded, tokenizer = fxslice.load(folder)
    assert tokenizer is not None and loaded.generator.max_cache_len == 1024
    tokens = loaded.generate(PROMPT, 10)
    ids = PROMPT
    with torch.no_grad():  # greedy decoding without a cache, on the sliced graph
        for _ in range(10):
            ids = torch.cat([ids, sliced(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids)
    assert torch.equal(generate(with_cache(sliced, max_cache_len=24), PROMPT, 10), tokens)
    record = json.loads((folder / "fxslice.json").read_text())
    assert record["generator"]["max_cache_len"] == 1024
    assert Slice.from_record(record["slice"]) == sliced.fxslice.slice


@pytest.mark.slow
def test_save_without_a_cache_program_when_asked(tmp_path):
    sliced = fxslice.compress(tiny_model("llama"), calibration(), 0.25, progress=False)
    folder = fxslice.save(sliced, tmp_path / "no-cache", max_cache_len=0)
    assert not (folder / "generate.pt2").exists()
    loaded, _ = fxslice.load(folder)
    with pytest.raises(FxSliceError, match="no generate.pt2"):
        loaded.generate(PROMPT, 4)


def test_the_passes_are_numbered_in_the_order_compress_runs_them():
    numbers = [int(p.__name__.rsplit(".", 1)[1].split("_")[0][1:]) for p in PASSES]
    assert numbers == list(range(1, len(PASSES) + 1))
    sliced = fxslice.compress(tiny_model("llama"), calibration(), 0.25, progress=False)
    names = [p.NAME for p in PASSES]
    timed = [label for label in sliced.fxslice.timings if label in names]
    assert timed == names[:-1]  # the rotation times its parts: load, calibration forward, pca, rewrite
    assert {"calibration forward", "pca", "rewrite"} <= set(sliced.fxslice.timings)


def test_a_model_that_does_not_copy_slices_and_saves_without_a_cache_program(tmp_path):
    import threading

    model = tiny_model("llama")
    model.lock = threading.Lock()  # deepcopy refuses it: no skeleton can be kept
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    with pytest.raises(FxSliceError, match="cannot be captured again .*copying LlamaForCausalLM failed"):
        with_cache(sliced, max_cache_len=16)
    with pytest.warns(UserWarning, match="no generate.pt2"):
        folder = fxslice.save(sliced, tmp_path / "m")
    assert (folder / "model.pt2").is_file() and not (folder / "generate.pt2").exists()
