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
import copy
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
GEMMA4_TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
               "max_position_embeddings": 64, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
               "num_kv_shared_layers": 2}  # the text part of Gemma 4's speculative-decoding assistants
EXPLICIT = {  # model type -> constructor arguments where the default config builds no model (a real checkpoint's
    # config names these; the defaults leave them unset or inconsistent: experts, layer kinds, rope per layer
    # kind, shared key/value layers, indexer sizes)
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "state_size": 16},  # heads x head size = 2 x width
    "bamba": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 16,
              "attn_layer_indices": [1]},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "mamba_d_state": 16},
    "zamba": {"layer_types": ["hybrid", "hybrid"], "layers_block_type": ["hybrid", "hybrid"]},  # one shared
    # transformer tied across hybrid layers needs two of them
    "xlstm": {"num_heads": 4},
    "musicgen_decoder": {"num_codebooks": 1},  # the decoder of musicgen reads batch x codebooks rows
    "musicgen_melody_decoder": {"num_codebooks": 1},
    "dots3_note": {"text_config": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
                                   "shared_experts_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                   "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                   "v_head_dim": 16, "head_dim": 16, "max_position_embeddings": 64, "sliding_window": 32,
                                   "index_topk": 8, "index_head_dim": 16, "index_n_heads": 2, "pad_token_id": 1,
                                   "bos_token_id": 1, "eos_token_id": 1,
                                   "layer_types": ["indexed_attention", "sliding_attention"], "swa_num_attention_heads": 4,
                                   "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32,
                                   "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16},
                   "vision_config": {"hidden_size": 64, "adapter_in_dim": 64, "adapter_out_dim": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "intermediate_size": 128, "mlp_layer_types": ["dense"]},
                   "audio_config": {"hidden_size": 64, "adapter_input_size": 64, "adapter_out_dim": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128}},
    "prophetnet": {"num_encoder_layers": 2, "num_decoder_layers": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                   "num_decoder_attention_heads": 4},
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [32, 32],
                 "attention_head_size": 16, "feed_forward_size": 128, "local_attn_chunk_length": 8,
                 "lsh_attn_chunk_length": 8, "num_buckets": 4, "hash_seed": 0},
    "xlnet": {"d_inner": 128, "attn_type": "uni"},  # "bi" attends to later tokens
    "qwen4_exp": {"text_config": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
                                  "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
                                  "num_experts_per_tok": 2, "layer_types": ["linear_attention", "indexed_attention"],
                                  "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 16, "indexer_compress_ratio": 4}},
    "blt": {"encoder_hash_byte_group_vocab": 64, "encoder_hash_byte_group_size": [3, 4], "local_attention_window_len": 32,
            "patcher_config": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                               "intermediate_size": 128, "max_position_embeddings": 64, "sliding_window": 32},
            "encoder_config": {"vocab_size": 128, "hidden_size": 64, "hidden_size_global": 128, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64},
            "decoder_config": {"vocab_size": 128, "hidden_size": 64, "hidden_size_global": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64},
            "global_config": {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                              "intermediate_size": 256, "max_position_embeddings": 64}},
    "gemma4_assistant": {"backbone_hidden_size": 64, "num_centroids": 16, "centroid_intermediate_top_k": 4,
                         "text_config": {**GEMMA4_TEXT, "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "gemma4_unified_assistant": {"backbone_hidden_size": 64, "num_centroids": 16, "centroid_intermediate_top_k": 4,
                                 "text_config": GEMMA4_TEXT},
    "moss_transcribe_diarize": {"audio_config": {"num_mel_bins": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                                                 "intermediate_size": 128, "hidden_size": 64, "max_source_positions": 64}},
    "xmod": {"default_language": "en_XX"},
    # the defaults' 16 + 40 + 16 layers, shrunk keeping one recurrent layer for the loops to run again
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1, "num_hidden_layers": 3,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "kolibri1_1": {"index_num_heads": 2},  # at most the query heads per key/value head
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
}
DECODER = {"is_decoder": True}  # encoder-decoder stacks offered as causal LMs run causally only as decoders
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def tiny_config(model_type: str):
    """The default config of ``model_type`` rebuilt with the tiny sizes (so that the values its
    constructor derives from them follow), then shrunk attribute by attribute where needed."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - a default that does not validate (Gemma 4's assistants): the explicit sizes
        default = AutoConfig.for_model(model_type, **EXPLICIT.get(model_type, {}))
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
    sizes = {key: value for key, value in sizes.items() if _settable(default, key)}
    try:
        config = AutoConfig.for_model(model_type, **sizes)
    except Exception:  # noqa: BLE001 - a constructor that refuses some size: shrink the default instead
        config = default
    text = getattr(config, "text_config", None)
    for target in [config] + ([text] if text is not None and text is not config else []):
        built = target is config and config is not default  # what the constructor took stays as it made it
        for key in SHRINK:
            value = _tiny(target, key)
            if not (built and key in sizes) and _int_attribute(target, key) and getattr(target, key) != value \
                    and _settable(target, key):
                _set(target, key, value)
        for key in TOKEN_IDS:
            current = getattr(target, key, None)
            if isinstance(current, int) and current >= 128:
                _set(target, key, 1)
        kinds = _layer_kinds(target)
        if kinds is not None and list(target.layer_types) != kinds and "layer_types" not in EXPLICIT.get(model_type, {}):
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


def _settable(config, key: str) -> bool:
    """Whether the constructor takes ``key``: not a property without a setter (also where ``attribute_map``
    leads: Bamba's ``layer_types``, xLSTM's ``v_head_dim``), nor one whose setter refuses every value
    (ProphetNet's ``num_hidden_layers``, XLNet's ``max_position_embeddings``)."""
    target = getattr(type(config), "attribute_map", {}).get(key, key)
    found = getattr(type(config), target, None)
    if isinstance(found, property) and found.fset is None:
        return False
    try:
        setattr(copy.deepcopy(config), key, getattr(config, key))
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - refusing another way is the constructor's business
        pass
    return True


def _set(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, NotImplementedError):  # a derived property: it follows what it is derived from
        pass


def try_family(model_type: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import fxslice
    from fxslice.hf import vocab_size_of

    record = {"model_type": model_type}
    try:
        model_class = causal_lm_class(model_type)
        config_type = getattr(model_class, "config_class", None) and model_class.config_class.model_type
        config = tiny_config(config_type or model_type)  # MusicGen's causal LM takes its decoder's config
        torch.manual_seed(0)
        model = (model_class._from_config(config) if config_type not in (None, model_type)
                 else AutoModelForCausalLM.from_config(config)).eval()
        vocab = vocab_size_of(model)
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


def causal_lm_class(model_type: str):
    """The class transformers' causal-LM mapping names for ``model_type``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


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
