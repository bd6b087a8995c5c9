"""Sparse-attention indexers whose selection is a Python loop over query groups (``patterns/indexers.py``):
captured through their dense, verified substitutes, with the selection really active (budgets far below the
tested lengths), the graph gives the model's logits at every length."""

import pytest
import torch
from transformers import AutoConfig

import fxslice
from tiny_models import VOCAB, calibration, masked_calibration, random_model

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# Kolibri 1.1: a sliding layer, then an indexed one whose pool (blocks of 4 keys, 16 keys in all) and token
# budget (8 + 4 local + 2 sinks) are shorter than the inputs: blocks and tokens are really chosen
KOLIBRI = dict(SMALL, layer_types=["sliding_attention", "indexed_attention"], index_layers=[1], kv_source_layers=[0, 1],
               mlp_only_layers=[0, 1], sliding_window=32, index_topk=8, index_pool_size=16, index_compression=4,
               index_num_heads=2, index_num_local_tokens=4, index_num_sink_tokens=2)


def kolibri(**overrides):
    return random_model(AutoConfig.for_model("kolibri1_1", **{**KOLIBRI, **overrides}))


@pytest.mark.parametrize("masked", [pytest.param(False, marks=pytest.mark.slow), True], ids=["no-mask", "right-padded-mask"])
def test_an_indexer_selecting_by_query_groups_is_captured_exactly(masked):
    model = kolibri()
    exact = fxslice.compress(model, masked_calibration() if masked else calibration(), 0.0, progress=False)
    generator = torch.Generator().manual_seed(3)
    loose = kolibri(index_topk=10 ** 6, index_pool_size=10 ** 6)  # the same weights, nothing left out
    with torch.no_grad():
        for length in (2, 9, 17, 33, 64):
            ids = torch.randint(0, VOCAB, (2, length), generator=generator)
            want = model(ids, use_cache=False).logits
            assert (exact(ids).logits - want).abs().max().item() < 1e-4, length
        assert (loose(ids, use_cache=False).logits - want).abs().max().item() > 1e-3  # the selection is active


@pytest.mark.slow
def test_an_indexed_model_slices():
    model = kolibri()
    sliced = fxslice.compress(model, calibration(), 0.25, progress=False)
    assert sliced.fxslice.param_count < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(sliced(torch.randint(0, VOCAB, (2, 40))).logits).all()

