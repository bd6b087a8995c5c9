"""Hyper-connections: ``N`` residual streams per token (``[B, T, N, D]``), read through a weighted sum of the
copies and through all copies merged into one row (``[B, T, N·D]``: the Linear computing the weights, a
mean square over the row), mixed by an input-dependent ``N × N`` matrix, written to every copy with its own
scale. Rotating every copy by the same ``Q`` keeps all of it: the merged row is rotated by ``diag(Q, …, Q)``,
so the Linear reading it rotates its ``N`` blocks alike, and the mean square keeps the full row's width."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import CalibrationError, GraphStructureError
from tiny_models import (VOCAB, calibration, check_exact_and_sliced, check_exact_in_dtype, check_saved_generation,
                         check_sliced, masked_calibration, random_model, seeded)

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
HY_V4 = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             mlp_layer_types=["dense", "sparse"], max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def hy_v4(dtype: torch.dtype = torch.float32) -> nn.Module:
    return random_model(AutoConfig.for_model("hy_v4", **HY_V4), dtype)


class HyperConnected(nn.Module):
    """``N`` copies of the stream; per block ``pre, post, comb`` from a Linear over the merged copies times
    ``rsqrt(mean(row²))``, the block reads ``Σ pre_i x_i`` and writes ``post_i · y + (comb · x)_i``.
    ``merged_by``: ``"reshape"`` (explicit sizes, resized when sliced) or ``"flatten"``."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, copies: int = 3, blocks: int = 2,
                 merged_by: str = "reshape", stray_read: bool = False, centred: bool = False):
        super().__init__()
        self.copies, self.merged_by, self.stray_read = copies, merged_by, stray_read
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList((nn.LayerNorm if centred else nn.RMSNorm)(width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.mixes = nn.ModuleList(nn.Linear(copies * width, 2 * copies + copies ** 2) for _ in range(blocks))
        self.collapse = nn.Linear(copies * width, copies, bias=False)
        self.final = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def merged(self, x):
        if self.merged_by == "flatten":
            return x.flatten(2)
        return x.reshape(x.shape[0], x.shape[1], self.copies * self.embed.embedding_dim)

    def weights(self, linear: nn.Linear, x):
        row = self.merged(x)
        return linear(row) * torch.rsqrt(row.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, input_ids):
        n = self.copies
        x = self.embed(input_ids).unsqueeze(2).expand(-1, -1, n, -1).contiguous()
        for norm, up, down, mix in zip(self.norms, self.ups, self.downs, self.mixes):
            pre, post, comb = self.weights(mix, x).split([n, n, n * n], -1)
            h = (torch.sigmoid(pre).unsqueeze(-1) * x).sum(2)
            y = down(torch.relu(up(norm(h))))
            comb = torch.softmax(comb.unflatten(-1, (n, n)), -1)
            x = 2 * torch.sigmoid(post).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb, x)
        h = (torch.sigmoid(self.weights(self.collapse, x)).unsqueeze(-1) * x).sum(2)
        logits = self.head(self.final(h))
        if self.stray_read:  # the merged copies read by an op that depends on their coordinates
            logits = logits + self.merged(x).amax(-1, keepdim=True)
        return logits


@pytest.mark.parametrize("merged_by", ["reshape", "flatten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_connected_streams_are_exact(merged_by, dtype):
    check_exact_in_dtype(lambda dt: seeded(HyperConnected, merged_by=merged_by).to(dt), dtype, IDS, masked_calibration())


@pytest.mark.parametrize("merged_by", ["reshape", "flatten"])
def test_hyper_connected_streams_slice_every_copy_alike(merged_by):
    torch.manual_seed(0)
    model = HyperConnected(merged_by=merged_by).eval()
    sliced = check_sliced(model, calibration(), IDS)
    result = sliced.fxslice
    assert result.widths == [24, 24, 32]  # the head's position keeps its width
    for name, width in (("mixes.0", 24), ("mixes.1", 24), ("collapse", 32)):  # N blocks of the position's width
        assert sliced.get_submodule(name).in_features == 3 * width


def test_merged_copies_read_by_another_op_are_refused_naming_it():
    torch.manual_seed(0)
    with pytest.raises(GraphStructureError, match=r"node 'amax'.*copies of the residual stream merged"):
        fxslice.compress(HyperConnected(stray_read=True).eval(), calibration(), 0.25, progress=False)


def test_merged_copies_of_a_layernorm_stream_are_refused():
    torch.manual_seed(0)
    with pytest.raises(GraphStructureError, match=r"merges the copies of a LayerNorm model's stream"):
        fxslice.compress(HyperConnected(centred=True).eval(), calibration(), 0.25, progress=False)


class CopiesFirst(nn.Module):
    """Copies before the tokens (``[B, N, T, D]``), read through their sum: exact, but a mask over ``[B, T]``
    does not say which of its rows are padding."""

    def __init__(self, vocab: int = VOCAB, width: int = 32, copies: int = 3):
        super().__init__()
        self.copies = copies
        self.embed, self.norm = nn.Embedding(vocab, width), nn.RMSNorm(width)
        self.up, self.final, self.head = nn.Linear(width, width), nn.RMSNorm(width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids).unsqueeze(1).expand(-1, self.copies, -1, -1)
        x = x + self.up(self.norm(x.sum(1))).unsqueeze(1)
        return self.head(self.final(x.mean(1)))


def test_copies_laid_out_before_the_tokens_calibrate_unmasked_and_refuse_a_mask():
    model = seeded(CopiesFirst)
    exact = fxslice.compress(model, calibration(), 0.0, progress=False)
    with torch.no_grad():
        assert (exact(IDS).logits - model(IDS)).abs().max().item() < 1e-4
    with pytest.raises(CalibrationError, match=r"shape \[4, 3, 16, 32\] does not start with the batch's"):
        fxslice.compress(model, masked_calibration(), 0.25, progress=False)


class StreamBias(nn.Module):
    """``x + b.expand_as(x)``: the broadcast takes the stream's width, which slicing changes."""

    def __init__(self, vocab: int = VOCAB, width: int = 32):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, width), nn.RMSNorm(width)
        self.bias = nn.Parameter(torch.randn(width))
        self.up, self.final, self.head = nn.Linear(width, width), nn.RMSNorm(width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.bias.expand_as(x)
        x = x + self.up(self.norm(x))
        return self.head(self.final(x))


def test_a_tensor_broadcast_to_the_stream_shape_is_refused_naming_it():
    with pytest.raises(GraphStructureError, match=r"node 'expand_as'.*consumes the residual stream"):
        fxslice.compress(seeded(StreamBias), calibration(), 0.25, progress=False)


@pytest.mark.slow  # the toys above keep the mechanism in the quick profile
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
def test_hy_v4_is_exact_and_slices(masked):
    check_exact_and_sliced(hy_v4(), masked_calibration() if masked else calibration(), IDS)


@pytest.mark.slow
def test_bfloat16_hy_v4_is_exact_to_its_own_rounding():
    check_exact_in_dtype(hy_v4, torch.bfloat16, IDS)


@pytest.mark.slow
def test_hy_v4_kv_cache_program_save_and_reload(tmp_path):
    sliced = fxslice.compress(hy_v4(), masked_calibration(), 0.25, progress=False)
    check_saved_generation(sliced, tmp_path / "sliced", IDS[:1, :6])
