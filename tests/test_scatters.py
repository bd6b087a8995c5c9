"""A branch scattered into a zero tensor by rows, and one norm module called at two stream positions (X-MOD's
language adapters: ``out = zeros_like(y); out[rows] = adapter(y[rows]); x = out + y``, where the adapter's input
``y`` is the layer's output LayerNorm applied a second time). ``index_put`` into zeros along leading dimensions
is linear in the scattered values and passes a rotation of the last dimension, so the adapter's writers are
rotated where they are; fuse writes the zero tensor's width out (``new_zeros(y, [B, T, D])``), and resizing
gives it the width of the position the branch is added to, whatever ``y``'s is. A norm module called twice
leaves the graph with its last call; each call's ``γ``, ``β`` fold into its own readers."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig

import fxslice
from fxslice.errors import GraphStructureError
from tiny_models import (VOCAB, calibration, check_exact_and_sliced, check_exact_in_dtype, check_saved_generation,
                         check_sliced, masked_calibration, perturb_norms, random_model, seeded)

IDS = torch.randint(0, VOCAB, (4, 11), generator=torch.Generator().manual_seed(7))


class RowAdapters(nn.Module):
    """Pre-norm blocks whose MLP-like branch runs on the rows of one "language" only (the even first tokens),
    scattered into a zero tensor; ``shared_norm``: every block's two norms are one module called twice."""

    def __init__(self, width: int = 32, blocks: int = 2, layer_norm: bool = False, shared_norm: bool = False,
                 languages: int = 1):
        super().__init__()
        norm = (lambda: nn.LayerNorm(width)) if layer_norm else (lambda: nn.RMSNorm(width))
        self.embed = nn.Embedding(VOCAB, width)
        self.norms = nn.ModuleList(norm() for _ in range(blocks if shared_norm else 2 * blocks))
        self.shared_norm, self.languages = shared_norm, languages
        self.outs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks * languages))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks * languages))
        # shared: the final norm is the first block's (one module at two positions far apart)
        self.final = self.norms[0] if shared_norm else norm()
        self.head = nn.Linear(width, VOCAB, bias=False)
        perturb_norms(self)

    def norm(self, i: int, k: int) -> nn.Module:
        return self.norms[i] if self.shared_norm else self.norms[2 * i + k]

    def forward(self, input_ids):
        x = self.embed(input_ids)
        language = input_ids[:, 0] % self.languages
        for i in range(len(self.outs)):
            x = x + self.outs[i](self.norm(i, 0)(x))
            y = self.norm(i, 1)(x)
            out = torch.zeros_like(y)
            for k in range(self.languages):  # one adapter per language, each on its rows
                rows = language == k
                adapter = self.languages * i + k
                out[rows] = self.downs[adapter](torch.relu(self.ups[adapter](y[rows])))
            x = x + out
        return self.head(self.final(x))


@pytest.mark.parametrize("languages", [1, 2])
@pytest.mark.parametrize("shared_norm", [False, True], ids=["own-norms", "norms-called-twice"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_scattered_branches_are_exact(shared_norm, layer_norm, dtype, languages):
    build = lambda dtype: seeded(RowAdapters, layer_norm=layer_norm, shared_norm=shared_norm,  # noqa: E731
                                 languages=languages).to(dtype)
    exact = check_exact_in_dtype(build, dtype, IDS)
    # the adapters' writers are rotated where they are: no branch kept in the model's coordinates
    assert not [m for m in exact.fxslice.inserted if m.kind == "branch_map"]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "right-padded-mask"])
@pytest.mark.parametrize("shared_norm", [False, True], ids=["own-norms", "norms-called-twice"])
def test_row_scattered_branches_slice_with_the_position_they_are_added_to(masked, shared_norm):
    """The last adapters write the head's input, kept wider than the position their zero tensor is made like."""
    model = seeded(RowAdapters, layer_norm=True, shared_norm=shared_norm, languages=2)
    sliced = check_sliced(model, masked_calibration() if masked else calibration(), IDS)
    assert sliced.fxslice.param_count < sum(p.numel() for p in model.parameters())
    widths = sliced.fxslice.widths
    assert widths[-1] > widths[-2]
    for adapter in (2, 3):
        assert tuple(sliced.get_submodule(f"downs.{adapter}").weight.shape) == (widths[-1], 64)


def test_a_zero_tensor_shaped_like_the_stream_in_a_branch_kept_in_model_coordinates_is_refused():
    """``out[..., cols] = v`` is no row scatter: the branch would be mapped in as a whole, in the model's
    coordinates, but ``zeros_like(x)`` of the rotated stream would take its sliced width."""

    class ColumnScatter(RowAdapters):
        def forward(self, input_ids):
            x = self.embed(input_ids)
            out = torch.zeros_like(x)
            out[..., :16] = self.downs[0](torch.relu(self.ups[0](self.norms[0](x))))[..., :16]
            return self.head(self.final(x + out))

    with pytest.raises(GraphStructureError, match=r"node 'zeros_like(_\d+)?' .* makes a tensor shaped like .* adds "
                                                  r"it to the stream in the model's coordinates"):
        fxslice.compress(seeded(ColumnScatter), calibration(), 0.25, progress=False)


XMOD = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, is_decoder=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            default_language="en_XX")


# two languages with a mask in the quick profile, the other three in the slow one
@pytest.mark.parametrize("masked, languages", [
    pytest.param(masked, languages, id=f"{'right-padded-mask' if masked else 'no-mask'}-{len(languages)}-languages",
                 marks=[] if masked and len(languages) == 2 else [pytest.mark.slow])
    for masked in (False, True) for languages in (("en_XX",), ("en_XX", "de_DE"))])
def test_xmod_is_exact_and_slices(masked, languages):
    """Post-norm blocks, language adapters scattered by rows, the output LayerNorm applied again before them."""
    model = random_model(AutoConfig.for_model("xmod", **XMOD, languages=list(languages)))
    check_exact_and_sliced(model, masked_calibration() if masked else calibration(), IDS)


@pytest.mark.slow
def test_an_xmod_slice_generates_from_its_saved_folder(tmp_path):
    sliced = fxslice.compress(random_model(AutoConfig.for_model("xmod", **XMOD)), calibration(), 0.25, progress=False)
    check_saved_generation(sliced, tmp_path / "xmod", IDS[:1, :6])


def test_bfloat16_xmod_is_exact_to_its_own_rounding():
    check_exact_in_dtype(lambda dtype: random_model(AutoConfig.for_model("xmod", **XMOD), dtype), torch.bfloat16, IDS)
