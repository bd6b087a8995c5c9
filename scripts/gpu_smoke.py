"""GPU smoke test: the CUDA path end to end, in a few minutes, with the figures a GPU run should report.

    bash scripts/gpu_smoke.sh                 # on a machine with a CUDA device
    python scripts/gpu_smoke.py --device cpu  # the same steps on the CPU (smaller protocol), as a dry run

Steps (each one a row of the table, failures reported and the rest still run):
1. SmolLM2-135M compressed at 25% with ``device=DEVICE`` in fp32 and in bf16; perplexity against the
   same compression on the CPU (fp32; skipped when DEVICE is the CPU);
2. a TinyLlama-1.1B-shaped random checkpoint (SmolLM2-135M with ``--quick``) streamed block by block with
   ``device=DEVICE``: time and peak device memory (``torch.cuda.max_memory_allocated``);
3. ``torchrun --nproc-per-node 1 -m fxslice compress`` on DEVICE (NCCL on CUDA, gloo on the CPU);
4. ``fxslice compile --device DEVICE`` on the fp32 folder, then greedy generation from the package.
Prints the table and writes it as JSON (``--json``). Exit status 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import checkpoint  # noqa: E402  (random-init checkpoints of real shapes, written once)

from fxslice.jobs.compress import compress_job  # noqa: E402
from fxslice.jobs.data import Protocol  # noqa: E402
from fxslice.jobs.generation import generate_job  # noqa: E402
from fxslice.runtime.compiled import compile_folder  # noqa: E402


def peak_memory(device: str) -> str:
    if torch.device(device).type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="stream the 135M checkpoint instead of the 1.1B shape")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    protocol = Protocol(calibration_windows=32 if on_gpu else 8, evaluation_windows=16 if on_gpu else 4,
                        length=512 if on_gpu else 256)
    work = Path(tempfile.mkdtemp(prefix="fxslice-gpu-smoke-"))
    rows: list[dict] = []

    def step(name: str, run) -> None:
        reset_peak(device)
        started = time.perf_counter()
        try:
            detail = run()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 — a smoke test reports every step
            detail, status = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "FAILED"
            traceback.print_exc()
        rows.append({"step": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
                     "peak device memory": peak_memory(device), "detail": detail})
        print(f"[{status}] {name}: {detail}", flush=True)

    perplexities: dict[str, dict] = {}

    def compress_on(where: str, dtype: str, output: str | None = None):
        def run():
            job = compress_job("smollm2-135m", 0.25, protocol, dtype=dtype, device=where, evaluate_dense=False,
                               output=output, overwrite=True, progress=False)
            perplexities[f"{where} {dtype}"] = job.rows[-1].perplexities
            return ", ".join(f"ppl {k} {v:.2f}" for k, v in job.rows[-1].perplexities.items())
        return run

    folder = str(work / "fp32")
    step(f"compress SmolLM2-135M fp32 on {device}", compress_on(device, "float32", folder))
    step(f"compress SmolLM2-135M bf16 on {device}", compress_on(device, "bfloat16"))
    if on_gpu:
        step("compress SmolLM2-135M fp32 on cpu (reference)", compress_on("cpu", "float32"))
        if f"{device} float32" in perplexities and "cpu float32" in perplexities:
            gap = max(abs(perplexities[f"{device} float32"][k] - perplexities["cpu float32"][k]) / perplexities["cpu float32"][k]
                      for k in perplexities["cpu float32"])
            rows.append({"step": f"fp32 perplexity {device} vs cpu", "status": "ok" if gap < 0.01 else "FAILED",
                         "seconds": 0.0, "peak device memory": "-", "detail": f"largest relative gap {gap:.2%}"})

    shape = "smollm2-135m" if args.quick else "tinyllama-1.1b-shape"

    def streamed():
        import fxslice

        source = checkpoint(shape)
        ids = [torch.randint(0, 32000 if "tinyllama" in shape else 49152, (4, 512 if on_gpu else 128),
                             generator=torch.Generator().manual_seed(i)) for i in range(2)]
        sliced = fxslice.compress(str(source), ids, 0.25, device=device, progress=False)
        return f"{shape}: {sliced.fxslice.param_count / 1e6:.1f}M parameters kept"

    step(f"stream {shape} with device={device}", streamed)

    def torchrun():
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "fxslice", "compress",
                   "--device", device, "--calibration-windows", str(protocol.calibration_windows), "--eval-windows",
                   "2", "--length", str(protocol.length), "--no-save"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        return ("NCCL" if on_gpu else "gloo") + ", 1 process: " + done.stdout.strip().splitlines()[-1][:80]

    step(f"torchrun --nproc-per-node 1 on {device}", torchrun)

    def compiled():
        outcome = compile_folder(folder, [device], progress=False)[0]
        if outcome.failure:
            raise RuntimeError(outcome.failure)
        started = time.perf_counter()
        result = generate_job(folder, "To be, or not to be", 32)
        seconds = time.perf_counter() - started
        return f"package {outcome.seconds:.0f} s to build; {result.new_tokens} tokens in {seconds:.2f} s"

    step(f"fxslice compile --device {device} + generate", compiled)

    print(tabulate([list(r.values()) for r in rows], list(rows[0]), tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
