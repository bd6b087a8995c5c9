"""The saved-folder format, and writing a folder so that readers only ever see a whole one.

A saved folder holds ``model.pt2`` (the logits program), optionally ``generate.pt2`` (the KV-cache
program), the weights in ``weights*.safetensors`` (:mod:`fxslice.runtime.weightfiles`), the
tokenizer files, and ``fxslice.json`` (the record: source model, sparsity, widths, parameter
counts, the programs' SHA-256, which stored tensor each program parameter is, ...). A save
assembles the folder in a staging folder on the same file system and swaps it into place; the
record is rewritten by replacing the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import FxSliceError
from ..tempfolders import private_folder
from .fields import check_fields

FORMAT = "fxslice-sliced-model"
FORMAT_VERSION = 2  # 2: weights stored once in safetensors files beside weightless programs
PROGRAM = "model.pt2"
GENERATOR = "generate.pt2"
RECORD = "fxslice.json"
STOCK_FORMAT = "fxslice-transformers-checkpoint"
STOCK_RECORD = "fxslice_stock.json"
"""Beside a stock Transformers checkpoint (:mod:`fxslice.runtime.stock`): what the slice was; no loader needs it."""

REQUIRED = {"vocab_size": int, "program_sha256": str}  # record keys loading needs, with their types


def read_record(folder: str | os.PathLike) -> dict:
    """``fxslice.json`` of a saved folder, checked: format, version and the keys loading needs."""
    path = Path(folder)
    if not path.is_dir():
        raise FxSliceError(f"{path} is not a folder saved by fxslice")
    where = path / RECORD
    if not where.is_file() and is_stock_folder(path):
        raise FxSliceError(f"{path} is a stock Transformers checkpoint (fxslice.save(..., format='transformers')): "
                           "load it with transformers.AutoModelForCausalLM.from_pretrained")
    if not where.is_file():
        raise FxSliceError(f"{path} has no {RECORD}: not a folder saved by fxslice.save")
    try:
        record = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FxSliceError(f"{where} is corrupted: {exc}") from exc
    if not isinstance(record, dict):
        raise FxSliceError(f"{where} is corrupted: expected a JSON object, found a {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise FxSliceError(f"{where} describes format {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise FxSliceError(f"{where} has format version {record.get('format_version')}, "
                           f"this fxslice reads {FORMAT_VERSION}")
    for key, kind in REQUIRED.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise FxSliceError(f"{where} is corrupted: '{key}' is missing or not a {kind.__name__}")
    check_fields(record, str(where))
    return record


def write_record(folder: Path, record: dict) -> None:
    """Write ``record`` as the folder's ``fxslice.json``, replacing any previous one in one step."""
    temporary = folder / f".{RECORD}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record, indent=2, default=str))
    os.replace(temporary, folder / RECORD)


def is_saved_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with a valid ``fxslice.json``."""
    try:
        read_record(path)
    except FxSliceError:
        return False
    return True


def is_stock_folder(path: Path) -> bool:
    """Whether ``path`` holds a stock checkpoint fxslice wrote (``fxslice_stock.json``)."""
    try:
        return json.loads((Path(path) / STOCK_RECORD).read_text()).get("format") == STOCK_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(target: Path, overwrite: bool) -> None:
    """A folder may be written to ``target`` if nothing is there, or, with ``overwrite``, an empty folder
    or one fxslice saved. Anything else (a file, a folder of other files) is refused untouched."""
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FxSliceError(f"{target} already exists (pass overwrite=True / --overwrite to replace it)")
    if target.is_symlink() or not target.is_dir():
        raise FxSliceError(f"{target} exists and is not a folder; fxslice will not replace it")
    if any(target.iterdir()) and not is_saved_folder(target) and not is_stock_folder(target):
        raise FxSliceError(f"{target} is a folder fxslice did not write (no valid {RECORD} or {STOCK_RECORD}); "
                           "refusing to delete it: choose another output folder")


def staging_folder(target: Path) -> Path:
    """An empty folder on the target's file system (so that it can be renamed into place), outside the
    target's parent when the temporary directory shares that file system: a save killed midway then
    leaves nothing beside the target (and the next save of that name removes what it left elsewhere).
    Created with the user's umask, like any folder."""
    temporary = Path(tempfile.gettempdir())
    where = temporary if _can_rename(temporary, target.parent) else target.parent
    staging = private_folder(_staging_prefix(target.name), where)
    staging.chmod(0o777 & ~current_umask())
    return staging


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_files(folder: Path) -> None:
    """Every file in ``folder`` gets the user's umask, as a file they created would (writers such as
    safetensors' make private 0600 files): a folder another account can read has readable files."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _can_rename(source_dir: Path, target_dir: Path) -> bool:
    """Whether a folder made in ``source_dir`` can be renamed into ``target_dir`` (same file system and
    mount), found by moving a probe folder there and removing it."""
    try:
        probe = Path(tempfile.mkdtemp(dir=source_dir, prefix=".fxslice-probe-"))
    except OSError:
        return False
    moved = target_dir / probe.name
    try:
        os.rename(probe, moved)
    except OSError:
        probe.rmdir()
        return False
    moved.rmdir()
    return True


def _staging_prefix(name: str) -> str:
    return f".{name}.fxslice-"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """``staging`` becomes ``target``; a previous ``target`` is swapped out in one step and deleted.

    Call :func:`check_destination` first. Another save may still place ``target`` between that check
    and the rename (two saves of the same folder at once): without ``overwrite`` this save is then
    refused and its folder dropped; with it, the folder is swapped in whole (the last save wins)."""
    if not target.exists() and not target.is_symlink():
        try:
            os.replace(staging, target)
            return
        except OSError:
            if not target.exists():
                raise
    if not overwrite:  # it was not there when check_destination looked
        raise FxSliceError(f"{target} was written by another save while this one ran; it was left as that save "
                           "wrote it (pass overwrite=True / --overwrite to replace it)")
    check_destination(target, overwrite)
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "previous")
    moved = False
    try:
        os.replace(staging, target)
        moved = True
    except BaseException:
        try:
            os.replace(old / "previous", target)  # put the previous folder back
        except OSError:
            raise FxSliceError(f"{target} was written by another save while this one replaced it; the previous "
                               f"folder is kept at {old / 'previous'}") from None
        raise
    finally:
        if moved or not (old / "previous").exists():
            shutil.rmtree(old, ignore_errors=True)
