"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT_STYLE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)

# name -> (model_type, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "granite": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0}),
    "smollm3": ("smollm3", {}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "cohere": ("cohere", {}),
    "phi": ("phi", {}),
    "gptj": ("gptj", dict(GPT_STYLE, rotary_dim=8)),
    "gpt_neox_parallel": ("gpt_neox", {"use_parallel_residual": True}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False, "tie_word_embeddings": True}),
    "falcon_new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon_old": ("falcon", {"new_decoder_architecture": False, "parallel_attn": True, "multi_query": True}),
    "falcon_sequential": ("falcon", {"new_decoder_architecture": False, "parallel_attn": False, "bias": True}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "gpt2": ("gpt2", GPT_STYLE),
    "gpt_bigcode": ("gpt_bigcode", GPT_STYLE),
    "bloom": ("bloom", {"n_layer": 2, "n_head": 4}),
    "starcoder2": ("starcoder2", {}),
    "stablelm": ("stablelm", {}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
}

# mixture-of-experts families: 4 experts, 2 per token (name -> (model_type, config overrides))
MOE = dict(num_experts_per_tok=2, intermediate_size=96)
MOE_FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(MOE, num_local_experts=4)),
    "qwen2_moe": ("qwen2_moe", dict(MOE, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                    decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("qwen3_moe", dict(MOE, num_experts=4, moe_intermediate_size=48, head_dim=16, mlp_only_layers=[])),
    "olmoe": ("olmoe", dict(MOE, num_experts=4)),
    "granitemoe": ("granitemoe", dict(MOE, num_local_experts=4, embedding_multiplier=12.0, residual_multiplier=0.22)),
    "phimoe": ("phimoe", dict(MOE, num_local_experts=4)),
    "gpt_oss": ("gpt_oss", dict(MOE, num_local_experts=4, head_dim=16, sliding_window=8)),  # transposed, biases
    "flex_olmo": ("flex_olmo", dict(MOE, num_experts=4)),
    "granitemoeshared": ("granitemoeshared", dict(MOE, num_local_experts=4, shared_intermediate_size=64)),
    # every token through every expert, scaled by its routing weight (repeat, bmm, sum), and a shared expert
    "llama4_text": ("llama4_text", dict(MOE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96,
                                        head_dim=16, interleave_moe_layer_step=1)),
}


# multi-head latent attention (DeepSeek-V2/V3 and the models reusing their code): queries and keys/values
# pass through low-rank latents with their own norms; key/value heads = query heads
LATENT = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=16)
LATENT_MOE = dict(LATENT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                  n_group=1, topk_group=1)
LATENT_FAMILIES: dict[str, tuple[str, dict]] = {
    "deepseek_v2": ("deepseek_v2", dict(LATENT_MOE, first_k_dense_replace=1)),  # a dense layer, then MoE
    "deepseek_v2_lite": ("deepseek_v2", dict(LATENT_MOE, q_lora_rank=None, first_k_dense_replace=0)),  # q_proj
    "deepseek_v3": ("deepseek_v3", dict(LATENT_MOE, first_k_dense_replace=1)),
    "minicpm3": ("minicpm3", dict(LATENT)),  # dense MLPs
    "glm4_moe_lite": ("glm4_moe_lite", dict(LATENT_MOE, first_k_dense_replace=1)),
}


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny model of family ``name`` (dense or mixture-of-experts) with random weights; norm
    weights/biases randomised too."""
    model_type, overrides = {**FAMILIES, **MOE_FAMILIES, **LATENT_FAMILIES}[name]
    base = {} if "n_embd" in overrides or model_type == "bloom" else dict(COMMON)
    if model_type == "bloom":
        base = {"vocab_size": VOCAB, "hidden_size": 64}
    config = AutoConfig.for_model(model_type, **{**base, **overrides})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, key, None)
    return random_model(config, dtype, seed)


def random_model(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The causal LM of ``config`` with random weights, its one-dimensional parameters (norm scales,
    biases, gates) randomised too: non-trivial values make folding mistakes visible."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.3, 0.5)
    return model.to(dtype).eval()


def canonical_graph(model: torch.nn.Module):
    """``model`` captured and canonicalised (passes 1-2)."""
    from fxslice.hf import model_spec
    from fxslice.passes.p1_capture import capture
    from fxslice.passes.p2_canonicalise import canonicalise

    return canonicalise(capture(model, model_spec(model)))


def attention_search(family: str):
    """``(model, pass 4's attentions)`` of a family's tiny model."""
    from fxslice.passes.p3_analyse import analyse
    from fxslice.passes.p4_attention import find_attentions

    model = tiny_model(family)
    return model, find_attentions(analyse(canonical_graph(model)))


def check_cache_program_and_folder(sliced, program, prompt: torch.Tensor, ids: torch.Tensor, folder: Path) -> dict:
    """A KV-cache program (``with_cache(sliced)``) gives ``sliced``'s logits and greedy tokens; saved with it and
    loaded back, the folder gives them too. Returns the folder's ``fxslice.json``."""
    import json

    from fxslice.runtime.generate import generate
    from fxslice.runtime.load import load
    from fxslice.runtime.save import save

    start = prompt.shape[1]
    with torch.no_grad():
        assert (program(prompt, torch.arange(start)) - sliced(prompt).logits).abs().max() < 1e-4
    tokens = generate(program, prompt, 6)
    with torch.no_grad():
        expected = [int(sliced(tokens[:, :start + i]).logits[0, -1].argmax()) for i in range(6)]
    assert tokens[0, start:].tolist() == expected
    folder = save(sliced, folder, tiny_tokenizer(), generator=program)
    loaded, _ = load(folder)
    with torch.no_grad():
        assert (loaded(ids).logits - sliced(ids).logits).abs().max() < 1e-4
    assert torch.equal(loaded.generate(prompt, 6), tokens)
    return json.loads((folder / "fxslice.json").read_text())


def check_saved_generation(sliced, folder: Path, prompt: torch.Tensor, new_tokens: int = 5) -> None:
    """Saved with a KV-cache program and loaded back: the same logits as ``sliced``, and greedy
    generation equal to ``sliced``'s own argmax, token by token."""
    from fxslice.runtime.load import load
    from fxslice.runtime.save import save

    loaded, _ = load(save(sliced, folder, max_cache_len=32))
    start = prompt.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, sliced(prompt).logits, atol=1e-5, rtol=1e-5)
        tokens = loaded.generate(prompt, new_tokens)
        greedy = [int(sliced(tokens[:, : start + i]).logits[0, -1].argmax()) for i in range(new_tokens)]
    assert tokens[0, start:].tolist() == greedy


def check_streamed_equals_in_memory(model: torch.nn.Module, data, ids: torch.Tensor, folder: Path,
                                    sparsity: float = 0.25) -> None:
    """``model`` saved with ``save_pretrained`` and compressed from that folder (weights streamed in) gives the
    same parameter count and logits as compressed in memory."""
    import fxslice

    model.save_pretrained(folder)
    in_memory = fxslice.compress(model, data, sparsity, progress=False)
    streamed = fxslice.compress(str(folder), data, sparsity, progress=False)
    assert streamed.fxslice.param_count == in_memory.fxslice.param_count
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, in_memory(ids).logits, atol=1e-5, rtol=1e-5)


def check_exact_and_sliced(model: torch.nn.Module, data, ids: torch.Tensor):
    """A family's tiny model: exact at sparsity 0 (on ``ids`` and a shorter single row), left as it was, and
    its 25% slice finite, smaller than dense and as large as its reported count. Returns the exact graph."""
    import fxslice

    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = fxslice.compress(model, data, 0.0, progress=False)
    with torch.no_grad():
        for rows in (ids, ids[:1, :5]):
            assert (exact(rows).logits - model(rows).logits).abs().max().item() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sliced = check_sliced(model, data, ids)
    assert sliced.fxslice.param_count < sum(p.numel() for p in model.parameters())
    return exact


def check_sliced(model: torch.nn.Module, data, ids: torch.Tensor, sparsity: float = 0.25):
    """``model`` compressed at ``sparsity``: as large as its reported count, finite logits on ``ids``; returned."""
    import fxslice

    sliced = fxslice.compress(model, data, sparsity, progress=False)
    assert sliced.fxslice.param_count == sum(p.numel() for p in sliced.parameters())
    with torch.no_grad():
        assert torch.isfinite(sliced(ids).logits).all()
    return sliced


def perturb_norms(module: torch.nn.Module) -> None:
    """Scales ``γ ~ N(1, 0.3)`` and shifts ``β ~ N(0, 0.3)`` for every RMSNorm and LayerNorm in ``module`` (a toy's norms
    must not be the identity, or folding them proves nothing)."""
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                norm.weight.normal_(1.0, 0.3)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_(0.0, 0.3)


def seeded(module_class, **kwargs) -> torch.nn.Module:
    """``module_class(**kwargs)`` in eval mode, initialised from seed 0 (the same weights every call)."""
    torch.manual_seed(0)
    return module_class(**kwargs).eval()


def check_exact_in_dtype(build, dtype: torch.dtype, ids: torch.Tensor, data=None):
    """``build(dtype)`` makes one model in ``dtype`` (the same weights each call): its compression at sparsity
    0 gives its logits — within 1e-4 in float32, within 4× the model's own rounding (against float32) in a
    narrower dtype. Returns the compressed graph."""
    import fxslice

    model = build(dtype)
    exact = fxslice.compress(model, data if data is not None else calibration(), 0.0, progress=False)
    logits = lambda out: (out.logits if hasattr(out, "logits") else out).float()  # noqa: E731 - HF output or tensor
    with torch.no_grad():
        error = (logits(exact(ids)) - logits(model(ids))).abs().max().item()
        noise = 0.0 if dtype == torch.float32 else (logits(model(ids)) - logits(build(torch.float32)(ids))).abs().max().item()
    assert error <= (1e-4 if dtype == torch.float32 else 4 * noise + 1e-3), (error, noise)
    return exact


def calibration(batches: int = 3, batch_size: int = 4, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch_size, length), generator=gen) for _ in range(batches)]


def masked_calibration(batches: int = 3, batch_size: int = 4, length: int = 16, seed: int = 1) -> list[dict]:
    """``calibration`` as a tokenizer returns it with right padding: every other row ends in padding
    (``attention_mask`` 0), the padded positions hold token 0."""
    out = []
    for ids in calibration(batches, batch_size, length, seed):
        mask = torch.ones_like(ids)
        for row in range(1, batch_size, 2):
            mask[row, length // 2 + row:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A small BPE tokenizer trained on KJV text (so that real text maps into the tiny vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fxslice.jobs.data import kjv_text

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[EOS]"], show_progress=False)
    tokenizer.train_from_iterator([kjv_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file directly in ``folder`` (a checkpoint that must stay byte-identical)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


class OneBlock(torch.nn.Module):
    """Embedding, one pre-norm block ``x + up(inner(norm(x))) + outer(x)``, the norm again and a head: the
    smallest model to put an op where the analysis must judge it (``inner`` on a norm's output, ``outer`` on
    the stream itself; None: left out)."""

    def __init__(self, inner=None, outer=None, vocab: int = VOCAB, width: int = 32):
        super().__init__()
        self.inner, self.outer = inner, outer
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.RMSNorm(width)
        self.up = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        y = self.norm(x)
        x = x + self.up(y if self.inner is None else self.inner(y)) + (0 if self.outer is None else self.outer(x))
        return self.head(self.norm(x))
