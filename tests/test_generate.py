"""KV-cache generation: exact at sparsity 0, consistent with the sliced graph, saved and reloaded."""

import subprocess
import sys

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from fxslice.jobs.finetune import finetune
from fxslice.runtime.generate import generate, retarget, with_cache
from tiny_models import VOCAB, calibration, tiny_model, tiny_tokenizer

PROMPT = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("family", ["llama_tied", "gpt2", "gemma3_text", "phi", "falcon_new", "falcon_old"])
def test_greedy_tokens_equal_the_dense_model_at_sparsity_zero(family):  # Falcon: cache heads as written
    model = tiny_model(family)
    program = with_cache(fxslice.compress(model, calibration(), 0.0, progress=False), max_cache_len=64)
    ours = generate(program, PROMPT, 12)
    reference = model.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(ours, reference)


def test_cache_program_follows_the_block_basis():
    model = tiny_model("llama_tied")
    sliced = fxslice.compress(model, calibration(), 0.25, basis="block", progress=False)
    program = with_cache(sliced, max_cache_len=64)
    shortcuts = sorted(n.removeprefix("model.") for n, _ in program.named_modules() if ".shortcut_" in n)
    assert shortcuts == sorted(m.name for m in sliced.fxslice.inserted if m.kind == "shortcut")
    assert shortcuts == ["model.layers.0.shortcut_2", "model.layers.1.shortcut_4"]
    with torch.no_grad():
        assert (program(PROMPT, torch.arange(PROMPT.shape[1])) - sliced(PROMPT).logits).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tied():
    model = tiny_model("llama_tied")
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    return model, sliced, with_cache(sliced, max_cache_len=64)


def test_cached_decoding_matches_the_sliced_graph(tied):
    _, sliced, program = tied
    tokens = generate(program, PROMPT, 10)
    with torch.no_grad():
        expected = [int(sliced(tokens[:, : PROMPT.shape[1] + i]).logits[0, -1].argmax()) for i in range(10)]
        assert tokens[0, PROMPT.shape[1]:].tolist() == expected
        assert torch.allclose(program(PROMPT, torch.arange(7)), sliced(PROMPT).logits, atol=1e-5)


def test_sampling_is_seeded_and_options_are_checked(tied):
    program = tied[2]
    a = generate(program, PROMPT, 8, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, seed=3)
    b = generate(program, PROMPT, 8, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 15)
    with pytest.raises(FxSliceError, match="input_ids must be an integer tensor of shape \\[B, T\\]"):
        generate(program, PROMPT[0], 4)
    with pytest.raises(FxSliceError, match="seed must be an integer or None, got 1.5"):
        generate(program, PROMPT, 2, do_sample=True, seed=1.5)


BAD_IDS = [(PROMPT.bool(), "torch.bool"), (PROMPT.float(), "torch.float32"), (PROMPT[:0], r"shape \[0, 7\]"),
           (PROMPT - 200, r"token id -\d+, outside the vocabulary \[0, 128\)"),
           (PROMPT + VOCAB, r"token id \d+, outside the vocabulary \[0, 128\)")]


@pytest.mark.parametrize("ids,message", BAD_IDS, ids=["bool", "float", "empty", "negative", "too-large"])
def test_bad_token_ids_are_refused_before_any_kernel(tied, tmp_path_factory, ids, message):
    _, sliced, program = tied
    with pytest.raises(FxSliceError, match=message):
        generate(program, ids, 2)
    folder = tmp_path_factory.getbasetemp() / "bad-ids"
    if not folder.exists():
        save(sliced, folder, generator=program)
    loaded, _ = load(folder)
    with pytest.raises(FxSliceError, match=message):
        loaded(ids)
    with pytest.raises(FxSliceError, match=message):
        loaded.generate(ids, 2)


def test_saved_folder_generates_without_model_code_and_after_finetuning(tied, tmp_path):
    model, sliced, program = tied
    folder = save(sliced, tmp_path / "sliced", tokenizer=tiny_tokenizer(), record={"sparsity": 0.25}, generator=program)
    loaded, _ = load(folder)
    expected = generate(program, PROMPT, 10)
    assert torch.equal(loaded.generate(PROMPT, 10), expected)
    merged, _ = finetune(loaded, calibration(batches=2, seed=8), calibration(batches=1, seed=9), lr=1e-2,
                         eval_every=1, progress=False)
    moved = retarget(loaded.generator, merged)
    tokens = generate(moved, PROMPT, 6)
    with torch.no_grad():
        expected_ft = [int(merged(tokens[:, : 7 + i])[0, -1].argmax()) for i in range(6)]
    assert tokens[0, 7:].tolist() == expected_ft
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "generate", str(folder), "--prompt", "And God said",
                           "--max-new-tokens", "5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("And God said") and "tokens/s" in done.stderr
