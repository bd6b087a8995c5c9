"""Data-parallel calibration: two gloo processes on two halves of the data give the one-process result."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxslice
from fxslice.distributed import shutdown
from fxslice.hf import logits_of

from tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.slow  # two gloo processes per test

WORLD = 2


def _batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 16 + i:] = 0  # right padding, different on every batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))


def _worker(rank: int, init_file: str, source: str, basis: str, out_dir: str, extra: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        shard = _batches()[rank::WORLD]
        model = source if os.path.isdir(source) else tiny_model(source)
        sliced = fxslice.compress(model, shard, 0.25, basis=basis, progress=False, **extra)
        torch.save({"logits": logits_of(sliced, _probe()), "tokens": sliced.fxslice.calibration_tokens,
                    "params": sliced.fxslice.param_count}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown()  # barrier, then leave: a rank that leaves while another is mid-collective aborts it


NARROWED = {"hidden_sparsity": 0.25, "value_sparsity": 0.25, "key_sparsity": 0.25}  # MLP units, attention values and keys too


@pytest.mark.parametrize("family, streamed, basis, extra", [("llama", False, "position", {}), ("gpt2", True, "block", {}),
                                                            ("opt", False, "block", {}), ("qwen2", True, "block", NARROWED)])
def test_two_gloo_ranks_equal_one_process_on_the_union(tmp_path, family, streamed, basis, extra):
    source = family
    if streamed:
        source = str(tmp_path / "checkpoint")
        tiny_model(family).save_pretrained(source)
    mp.spawn(_worker, args=(str(tmp_path / "init"), source, basis, str(tmp_path), extra), nprocs=WORLD, join=True)
    single = fxslice.compress(source if streamed else tiny_model(family), _batches(), 0.25, basis=basis,
                              progress=False, **extra)
    if extra:
        assert single.fxslice.value_widths and single.fxslice.hidden_widths and single.fxslice.key_widths
    expected = logits_of(single, _probe())
    tokens = sum(int(b["attention_mask"].sum()) for b in _batches())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tokens"] == tokens == single.fxslice.calibration_tokens
        assert got["params"] == single.fxslice.param_count
        torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=1e-5)


def _failing_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        shard = _batches()[rank::WORLD]
        if rank == 1:
            shard[0]["input_ids"][0, 0] = VOCAB + 5  # this rank's shard is bad
        try:
            fxslice.compress(tiny_model("llama"), shard, 0.25, progress=False)
            message = "no error"
        except fxslice.FxSliceError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as handle:
            handle.write(message)
    finally:
        shutdown()  # barrier, then leave: a rank that leaves while another is mid-collective aborts it


def test_a_rank_with_bad_data_stops_every_rank(tmp_path):
    mp.spawn(_failing_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    messages = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(WORLD)]
    assert messages[0] == messages[1], "every rank stops with the same message"
    assert messages[0].startswith("rank 1 of 2 failed, every rank stops:") and "outside the vocabulary" in messages[0]
