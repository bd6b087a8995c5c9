"""Command line: ``fxslice compress | eval | inspect`` (``fxslice COMMAND --help`` for the options)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import FxSliceError


def _protocol_args(parser: argparse.ArgumentParser, evaluation_default=("shakespeare", "kjv")) -> None:
    group = parser.add_argument_group("data protocol")
    group.add_argument("--calibration", default="shakespeare",
                       help="calibration text: shakespeare, kjv, stdlib, file:PATH or hf:NAME[:CONFIG]:SPLIT:COLUMN (default: %(default)s)")
    group.add_argument("--calibration-windows", type=int, default=128, help="number of calibration windows (default: %(default)s)")
    group.add_argument("--eval", nargs="+", default=list(evaluation_default), metavar="CORPUS",
                       help="evaluation texts; the calibration text is evaluated on its last windows (default: %(default)s)")
    group.add_argument("--eval-windows", type=int, default=40, help="windows per evaluation text (default: %(default)s)")
    group.add_argument("--length", type=int, default=512, help="tokens per window (default: %(default)s)")
    group.add_argument("--eval-batch-size", type=int, default=4, help="windows per evaluation batch (default: %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _protocol(args):
    from .data import Protocol

    return Protocol(args.calibration, args.calibration_windows, tuple(args.eval), args.eval_windows, args.length)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxslice", description="SliceGPT for any Hugging Face causal LM, as a torch.fx graph pass.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", required=True)

    comp = commands.add_parser("compress", help="slice a model, print dense vs sliced perplexity, save the result",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comp.add_argument("--model", default="smollm2-135m",
                      help="smollm2-135m or gemma3-270m (shipped, offline), a hub id or a local folder")
    comp.add_argument("--sparsity", type=float, default=0.25, help="fraction of the stream width to delete, in [0, 1)")
    comp.add_argument("--output", default=None, help="folder to save the sliced model to (default: runs/MODEL-SPARSITY)")
    comp.add_argument("--no-save", action="store_true", help="do not save the sliced model")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    comp.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch")
    comp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="model dtype")
    comp.add_argument("--device", default="cpu", help="torch device for model and calibration")
    comp.add_argument("--pca-signal", choices=["stream", "norm_output"], default="stream",
                      help="PCA of the stream value (reference code) or of the norm output (paper Eq. 8)")
    comp.add_argument("--slice-head", action="store_true", help="also slice the head's input position")
    comp.add_argument("--basis", choices=["position", "block"], default="position",
                      help="one PCA basis per stream position (paper), or one per block: the block's inner "
                           "shortcut becomes the identity and is removed (smaller, faster)")
    comp.add_argument("--round-to", type=int, default=8, help="round slice widths down to a multiple of this")
    comp.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    comp.add_argument("--no-eval", action="store_true", help="skip all perplexity evaluation")
    comp.add_argument("--json", default=None, help="also write the figures to this JSON file")
    comp.add_argument("--max-cache-len", type=int, default=1024,
                      help="KV-cache length of the saved generation program (0: save no generation program)")
    comp.add_argument("--plot-spectra", default=None, metavar="PNG", help="save the eigenvalue spectra of every position")
    _protocol_args(comp)

    ev = commands.add_parser("eval", help="perplexity (default) or lm-eval zero-shot tasks of a dense model or a saved sliced folder",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("model", help="a folder saved by fxslice, a shipped name, a hub id or a HF folder")
    ev.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="dense model dtype")
    ev.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                    help="run lm-eval on these tasks instead of perplexity (e.g. kjv_verse_end, piqa, arc_easy, hellaswag)")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    ev.add_argument("--batch-size", type=int, default=4, help="lm-eval: sequences per batch")
    ev.add_argument("--max-length", type=int, default=2048, help="lm-eval: longest context in tokens")
    _protocol_args(ev)

    ft = commands.add_parser("finetune", help="LoRA recovery fine-tuning of a saved sliced model; saves the merged result",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ft.add_argument("model", help="a folder saved by fxslice compress")
    ft.add_argument("--output", default=None, help="folder for the fine-tuned model (default: MODEL-ft)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ft.add_argument("--train-windows", type=int, default=64, help="training windows (after the calibration windows)")
    ft.add_argument("--val-windows", type=int, default=8, help="validation windows for early stopping")
    ft.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    ft.add_argument("--epochs", type=int, default=1, help="passes over the training windows")
    ft.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    ft.add_argument("--lora-r", type=int, default=32, help="LoRA rank")
    ft.add_argument("--lora-alpha", type=float, default=10.0, help="LoRA alpha")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    ft.add_argument("--eval-every", type=int, default=4, help="steps between validation passes")
    ft.add_argument("--patience", type=int, default=2, help="validation passes without improvement before stopping")
    ft.add_argument("--include-shortcuts", action="store_true", help="also put adapters on shortcut matrices and norm affines")
    ft.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    ft.add_argument("--json", default=None, help="also write the figures to this JSON file")
    _protocol_args(ft)

    gen = commands.add_parser("generate", help="generate text from a saved sliced model with its KV cache",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("model", help="a folder saved by fxslice compress or finetune")
    gen.add_argument("--prompt", default="ROMEO.\n", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")

    ins = commands.add_parser("inspect", help="print the residual-stream structure fxslice finds")
    ins.add_argument("model", help="a shipped name, a hub id or a HF folder")
    return parser


def cmd_compress(args) -> int:
    from .pipeline import run, table

    output = None if args.no_save else (args.output or f"runs/{Path(args.model).name}-{args.sparsity:g}")
    figures = run(args.model, args.sparsity, _protocol(args), dtype=args.dtype, device=args.device,
                  batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                  evaluate_dense=not (args.no_dense or args.no_eval), evaluate=not args.no_eval, output=output,
                  overwrite=args.overwrite, progress=not args.no_progress, pca_signal=args.pca_signal,
                  slice_head=args.slice_head, basis=args.basis, round_to=args.round_to,
                  max_cache_len=args.max_cache_len)
    print()
    print(table(figures["rows"], figures["eval_names"]))
    result = figures["result"]
    print(f"\nshortcut/affine parameters included above: {result.added_param_count:,}; "
          f"compression time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    print(f"peak RSS: {figures['peak_rss_mb']:.0f} MiB")
    if figures["saved"]:
        print(f"saved to {figures['saved']}  (load with fxslice.load or torch.export.load('{figures['saved']}/model.pt2'))")
    if args.plot_spectra:
        from .plots import plot_spectra

        plot_spectra(result.eigenvalues, args.plot_spectra, title=f"{args.model}: PCA spectra per stream position")
        print(f"spectra plot: {args.plot_spectra}")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures["record"], "seconds": figures["rows"][-1].seconds,
                                               "peak_rss_mb": figures["peak_rss_mb"]}, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from tabulate import tabulate

    from .assets import load_model
    from .data import batches, protocol_data
    from .evaluate import perplexity
    from .export import RECORD, load
    from .pipeline import DTYPES

    folder = Path(args.model)
    if (folder / RECORD).exists():
        model, tokenizer = load(folder)
        label, params = f"sliced ({model.record.get('source_model')}, {model.record.get('sparsity')})", model.record.get("param_count")
    else:
        model, tokenizer = load_model(args.model, DTYPES[args.dtype])
        label, params = f"dense {args.model}", sum(p.numel() for p in model.parameters())
    if tokenizer is None:
        raise FxSliceError(f"{folder} has no tokenizer files")
    if args.tasks:
        from .lmeval import evaluate_tasks, results_table

        results = evaluate_tasks(model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                                 num_fewshot=args.num_fewshot, max_length=args.max_length)
        print(f"\n{label}")
        print(results_table(results))
        return 0
    protocol = _protocol(args)
    _, evaluations = protocol_data(tokenizer, protocol)
    rows = [[name, f"{perplexity(model, batches(w, args.eval_batch_size), f'ppl {name}', not args.no_progress):.3f}",
             len(w), protocol.length] for name, w in evaluations.items()]
    print(f"\n{label}: {params:,} parameters" if params else f"\n{label}")
    print(tabulate(rows, ["text", "perplexity", "windows", "tokens/window"], tablefmt="github"))
    return 0


def cmd_finetune(args) -> int:
    from tabulate import tabulate

    from .data import batches, finetune_data, protocol_data
    from .evaluate import perplexity
    from .export import load, save
    from .finetune import finetune

    sliced, tokenizer = load(args.model)
    if tokenizer is None:
        raise FxSliceError(f"{args.model} has no tokenizer files")
    output = Path(args.output or f"{str(args.model).rstrip('/')}-ft")
    if output.exists() and not args.overwrite:
        raise FxSliceError(f"{output} already exists (pass --overwrite to replace it)")
    protocol = _protocol(args)
    train, val = finetune_data(tokenizer, protocol, args.train_windows, args.val_windows)
    progress = not args.no_progress
    merged, report = finetune(sliced, batches(train, args.batch_size), batches(val, args.batch_size),
                              lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lr=args.lr,
                              epochs=args.epochs, eval_every=args.eval_every, patience=args.patience,
                              include_shortcuts=args.include_shortcuts, progress=progress)
    record = {k: v for k, v in sliced.record.items() if k not in ("program_sha256",)}
    perplexities = {}
    if not args.no_eval:
        _, evaluations = protocol_data(tokenizer, protocol)
        rows = []
        for name, windows in evaluations.items():
            before = perplexity(sliced, batches(windows, args.eval_batch_size), f"sliced ppl {name}", progress)
            after = perplexity(merged, batches(windows, args.eval_batch_size), f"fine-tuned ppl {name}", progress)
            perplexities[name] = after
            rows.append([name, f"{before:.2f}", f"{after:.2f}"])
        print(tabulate(rows, ["text", "ppl sliced", "ppl sliced + LoRA"], tablefmt="github"))
    record.update({"perplexity_before_finetune": record.get("perplexity"), "perplexity": perplexities,
                   "finetune": {**report.to_dict(), "train_windows": args.train_windows, "val_windows": args.val_windows,
                                "lr": args.lr, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                                "batch_size": args.batch_size, "epochs": args.epochs}})
    generator = None
    if sliced.generator is not None:
        from .generate import retarget

        generator = retarget(sliced.generator, merged)
    save(merged, output, tokenizer, record, overwrite=args.overwrite, generator=generator)
    print(f"fine-tuned {report.steps} steps in {report.seconds:.0f}s (best at step {report.best_step}, "
          f"validation ppl {report.to_dict()['initial_val_ppl']:.2f} -> {report.to_dict()['best_val_ppl']:.2f}); saved to {output}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    return 0


def cmd_generate(args) -> int:
    import time

    from .export import load

    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise FxSliceError(f"{args.model} has no tokenizer files")
    prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    started = time.perf_counter()
    tokens = model.generate(prompt, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    seconds = time.perf_counter() - started
    print(tokenizer.decode(tokens[0], skip_special_tokens=True))
    new = tokens.shape[1] - prompt.shape[1]
    print(f"\n[{new} tokens in {seconds:.2f}s, {new / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .assets import load_model
    from .compress import inspect

    model, _ = load_model(args.model)
    inspect(model)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        commands = {"compress": cmd_compress, "eval": cmd_eval, "finetune": cmd_finetune, "generate": cmd_generate,
                    "inspect": cmd_inspect}
        return commands[args.command](args)
    except FxSliceError as exc:
        print(f"fxslice: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
