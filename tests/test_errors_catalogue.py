"""Bad input, second catalogue: a corrupt saved record, a hostile checkpoint, bad token ids and sampling
options, and one rank of several refusing. Each gives one FxSliceError naming the file, field, argument or
node, before anything is written, and leaves the inputs byte for byte as they were (on the CLI: one line,
a non-zero status, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import fxslice
from fxslice import CalibrationError, FxSliceError
from fxslice.runtime.compiled import CompiledProgram, compile_folder
from fxslice.runtime.generate import generate, with_cache
from tiny_models import VOCAB, calibration, tiny_model, tiny_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))


# --- helpers ---------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _own_temporary_folders() -> set[str]:
    """Folders this process made in the system's temporary folder (fxslice names them PREFIX<pid>@<host>-...)."""
    made = [p for pattern in ("fxslice-*", ".*.fxslice-*") for p in Path(tempfile.gettempdir()).glob(pattern)]
    return {p.name for p in made if f"-{os.getpid()}@" in p.name}


def _refused(call, message: str, *folders: Path, error=FxSliceError):
    """``call()`` raises ``error`` matching ``message``, leaves ``folders`` byte-identical and makes no
    temporary folder that outlives it."""
    before = {folder: _files(folder) for folder in folders}
    temporary = _own_temporary_folders()
    with pytest.raises(error, match=message) as raised:
        call()
    for folder, files in before.items():
        assert _files(folder) == files, f"{folder} was changed"
    assert _own_temporary_folders() <= temporary, "a temporary folder was left behind"
    return raised.value


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fxslice.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def _one_line(done, message: str) -> None:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fxslice") and message in errors[0], done.stderr[-2000:]


@pytest.fixture(scope="module")
def sliced():
    return fxslice.compress(tiny_model("llama_tied"), calibration(), 0.25, progress=False)


@pytest.fixture(scope="module")
def saved(sliced, tmp_path_factory):
    return fxslice.save(sliced, tmp_path_factory.mktemp("saved") / "sliced", tiny_tokenizer(), max_cache_len=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- a saved folder's record ---------------------------------------------------------------------------
def _set(*path_and_value):
    *path, value = path_and_value

    def change(record):
        where = record
        for key in path[:-1]:
            where = where[key] if not callable(key) else key(where)
        where[path[-1]] = value
    return change


def _first_key(mapping):
    return next(iter(mapping))


RECORDS = {  # name -> (change to fxslice.json, message)
    "weight map ../": (lambda r: r["weights"]["weight_map"].update({_first_key(r["weights"]["weight_map"]): "../w.safetensors"}),
                       r"weights.weight_map\['.*'\] names '../w.safetensors', outside the folder"),
    "weight map absolute": (lambda r: r["weights"]["weight_map"].update({_first_key(r["weights"]["weight_map"]): "/etc/passwd"}),
                            r"weights.weight_map\['.*'\] names '/etc/passwd', outside the folder"),
    "package ../": (_set("compiled", {"cpu": {"file": "../x.pt2", "constants": {}, "device": "cpu",
                                              "torch_version": torch.__version__, "sha256": "0"}}),
                    "compiled.cpu.file names '../x.pt2', outside the folder"),
    "package absolute": (_set("compiled", {"cpu": {"file": "/etc/passwd", "constants": {}, "device": "cpu",
                                                   "torch_version": torch.__version__, "sha256": "0"}}),
                         "compiled.cpu.file names '/etc/passwd', outside the folder"),
    "programs entry a list": (_set("weights", "programs", "model.pt2", [1]), r"weights.programs\['model.pt2'\] is not a map"),
    "files a list": (_set("weights", "files", [1]), "weights.files is a list, not an object"),
    "files entry a string": (_set("weights", "files", "weights.safetensors", "abc"), r"weights.files\['weights.safetensors'\] lacks bytes"),
    "zeros a list": (_set("weights", "zeros", [1]), "weights.zeros is a list, not an object"),
    "zeros unknown dtype": (_set("weights", "zeros", {"cache": {"shape": [2], "dtype": "float99"}}),
                            r"weights.zeros\['cache'\] has no valid shape .* and dtype"),
    "zeros negative size": (_set("weights", "zeros", {"cache": {"shape": [-2], "dtype": "float32"}}),
                            r"weights.zeros\['cache'\] has no valid shape"),
    "zeros too large": (_set("weights", "zeros", {"cache": {"shape": [10**7, 10**7], "dtype": "float32"}}),
                        r"weights.zeros\['cache'\] has shape \[10000000, 10000000\], which cannot be allocated"),
    "dtype unknown": (_set("dtype", "float99"), "'dtype' is 'float99', not a torch dtype name"),
    "dtype a number": (_set("dtype", 7), "'dtype' is 7, not a torch dtype name"),
    "vocab_size zero": (_set("vocab_size", 0), "'vocab_size' must be a positive integer, got 0"),
    "cache length negative": (_set("generator", "max_cache_len", -1), "generator.max_cache_len must be a positive integer"),
    "cache batch a string": (_set("generator", "batch_size", "1"), "generator.batch_size must be a positive integer, got '1'"),
    "compiled a list": (_set("compiled", [1]), "'compiled' is a list, not an object"),
    "compiled constants of a model": (_set("compiled", {"cpu": {"file": "model.pt2", "constants": {"model": 5},
                                                                "device": "cpu", "torch_version": torch.__version__}}),
                                      r"compiled.cpu.constants\['model'\] is not a map"),
    "head a number": (_set("head", 5), "'head' is a int, not a list"),
    "inserted without names": (_set("inserted", [{"kind": "x"}]), "every entry of 'inserted' must be an object with a 'name'"),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_a_malformed_record_field_is_named_before_anything_is_opened(saved, tmp_path, name):
    change, message = RECORDS[name]
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    record = json.loads((broken / "fxslice.json").read_text())
    change(record)
    (broken / "fxslice.json").write_text(json.dumps(record))
    error = _refused(lambda: fxslice.load(broken), message, broken)
    assert "fxslice.json" in str(error)


def test_a_record_path_outside_the_folder_is_never_opened(saved, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    record = json.loads((broken / "fxslice.json").read_text())
    record["weights"]["weight_map"] = {key: "../elsewhere.safetensors" for key in record["weights"]["weight_map"]}
    (broken / "fxslice.json").write_text(json.dumps(record))
    (tmp_path / "elsewhere.safetensors").write_bytes(b"secret")
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(FxSliceError, match="outside the folder"):
        fxslice.load(broken)
    assert not [path for path in opened if "elsewhere" in path]


def test_cli_names_a_malformed_record_field_in_one_line(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    record = json.loads((broken / "fxslice.json").read_text())
    record["weights"]["zeros"] = {"cache": {"shape": [2], "dtype": "float99"}}
    (broken / "fxslice.json").write_text(json.dumps(record))
    _one_line(_cli("generate", str(broken), "--max-new-tokens", "2"), "weights.zeros['cache'] has no valid shape")


# --- hostile checkpoints, streamed -----------------------------------------------------------------------
def _header(path: Path) -> tuple[object, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_header(path: Path, header: object, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_header(change):
    def edit(folder: Path) -> None:
        header, body = _header(folder / "model.safetensors")
        _write_header(folder / "model.safetensors", change(header), body)
    return edit


def _edit_entry(change):
    def edit_entry(header):
        change(header["lm_head.weight"])
        return header
    return _edit_header(edit_entry)


def _index(weight_map):
    def edit(folder: Path) -> None:
        header, _ = _header(folder / "model.safetensors")
        keys = [key for key in header if key != "__metadata__"]
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map(keys)}))
    return edit


def _config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _tensor(name: str, index: int, value: float):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors[name][index] = value
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


CHECKPOINTS = {  # name -> (change to the checkpoint folder, message)
    "header a list": (_edit_header(lambda h: [1, 2]), "its safetensors header is a JSON list, not an object"),
    "entry a number": (_edit_header(lambda h: {**h, "lm_head.weight": 5}),
                       "tensor 'lm_head.weight' has a header entry that is a JSON int"),
    "metadata a list": (_edit_header(lambda h: {**h, "__metadata__": [1]}), "'__metadata__' is not an object of strings"),
    "no data_offsets": (_edit_entry(lambda e: e.pop("data_offsets")), "tensor 'lm_head.weight' has no data_offsets"),
    "data_offsets a string": (_edit_entry(lambda e: e.update(data_offsets="ab")),
                              "tensor 'lm_head.weight' has data_offsets 'ab', not \\[begin, end\\]"),
    "negative data_offsets": (_edit_entry(lambda e: e.update(data_offsets=[-8, 8])), "has data_offsets \\[-8, 8\\]"),
    "data_offsets of another size": (_edit_entry(lambda e: e.update(data_offsets=[e["data_offsets"][0], e["data_offsets"][0] + 4])),
                                     "tensor 'lm_head.weight' spans 4 bytes, its shape .* needs"),
    "unknown dtype": (_edit_entry(lambda e: e.update(dtype="F99")), "tensor 'lm_head.weight' has dtype 'F99', which torch cannot read"),
    "shape a string": (_edit_entry(lambda e: e.update(shape="x")), "tensor 'lm_head.weight' has shape 'x'"),
    "index weight_map a list": (_index(lambda keys: [1, 2]), "'weight_map' must map tensor names to shard file names, got list"),
    "index weight_map a string": (_index(lambda keys: "model.safetensors"), "'weight_map' must map .* got str"),
    "index shard a number": (_index(lambda keys: {key: 5 for key in keys}), "with values that are not file names"),
    "config dtype unknown": (_config(dtype="float99"), "config.json: 'dtype' is 'float99', not a torch dtype"),
    "config torch_dtype unknown": (_config(dtype=None, torch_dtype="float99"), "config.json: 'torch_dtype' is 'float99'"),
    "config dtype a list": (_config(dtype=[1]), "config.json: 'dtype' is \\[1\\], not a torch dtype"),
    "config dtype int8": (_config(dtype="int8"), "config.json names must be a dtype fxslice computes in .* got torch.int8"),
    "config with fewer layers than the shards": (_config(num_hidden_layers=1),
                                                 "holds 9 tensor\\(s\\) that the model config.json describes "
                                                 "\\(LlamaForCausalLM\\) has no parameter for: 'model.layers.1."),
    "NaN norm scale": (_tensor("model.layers.0.input_layernorm.weight", 3, float("nan")),
                       "norm 'model.layers.0.input_layernorm' .*its weight 'model.layers.0.input_layernorm.weight' is "
                       "not finite \\(nan at index \\[3\\]\\)"),
    "inf final norm scale": (_tensor("model.norm.weight", 0, float("inf")),
                             "its weight 'model.norm.weight' is not finite \\(inf at index \\[0\\]\\)"),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_hostile_checkpoint_is_refused_naming_what_is_wrong(checkpoint, tmp_path, name):
    change, message = CHECKPOINTS[name]
    hostile = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, hostile)
    change(hostile)
    offload = tmp_path / "offload"
    offload.mkdir()
    _refused(lambda: fxslice.compress(hostile, calibration(), 0.25, progress=False, offload_dir=offload), message,
             hostile)
    assert list(offload.iterdir()) == [], "the failed compression left offload files"


def test_a_non_finite_norm_scale_of_a_model_in_memory_is_named_too():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(FxSliceError, match="its weight 'model.layers.1.post_attention_layernorm.weight' is not finite"):
        fxslice.compress(model, calibration(), 0.25, progress=False)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.complex64, "float16", torch.Tensor])
def test_a_dtype_fxslice_cannot_compute_in_is_refused(checkpoint, dtype):
    _refused(lambda: fxslice.compress(checkpoint, calibration(), 0.25, progress=False, dtype=dtype),
             "dtype must be a dtype fxslice computes in \\(float32, bfloat16, float16, float64\\)", checkpoint)


def test_a_model_stored_in_float8_is_refused_before_capture():
    model = tiny_model("llama").to(torch.float8_e4m3fn)
    with pytest.raises(FxSliceError, match="the parameters of model LlamaForCausalLM must be a dtype fxslice computes "
                                           "in .* got torch.float8_e4m3fn; convert the model first"):
        fxslice.compress(model, calibration(), 0.25, progress=False)


@pytest.mark.parametrize("offload_dir, message", [
    (5, "offload_dir must be a folder path \\(str or os.PathLike\\), got int"),
    (["a"], "offload_dir must be a folder path .* got list"),
    (TESTS + "/test_errors_catalogue.py", "offload_dir .* is not an existing folder"),
])
def test_a_bad_offload_dir_is_refused_before_any_work(checkpoint, offload_dir, message):
    _refused(lambda: fxslice.compress(checkpoint, calibration(), 0.25, progress=False, offload_dir=offload_dir),
             message, checkpoint)


def test_cli_refuses_a_hostile_checkpoint_in_one_line(checkpoint, tmp_path):
    hostile = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, hostile)
    _config(dtype="float99")(hostile)  # read by the tokenizer before the checkpoint itself
    before = _files(hostile)
    done = _cli("compress", "--model", str(hostile), "--stream", "--no-save", "--no-eval", "--no-progress")
    _one_line(done, "config.json: 'dtype' is 'float99', not a torch dtype")
    assert _files(hostile) == before


@pytest.mark.slow  # one more CLI process per case
@pytest.mark.parametrize("name", ["no data_offsets", "index weight_map a list", "config with fewer layers than the shards",
                                  "NaN norm scale"])
def test_cli_refuses_each_hostile_checkpoint_in_one_line(checkpoint, tmp_path, name):
    change, message = CHECKPOINTS[name]
    hostile = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, hostile)
    change(hostile)
    before = _files(hostile)
    done = _cli("compress", "--model", str(hostile), "--stream", "--no-save", "--no-eval", "--no-progress",
                "--calibration-windows", "2", "--length", "16", "--offload-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fxslice: error:"), done.stderr[-2000:]
    import re
    assert re.search(message, errors[0]), errors[0]
    assert _files(hostile) == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


# --- token ids, sampling options -----------------------------------------------------------------------
BAD_IDS = {
    "id = vocab": (torch.tensor([[1, VOCAB]]), f"token id {VOCAB}, outside the vocabulary \\[0, {VOCAB}\\)"),
    "negative id": (torch.tensor([[-1, 2]]), "token id -1, outside the vocabulary"),
    "uint8 id past the vocabulary": (torch.tensor([[200]], dtype=torch.uint8), "token id 200, outside the vocabulary"),
    "boolean ids": (torch.tensor([[True, False]]), "input_ids must be an integer tensor .* got torch.bool"),
    "float ids": (torch.tensor([[1.0, 2.0]]), "input_ids must be an integer tensor .* got torch.float32"),
    "empty batch": (torch.zeros(0, 3, dtype=torch.long), "with B, T > 0, got torch.int64 of shape \\[0, 3\\]"),
    "no tokens": (torch.zeros(1, 0, dtype=torch.long), "with B, T > 0, got torch.int64 of shape \\[1, 0\\]"),
    "a list": ([[1, 2]], "input_ids must be an integer tensor .* got list"),
}


class KernelReached(AssertionError):
    pass


class _Runner:
    """Stands in for an AOTInductor model runner: any call is a kernel reached."""

    def load_constants(self, *args, **kwargs):
        pass

    def __call__(self, *inputs):
        raise KernelReached("a compiled kernel received the input")


def _never_runs(*args, **kwargs):
    raise KernelReached("the program received the input")


@pytest.fixture(scope="module")
def loaded(saved):
    return fxslice.load(saved)[0]


@pytest.mark.parametrize("name", list(BAD_IDS))
def test_bad_token_ids_never_reach_the_exported_programs(loaded, name, monkeypatch):
    ids, message = BAD_IDS[name]
    monkeypatch.setattr(loaded.program, "forward", _never_runs)
    monkeypatch.setattr(loaded.generator, "forward", _never_runs)
    with pytest.raises(FxSliceError, match=message):
        loaded(ids)
    with pytest.raises(FxSliceError, match=message):
        loaded.generate(ids, 2)


@pytest.mark.parametrize("name", list(BAD_IDS))
def test_bad_token_ids_never_reach_a_compiled_kernel(name):
    ids, message = BAD_IDS[name]
    program = CompiledProgram(_Runner(), {"weight": torch.zeros(1)}, vocab_size=VOCAB)
    with pytest.raises(FxSliceError, match=message):
        program(ids, torch.arange(2))


@pytest.mark.parametrize("options, message", [
    ({"seed": 1.5, "do_sample": True}, "seed must be an integer or None, got 1.5"),
    ({"seed": "1", "do_sample": True}, "seed must be an integer or None, got '1'"),
    ({"seed": True, "do_sample": True}, "seed must be an integer or None, got True"),
    ({"seed": 2**70, "do_sample": True}, "seed must be an integer or None, got 1180591620717411303424 \\(torch.Generator "
                                         "takes integers in \\[-9223372036854775808, 18446744073709551616\\)\\)"),
    ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),  # checked without sampling too
    ({"eos_token_id": VOCAB + 3}, f"eos_token_id must be None or a token id in \\[0, {VOCAB}\\)"),
    ({"eos_token_id": -1}, "eos_token_id must be None or a token id"),
    ({"eos_token_id": "x"}, "eos_token_id must be None or a token id .* got 'x'"),
    ({"do_sample": "yes"}, "do_sample must be True or False, got 'yes'"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature must be > 0 and finite, got inf"),
    ({"do_sample": True, "temperature": True}, "temperature must be > 0 and finite, got True"),
    ({"do_sample": True, "top_p": True}, "top_p must be in \\(0, 1\\], got True"),
])
def test_bad_generation_options_are_refused_before_any_step(loaded, options, message, monkeypatch):
    monkeypatch.setattr(loaded.generator, "forward", _never_runs)
    with pytest.raises(FxSliceError, match=message):
        loaded.generate(torch.tensor([[1, 2, 3]]), 2, **options)


def test_an_out_of_vocabulary_eos_never_reaches_the_padded_cache_rows(sliced):
    program = with_cache(sliced, batch_size=2, max_cache_len=16)  # one prompt: the second row is padding, finished
    with pytest.raises(FxSliceError, match="eos_token_id must be None or a token id"):
        generate(program, torch.tensor([[1, 2, 3]]), 4, eos_token_id=VOCAB + 1)
    assert generate(program, torch.tensor([[1, 2, 3]]), 4, eos_token_id=1).shape[0] == 1


@pytest.mark.slow  # a CLI subprocess (~5 s)
def test_cli_generate_refuses_a_seed_out_of_range(saved):
    _one_line(_cli("generate", str(saved), "--sample", "--seed", str(2**70), "--max-new-tokens", "2"),
              "seed must be an integer or None, got 1180591620717411303424")


@pytest.mark.slow
def test_cli_generate_refuses_an_empty_prompt(saved):
    _one_line(_cli("generate", str(saved), "--prompt", ""), "the prompt '' has no tokens")


@pytest.mark.slow  # AOTInductor compilation: about a minute on 2 cores
def test_the_compiled_package_checks_token_ids_before_its_kernels(saved, tmp_path):
    folder = tmp_path / "compiled"
    shutil.copytree(saved, folder)
    [outcome] = compile_folder(folder, ["cpu"], progress=False)
    assert outcome.failure is None, outcome.failure
    model, _ = fxslice.load(folder, compiled=True)
    assert model.compiled
    for name, (ids, message) in BAD_IDS.items():
        with pytest.raises(FxSliceError, match=message):
            model(ids)
        with pytest.raises(FxSliceError, match=message):
            model.generate(ids, 2)
        with pytest.raises(FxSliceError, match=message):  # the package's own models check too
            model.program(ids)
        with pytest.raises(FxSliceError, match=message):
            model.generator(ids, torch.arange(2))
    with pytest.raises(FxSliceError, match="seed must be an integer or None, got 0.5"):
        model.generate(torch.tensor([[1, 2]]), 2, do_sample=True, seed=0.5)
    assert model.generate(torch.tensor([[1, 2]]), 2).shape == (1, 4)


# --- distributed -----------------------------------------------------------------------------------------
def _empty_shard_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fxslice.distributed import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = calibration(batches=2)[rank::2] if rank == 0 else []  # rank 1 receives no calibration window
        try:
            fxslice.compress(tiny_model("llama"), shard, 0.25, progress=False)
            message = "no error"
        except FxSliceError as exc:
            message = f"{type(exc).__name__}: {exc}"
        Path(out_dir, f"error{rank}.txt").write_text(message)
    finally:
        shutdown()


@pytest.mark.slow  # two gloo processes
def test_a_rank_without_calibration_windows_stops_every_rank_with_one_message(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_empty_shard_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    assert messages[0].split(": ", 1)[1] == messages[1].split(": ", 1)[1], messages
    assert messages[1].startswith("CalibrationError: rank 1 of 2 failed, every rank stops: calib_loader yielded no "
                                  "batches on rank 1 of 2"), messages
    assert messages[0].startswith("FxSliceError: rank 1 of 2 failed")


def _launch_two(args: list[str], tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Two CLI ranks started as srun or mpirun would: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, no
    torchrun (LOCAL_RANK, TORCHELASTIC_*) variables."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK" and not k.startswith("TORCHELASTIC")}
    processes = [subprocess.Popen([sys.executable, "-m", "fxslice.cli", "--threads", "1", *args], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                                  env={**base, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)})
                 for rank in range(2)]
    done = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


@pytest.mark.slow  # two CLI processes per case
@pytest.mark.parametrize("case", ["one window for two ranks", "rank 0 refuses the output folder"])
def test_ranks_started_without_torchrun_all_exit_with_the_same_message(checkpoint, tmp_path, case):
    common = ["compress", "--model", str(checkpoint), "--stream", "--no-eval", "--no-progress", "--length", "16",
              "--batch-size", "1"]
    if case == "one window for two ranks":
        args, message = common + ["--calibration-windows", "1", "--no-save"], "1 calibration window(s) for 2 processes"
    else:
        taken = tmp_path / "taken"
        taken.mkdir()
        (taken / "notes.txt").write_text("precious")
        args = common + ["--calibration-windows", "2", "--output", str(taken), "--overwrite"]
        message = "rank 0 of 2 failed, every rank stops: " + str(taken) + " is a folder fxslice did not write"
    ranks = _launch_two(args, tmp_path)
    lines = []
    for done in ranks:
        _one_line(done, message)
        lines.append(next(line for line in done.stderr.splitlines() if "error:" in line))
    assert lines[0] == lines[1]
    if case != "one window for two ranks":
        assert (tmp_path / "taken" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='5' in the environment is "
                                                                                       "not a rank in \\[0, 2\\)"),
])
def test_a_half_described_process_group_is_one_clear_error(monkeypatch, environment, message):
    from fxslice.distributed import init_from_environment

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FxSliceError, match=message):
        init_from_environment("cpu")


def test_without_a_process_group_raise_together_raises_the_error_itself():
    from fxslice.distributed import raise_together

    error = CalibrationError("calibration batch 3: token id 999 is outside the vocabulary [0, 128)")
    with pytest.raises(CalibrationError) as raised:
        raise_together(error)
    assert raised.value is error
    raise_together(None)
