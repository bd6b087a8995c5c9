"""Bad input gets a clear error naming the problem, and leaves the user's model and files untouched."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import fxslice
from fxslice import CalibrationError, FxSliceError
from fxslice.runtime.generate import generate, with_cache
from fxslice.tempfolders import made_by
from tiny_models import COMMON, VOCAB, calibration, tiny_model, tiny_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama_tied")


@pytest.fixture(scope="module")
def sliced(llama):
    return fxslice.compress(llama, calibration(), 0.25, progress=False)


@pytest.fixture(scope="module")
def saved(sliced, tmp_path_factory):
    return fxslice.save(sliced, tmp_path_factory.mktemp("saved") / "sliced", max_cache_len=0)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- compress ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [torch.full((2, 8), 0.5), torch.full((2, 8), 2), torch.full((2, 8), -1.0)])
def test_attention_mask_must_be_zero_or_one(llama, mask):
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": mask}
    with pytest.raises(CalibrationError, match="attention_mask must contain only 0 and 1"):
        fxslice.compress(llama, [batch], 0.25, progress=False)


def test_sequences_longer_than_the_position_table_are_refused():
    model = tiny_model("gpt2")  # learned positions: n_positions=64
    before = _state(model)
    with pytest.raises(CalibrationError, match="80 tokens but the model's position table holds 64"):
        fxslice.compress(model, calibration(length=80), 0.25, progress=False)
    assert _unchanged(model, before)


def test_rotary_models_take_sequences_longer_than_max_position_embeddings():
    sliced = fxslice.compress(tiny_model("llama"), calibration(batches=1, length=80), 0.25, progress=False)
    assert torch.isfinite(sliced(torch.randint(0, VOCAB, (1, 80))).logits).all()


class NoParameters(nn.Module):
    def forward(self, input_ids):
        return input_ids.float()


@pytest.mark.parametrize("model, message", [
    ("smollm2-135m", "model 'smollm2-135m' is neither a torch.nn.Module nor a checkpoint folder"),
    (None, "model must be a torch.nn.Module or a checkpoint path, got NoneType"),
    (NoParameters(), "NoParameters has no parameters"),
])
def test_what_is_not_a_model_is_refused(model, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(model, calibration(), 0.25, progress=False)


def test_meta_device_model_is_refused_in_plain_words():
    config = AutoConfig.for_model("llama", **COMMON)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(FxSliceError, match="meta device \\(no weights\\)"):
        fxslice.compress(model, calibration(), 0.25, progress=False)


def test_encoder_model_is_refused_as_not_causal():
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(FxSliceError, match="BertLMHeadModel is not a causal language model"):
        fxslice.compress(model, calibration(), 0.25, progress=False)


# --- save / load ------------------------------------------------------------------------------------
def test_load_on_a_device_this_machine_lacks_is_refused(saved):
    with pytest.raises(FxSliceError, match="'cuda:7' requested but"):
        fxslice.load(saved, device="cuda:7")


def test_streaming_a_checkpoint_without_tokenizer_files_is_one_clear_error(tmp_path):
    from fxslice.jobs.compress import compress_job
    from fxslice.jobs.data import Protocol

    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(FxSliceError, match="has no usable tokenizer files .*--stream"):
        compress_job(str(tmp_path / "ckpt"), 0.25, Protocol(), stream=True, progress=False)

@pytest.mark.parametrize("model, tokenizer, message", [
    ("not a model", None, "model must be a torch.nn.Module"),
    (None, None, "model must be a torch.nn.Module"),
    ("sliced", "gpt2", "tokenizer must be a Hugging Face tokenizer"),
])
def test_save_checks_its_arguments(sliced, tmp_path, model, tokenizer, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.save(sliced if model == "sliced" else model, tmp_path / "out", tokenizer, max_cache_len=0)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_folder_fxslice_did_not_write(sliced, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FxSliceError, match="did not write"):
        fxslice.save(sliced, folder, overwrite=True, max_cache_len=0)
    assert (folder / "notes.txt").read_text() == "precious" and len(list(folder.iterdir())) == 1
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FxSliceError, match="not a folder"):
        fxslice.save(sliced, afile, overwrite=True, max_cache_len=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    fxslice.save(sliced, empty, overwrite=True, max_cache_len=0)  # an empty folder may be filled
    assert (empty / "fxslice.json").is_file()


def test_saved_folders_get_the_users_permissions(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected a JSON object, found a list"),
    ("null", "expected a JSON object"),
    ('"text"', "expected a JSON object"),
])
def test_load_refuses_a_record_that_is_not_an_object(saved, tmp_path, content, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "fxslice.json").write_text(content)
    with pytest.raises(FxSliceError, match=message):
        fxslice.load(broken)


@pytest.mark.parametrize("key", ["vocab_size", "program_sha256"])
def test_load_refuses_a_record_missing_a_key(saved, tmp_path, key):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    record = json.loads((broken / "fxslice.json").read_text())
    del record[key]
    (broken / "fxslice.json").write_text(json.dumps(record))
    with pytest.raises(FxSliceError, match=f"'{key}' is missing"):
        fxslice.load(broken)


KILLED_SAVE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import fxslice
from tiny_models import calibration, tiny_model
sliced = fxslice.compress(tiny_model("llama_tied"), calibration(), 0.25, progress=False)
real_save = torch.export.save
def slow_save(program, path, *args, **kwargs):
    real_save(program, path, *args, **kwargs)
    open({marker!r}, "w").write("half written")
    time.sleep(60)
torch.export.save = slow_save
fxslice.save(sliced, {target!r}, overwrite=True, record={{"sparsity": 0.5}}, max_cache_len=0)
"""


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_folder_intact(sliced, tmp_path):
    target = tmp_path / "model"
    fxslice.save(sliced, target, record={"sparsity": 0.25}, max_cache_len=0)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    script = KILLED_SAVE.format(tests=TESTS, marker=str(marker), target=str(target))
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 300
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the save in the subprocess never started writing"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        marker.unlink(missing_ok=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "a partial folder was left beside the target"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert fxslice.load(target)[0].record["sparsity"] == 0.25
    fxslice.save(sliced, target, overwrite=True, record={"sparsity": 0.5}, max_cache_len=0)  # cleans up after the killed save
    leftovers = [p for where in (tmp_path, Path(tempfile.gettempdir())) for p in where.glob(".model.fxslice-*")
                 if (made_by(p.name, ".model.fxslice-") or (None,))[0] == process.pid]
    assert not leftovers and fxslice.load(target)[0].record["sparsity"] == 0.5


# --- generation --------------------------------------------------------------------------------------------
def test_generation_beyond_the_cache_is_refused(llama, sliced):
    program = with_cache(sliced, max_cache_len=16)
    prompt = torch.randint(0, VOCAB, (1, 10))
    with pytest.raises(FxSliceError, match="needs 17 cache slots, more than the KV cache length 16"):
        generate(program, prompt, 8)
    assert generate(program, prompt, 7).shape == (1, 17)  # the last new token is never fed back
    with pytest.raises(FxSliceError, match="top_p must be in \\(0, 1\\]"):
        generate(program, prompt, 2, do_sample=True, top_p=0.0)
    with pytest.raises(FxSliceError, match="temperature must be > 0"):
        generate(program, prompt, 2, do_sample=True, temperature=-1.0)
    with pytest.raises(FxSliceError, match="holds at most 1 sequence\\(s\\), got input_ids with 2 rows.*--cache-batch-size"):
        generate(program, torch.randint(0, VOCAB, (2, 4)), 2)
    with pytest.raises(FxSliceError, match="max_new_tokens must be an integer >= 0"):
        generate(program, prompt, -1)


# --- command line ------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fxslice.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["compress", "--sparsity", "2", "--no-save"], "sparsity must be a number in [0, 1)"),
    (["compress", "--device", "nonsense", "--no-save"], "device must be a torch device"),
    (["--threads", "-1", "inspect", "x"], "--threads: expected a positive integer, got -1"),
    pytest.param(["--threads", "0", "inspect", "x"], "--threads: expected a positive integer, got 0",
                 marks=pytest.mark.slow),  # the same parser as --threads -1
    pytest.param(["compress", "--batch-size", "0", "--no-save"], "--batch-size: expected a positive integer, got 0",
                 marks=pytest.mark.slow),
    (["compress", "--device", "cuda:3", "--no-save"], "is not available on this machine"),
    pytest.param(["compress", "--max-cache-len", "-4", "--no-save"], "--max-cache-len: expected an integer >= 0, got -4", marks=pytest.mark.slow),
    pytest.param(["compress", "--compile", "mps", "--output", "/nonexistent/never"], "AOTInductor packages are built for cpu or cuda", marks=pytest.mark.slow),
    (["eval", "/nonexistent/folder/xyz"], "cannot load model"),
    pytest.param(["compress", "--format", "transformers", "--compile", "--output", "/nonexistent/never"],
                 "a transformers checkpoint is compiled by its own runtime", marks=pytest.mark.slow),
    (["compress", "--stock", "--sparsity", "0.25", "--no-save"], "stock=True keeps the stream width"),
    pytest.param(["compress", "--basis", "position", "--basis-span", "2", "--no-save"], "it needs basis='block'",
                 marks=pytest.mark.slow),  # the same check as compress(basis_span=...)
    pytest.param(["compress", "--key-sparsity", "1.5", "--no-save"], "key_sparsity must be a number in [0, 1)",
                 marks=pytest.mark.slow),
])
def test_cli_refuses_bad_options_before_any_work_in_one_line(args, message):
    started = time.perf_counter()
    done = _cli(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fxslice") and message in errors[0]
    assert time.perf_counter() - started < 60, "the option was checked only after real work"


@pytest.mark.slow
def test_cli_generate_past_the_cache_is_one_line(sliced, llama, tmp_path):
    program = with_cache(sliced, max_cache_len=16)
    folder = fxslice.save(sliced, tmp_path / "gen", tokenizer=tiny_tokenizer(), generator=program)
    done = _cli("generate", str(folder), "--prompt", "And God said", "--max-new-tokens", "40")
    assert done.returncode == 2 and "more than the KV cache length 16" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_overwrite_never_deletes_foreign_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2,3")
    done = _cli("compress", "--output", str(folder), "--overwrite", "--no-eval")
    assert done.returncode == 2 and "did not write" in done.stderr and "Traceback" not in done.stderr
    assert (folder / "data.csv").read_text() == "1,2,3"
