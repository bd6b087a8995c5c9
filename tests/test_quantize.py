"""Weight-only quantisation of a slice (pass 8, ``fxslice quantize``): close to the float slice, the
caller's model untouched, every quantised module equal to torchao's dequantised weight, saved once,
loaded and generated from (exported and compiled), and clear errors for what it cannot do."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import FxSliceError
from fxslice.graph.quantized import QUANTIZED_LINEARS, HalfWeightLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from fxslice.passes.p8_quantize import quantize, quantize_modules
from fxslice.runtime.quantize import quantize_folder
from tiny_models import VOCAB, calibration, masked_calibration, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
# relative logit error ‖quantised − float‖ / ‖float‖ of random tiny models (int4: 4-bit groups of Gaussian weights)
BOUND = {"int8": 0.05, "int4": 0.3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _close_cases():
    """Every family × dtype × scheme; the quick profile keeps every family in one of them, and both
    dtypes and schemes on llama and gpt2."""
    for family in ("llama", "qwen3", "gpt2", "falcon_old", "olmo2", "phi"):
        for index, (dtype, scheme) in enumerate([(torch.float32, "int8"), (torch.bfloat16, "int8"),
                                                 (torch.float32, "int4"), (torch.bfloat16, "int4")]):
            quick = family in ("llama", "gpt2") or index == ("qwen3", "falcon_old", "olmo2", "phi").index(family)
            yield pytest.param(family, dtype, scheme, marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("family, dtype, scheme", list(_close_cases()))
def test_quantised_slice_is_close_and_the_caller_untouched(family, dtype, scheme):
    model = tiny_model(family, dtype=dtype)
    sliced = fxslice.compress(model, masked_calibration(), 0.5, progress=False)  # width 32: int4 groups fit
    before, reference = _state(sliced), sliced(IDS).logits
    quantized = quantize(sliced, scheme)
    assert all(torch.equal(before[k], v) for k, v in sliced.state_dict().items())  # the float slice as it was
    assert not any(isinstance(m, QUANTIZED_LINEARS) for m in sliced.modules())
    report = quantized.fxslice.quantization
    assert report["scheme"] == scheme and report["modules"] and report["quantized_bytes"] < report["float_bytes"]
    assert scheme in report["modules"].values()
    for name in sliced.fxslice.head + [m.name for m in sliced.fxslice.inserted]:  # off the integer grid
        assert report["modules"].get(name, "bfloat16") == "bfloat16" and "dominant entry" in report["kept_float"][name]
        assert isinstance(quantized.get_submodule(name), HalfWeightLinear if dtype == torch.float32 else nn.Linear)
    out = quantized(IDS).logits
    assert out.dtype == reference.dtype and torch.isfinite(out).all()
    assert _rel(out, reference) < BOUND[scheme] * (2 if dtype == torch.bfloat16 else 1)
    # exactly the model with the dequantised weights, but for the kernels' bfloat16 activations
    assert _rel(out, _dequantized_copy(quantized)(IDS).logits) < 0.03
    assert quantized.fxslice.widths == sliced.fxslice.widths  # the slice itself is not touched


def _dequantized_copy(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` with every quantised module replaced by an ``nn.Linear`` holding its dequantised weight
    (each kernel applied to the identity in float32: ``Ŵᵀ``)."""
    import copy

    plain = copy.deepcopy(graph)
    for name, module in list(plain.named_modules()):
        if not isinstance(module, QUANTIZED_LINEARS):
            continue
        if isinstance(module, HalfWeightLinear):
            plain.set_submodule(name, _Cast(_linear(module.weight.float(), module.bias)))
            continue
        eye = torch.eye(module.padded_features)
        if isinstance(module, Int8WeightOnlyLinear):
            weight = torch.ops.aten._weight_int8pack_mm(eye, module.qdata, module.scale.float()).t()
        else:
            weight = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, module.qdata, module.group_size,
                                                                 module.scale_and_zero.float()).t()
        plain.set_submodule(name, _Cast(_linear(weight[:, :module.in_features], module.bias)))
    return plain


def _linear(weight: torch.Tensor, bias) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


class _Cast(nn.Module):
    """A float32 Linear applied to any input dtype, the result in that dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.float()).to(x.dtype)


def _symmetric_linear(rows: int, inputs: int, seed: int = 0) -> nn.Linear:
    """A Linear whose weight the int8 grid holds exactly: W = q · s, |q| ≤ 127, each row reaching 127."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, inputs), generator=generator).float()
    q[:, 0] = 127
    scale = torch.rand(rows, 1, generator=generator) / 50 + 1e-3
    linear = nn.Linear(inputs, rows)
    with torch.no_grad():
        linear.weight.copy_(q * scale)
    return linear


def test_int8_of_a_weight_on_the_grid_is_exact():
    linear = _symmetric_linear(48, 64)
    graph = torch.fx.symbolic_trace(nn.Sequential(linear))
    report = quantize_modules(graph, "int8")
    module = graph.get_submodule("0")
    assert isinstance(module, Int8WeightOnlyLinear) and report.formats == {"0": "int8"}
    x = torch.randn(7, 64).bfloat16()
    with torch.no_grad():
        got = module(x)
        want = nn.functional.linear(x.float(), linear.weight, linear.bias)
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()  # bf16 activations and output only


def test_widths_the_kernels_cannot_take_are_padded_or_take_int8_and_the_report_says_so():
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 24), nn.Linear(24, 32))  # inputs 40, 24; 24 rows
    x = torch.randn(3, 40)
    for scheme in ("int8", "int4"):
        graph = torch.fx.symbolic_trace(model)
        report = quantize_modules(graph, scheme)
        first, last = graph.get_submodule("0"), graph.get_submodule("2")
        assert (first.in_features, first.padded_features) == (40, 48 if scheme == "int8" else 64)
        assert (last.in_features, last.padded_features) == (24, 32)
        if scheme == "int4":
            assert report.formats == {"0": "int4", "1": "int8", "2": "int4"}
            assert "int8 instead of int4: int4 needs rows % 16 == 0" in report.kept["1"]
        else:
            assert report.formats == {"0": "int8", "1": "int8", "2": "int8"} and not report.kept
        assert _rel(graph(x), model(x)) < BOUND[scheme]
        assert _rel(graph(x), _dequantized_copy(graph)(x)) < 0.03


def test_int4_groups_and_rows_that_fit():
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(128, 32, bias=False)))
    report = quantize_modules(graph, "int4", group_size=64)
    module = graph.get_submodule("0")
    assert isinstance(module, Int4WeightOnlyLinear) and module.group_size == 64 and not report.kept
    assert report.quantized_bytes < 128 * 32 * 4 / 6  # 4 bits a weight, plus a scale and zero per 64


def test_mixture_of_experts_keeps_its_grouped_experts_in_float():
    model = tiny_model("mixtral")
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    quantized = quantize(sliced, "int8")
    kept = quantized.fxslice.quantization["kept_float"]
    experts = {name: why for name, why in kept.items() if "experts" in name}
    assert experts and all("ExpertLinear (not a plain Linear)" == why for why in experts.values())
    assert any(name.endswith("gate") and fmt == "int8" for name, fmt in
               quantized.fxslice.quantization["modules"].items())  # the router is a plain Linear
    assert _rel(quantized(IDS).logits, sliced(IDS).logits) < BOUND["int8"]


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    sliced = fxslice.compress(tiny_model("llama_tied"), calibration(), 0.5, progress=False)
    return fxslice.save(sliced, tmp_path_factory.mktemp("q") / "float", tiny_tokenizer(), max_cache_len=32), sliced


@pytest.mark.parametrize("scheme", ["int8", pytest.param("int4", marks=pytest.mark.slow)])  # int4: the same path
def test_quantised_folder_round_trip_stores_weights_once_and_generates(float_folder, tmp_path, scheme):
    folder, sliced = float_folder
    direct = fxslice.save(quantize(sliced, scheme), tmp_path / "direct", tiny_tokenizer(), max_cache_len=32)
    path, _, quantized, _ = quantize_folder(folder, scheme, tmp_path / "q")
    for saved in (direct, path):
        record = json.loads((saved / "fxslice.json").read_text())
        assert record["quantization"]["scheme"] == scheme and record["dtype"] == "float32"
        loaded, tokenizer = fxslice.load(saved)
        assert tokenizer is not None and not loaded.compiled
        with torch.no_grad():
            logits = loaded(IDS).logits
            assert torch.equal(logits, quantized(IDS))  # the folder's program is the quantised graph
            prompt = IDS[:1, :5]
            tokens = loaded.generate(prompt, 6)
            ids = prompt
            for _ in range(6):  # greedy by full-sequence calls of the quantised graph
                ids = torch.cat([ids, quantized(ids)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(tokens, ids)
        # every quantised tensor is stored once, for both programs
        weights = record["weights"]
        keys = [k for k in weights["weight_map"] if k.endswith(".qdata")]
        assert keys and len(keys) == len(set(keys))
        assert set(weights["programs"]["generate.pt2"].values()) >= set(keys)
        size = (saved / "weights.safetensors").stat().st_size
        assert size < 0.6 * (folder / "weights.safetensors").stat().st_size


@pytest.mark.slow
def test_a_quantised_folder_is_not_quantised_fine_tuned_or_moved_again(float_folder, tmp_path):
    folder, _ = float_folder
    path, *_ = quantize_folder(folder, "int8", tmp_path / "q8")
    with pytest.raises(FxSliceError, match="quantised already .*quantise the float folder"):
        quantize_folder(path, "int8", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    with pytest.raises(FxSliceError, match="quantised already .*fine-tune the float folder"):
        from fxslice.jobs.finetune import finetune_job
        from fxslice.jobs.data import Protocol

        finetune_job(str(path), Protocol())
    with pytest.raises(FxSliceError, match="packed for cpu kernels; it cannot run on cuda"):
        fxslice.load(path, device="cuda")
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 32)))
    quantize_modules(graph, "int8")
    with pytest.raises(FxSliceError, match="module '0' is quantised already"):
        quantize_modules(graph, "int8")


@pytest.mark.parametrize("scheme, group_size, message", [
    ("int3", 32, "scheme must be one of ('int8', 'int4'), got 'int3'"),
    ("int4", 48, "group_size must be 32, 64, 128 or 256"),
    ("int4", True, "group_size must be 32, 64, 128 or 256"),
])
def test_bad_schemes_are_refused_before_any_work(float_folder, tmp_path, scheme, group_size, message):
    folder, sliced = float_folder
    with pytest.raises(FxSliceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize(sliced, scheme, group_size=group_size)
    with pytest.raises(FxSliceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize_folder(folder, scheme, tmp_path / "out", group_size=group_size)
    assert not (tmp_path / "out").exists()


def test_a_platform_without_the_scheme_and_a_missing_torchao_are_named(float_folder, monkeypatch):
    _, sliced = float_folder
    with pytest.raises(FxSliceError, match="cannot run on meta"):
        from fxslice.passes.p8_quantize import check_scheme

        check_scheme("int8", "meta")
    with pytest.raises(FxSliceError, match="expects the GraphModule"):
        quantize(nn.Linear(4, 4), "int8")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    with pytest.raises(FxSliceError, match="needs the package torchao"):
        quantize(sliced, "int8")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fxslice.cli", *args], capture_output=True, text=True)


@pytest.mark.slow  # subprocess CLI runs (~11 s); the refusals themselves are tested in-process above
def test_cli_quantize_refuses_in_one_line(float_folder, tmp_path):
    folder, _ = float_folder
    bad = _cli("quantize", str(folder), "--scheme", "int2")
    assert bad.returncode == 2 and "invalid choice: 'int2'" in bad.stderr
    missing = _cli("quantize", str(tmp_path / "nothing"), "--no-eval", "--no-compile")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    path, *_ = quantize_folder(folder, "int8", tmp_path / "q8")
    again = _cli("quantize", str(path), "--no-eval", "--no-compile")
    assert again.returncode == 2 and "quantised already" in again.stderr and again.stderr.count("\n") == 1


def test_compile_is_the_default_when_a_compiler_is_found(monkeypatch, capsys):
    from fxslice import cli

    parse = cli.build_parser().parse_args
    assert cli._compile_devices(parse(["compress"])) == []  # g++ is on this machine: the default devices
    assert cli._compile_devices(parse(["compress", "--compile", "cpu"])) == ["cpu"]
    assert cli._compile_devices(parse(["compress", "--no-compile"])) is None
    assert cli._compile_devices(parse(["quantize", "folder"])) == []
    with pytest.raises(FxSliceError, match="contradict"):
        cli._compile_devices(parse(["compress", "--compile", "cpu", "--no-compile"]))
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))  # what inductor searches ($CXX at import)
    assert cli._compile_devices(parse(["compress"])) is None
    assert "no C++ compiler found" in capsys.readouterr().err


@pytest.mark.slow  # one CLI compression, evaluation and quantisation of a tiny hub-style folder
def test_cli_compress_quantize_prints_the_quantised_row(tmp_path):
    source = tmp_path / "hf"
    tiny_model("llama_tied").save_pretrained(source)
    tiny_tokenizer(VOCAB).save_pretrained(source)
    data = ["--calibration", "kjv", "--calibration-windows", "4", "--eval", "kjv", "--eval-windows", "2",
            "--length", "32", "--no-progress", "--batch-size", "2", "--no-compile", "--max-cache-len", "48"]
    out = tmp_path / "sliced"
    done = _cli("compress", "--model", str(source), "--sparsity", "0.5", "--output", str(out), "--quantize", "int8",
                *data)
    assert done.returncode == 0, done.stderr
    assert "sliced 0.5 + int8" in done.stdout and "kept in float" in done.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert record["quantization"]["scheme"] == "int8"
    assert set(record["perplexity"]) == set(record["perplexity_before_quantization"]) == {"kjv"}
    generated = _cli("generate", str(out), "--prompt", "And God said", "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr


@pytest.mark.slow  # AOTInductor compiles
def test_compiled_quantised_folder_matches_its_exported_programs(float_folder, tmp_path):
    from fxslice.runtime.compiled import compile_folder

    folder, _ = float_folder
    path, *_ = quantize_folder(folder, "int8", tmp_path / "q8")
    [outcome] = compile_folder(path, progress=False)
    assert outcome.failure is None, outcome.failure
    eager, _ = fxslice.load(path, compiled=False)
    compiled, _ = fxslice.load(path)
    assert compiled.compiled
    with torch.no_grad():
        for ids in (IDS, IDS[:1, :4]):
            assert _rel(compiled(ids).logits, eager(ids).logits) < 1e-2
    assert torch.equal(compiled.generate(IDS[:1, :5], 6), eager.generate(IDS[:1, :5], 6))


@pytest.mark.slow  # the int8 round trip keeps quantised folders in the quick profile
def test_an_int4_folder_skips_compilation_with_the_reason_and_compile_asked_fails(float_folder, tmp_path):
    from fxslice.runtime.compiled import compile_folder

    folder, _ = float_folder
    path, *_ = quantize_folder(folder, "int4", tmp_path / "q4")
    before = sorted(p.name for p in path.iterdir())
    [outcome] = compile_folder(path, ["cpu"], progress=False)
    assert outcome.failure is None and outcome.package is None
    assert "scheme int4: AOTInductor lowers the int4 kernel" in outcome.skipped
    assert sorted(p.name for p in path.iterdir()) == before  # nothing written
    asked = _cli("compile", str(path))
    assert asked.returncode == 1 and asked.stderr.strip().count("\n") == 0
    assert "no AOTInductor package for cpu (scheme int4" in asked.stderr
