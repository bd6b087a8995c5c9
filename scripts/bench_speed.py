#!/usr/bin/env python
"""Inference speed and compression cost of sliced SmolLM2-135M on this machine.

One run, one process, same machine state. Reported as median [min-max] over repeats after a warm-up:

- prefill tokens/s (batch 1 and 8, length 512, logits for every position) and decode tokens/s
  (batch 1 and 8, 64 new tokens after a 128-token prompt, KV cache) for: dense HF eager, the dense
  captured graph, and the 25% and 50% slices; the speedup against dense HF eager sits next to the
  FLOP-ratio bound computed from the layer shapes (linears + attention scores at the given length);
- weights and KV-cache memory, and the process peak RSS;
- compression time of the 25% slice on the default protocol split into capture, calibration forward,
  PCA, rewrite and export, next to one dense forward pass over the same calibration data (the floor).

    python scripts/bench_speed.py            # ~20 min on 2 cores
    python scripts/bench_speed.py --quick    # fewer repeats and a smaller calibration, for a look
"""

from __future__ import annotations

import argparse
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
from fxslice.assets import load_model  # noqa: E402
from fxslice.compress import prepare  # noqa: E402
from fxslice.data import Protocol, batches, protocol_data  # noqa: E402
from fxslice.export import save  # noqa: E402
from fxslice.generate import capture_with_cache, with_cache  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
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


def hf_decode(model, prompt, steps):
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)


def program_decode(program, prompt, steps):
    with torch.no_grad():
        length = prompt.shape[1]
        logits = program(prompt, torch.arange(length))
        nxt = logits[:, -1:].argmax(-1)
        for step in range(steps):
            nxt = program(nxt, torch.tensor([length + step]))[:, -1:].argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
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
    sliced[0.5] = fxslice.compress(model, calib_batches[:2], 0.5, progress=False)  # speed does not depend on calibration
    figures["compression"] = {**timings, "dense forward floor": floor}

    # --- throughput -------------------------------------------------------------------------
    dense_graph = prepare(model)[0]
    contenders = {"dense HF eager": model, "dense captured graph": dense_graph,
                  "sliced 25%": sliced[0.25], "sliced 50%": sliced[0.5]}
    config = model.config
    rows, results = [], {}
    for batch in (1, 8):
        prompt_512 = calib_batches[0][:batch]
        prompt_128 = prompt_512[:, :128]
        programs = {"dense HF eager": None, "dense captured graph": capture_with_cache(model, batch, 256),
                    "sliced 25%": with_cache(model, sliced[0.25], batch, 256),
                    "sliced 50%": with_cache(model, sliced[0.5], batch, 256)}
        for name, net in contenders.items():
            with torch.no_grad():
                pre = rate(batch * 512, timed(lambda: net(prompt_512), repeats))
            decode_fn = (lambda: hf_decode(model, prompt_128, 64)) if programs[name] is None else \
                (lambda p=programs[name]: program_decode(p, prompt_128, 64))
            dec = rate(batch * 64, timed(decode_fn, repeats))
            results[(name, batch)] = (pre, dec)
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
        figures.setdefault("throughput", {})[name] = {str(b): results[(name, b)] for b in (1, 8)} | {"flop_bound": bound}
    head = ["model", "weights MiB", "prefill b1 tok/s", "decode b1 tok/s", "prefill b8 tok/s", "decode b8 tok/s",
            "FLOP bound"]
    print(tabulate(rows, head, tablefmt="github"))
    c = figures["compression"]
    total = sum(v for k, v in c.items() if k not in ("total", "dense forward floor"))
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
