#!/usr/bin/env python
"""Inference speed of sliced SmolLM2-135M on this machine: eager and compiled, against dense eager and compiled.

One run, one process, same machine state; median [min-max] over repeats after a warm-up, the
contenders interleaved within every round:

- contenders: dense HF eager; dense HF ``torch.compile`` (static cache for decode); the dense model
  captured by fxslice and compiled with AOTInductor (the same route as ``fxslice compile``); the 25%
  slice (``basis="position"`` and ``"block"``) as an eager graph and compiled with AOTInductor;
- prefill tokens/s (batch 1 and 8 × 512 tokens, logits for every position) and decode tokens/s
  (batch 1 and 8; 128 greedy steps after a 128-token prompt, KV cache; the prompt is not timed);
- the goals of issue 12 checked: compiled slice decode / dense HF eager (≥ 2x), compiled slice /
  dense compiled (≥ 1.05x at decode; prefill ≥ 90% of the FLOP-ratio bound, printed beside it);
- where the eager prefill time goes, and eager decode time against the caller's Python stack depth
  (the old ``basis="block"`` decode anomaly: CPython's frame-stack chunks, see the README);
- compression time of the 25% slice split into capture, calibration forward, PCA, rewrite, export,
  next to one dense forward pass over the calibration data (the floor).

    python scripts/bench_speed.py            # ~35 min on 2 cores (compilation included)
    python scripts/bench_speed.py --quick    # one round, a smaller calibration
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
from fxslice.runtime.compiled import build_package, load_with_own_constants  # noqa: E402
from fxslice.runtime.programs import export_generator, export_program  # noqa: E402
from fxslice.runtime.save import save  # noqa: E402
from fxslice.runtime.generate import capture_with_cache, with_cache  # noqa: E402


STEPS = 128  # decode steps per measurement, after a 128-token prompt
CACHE = 256  # static KV-cache length of every cache program


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
    """Seconds of ``steps`` greedy one-token steps after a prefill of ``prompt`` (not timed), dynamic cache."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - started


def hf_static_decode(compiled, cache, prompt, steps) -> float:
    """The same with transformers' static cache through a ``torch.compile``d forward."""
    with torch.no_grad():
        cache.reset()  # the cache counts the tokens it holds: start every run empty
        length = prompt.shape[1]
        out = compiled(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(length), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for step in range(steps):
            out = compiled(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([length + step]),
                           use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
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


def aoti(programs: dict[str, torch.export.ExportedProgram], folder: Path, label: str) -> dict[str, nn.Module]:
    """AOTInductor-compiled models of ``programs`` with their own weights (what ``fxslice compile`` builds)."""
    started = time.perf_counter()
    package = build_package(programs, folder / f"{label.replace(' ', '_').replace('%', '')}.pt2")
    print(f"  compiled {label}: {time.perf_counter() - started:.0f} s", flush=True)
    return load_with_own_constants(package, programs)


def at_depth(depth: int, fn):
    """``fn()`` called through ``depth`` extra Python frames."""
    return fn() if depth == 0 else at_depth(depth - 1, fn)


def depth_probe(program, prompt, steps: int = 16, depths: int = 7) -> list[float]:
    """Eager decode ms per step of the same program called through 0..depths-1 extra Python frames:
    CPython 3.11 allocates its frame stack in 16 KiB chunks and unmaps one as soon as it empties, so
    a chunk boundary that falls inside every nn.Linear call costs an mmap/munmap pair per call."""
    return [round(at_depth(d, lambda: program_decode(program, prompt, steps)) / steps * 1000, 1) for d in range(depths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-hf-compile", action="store_true", help="leave out dense HF torch.compile")
    parser.add_argument("--model", default="smollm2-135m", help="shipped name, hub id or HF folder")
    parser.add_argument("--out", default=None, help="JSON figures (default runs/bench/speed.json, or deploy.json)")
    parser.add_argument("--deploy", action="store_true",
                        help="the deployment contenders instead: the budget-0.8 slice in float32, bfloat16, int8 and "
                             "int4, the dense model int8, exported and compiled, and llama.cpp (see deploy())")
    parser.add_argument("--gguf", nargs="*", default=[], metavar="FILE",
                        help="--deploy: GGUF files llama.cpp (llama-cpp-python) decodes beside fxslice's rows; the "
                             "shipped SmolLM2 Q4_1 is always one when llama-cpp-python is installed")
    args = parser.parse_args()
    if args.deploy:
        from bench_deploy import deploy

        return deploy(args)
    args.out = args.out or "runs/bench/speed.json"
    repeats = 1 if args.quick else args.repeats
    protocol = Protocol(calibration_windows=16 if args.quick else 128, evaluation=())
    model, tokenizer = load_model(args.model)
    calibration, _ = protocol_data(tokenizer, protocol)
    calib_batches = batches(calibration, 8)
    vocab = model.config.vocab_size
    figures: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    # --- compression cost -----------------------------------------------------------------
    started = time.perf_counter()
    with torch.no_grad():
        for ids in calib_batches:
            model(input_ids=ids, use_cache=False)
    floor = time.perf_counter() - started
    sliced = {"25%": fxslice.compress(model, calib_batches, 0.25, progress=False)}
    timings = dict(sliced["25%"].fxslice.timings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # what `fxslice compress` saves: model.pt2 and generate.pt2
        save(sliced["25%"], Path(folder) / "m", tokenizer, {"sparsity": 0.25}, max_cache_len=1024)
    timings["export"] = time.perf_counter() - started
    # speed does not depend on the calibration data: two batches suffice for the other basis
    sliced["25% block"] = fxslice.compress(model, calib_batches[:2], 0.25, basis="block", progress=False)
    figures["compression"] = {**timings, "dense forward floor": floor}

    # --- contenders -------------------------------------------------------------------------
    work = Path(tempfile.mkdtemp(prefix="fxslice-bench-"))
    dense_graph = canonicalise(capture(model, model_spec(model)))
    prefill = {"dense HF eager": lambda ids: model(input_ids=ids, use_cache=False).logits}
    decode: dict[int, dict] = {1: {}, 8: {}}
    for batch in (1, 8):
        decode[batch]["dense HF eager"] = lambda prompt: hf_decode(model, prompt, STEPS)
    if not args.no_hf_compile:
        torch._dynamo.config.cache_size_limit = 64
        compiled_hf = torch.compile(model, dynamic=False)
        prefill["dense HF torch.compile"] = lambda ids: compiled_hf(input_ids=ids, use_cache=False).logits
        from transformers import StaticCache

        for batch in (1, 8):
            cache = StaticCache(config=model.config, max_cache_len=CACHE)
            decode[batch]["dense HF torch.compile"] = (
                lambda prompt, cache=cache: hf_static_decode(compiled_hf, cache, prompt, STEPS))
    print("compiling with AOTInductor ...", flush=True)
    dense_cache = {}
    for batch in (1, 8):
        dense_cache[batch] = canonicalise(capture_with_cache(model, batch, CACHE))
        dense_cache[batch].cache_batch_size, dense_cache[batch].max_cache_len = batch, CACHE
    compiled = aoti({"prefill": export_program(dense_graph, vocab),
                     **{f"decode b{b}": export_generator(dense_cache[b]) for b in (1, 8)}}, work, "dense")
    prefill["dense captured+compiled"] = compiled["prefill"]
    for batch in (1, 8):
        decode[batch]["dense captured+compiled"] = (
            lambda prompt, p=compiled[f"decode b{batch}"]: program_decode(p, prompt, STEPS))
    eager_programs = {}
    for name, net in sliced.items():
        programs = {b: with_cache(net, b, CACHE) for b in (1, 8)}
        eager_programs[name] = programs
        prefill[f"sliced {name} eager"] = net
        compiled = aoti({"prefill": export_program(net, vocab),
                         **{f"decode b{b}": export_generator(programs[b]) for b in (1, 8)}}, work, f"sliced {name}")
        prefill[f"sliced {name} compiled"] = compiled["prefill"]
        for batch in (1, 8):
            decode[batch][f"sliced {name} eager"] = lambda prompt, p=programs[batch]: program_decode(p, prompt, STEPS)
            decode[batch][f"sliced {name} compiled"] = (
                lambda prompt, p=compiled[f"decode b{batch}"]: program_decode(p, prompt, STEPS))

    # --- throughput -------------------------------------------------------------------------
    results: dict[tuple[str, int], tuple] = {}
    for batch in (1, 8):
        prompt_512 = calib_batches[0][:batch]
        prompt_128 = prompt_512[:, :128]
        gc.collect()
        gc.freeze()  # the many graphs held here stay out of the cyclic GC: no collection pause inside a timing
        print(f"timing batch {batch} ...", flush=True)
        with torch.no_grad():
            pre = timed({name: (lambda f=f: f(prompt_512)) for name, f in prefill.items()}, repeats)
        dec = timed({name: (lambda f=f: f(prompt_128)) for name, f in decode[batch].items()}, repeats)
        for name in prefill:
            results[(name, batch)] = (rate(batch * 512, pre[name]), rate(batch * STEPS, dec[name]))
    dense_macs = linear_macs(model)
    config = model.config
    bounds = {}
    for name in prefill:
        net = sliced.get(name.removeprefix("sliced ").rsplit(" ", 1)[0]) if name.startswith("sliced") else None
        macs = linear_macs(net) if net is not None else dense_macs
        bounds[name] = (dense_macs + attention_macs(config, 512)) / (macs + attention_macs(config, 512))
    rows = []
    for name in prefill:
        row = [name]
        for batch in (1, 8):
            pre, dec = results[(name, batch)]
            base_pre, base_dec = results[("dense HF eager", batch)]
            row += [f"{pre[0]:.0f} [{pre[1]:.0f}-{pre[2]:.0f}] ({pre[0] / base_pre[0]:.2f}x)",
                    f"{dec[0]:.1f} [{dec[1]:.1f}-{dec[2]:.1f}] ({dec[0] / base_dec[0]:.2f}x)"]
        row.append(f"{bounds[name]:.2f}x")
        rows.append(row)
        figures.setdefault("throughput", {})[name] = {f"b{b} prefill, decode": results[(name, b)] for b in (1, 8)}
        figures["throughput"][name]["flop_bound"] = bounds[name]
    print()
    print(tabulate(rows, ["tokens/s (vs dense HF eager)", "prefill b1", "decode b1", "prefill b8", "decode b8",
                          "FLOP bound"], tablefmt="github"))

    # --- goals ------------------------------------------------------------------------------
    goals = []
    for name in sliced:
        mine = f"sliced {name} compiled"
        for batch in (1, 8):
            pre, dec = results[(mine, batch)]
            hf = results[("dense HF eager", batch)][1][0]
            dense_pre, dense_dec = results[("dense captured+compiled", batch)]
            prefill_ratio = pre[0] / dense_pre[0]
            goals.append([mine, batch, f"{dec[0] / hf:.2f}x (>= 2)", f"{dec[0] / dense_dec[0]:.2f}x (>= 1.05)",
                          f"{prefill_ratio:.2f}x / {bounds[mine]:.2f}x = {prefill_ratio / bounds[mine]:.0%} (>= 90%)"])
    print()
    print(tabulate(goals, ["compiled slice", "batch", "decode vs dense HF eager", "decode vs dense compiled",
                           "prefill vs dense compiled / FLOP bound"], tablefmt="github"))
    figures["goals"] = goals

    # --- where the time goes (eager) ----------------------------------------------------------
    profiles = {name: time_by_component(net, calib_batches[0][:1], repeats)
                for name, net in (("dense captured graph", dense_graph), *(
                    (f"sliced {k}", v) for k, v in sliced.items()))}
    kinds = list(dict.fromkeys(k for p in profiles.values() for k in p))
    print()
    print(tabulate([[kind] + [f"{p.get(kind, 0.0):.0f}" for p in profiles.values()] for kind in kinds],
                   ["eager prefill b1 x512, ms"] + list(profiles), tablefmt="github"))
    figures["prefill_profile_ms"] = profiles
    prompt_128 = calib_batches[0][:1, :128]
    depths = {name: depth_probe(programs[1], prompt_128) for name, programs in eager_programs.items()}
    print()
    for name, times in depths.items():
        print(f"eager decode b1, sliced {name}, ms/step when called through 0..6 extra Python frames: {times}")
    figures["eager_decode_ms_by_call_depth"] = depths

    c = figures["compression"]
    total = c["total"] + c["export"]
    split = [[k, f"{v:.1f}"] for k, v in c.items() if k not in ("total",)]
    split.append(["compression total (capture..export)", f"{total:.1f}  ({total / c['dense forward floor']:.2f}x floor)"])
    print()
    print(tabulate(split, ["compression of the 25% slice", "seconds"], tablefmt="github"))
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {figures['peak_rss_mb']:.0f} MiB, {figures['threads']} threads")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
