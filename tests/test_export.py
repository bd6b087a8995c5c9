"""Saving, loading (with and without fxslice), atomicity and corruption handling; the CLI."""

import json
import subprocess
import zipfile
import sys

import pytest
import torch

import fxslice
from fxslice.errors import FxSliceError
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from tiny_models import VOCAB, calibration, tiny_model, tiny_tokenizer

IDS = [torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (5, 21))]


@pytest.fixture(scope="module")
def sliced():
    return fxslice.compress(tiny_model("gemma3_text"), calibration(), 0.25, progress=False)


@pytest.fixture(scope="module")
def saved(sliced, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "gemma3-tiny-0.25"
    return save(sliced, folder, record={"source_model": "tiny gemma3", "sparsity": 0.25, "widths": sliced.fxslice.widths}, max_cache_len=0)


def test_roundtrip_matches_the_sliced_graph(sliced, saved):
    assert {p.name for p in saved.iterdir()} >= {"model.pt2", "fxslice.json", "weights.safetensors"}
    weight_bytes = sum(p.numel() * p.element_size() for p in sliced.parameters())
    assert (saved / "weights.safetensors").stat().st_size <= 1.05 * weight_bytes + 4096  # stored once
    with zipfile.ZipFile(saved / "model.pt2") as archive:  # the program holds no weight bytes
        assert sum(i.file_size for i in archive.infolist() if "/data/weights/weight_" in f"/{i.filename}") == 0
    record = json.loads((saved / "fxslice.json").read_text())
    assert record["widths"] == sliced.fxslice.widths and record["vocab_size"] == VOCAB
    model, tokenizer = load(saved)
    assert tokenizer is None
    for ids in IDS:  # dynamic batch and length
        expected = sliced(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_plain_torch_loads_the_program_without_fxslice_or_model_code(sliced, saved):
    ids = IDS[1]
    expected = sliced(ids).logits
    script = (  # the README's "Deploy" recipe: the program, then its weights from the safetensors files
        "import json, sys, torch\n"
        "from safetensors.torch import load_file\n"
        f"folder = {str(saved)!r}\n"
        "index = json.load(open(folder + '/fxslice.json'))['weights']\n"
        "stored = {}\n"
        "for name in set(index['weight_map'].values()):\n"
        "    stored.update(load_file(folder + '/' + name))\n"
        "stored.update({k: torch.zeros(v['shape'], dtype=getattr(torch, v['dtype'])) for k, v in index['zeros'].items()})\n"
        "program = torch.export.load(folder + '/model.pt2')\n"
        "for name, key in index['programs']['model.pt2'].items():\n"
        "    is_param = isinstance(program.state_dict[name], torch.nn.Parameter)\n"
        "    program.state_dict[name] = torch.nn.Parameter(stored[key], requires_grad=False) if is_param else stored[key]\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "logits = program.module()(ids)\n"
        "assert 'fxslice' not in sys.modules and 'transformers' not in sys.modules, 'extra imports'\n"
        "torch.save(logits, sys.argv[1])\n"
    )
    out = saved.parent / "plain_logits.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=saved.parent)
    assert torch.allclose(torch.load(out), expected, atol=1e-5)


def test_existing_folder_needs_overwrite(sliced, saved):
    with pytest.raises(FxSliceError, match="already exists"):
        save(sliced, saved, max_cache_len=0)
    save(sliced, saved, overwrite=True, record={"sparsity": 0.25}, max_cache_len=0)
    assert load(saved)[0].record["sparsity"] == 0.25
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_nothing_behind(sliced, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save(sliced, tmp_path / "never", max_cache_len=0)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_or_mismatched_folders_are_refused(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    data = bytearray((broken / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(FxSliceError, match="corrupted"):
        load(broken)
    record = json.loads((saved / "fxslice.json").read_text())
    for change, message in [({"format_version": 99}, "format version"), ({"format": "other"}, "format")]:
        shutil.rmtree(broken)
        shutil.copytree(saved, broken)
        (broken / "fxslice.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(FxSliceError, match=message):
            load(broken)
    (broken / "fxslice.json").write_text("{not json")
    with pytest.raises(FxSliceError, match="corrupted"):
        load(broken)
    (broken / "fxslice.json").unlink()
    with pytest.raises(FxSliceError, match="not a folder saved by fxslice"):
        load(broken)
    with pytest.raises(FxSliceError, match="not a folder"):
        load(tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved like a hub model, with a small BPE tokenizer trained on KJV text."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_model("llama_tied").save_pretrained(folder)
    tokenizer = tiny_tokenizer(VOCAB)
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(folder)
    return folder


def test_tokenizer_larger_than_vocabulary_is_refused(sliced, tmp_path):
    folder = save(sliced, tmp_path / "mismatch", tokenizer=tiny_tokenizer(VOCAB + 60),
                  record={"sparsity": 0.25}, max_cache_len=0)
    with pytest.raises(FxSliceError, match="vocabulary"):
        load(folder)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fxslice.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_compress_eval_inspect(tiny_folder, tmp_path):
    out = tmp_path / "sliced"
    data = ["--calibration", "kjv", "--calibration-windows", "4", "--eval", "kjv", "stdlib", "--eval-windows", "2",
            "--length", "32", "--no-progress"]
    done = _cli("compress", "--model", str(tiny_folder), "--sparsity", "0.25", "--output", str(out), "--batch-size", "2",
                "--compile", "cpu", "--cache-batch-size", "2", "--max-cache-len", "48", *data)
    assert done.returncode == 0, done.stderr
    assert "ppl kjv" in done.stdout and "sliced 0.25" in done.stdout and "dense" in done.stdout
    assert f"compiled for cpu: {out / 'compiled-cpu.pt2'}" in done.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert record["calibration"]["calibration_windows"] == 4 and record["widths"][0] == 48
    assert record["generator"] == {**record["generator"], "batch_size": 2, "max_cache_len": 48}
    assert set(record["compiled"]["cpu"]["constants"]) == {"model", "generate"}
    evaluated = _cli("eval", str(out), "--eval", "kjv", "--eval-windows", "2", "--length", "32", "--no-progress",
                     "--calibration", "kjv", "--calibration-windows", "4")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{record['perplexity']['kjv']:.3f}" in evaluated.stdout  # through the compiled package
    generated = _cli("generate", str(out), "--prompt", "And God said", "--max-new-tokens", "60")
    assert generated.returncode == 2 and generated.stderr.count("\n") == 1
    assert "more than the KV cache length 48" in generated.stderr and "--max-cache-len" in generated.stderr
    inspected = _cli("inspect", str(tiny_folder))
    assert inspected.returncode == 0 and "model.layers.1.mlp.{gate_proj,up_proj}" in inspected.stdout
    again = _cli("compress", "--model", str(tiny_folder), "--output", str(out), *data)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = _cli("compress", "--model", str(tiny_folder), "--sparsity", "1.2", "--no-save", *data)
    assert bad.returncode == 2 and "sparsity must be a number in [0, 1)" in bad.stderr
    budget = _cli("compress", "--model", str(tiny_folder), "--target-params", "0.8", "--no-save", "--no-dense",
                  "--json", str(tmp_path / "budget.json"), *data)
    assert budget.returncode == 0, budget.stderr
    assert "sliced ≤80% params" in budget.stdout
    figures = json.loads((tmp_path / "budget.json").read_text())
    assert 0.795 <= figures["param_count"] / figures["dense_param_count"] <= 0.8 and figures["hidden_widths"]
    both = _cli("compress", "--model", str(tiny_folder), "--target-params", "0.8", "--sparsity", "0.2", "--no-save",
                *data)
    assert both.returncode == 2 and "not both" in both.stderr and both.stderr.count("\n") == 1


@pytest.mark.slow
def test_cli_streams_a_checkpoint_alone_and_on_two_torchrun_processes(tiny_folder, tmp_path):
    data = ["--calibration", "kjv", "--calibration-windows", "4", "--eval", "kjv", "--eval-windows", "2",
            "--length", "32", "--batch-size", "1", "--no-progress", "--max-cache-len", "64", "--no-compile"]
    one = _cli("compress", "--model", str(tiny_folder), "--stream", "--output", str(tmp_path / "one"), *data)
    assert one.returncode == 0, one.stderr
    assert "sliced 0.25" in one.stdout and "| dense" not in one.stdout  # the dense model is never loaded
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "fxslice", "compress", "--model", str(tiny_folder), "--stream",
                          "--output", str(tmp_path / "two"), *data], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("sliced 0.25") == 1  # rank 0 alone prints and writes
    first, second = (json.loads((tmp_path / n / "fxslice.json").read_text()) for n in ("one", "two"))
    assert second["calibration"]["processes"] == 2 and first["calibration"]["processes"] == 1
    assert first["calibration"]["tokens"] == second["calibration"]["tokens"] == 4 * 32
    assert first["widths"] == second["widths"] and first["param_count"] == second["param_count"]
    assert abs(first["perplexity"]["kjv"] - second["perplexity"]["kjv"]) < 1e-3 * first["perplexity"]["kjv"]


@pytest.mark.slow
def test_cli_help_documents_every_option():
    import argparse

    from fxslice.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"compress", "eval", "finetune", "quantize", "generate", "compile",
                                    "inspect"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"fxslice {name} {action.option_strings or action.dest} has no help text"
        done = _cli(name, "--help")
        assert done.returncode == 0 and f"usage: fxslice {name}" in done.stdout


def test_every_saved_file_gets_the_users_umask(tmp_path):
    """safetensors writes private files; a saved folder is as readable as any file the user creates."""
    import os
    import stat

    sliced = fxslice.compress(tiny_model("llama"), calibration(), 0.25, progress=False)
    previous = os.umask(0o022)
    try:
        folder = save(sliced, tmp_path / "shared", max_cache_len=16)
    finally:
        os.umask(previous)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.pt2", "generate.pt2", "weights.safetensors", "fxslice.json"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", pytest.param("/etc/passwd", marks=pytest.mark.slow),
                                  pytest.param("shards/../../x.safetensors", marks=pytest.mark.slow), 7])
def test_a_record_pointing_outside_the_folder_is_refused_before_opening_it(name, tmp_path):
    sliced = fxslice.compress(tiny_model("llama"), calibration(), 0.25, progress=False)
    folder = save(sliced, tmp_path / "m", max_cache_len=0)
    record = json.loads((folder / "fxslice.json").read_text())
    key = next(iter(record["weights"]["weight_map"]))
    record["weights"]["weight_map"][key] = name
    (folder / "fxslice.json").write_text(json.dumps(record))
    with pytest.raises(FxSliceError, match=r"outside the folder|not a file name"):
        load(folder)
