#!/usr/bin/env python
"""Inference speed and compression cost of sliced SmolLM2-135M on this machine.

One run, one process, same machine state. Reported as median [min-max] over repeats after a warm-up:

- prefill tokens/s (batch 1 and 8, length 512, logits for every position) and decode tokens/s
  (batch 1 and 8, 32 greedy steps after a 128-token prompt, KV cache; the prompt is not timed) for: dense HF eager, the dense
  captured graph, the 25% slice (``basis="position"`` and ``"block"``) and the 50% slice; the speedup
  against dense HF eager sits next to the FLOP-ratio bound computed from the layer shapes (linears +
  attention scores at the given length);
- where the prefill time goes (batch 1): block linears, shortcut matrices, head, the rest;
- weights and KV-cache memory, and the process peak RSS;
- compression time of the 25% slice on the default protocol split into capture, calibration forward,
  PCA, rewrite and export, next to one dense forward pass over the same calibration data (the floor).

    python scripts/bench_speed.py            # ~20 min on 2 cores
    python scripts/bench_speed.py --quick    # fewer repeats and a smaller calibration, for a look
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxslice  # noqa: E402
from fxslice.hf import model_spec  # noqa: E402
from fxslice.jobs.assets import load_model  # noqa: E402
from fxslice.jobs.data import Protocol, batches, protocol_data  # noqa: E402
from fxslice.passes.p1_capture import capture  # noqa: E402
from fxslice.passes.p2_canonicalise import canonicalise  # noqa: E402
from fxslice.runtime.export import save  # noqa: E402
from fxslice.runtime.generate import capture_with_cache, with_cache  # noqa: E402


STEPS = 32  # decode steps per measurement, after a 128-token prompt


def timed(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function (or the seconds a function returns, when it times a part of
    itself): one warm-up each, then ``repeats`` rounds, the contenders interleaved within a round so
    that a drift of the machine (a shared VM) does not favour one of them."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            inner = fn()
            times[name].append(inner if isinstance(inner, float) else time.perf_counter() - started)
    return times


def rate(tokens: int, times: list[float]) -> tuple[float, float, float]:
    rates = sorted(tokens / t for t in times)
    return statistics.median(rates), rates[0], rates[-1]


def linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates per token of every Linear (shortcut matrices included)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def attention_macs(config, length: int) -> int:
    """Per token, causal: scores and weighted sum over on average length/2 keys, every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * (length // 2) * config.num_attention_heads * head_dim * config.num_hidden_layers


def component(name: str, net: nn.Module) -> str:
    """Which part of a (sliced) graph a Linear belongs to, from the compression result's lists."""
    result = getattr(net, "fxslice", None)
    inserted = {m.name: m.kind for m in result.inserted} if result is not None else {}
    head = set(result.head) if result is not None else {"lm_head"}
    if inserted.get(name) == "shortcut":
        return "shortcuts"
    if name in inserted:
        return "norm affines"
    return "head" if name in head else "block linears"


def time_by_component(net: nn.Module, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds per forward spent in each kind of Linear (timed by hooks), the rest by difference."""
    spent: dict[str, float] = {}
    started: dict[nn.Module, float] = {}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            def begin(mod, args):
                started[mod] = time.perf_counter()

            def end(mod, args, out, kind=component(name, net)):
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - started[mod]
            hooks += [module.register_forward_pre_hook(begin), module.register_forward_hook(end)]
    try:
        with torch.no_grad():
            net(ids)
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(repeats):
                net(ids)
            total = time.perf_counter() - t0
    finally:
        for hook in hooks:
            hook.remove()
    ms = {kind: 1000 * seconds / repeats for kind, seconds in spent.items()}
    ms["rest (attention, norms, rotary, elementwise)"] = 1000 * total / repeats - sum(ms.values())
    ms["total"] = 1000 * total / repeats
    return ms


def hf_decode(model, prompt, steps) -> float:
    """Seconds of ``steps`` greedy one-token steps after a prefill of ``prompt`` (not timed)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - started


def program_decode(program, prompt, steps) -> float:
    with torch.no_grad():
        length = prompt.shape[1]
        logits = program(prompt, torch.arange(length))
        nxt = logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for step in range(steps):
            nxt = program(nxt, torch.tensor([length + step]))[:, -1:].argmax(-1)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/bench/speed.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    protocol = Protocol(calibration_windows=16 if args.quick else 128, evaluation=())
    model, tokenizer = load_model("smollm2-135m")
    calibration, _ = protocol_data(tokenizer, protocol)
    calib_batches = batches(calibration, 8)
    figures: dict = {"threads": torch.get_num_threads()}

    # --- compression cost -----------------------------------------------------------------
    started = time.perf_counter()
    with torch.no_grad():
        for ids in calib_batches:
            model(input_ids=ids, use_cache=False)
    floor = time.perf_counter() - started
    sliced = {0.25: fxslice.compress(model, calib_batches, 0.25, progress=False)}
    timings = dict(sliced[0.25].fxslice.timings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # what `fxslice compress` saves: model.pt2 and generate.pt2
        generator = with_cache(model, sliced[0.25], batch_size=1, max_cache_len=1024)
        save(sliced[0.25], Path(folder) / "m", tokenizer, {"sparsity": 0.25}, generator=generator)
    timings["export"] = time.perf_counter() - started
    # speed does not depend on the calibration data: two batches suffice for the other variants
    sliced["0.25 block"] = fxslice.compress(model, calib_batches[:2], 0.25, basis="block", progress=False)
    sliced[0.5] = fxslice.compress(model, calib_batches[:2], 0.5, progress=False)
    figures["compression"] = {**timings, "dense forward floor": floor}

    # --- throughput -------------------------------------------------------------------------
    dense_graph = canonicalise(capture(model, model_spec(model)))
    keys = {"sliced 25%": 0.25, "sliced 25% basis=block": "0.25 block", "sliced 50%": 0.5}
    contenders = {"dense HF eager": model, "dense captured graph": dense_graph}
    contenders.update({name: sliced[key] for name, key in keys.items()})
    config = model.config
    rows, results = [], {}
    for batch in (1, 8):
        prompt_512 = calib_batches[0][:batch]
        prompt_128 = prompt_512[:, :128]
        programs = {"dense HF eager": None, "dense captured graph": capture_with_cache(model, batch, 256)}
        programs.update({name: with_cache(model, sliced[key], batch, 256) for name, key in keys.items()})
        gc.collect()
        gc.freeze()  # the many graphs held here stay out of the cyclic GC: no collection pause inside a timing
        with torch.no_grad():
            prefill = timed({name: (lambda net=net: net(prompt_512)) for name, net in contenders.items()}, repeats)
        decode = timed({name: (lambda: hf_decode(model, prompt_128, STEPS)) if program is None else
                        (lambda p=program: program_decode(p, prompt_128, STEPS)) for name, program in programs.items()},
                       repeats)
        for name in contenders:
            results[(name, batch)] = (rate(batch * 512, prefill[name]), rate(batch * STEPS, decode[name]))
    dense_macs = linear_macs(model)
    for name, net in contenders.items():
        macs = linear_macs(net) if name.startswith("sliced") else dense_macs
        bound = (dense_macs + attention_macs(config, 512)) / (macs + attention_macs(config, 512))
        weights = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
        row = [name, f"{weights:.0f}"]
        for batch in (1, 8):
            pre, dec = results[(name, batch)]
            base_pre, base_dec = results[("dense HF eager", batch)]
            row += [f"{pre[0]:.0f} [{pre[1]:.0f}-{pre[2]:.0f}] ({pre[0] / base_pre[0]:.2f}x)",
                    f"{dec[0]:.1f} [{dec[1]:.1f}-{dec[2]:.1f}] ({dec[0] / base_dec[0]:.2f}x)"]
        row.append(f"{bound:.2f}x")
        rows.append(row)
        figures.setdefault("throughput", {})[name] = {f"b{b} prefill, decode": results[(name, b)] for b in (1, 8)}
        figures["throughput"][name]["flop_bound"] = bound
    head = ["model", "weights MiB", "prefill b1 tok/s", "decode b1 tok/s", "prefill b8 tok/s", "decode b8 tok/s",
            "FLOP bound"]
    print(tabulate(rows, head, tablefmt="github"))
    profiles = {name: time_by_component(contenders[name], calib_batches[0][:1], repeats)
                for name in ("dense captured graph", "sliced 25%", "sliced 25% basis=block")}
    kinds = list(dict.fromkeys(k for p in profiles.values() for k in p))
    print()
    print(tabulate([[kind] + [f"{p.get(kind, 0.0):.0f}" for p in profiles.values()] for kind in kinds],
                   ["prefill b1 x512, ms"] + list(profiles), tablefmt="github"))
    figures["prefill_profile_ms"] = profiles
    c = figures["compression"]
    total = c["total"] + c["export"]
    split = [[k, f"{v:.1f}"] for k, v in c.items() if k not in ("total",)]
    ratio = total / c["dense forward floor"]
    split.append(["compression total (capture..export)", f"{total:.1f}  ({ratio:.2f}x floor)"])
    print()
    print(tabulate(split, ["compression of the 25% slice", "seconds"], tablefmt="github"))
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {figures['peak_rss_mb']:.0f} MiB, {figures['threads']} threads")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
