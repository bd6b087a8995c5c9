#!/usr/bin/env python
"""How fast ATen reads a weight matrix at batch 1: the ceiling of a compiled decode step on this CPU.

A decode step multiplies one row per sequence by every weight matrix: it should be bound by memory
bandwidth. This times SmolLM2-135M's block matrices (30 layers of q, o, k, v, gate, up, down) at
M = 1 through the kernels fxslice's programs call — ``F.linear`` in float32 and bfloat16, the int8
weight-only kernel of pass 8 — against a plain copy, and prints GB/s read:

    python scripts/bench_gemv.py            # ~1 min
"""

from __future__ import annotations

import statistics
import time

import torch
from tabulate import tabulate
from torch.nn import functional as F

SHAPES = [(576, 576), (576, 576), (192, 576), (192, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30


def seconds(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    inputs = [torch.randn(1, k) for _, k in SHAPES]
    rows = []

    def row(label: str, nbytes: int, fn) -> None:
        s = seconds(fn)
        rows.append([label, f"{nbytes / 2**20:.0f}", f"{s * 1e3:.1f}", f"{nbytes / s / 1e9:.1f}"])

    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            weights = [torch.randn(n, k, dtype=dtype) for _ in range(LAYERS) for n, k in SHAPES]
            xs = [x.to(dtype) for x in inputs]
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            row(f"F.linear {str(dtype)[6:]}, {threads} thread(s)", nbytes,
                lambda: [F.linear(xs[i % len(SHAPES)], w) for i, w in enumerate(weights)])
        packed = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16))
                  for _ in range(LAYERS) for n, k in SHAPES]
        xs = [x.bfloat16() for x in inputs]
        row(f"_weight_int8pack_mm, {threads} thread(s)", sum(q.numel() for q, _ in packed),
            lambda: [torch.ops.aten._weight_int8pack_mm(xs[i % len(SHAPES)], q, s) for i, (q, s) in enumerate(packed)])
        source = torch.randn(64 * 2**20 // 4)
        target = torch.empty_like(source)
        row(f"copy (read bytes), {threads} thread(s)", source.numel() * 4, lambda: target.copy_(source))
    print(tabulate(rows, ["kernel at M = 1", "MiB read", "ms (median of 20)", "GB/s"], tablefmt="github"))


if __name__ == "__main__":
    main()
