"""Memory and time of compression: a model in memory vs a checkpoint streamed block by block.

    python scripts/bench_scale.py                   # SmolLM2-135M (real), 360M- and TinyLlama-1.1B-shaped
    python scripts/bench_scale.py --shapes smollm2-135m --processes 1 2

Random-init checkpoints of real shapes are written once (fp32 safetensors, ``save_pretrained``)
under ``$FXSLICE_CACHE/bench``. Every measurement runs in a fresh process (``torchrun`` for two),
which compresses at 25% on 8×512 random-token calibration windows and saves the result with its
KV-cache program. Peak RSS is the kernel's high-water mark (``VmHWM``): once when calibration ends
(before the finished weights are gathered) and once after the folder is written; "folder / weights"
is the saved folder's size over the sliced weights' bytes (weights stored once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

SHAPES = {  # name -> LlamaConfig overrides (None: the shipped real model)
    "smollm2-135m": None,
    "smollm2-360m-shape": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                               num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                               max_position_embeddings=8192, rope_theta=100000.0),
    "tinyllama-1.1b-shape": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                                 max_position_embeddings=2048),
}
WINDOWS, LENGTH, SPARSITY = 8, 512, 0.25


def checkpoint(shape: str) -> Path:
    """The checkpoint folder of ``shape`` (written once, in a child process)."""
    from fxslice.jobs.assets import cache_dir, resolve_model

    if SHAPES[shape] is None:
        return Path(resolve_model(shape))
    folder = cache_dir() / "bench" / shape
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--write", shape, str(folder)], check=True)
    return folder


def write_checkpoint(shape: str, folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], dtype="float32"))
    staging = tempfile.mkdtemp(dir=Path(folder).parent if Path(folder).parent.exists() else None)
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, max_shard_size="2GB")
    os.replace(staging, folder)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(shape: str, path: str, out: str) -> None:
    """One measurement (this process is one rank when run under torchrun)."""
    import fxslice
    from fxslice.distributed import init_from_environment, is_writer, rank, world_size
    from fxslice.graph import store

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    init_from_environment("cpu")
    folder = checkpoint(shape)
    nbytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config["vocab_size"], (WINDOWS, LENGTH), generator=generator)
    shard = [windows[i:i + 1] for i in range(WINDOWS)][rank()::world_size()]
    calibration_peak = {}
    for cls in (store.Weights, store.StreamedWeights):
        original = cls.finalise

        def finalise(self, _original=original):
            calibration_peak.setdefault("mb", vm_hwm_mb())
            _original(self)
        cls.finalise = finalise
    dense_forward = None
    started = time.perf_counter()
    if path == "memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            begin = time.perf_counter()
            for batch in shard:
                model(batch, use_cache=False)
            dense_forward = time.perf_counter() - begin
        started = time.perf_counter()
        sliced = fxslice.compress(model, shard, SPARSITY, progress=False)
    else:
        model = str(folder)
        sliced = fxslice.compress(model, shard, SPARSITY, progress=False)
    seconds = time.perf_counter() - started
    saved_bytes = 0
    if is_writer():
        with tempfile.TemporaryDirectory(prefix="fxslice-bench-") as folder:
            target = fxslice.save(sliced, Path(folder) / "sliced", max_cache_len=LENGTH)
            saved_bytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    record = {"shape": shape, "path": path, "processes": world_size(), "rank": rank(), "checkpoint_bytes": nbytes,
              "calibration_peak_mb": calibration_peak.get("mb"), "peak_mb": vm_hwm_mb(), "seconds": seconds,
              "dense_forward_seconds": dense_forward, "sliced_params": sliced.fxslice.param_count,
              "dense_params": sliced.fxslice.dense_param_count, "saved_bytes": saved_bytes,
              "sliced_weight_bytes": sum(p.numel() * p.element_size() for p in sliced.parameters())}
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def measure(shape: str, path: str, processes: int, out: str) -> None:
    checkpoint(shape)  # written before any measurement
    command = [__file__, "--child", shape, path, out]
    if processes == 1:
        subprocess.run([sys.executable, *command], check=True)
    else:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        *command], check=True)


def table(records: list[dict]) -> str:
    dense_forward = {r["shape"]: r["dense_forward_seconds"] for r in records if r["dense_forward_seconds"]}
    rows = []
    for r in records:
        if r["rank"] != 0:
            continue
        ranks = [x for x in records if (x["shape"], x["path"], x["processes"]) == (r["shape"], r["path"], r["processes"])]
        cal = max(x["calibration_peak_mb"] for x in ranks)
        peak = max(x["peak_mb"] for x in ranks)
        checkpoint_mib = r["checkpoint_bytes"] / 2**20
        forward = dense_forward.get(r["shape"])
        rows.append([r["shape"], f"{r['checkpoint_bytes'] / 2**30:.2f} GiB", r["path"], r["processes"],
                     f"{cal / 1024:.2f} GiB", f"{cal / checkpoint_mib:.2f}", f"{peak / 1024:.2f} GiB",
                     f"{peak / checkpoint_mib:.2f}",
                     f"{r['seconds']:.0f}", f"{r['seconds'] / forward:.1f}" if forward else "-",
                     f"{r['sliced_params'] / r['dense_params']:.3f}",
                     f"{r['saved_bytes'] / r['sliced_weight_bytes']:.3f}"])
    return tabulate(rows, ["model", "checkpoint", "path", "procs", "peak RSS calibrating", "/ ckpt", "peak RSS overall",
                           "/ ckpt", "compress s", "/ dense fwd", "params kept",
                           "folder / weights"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--paths", nargs="+", default=["memory", "streamed"], choices=["memory", "streamed"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default=None, help="append the JSON records to this file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        return write_checkpoint(*args.write)
    if args.child:
        return run(*args.child)
    out = args.out or str(Path(tempfile.mkdtemp(prefix="bench-scale-")) / "records.jsonl")
    done = set()  # measurements already in --out (a run that stopped is resumed)
    if os.path.exists(out):
        done = {(r["shape"], r["path"], r["processes"]) for r in map(json.loads, open(out))}
    for shape in args.shapes:
        for path in args.paths:
            for processes in args.processes:
                if processes > 1 and path == "memory":
                    continue  # data-parallel ranks each hold the model: measured streamed only
                if (shape, path, processes) in done:
                    continue
                measure(shape, path, processes, out)
                records = [json.loads(line) for line in open(out)]
                print(table(records), flush=True)


if __name__ == "__main__":
    main()
