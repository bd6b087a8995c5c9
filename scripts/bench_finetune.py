#!/usr/bin/env python
"""Dense vs sliced vs sliced + LoRA on SmolLM2-135M: perplexity and the local zero-shot task.

For each sparsity (default 25% and 30%): compress on the default protocol, fine-tune LoRA adapters
(r 32, alpha 10) on Shakespeare windows that follow the calibration windows (disjoint from the
held-out evaluation windows), merge, and report held-out Shakespeare and KJV perplexity plus
accuracy on ``kjv_verse_end`` (dense, and each slice before and after fine-tuning), with the
fine-tuning CPU time.

    python scripts/bench_finetune.py                    # ~30 min on 2 cores
    python scripts/bench_finetune.py --sparsities 0.25 --train-windows 16 --task-limit 50   # quicker

Recovery by distillation against the language-model loss, at equal steps (``--recoveries``: LoRA on
the language-model loss, LoRA distilled from the dense logits, every weight distilled), on
parameter budgets instead of sparsities:

    python scripts/bench_finetune.py --budgets 0.75 --recoveries lora lora-distill full-distill
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxslice  # noqa: E402
from fxslice.jobs.assets import load_model  # noqa: E402
from fxslice.jobs.data import Protocol, batches, finetune_data, protocol_data  # noqa: E402
from fxslice.jobs.evaluate import perplexity  # noqa: E402
from fxslice.jobs.finetune import finetune  # noqa: E402
from fxslice.jobs.lmeval import evaluate_tasks  # noqa: E402


RECOVERIES = {"lora": ("lora", False), "lora-distill": ("lora", True), "full": ("full", False),
              "full-distill": ("full", True)}
"""recovery name -> (finetune method, distilled from the dense model)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.3])
    parser.add_argument("--budgets", type=float, nargs="*", default=[],
                        help="target_params fractions (instead of --sparsities when given)")
    parser.add_argument("--recoveries", nargs="+", default=["lora"], choices=sorted(RECOVERIES),
                        help="what recovers each slice, at equal steps")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument("--train-windows", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-4 for LoRA, 2e-5 for full")
    parser.add_argument("--task-limit", type=int, default=200, help="kjv_verse_end questions (of 500)")
    parser.add_argument("--out", default="runs/bench/finetune.json")
    args = parser.parse_args()
    progress = sys.stderr.isatty()
    model, tokenizer = load_model(args.model)
    protocol = Protocol()
    calibration, evaluations = protocol_data(tokenizer, protocol)
    train, val = finetune_data(tokenizer, protocol, args.train_windows, args.val_windows)

    def measure(label, net, params, task=True):
        row = {"model": label, "params": params}
        for name, windows in evaluations.items():
            row[f"ppl {name}"] = perplexity(net, batches(windows, 4), f"{label} ppl {name}", progress)
        if task:
            results = evaluate_tasks(net, tokenizer, ["kjv_verse_end"], limit=args.task_limit, batch_size=8)
            row["kjv_verse_end acc"] = results["results"]["kjv_verse_end"]["acc,none"]
        print(json.dumps(row), flush=True)
        return row

    dense_params = sum(p.numel() for p in model.parameters())
    rows = [measure("dense", model, dense_params)]
    slices = [(f"budget {b:g}", {"target_params": b}) for b in args.budgets] or \
        [(f"sliced {s:g}", {"sparsity": s}) for s in args.sparsities]
    for index, (name, knob) in enumerate(slices):
        sliced = fxslice.compress(model, batches(calibration, 8), progress=progress, **knob)
        params = sliced.fxslice.param_count
        task = index == 0
        rows.append(measure(name, sliced, params, task=task))
        for recovery in args.recoveries:
            method, distill = RECOVERIES[recovery]
            options = {"method": method, **({"lr": args.lr} if args.lr else {}),
                       **({"teacher": model, "temperature": args.temperature} if distill else {})}
            started = time.process_time()
            tuned, report = finetune(sliced, batches(train, 4), batches(val, 4), progress=progress, **options)
            cpu = time.process_time() - started
            row = measure(f"{name} + {recovery}", tuned, params, task=task)
            row.update({"finetune wall (s)": report.seconds, "finetune CPU (s)": cpu, "steps": report.steps,
                        "best step": report.best_step})
            rows.append(row)
            del tuned
    columns = ["model", "params", "ppl shakespeare", "ppl kjv", "kjv_verse_end acc", "finetune wall (s)", "finetune CPU (s)", "steps"]
    table = [[_fmt(r.get(c), c, dense_params) for c in columns] for r in rows]
    print(tabulate(table, columns, tablefmt="github"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


def _fmt(value, column, dense_params):
    if value is None:
        return "-"
    if column == "params":
        return f"{value / 1e6:.1f}M ({100 * value / dense_params:.1f}%)"
    if isinstance(value, float):
        return f"{value:.3f}" if "acc" in column else f"{value:.2f}" if "ppl" in column else f"{value:.0f}"
    return value


if __name__ == "__main__":
    main()
