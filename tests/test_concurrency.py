"""Work that overlaps or is cut short: two saves of one folder at once, a streamed compression killed
with SIGKILL at any point, leftovers of killed processes removed by the next run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fxslice
from fxslice.errors import FxSliceError
from fxslice.runtime import save as save_module
from fxslice.tempfolders import host_tag, made_by, private_folder
from tiny_models import calibration, folder_digest, tiny_model

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def slices():
    model = tiny_model("llama_tied")
    return [fxslice.compress(model, calibration(), sparsity, progress=False) for sparsity in (0.25, 0.5)]


def _sparsity(folder: Path) -> float:
    return fxslice.load(folder, with_tokenizer=False)[0].record["sparsity"]


def _race(monkeypatch, other: Path, target: Path) -> None:
    """Let another save place ``other``'s copy at ``target`` between this save's last check and its rename."""
    real = save_module.move_into_place

    def meanwhile(staging: Path, destination: Path, overwrite: bool) -> None:
        shutil.copytree(other, destination)
        real(staging, destination, overwrite)
    monkeypatch.setattr(save_module, "move_into_place", meanwhile)


def test_a_save_that_loses_the_race_leaves_the_winners_folder(slices, tmp_path, monkeypatch):
    first, second = slices
    winner = fxslice.save(first, tmp_path / "winner", max_cache_len=0)
    target = tmp_path / "model"
    _race(monkeypatch, winner, target)
    with pytest.raises(FxSliceError, match="was written by another save while this one ran"):
        fxslice.save(second, target, max_cache_len=0)
    assert _sparsity(target) == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "winner"]  # no staging left beside them


def test_with_overwrite_the_last_save_replaces_the_folder_whole(slices, tmp_path, monkeypatch):
    first, second = slices
    winner = fxslice.save(first, tmp_path / "winner", max_cache_len=0)
    target = tmp_path / "model"
    _race(monkeypatch, winner, target)
    fxslice.save(second, target, overwrite=True, max_cache_len=0)
    assert _sparsity(target) == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "winner"]


def test_leftovers_of_a_killed_process_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = host_tag()
    stale = tmp_path / f"fxslice-offload-{int(dead.stdout)}@{host}-abcdefgh"
    stale.mkdir()
    (stale / "weights-00000.safetensors").write_bytes(b"partial")
    kept = [tmp_path / f"fxslice-offload-{os.getppid()}@{host}-abcdefgh",  # a live process's (the runner's parent)
            tmp_path / f"fxslice-offload-{int(dead.stdout)}@another.node-abcdefgh",  # another host's rank
            tmp_path / f"fxslice-offload-{int(dead.stdout)}-backup"]  # not a name fxslice makes
    for folder in kept:
        folder.mkdir()
    fresh = private_folder("fxslice-offload-", tmp_path)
    assert made_by(fresh.name, "fxslice-offload-") == (os.getpid(), host)
    assert not stale.exists() and all(folder.is_dir() for folder in kept)


CONCURRENT_SAVE = """
import sys
sys.path.insert(0, {tests!r})
import fxslice
from tiny_models import calibration, tiny_model
sliced = fxslice.compress(tiny_model("llama_tied"), calibration(), {sparsity}, progress=False)
print("ready", flush=True)
sys.stdin.readline()
fxslice.save(sliced, {target!r}, overwrite=True, max_cache_len=0)
"""


@pytest.mark.slow
def test_two_processes_saving_one_folder_end_with_one_whole_folder(tmp_path):
    target = tmp_path / "model"
    for _ in range(3):
        writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SAVE.format(tests=TESTS, sparsity=s,
                                                                                  target=str(target))],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for s in (0.25, 0.5)]
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready"
        for writer in writers:  # both start saving at once
            writer.stdin.write("go\n")
            writer.stdin.flush()
        for writer in writers:
            assert writer.wait(300) == 0
        loaded, _ = fxslice.load(target, with_tokenizer=False)  # checksums of every file checked
        assert loaded.record["sparsity"] in (0.25, 0.5)
        assert [p.name for p in tmp_path.iterdir()] == ["model"]


STREAMED = """
import sys
sys.path.insert(0, {tests!r})
import fxslice
from tiny_models import calibration
sliced = fxslice.compress({checkpoint!r}, calibration(), 0.25, offload_dir={offload!r}, progress=False)
fxslice.save(sliced, {target!r}, max_cache_len=16)
"""



@pytest.mark.slow
def test_a_streamed_compression_killed_at_any_point_leaves_no_trace(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model("llama").save_pretrained(checkpoint)
    before = folder_digest(checkpoint)
    offload, output = tmp_path / "offload", tmp_path / "output"
    offload.mkdir()
    output.mkdir()
    script = STREAMED.format(tests=TESTS, checkpoint=str(checkpoint), offload=str(offload),
                             target=str(output / "sliced"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True)  # one whole run: how long one takes
    whole = time.perf_counter() - started
    shutil.rmtree(output / "sliced")
    for fraction in (0.3, 0.5, 0.65, 0.8, 0.9, 0.97):
        process = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(whole * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert folder_digest(checkpoint) == before, f"the checkpoint changed (killed at {fraction:.0%})"
        left = [p.name for p in output.iterdir()]
        assert left in ([], ["sliced"]), f"killed at {fraction:.0%}, the output folder holds {left}"
        if left:  # the save finished before the kill: a whole folder
            fxslice.load(output / "sliced", with_tokenizer=False)
            shutil.rmtree(output / "sliced")
    survivor = private_folder("fxslice-offload-", offload)  # the next run clears what the killed ones left
    assert [p.name for p in offload.iterdir()] == [survivor.name]
    staging = [p for p in Path(tempfile.gettempdir()).glob(".sliced.fxslice-*")]
    private_folder(".sliced.fxslice-", tempfile.gettempdir()).rmdir()
    assert all(not p.exists() or (made_by(p.name, ".sliced.fxslice-") or (None,))[0] == os.getpid() for p in staging)
