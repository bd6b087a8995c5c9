"""Folders fxslice makes for its own work (save staging, offloaded weights, compile staging).

Each is named ``PREFIX<pid>@<host>-<random>``: a process killed with SIGKILL cannot remove what it
made, so the next run that makes a folder with the same prefix in the same place removes those of
this host and this user whose process no longer exists. Folders of live processes (concurrent runs,
other ranks), of other hosts sharing the folder (ranks on other nodes, containers) and of other users
are never touched, nor anything not named exactly so.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional


def host_tag() -> str:
    """This machine's name as it appears in folder names (letters, digits, ``_`` and ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def private_folder(prefix: str, where: Optional[str | os.PathLike] = None) -> Path:
    """A new empty folder ``PREFIX<pid>@<host>-…`` in ``where`` (default: the system's temporary folder),
    after removing the leftovers of killed processes with the same prefix there."""
    place = Path(where) if where is not None else Path(tempfile.gettempdir())
    remove_stale(place, prefix)
    return Path(tempfile.mkdtemp(dir=place, prefix=f"{prefix}{os.getpid()}@{host_tag()}-"))


def made_by(name: str, prefix: str) -> Optional[tuple[int, str]]:
    """``(pid, host)`` of a folder name :func:`private_folder` made with ``prefix``; None for any other name."""
    match = re.fullmatch(re.escape(prefix) + r"(\d+)@([A-Za-z0-9_.]+)-[a-z0-9_]{8}", name)
    return (int(match.group(1)), match.group(2)) if match else None


def remove_stale(where: Path, prefix: str) -> None:
    """Delete this user's folders ``PREFIX<pid>@<this host>-…`` in ``where`` whose process no longer exists."""
    try:
        entries = list(where.iterdir())
    except OSError:
        return
    host = host_tag()
    for path in entries:
        made = made_by(path.name, prefix)
        if made is None or made[1] != host or path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
        except (OSError, AttributeError):  # gone meanwhile, or no uids here
            continue
        if not process_alive(made[0]):
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
