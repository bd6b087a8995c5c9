"""Ways of writing a decoder that the census met, each in a toy model without transformers code:
exact at sparsity 0 and sliced at 25%, or refused naming what cannot be captured."""

import math

import pytest
import torch
from torch import nn

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import VOCAB, calibration, masked_calibration
from toy_models import TOY_VOCAB, toy_calibration

IDS = torch.randint(0, TOY_VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
WIDTH = 32


class PowRMSNorm(nn.Module):
    """Gemma 4: the inverse root written as ``pow(·, -0.5)``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(WIDTH) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)


class L2Norm(nn.Module):
    """``x / sqrt(sum(x^2) + eps)`` (nGPT-style, no weight)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


class LayerNorm1P(nn.LayerNorm):
    """Nemotron: the scale is stored minus one and ``weight + 1`` is passed to ``layer_norm``."""

    def __init__(self):
        super().__init__(WIDTH)
        nn.init.normal_(self.weight, 0.0, 0.3)
        nn.init.normal_(self.bias, 0.0, 0.3)

    def forward(self, x):
        return nn.functional.layer_norm(x, (WIDTH,), self.weight + 1, self.bias, self.eps)


class Decoder(nn.Module):
    """Two pre-norm MLP blocks; ``norm`` builds every norm, ``shared_final`` calls one weightless norm
    both before the first block and after the last (NanoChat), ``scale_in_place`` scales the embedding
    with ``mul_`` and adds ``0`` (CTRL), ``positions`` adds a sinusoidal table gathered by position
    (XGLM), ``clamp_ids`` edits the ids before the embedding (Gemma 3), ``view_update`` scales the first
    token through an in-place update of a view (linear-attention layers write state that way), ``bias_apart``
    adds the down projections' bias after the Linear, broadcast with ``expand_as`` (GPT-NeoX-Japanese)."""

    def __init__(self, norm=lambda: nn.RMSNorm(WIDTH, eps=1e-6), shared_final=False, scale_in_place=False,
                 positions=False, clamp_ids=False, view_update=False, bias_apart=False):
        super().__init__()
        self.embed = nn.Embedding(TOY_VOCAB, WIDTH)
        self.norms = nn.ModuleList(norm() for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(WIDTH, 64) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(64, WIDTH, bias=not bias_apart) for _ in range(2))
        self.down_bias = nn.ParameterList(torch.randn(WIDTH) for _ in range(2)) if bias_apart else None
        self.shared = L2Norm() if shared_final else None
        self.final = norm()
        self.head = nn.Linear(WIDTH, TOY_VOCAB, bias=False)
        self.scale_in_place, self.clamp_ids, self.view_update = scale_in_place, clamp_ids, view_update
        if positions:
            position = torch.arange(64).unsqueeze(1)
            frequency = torch.exp(torch.arange(0, WIDTH, 2) * (-math.log(10000.0) / WIDTH))
            table = torch.zeros(64, WIDTH)
            table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
            self.register_buffer("table", table, persistent=False)
        else:
            self.table = None

    def forward(self, input_ids):
        if self.clamp_ids:
            input_ids = input_ids.clone()
            input_ids[input_ids >= TOY_VOCAB - 1] = 0
        x = self.embed(input_ids)
        if self.scale_in_place:
            x.mul_(math.sqrt(WIDTH))
            x = x + 0
        if self.view_update:  # an in-place update of a view reaches the tensor it views: not a temporary
            scale = torch.ones(*x.shape[:-1], 1)
            scale[:, 0].mul_(3.0)
            x = x * scale
        if self.table is not None:
            positions = torch.arange(input_ids.shape[1])
            x = x + self.table.index_select(0, positions).unsqueeze(0)
        if self.shared is not None:
            x = self.shared(x)
        for k, (norm, up, down) in enumerate(zip(self.norms, self.up, self.down)):
            written = down(torch.relu(up(norm(x))))
            if self.down_bias is not None:
                written = written + self.down_bias[k].expand_as(written)
            x = x + written
        x = self.shared(x) if self.shared is not None else x
        return self.head(self.final(x))


CASES = {
    "pow_rms_norm": dict(norm=PowRMSNorm),
    "l2_norm": dict(norm=L2Norm),
    "layer_norm_1p": dict(norm=LayerNorm1P),
    "one_norm_called_twice": dict(shared_final=True),
    "in_place_embedding_scale": dict(scale_in_place=True),
    "sinusoidal_positions": dict(positions=True),
    "ids_edited_before_embedding": dict(clamp_ids=True),
    "in_place_update_of_a_view": dict(view_update=True),
    "bias_added_after_the_linear": dict(bias_apart=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_toy_decoder_is_exact_and_slices(case):
    torch.manual_seed(0)
    model = Decoder(**CASES[case]).eval()
    exact = fxslice.compress(model, toy_calibration(), 0.0, progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS)).abs().max() < 1e-4
    sliced = fxslice.compress(model, toy_calibration(), 0.25, progress=False)
    assert sliced.get_submodule("up.1").in_features == 24
    with torch.no_grad():
        assert torch.isfinite(sliced(IDS).logits).all()


class Scan(nn.Module):
    """A recurrence unrolled over the tokens in Python: torch.export fixes the length."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(TOY_VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, TOY_VOCAB)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        state, outputs = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            state = 0.5 * state + x[:, t]
            outputs.append(state)
        return self.head(torch.stack(outputs, 1))


def test_a_graph_fixed_to_the_example_length_is_refused():
    with pytest.raises(GraphStructureError, match=r"torch.export fixed the sequence length to 16 when capturing Scan"):
        fxslice.compress(Scan().eval(), toy_calibration(), 0.25, progress=False)


def _neox_japanese(dtype=torch.float32):
    """GPT-NeoX-Japanese: its last attention's bias is added after the Linear (``bias.expand_as(x)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox_japanese", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_multiple_size=2, max_position_embeddings=64,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # the separate bias (zero at init) and the norms away from their initial values
                param.normal_(0.3, 0.5)
    return model.to(dtype).eval()


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
def test_a_bias_added_after_the_linear_joins_it_and_rotates_with_it(masked):
    model = _neox_japanese()
    exact = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS).logits).abs().max() < 1e-4
    dense = exact.get_submodule("gpt_neox_japanese.layers.1.attention.dense")
    assert dense.bias is not None and dense.bias.shape == (dense.out_features,)  # the bias joined the Linear
    sliced = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.25, progress=False)
    assert sliced.get_submodule("gpt_neox_japanese.layers.1.attention.dense").bias.shape == (48,)
    with torch.no_grad():
        assert torch.isfinite(sliced(IDS).logits).all()


def test_a_bias_added_after_the_linear_in_bfloat16_is_exact_to_its_own_rounding():
    model, reference = _neox_japanese(torch.bfloat16), _neox_japanese()
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    with torch.no_grad():
        noise = (model(IDS).logits.float() - reference(IDS).logits).abs().max()
        error = (exact(IDS).logits.float() - model(IDS).logits.float()).abs().max()
    assert error <= 4 * noise + 1e-3


class TokenWeighted(nn.Module):
    """``head(x + up(norm(x)) · w_t)``: each token's weight ``w_t`` is computed from the sequence length by
    :meth:`weights`, in a branch the length chooses."""

    def __init__(self, chunk: int = 4):
        super().__init__()
        self.chunk = chunk
        self.embed, self.norm = nn.Embedding(TOY_VOCAB, WIDTH), nn.RMSNorm(WIDTH)
        self.up, self.head = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, TOY_VOCAB)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.head(x + self.up(self.norm(x)) * self.weights(x.shape[1], x.device)[:, None])

    def weights(self, length: int, device) -> torch.Tensor:
        raise NotImplementedError


class Chunked(TokenWeighted):
    """Each token's position within its chunk, padding the sequence up to a multiple of the chunk only when it
    is not one (Mamba-2's chunked scan): with chunks of 4 the example length 16 skips the padding branch, with
    chunks of 32 it takes it (the general branch: padding by nothing is a no-op)."""

    def weights(self, length, device):
        weight = torch.ones(length, device=device)
        pad = (self.chunk - length % self.chunk) % self.chunk
        if pad > 0:
            weight = nn.functional.pad(weight, (0, pad))
        return weight.unflatten(0, (-1, self.chunk)).cumsum(1).flatten()[:length] / self.chunk


class ShortAndLongBranches(TokenWeighted):
    """A no-op branch below length 4 (its guard excludes 2 and 3, where the graph is still right) and a
    different computation from length 100 on (the graph, traced at 16, is wrong there)."""

    def weights(self, length, device):
        weight = torch.ones(length, device=device)
        if length >= 4:
            weight = weight * 1.0
        if length >= 100:
            weight = weight * 2.0
        return weight


class OneChunkFirst(TokenWeighted):
    """A running count within chunks: one chunk directly, more by padding up to whole chunks (the general
    branch, right at every length). Traced on 16 tokens with chunks of 32, the graph knows one chunk only."""

    def weights(self, length, device):
        ones = torch.ones(length, device=device)
        if length <= self.chunk:
            return ones.cumsum(0) / self.chunk
        padded = nn.functional.pad(ones, (0, (self.chunk - length % self.chunk) % self.chunk))
        return padded.view(-1, self.chunk).cumsum(1).flatten()[:length] / self.chunk


def check_exact_at_lengths(model: nn.Module, lengths: tuple[int, ...]) -> None:
    exact = fxslice.compress(model, toy_calibration(), 0.0, progress=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for length in lengths:
            ids = torch.randint(0, TOY_VOCAB, (2, length), generator=generator)
            assert (exact(ids).logits - model(ids)).abs().max() < 1e-4, length


def test_a_graph_traced_on_the_branch_of_whole_chunks_is_traced_again_on_the_padding_one():
    """16 tokens are whole chunks of 4 (no padding traced: wrong at 2, 3, 5, …); the longest failing length
    checked is not, and its trace pads — right at every length."""
    torch.manual_seed(0)
    check_exact_at_lengths(Chunked().eval(), (2, 3, 16, 17, 64))


def test_a_graph_wrong_only_above_the_example_length_is_refused():
    with pytest.raises(GraphStructureError, match=r"guards fail at length\(s\) 2, 3, 100, 127.*differ"):
        fxslice.compress(ShortAndLongBranches().eval(), toy_calibration(), 0.25, progress=False)


def test_a_graph_traced_as_one_chunk_is_traced_again_on_a_longer_example():
    torch.manual_seed(0)
    check_exact_at_lengths(OneChunkFirst(chunk=32).eval(), (2, 20, 32, 40, 100))


def test_a_graph_whose_guards_exclude_lengths_it_still_computes_right_is_kept():
    torch.manual_seed(0)
    check_exact_at_lengths(Chunked(chunk=32).eval(), (64,))  # guards: not 32, 64
