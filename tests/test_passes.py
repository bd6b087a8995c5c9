"""Each graph pass on its own: model_spec → capture → canonicalise → analyse → fuse → rotate and slice.

The other test files go through ``fxslice.compress``; here every pass gets the previous pass's output
and its own result is checked (node targets, module names, weights, logits). Tiny models are built
once per module; a fused plan is cached only for read-only tests, rotation tests fuse afresh.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from fxslice import FxSliceError, GraphStructureError
from fxslice.calibration import Batch
from fxslice.graph import ops
from fxslice.graph.inserted import HEAD_AFFINE, NORM_AFFINE, SHORTCUT
from fxslice.graph.modules import StreamNorm
from fxslice.hf import causal_lm_output, model_spec
from fxslice.passes.p1_capture import capture
from fxslice.passes.p2_canonicalise import canonicalise
from fxslice.passes.p3_analyse import Structure, analyse
from fxslice.passes.p5_fuse import Plan, TiedHead, fuse
from fxslice.passes.p6_widths import Widths, basis_groups, stream_widths as plan_widths
from fxslice.passes.p7_rotate import Rotator, SegmentRunner, pca_basis, rotate_and_slice
from tiny_models import VOCAB, calibration, tiny_model
from toy_models import TOY_VOCAB, ToyLM

aten = torch.ops.aten
HIDDEN = 64
IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
LONG_IDS = torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(6))
LINEAR_OPS = frozenset({aten.linear.default, aten.addmm.default, aten.embedding.default})
MATMUL_OPS = frozenset({aten.mm.default, aten.matmul.default, aten.bmm.default, aten.addmm.default})


def logits(gm_or_model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return gm_or_model(ids).logits


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def random_orthogonal(seed: int, size: int = HIDDEN, last: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded random orthogonal float64 matrix (QR of a Gaussian); ``last``: its last column."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if last is None:
        return torch.linalg.qr(a)[0]
    a[:, 0] = last
    q, r = torch.linalg.qr(a)  # q[:, 0] = sign(r00) * last / |last|
    return torch.cat([q[:, 1:], q[:, :1] * torch.sign(r[0, 0])], dim=1)


def modules_of(gm: GraphModule, kind) -> dict[str, nn.Module]:
    return {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)}


def weight_names(gm: nn.Module) -> set[str]:
    return {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}


# --- fixtures: every tiny model built once, captures cached where the graph is only read ------------
@pytest.fixture(scope="module")
def model():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = tiny_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def reference(model):
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = logits(model(name))
        return cache[name]

    return get


@dataclass
class Canonical:
    captured_ops: collections.Counter  # call_function targets of the captured graph, before canonicalise
    gm: GraphModule


@pytest.fixture(scope="module")
def canonical(model):
    """name -> canonical graph (shared: analyse it, run it, never fuse it)."""
    cache: dict[str, Canonical] = {}

    def get(name: str) -> Canonical:
        if name not in cache:
            m = model(name)
            captured = capture(m, model_spec(m))
            before = collections.Counter(n.target for n in captured.graph.nodes if n.op == "call_function")
            cache[name] = Canonical(before, canonicalise(captured))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def structure(canonical):
    cache: dict[str, Structure] = {}

    def get(name: str) -> Structure:
        if name not in cache:
            cache[name] = analyse(canonical(name).gm)
        return cache[name]

    return get


@dataclass
class Fused:
    plan: Plan
    norm_paths: list[str]  # every norm the structure found (reader and writer side)
    norm_params: set[str]  # their parameters in the canonical graph
    skips: int  # positions with a residual add
    canonical_weights: dict[str, torch.Tensor]  # Linear weights/biases before fuse


def fuse_family(model, name: str) -> Fused:
    m = model(name)
    gm = canonicalise(capture(m, model_spec(m)))
    s = analyse(gm)
    paths = [site.path for p in s.positions for site in p.norms + p.writer_norms]
    params = {w for w in weight_names(gm) if any(w.startswith(path + ".") for path in paths)}
    weights = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    skips = sum(p.skip is not None for p in s.positions)
    return Fused(fuse(s), paths, params, skips, weights)


@pytest.fixture(scope="module")
def fused(model):
    """name -> Fused (shared: inspect and run the plan, never rotate it)."""
    cache: dict[str, Fused] = {}

    def get(name: str) -> Fused:
        if name not in cache:
            cache[name] = fuse_family(model, name)
        return cache[name]

    return get


@pytest.fixture
def fresh_plan(model):
    """name -> a newly fused plan that the test may rotate."""
    return lambda name: fuse_family(model, name).plan


# --- hf.model_spec and pass 1: capture ----------------------------------------------------------------
def test_model_spec_describes_the_model(model):
    llama = model("llama_tied")
    spec = model_spec(llama)
    assert spec.class_name == "LlamaForCausalLM"
    assert spec.vocab_size == VOCAB and spec.dtype == torch.float32 and spec.device == torch.device("cpu")
    assert spec.accepts_use_cache
    assert spec.param_count == sum(p.numel() for p in llama.parameters())  # tied head counted once
    assert spec.param_count == sum(p.numel() for n, p in llama.named_parameters() if n != "lm_head.weight")
    ids = spec.example_input_ids(batch=3, length=5)
    assert ids.shape == (3, 5) and torch.equal(ids, spec.example_input_ids(batch=3, length=5))
    assert int(ids.max()) < VOCAB
    toy = model_spec(ToyLM())
    assert (toy.class_name, toy.vocab_size, toy.accepts_use_cache) == ("ToyLM", TOY_VOCAB, False)


def test_capture_gives_a_plain_graph_of_input_ids():
    toy = ToyLM()
    toy.train()
    gm = capture(toy, model_spec(toy))
    assert toy.training, "capture must restore the model's training mode"
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids"]
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # no guard submodules left
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.args[0].target is causal_lm_output
    ids = torch.randint(0, TOY_VOCAB, (2, 7))
    toy.eval()
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, toy(ids))
    # the graph's parameters share storage with the model
    storage = {p.data_ptr() for p in toy.parameters()}
    assert {p.data_ptr() for p in gm.parameters()} <= storage


# --- pass 2: canonicalise -------------------------------------------------------------------------------
def _layers(template: list[str], layers: int = 2) -> set[str]:
    return {t.format(i) for i in range(layers) for t in template}


LINEAR_NAMES = {
    "llama": _layers(["model.layers.{}.self_attn." + x for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
                     + ["model.layers.{}.mlp." + x for x in ("gate_proj", "up_proj", "down_proj")]) | {"lm_head"},
    "gpt2": _layers(["transformer.h.{}.attn.c_attn", "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_fc",
                     "transformer.h.{}.mlp.c_proj"]) | {"lm_head"},
    "falcon_new": _layers(["transformer.h.{}.self_attention.query_key_value", "transformer.h.{}.self_attention.dense",
                           "transformer.h.{}.mlp.dense_h_to_4h", "transformer.h.{}.mlp.dense_4h_to_h"]) | {"lm_head"},
}
EMBEDDING_NAMES = {
    "llama": {"model.embed_tokens"},
    "gpt2": {"transformer.wte", "transformer.wpe"},
    "falcon_new": {"transformer.word_embeddings"},
}
CAPTURED_LINEAR_FORM = {  # how the captured graph computes the block linears, before canonicalise
    "llama": aten.linear.default,
    "gpt2": aten.addmm.default,  # Conv1D
    "falcon_new": aten.matmul.default,  # FalconLinear: x @ W.T
}


def _reads_parameter(node) -> bool:
    """A call_function node with a parameter operand (directly or through a transpose)."""
    for arg in node.all_input_nodes:
        while ops.calls(arg, ops.TRANSPOSES):
            arg = arg.args[0]
        if arg.op == "get_attr":
            return True
    return False


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_new"])
def test_canonicalise_turns_linears_and_embeddings_into_named_modules(family, model, canonical):
    c = canonical(family)
    gm, hf = c.gm, model(family)
    assert c.captured_ops[CAPTURED_LINEAR_FORM[family]] >= 8  # the pass had work to do
    assert c.captured_ops[aten.embedding.default] == len(EMBEDDING_NAMES[family])
    leftovers = [n for n in gm.graph.nodes if ops.calls(n, LINEAR_OPS)]
    assert not leftovers, f"linear/embedding ops left in the canonical graph: {leftovers}"
    weighted_matmuls = [n for n in gm.graph.nodes if ops.calls(n, MATMUL_OPS) and _reads_parameter(n)]
    assert not weighted_matmuls
    linears, embeddings = modules_of(gm, nn.Linear), modules_of(gm, nn.Embedding)
    assert set(linears) == LINEAR_NAMES[family]
    assert set(embeddings) == EMBEDDING_NAMES[family]
    assert len([n for n in gm.graph.nodes if n.op == "call_module"]) == len(linears) + len(embeddings)
    for name, linear in {**linears, **embeddings}.items():  # the HF module's own weights, same orientation
        original = hf.get_submodule(name)
        weight = original.weight.T if type(original).__name__ == "Conv1D" else original.weight
        assert torch.equal(linear.weight, weight), name
        assert linear.weight.data_ptr() == original.weight.data_ptr(), f"{name} no longer shares storage"
        if isinstance(linear, nn.Linear) and getattr(original, "bias", None) is not None:
            assert torch.equal(linear.bias, original.bias), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_new"])
def test_canonical_graph_computes_the_models_logits(family, model, canonical, reference):
    gm = canonical(family).gm
    assert max_error(logits(gm), reference(family)) < 1e-5
    assert max_error(logits(gm, LONG_IDS), logits(model(family), LONG_IDS)) < 1e-5  # dynamic batch and length


def test_canonicalise_keeps_tied_weights_one_parameter(canonical):
    gm = canonical("llama_tied").gm
    assert gm.get_submodule("lm_head").weight is gm.get_submodule("model.embed_tokens").weight


# --- pass 3: analyse --------------------------------------------------------------------------------------
def _llama_expectation():
    attn = [f"model.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "qkv"]
    mlp = [f"model.layers.{i}.mlp.{x}_proj" for i in range(2) for x in ("gate", "up")]
    return dict(
        writers=[["model.embed_tokens"], ["model.layers.0.self_attn.o_proj"], ["model.layers.0.mlp.down_proj"],
                 ["model.layers.1.self_attn.o_proj"], ["model.layers.1.mlp.down_proj"]],
        readers=[attn[:3], mlp[:2], attn[3:], mlp[2:], ["lm_head"]],
        norms=["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"],
        pattern="rms_norm", centered=False,
    )


def _gpt2_expectation():
    # GPT-2: token + position embedding summed into one position (no reader in between), then a
    # pre-LayerNorm attention and MLP per block, each adding one residual: 1 + 2 * 2 = 5 positions.
    h = "transformer.h.{}."
    return dict(
        writers=[["transformer.wpe", "transformer.wte"], [h.format(0) + "attn.c_proj"], [h.format(0) + "mlp.c_proj"],
                 [h.format(1) + "attn.c_proj"], [h.format(1) + "mlp.c_proj"]],
        readers=[[h.format(0) + "attn.c_attn"], [h.format(0) + "mlp.c_fc"], [h.format(1) + "attn.c_attn"],
                 [h.format(1) + "mlp.c_fc"], ["lm_head"]],
        norms=[h.format(0) + "ln_1", h.format(0) + "ln_2", h.format(1) + "ln_1", h.format(1) + "ln_2",
               "transformer.ln_f"],
        pattern="layer_norm", centered=True,
    )


def _opt_expectation():
    # OPT (do_layer_norm_before, hidden == word_embed_proj_dim: no project_in/out): like GPT-2.
    d = "model.decoder.layers.{}."
    qkv = [[d.format(i) + f"self_attn.{x}_proj" for x in "qkv"] for i in range(2)]
    return dict(
        writers=[["model.decoder.embed_positions", "model.decoder.embed_tokens"], [d.format(0) + "self_attn.out_proj"],
                 [d.format(0) + "fc2"], [d.format(1) + "self_attn.out_proj"], [d.format(1) + "fc2"]],
        readers=[qkv[0], [d.format(0) + "fc1"], qkv[1], [d.format(1) + "fc1"], ["lm_head"]],
        norms=[d.format(0) + "self_attn_layer_norm", d.format(0) + "final_layer_norm",
               d.format(1) + "self_attn_layer_norm", d.format(1) + "final_layer_norm",
               "model.decoder.final_layer_norm"],
        pattern="layer_norm", centered=True,
    )


ANALYSIS = {"llama_tied": _llama_expectation(), "gpt2": _gpt2_expectation(), "opt": _opt_expectation()}
TIED_HEAD = {"llama_tied": ("model.embed_tokens", "lm_head"), "gpt2": ("transformer.wte", "lm_head"),
             "opt": ("model.decoder.embed_tokens", "lm_head")}


@pytest.mark.parametrize("family", sorted(ANALYSIS))
def test_analyse_finds_positions_writers_readers_and_norms(family, structure):
    expected, s = ANALYSIS[family], structure(family)
    assert s.hidden_size == HIDDEN
    assert len(s.positions) == 5
    assert [p.index for p in s.positions] == [0, 1, 2, 3, 4]
    assert [p.skip.source if p.skip else None for p in s.positions] == [None, 0, 1, 2, 3]
    assert [sorted(str(w.target) for w in p.writers) for p in s.positions] == expected["writers"]
    assert [[str(r.target) for r in p.readers] for p in s.positions] == expected["readers"]
    assert [[site.path for site in p.norms] for p in s.positions] == [[n] for n in expected["norms"]]
    assert {site.pattern for p in s.positions for site in p.norms} == {expected["pattern"]}
    assert all(not p.direct_readers and not p.writer_norms for p in s.positions)
    assert [p.rotated for p in s.positions] == [True] * 5
    assert s.centered is expected["centered"]
    assert s.last is s.positions[-1]
    for p in s.positions[1:]:  # a position is the output of its residual add
        assert p.root is p.skip.add and ops.is_tensor_add(p.root)
        assert p.skip.operand in s.positions[p.skip.source].aliases
    tie = s.tied_head()
    assert tie is not None and (str(tie[0].target), str(tie[1].target)) == TIED_HEAD[family]
    assert s.block_groups() == [[0, 1], [2, 3], [4]]


def test_analyse_untied_llama(structure):
    s = structure("llama")
    assert s.tied_head() is None
    assert s.block_groups() == [[0, 1], [2, 3], [4]]
    assert s.positions[0].root.op == "call_module" and s.positions[0].root.target == "model.embed_tokens"
    assert "5 positions" in s.table() and "model.layers.0.input_layernorm [rms_norm]" in s.table()


def test_analyse_does_not_change_the_graph(canonical):
    gm = canonical("gpt2").gm
    before = [(n.name, n.op, n.target) for n in gm.graph.nodes]
    analyse(gm)
    assert [(n.name, n.op, n.target) for n in gm.graph.nodes] == before


# --- pass 5: fuse ------------------------------------------------------------------------------------------
FUSE_FAMILIES = ["llama", "llama_tied", "gpt2", "gemma2", "opt", "phi", "bloom", "falcon_new"]


@pytest.mark.parametrize("family", FUSE_FAMILIES)
def test_fused_graph_computes_the_models_logits(family, model, fused, reference):
    gm = fused(family).plan.gm
    assert max_error(logits(gm), reference(family)) < 1e-4
    assert max_error(logits(gm, LONG_IDS), logits(model(family), LONG_IDS)) < 1e-4


@pytest.mark.parametrize("family", FUSE_FAMILIES)
def test_fuse_leaves_only_weightless_norms(family, fused):
    f = fused(family)
    gm = f.plan.gm
    assert f.norm_params, "the canonical graph had norm weights to fold"
    stream_norms = {n: m for n, m in gm.named_modules() if isinstance(m, StreamNorm)}
    assert sorted(stream_norms) == sorted(f.norm_paths)
    for name, module in stream_norms.items():
        assert not list(module.parameters()) and not list(module.buffers()), name
        assert module.full_width == HIDDEN
    survivors = f.norm_params & weight_names(gm)
    assert not survivors, f"norm weights still in the fused graph: {sorted(survivors)}"
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert not read & f.norm_params


@pytest.mark.parametrize("family", FUSE_FAMILIES)
def test_fuse_puts_one_identity_shortcut_on_each_residual_add(family, fused):
    f = fused(family)
    plan, gm = f.plan, f.plan.gm
    shortcuts = [m for m in plan.inserted if m.kind == SHORTCUT]
    assert len(shortcuts) == f.skips == sum(p.shortcut is not None for p in plan.positions)
    assert f.skips >= 2
    for p in plan.positions:
        if p.shortcut is None:
            assert p.skip_source is None
            continue
        entry = next(m for m in shortcuts if m.name == p.shortcut)
        assert (entry.reads, entry.writes) == (p.skip_source, p.index)
        assert p.shortcut.endswith(f".shortcut_{p.index}") or p.shortcut == f"shortcut_{p.index}"
        linear = gm.get_submodule(p.shortcut)
        assert isinstance(linear, nn.Linear) and linear.bias is None
        assert torch.equal(linear.weight, torch.eye(HIDDEN))
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == p.shortcut]
        assert len(calls) == 1 and list(calls[0].users) == [p.root], "the shortcut must feed the residual add"
        assert ops.is_tensor_add(p.root)
        assert p.shortcut in plan.positions[p.skip_source].readers


def test_fuse_names_shortcuts_after_the_block(fused):
    assert [m.name for m in fused("llama").plan.inserted] == [
        "model.layers.0.shortcut_1", "model.layers.0.shortcut_2", "model.layers.1.shortcut_3",
        "model.layers.1.shortcut_4"]
    assert [(m.name, m.kind) for m in fused("gpt2").plan.inserted if m.kind != SHORTCUT] == [
        ("transformer.ln_f_affine", HEAD_AFFINE)]


@pytest.mark.parametrize("family", FUSE_FAMILIES)
def test_planned_roots_are_live_nodes_of_the_fused_graph(family, fused):
    plan = fused(family).plan
    nodes = set(plan.gm.graph.nodes)
    for p in plan.positions:
        assert p.root.graph is plan.gm.graph and p.root in nodes, p.label
        for reshape in p.reshapes:
            assert reshape in nodes, p.label


@pytest.mark.parametrize("family", FUSE_FAMILIES)
def test_layout_lists_every_reader_and_writer(family, fused):
    plan = fused(family).plan
    layout = plan.layout()
    tied_embedding = plan.tied.embedding if plan.tied else None
    expected = {}
    for p in plan.positions:
        for name in p.readers:
            expected.setdefault(name, [None, None])[0] = p.index
        for name in p.writers + ([p.shortcut] if p.shortcut else []):
            if name != tied_embedding:
                expected.setdefault(name, [None, None])[1] = p.index
    assert layout == {name: tuple(rw) for name, rw in expected.items()}
    assert list(layout) == sorted(layout)
    for name in layout:
        assert isinstance(plan.gm.get_submodule(name), (nn.Linear, nn.Embedding)), name
    for m in plan.inserted:
        assert layout[m.name] == (m.reads, m.writes), m.name


def test_llama_plan_layout_and_folded_norms(model, fused):
    f = fused("llama")
    plan, gm, hf = f.plan, f.plan.gm, model("llama")
    assert plan.centered is False and plan.tied is None and plan.head == ["lm_head"]
    assert plan.block_groups == [[0, 1], [2, 3], [4]]
    assert [p.rotated for p in plan.positions] == [True] * 5
    layout = plan.layout()
    assert layout["model.embed_tokens"] == (None, 0)
    assert layout["model.layers.0.self_attn.q_proj"] == (0, None)
    assert layout["model.layers.0.self_attn.o_proj"] == (None, 1)
    assert layout["model.layers.0.mlp.up_proj"] == (1, None)
    assert layout["model.layers.1.mlp.down_proj"] == (None, 4)
    assert layout["model.layers.0.shortcut_1"] == (0, 1)
    assert layout["lm_head"] == (4, None)
    assert len(layout) == 1 + 14 + 1 + 4
    assert [p.norm_eps for p in plan.positions] == [hf.config.rms_norm_eps] * 5
    # W <- W diag(gamma), for every reader of every norm; writers untouched
    layers = hf.model.layers
    pairs = [(layers[0].self_attn.q_proj, layers[0].input_layernorm), (layers[1].mlp.gate_proj,
             layers[1].post_attention_layernorm), (hf.lm_head, hf.model.norm)]
    for linear, norm in pairs:
        name = next(n for n, m in hf.named_modules() if m is linear)
        assert torch.allclose(gm.get_submodule(name).weight, linear.weight * norm.weight[None, :], atol=1e-6), name
    assert torch.equal(gm.get_submodule("model.layers.0.self_attn.o_proj").weight, layers[0].self_attn.o_proj.weight)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_layernorm_plan_is_centered(family, fused):
    f = fused(family)
    plan, gm = f.plan, f.plan.gm
    assert plan.centered is True
    for p in plan.rotated:
        for name in p.writers:  # every writer of the stream writes mean-free values
            module = gm.get_submodule(name)
            if isinstance(module, nn.Embedding):
                assert module.weight.mean(1).abs().max() < 1e-6, name
            else:
                assert module.weight.mean(0).abs().max() < 1e-6, name
                assert module.bias is None or abs(module.bias.mean().item()) < 1e-6, name
            assert not torch.allclose(module.weight, f.canonical_weights[name + ".weight"]), f"{name} not centred"


def test_gpt2_layernorm_folds_scale_and_shift_into_readers(model, fused):
    gm, block = fused("gpt2").plan.gm, model("gpt2").transformer.h[0]
    weight = block.attn.c_attn.weight.T.double()  # Conv1D stores [in, out]
    gamma, beta = block.ln_1.weight.double(), block.ln_1.bias.double()
    fused_linear = gm.get_submodule("transformer.h.0.attn.c_attn")
    assert torch.allclose(fused_linear.weight.double(), weight * gamma[None, :], atol=1e-6)
    assert torch.allclose(fused_linear.bias.double(), block.attn.c_attn.bias.double() + weight @ beta, atol=1e-5)


def test_tied_head_gets_an_affine_and_the_embedding_a_private_copy(model, fused):
    plan, hf = fused("llama_tied").plan, model("llama_tied")
    gm = plan.gm
    assert plan.tied is not None
    assert (plan.tied.embedding, plan.tied.head, plan.tied.affine, plan.tied.position) == (
        "model.embed_tokens", "lm_head", "model.norm_affine", 0)
    assert isinstance(plan.tied, TiedHead) and plan.tied.width_slice in set(gm.graph.nodes)
    assert plan.tied.width_slice.args[1:] == (-1, 0, HIDDEN)
    embedding, head = gm.get_submodule("model.embed_tokens"), gm.get_submodule("lm_head")
    assert embedding.weight is not head.weight and torch.equal(embedding.weight, head.weight)
    assert torch.equal(head.weight, hf.lm_head.weight)  # the head keeps the embedding's weight, no norm folded
    affine = gm.get_submodule("model.norm_affine")
    assert torch.equal(affine.weight, torch.diag(hf.model.norm.weight))
    assert [(m.name, m.kind, m.reads, m.writes) for m in plan.inserted if m.kind != SHORTCUT] == [
        ("model.norm_affine", HEAD_AFFINE, 4, None)]
    assert plan.positions[4].readers == ["model.norm_affine"]


def test_gemma2_writer_norms_become_affine_linears(model, fused):
    plan, hf = fused("gemma2").plan, model("gemma2")
    gm = plan.gm
    affines = [(m.name, m.writes) for m in plan.inserted if m.kind == NORM_AFFINE]
    assert affines == [("model.layers.0.post_attention_layernorm_affine", 1),
                       ("model.layers.0.post_feedforward_layernorm_affine", 2),
                       ("model.layers.1.post_attention_layernorm_affine", 3),
                       ("model.layers.1.post_feedforward_layernorm_affine", 4)]
    for name, position in affines:
        assert name in plan.positions[position].writers
        norm = hf.get_submodule(name[: -len("_affine")])
        assert torch.allclose(gm.get_submodule(name).weight, torch.diag(1.0 + norm.weight), atol=1e-7)  # Gemma: 1 + w
    assert plan.block_groups == [[0, 1], [2, 3], [4]]


def test_bloom_embedding_position_stays_raw(fused):
    plan = fused("bloom").plan
    assert [p.rotated for p in plan.positions] == [False] + [True] * 5
    assert plan.centered is True
    norms = {n: m.center for n, m in plan.gm.named_modules() if isinstance(m, StreamNorm)}
    assert norms.pop("transformer.word_embeddings_layernorm") is True  # writer side, full width: a LayerNorm
    assert set(norms.values()) == {False}
    assert plan.positions[1].writers == ["transformer.word_embeddings_layernorm_affine"]
    assert plan.positions[1].shortcut is None
    assert plan.positions[1].root.target == "transformer.word_embeddings_layernorm_affine"


# --- passes 6 and 7 pieces: widths, PCA, rotation, the block-wise runner -----------------------------
def test_plan_widths(fused):
    llama, gpt2, bloom = fused("llama").plan, fused("gpt2").plan, fused("bloom").plan
    assert plan_widths(llama, 0.25, 8, False) == [48, 48, 48, 48, 64]
    assert plan_widths(llama, 0.25, 8, True) == [48] * 5
    assert plan_widths(llama, 0.3, 1, False) == [44, 44, 44, 44, 64]  # floor(64 * 0.7)
    assert plan_widths(llama, 0.3, 8, False) == [40, 40, 40, 40, 64]
    assert plan_widths(llama, 0.0, 8, False) == [64] * 5
    assert plan_widths(gpt2, 0.25, 8, False) == [48, 48, 48, 48, 63]  # centred: 1/sqrt(D) is always zero
    assert plan_widths(gpt2, 0.25, 8, True) == [48] * 5
    assert plan_widths(gpt2, 0.0, 1, False) == [63] * 5
    assert plan_widths(bloom, 0.25, 8, False) == [64, 48, 48, 48, 48, 63]  # raw position: full width
    with pytest.raises(FxSliceError, match="leaves no column"):
        plan_widths(llama, 0.9, 8, False)


def _covariance(seed: int, size: int = 16, centered_rows: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, size, generator=g, dtype=torch.float64) @ torch.randn(size, size, generator=g,
                                                                                 dtype=torch.float64)
    if centered_rows:
        x = x - x.mean(1, keepdim=True)
    return x.T @ x


def test_pca_basis_is_orthogonal_and_sorted():
    c = _covariance(0)
    basis, eigenvalues = pca_basis(c, centered=False)
    size = c.shape[0]
    assert basis.dtype == torch.float64 and basis.shape == (size, size)
    assert torch.allclose(basis.T @ basis, torch.eye(size, dtype=torch.float64), atol=1e-10)
    assert (eigenvalues[:-1] >= eigenvalues[1:]).all()
    assert torch.allclose(eigenvalues, torch.linalg.eigvalsh(c).flip(0), rtol=1e-9)
    assert torch.allclose(c @ basis, basis * eigenvalues[None, :], atol=1e-8 * eigenvalues[0].item())
    pivots = basis.abs().argmax(0)  # sign convention: the largest entry of each column is positive
    assert (basis[pivots, torch.arange(size)] > 0).all()
    again, _ = pca_basis(c.float(), centered=False)  # any input dtype: computed in float64
    assert again.dtype == torch.float64


def test_pca_basis_centered_puts_the_mean_direction_last():
    size = 16
    u = torch.full((size,), size ** -0.5, dtype=torch.float64)
    for c in (_covariance(1, size), _covariance(2, size, centered_rows=True)):
        basis, eigenvalues = pca_basis(c, centered=True)
        assert torch.allclose(basis.T @ basis, torch.eye(size, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(basis[:, -1], u, atol=1e-12) and eigenvalues[-1] == 0
        assert (eigenvalues[:-2] >= eigenvalues[1:-1]).all()
        assert (basis[:, :-1].T @ u).abs().max() < 1e-10
        m = torch.eye(size, dtype=torch.float64) - torch.outer(u, u)  # the centred covariance's eigenbasis
        projected = m @ c @ m
        assert torch.allclose(projected @ basis[:, :-1], basis[:, :-1] * eigenvalues[None, :-1],
                              atol=1e-8 * eigenvalues[0].item())
    # for mean-free data the spectrum is the plain one, with the zero of u moved last
    c = _covariance(2, size, centered_rows=True)
    plain = torch.linalg.eigvalsh(c).flip(0)
    assert torch.allclose(pca_basis(c, centered=True)[1][:-1], plain[:-1], rtol=1e-9)


def _rotate_all(plan: Plan, width_of, last=None) -> dict[int, torch.Tensor]:
    rotator, bases = Rotator(plan), {}
    for p in plan.rotated:
        bases[p.index] = random_orthogonal(100 + p.index, last=last)
        rotator.rotate(p.index, bases[p.index], width_of(p.index))
    plan.gm.recompile()
    return bases


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gemma2", "phi", "bloom"])
def test_random_rotation_at_full_width_is_exact(family, fresh_plan, reference):
    plan = fresh_plan(family)
    first_shortcut = next(p for p in plan.positions if p.shortcut)
    bases = _rotate_all(plan, lambda i: HIDDEN)
    assert max_error(logits(plan.gm), reference(family)) < 1e-4
    # the weights did change: the shortcut a -> b is now Q_b^T Q_a
    a, b = first_shortcut.skip_source, first_shortcut.index
    shortcut = plan.gm.get_submodule(first_shortcut.shortcut).weight
    assert torch.allclose(shortcut.double(), bases[b].T @ bases[a], atol=1e-6)
    assert not torch.allclose(shortcut, torch.eye(HIDDEN), atol=1e-2)
    if plan.tied is not None and plan.positions[plan.tied.position].rotated:  # re-tied after rotation
        assert plan.gm.get_submodule(plan.tied.embedding).weight is plan.gm.get_submodule(plan.tied.head).weight


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_random_rotation_of_a_centered_tied_stream_is_exact_without_the_mean_direction(
        family, fresh_plan, reference):
    """A centred stream has no component along u = 1/sqrt(D): any basis ending in u, cut to D - 1, is exact."""
    plan = fresh_plan(family)
    u = torch.full((HIDDEN,), HIDDEN ** -0.5, dtype=torch.float64)
    _rotate_all(plan, lambda i: HIDDEN - 1, last=u)
    assert max_error(logits(plan.gm), reference(family)) < 1e-4
    assert plan.gm.get_submodule(plan.tied.head).weight.shape == (VOCAB, HIDDEN)
    assert plan.gm.get_submodule(plan.tied.embedding).weight is plan.gm.get_submodule(plan.tied.head).weight
    assert plan.tied.width_slice.args[1:] == (-1, 0, HIDDEN - 1)


def test_random_rotation_of_a_centered_tied_stream_at_width_d_is_refused(fresh_plan):
    """The tied embedding is the head's uncentred weight: a centred stream keeps at most D - 1 there."""
    plan = fresh_plan("gpt2")
    with pytest.raises(FxSliceError, match="keeps at most 63 coordinates"):
        _rotate_all(plan, lambda i: HIDDEN)


def _batches() -> list[Batch]:
    return [Batch(ids, None) for ids in calibration()]


def test_rotate_and_slice_at_full_width_is_exact(model, fresh_plan, reference):
    hf = model("llama")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    plan = fresh_plan("llama")
    _, eigenvalues = rotate_and_slice(plan, _batches(), Widths([HIDDEN] * 5, groups=basis_groups(plan, "position")), progress=False)
    assert max_error(logits(plan.gm), reference("llama")) < 1e-4
    assert len(eigenvalues) == 5
    for spectrum in eigenvalues:
        assert spectrum.shape == (HIDDEN,) and (spectrum[:-1] >= spectrum[1:]).all() and spectrum[-1] > -1e-6
    assert len([m for m in plan.inserted if m.kind == SHORTCUT]) == 4  # one basis per position: all kept
    assert not torch.allclose(plan.gm.get_submodule("model.layers.0.shortcut_1").weight, torch.eye(HIDDEN), atol=1e-2)
    after = hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the passes changed the caller's model"


def test_rotate_and_slice_centered_at_full_width_is_exact(fresh_plan, reference):
    plan = fresh_plan("gpt2")
    widths = plan_widths(plan, 0.0, 1, True)
    assert widths == [63] * 5
    _, eigenvalues = rotate_and_slice(plan, _batches(), Widths(widths, groups=basis_groups(plan, "position")), progress=False)
    assert max_error(logits(plan.gm), reference("gpt2")) < 1e-4
    assert all(spectrum[-1] == 0 for spectrum in eigenvalues)  # the mean direction, last
    assert plan.gm.get_submodule("transformer.wte").weight is plan.gm.get_submodule("lm_head").weight


def test_rotate_and_slice_block_basis_removes_inner_shortcuts(fresh_plan, reference):
    plan = fresh_plan("llama")
    groups = basis_groups(plan, "block")
    assert groups == [[0, 1], [2, 3], [4]]
    _, eigenvalues = rotate_and_slice(plan, _batches(), Widths([HIDDEN] * 5, groups=groups), progress=False)
    assert max_error(logits(plan.gm), reference("llama")) < 1e-4
    shortcuts = [m.name for m in plan.inserted if m.kind == SHORTCUT]
    assert shortcuts == ["model.layers.0.shortcut_2", "model.layers.1.shortcut_4"]
    assert [p.shortcut for p in plan.positions] == [None, None, "model.layers.0.shortcut_2", None,
                                                    "model.layers.1.shortcut_4"]
    assert "model.layers.0.shortcut_1" not in plan.positions[0].readers
    assert not any("shortcut_1" in str(n.target) or "shortcut_3" in str(n.target) for n in plan.gm.graph.nodes)
    assert torch.equal(eigenvalues[0], eigenvalues[1]) and not torch.equal(eigenvalues[1], eigenvalues[2])


def test_rotate_and_slice_slices_every_weight_of_a_tied_model(fresh_plan):
    plan = fresh_plan("llama_tied")
    widths = plan_widths(plan, 0.25, 8, False)
    rotate_and_slice(plan, _batches(), Widths(widths, groups=basis_groups(plan, "position")), progress=False)
    gm = plan.gm
    shapes = {name: tuple(gm.get_submodule(name).weight.shape) for name in (
        "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj", "model.layers.0.shortcut_1", "model.layers.1.shortcut_4",
        "model.norm_affine", "lm_head")}
    assert shapes == {
        "model.embed_tokens": (VOCAB, HIDDEN),  # the head's table, read through the width slice
        "model.layers.0.self_attn.q_proj": (64, 48),
        "model.layers.0.self_attn.o_proj": (48, 64),
        "model.layers.1.mlp.down_proj": (64, 128),
        "model.layers.0.shortcut_1": (48, 48),
        "model.layers.1.shortcut_4": (64, 48),
        "model.norm_affine": (64, 64),
        "lm_head": (VOCAB, HIDDEN),
    }
    assert plan.tied.width_slice.args[1:] == (-1, 0, 48)
    assert gm.get_submodule("model.embed_tokens").weight is gm.get_submodule("lm_head").weight
    out = logits(gm)
    assert out.shape == (3, 11, VOCAB) and torch.isfinite(out).all()


def test_segment_runner_computes_each_position_once(fused):
    plan = fused("llama").plan  # read only
    gm = plan.gm
    roots = [p.root for p in plan.rotated]
    reference = Interpreter(gm, garbage_collect_values=False)
    reference.run(IDS)
    runner = SegmentRunner(gm, roots)
    calls: collections.Counter = collections.Counter()
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: calls.update([name]))
               for name, m in gm.named_modules() if isinstance(m, nn.Linear)]
    try:
        env = {next(n for n in gm.graph.nodes if n.op == "placeholder"): IDS}
        values = [runner.run_segment(k, env) for k in range(len(roots))]
    finally:
        for handle in handles:
            handle.remove()
    for k, (value, root) in enumerate(zip(values, roots)):
        assert torch.equal(value, reference.env[root]), k
    linears = {name for name, m in gm.named_modules() if isinstance(m, nn.Linear)}
    assert dict(calls) == {name: 1 for name in linears if name != "lm_head"}  # the head is after the last position
    assert len(runner.nodes) == 5 and all(runner.nodes)
    segment_nodes = [n for segment in runner.nodes for n in segment if n.op != "get_attr"]
    assert len(segment_nodes) == len(set(segment_nodes)), "a node runs in two segments"


# --- wrong input fails clearly ---------------------------------------------------------------------------
def test_analyse_rejects_a_nonlinear_stream_naming_the_node():
    toy = ToyLM(squash=True)
    gm = canonicalise(capture(toy, model_spec(toy)))
    with pytest.raises(GraphStructureError) as info:
        analyse(gm)
    message = str(info.value)
    assert "'tanh'" in message and "aten.tanh.default" in message and "'blocks.0' (ToyBlock)" in message
    assert "position 1" in message


def test_analyse_rejects_an_unknown_norm():
    toy = ToyLM(norm="scale")
    gm = canonicalise(capture(toy, model_spec(toy)))
    with pytest.raises(GraphStructureError, match="ToyScaleNorm.*matches no registered norm pattern"):
        analyse(gm)


def test_analyse_needs_a_canonical_graph():
    toy = ToyLM()
    captured = capture(toy, model_spec(toy))
    with pytest.raises(GraphStructureError, match="no token embedding"):
        analyse(captured)
    s = analyse(canonicalise(captured))  # the same graph, canonicalised: fine
    assert [p.skip.source if p.skip else None for p in s.positions] == [None, 0, 1]


def test_model_spec_rejects_what_is_not_a_model():
    with pytest.raises(FxSliceError, match="must be a torch.nn.Module"):
        model_spec("gpt2")
    with pytest.raises(FxSliceError, match="has no parameters"):
        model_spec(nn.ReLU())


def test_segment_runner_rejects_positions_out_of_order(fused):
    plan = fused("llama").plan
    roots = [p.root for p in plan.rotated]
    with pytest.raises(GraphStructureError, match="not in order"):
        SegmentRunner(plan.gm, [roots[1], roots[0]] + roots[2:])
