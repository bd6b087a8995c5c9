#!/usr/bin/env python
"""A stock checkpoint in clients nobody here wrote: transformers, lm-eval's ``hf`` model, llama.cpp.

Takes a folder written by ``fxslice compress --format transformers`` (or ``fxslice.save(...,
format="transformers")``) and, without importing fxslice for the clients themselves:

1. transformers ``pipeline("text-generation")``: greedy tokens and decode speed;
2. lm-eval's own ``hf`` model on the shipped ``kjv_verse_end`` task (``--limit`` examples), beside
   fxslice's evaluation of the same folder with ``FxSliceLM`` (the numbers must agree);
3. llama.cpp: the ``convert_hf_to_gguf.py`` vendored by the ``llama-cpp-python`` source distribution
   (``pip download`` of the installed version, cached) converts the folder to F32 and Q8_0 GGUF, and
   ``llama-cpp-python`` decodes the same prompt greedily: its tokens against transformers', and its
   tokens/s, threads pinned alike.

    python scripts/interop.py runs/smollm2-135m-stock-0.8 [--limit 100] [--tokens 32] [--skip-lmeval]
                              [--dense ~/.cache/fxslice/smollm2-135m]

Prints one table; exits 1 when a client disagrees with transformers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tabulate import tabulate

PROMPT = "To be, or not to be, that is the question:"


def transformers_greedy(folder: Path, tokens: int, threads: int) -> tuple[list[int], list[int], float]:
    """(prompt ids, generated ids, tokens/s) from transformers' own pipeline."""
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    generator = pipeline("text-generation", model=str(folder), device="cpu", dtype=torch.float32)
    tokenizer = generator.tokenizer
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt])
    generator.model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    started = time.perf_counter()
    out = generator.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    seconds = time.perf_counter() - started
    text = generator(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    print(f"transformers pipeline: {text!r}")
    return prompt, out[0, len(prompt):].tolist(), tokens / seconds


def lmeval_scores(folder: Path, limit: int) -> tuple[dict, dict]:
    """kjv_verse_end accuracy from lm-eval's ``hf`` model, and from fxslice's evaluation of the folder."""
    from lm_eval import simple_evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxslice.jobs.lmeval import evaluate_tasks, task_manager

    theirs = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["kjv_verse_end"],
                             task_manager=task_manager(), limit=limit, batch_size=4, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    ours = evaluate_tasks(model, AutoTokenizer.from_pretrained(folder), ["kjv_verse_end"], limit=limit)
    return theirs["results"]["kjv_verse_end"], ours["results"]["kjv_verse_end"]


def converter(cache: Path) -> Path:
    """``convert_hf_to_gguf.py`` from the source distribution of the installed llama-cpp-python."""
    from importlib.metadata import version

    release = version("llama_cpp_python")
    folder = cache / f"llama_cpp_python-{release}"
    script = folder / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not (folder / "vendor" / "llama.cpp" / "conversion").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={release}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache)], check=True, capture_output=True)
        with tarfile.open(next(cache.glob(f"llama_cpp_python-{release}.tar.gz"))) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name and any(
                part in m.name for part in ("convert_hf_to_gguf", "/gguf-py/", "/vendor/llama.cpp/conversion/"))]
            archive.extractall(cache, members=members, filter="data")
    return script


def llama_cpp_greedy(gguf: Path, prompt: list[int], tokens: int, threads: int) -> tuple[list[int], float]:
    """(generated ids, tokens/s) of llama-cpp-python's greedy decoding from the prompt ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    out: list[int] = []
    started = None
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if started is None:
            started = time.perf_counter()  # after the prompt: decode speed only
        out.append(token)
        if len(out) == tokens:
            break
    seconds = time.perf_counter() - started if started is not None else float("inf")
    return out, (len(out) - 1) / max(seconds, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=100, help="kjv_verse_end examples for lm-eval")
    parser.add_argument("--skip-lmeval", action="store_true")
    parser.add_argument("--dense", type=Path, default=None,
                        help="the dense model's Transformers folder: its decode speed beside the slice's")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fxslice" / "llama-cpp-src")
    args = parser.parse_args()
    rows, agree = [], True
    prompt, reference, speed = transformers_greedy(args.folder, args.tokens, args.threads)
    rows.append(["transformers generate (fp32)", "-", f"{speed:.1f}", "reference"])
    if args.dense is not None:
        _, _, dense_speed = transformers_greedy(args.dense, args.tokens, args.threads)
        rows.append(["dense model, transformers generate (fp32)", "-", f"{dense_speed:.1f}", "-"])
    if not args.skip_lmeval:
        theirs, ours = lmeval_scores(args.folder, args.limit)
        same = theirs["acc,none"] == ours["acc,none"]
        agree &= same
        rows.append([f"lm-eval hf, kjv_verse_end ({args.limit})", f"acc {theirs['acc,none']:.3f} "
                     f"(fxslice {ours['acc,none']:.3f})", "-", "same" if same else "DIFFERENT"])
    script = converter(args.cache)
    for outtype in ("f32", "q8_0"):
        gguf = args.folder.parent / f"{args.folder.name}-{outtype}.gguf"
        subprocess.run([sys.executable, str(script), str(args.folder), "--outtype", outtype, "--outfile", str(gguf)],
                       check=True, capture_output=True)
        tokens, speed = llama_cpp_greedy(gguf, prompt, args.tokens, args.threads)
        matching = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        if outtype == "f32":
            agree &= tokens == reference
        rows.append([f"llama.cpp {outtype.upper()} ({gguf.stat().st_size / 2**20:.0f} MiB)",
                     f"{matching}/{len(reference)} greedy tokens as transformers", f"{speed:.1f}",
                     "same" if tokens == reference else "differs"])
    print(tabulate(rows, ["client", "result", "decode tokens/s (batch 1)", "vs transformers"], tablefmt="github"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
