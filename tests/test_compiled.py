"""AOTInductor packages of a saved folder: same logits and tokens as the exported programs, weights
not duplicated, loadable without fxslice or transformers, clear errors and a fallback on failure."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxslice
from fxslice.cli import main
from fxslice.errors import FxSliceError
from fxslice.runtime.compiled import compile_folder
from fxslice.runtime.generate import generate, with_cache
from tiny_models import VOCAB, calibration, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow  # AOTInductor compiles: minutes on 2 cores

README = Path(__file__).resolve().parents[1] / "README.md"
IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def compiled_folder(tmp_path_factory):
    """A 25% slice of tiny Llama (tied head, block basis, a quarter of the MLP units and of the attention
    values, queries and keys cut: narrower heads and KV cache) saved with a batch-2 KV cache, compiled for the CPU."""
    model = tiny_model("llama_tied")
    sliced = fxslice.compress(model, calibration(), 0.25, basis="block", hidden_sparsity=0.25, value_sparsity=0.25,
                              key_sparsity=0.25, progress=False)
    assert sliced.fxslice.value_widths and sliced.fxslice.key_widths
    generator = with_cache(sliced, batch_size=2, max_cache_len=32)
    folder = fxslice.save(sliced, tmp_path_factory.mktemp("compiled") / "sliced", tiny_tokenizer(), generator=generator)
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    [outcome] = compile_folder(folder, ["cpu"], progress=False)
    assert outcome.failure is None and outcome.package == folder / "compiled-cpu.pt2"
    return folder, before


def test_compiled_package_matches_the_exported_programs(compiled_folder):
    folder, _ = compiled_folder
    eager, _ = fxslice.load(folder, compiled=False)
    compiled, _ = fxslice.load(folder)
    assert compiled.compiled and not eager.compiled
    with torch.no_grad():
        for ids in (IDS, IDS[:1, :5], IDS[:2, 3:]):  # other batch sizes and lengths; non-contiguous views
            assert (compiled(ids).logits - eager(ids).logits).abs().max() < 1e-4
    for prompt in (IDS[:1, :7], IDS[:2, :6]):  # one row (padded to the cache's two) and two rows
        assert torch.equal(compiled.generate(prompt, 12), eager.generate(prompt, 12))


def test_compiled_weights_come_from_the_folder_files(compiled_folder):
    folder, before = compiled_folder
    after = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {k: v for k, v in after.items() if k not in ("compiled-cpu.pt2", "fxslice.json")} == \
        {k: v for k, v in before.items() if k != "fxslice.json"}
    record = json.loads((folder / "fxslice.json").read_text())
    entry = record["compiled"]["cpu"]
    assert set(entry["constants"]) == {"model", "generate"}
    stored = set(record["weights"]["weight_map"]) | set(record["weights"]["zeros"])
    assert all(key in stored for keys in entry["constants"].values() for key in keys.values())
    weights = sum(p.stat().st_size for p in folder.glob("weights*.safetensors"))
    assert (folder / "compiled-cpu.pt2").stat().st_size < 20 * 2**20  # code only: the tiny weights are not inside
    assert weights > 0


def _deploy_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- deploy-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README's Deploy section lost its snippet"
    return match.group(1)


def test_readme_snippet_runs_the_package_without_fxslice_or_transformers(compiled_folder, tmp_path):
    folder, _ = compiled_folder
    snippet = _deploy_snippet()
    assert 'folder = "runs/smollm2-135m-0.25"' in snippet
    script = tmp_path / "deploy.py"
    script.write_text("import sys\nsys.modules['fxslice'] = None\nsys.modules['transformers'] = None\n"
                      + snippet.replace('"runs/smollm2-135m-0.25"', repr(str(folder)))
                      + "\nimport json as _json\nprint(_json.dumps({'tokens': tokens.tolist(), 'ids': ids.tolist()}))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    ids = torch.tensor(out["ids"])
    eager, _ = fxslice.load(folder, compiled=False)
    assert out["tokens"] == eager.generate(ids, len(out["tokens"][0]) - ids.shape[1]).tolist()


def test_cli_generate_and_eval_use_the_package(compiled_folder, capsys):
    folder, _ = compiled_folder
    assert main(["generate", str(folder), "--prompt", "And God said", "--max-new-tokens", "4"]) == 0
    from fxslice.jobs.generation import generate_job
    from fxslice.runtime.load import load

    assert load(folder)[0].compiled
    assert generate_job(str(folder), "In the beginning", 3).new_tokens == 3


def test_limits_of_the_cache_are_named(compiled_folder):
    folder, _ = compiled_folder
    model, _ = fxslice.load(folder)
    with pytest.raises(FxSliceError, match="holds at most 2 sequence.*--cache-batch-size"):
        model.generate(IDS, 2)
    with pytest.raises(FxSliceError, match="prompt has 40 tokens, more than the KV cache length 32.*--max-cache-len"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 1)
    with pytest.raises(FxSliceError, match="needs 35 cache slots.*at most 22 new tokens"):
        model.generate(IDS[:1], 25)


def test_packages_of_another_torch_or_device_are_refused(compiled_folder, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(compiled_folder[0], folder)
    with pytest.raises(FxSliceError, match="no package compiled for cuda \\(built: cpu\\).*fxslice compile"):
        fxslice.load(folder, device="cuda", compiled=True)  # refused before anything moves to the device
    record_path = folder / "fxslice.json"
    record = json.loads(record_path.read_text())
    record["compiled"]["cpu"]["torch_version"] = "1.0.0"
    record_path.write_text(json.dumps(record))
    with pytest.raises(FxSliceError, match="built with torch 1.0.0.*fxslice compile"):
        fxslice.load(folder)
    assert not fxslice.load(folder, compiled=False)[0].compiled
    record["compiled"]["cpu"]["torch_version"] = torch.__version__
    record_path.write_text(json.dumps(record))
    (folder / "compiled-cpu.pt2").write_bytes(b"not a package")
    with pytest.raises(FxSliceError, match="does not match the checksum"):
        fxslice.load(folder)


def test_compiler_failure_falls_back_with_one_warning(tmp_path, monkeypatch, capsys):
    model = tiny_model("gpt2")
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    folder = fxslice.save(sliced, tmp_path / "sliced")
    record_before = (folder / "fxslice.json").read_text()
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    assert main(["compile", str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxslice: warning: AOTInductor compilation for cpu failed") \
        and "keeps using its exported programs" in err[0]
    assert (folder / "fxslice.json").read_text() == record_before and not (folder / "compiled-cpu.pt2").exists()
    loaded, _ = fxslice.load(folder)
    assert not loaded.compiled
    with pytest.raises(FxSliceError, match="no package compiled for cpu \\(built: none\\)"):
        fxslice.load(folder, compiled=True)


def test_compile_refuses_what_is_not_a_saved_folder(tmp_path):
    with pytest.raises(FxSliceError, match="no fxslice.json"):
        compile_folder(tmp_path)
    (tmp_path / "fxslice.json").write_text("{}")
    with pytest.raises(FxSliceError, match="format"):
        compile_folder(tmp_path)


def test_compile_checks_every_device_before_compiling(compiled_folder):
    folder, _ = compiled_folder
    record = (folder / "fxslice.json").read_text()
    with pytest.raises(FxSliceError, match="AOTInductor packages are built for cpu or cuda, not 'meta'"):
        compile_folder(folder, ["cpu", "meta"], progress=False)
    with pytest.raises(FxSliceError, match="'nonsense' is not a torch device"):
        compile_folder(folder, ["nonsense"], progress=False)
    assert (folder / "fxslice.json").read_text() == record


@pytest.mark.parametrize("family", ["gpt2"])
def test_compiled_greedy_tokens_equal_hugging_face_at_sparsity_zero(family, tmp_path):
    model = tiny_model(family)
    sliced = fxslice.compress(model, calibration(), 0.0, progress=False)
    folder = fxslice.save(sliced, tmp_path / "dense", generator=with_cache(sliced, max_cache_len=32))
    assert compile_folder(folder, ["cpu"], progress=False)[0].failure is None
    compiled, _ = fxslice.load(folder)
    assert compiled.compiled
    prompt = IDS[:1, :7]
    reference = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(compiled.generate(prompt, 12), reference)
    assert torch.equal(generate(compiled.generator, prompt, 12), reference)
