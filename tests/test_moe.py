"""Mixture-of-experts models: routers read the stream, every expert's up/gate weights are readers and
its down weights writers, all through the same analysis as a dense model."""

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import GraphStructureError
from fxslice.graph.modules import ExpertLinear
from fxslice.runtime.load import load
from fxslice.runtime.save import save
from fxslice.runtime.generate import generate, with_cache
from tiny_models import MOE_FAMILIES, VOCAB, calibration, masked_calibration, tiny_model

INPUTS = [torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5)),
          torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(6))]
PROMPT = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))


COMMON_MOE = ["granitemoe", "llama4_text", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"]  # the quick profile's
FAMILIES = [f if f in COMMON_MOE else pytest.param(f, marks=pytest.mark.slow) for f in sorted(MOE_FAMILIES)]


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_sparsity_zero_is_exact(family, masked):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliced = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    for ids in INPUTS:
        with torch.no_grad():
            assert (sliced(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "compress changed the model"
    experts = [name for name, m in sliced.named_modules() if isinstance(m, ExpertLinear)]
    assert len(experts) == 2 * model.config.num_hidden_layers  # gate/up and down of every MoE block
    readers = [name for name in experts if sliced.fxslice.layout.get(name, (None, None))[0] is not None]
    assert len(readers) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_quarter_sparsity_slices_routers_and_every_expert(family):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), 0.25, progress=False)
    result = sliced.fxslice
    experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else model.config.num_experts
    for name, (reads, writes) in result.layout.items():
        module = sliced.get_submodule(name)
        if reads is not None:
            assert module.weight.shape[-1] == result.widths[reads], name
        if writes is not None and not isinstance(module, nn.Embedding):
            assert module.weight.shape[-2] == result.widths[writes], name
    seen = {"reader": 0, "writer": 0, "router": 0}
    for name, module in sliced.named_modules():
        reads = result.layout.get(name, (None, None))[0]
        if isinstance(module, ExpertLinear):  # up/gate read the stream; down writes it (or a post-norm branch)
            assert module.num_experts == experts
            assert (module.in_features, module.out_features) == tuple(module.weight.shape[:0:-1])
            kind = "reader" if reads is not None else "writer"
            if kind == "reader":
                assert module.in_features == 48, name
            else:  # the stream position's width, or a post-norm branch at the width of the position it joins
                assert module.out_features in result.widths, name
            seen[kind] += 1
        elif isinstance(module, nn.Linear) and reads is not None and module.out_features == experts:
            assert module.in_features == 48
            seen["router"] += 1
    layers = model.config.num_hidden_layers
    assert seen == {"reader": layers, "writer": layers, "router": layers}
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    assert result.param_fraction < 0.9
    with torch.no_grad():
        logits = sliced(INPUTS[0]).logits
    assert logits.shape == (3, 11, VOCAB) and torch.isfinite(logits).all()


def test_bfloat16_moe_is_exact_to_its_own_rounding():
    model = tiny_model("qwen2_moe", dtype=torch.bfloat16)
    reference = tiny_model("qwen2_moe")
    sliced = fxslice.compress(model, calibration(), 0.0, progress=False)
    assert {p.dtype for p in sliced.parameters()} == {torch.bfloat16}
    ids = INPUTS[0]
    with torch.no_grad():
        noise = (model(ids).logits.float() - reference(ids).logits).abs().max()
        error = (sliced(ids).logits.float() - model(ids).logits.float()).abs().max()
    assert error <= 4 * noise + 1e-3


@pytest.mark.parametrize("family", ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow)])  # gpt_oss:
# transposed expert weights with biases
def test_kv_cache_program_save_and_reload(family, tmp_path):
    model = tiny_model(family)
    sliced = fxslice.compress(model, masked_calibration(), 0.25, progress=False)
    program = with_cache(sliced, max_cache_len=64)
    with torch.no_grad():
        assert (program(PROMPT, torch.arange(PROMPT.shape[1])) - sliced(PROMPT).logits).abs().max() < 1e-4
    tokens = generate(program, PROMPT, 8)
    with torch.no_grad():  # greedy decoding by full forwards of the sliced graph
        expected = [int(sliced(tokens[:, : PROMPT.shape[1] + i]).logits[0, -1].argmax()) for i in range(8)]
    assert tokens[0, PROMPT.shape[1]:].tolist() == expected
    loaded, _ = load(save(sliced, tmp_path / "moe", record={"sparsity": 0.25}, generator=program))
    with torch.no_grad():
        assert (loaded(INPUTS[1]).logits - sliced(INPUTS[1]).logits).abs().max() < 1e-4
    assert torch.equal(loaded.generate(PROMPT, 8), tokens)


def test_budget_counts_experts_and_fills_the_shared_expert():
    model = tiny_model("qwen2_moe")
    dense = sum(p.numel() for p in model.parameters())
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.8, round_to=1, split="fixed", progress=False)
    result = sliced.fxslice
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    assert 0.795 <= result.param_count / dense <= 0.8
    assert set(result.hidden_widths) == {f"model.layers.{i}.mlp.shared_expert.down_proj" for i in range(2)}


class DenseDispatchMoE(nn.Module):
    """A toy MoE written without transformers: every expert is an nn.Linear pair, the routing weights
    (zero for unselected experts) scale each expert's output per token."""

    def __init__(self, width=32, experts=3, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.router = nn.Linear(width, experts, bias=False)
        self.up = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(experts))
        self.final = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = self.norm(x)
        scores = torch.softmax(self.router(h), -1)
        top = torch.topk(scores, 2, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        outputs = [weights[..., e:e + 1] * down(torch.relu(up(h))) for e, (up, down) in enumerate(zip(self.up, self.down))]
        mixed = outputs[0]
        for output in outputs[1:]:
            mixed = mixed + output
        return self.head(self.final(x + mixed))


def test_a_dense_dispatch_moe_without_model_code_slices_exactly():
    torch.manual_seed(0)
    model = DenseDispatchMoE().eval()
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    sliced = fxslice.compress(model, calibration(), 0.25, slice_head=True, progress=False)  # one block: slice the head
    with torch.no_grad():
        assert (exact(INPUTS[0]).logits - model(INPUTS[0])).abs().max() < 1e-4
    assert sliced.get_submodule("router").in_features == 24
    assert all(sliced.get_submodule(f"down.{e}").out_features == 24 for e in range(3))


class EinsumExperts(DenseDispatchMoE):
    """Experts as one 3-D parameter applied with einsum to every token: no pattern knows it."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Parameter(torch.randn(3, 32, 32) / 8)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = self.norm(x)
        weights = torch.softmax(self.router(h), -1)
        mixed = torch.einsum("bte,bti,eoi->bto", weights, h, self.grouped)
        return self.head(self.final(x + mixed))


def test_unknown_expert_weights_are_refused_with_the_node_before_any_change():
    torch.manual_seed(0)
    model = EinsumExperts().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GraphStructureError, match=r"output of norm 'norm' is read by node '\w+' \(call_function: aten\."):
        fxslice.compress(model, calibration(), 0.25, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
