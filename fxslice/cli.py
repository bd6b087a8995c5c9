"""Command line: ``fxslice compress | eval | finetune | quantize | generate | compile | inspect`` (``fxslice COMMAND --help``).

Parses arguments, calls a job of :mod:`fxslice.jobs`, prints its typed result. Option choices and
defaults come from the library's constants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .distributed import init_from_environment, is_writer, shutdown
from .errors import FxSliceError
from .jobs.assets import DTYPES, SHIPPED
from .jobs.data import CORPORA, Protocol
from .options import ALLOCATIONS, BASES, SPLITS, FINETUNE_METHODS as METHODS, PCA_SIGNALS, QUANT_SCHEMES, SAVE_FORMATS

PROTOCOL = Protocol()  # the default data protocol


def _protocol_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data protocol")
    corpora = ", ".join(CORPORA)
    group.add_argument("--calibration", default=PROTOCOL.calibration,
                       help=f"calibration text: {corpora}, file:PATH or hf:NAME[:CONFIG]:SPLIT:COLUMN (default: %(default)s)")
    group.add_argument("--calibration-windows", type=_positive_int, default=PROTOCOL.calibration_windows,
                       help="number of calibration windows (default: %(default)s)")
    group.add_argument("--eval", nargs="+", default=list(PROTOCOL.evaluation), metavar="CORPUS",
                       help="evaluation texts; the calibration text is evaluated on its last windows (default: %(default)s)")
    group.add_argument("--eval-windows", type=_positive_int, default=PROTOCOL.evaluation_windows,
                       help="windows per evaluation text (default: %(default)s)")
    group.add_argument("--length", type=int, default=PROTOCOL.length, help="tokens per window (default: %(default)s)")
    group.add_argument("--eval-batch-size", type=_positive_int, default=4, help="windows per evaluation batch (default: %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _integer_at_least(least: int, wording: str):
    """An argparse type: an integer >= ``least``, refused in ``wording``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value
    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_count = _integer_at_least(0, "an integer >= 0")  # 0 switches the thing off


def _protocol(args) -> Protocol:
    return Protocol(args.calibration, args.calibration_windows, tuple(args.eval), args.eval_windows, args.length)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxslice", description="SliceGPT for any Hugging Face causal LM, as a torch.fx graph pass.")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", required=True)

    comp = commands.add_parser("compress", help="slice a model, print dense vs sliced perplexity, save the result",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comp.add_argument("--model", default=next(iter(SHIPPED)),
                      help=f"{' or '.join(SHIPPED)} (shipped, offline), a hub id or a local folder")
    comp.add_argument("--sparsity", type=float, default=None,
                      help="fraction of the stream width to delete, in [0, 1) (SliceGPT; default 0.25 unless "
                           "--target-params is given; with --stock: 0, and --target-params 0.8 unless "
                           "--hidden-sparsity is given)")
    comp.add_argument("--target-params", type=float, default=None, metavar="F",
                      help="keep at most this fraction of the dense parameter count (stream and MLP hidden units "
                           "sliced together), instead of --sparsity")
    comp.add_argument("--hidden-sparsity", type=float, default=None, metavar="H",
                      help="with --sparsity: also delete this fraction of every MLP's hidden units "
                           "(down projection refitted)")
    comp.add_argument("--output", default=None, help="folder to save the sliced model to (default: runs/MODEL-SPARSITY)")
    comp.add_argument("--no-save", action="store_true", help="do not save the sliced model")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    comp.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per batch")
    comp.add_argument("--dtype", choices=list(DTYPES), default=None,
                      help="model dtype (default: float32; with --stream the checkpoint's own)")
    comp.add_argument("--device", default="cpu", help="torch device for model and calibration")
    comp.add_argument("--stream", action="store_true",
                      help="read the checkpoint block by block instead of loading the model (models larger than "
                           "memory; the dense model is not evaluated)")
    comp.add_argument("--offload-dir", default=None, metavar="DIR",
                      help="keep finished sliced weights and cached activations in this folder instead of memory")
    comp.add_argument("--pca-signal", choices=PCA_SIGNALS, default=PCA_SIGNALS[0],
                      help="PCA of the stream value (reference code) or of the norm output (paper Eq. 8)")
    comp.add_argument("--slice-head", action="store_true", help="also slice the head's input position")
    comp.add_argument("--basis-span", type=int, default=1,
                      help="with --basis block: this many consecutive blocks share one basis (the shortcuts between "
                           "them removed: fewer parameters, one basis fitting more positions)")
    comp.add_argument("--basis", choices=BASES, default=None,
                      help="one PCA basis per block (default): the block's inner shortcut becomes the identity and is "
                           "removed (smaller, faster, lower perplexity); one per stream position (the SliceGPT paper); "
                           "one for the whole stream (no shortcut left at all; every block in memory at once); "
                           "or none: the stream unrotated and whole, only MLP units cut (the default with --stock)")
    comp.add_argument("--stock", action="store_true",
                      help="only cut what a stock Transformers config can express (unrotated stream, the same MLP "
                           "width in every layer), so that --format transformers can write the result")
    comp.add_argument("--format", choices=SAVE_FORMATS, default="fxslice", dest="save_format",
                      help="fxslice: the sliced program + weights (fxslice.load); transformers: a stock checkpoint "
                           "that from_pretrained, lm-eval and llama.cpp's converter load without fxslice (implies --stock)")
    comp.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                      help="MLP hidden units kept: the same fraction in every block, by each unit's share of its "
                           "block's output energy, or each MLP's cut by the divergence it alone causes (measured; "
                           "energy and measured: dense MLPs, not with --stream)")
    comp.add_argument("--split", choices=SPLITS, default="measured",
                      help="with --target-params: measured (slice a few splits of the budget between the stream width "
                           "and the MLP units on a quarter of the calibration windows, keep the one closest to the model "
                           "on held-out windows, then compress it on all) or fixed (MLP units cut 2.3x the stream's share)")
    comp.add_argument("--stream-sparsity", type=float, default=None,
                      help="with --target-params: cut this fraction of the stream width and meet the rest of the budget "
                           "with MLP units (no search)")
    comp.add_argument("--value-sparsity", type=float, default=None,
                      help="also cut this fraction of every attention's value dimensions per key/value group (the "
                           "output projection refitted; the KV cache's values shrink with it)")
    comp.add_argument("--key-sparsity", type=float, default=None,
                      help="also cut this fraction of every attention's query/key dimensions per key/value group, "
                           "in the units its rotary embedding keeps together (the KV cache's keys shrink with it)")
    comp.add_argument("--round-to", type=int, default=8, help="round slice widths down to a multiple of this")
    comp.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    comp.add_argument("--no-eval", action="store_true", help="skip all perplexity evaluation")
    comp.add_argument("--json", default=None, help="also write the figures to this JSON file")
    comp.add_argument("--max-cache-len", type=_count, default=1024,
                      help="KV-cache length of the saved generation program (0: save no generation program)")
    comp.add_argument("--cache-batch-size", type=_positive_int, default=1,
                      help="sequences the saved KV-cache program generates at once (fewer are padded)")
    comp.add_argument("--compile", nargs="*", default=None, metavar="DEVICE",
                      help="after saving, build AOTInductor packages for these devices (the default, without "
                           "devices: cpu, and cuda when present, whenever a C++ compiler is found)")
    comp.add_argument("--no-compile", action="store_true", help="save the exported programs only (no AOTInductor package)")
    comp.add_argument("--quantize", choices=QUANT_SCHEMES, default=None, metavar="SCHEME",
                      help=f"also quantise the saved slice's Linears (torchao, weight-only): {', '.join(QUANT_SCHEMES)}")
    comp.add_argument("--group-size", type=_positive_int, default=32, help="int4: inputs per scale and zero point")
    comp.add_argument("--plot-spectra", default=None, metavar="PNG", help="save the eigenvalue spectra of every position")
    _protocol_args(comp)

    ev = commands.add_parser("eval", help="perplexity (default) or lm-eval zero-shot tasks of a dense model or a saved sliced folder",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("model", help="a folder saved by fxslice, a shipped name, a hub id or a HF folder")
    ev.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dense model dtype")
    ev.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                    help="run lm-eval on these tasks instead of perplexity (e.g. kjv_verse_end, piqa, arc_easy, hellaswag)")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    ev.add_argument("--batch-size", type=_positive_int, default=4, help="lm-eval: sequences per batch")
    ev.add_argument("--max-length", type=_positive_int, default=2048, help="lm-eval: longest context in tokens")
    _protocol_args(ev)

    ft = commands.add_parser("finetune", help="recovery fine-tuning (LoRA or full, language-model loss or distillation) "
                                              "of a saved sliced model; saves the result",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ft.add_argument("model", help="a folder saved by fxslice compress")
    ft.add_argument("--output", default=None, help="folder for the fine-tuned model (default: MODEL-ft)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ft.add_argument("--train-windows", type=_positive_int, default=64, help="training windows (after the calibration windows)")
    ft.add_argument("--val-windows", type=_positive_int, default=8, help="validation windows for early stopping")
    ft.add_argument("--batch-size", type=_positive_int, default=4, help="training windows per step")
    ft.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training windows")
    ft.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 5e-4 for lora, 2e-5 for full)")
    ft.add_argument("--method", choices=METHODS, default=METHODS[0],
                    help="lora: LoRA adapters merged into the weights; full: train every weight")
    ft.add_argument("--distill", action="store_true",
                    help="learn the dense model's logits (KL at --temperature) instead of the next tokens")
    ft.add_argument("--teacher", default=None,
                    help="--distill: the dense model (shipped name, hub id or folder; default: the folder's source model)")
    ft.add_argument("--temperature", type=float, default=2.0, help="--distill: softmax temperature of both logits")
    ft.add_argument("--lora-r", type=_positive_int, default=32, help="LoRA rank")
    ft.add_argument("--lora-alpha", type=float, default=10.0, help="LoRA alpha")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    ft.add_argument("--eval-every", type=_positive_int, default=4, help="steps between validation passes")
    ft.add_argument("--patience", type=_positive_int, default=2, help="validation passes without improvement before stopping")
    ft.add_argument("--include-shortcuts", action="store_true", help="also put adapters on shortcut matrices and norm affines")
    ft.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    ft.add_argument("--json", default=None, help="also write the figures to this JSON file")
    _protocol_args(ft)

    qu = commands.add_parser("quantize", help="weight-only quantisation (torchao) of a saved sliced folder; perplexity before/after",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    qu.add_argument("model", help="a folder saved by fxslice compress or finetune")
    qu.add_argument("--scheme", choices=QUANT_SCHEMES, default=QUANT_SCHEMES[0],
                    help="int8: int8 weights, one scale per row; int4: int4 in groups of --group-size inputs (head int8)")
    qu.add_argument("--group-size", type=_positive_int, default=32, help="int4: inputs per scale and zero point")
    qu.add_argument("--output", default=None, help="folder for the quantised model (default: MODEL-SCHEME)")
    qu.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    qu.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    qu.add_argument("--no-compile", action="store_true", help="save the exported programs only (no AOTInductor package)")
    _protocol_args(qu)

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

    cmp = commands.add_parser("compile", help="build AOTInductor packages (prefill and KV-cache decode) of a saved folder",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cmp.add_argument("model", help="a folder saved by fxslice compress or finetune")
    cmp.add_argument("--device", nargs="+", default=None, metavar="DEVICE",
                     help="devices to compile for (default: cpu, and cuda when present)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress lines")

    ins = commands.add_parser("inspect", help="print the residual-stream structure fxslice finds")
    ins.add_argument("model", help="a shipped name, a hub id or a HF folder")
    return parser


def _compile_devices(args, by_default: bool = True) -> list[str] | None:
    """What to compile after saving: the devices given; else (``by_default``: what is saved can be
    compiled) the default devices when a C++ compiler is found (None, with a one-line warning, when
    none is); None with ``--no-compile``."""
    if getattr(args, "no_compile", False):
        if args.__dict__.get("compile"):
            raise FxSliceError("--compile and --no-compile contradict each other: give one")
        return None
    if args.__dict__.get("compile") is not None:
        return args.compile
    if not by_default:
        return None
    from .runtime.compiled import cpp_compiler

    if cpp_compiler() is None:
        print("fxslice: warning: no C++ compiler found: the folder keeps its exported programs (install g++ for the "
              "AOTInductor package, which generates several times faster)", file=sys.stderr)
        return None
    return []


def cmd_compress(args) -> int:
    from .jobs.compress import compress_job

    stock = args.stock or args.save_format == "transformers"
    if args.sparsity is None and args.target_params is None:  # SliceGPT's 25%; stock: MLP units, 80% of the parameters
        if stock and args.hidden_sparsity is None:
            args.target_params = 0.8
        else:
            args.sparsity = 0.0 if stock else 0.25
    size = f"{args.sparsity:g}" if args.target_params is None else f"p{args.target_params:g}"
    size += "-stock" if stock else ""
    output = None if args.no_save else (args.output or f"runs/{Path(args.model).name}-{size}")
    job = compress_job(args.model, args.sparsity, _protocol(args), target_params=args.target_params,
                       hidden_sparsity=args.hidden_sparsity, allocation=args.allocation, split=args.split,
                       stream_sparsity=args.stream_sparsity, value_sparsity=args.value_sparsity,
                       key_sparsity=args.key_sparsity, dtype=args.dtype, device=args.device,
                       batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       evaluate_dense=not (args.no_dense or args.no_eval), evaluate=not args.no_eval, output=output,
                       overwrite=args.overwrite, progress=not args.no_progress, max_cache_len=args.max_cache_len,
                       plot_spectra=args.plot_spectra, pca_signal=args.pca_signal, slice_head=args.slice_head,
                       basis=args.basis, basis_span=args.basis_span, round_to=args.round_to, stream=args.stream, offload_dir=args.offload_dir,
                       cache_batch_size=args.cache_batch_size,
                       compile_devices=None if args.no_save else _compile_devices(args, args.save_format != "transformers"),
                       stock=stock, save_format=args.save_format, quantize=args.quantize, group_size=args.group_size)
    if not is_writer():
        return 0
    print()
    result = job.result
    if result.split_search is not None:
        search = result.split_search
        print(f"the budget's split, measured ({search.calibration_windows} calibration and {search.held_out_windows} "
              f"held-out batches):\n{search.table()}\n")
    print(job.table())
    print(f"\nshortcut/affine parameters included above: {result.added_param_count:,}; "
          f"compression time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    print(f"peak RSS: {job.peak_rss_mb:.0f} MiB")
    if job.saved and args.save_format == "transformers":
        print(f"saved to {job.saved}  (a stock Transformers checkpoint: AutoModelForCausalLM.from_pretrained "
              "loads it, no fxslice needed)")
    elif job.saved:
        print(f"saved to {job.saved}  (load with fxslice.load; without fxslice: torch.export.load + safetensors, "
              "see the README's 'Saved folders')")
    if job.quantized is not None:
        print(job.quantized.summary)
    _report_compiled(job.compiled)
    if job.spectra_plot:
        print(f"spectra plot: {job.spectra_plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(job.to_json(), indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from .jobs.evaluate import evaluate_job

    result = evaluate_job(args.model, _protocol(args), dtype=args.dtype, eval_batch_size=args.eval_batch_size,
                          tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                          batch_size=args.batch_size, max_length=args.max_length, progress=not args.no_progress)
    print(f"\n{result.title}")
    print(result.table())
    return 0


def cmd_finetune(args) -> int:
    from .jobs.finetune import finetune_job

    result = finetune_job(args.model, _protocol(args), output=args.output, overwrite=args.overwrite,
                          train_windows=args.train_windows, val_windows=args.val_windows, batch_size=args.batch_size,
                          eval_batch_size=args.eval_batch_size, evaluate=not args.no_eval,
                          progress=not args.no_progress, method=args.method, distill=args.distill,
                          teacher=args.teacher, epochs=args.epochs,
                          **({"temperature": args.temperature} if args.distill else {}),
                          eval_every=args.eval_every, patience=args.patience,
                          **({} if args.lr is None else {"lr": args.lr}),
                          **({"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                              "include_shortcuts": args.include_shortcuts} if args.method == "lora" else {}))
    if result.perplexities_after:
        print(result.table())
    print(result.summary)
    if args.json:
        Path(args.json).write_text(json.dumps(result.record, indent=2, default=str))
    return 0


def cmd_quantize(args) -> int:
    from .jobs.quantize import quantize_job

    result = quantize_job(args.model, args.scheme, _protocol(args), output=args.output, overwrite=args.overwrite,
                          group_size=args.group_size, evaluate=not args.no_eval, eval_batch_size=args.eval_batch_size,
                          compile_devices=_compile_devices(args), progress=not args.no_progress)
    if result.perplexities_after:
        print(result.table())
    print(result.summary)
    return 0 if _report_compiled(result.compiled) else 1


def cmd_generate(args) -> int:
    from .jobs.generation import generate_job

    result = generate_job(args.model, args.prompt, args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(result.text)
    print(f"\n[{result.new_tokens} tokens in {result.seconds:.2f}s, {result.tokens_per_second:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _report_compiled(outcomes, asked: bool = False) -> bool:
    """One line per device; True when every package was built, or (unless compiling was all that was
    ``asked``) skipped on purpose."""
    for outcome in outcomes:
        if outcome.failure or outcome.skipped:
            print(f"fxslice: {'note' if outcome.skipped and not asked else 'warning'}: {outcome.warning}", file=sys.stderr)
        else:
            print(f"compiled for {outcome.device}: {outcome.package} ({outcome.seconds:.0f} s)")
    return all(outcome.failure is None and (outcome.skipped is None or not asked) for outcome in outcomes)


def cmd_compile(args) -> int:
    from .runtime.compiled import compile_folder

    return 0 if _report_compiled(compile_folder(args.model, args.device, progress=not args.no_progress), asked=True) else 1


def cmd_inspect(args) -> int:
    from .jobs.compress import inspect_job

    print(inspect_job(args.model).table())
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        init_from_environment(getattr(args, "device", "cpu"))
        commands = {"compress": cmd_compress, "eval": cmd_eval, "finetune": cmd_finetune, "quantize": cmd_quantize,
                    "generate": cmd_generate, "compile": cmd_compile, "inspect": cmd_inspect}
        return commands[args.command](args)
    except FxSliceError as exc:
        print(f"fxslice: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
