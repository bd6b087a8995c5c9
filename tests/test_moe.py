"""Mixture-of-experts models: routers read the stream, every expert's up/gate weights are readers and
its down weights writers, all through the same analysis as a dense model."""

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import FxSliceError, GraphStructureError
from fxslice.graph.modules import ExpertLinear
from fxslice.passes.p7_rotate.hidden import keep_rows, select_expert_units
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
    sliced = fxslice.compress(model, masked_calibration(), 0.25, hidden_sparsity=0.3, progress=False)
    assert any("experts" in writer for writer in sliced.fxslice.hidden_widths)  # expert units cut too
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


def test_budget_counts_experts_and_cuts_every_experts_units():
    model = tiny_model("qwen2_moe")
    dense = sum(p.numel() for p in model.parameters())
    sliced = fxslice.compress(model, masked_calibration(), target_params=0.8, round_to=1, split="fixed", progress=False)
    result = sliced.fxslice
    assert result.param_count == sum(p.numel() for p in sliced.parameters())
    assert 0.795 <= result.param_count / dense <= 0.8
    layers = range(model.config.num_hidden_layers)
    assert set(result.hidden_widths) == {f"model.layers.{i}.mlp.{part}.down_proj" for i in layers
                                         for part in ("shared_expert", "experts")}


# the experts that run through transformers' grouped form, the ones that see every token (llama4_text)
# and GPT-OSS's interleaved gate/up with biases
EXPERT_UNITS = ["mixtral", "gpt_oss", pytest.param("llama4_text", marks=pytest.mark.slow),
                pytest.param("qwen3_moe", marks=pytest.mark.slow),
                pytest.param("olmoe", marks=pytest.mark.slow)]


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
@pytest.mark.parametrize("family", EXPERT_UNITS)
def test_experts_lose_hidden_units_each_its_own_refitted(family, masked):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = masked_calibration() if masked else calibration()
    sliced = fxslice.compress(model, batches, 0.0, hidden_sparsity=0.5, basis="none", progress=False)
    experts = {name: m for name, m in sliced.named_modules() if isinstance(m, ExpertLinear)}
    writers = [name for name in sliced.fxslice.hidden_widths if name in experts]
    assert len(writers) == model.config.num_hidden_layers, sliced.fxslice.hidden_widths
    for writer in writers:
        kept, full = sliced.fxslice.hidden_widths[writer]
        assert kept == full // 2 and experts[writer].in_features == kept
        units = sliced.fxslice.slice.hidden_units[writer]
        assert len(units) == experts[writer].num_experts and all(len(u) == kept for u in units)
        assert len({tuple(u) for u in units}) > 1  # each expert its own units
    assert sliced.fxslice.param_count == sum(p.numel() for p in sliced.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "compress changed the model"
    with torch.no_grad():
        reference = model(INPUTS[0]).logits
        cut = sliced(INPUTS[0]).logits
    assert torch.isfinite(cut).all()
    # the refit keeps the slice near the model: much nearer than deleting the same units without it
    assert (cut - reference).abs().max() < 0.5 * reference.abs().max()


def test_keep_rows_keeps_each_experts_units_in_blocked_and_interleaved_layouts():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float64).reshape(2, 8, 3)  # 2 experts, gate/up of 4 units
    kept = torch.tensor([[0, 2], [1, 3]])
    blocked, interleaved = ExpertLinear(weight.clone()), ExpertLinear(weight.clone(), torch.arange(16.).reshape(2, 8))
    keep_rows(blocked, kept, 2)
    keep_rows(interleaved, kept, 2, interleaved=True)
    assert torch.equal(blocked.weight[0], weight[0, [0, 2, 4, 6]]) and torch.equal(blocked.weight[1], weight[1, [1, 3, 5, 7]])
    assert torch.equal(interleaved.weight[1], weight[1, [2, 3, 6, 7]]) and interleaved.out_features == 4
    assert interleaved.bias[1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_an_expert_no_calibration_row_reaches_keeps_its_largest_units_unrefitted():
    grams = torch.zeros(2, 4, 4, dtype=torch.float64)
    grams[0] = torch.eye(4)
    writer = torch.tensor([[[1.0, 1.0, 1.0, 1.0]], [[1.0, 3.0, 0.1, 2.0]]], dtype=torch.float64)  # [E, out 1, I 4]
    reader = torch.ones(2, 4, 2, dtype=torch.float64)
    kept, refitted, error = select_expert_units(grams, writer, [(reader, False)], 2)
    assert kept[1].tolist() == [1, 3] and torch.equal(refitted[1], writer[1][:, [1, 3]])
    assert error == pytest.approx(0.5, rel=1e-2)  # expert 0: two of four equal, independent units


def test_energy_allocation_is_refused_for_experts_with_the_module():
    with pytest.raises(FxSliceError, match=r"allocation='energy' ranks the units of dense MLPs; a mixture of experts "
                                           r"\('model\.layers\.0\.mlp\.experts\.down_proj'\)"):
        fxslice.compress(tiny_model("mixtral"), calibration(), 0.0, hidden_sparsity=0.3, allocation="energy",
                         progress=False)


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
