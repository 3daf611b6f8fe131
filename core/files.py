"""Files written atomically: a reader (or a crash) sees the old file or the new one,
never a torn one.

Every layer writes state this way (run files, the privacy ledger, keys and
certificates), so it sits at the bottom and imports nothing of m3tfed. Not here:
checkpoints (a directory of tensors and metadata, :mod:`m3tfed.federation.checkpoint`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path | str, obj: Any, private: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file, fsync and ``os.replace``:
    readers see the old file or the new one, never a torn one. ``private``: the file
    (mode 0600) and a folder it creates (0700) are readable by this user only, for
    state that may hold secrets."""
    text = json.dumps(obj, indent=None if private else 2) + "\n"  # fail before touching the disk
    write_bytes_atomic(path, text.encode("utf-8"), private)


def write_bytes_atomic(path: Path | str, data: bytes, private: bool = False) -> None:
    """``data`` to ``path`` atomically, as :func:`write_json_atomic` (keys, certificates).
    The temp file is created 0600 before anything is written to it; only a file that is
    not ``private`` is opened up (0644) before it is renamed in."""
    path = Path(path)
    path.parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
