#!/usr/bin/env python
"""Census: every causal-LM model type of the installed transformers, tried on a tiny random config.

For each model type in transformers' causal-LM mapping a config is shrunk from
``AutoConfig.for_model`` (2 layers — hybrids keep one layer of each kind —, width 64, 4 heads,
vocabulary 128, small experts), the model is built with random weights, and fxslice is asked to
compress it at sparsity 0 (compared with the model: exact when the logits agree within 1e-4) and at
25% (finite logits, true parameter count). The result per family is one of

    exact       sparsity 0 reproduces the model, 25% slices it
    inexact     sparsity 0 runs but differs from the model
    refused     fxslice's own error (``FxSliceError``/``GraphStructureError``): the message is listed
    failed      any other exception (the first line is listed)
    no config   transformers cannot build a tiny model of it (not fxslice's business)

Families run in a worker process; one that exceeds ``--timeout`` seconds or crashes the worker is
recorded as failed (the worker is restarted for the rest). Results go to ``runs/bench/census.jsonl`` and a table is printed.

    python scripts/census.py                       # all (~15-25 min on 2 cores)
    python scripts/census.py --only llama mixtral  # some (added to the results of earlier runs)
    python scripts/census.py --summary             # the exact families on one line (README)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHRINK = {  # attribute -> tiny value, applied where the config has the attribute
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "hidden_dim": 128,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16,
    "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "sliding_window": 32, "attention_chunk_size": 32,
    "n_group": 1, "topk_group": 1,
}
FILL = {"head_dim": 16, "num_key_value_heads": 2}  # sizes some default configs leave None (derived nowhere)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
FILL_MOE = {"num_experts_per_tok": 2}  # left None by mixture-of-experts configs that do have experts (DeepSeek-V2)
EXPLICIT = {  # model type -> constructor arguments where the default config builds no model (a real checkpoint's
    # config names these; the defaults leave them unset or inconsistent: experts, layer kinds, rope per layer
    # kind, shared key/value layers, indexer sizes)
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
}
DECODER = {"is_decoder": True}  # encoder-decoder stacks offered as causal LMs run causally only as decoders
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def tiny_config(model_type: str):
    """The default config of ``model_type`` rebuilt with the tiny sizes (so that the values its
    constructor derives from them follow), then shrunk attribute by attribute where needed."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    sizes = {key: _tiny(default, key) for key in SHRINK if _int_attribute(default, key)}
    sizes.update({key: value for key, value in FILL.items() if key in vars(default) and vars(default)[key] is None})
    if any(_int_attribute(default, key) for key in EXPERT_COUNTS):
        sizes.update({key: value for key, value in FILL_MOE.items() if key in vars(default) and vars(default)[key] is None})
    sizes.update({key: value for key, value in DECODER.items() if key in vars(default)})
    kinds = _layer_kinds(default)
    if kinds is not None:
        sizes["layer_types"] = kinds
        sizes.update({key: len(kinds) for key in LAYER_COUNTS if _int_attribute(default, key)})
    if _int_attribute(default, "rotary_dim"):  # partial rotary: at most the tiny head size
        sizes["rotary_dim"] = 8
    if _int_attribute(default, "qk_rope_head_dim"):  # multi-head latent attention: rotary on the rope part
        sizes["head_dim"] = SHRINK["qk_rope_head_dim"]
    sizes.update(EXPLICIT.get(model_type, {}))
    if isinstance(sizes.get("layer_types"), list):
        sizes.update({key: len(sizes["layer_types"]) for key in LAYER_COUNTS if _int_attribute(default, key)})
    try:
        config = AutoConfig.for_model(model_type, **sizes)
    except Exception:  # noqa: BLE001 - a constructor that refuses some size: shrink the default instead
        config = default
    text = getattr(config, "text_config", None)
    for target in [config] + ([text] if text is not None and text is not config else []):
        built = target is config and config is not default  # what the constructor took stays as it made it
        for key in SHRINK:
            value = _tiny(target, key)
            if not (built and key in sizes) and _int_attribute(target, key) and getattr(target, key) != value:
                _set(target, key, value)
        for key in TOKEN_IDS:
            current = getattr(target, key, None)
            if isinstance(current, int) and current >= 128:
                _set(target, key, 1)
        kinds = _layer_kinds(target)
        if kinds is not None and list(target.layer_types) != kinds:
            target.layer_types = kinds
            for key in LAYER_COUNTS:
                if _int_attribute(target, key):
                    _set(target, key, len(kinds))
    return config


LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")
KV_HEADS = {"num_key_value_heads": "num_attention_heads"}  # a key/value head count -> the query head count


def _tiny(config, key: str) -> int:
    """The tiny value of ``key`` for ``config``: a key/value head count stays equal to the query head count
    where the default has them equal (multi-head attention, and multi-head latent attention, whose
    shapes torch.export checks against each other), else :data:`SHRINK`'s."""
    heads = KV_HEADS.get(key)
    if heads is not None and _int_attribute(config, key) and _int_attribute(config, heads) \
            and getattr(config, key) == getattr(config, heads):
        return SHRINK[heads]
    return SHRINK[key]


def _int_attribute(config, key: str) -> bool:
    try:
        value = getattr(config, key, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read
        return False
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_kinds(config):
    """One layer of each kind of a hybrid's ``layer_types`` (two layers of a uniform one); None when
    the config has no settable list."""
    try:
        kinds = getattr(config, "layer_types", None)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(kinds, (list, tuple)) or not kinds or isinstance(getattr(type(config), "layer_types", None), property):
        return None
    distinct = list(dict.fromkeys(kinds))
    return distinct if len(distinct) > 1 else [kinds[0]] * 2


def _set(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except AttributeError:  # a derived property: it follows the attributes it is derived from
        pass


def try_family(model_type: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import fxslice

    record = {"model_type": model_type}
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        vocab = model.get_input_embeddings().num_embeddings
    except Exception as exc:  # noqa: BLE001 - transformers' own limits are recorded, not fixed
        return {**record, "status": "no config", "error": f"{type(exc).__name__}: {_first_line(exc)}"}
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (2, 16), generator=generator) for _ in range(2)]
    ids = torch.randint(0, vocab, (2, 11), generator=generator)
    try:
        exact = fxslice.compress(model, batches, 0.0, progress=False)
        with torch.no_grad():
            difference = float((exact(ids).logits - _logits(model, ids)).abs().max())
        if not difference < 1e-4:
            return {**record, "status": "inexact", "error": f"max |logit difference| {difference:.2e}"}
        sliced = fxslice.compress(model, batches, 0.25, progress=False)
        with torch.no_grad():
            finite = bool(torch.isfinite(sliced(ids).logits).all())
        return {**record, "status": "exact" if finite else "inexact",
                "fraction_at_25": sliced.fxslice.param_fraction, "error": "" if finite else "non-finite at 25%"}
    except fxslice.FxSliceError as exc:
        return {**record, "status": "refused", "error": f"{type(exc).__name__}: {_first_line(exc)}"}
    except Exception as exc:  # noqa: BLE001
        return {**record, "status": "failed", "error": f"{type(exc).__name__}: {_first_line(exc)}"}


def _logits(model, ids):
    """The model's own logits, without a KV cache where it takes ``use_cache``."""
    try:
        return model(ids, use_cache=False).logits
    except TypeError:
        return model(ids).logits


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def worker(names: list[str], out: Path, timeout: int) -> None:
    import signal
    import warnings

    def give_up(*_):
        raise TimeoutError(f"more than {timeout} s")

    signal.signal(signal.SIGALRM, give_up)

    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    for name in names:
        with out.open("a") as handle:
            handle.write(json.dumps({"model_type": name, "status": "started"}) + "\n")
        signal.alarm(timeout)
        try:
            record = try_family(name)
        except TimeoutError as exc:
            record = {"model_type": name, "status": "failed", "error": f"TimeoutError: {exc}"}
        signal.alarm(0)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def results(out: Path) -> dict[str, dict]:
    """The last record per family (a 'started' one left alone means the worker died on it)."""
    found: dict[str, dict] = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        record = json.loads(line)
        found[record["model_type"]] = record
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, metavar="MODEL_TYPE")
    parser.add_argument("--out", default="runs/bench/census.jsonl")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per family")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--summary", action="store_true", help="list the exact families on one line")
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.worker:
        worker(args.worker, out, args.timeout)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and out.exists():
        out.unlink()
    names = args.only or model_types()
    again = set(args.only or [])  # families named with --only run again even when recorded
    while True:
        done = results(out)
        todo = [n for n in names if n not in done or n in again]
        again = set()
        crashed = [n for n in names if done.get(n, {}).get("status") == "started" and n not in todo]
        for name in crashed:  # the worker died (or timed out) on it
            with out.open("a") as handle:
                handle.write(json.dumps({"model_type": name, "status": "failed",
                                         "error": f"worker crashed or hung for more than {2 * args.timeout} s"}) + "\n")
        if not todo:
            break
        worker_process = subprocess.Popen([sys.executable, __file__, "--worker", *todo, "--out", str(out),
                                           "--timeout", str(args.timeout)])
        while worker_process.poll() is None:  # hung outside Python (no alarm gets through): killed,
            time.sleep(2)                     # and the family in progress is recorded failed
            if out.exists() and time.time() - out.stat().st_mtime > 2 * args.timeout:
                worker_process.kill()
                worker_process.wait()
    final = {n: r for n, r in results(out).items() if n in names}
    counts = Counter(r["status"] for r in final.values())
    print(tabulate(sorted(counts.items()), ["status", "families"], tablefmt="github"))
    print()
    if args.summary:  # the exact families on one line, a row for each of the others
        print("exact: " + ", ".join(n for n, r in sorted(final.items()) if r["status"] == "exact") + "\n")
        final = {n: r for n, r in final.items() if r["status"] != "exact"}
    rows = [[n, r["status"], f"{100 * r['fraction_at_25']:.0f}%" if "fraction_at_25" in r else "", r.get("error", "")[:140]]
            for n, r in sorted(final.items())]
    print(tabulate(rows, ["model type", "status", "params at 25%", "error"], tablefmt="github"))


if __name__ == "__main__":
    main()
