#!/usr/bin/env python
"""The quality–size–speed front: true parameter count vs held-out perplexity vs prefill speed.

Runs the shipped protocol (Shakespeare calibration, held-out Shakespeare and KJV, 128 × 512-token
calibration windows, 40 evaluation windows per text) for

- SliceGPT alone (``sparsity``; ``basis="position"`` = the paper, ``basis="block"``, ``basis="model"``: one
  basis for the whole stream, no shortcut left),
- fxslice's budget mode (``target_params``: stream + MLP hidden units with refit, post-norm branches
  in their own basis) at 90/85/80/75/70%: ``budget-*`` with the split between stream and MLP units
  measured on held-out calibration windows (the default; every candidate's score is kept),
  ``budget-*-fixed`` with the fixed ratio, and energy-allocated MLP widths,
- the stock budget mode (``target_params`` with ``stock=True``: the stream unrotated and whole, the same
  share of MLP units cut in every block, so that the slice saves as a stock Transformers checkpoint)
  at 90/80/75/70%,
- Gemma-3-270M (post-norm sandwich blocks) at 25% (block and model basis) and at budgets 90/80%,

each in its own process (one at a time), and prefill speed of every slice against the dense captured
graph (batch 1 and 8, 512 tokens, interleaved rounds in the same process). Results accumulate in
``docs/pareto.jsonl`` (a finished run is not repeated; ``--fresh`` starts over; rows marked
``imported`` are earlier sessions' results on the same protocol); the tables (and every measured split's
candidates) are printed and ``docs/pareto.png`` plotted from all of them. ``kjv_verse_end`` (lm-eval,
the first ``--task-limit`` questions) is scored for every run.

    python scripts/bench_pareto.py                      # everything (~1.5-2 h on 2 cores)
    python scripts/bench_pareto.py --runs budget-0.8 sgpt-block-0.25   # some of it
    python scripts/bench_pareto.py --speed-again budget-0.8            # re-time a run's prefill
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
RUNS: dict[str, tuple[str, dict]] = {
    **{f"budget-{t:g}": (SMOL, {"target_params": t}) for t in (0.8, 0.75, 0.7, 0.9, 0.85)},
    **{f"budget-{t:g}-fixed": (SMOL, {"target_params": t, "split": "fixed"}) for t in (0.8, 0.75, 0.7, 0.9, 0.85)},
    "budget-0.8-energy": (SMOL, {"target_params": 0.8, "allocation": "energy", "split": "fixed"}),
    "sgpt-block-0.25": (SMOL, {"sparsity": 0.25}),
    "sgpt-position-0.25": (SMOL, {"sparsity": 0.25, "basis": "position"}),
    "gemma-budget-0.8": (GEMMA, {"target_params": 0.8}),
    "gemma-budget-0.8-fixed": (GEMMA, {"target_params": 0.8, "split": "fixed"}),
    "gemma-sgpt-block-0.25": (GEMMA, {"sparsity": 0.25}),
    "gemma-sgpt-model-0.25": (GEMMA, {"sparsity": 0.25, "basis": "model"}),
    "sgpt-model-0.25": (SMOL, {"sparsity": 0.25, "basis": "model"}),
    "gemma-budget-0.9": (GEMMA, {"target_params": 0.9, "split": "fixed"}),
    **{f"sgpt-block-{s:g}": (SMOL, {"sparsity": s}) for s in (0.2, 0.3)},
    **{f"stock-{t:g}": (SMOL, {"target_params": t, "stock": True}) for t in (0.8, 0.7, 0.75, 0.9)},
    "sgpt-position-0.3": (SMOL, {"sparsity": 0.3, "basis": "position"}),
    # two consecutive blocks per basis (half the block-to-block shortcuts)
    "gemma-sgpt-span2-0.25": (GEMMA, {"sparsity": 0.25, "basis_span": 2}),
    "sgpt-span2-0.25": (SMOL, {"sparsity": 0.25, "basis_span": 2}),
    # query/key dimensions cut too (the stream whole and unrotated, uniform MLP units meet the rest): against stock-0.8
    **{f"keys-{k:g}-0.8": (SMOL, {"target_params": 0.8, "basis": "none", "key_sparsity": k}) for k in (0.25, 0.125)},
}
NAMES = ("shakespeare", "kjv")
GOALS = ([(80, 60.0), (70, 72.4)], [(80, 21.0), (70, 35.4)])
"""The quality issue's goals without recovery, (% of dense parameters, perplexity): Shakespeare, KJV."""


def mode(options: dict) -> str:
    """The plot series a run belongs to."""
    if options.get("key_sparsity"):
        return "budget, query/key dimensions cut (stream whole)"
    if options.get("stock"):
        return "stock budget (unrotated stream, MLP units)"
    if "target_params" in options and options.get("split") == "fixed":
        return f"budget, fixed split ({options.get('allocation', 'uniform')} MLP widths)"
    if "target_params" in options:
        return "budget, measured split"
    span = f", {options['basis_span']} blocks per basis" if options.get("basis_span", 1) != 1 else ""
    return f"SliceGPT ({options.get('basis', 'block')} basis{span})"


def child(name: str, out: Path, task_limit: int) -> None:
    """One run: compress, evaluate (perplexity, and ``kjv_verse_end`` on its first ``task_limit``
    questions when not 0), time prefill against the dense captured graph; append a JSON line."""
    from fxslice.jobs.compress import compress_job
    from fxslice.jobs.data import Protocol

    model_name, options = RUNS[name]
    options = dict(options)
    sparsity = options.pop("sparsity", None)
    first = not any(json.loads(line)["model"] == model_name for line in out.read_text().splitlines()) \
        if out.exists() else True
    job = compress_job(model_name, sparsity, Protocol(), output=None, progress=False, evaluate_dense=first,
                       max_cache_len=0, **options)
    result = job.result
    record = {"run": name, "model": model_name, "options": RUNS[name][1], "mode": mode(RUNS[name][1]),
              "params": result.param_count, "dense_params": result.dense_param_count,
              "fraction": result.param_fraction, "widths": sorted(set(result.widths)),
              "hidden_kept": sum(k for k, _ in result.hidden_widths.values()),
              "hidden_total": sum(f for _, f in result.hidden_widths.values()),
              "perplexity": job.rows[-1].perplexities, "seconds": job.seconds,
              "options_run": {k: v for k, v in result.options.items() if v is not None}}
    if result.split_search is not None:
        record["split_search"] = result.split_search.to_record()
    if first:
        record["dense_perplexity"] = job.rows[0].perplexities
    if task_limit:
        record["kjv_verse_end"] = kjv_accuracy(job.sliced, model_name, task_limit)
        if first:
            from fxslice.jobs.assets import load_model

            record["dense_kjv_verse_end"] = kjv_accuracy(load_model(model_name)[0], model_name, task_limit)
    from fxslice.runtime.generate import kv_cache_bytes_per_token, with_cache

    record["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(with_cache(job.sliced, 1, 8, share_weights=True))
    record.update(prefill_speedups(model_name, job.sliced))
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def kjv_accuracy(model, model_name: str, limit: int) -> dict:
    """lm-eval's accuracy on the shipped ``kjv_verse_end`` task, its first ``limit`` questions."""
    from fxslice.hf import load_tokenizer
    from fxslice.jobs.assets import resolve_model
    from fxslice.jobs.lmeval import evaluate_tasks

    results = evaluate_tasks(model, load_tokenizer(resolve_model(model_name)), ["kjv_verse_end"], limit=limit,
                             batch_size=8)
    return {"acc": results["results"]["kjv_verse_end"]["acc,none"], "limit": limit}


def prefill_speedups(model_name: str, sliced, repeats: int = 2) -> dict:
    """Dense captured graph time / sliced graph time, batch 1 and 8 × 512 tokens, interleaved rounds."""
    import torch

    from bench_speed import timed
    from fxslice.hf import model_spec
    from fxslice.jobs.assets import load_model
    from fxslice.passes.p1_capture import capture
    from fxslice.passes.p2_canonicalise import canonicalise

    model, _ = load_model(model_name)
    dense = canonicalise(capture(model, model_spec(model)))
    speedups = {}
    for batch in (1, 8):
        ids = torch.randint(0, sliced.fxslice.vocab_size, (batch, 512), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            times = timed({"dense": lambda: dense(ids), "sliced": lambda: sliced(ids)}, repeats=repeats)
        speedups[f"prefill_b{batch}"] = statistics.median(times["dense"]) / statistics.median(times["sliced"])
    return speedups


def speed_again(name: str, out: Path) -> None:
    """Time a finished run's prefill again (3 rounds): the widths of uniform allocations do not depend
    on the calibration data, so two windows rebuild the same shapes; the record is rewritten."""
    from fxslice.compress import compress
    from fxslice.jobs.assets import load_model
    from fxslice.jobs.data import Protocol, batches, protocol_data

    model_name, options = RUNS[name]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ran = next(r for r in records if r["run"] == name).get("options_run", {})
    if "energy" in (options.get("allocation"), ran.get("allocation")) or ran.get("allocation") == "measured":
        raise SystemExit(f"{name}: its per-block widths depend on the calibration data; rerun it whole")
    chosen = ("basis", "stream_sparsity", "value_sparsity", "allocation")  # the measured split's choice, searched no more
    options = {**options, **{k: ran[k] for k in chosen if k in ran}, "split": "fixed"}
    model, tokenizer = load_model(model_name)
    windows, _ = protocol_data(tokenizer, Protocol(calibration_windows=2, evaluation=()))
    sliced = compress(model, batches(windows, 2), progress=False, **options)
    for record in records:
        if record["run"] == name:
            assert record["params"] == sliced.fxslice.param_count, "the rebuilt slice differs from the run's"
            record.update(prefill_speedups(model_name, sliced, repeats=3))
    out.write_text("".join(json.dumps(r) + "\n" for r in records))


def kv_bytes(records: list[dict]) -> tuple[dict[str, str], dict[str, int]]:
    """(run -> KV-cache bytes per token (float32), model -> its dense bytes per token): measured, or for a run that
    cut no attention dimension, what such a run of its model measured (stream width and MLP units never touch the
    cache)."""
    def cuts(r):
        ran = {**r.get("options", {}), **r.get("options_run", {})}
        return bool(ran.get("value_sparsity") or ran.get("key_sparsity"))

    whole = {r["model"]: r["kv_cache_bytes_per_token"] for r in records
             if r.get("kv_cache_bytes_per_token") and not cuts(r) and "options_run" in r}
    out = {}
    for r in records:
        value = r.get("kv_cache_bytes_per_token") or (None if cuts(r) else whole.get(r["model"]))
        out[r["run"]] = f"{value:,}" if value else "-"
    return out, whole


def table(records: list[dict]) -> str:
    rows = []
    kv, dense_kv = kv_bytes(records)
    dense = {r["model"]: r["dense_perplexity"] for r in records if "dense_perplexity" in r}
    for model in dict.fromkeys(r["model"] for r in records):
        if model in dense:
            task = next((r["dense_kjv_verse_end"] for r in records if r["model"] == model and "dense_kjv_verse_end" in r), None)
            whole = f"{dense_kv[model]:,}" if model in dense_kv else "-"
            rows.append([model, "dense", "100.0%", whole, *[f"{dense[model][n]:.2f}" for n in NAMES], _accuracy(task),
                         "1.00×", "1.00×", "-"])
        for r in sorted((r for r in records if r["model"] == model), key=lambda r: -r["fraction"]):
            hidden = f"{r['hidden_kept']}/{r['hidden_total']}" if r["hidden_total"] else "all"
            rows.append([model, r["run"], f"{100 * r['fraction']:.1f}%", kv[r["run"]],
                         *[f"{r['perplexity'][n]:.2f}" for n in NAMES],
                         _accuracy(r.get("kjv_verse_end")),
                         *[f"{r[k]:.2f}×" if r.get(k) is not None else "-" for k in ("prefill_b1", "prefill_b8")],
                         f"stream {'/'.join(map(str, sorted(r['widths'], reverse=True)))}, MLP units {hidden}"])
    head = ["model", "run", "params (true)", "KV bytes/token", "ppl shakespeare", "ppl kjv", "kjv_verse_end acc", "prefill b1 vs dense",
            "prefill b8", "widths"]
    return tabulate(rows, head, tablefmt="github")


def split_table(records: list[dict]) -> str:
    """Every candidate of every measured split (the held-out KL on a quarter-calibrated slice)."""
    rows = []
    for r in records:
        search = r.get("split_search")
        for c in (search or {}).get("candidates", []):
            rows.append([r["run"], c["label"] + (" (chosen)" if c["label"] == search["chosen"] else ""),
                         c["stream_width"] or "-", "-" if c["hidden_sparsity"] is None else f"{c['hidden_sparsity']:.1%}",
                         "-" if c["param_fraction"] is None else f"{c['param_fraction']:.1%}",
                         c["refused"] or f"{c['score']:.4f}"])
    return tabulate(rows, ["run", "candidate split", "stream width", "MLP units cut", "params", "held-out KL"],
                    tablefmt="github")


def _accuracy(task) -> str:
    """``0.53 (100)``: accuracy and how many questions, or ``-``."""
    return f"{task['acc']:.2f} ({task['limit']})" if task else "-"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smol = [r for r in records if r["model"] == SMOL]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("perplexity", "shakespeare", "held-out Shakespeare perplexity"),
              ("perplexity", "kjv", "KJV perplexity"), ("prefill_b8", None, "prefill speed vs dense (b8 × 512)")]
    for ax, (key, sub, label) in zip(axes, panels):
        for series in sorted({r["mode"] for r in smol}):
            points = sorted((r["fraction"], r[key][sub] if sub else r[key]) for r in smol
                            if r["mode"] == series and (sub or r.get(key) is not None))
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=series)
        dense = next((r["dense_perplexity"] for r in smol if "dense_perplexity" in r), None)
        if sub and dense:
            ax.axhline(dense[sub], color="grey", ls=":", label="dense")
        ax.set_xlabel("true parameters (% of dense)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax, goals in zip(axes, GOALS):  # the quality issue's goals: at most this perplexity at this size
        ax.scatter([x for x, _ in goals], [y for _, y in goals], marker="x", color="red", s=80, zorder=5,
                   label="goal")
    axes[2].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower left")  # the empty corner
    fig.suptitle("SmolLM2-135M, shipped protocol: size vs perplexity vs speed (red x: the goals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", default="docs/pareto.jsonl")
    parser.add_argument("--plot", default="docs/pareto.png")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--speed-again", nargs="+", default=None, metavar="RUN",
                        help="time these finished runs' prefill again (3 rounds) on a quiet machine")
    parser.add_argument("--task-limit", type=int, default=100,
                        help="kjv_verse_end questions (of 500) per run; 0 skips the zero-shot task")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.child:
        child(args.child, out, args.task_limit)
        return
    for name in args.speed_again or []:
        speed_again(name, out)
    if args.speed_again:
        args.runs = []
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and out.exists():
        out.unlink()
    done = {json.loads(line)["run"] for line in out.read_text().splitlines()} if out.exists() else set()
    for name in args.runs:
        if name in done:
            continue
        print(f"$ {name}: {RUNS[name]}", flush=True)
        subprocess.run([sys.executable, __file__, "--child", name, "--out", str(out), "--task-limit",
                        str(args.task_limit)], check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    print(table(records))
    print(split_table(records))
    plot(records, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
