"""Long skips: an earlier position's value added to the stream again further on — a looped model's input
injection (Dory normalises its input section's output and adds it before every loop). The stream goes on
through the first residual add taking a position's value; every later one must take it whole (through
walk-through ops only), and gets an inserted Linear on that edge, ``<block>.skip_<a>_<p>``: the identity,
``Q_aᵀ Q_p`` after rotation. Anything else done with such a value is refused naming the node."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import (VOCAB, calibration, check_exact_in_dtype, check_sliced, masked_calibration, random_model,
                         seeded)

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(11))


class InputInjected(nn.Module):
    """A pre-norm prelude block whose output ``e`` is added again after each of the following blocks."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, blocks: int = 3, injected_scale: float = 1.0):
        super().__init__()
        self.scale = injected_scale
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width) for _ in range(blocks + 1))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks + 1))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks + 1))
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.downs[i](torch.relu(self.ups[i](self.norms[i](x))))

    def inject(self, x: torch.Tensor, e: torch.Tensor, i: int) -> torch.Tensor:
        return x + e * self.scale

    def forward(self, input_ids):
        e = self.block(0, self.embed(input_ids))
        x = e
        for i in range(1, len(self.ups)):
            x = self.inject(self.block(i, x), e, i)
        return self.head(self.final(x))


def long_skips(sliced) -> list:
    return [m for m in sliced.fxslice.inserted if m.kind == "long_skip"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["added", "scaled-by-a-number"])
def test_injected_inputs_are_exact(dtype, scale):
    exact = check_exact_in_dtype(lambda dt: seeded(InputInjected, injected_scale=scale).to(dt), dtype, IDS)
    # positions: 0 embedding, 1 = e, then one per block (its MLP's output and e summed into it)
    assert [(m.reads, m.writes) for m in long_skips(exact)] == [(1, 2), (1, 3), (1, 4)]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_long_skips_are_sliced_between_their_positions(masked):
    model = seeded(InputInjected)
    sliced = check_sliced(model, masked_calibration() if masked else calibration(), IDS)
    result = sliced.fxslice
    for m in long_skips(sliced):
        assert sliced.get_submodule(m.name).weight.shape == (result.widths[m.writes], result.widths[m.reads])


class InjectedBeforeAnotherBranch(InputInjected):
    def block(self, i, x):
        return x if i else super().block(i, x)

    def inject(self, x, e, i):  # e added to a branch's output before the branch joins the stream: still whole
        return x + (e + self.downs[i](torch.relu(self.ups[i](self.norms[i](x)))))


def test_a_long_skip_summed_with_a_branch_first_is_exact():
    exact = check_exact_in_dtype(lambda dt: seeded(InjectedBeforeAnotherBranch).to(dt), torch.float32, IDS)
    assert len(long_skips(exact)) == 3


class SkipFromANormedPosition(nn.Module):
    """A position that is a writer-side norm's output (``a = norm(e)``, as Dory's loops' input) or a
    per-dimension map of the stream (``a = e ⊙ s``), added again one block later: fuse has replaced that
    value's node by the time the long skip goes in."""

    def __init__(self, mapped: bool = False, width: int = 32):
        super().__init__()
        self.mapped = mapped
        self.embed = nn.Embedding(VOCAB, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width) for _ in range(3))
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.writer_norm = nn.RMSNorm(width)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids):
        e = self.embed(input_ids)
        e = e + self.linears[0](self.norms[0](e))
        a = e * self.scale if self.mapped else self.writer_norm(e)
        x = a + self.linears[1](self.norms[1](a))
        x = x + a
        x = x + self.linears[2](self.norms[2](x))
        return self.head(self.final(x))


@pytest.mark.parametrize("mapped", [False, True], ids=["writer-norm", "per-dimension-map"])
def test_a_long_skip_from_a_value_fuse_replaces_is_exact_and_slices(mapped):
    exact = check_exact_in_dtype(lambda dt: seeded(SkipFromANormedPosition, mapped=mapped).to(dt), torch.float32, IDS)
    (skip,) = long_skips(exact)
    node = next(n for n in exact.graph.nodes if n.op == "call_module" and str(n.target) == skip.name)
    assert len(node.users) == 1
    sliced = fxslice.compress(seeded(SkipFromANormedPosition, mapped=mapped), calibration(), 0.25, progress=False)
    assert sliced.get_submodule(skip.name).weight.shape == (sliced.fxslice.widths[skip.writes],
                                                            sliced.fxslice.widths[skip.reads])


class TwoSkipsIntoOnePosition(InputInjected):
    def inject(self, x, e, i):
        return x + e + 0.5 * e


def test_two_long_skips_into_one_position_are_numbered():
    exact = check_exact_in_dtype(lambda dt: seeded(TwoSkipsIntoOnePosition).to(dt), torch.float32, IDS)
    names = [m.name for m in long_skips(exact)]
    assert names[:2] == ["skip_1_2", "skip_1_2_1"] and len(names) == 6


class InjectedIntoABranch(InputInjected):
    def inject(self, x, e, i):  # e summed into a value that reaches the stream only through a tanh
        return x + self.downs[i](torch.tanh(self.ups[i](self.norms[i](x)) + torch.cat([e, e], -1)))


class InjectedIntoATanh(InputInjected):
    def inject(self, x, e, i):  # e + z is a residual add of the stream's values, but its sum goes through a tanh
        return x + torch.tanh(e + self.downs[i](torch.relu(self.ups[i](self.norms[i](x)))))


def test_a_position_value_taken_other_than_whole_is_refused_naming_the_node():
    with pytest.raises(GraphStructureError, match=r"node 'cat(_\d+)?'.*consumes the residual stream"):
        fxslice.compress(seeded(InjectedIntoABranch), calibration(), 0.25, progress=False)
    with pytest.raises(GraphStructureError, match=r"position 1 .* feeds node 'add(_\d+)?' .* besides the residual add"):
        fxslice.compress(seeded(InjectedIntoATanh), calibration(), 0.25, progress=False)


DORY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
            n_recurrent_loops=2, max_position_embeddings=64, sliding_window=8, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def dory(dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    return random_model(AutoConfig.for_model("dory", **{**DORY, **overrides}), dtype)


@pytest.mark.slow  # the toys above and tests/test_interpolations.py keep the mechanisms in the quick profile
def test_dory_without_recurrent_layers_is_exact_and_slices():
    """nGPT blocks (interpolated updates, every norm an L2 norm) with the input section's normalised output
    injected before each of two loops — here over no recurrent layer, so that no weight is read twice. Its 25%
    slice is larger than dense: each raw position between an update and its norm costs Linears the narrowing
    does not pay for."""
    model = dory(num_hidden_layers=2, n_recurrent_layers=0)
    exact = fxslice.compress(model, masked_calibration(), 0.0, progress=False)
    with torch.no_grad():
        for rows in (IDS, IDS[:1, :5]):
            assert (exact(rows).logits - model(rows).logits).abs().max().item() < 1e-4
    assert len(long_skips(exact)) == 1  # the second loop's injection; the first is the stream itself
    check_sliced(model, calibration(), IDS)


@pytest.mark.slow
def test_a_dory_slice_with_a_long_skip_saves_and_reloads(tmp_path):
    """The folder's program is captured again and the slice replayed on it: the long skip is inserted anew."""
    from fxslice.runtime.load import load
    from fxslice.runtime.save import save

    sliced = fxslice.compress(dory(num_hidden_layers=2, n_recurrent_layers=0), calibration(), 0.25, progress=False)
    loaded, _ = load(save(sliced, tmp_path / "sliced"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, sliced(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dory_looping_a_layer_is_refused_naming_the_shared_weight():
    """The loops run the recurrent layers again: one weight read at two stream positions, which two bases
    cannot both rotate."""
    with pytest.raises(GraphStructureError, match=r"'model.layers.1.self_attn.q_proj' and .* share one weight"):
        fxslice.compress(dory(), calibration(), 0.25, progress=False)
