"""Stock Transformers checkpoints of a slice: ``save(..., format="transformers")`` and ``stock=True``.

The checkpoint is loaded by transformers' own ``from_pretrained`` (in a process where fxslice cannot
be imported, once), its logits must equal the sliced graph's, its greedy ``generate`` must give
fxslice's tokens, and lm-eval's own ``hf`` model must score it as fxslice's evaluation does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxslice
from fxslice.errors import FxSliceError
from fxslice.runtime.folder import STOCK_RECORD
from tiny_models import VOCAB, masked_calibration, tiny_model, tiny_tokenizer

SLOW = pytest.mark.slow
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
FAMILIES = [  # quick: tied RMSNorm, GPT-2's Conv1D + n_inner
    "llama_tied", "gpt2",
    *[pytest.param(name, marks=SLOW) for name in (
        "gemma2", "qwen2_moe", "llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "phi3", "gemma", "gemma3_text", "olmo2",
        "mixtral", "qwen3_moe", "olmoe", "cohere", "opt", "falcon_new", "phi", "gpt_neox_parallel", "stablelm")],
]


def _stock_slice(family: str, dtype=torch.float32, **options):
    model = tiny_model(family, dtype=dtype)
    options = options or {"sparsity": 0.0, "hidden_sparsity": 0.25}
    return fxslice.compress(model, masked_calibration(), stock=True, progress=False, **options)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stock_checkpoint_computes_the_slice(family, tmp_path):
    """from_pretrained loads the folder as the original model type with the new MLP widths; its logits
    equal the slice's, with and without a right-padded attention mask; nothing rotated, nothing inserted."""
    sliced = _stock_slice(family)
    folder = fxslice.save(sliced, tmp_path / "stock", format="transformers")
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = _logits(sliced, IDS)
    assert torch.allclose(_logits(stock, IDS), want, atol=1e-4 * max(1.0, float(want.abs().max())))
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    masked = _logits(stock, IDS, attention_mask=mask)
    assert torch.allclose(masked[0], want[0], atol=1e-4 * max(1.0, float(want.abs().max())))
    assert torch.allclose(masked[1, :6], want[1, :6], atol=1e-4 * max(1.0, float(want.abs().max())))
    result = sliced.fxslice
    assert sum(p.numel() for p in stock.parameters()) == result.stock_param_count == result.param_count
    assert result.stock_param_count < result.dense_param_count
    assert stock.config.model_type == tiny_model(family).config.model_type
    summary = json.loads((folder / STOCK_RECORD).read_text())
    assert bool(summary["config_changes"]) == bool(result.hidden_widths)
    assert all(v < 200 for v in summary["config_changes"].values())


def test_stock_checkpoints_load_without_fxslice_and_generate_its_tokens(tmp_path):
    """A process that cannot import fxslice loads the folder (no trust_remote_code); transformers'
    greedy generate() gives the tokens of fxslice's own KV-cache program."""
    sliced = _stock_slice("llama_tied")
    folder = fxslice.save(sliced, tmp_path / "stock", format="transformers")
    torch.save(IDS, tmp_path / "ids.pt")
    script = ("import sys; sys.modules['fxslice'] = None\n"
              "import torch; from transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "ids = torch.load(sys.argv[2])\n"
              "with torch.no_grad(): torch.save(model(ids).logits, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, timeout=300)
    want = _logits(sliced, IDS)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), want, atol=1e-4 * max(1.0, float(want.abs().max())))

    prompt = IDS[:1, :5]
    loaded, _ = fxslice.load(fxslice.save(sliced, tmp_path / "fx", max_cache_len=32))
    ours = loaded.generate(prompt, 8, eos_token_id=None)
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = stock.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@SLOW
def test_a_streamed_checkpoint_saves_as_a_stock_checkpoint(tmp_path):
    """compress(path, stock=True) reads the checkpoint block by block; its config comes from the folder."""
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "dense")
    sliced = fxslice.compress(tmp_path / "dense", masked_calibration(), 0.0, hidden_sparsity=0.5, stock=True,
                              progress=False)
    stock = AutoModelForCausalLM.from_pretrained(fxslice.save(sliced, tmp_path / "stock", format="transformers"))
    assert stock.config.intermediate_size == 64
    want = _logits(sliced, IDS)
    assert torch.allclose(_logits(stock, IDS), want, atol=1e-4 * max(1.0, float(want.abs().max())))


@pytest.mark.slow  # ~10 s; the float32 stock checkpoints stay quick
def test_a_bfloat16_stock_checkpoint_keeps_its_dtype(tmp_path):
    sliced = _stock_slice("qwen3", dtype=torch.bfloat16)
    folder = fxslice.save(sliced, tmp_path / "stock", format="transformers")
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    assert stock.dtype == torch.bfloat16
    want = _logits(sliced, IDS)
    assert float((_logits(stock, IDS) - want).abs().max()) <= 5e-2 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("family,target", [("llama_tied", 0.8), pytest.param("qwen2_moe", 0.8, marks=pytest.mark.slow)])  # experts and shared expert
def test_a_stock_budget_is_met_by_the_saved_model(family, target, tmp_path):
    """target_params with stock=True counts the stock model: within 0.5% below the target."""
    sliced = _stock_slice(family, target_params=target)
    result = sliced.fxslice
    stock = AutoModelForCausalLM.from_pretrained(fxslice.save(sliced, tmp_path / "s", format="transformers"))
    count = sum(p.numel() for p in stock.parameters())
    assert count == result.stock_param_count
    assert target - 0.005 <= count / result.dense_param_count <= target
    widths = {(kept, full) for kept, full in result.hidden_widths.values()}
    assert len(widths) == len({full for _, full in widths})  # one kept width per config attribute: stock
    if family == "qwen2_moe":  # the experts lose units too, a multiple of 8 (transformers' grouped kernels)
        assert any("experts" in w for w in result.hidden_widths)
        assert all(kept % 8 == 0 for w, (kept, _) in result.hidden_widths.items() if ".experts." in w)


def test_a_rotated_slice_is_refused_as_a_stock_checkpoint(tmp_path):
    """A PCA-rotated slice (shortcuts, narrower stream) has no stock config: refused with the option."""
    sliced = fxslice.compress(tiny_model("llama"), masked_calibration(), 0.25, progress=False)
    target = tmp_path / "stock"
    with pytest.raises(FxSliceError, match="stock=True"):
        fxslice.save(sliced, target, format="transformers")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_config_that_cannot_hold_the_mlp_width_is_refused(tmp_path):
    """Bloom's MLP is always 4 x hidden: no attribute can say it is narrower."""
    sliced = _stock_slice("bloom")
    with pytest.raises(FxSliceError, match="holds the MLP width"):
        fxslice.save(sliced, tmp_path / "stock", format="transformers")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options,message", [
    (dict(sparsity=0.25), "sparsity must be 0"),
    (dict(sparsity=0.0, hidden_sparsity=0.3, allocation="energy"), "allocation must be 'uniform'"),
    (dict(sparsity=0.0, basis="block"), "basis must be 'none'"),
    (dict(sparsity=0.0, stock="yes"), "stock must be True or False"),
])
def test_stock_options_that_no_stock_config_expresses_are_refused(options, message):
    with pytest.raises(FxSliceError, match=message):
        fxslice.compress(tiny_model("llama"), masked_calibration(), progress=False, **{"stock": True, **options})


def test_an_unrotated_stream_takes_no_stream_sparsity():
    with pytest.raises(FxSliceError, match="sparsity must be 0"):
        fxslice.compress(tiny_model("llama"), masked_calibration(), 0.2, basis="none", progress=False)


def test_an_unknown_save_format_is_refused(tmp_path):
    sliced = _stock_slice("llama")
    with pytest.raises(FxSliceError, match="format must be one of"):
        fxslice.save(sliced, tmp_path / "x", format="gguf")
    assert list(tmp_path.iterdir()) == []


@SLOW
def test_overwrite_replaces_a_stock_checkpoint_fxslice_wrote(tmp_path):
    sliced = _stock_slice("llama")
    folder = fxslice.save(sliced, tmp_path / "stock", format="transformers")
    with pytest.raises(FxSliceError, match="already exists"):
        fxslice.save(sliced, folder, format="transformers")
    assert fxslice.save(sliced, folder, format="transformers", overwrite=True) == folder
    assert (folder / "config.json").is_file()
    with pytest.raises(FxSliceError, match="stock Transformers checkpoint.*from_pretrained"):
        fxslice.load(folder)


@SLOW
def test_lm_evals_own_hf_model_scores_the_checkpoint_as_fxslice_does(tmp_path):
    """lm-eval's ``hf`` model (not fxslice's wrapper) on the saved folder: the same accuracy on the
    shipped task as ``fxslice eval``'s evaluation of the sliced graph."""
    from lm_eval import simple_evaluate

    from fxslice.jobs.lmeval import evaluate_tasks, task_manager

    tokenizer = tiny_tokenizer()
    sliced = _stock_slice("llama")
    folder = fxslice.save(sliced, tmp_path / "stock", tokenizer, format="transformers")
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["kjv_verse_end"],
                             task_manager=task_manager(), limit=24, batch_size=4, device="cpu")["results"]["kjv_verse_end"]
    ours = evaluate_tasks(sliced, tokenizer, ["kjv_verse_end"], limit=24)["results"]["kjv_verse_end"]
    assert theirs["acc,none"] == ours["acc,none"] and theirs["acc_norm,none"] == ours["acc_norm,none"]


@SLOW
def test_transformers_pipeline_generates_from_the_checkpoint(tmp_path):
    from transformers import pipeline

    tokenizer = tiny_tokenizer()
    sliced = _stock_slice("llama")
    folder = fxslice.save(sliced, tmp_path / "stock", tokenizer, format="transformers")
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    text = generator("In the beginning", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("In the beginning") and len(text) > len("In the beginning")
