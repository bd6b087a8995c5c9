"""LoRA recovery fine-tuning and lm-eval zero-shot evaluation on tiny models."""

import json
import subprocess
import sys

import pytest
import torch

import fxslice
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from fxslice.jobs.finetune import distillation_loss, finetune, lora_targets, merge, train_adapters
from fxslice.jobs.lmeval import FxSliceLM, evaluate_tasks
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import COMMON, VOCAB, calibration, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def sliced():  # the budget mode: stream and MLP hidden units sliced, down projections refitted
    return fxslice.compress(tiny_model("llama_tied"), calibration(), target_params=0.8, split="fixed", progress=False)


def _data():
    return calibration(batches=4, seed=21), calibration(batches=1, seed=22)


def test_lora_targets_attention_and_mlp_not_head_or_shortcuts(sliced):
    record = sliced.fxslice.to_record()
    targets = lora_targets(sliced, record)
    assert "model.layers.0.self_attn.q_proj" in targets and "model.layers.1.mlp.down_proj" in targets
    inserted = {m["name"] for m in record["inserted"]}
    assert inserted and "model.layers.0.shortcut_2" in inserted and "model.norm_affine" in inserted
    assert "lm_head" not in targets and not inserted & set(targets)
    with_shortcuts = lora_targets(sliced, record, include_shortcuts=True)
    assert set(with_shortcuts) - set(targets) == set(sliced.fxslice.added)


def test_lora_trains_changes_output_and_merges_exactly(sliced):
    before_state = {k: v.clone() for k, v in sliced.state_dict().items()}
    train, val = _data()
    peft_model, report = train_adapters(sliced, train, val, lr=1e-2, eval_every=2, progress=False)
    assert report.steps == 4 and report.trained_parameters > 0 and len(report.val_losses) >= 2
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "LoRA B matrices never moved from zero"
    with torch.no_grad():
        adapted = peft_model(IDS).logits
        original = sliced(IDS).logits
    assert (adapted - original).abs().max() > 1e-3
    merged = merge(peft_model)
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, adapted, atol=1e-4)
    assert not any(p.requires_grad for p in merged.parameters())
    assert all(torch.equal(before_state[k], v) for k, v in sliced.state_dict().items()), "input model changed"


def test_finetune_from_a_saved_folder_and_save_again(sliced, tmp_path):
    folder = save(sliced, tmp_path / "sliced", record={"sparsity": 0.25}, max_cache_len=0)
    loaded, _ = load(folder)
    train, val = _data()
    merged, report = finetune(loaded, train[:2], val, lr=1e-2, eval_every=1, progress=False)
    assert report.best_val_loss <= report.initial_val_loss
    again = save(merged, tmp_path / "finetuned", record={"sparsity": 0.25, "finetune": report.to_dict()})
    reloaded, _ = load(again)
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, merged(IDS), atol=1e-5)


def test_loglikelihood_matches_a_direct_computation_and_batching(sliced):
    tokenizer = tiny_tokenizer()
    context, continuation = [5, 9, 17, 3, 44], [8, 21, 2]
    requests = [(("a", "b"), context, continuation), (("c", "d"), [7, 7], [30]), (("e", "f"), context[:3], [1, 2, 3, 4])]
    one = FxSliceLM(sliced, tokenizer, batch_size=1)._loglikelihood_tokens(requests, disable_tqdm=True)
    many = FxSliceLM(sliced, tokenizer, batch_size=3)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(one, many):
        assert abs(a - b) < 1e-4 and ga == gb
    with torch.no_grad():
        logprobs = torch.log_softmax(sliced(torch.tensor([context + continuation])).logits[0].float(), -1)
    direct = sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
    assert abs(one[0][0] - direct) < 1e-4


@pytest.mark.slow
def test_local_kjv_task_runs_end_to_end(sliced):
    results = evaluate_tasks(sliced, tiny_tokenizer(), ["kjv_verse_end"], limit=8, batch_size=4)
    accuracy = results["results"]["kjv_verse_end"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert results["results"]["kjv_verse_end"]["sample_len"] == 8
    with pytest.raises(fxslice.FxSliceError, match="unknown lm-eval task"):
        evaluate_tasks(sliced, tiny_tokenizer(), ["no_such_task_xyz"], limit=2)


@pytest.mark.slow
def test_cli_finetune_and_task_eval(sliced, tmp_path):
    tokenizer = tiny_tokenizer()
    folder = save(sliced, tmp_path / "sliced", tokenizer=tokenizer, record={"sparsity": 0.25, "source_model": "tiny"})
    data = ["--calibration", "kjv", "--calibration-windows", "4", "--eval", "kjv", "--eval-windows", "2", "--length", "32",
            "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "finetune", str(folder), "--train-windows", "4",
                           "--val-windows", "2", "--batch-size", "2", "--lr", "0.01", "--eval-every", "1", *data,
                           "--json", str(tmp_path / "ft.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ppl sliced + LoRA" in done.stdout
    record = json.loads((tmp_path / "ft.json").read_text())
    assert record["finetune"]["steps"] >= 1 and "kjv" in record["perplexity"]
    evaluated = subprocess.run([sys.executable, "-m", "fxslice.cli", "eval", str(tmp_path / "sliced-ft"), "--tasks",
                                "kjv_verse_end", "--limit", "4", "--no-progress"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "kjv_verse_end" in evaluated.stdout and "acc" in evaluated.stdout


def test_distillation_loss_is_the_tempered_kl():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    assert distillation_loss(teacher, teacher, 2.0).abs() < 1e-6
    for temperature in (1.0, 3.0):
        p = torch.softmax(teacher / temperature, -1)
        kl = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean()
        assert torch.allclose(distillation_loss(student, teacher, temperature), kl * temperature ** 2, atol=1e-5)


def _kl_to(teacher, student, batches) -> float:
    with torch.no_grad():
        return sum(distillation_loss(student(ids).logits, teacher(ids).logits, 1.0).item() for ids in batches)


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])  # full: the same loop
def test_distillation_moves_the_slice_towards_the_dense_model(method):
    dense = tiny_model("llama")
    with torch.no_grad():  # a random tiny model predicts almost uniformly: sharpen it, so that there is a gap
        dense.lm_head.weight.mul_(30)
    sliced = fxslice.compress(dense, calibration(), target_params=0.7, split="fixed", progress=False)
    before_state = {k: v.clone() for k, v in sliced.state_dict().items()}
    train, val = _data()
    held_out = calibration(batches=2, seed=23)
    lr = 3e-3 if method == "lora" else 5e-4
    tuned, report = finetune(sliced, train * 2, val, method=method, teacher=dense, temperature=2.0, lr=lr,
                             eval_every=2, patience=4, progress=False)
    assert isinstance(tuned, torch.fx.GraphModule) and not any(p.requires_grad for p in tuned.parameters())
    assert report.method == method and report.temperature == 2.0 and report.teacher
    figures = report.to_dict()
    assert figures["objective"] == "distillation" and report.steps == 8 and report.best_step > 0
    assert figures["best_val_kl"] < figures["initial_val_kl"]  # early stopping judged the held-out KL
    assert _kl_to(dense, tuned, held_out) < _kl_to(dense, sliced, held_out)
    assert all(torch.equal(before_state[k], v) for k, v in sliced.state_dict().items()), "input model changed"
    assert tuned.fxslice.widths == sliced.fxslice.widths  # the slice's shapes are kept
    assert {name for name, _ in tuned.named_parameters()} == {name for name, _ in sliced.named_parameters()}


def test_distillation_refuses_a_foreign_teacher_and_bad_options(sliced):
    train, val = _data()
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **dict(COMMON, vocab_size=VOCAB * 2)))
    with pytest.raises(fxslice.FxSliceError, match=f"predicts {VOCAB * 2} tokens but the slice {VOCAB}"):
        finetune(sliced, train, val, teacher=other, progress=False)
    with pytest.raises(fxslice.FxSliceError, match="temperature must be a positive number"):
        finetune(sliced, train, val, teacher=tiny_model("llama_tied"), temperature=0.0, progress=False)
    with pytest.raises(fxslice.FxSliceError, match="method must be one of"):
        finetune(sliced, train, val, method="qlora", progress=False)
    with pytest.raises(fxslice.FxSliceError, match="epochs, eval_every and patience must be positive and lr > 0"):
        finetune(sliced, train, val, method="full", lr=0.0, progress=False)
    with pytest.raises(fxslice.FxSliceError, match="lora_r must be a positive integer, got 0"):
        finetune(sliced, train, val, lora_r=0, progress=False)
    with pytest.raises(fxslice.FxSliceError, match="teacher must be the dense model"):
        finetune(sliced, train, val, method="full", teacher="smollm2-135m", progress=False)


@pytest.mark.slow
def test_cli_finetune_distills_from_the_source_model(tmp_path):
    source = tmp_path / "dense"
    dense = tiny_model("llama_tied")
    dense.save_pretrained(source)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(source)
    sliced = fxslice.compress(dense, calibration(), target_params=0.8, split="fixed", progress=False)
    folder = save(sliced, tmp_path / "sliced", tokenizer=tokenizer, record={"source_model": str(source)},
                  max_cache_len=0)
    data = ["--calibration", "kjv", "--calibration-windows", "4", "--eval", "kjv", "--eval-windows", "2", "--length",
            "32", "--no-progress", "--train-windows", "4", "--val-windows", "2", "--batch-size", "2", "--eval-every", "1"]
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "finetune", str(folder), "--distill", "--method", "full",
                           "--temperature", "1.5", "--lr", "1e-3", *data], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ppl sliced + full fine-tune (distilled)" in done.stdout
    record = json.loads((tmp_path / "sliced-ft" / "fxslice.json").read_text())["finetune"]
    assert record["method"] == "full" and record["teacher"] == str(source) and record["temperature"] == 1.5
    bad = subprocess.run([sys.executable, "-m", "fxslice.cli", "finetune", str(folder), "--teacher", str(source),
                          "--output", str(tmp_path / "x"), *data], capture_output=True, text=True)
    assert bad.returncode == 2 and "give --distill too" in bad.stderr and bad.stderr.count("\n") == 1
    cold = subprocess.run([sys.executable, "-m", "fxslice.cli", "finetune", str(folder), "--distill", "--temperature",
                           "-1", "--output", str(tmp_path / "y"), *data], capture_output=True, text=True)
    assert cold.returncode == 2 and "temperature must be a positive number" in cold.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
