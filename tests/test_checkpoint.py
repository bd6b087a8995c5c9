"""Streaming a checkpoint: the same sliced model as the model in memory, and clear errors on bad folders."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError, GraphStructureError
from fxslice.graph.store import StreamedWeights
from fxslice.hf import logits_of

from tiny_models import MOE_FAMILIES, VOCAB, folder_digest, tiny_model

# tied heads, Conv1D (transposed views), flattened OPT stream, Falcon's tensor constants, writer-side
# norms, parallel blocks with a renamed head key (embed_out), LayerNorm centring with an embedding norm
FAMILIES = ["llama_tied", "gpt2", "opt", "falcon_new", "gemma2", "gpt_neox_parallel", "bloom", "phi", "qwen3"]


def _calibration(masked: bool) -> list:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 24), generator=generator)
    if not masked:
        return [ids]
    mask = torch.ones_like(ids)
    mask[0, 17:] = 0
    mask[2, 9:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))



def _save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity, masked, basis", [pytest.param(0.0, False, "position", marks=pytest.mark.slow),
                                                    (0.25, True, "block")])
def test_streamed_checkpoint_equals_the_model_in_memory(tmp_path, family, sparsity, masked, basis):
    model = tiny_model(family)
    folder = _save(model, tmp_path / "ckpt")
    before = folder_digest(folder)
    in_memory = fxslice.compress(model, _calibration(masked), sparsity, basis=basis, progress=False)
    streamed = fxslice.compress(str(folder), _calibration(masked), sparsity, basis=basis, progress=False)
    assert streamed.fxslice.param_count == in_memory.fxslice.param_count
    assert streamed.fxslice.widths == in_memory.fxslice.widths
    assert {n: p.shape for n, p in streamed.named_parameters()} == {n: p.shape for n, p in in_memory.named_parameters()}
    torch.testing.assert_close(logits_of(streamed, _probe()), logits_of(in_memory, _probe()), atol=1e-5, rtol=1e-5)
    if sparsity == 0.0:
        torch.testing.assert_close(logits_of(streamed, _probe()), logits_of(model, _probe()), atol=1e-4, rtol=1e-4)
    assert folder_digest(folder) == before  # the checkpoint is only read


@pytest.mark.parametrize("family", ["falcon_new", "llama_tied"])  # LayerNorm shifts folded into bias-free readers; a tied head
@pytest.mark.parametrize("options", [dict(target_params=0.8, round_to=1, split="fixed"), dict(sparsity=0.0, basis="none",
                                                                             hidden_sparsity=0.3)],
                         ids=["budget", "unrotated"])
def test_streamed_budget_and_unrotated_slices_equal_the_model_in_memory(tmp_path, family, options):
    """The budget is planned before a streamed reader holds the bias a folded norm shift gives it, and an
    unrotated tied head is loaded once per module: neither may change the count or the tie."""
    model = tiny_model(family)
    folder = _save(model, tmp_path / "ckpt")
    in_memory = fxslice.compress(model, _calibration(True), progress=False, **options)
    streamed = fxslice.compress(str(folder), _calibration(True), progress=False, **options)
    for field in ("widths", "hidden_widths", "param_count"):
        assert getattr(streamed.fxslice, field) == getattr(in_memory.fxslice, field), field
    assert streamed.fxslice.param_count == sum(p.numel() for p in streamed.parameters())
    if "target_params" in options:
        assert streamed.fxslice.param_fraction <= options["target_params"]
    # named_parameters lists a tied weight once: equal names mean the same ties
    assert {n: p.shape for n, p in streamed.named_parameters()} == {n: p.shape for n, p in in_memory.named_parameters()}
    torch.testing.assert_close(logits_of(streamed, _probe()), logits_of(in_memory, _probe()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f if f in ("mixtral", "qwen2_moe") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(MOE_FAMILIES)])
def test_per_expert_checkpoint_tensors_stream_into_grouped_experts(tmp_path, family):
    """save_pretrained writes one tensor per expert; the stream stacks them (and concatenates gate and up)
    with transformers' own conversion operations, shard by shard."""
    model = tiny_model(family)
    folder = _save(model, tmp_path / "ckpt", max_shard_size="50KB")
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    if family in ("mixtral", "qwen2_moe"):  # per-expert tensors (gpt_oss and the granite MoEs store them grouped)
        assert any(".experts.0." in key for key in keys)
    before = folder_digest(folder)
    in_memory = fxslice.compress(model, _calibration(True), 0.25, progress=False)
    streamed = fxslice.compress(str(folder), _calibration(True), 0.25, progress=False)
    assert streamed.fxslice.param_count == in_memory.fxslice.param_count
    torch.testing.assert_close(logits_of(streamed, _probe()), logits_of(in_memory, _probe()), atol=1e-5, rtol=1e-5)
    assert folder_digest(folder) == before


def test_sharded_bf16_checkpoint_streams_in_its_own_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    folder = _save(model, tmp_path / "ckpt", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    in_memory = fxslice.compress(model, _calibration(True), 0.25, progress=False)
    streamed = fxslice.compress(folder, _calibration(True), 0.25, progress=False)
    assert next(streamed.parameters()).dtype == torch.bfloat16
    assert streamed.fxslice.param_count == in_memory.fxslice.param_count
    # the same float64 algebra rounded to bf16 at the same steps; kernels may round differently (one bf16 ulp)
    torch.testing.assert_close(logits_of(streamed, _probe()).float(), logits_of(in_memory, _probe()).float(),
                               atol=2e-2, rtol=2e-2)


def test_streamed_compression_never_holds_two_dense_blocks(tmp_path, monkeypatch):
    """At most one segment's dense modules are resident; finished modules go to the offload folder."""
    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    offload = tmp_path / "offload"
    offload.mkdir()
    resident_counts = []
    original = StreamedWeights.fetch

    def fetch(self, names):
        original(self, names)
        resident_counts.append(sum(1 for n in self.sources if n not in self.absent and n not in names))
        assert any(offload.iterdir()) or not resident_counts[:-1]  # finished modules were written out
    monkeypatch.setattr(StreamedWeights, "fetch", fetch)
    # per position: one segment at a time (basis="block" fetches a layer's two segments together)
    sliced = fxslice.compress(folder, _calibration(False), 0.25, offload_dir=offload, basis="position",
                              progress=False)
    assert max(resident_counts) == 0  # nothing but the fetched segment is in memory when a segment runs
    assert torch.isfinite(logits_of(sliced, _probe())).all()
    assert any(offload.iterdir())  # the files back the sliced weights (memory-mapped) ...
    del sliced
    gc.collect()
    assert not any(offload.iterdir())  # ... and go with the graph


def test_device_option_runs_the_same_path_on_the_cpu():
    model = tiny_model("gemma2")
    plain = fxslice.compress(model, _calibration(True), 0.25, progress=False)
    explicit = fxslice.compress(model, _calibration(True), 0.25, device="cpu", offload_dir=None, progress=False)
    torch.testing.assert_close(logits_of(explicit, _probe()), logits_of(plain, _probe()), atol=0, rtol=0)


def test_in_memory_model_with_offload_matches(tmp_path):
    model = tiny_model("opt")
    plain = fxslice.compress(model, _calibration(True), 0.25, progress=False)
    offloaded = fxslice.compress(model, _calibration(True), 0.25, offload_dir=tmp_path, progress=False)
    torch.testing.assert_close(logits_of(offloaded, _probe()), logits_of(plain, _probe()), atol=0, rtol=0)
    del offloaded
    gc.collect()
    assert not any(tmp_path.iterdir())


# --- bad checkpoints -------------------------------------------------------------------------------------
def _sharded(tmp_path) -> Path:
    return _save(tiny_model("llama"), tmp_path / "ckpt", max_shard_size="20KB")


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_missing_shard_is_named(tmp_path):
    folder = _sharded(tmp_path)
    missing = _shards(folder)[1]
    missing.unlink()
    with pytest.raises(FxSliceError, match=f"shard .*{missing.name} is missing"):
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)


def test_truncated_shard_is_named_and_left_as_it_is(tmp_path):
    folder = _sharded(tmp_path)
    shard = _shards(folder)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    before = folder_digest(folder)
    with pytest.raises(FxSliceError, match=f"{shard.name} is truncated"):
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)
    assert folder_digest(folder) == before


def test_tensor_missing_from_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FxSliceError, match="no tensor for parameter 'model.layers.1.mlp.up_proj.weight'"):
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)


def test_wrong_shape_in_checkpoint_is_named(tmp_path):
    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FxSliceError, match="mlp.*proj.weight' has shape"):
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)


@pytest.mark.parametrize("setup, message", [
    (lambda f: (f / "config.json").unlink(), "no config.json"),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "no model.safetensors .*pytorch_model.bin"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x01\x02"), "truncated"),
])
def test_unusable_folders_are_refused(tmp_path, setup, message):
    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    setup(folder)
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)


def test_default_offload_folder_lives_as_long_as_the_result(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    sliced = fxslice.compress(_save(tiny_model("llama"), tmp_path / "ckpt"), _calibration(False), 0.25, progress=False)
    assert [p.name.startswith("fxslice-offload-") for p in (tmp_path / "tmp").iterdir()] == [True]
    del sliced
    gc.collect()
    assert not any((tmp_path / "tmp").iterdir())


def test_missing_folder_and_in_memory_dtype_are_refused(tmp_path):
    with pytest.raises(FxSliceError, match="neither a torch.nn.Module nor a checkpoint folder"):
        fxslice.compress(str(tmp_path / "nowhere"), _calibration(False), 0.25, progress=False)
    with pytest.raises(FxSliceError, match="dtype applies to a checkpoint path"):
        fxslice.compress(tiny_model("llama"), _calibration(False), 0.25, dtype=torch.float16, progress=False)


def test_encoder_checkpoint_is_refused_clearly(tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    folder = _save(AutoModelForMaskedLM.from_config(config), tmp_path / "bert")
    with pytest.raises(FxSliceError) as info:
        fxslice.compress(folder, _calibration(False), 0.25, progress=False)
    assert "bert" in str(info.value).lower() or isinstance(info.value, GraphStructureError)
    assert os.path.exists(folder / "config.json")


def test_streamed_result_saves_its_offloaded_weights_once_and_reloads(tmp_path):
    from fxslice.runtime.generate import generate, with_cache

    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    sliced = fxslice.compress(folder, _calibration(True), 0.25, basis="block", progress=False)
    program = with_cache(sliced, max_cache_len=32, share_weights=True)
    saved = fxslice.save(sliced, tmp_path / "saved", generator=program)
    weight_files = sorted(saved.glob("weights*.safetensors")) + sorted(saved.glob("weights/*.safetensors"))
    assert any(p.parent.name == "weights" for p in weight_files)  # copied from the offload files
    weight_bytes = sum(p.numel() * p.element_size() for p in sliced.parameters())
    assert sum(p.stat().st_size for p in weight_files) <= 1.05 * weight_bytes + 64 * 1024
    loaded, _ = fxslice.load(saved)
    torch.testing.assert_close(loaded(_probe()).logits, logits_of(sliced, _probe()), atol=1e-5, rtol=1e-5)
    prompt = _probe()[:1, :8]
    assert torch.equal(loaded.generate(prompt, 6), generate(program, prompt, 6))


def test_save_of_a_streamed_result_copies_files_instead_of_reading_weights(tmp_path, monkeypatch):
    """The memory-mapped weights are not written through memory: every block's offload file is copied."""
    from safetensors import torch as safetensors_torch

    folder = _save(tiny_model("llama"), tmp_path / "ckpt")
    sliced = fxslice.compress(folder, _calibration(False), 0.25, progress=False)
    written = []
    original = safetensors_torch.save_file
    monkeypatch.setattr(safetensors_torch, "save_file", lambda tensors, *a, **k: (written.extend(tensors),
                                                                                     original(tensors, *a, **k)))
    saved = fxslice.save(sliced, tmp_path / "saved", max_cache_len=0)
    assert len(list((saved / "weights").glob("*.safetensors"))) >= 2
    # only what never went through an offload file (the untied head, read at the end) is written from memory
    parameters = {name for name, _ in sliced.named_parameters()}
    assert set(written) & parameters == {f"{name}.weight" for name in sliced.fxslice.head} == {"lm_head.weight"}


def test_causality_is_probed_along_the_calibration_of_a_checkpoint(tmp_path, monkeypatch):
    """A checkpoint's model cannot be run before its weights are read: two probe inputs ride along
    the calibration and their values at the last rotated position are compared."""
    from fxslice.hf import CausalProbe

    seen = []
    original = CausalProbe.check

    def check(self, first, second, what="logits"):
        seen.append((tuple(first.shape), what))
        original(self, first, second, what)
    monkeypatch.setattr(CausalProbe, "check", check)
    folder = _save(tiny_model("opt"), tmp_path / "ckpt")  # OPT's stream is flattened to [B·T, D] inside
    sliced = fxslice.compress(folder, _calibration(False), 0.25, progress=False)
    assert len(seen) == 1 and seen[0][0][:2] == (1, 8) and seen[0][0][2] in sliced.fxslice.widths
    assert seen[0][1].startswith("stream values (position")
    probe = CausalProbe(fxslice.hf.model_spec(tiny_model("opt")))
    values = torch.randn(1, 8, 16)
    leaked = values.clone()
    leaked[:, 0] += 1.0  # an earlier position that changed with the last token
    with pytest.raises(FxSliceError, match="not a causal language model"):
        original(probe, values, leaked, "stream values")
    original(probe, values, values.clone(), "stream values")
