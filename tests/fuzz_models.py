"""Random small models of every supported family (dense and mixture-of-experts) and a random mode of
``fxslice.compress``, drawn by hypothesis (used by tests/test_fuzz.py and scripts/fuzz.py).

A drawn :class:`FuzzCase` holds everything needed to rebuild one example: the family, the config
overrides handed to ``AutoConfig.for_model``, the dtype, a seed (weights, 1-D parameters, token ids
and padding all derive from it), the calibration and evaluation shapes, the mode (:data:`MODES`) with
its sparsities or parameter budget, and whether the case also streams the model from a checkpoint
written by the test and saves the slice. ``case.build()`` rebuilds the model, ``case.options()`` the
keyword arguments of ``compress``, ``case.reproducer()`` prints a snippet that reruns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import FAMILIES, MOE_FAMILIES, VOCAB

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("sparsity", "position", "hidden", "budget", "unrotated", "stock")
"""How a case is compressed: ``sparsity`` (the stream, block basis: the default), ``position`` (a basis per
position), ``hidden`` (the stream and the MLP units), ``budget`` (``target_params``, round_to 1),
``unrotated`` (``basis="none"``: the MLP units only) and ``stock`` (``stock=True`` with a budget)."""
BUDGET_MODES = ("budget", "stock")
EXPORT_LENGTH = 16  # fxslice captures with a [2, 16] example input: max_position_embeddings must allow it
MAX_POSITIONS = 64


# --- what each family's config calls things ----------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one family of :data:`tiny_models.FAMILIES` is drawn."""

    hidden: str = "hidden_size"
    layers: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    kv_heads: Optional[str] = "num_key_value_heads"  # GQA: a divisor of the head count; None: no GQA
    intermediate: Optional[str] = "intermediate_size"
    positions: Optional[str] = "max_position_embeddings"  # None: no position limit (ALiBi)
    head_dim: Optional[str] = None  # the config takes an explicit head_dim (hidden need not be heads*head_dim)
    head_dim_step: int = 2  # rotary dimensions must be even: partial rotary factors need a coarser step
    min_head_dim: int = 4
    tie: bool = True  # the config has tie_word_embeddings
    biases: tuple[str, ...] = ()  # boolean bias flags of the config
    flags: dict = field(default_factory=dict)  # other config keys -> the values drawn from
    extra: Optional[Callable] = None  # draw(fn, overrides) -> more overrides (sliding windows, ...)
    experts: Optional[str] = None  # mixture of experts: the config's expert count (top-k is num_experts_per_tok)
    expert_width: Optional[str] = None  # an expert's hidden units, when not ``intermediate``
    shared_width: Optional[str] = None  # a shared expert's hidden units


def _sliding_window(draw, overrides: dict) -> dict:
    """A small sliding window (shorter than the lengths drawn, so that it matters) or none."""
    if not draw(st.booleans()):
        return {}
    return {"sliding_window": draw(st.integers(2, 12))}


def _qwen2_window(draw, overrides: dict) -> dict:
    if not draw(st.booleans()):
        return {}
    layers = overrides["num_hidden_layers"]
    return {"use_sliding_window": True, "sliding_window": draw(st.integers(2, 12)),
            "max_window_layers": draw(st.integers(0, layers))}


def _layer_types(draw, overrides: dict) -> dict:
    """Gemma 2/3: a drawn mix of sliding and full attention layers with a small window."""
    layers = overrides["num_hidden_layers"]
    kinds = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers, max_size=layers))
    return {"layer_types": kinds, "sliding_window": draw(st.integers(2, 12))}


def _smollm3_nope(draw, overrides: dict) -> dict:
    return {"no_rope_layer_interval": draw(st.integers(1, 4))}


def _gptj_rotary(draw, overrides: dict) -> dict:
    head_dim = overrides["n_embd"] // overrides["n_head"]
    return {"rotary_dim": draw(st.sampled_from(list(range(2, head_dim + 1, 2))))}


LLAMA_LIKE = dict(head_dim="head_dim")
GPT_STYLE = dict(hidden="n_embd", layers="n_layer", heads="n_head", kv_heads=None, intermediate="n_inner",
                 positions="n_positions")

SPECS: dict[str, Family] = {
    "llama": Family(**LLAMA_LIKE, biases=("attention_bias", "mlp_bias")),
    "llama_tied": Family(**LLAMA_LIKE, tie=False, biases=("attention_bias", "mlp_bias")),  # always tied
    "mistral": Family(**LLAMA_LIKE, extra=_sliding_window),
    "qwen2": Family(extra=_qwen2_window),
    "qwen3": Family(**LLAMA_LIKE, biases=("attention_bias",)),
    "granite": Family(biases=("attention_bias", "mlp_bias"),
                      flags={"embedding_multiplier": (1.0, 12.0), "residual_multiplier": (0.22, 1.0),
                             "attention_multiplier": (0.5, 1.0), "logits_scaling": (1.0, 8.0)}),
    "smollm3": Family(biases=("attention_bias", "mlp_bias"), extra=_smollm3_nope),
    "phi3": Family(),
    "cohere": Family(biases=("attention_bias",), flags={"use_qk_norm": (False, True)}),
    "phi": Family(head_dim_step=4, flags={"qk_layernorm": (False, True)}),  # partial_rotary_factor 0.5
    "gptj": Family(**{**GPT_STYLE, "head_dim": None}, min_head_dim=8, extra=_gptj_rotary),
    "gpt_neox_parallel": Family(kv_heads=None, head_dim_step=8, biases=("attention_bias",)),  # rotary 0.25
    "gpt_neox_sequential": Family(kv_heads=None, head_dim_step=8, biases=("attention_bias",)),
    "falcon_new": Family(kv_heads="num_kv_heads", intermediate="ffn_hidden_size", biases=("bias",),
                         flags={"num_ln_in_parallel_attn": (None, 1, 2)}),
    "falcon_old": Family(kv_heads=None, intermediate="ffn_hidden_size", biases=("bias",)),  # multi-query
    "falcon_sequential": Family(kv_heads=None, intermediate="ffn_hidden_size", biases=("bias",),
                                flags={"multi_query": (False, True)}),
    "opt": Family(kv_heads=None, intermediate="ffn_dim", biases=("enable_bias",),
                  flags={"layer_norm_elementwise_affine": (True, False)}),
    "gpt2": Family(**GPT_STYLE, flags={"scale_attn_by_inverse_layer_idx": (False, True),
                                       "reorder_and_upcast_attn": (False, True)}),
    "gpt_bigcode": Family(**GPT_STYLE, flags={"multi_query": (True, False)}),
    "bloom": Family(layers="n_layer", heads="n_head", kv_heads=None, intermediate=None, positions=None),
    "starcoder2": Family(biases=("use_bias",), extra=_sliding_window),
    "stablelm": Family(head_dim_step=8, biases=("use_qkv_bias",),  # partial_rotary_factor 0.25
                       flags={"use_parallel_residual": (False, True), "qk_layernorm": (False, True)}),
    "gemma": Family(**LLAMA_LIKE, biases=("attention_bias",)),
    "gemma2": Family(**LLAMA_LIKE, biases=("attention_bias",), extra=_layer_types,
                     flags={"final_logit_softcapping": (30.0, None), "attn_logit_softcapping": (50.0, None)}),
    "gemma3_text": Family(**LLAMA_LIKE, biases=("attention_bias",), extra=_layer_types),
    "olmo": Family(biases=("attention_bias",), flags={"clip_qkv": (None, 0.5)}),
    "olmo2": Family(biases=("attention_bias",)),
    # mixtures of experts
    "mixtral": Family(experts="num_local_experts", extra=_sliding_window),
    "qwen2_moe": Family(experts="num_experts", expert_width="moe_intermediate_size",
                        shared_width="shared_expert_intermediate_size"),
    "qwen3_moe": Family(**LLAMA_LIKE, experts="num_experts", expert_width="moe_intermediate_size",
                        biases=("attention_bias",)),
    "olmoe": Family(experts="num_experts", flags={"norm_topk_prob": (False, True)}),
    "granitemoe": Family(experts="num_local_experts",
                         flags={"embedding_multiplier": (1.0, 12.0), "residual_multiplier": (0.22, 1.0)}),
    "phimoe": Family(experts="num_local_experts"),
    "gpt_oss": Family(**LLAMA_LIKE, experts="num_local_experts", extra=_sliding_window),
    "flex_olmo": Family(experts="num_experts"),
    "granitemoeshared": Family(experts="num_local_experts", shared_width="shared_intermediate_size"),
    "llama4_text": Family(**LLAMA_LIKE, experts="num_local_experts", shared_width="intermediate_size_mlp"),
}
assert set(SPECS) == set(FAMILIES) | set(MOE_FAMILIES), set(SPECS) ^ (set(FAMILIES) | set(MOE_FAMILIES))

# keys of FAMILIES' overrides that are drawn here instead (sizes, ties, biases)
_DRAWN = {"hidden_size", "n_embd", "n_layer", "n_head", "n_positions", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "num_kv_heads", "head_dim", "intermediate_size", "ffn_dim", "word_embed_proj_dim",
          "rotary_dim", "max_position_embeddings", "vocab_size", "pad_token_id", "bias",
          "embedding_multiplier", "residual_multiplier", "logits_scaling", "num_local_experts", "num_experts",
          "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
          "shared_intermediate_size", "sliding_window"}


# --- one example ---------------------------------------------------------------------------------------
@dataclass
class FuzzCase:
    family: str
    model_type: str
    overrides: dict
    dtype: str  # "float32" or "bfloat16"
    seed: int
    calib_batches: int
    calib_batch_size: int
    calib_length: int
    masked: bool  # calibration batches as dicts with a right-padded attention_mask
    eval_batch_size: int
    eval_length: int
    sparsity: float
    mode: str = "sparsity"  # one of MODES
    hidden_sparsity: float = 0.0  # modes hidden and unrotated
    target_params: float = 1.0  # modes budget and stock
    streamed: bool = False  # also compress a checkpoint of the model written by the test
    saved: bool = False  # also save the slice and load it back

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self):
        config = AutoConfig.for_model(self.model_type, **self.overrides)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= VOCAB:
                setattr(config, key, None)
        return config

    def build(self, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        """The model in ``dtype`` (default: the case's dtype), weights drawn from ``seed``: the
        initialiser under a seeded RNG, then every 1-D parameter ``normal_(0.3, 0.5)`` (non-trivial
        norm scales and biases make folding mistakes visible). The same seed gives the same weights
        in every dtype (the fp32 weights, cast)."""
        config = self.config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(config)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.normal_(0.3, 0.5, generator=generator)
        return model.to(dtype or self.torch_dtype).eval()

    def options(self, removal: bool = True) -> dict:
        """The keyword arguments of ``fxslice.compress`` for the case's mode; ``removal=False``: the same
        mode deleting nothing (sparsities 0, and for a budget mode its basis at sparsity 0)."""
        if self.mode == "sparsity":
            return {"sparsity": self.sparsity if removal else 0.0}
        if self.mode == "position":
            return {"sparsity": self.sparsity if removal else 0.0, "basis": "position"}
        if self.mode == "hidden":
            return {"sparsity": self.sparsity if removal else 0.0,
                    "hidden_sparsity": self.hidden_sparsity if removal else 0.0}
        if self.mode == "unrotated":
            return {"sparsity": 0.0, "basis": "none", "hidden_sparsity": self.hidden_sparsity if removal else 0.0}
        if self.mode == "budget":
            return {"target_params": self.target_params, "round_to": 1} if removal else {"sparsity": 0.0}
        if self.mode == "stock":
            return {"target_params": self.target_params, "stock": True} if removal else \
                {"sparsity": 0.0, "stock": True}
        raise ValueError(f"unknown fuzz mode {self.mode!r}")

    def calibration(self) -> list:
        """Token batches, or dicts with a right-padded 0/1 ``attention_mask`` (every row keeps at least
        one token; padded positions hold arbitrary ids)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        batches = []
        for _ in range(self.calib_batches):
            shape = (self.calib_batch_size, self.calib_length)
            ids = torch.randint(0, VOCAB, shape, generator=generator)
            if not self.masked:
                batches.append(ids)
                continue
            lengths = torch.randint(1, self.calib_length + 1, (self.calib_batch_size,), generator=generator)
            mask = (torch.arange(self.calib_length)[None, :] < lengths[:, None]).long()
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches

    def eval_input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 2)
        return torch.randint(0, VOCAB, (self.eval_batch_size, self.eval_length), generator=generator)

    def describe(self) -> str:
        return (f"{self.family} {self.dtype} seed={self.seed} {self.overrides} calib={self.calib_batches}x"
                f"[{self.calib_batch_size},{self.calib_length}]{' masked' if self.masked else ''} "
                f"eval=[{self.eval_batch_size},{self.eval_length}] {self.mode} {self.options()}"
                f"{' streamed' if self.streamed else ''}{' saved' if self.saved else ''}")

    def reproducer(self) -> str:
        """A short snippet (run from the repository root) that rebuilds the case and reruns its check."""
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)
        return (
            "import sys; sys.path.insert(0, 'tests')\n"
            "from fuzz_models import FuzzCase\n"
            "from test_fuzz import check_case\n"
            f"case = FuzzCase({fields})\n"
            "check_case(case)\n"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def fuzz_cases(draw, families: Optional[list[str]] = None, dtypes: tuple[str, ...] = tuple(DTYPES),
               modes: tuple[str, ...] = MODES, extras: bool = True) -> FuzzCase:
    """A random small model of a supported family with calibration and evaluation shapes and a mode;
    ``extras``: a quarter of the cases also stream a checkpoint, a quarter also save and load."""
    family = draw(st.sampled_from(sorted(families or SPECS)))
    spec = SPECS[family]
    model_type, fixed = FAMILIES[family] if family in FAMILIES else MOE_FAMILIES[family]
    overrides = {k: v for k, v in fixed.items() if k not in _DRAWN}
    overrides["vocab_size"] = VOCAB

    # sizes: hidden = heads * head_dim in [32, 96], head_dim a multiple of the family's step
    # (mixtures of experts: widths a multiple of 8, as torch's grouped matmul needs 16-byte strides)
    align = 8 if spec.experts is not None else 1
    heads = draw(st.integers(1, 8))
    head_dims = [h for h in range(spec.min_head_dim, 97)
                 if h % spec.head_dim_step == 0 and 32 <= heads * h <= 96 and heads * h % align == 0]
    head_dim = draw(st.sampled_from(head_dims))
    hidden = heads * head_dim
    if spec.head_dim is not None:
        overrides[spec.head_dim] = head_dim
        if draw(st.booleans()):  # o_proj maps heads * head_dim back to another width (the configs
            # still require a multiple of the head count)
            hidden = draw(st.sampled_from([h for h in range(32, 97) if h % heads == 0 and h % align == 0]))
    overrides[spec.hidden] = hidden
    overrides[spec.heads] = heads
    overrides[spec.layers] = draw(st.integers(1, 3))
    if spec.kv_heads is not None:
        overrides[spec.kv_heads] = draw(st.sampled_from(_divisors(heads)))
    if spec.intermediate is not None:
        overrides[spec.intermediate] = draw(st.integers(4, 24)) * 8
    if spec.experts is not None:
        experts = draw(st.integers(2, 6))
        overrides[spec.experts] = experts
        overrides["num_experts_per_tok"] = draw(st.integers(1, min(3, experts)))
        for key in (spec.expert_width, spec.shared_width):
            if key is not None:
                overrides[key] = draw(st.integers(2, 12)) * 8
    if model_type == "opt":
        overrides["word_embed_proj_dim"] = hidden
    max_positions = MAX_POSITIONS
    if spec.positions is not None:
        max_positions = draw(st.integers(EXPORT_LENGTH, MAX_POSITIONS))
        overrides[spec.positions] = max_positions
    if model_type == "phi3":
        overrides["pad_token_id"] = 0
    if spec.tie:
        overrides["tie_word_embeddings"] = draw(st.booleans())
    for flag in spec.biases:
        overrides[flag] = draw(st.booleans())
    for key, values in spec.flags.items():
        overrides[key] = draw(st.sampled_from(values))
    if spec.extra is not None:
        overrides.update(spec.extra(draw, overrides))

    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2 ** 16 - 1))
    calib_batches = draw(st.integers(1, 3))
    calib_batch_size = draw(st.integers(1, 4))
    calib_length = draw(st.integers(2, min(24, max_positions)))
    masked = draw(st.booleans())
    # evaluation: another batch size and another length than the calibration
    eval_batch_size = draw(st.integers(1, 5).filter(lambda b: b != calib_batch_size))
    eval_length = draw(st.integers(1, max_positions).filter(lambda t: t != calib_length))
    sparsity = draw(st.floats(0.05, 0.6, allow_nan=False).map(lambda s: round(s, 3)))
    mode = draw(st.sampled_from(list(modes)))
    hidden_sparsity = draw(st.floats(0.05, 0.8, allow_nan=False).map(lambda s: round(s, 3)))
    target_params = draw(st.floats(0.55, 0.97, allow_nan=False).map(lambda s: round(s, 3)))
    streamed = extras and draw(st.integers(0, 3)) == 0
    saved = extras and draw(st.integers(0, 3)) == 0
    return FuzzCase(family, model_type, overrides, dtype, seed, calib_batches, calib_batch_size, calib_length,
                    masked, eval_batch_size, eval_length, sparsity, mode, hidden_sparsity, target_params, streamed,
                    saved)


def expected_width(hidden: int, sparsity: float, round_to: int = 8) -> int:
    """``floor(D (1 - s))`` rounded down to a multiple of ``round_to`` when it deletes anything (mirrors
    ``widths.slice_width``)."""
    width = math.floor(hidden * (1.0 - sparsity) + 1e-9)
    return width - width % round_to if round_to > 1 and width < hidden else width
