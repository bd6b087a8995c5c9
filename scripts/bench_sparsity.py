#!/usr/bin/env python
"""Perplexity, true parameter fraction, compression time and peak RSS against sparsity.

Runs the default protocol (Shakespeare calibration, held-out Shakespeare and KJV evaluation) on
SmolLM2-135M at several sparsities, and Gemma 3 270M at 25%, each in its own process so that peak
RSS is per run. Prints one table and saves a perplexity-vs-sparsity plot.

    python scripts/bench_sparsity.py                       # full sweep (~30-40 min on 2 cores)
    python scripts/bench_sparsity.py --sparsities 0.25 --no-gemma --windows 16   # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxslice.jobs.plots import plot_perplexity  # noqa: E402


def run_one(model: str, sparsity: float, dense: bool, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, "-m", "fxslice.cli", "compress", "--model", model, "--sparsity", str(sparsity),
               "--no-save", "--json", out, "--no-progress", "--calibration-windows", str(args.calibration_windows),
               "--eval-windows", str(args.windows), "--pca-signal", args.pca_signal, "--basis", args.basis]
    if not dense:
        command.append("--no-dense")
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    record = json.loads(Path(out).read_text())
    Path(out).unlink()
    record["param_fraction"] = record["param_count"] / record["dense_param_count"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.25, 0.3])
    parser.add_argument("--no-gemma", action="store_true", help="skip Gemma 3 270M at 25%%")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows per text")
    parser.add_argument("--pca-signal", default="stream", choices=["stream", "norm_output"])
    parser.add_argument("--basis", default="position", choices=["position", "block"],
                        help="the README's table is SliceGPT's per-position basis (the budget mode: bench_pareto.py)")
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON and the plot")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("smollm2-135m", s) for s in args.sparsities] + ([] if args.no_gemma else [("gemma3-270m", 0.25)])
    records, seen_dense = [], set()
    for model, sparsity in runs:
        record = run_one(model, sparsity, model not in seen_dense, args)
        seen_dense.add(model)
        records.append(record)
    dense = {r["source_model"]: r["dense_perplexity"] for r in records if r.get("dense_perplexity")}
    names = ["shakespeare", "kjv"]
    rows = []
    for model in dict.fromkeys(r["source_model"] for r in records):
        if model in dense:
            rows.append([model, "dense", *[f"{dense[model].get(n, float('nan')):.2f}" for n in names], "100.0%", "-", "-", "-"])
        for r in (r for r in records if r["source_model"] == model):
            rows.append([model, f"{r['sparsity']:g}", *[f"{r['perplexity'].get(n, float('nan')):.2f}" for n in names],
                         f"{100 * r['param_fraction']:.1f}%", f"{r['param_count'] / 1e6:.1f}M",
                         f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"])
    head = ["model", "slicing", "ppl shakespeare (held-out)", "ppl kjv", "params (true)", "params", "compress (s)", "peak RSS (MiB)"]
    print(tabulate(rows, head, tablefmt="github"))
    (out / "sparsity_sweep.json").write_text(json.dumps(records, indent=2, default=str))
    smol = [r for r in records if r["source_model"] == "smollm2-135m"]
    if smol:
        plot_perplexity(smol, str(out / "ppl_vs_sparsity.png"), "SmolLM2-135M, Shakespeare calibration")
        print(f"plot: {out / 'ppl_vs_sparsity.png'}")


if __name__ == "__main__":
    main()
