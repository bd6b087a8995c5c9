"""Folders fxslice makes for its own work (save staging, offloaded weights, compile staging).

Each is named ``PREFIX<pid>-<random>``: a process killed with SIGKILL cannot remove what it made, so
the next run that makes a folder with the same prefix in the same place removes those whose process
no longer exists. Folders of live processes (concurrent runs, other ranks) are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


def private_folder(prefix: str, where: Optional[str | os.PathLike] = None) -> Path:
    """A new empty folder ``PREFIX<pid>-…`` in ``where`` (default: the system's temporary folder),
    after removing the leftovers of killed processes with the same prefix there."""
    place = Path(where) if where is not None else Path(tempfile.gettempdir())
    remove_stale(place, prefix)
    return Path(tempfile.mkdtemp(dir=place, prefix=f"{prefix}{os.getpid()}-"))


def remove_stale(where: Path, prefix: str) -> None:
    """Delete the folders ``PREFIX<pid>-…`` in ``where`` whose process no longer exists."""
    try:
        entries = list(where.iterdir())
    except OSError:
        return
    for path in entries:
        if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
            continue
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True
