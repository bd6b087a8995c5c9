"""LoRA recovery fine-tuning and lm-eval zero-shot evaluation on tiny models."""

import json
import subprocess
import sys

import pytest
import torch

import fxslice
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from fxslice.jobs.finetune import finetune, lora_targets, merge, train_adapters
from fxslice.jobs.lmeval import FxSliceLM, evaluate_tasks
from tiny_models import VOCAB, calibration, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def sliced():  # the budget mode: stream and MLP hidden units sliced, down projections refitted
    return fxslice.compress(tiny_model("llama_tied"), calibration(), target_params=0.8, progress=False)


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
    assert report.steps == 4 and report.lora_parameters > 0 and len(report.val_losses) >= 2
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
