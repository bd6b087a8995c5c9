#!/usr/bin/env python
"""Repeated work in one process (the notebook user): compress, save and load N times.

Per round: ``fxslice.compress`` of a tiny random model of ``--family`` (or a streamed checkpoint
with ``--stream``), ``fxslice.save`` in both formats, ``fxslice.load`` and one forward. The result
of a round is dropped before the next one. Printed per round: peak RSS, open file descriptors and
the fxslice folders left in the temporary directory. The goal is peak RSS at most 10% above the
first round's after the first round, with no file descriptor and no temporary folder left over.

    python scripts/repeat.py [--rounds 10] [--family llama] [--stream]

Exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import masked_calibration, tiny_model  # noqa: E402

import fxslice  # noqa: E402


def current_rss() -> float:
    """Resident memory now (MiB), from /proc/self/statm (-1 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return -1.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def shape_envs_alive() -> int:
    """torch.export's symbolic-shape environments still alive: torch 2.13 keeps one per export with dynamic
    shapes (``python scripts/repeat.py --torch-only`` shows it without fxslice), with its fake-tensor caches."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gc.collect()
    return sum(isinstance(o, ShapeEnv) for o in gc.get_objects())


def torch_only_round() -> None:
    """What torch alone keeps: one torch.export of a Linear with a dynamic length."""
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    torch.export.export(module, (torch.randn(2, 5, 8),), dynamic_shapes=({1: torch.export.Dim("length", max=64)},))


def open_files() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1


def stray_folders() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(("fxslice", ".fxslice")))


def clear_torch_caches() -> None:
    """torch keeps, per process, a dispatch cache of every fake-tensor op it traced and the source of
    every GraphModule it compiled; both grow with each capture and neither is fxslice's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import graph_module

    FakeTensorMode.cache_clear()
    loader = getattr(graph_module, "_loader", None)
    if loader is not None and hasattr(loader, "eval_cache"):
        loader.eval_cache.clear()


def one_round(family: str, stream: bool, work: Path) -> None:
    source = tiny_model(family)
    if stream:
        source.save_pretrained(work / "dense")
        source = work / "dense"
    sliced = fxslice.compress(source, masked_calibration(), 0.0, hidden_sparsity=0.25, stock=True, progress=False)
    fxslice.save(sliced, work / "fx", max_cache_len=32)
    fxslice.save(sliced, work / "stock", format="transformers")
    loaded, _ = fxslice.load(work / "fx")
    with torch.no_grad():
        loaded(torch.randint(0, 100, (1, 8)))
    del sliced, loaded, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--family", default="llama")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--torch-only", action="store_true",
                        help="no fxslice: one torch.export with a dynamic length per round (what torch itself keeps)")
    parser.add_argument("--clear-torch-caches", action="store_true",
                        help="clear torch's FakeTensor dispatch cache and torch.fx's generated-code cache after each "
                             "round (what grows per torch.export call, measured with tracemalloc)")
    args = parser.parse_args()
    before_files, before_folders = open_files(), stray_folders()
    rows, peaks = [], []
    for number in range(1, args.rounds + 1):
        work = Path(tempfile.mkdtemp(prefix="repeat-"))
        try:
            if args.torch_only:
                torch_only_round()
            else:
                one_round(args.family, args.stream, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.clear_torch_caches:
            clear_torch_caches()
        gc.collect()
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows.append([number, f"{peaks[-1]:.0f}", f"{current_rss():.0f}", shape_envs_alive(), open_files() - before_files,
                     len(set(stray_folders()) - set(before_folders))])
    print(tabulate(rows, ["round", "peak RSS (MiB)", "RSS after the round (MiB)", "torch ShapeEnvs alive", "extra open files", "extra fxslice temp folders"],
                   tablefmt="github"))
    growth = peaks[-1] / peaks[0] - 1.0
    print(f"peak RSS growth after round 1: {100 * growth:.1f}% (goal <= 10%)")
    ok = growth <= 0.10 and rows[-1][4] <= 0 and rows[-1][5] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
