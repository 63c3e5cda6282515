"""Local files written whole: a reader (another process, a resumed run) finds the old file or the new one, never
half of one. The store's own writes are atomic through its API (``Store.write_bytes``, ``Store.put_file``); this is
for files on the machine's disk: task CSVs, MIL checkpoints and metrics, converted datasets."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644  # mkstemp makes its file private; what we write is shared like any other output


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """``write(partial)`` fills a temporary file beside ``path`` (it may also replace it, e.g. by a hard link),
    whose bytes reach the disk before it is renamed over ``path``; on any error the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    partial = Path(name)
    try:
        # before the write: a write that links the partial name to another file must not change that file's mode
        os.chmod(partial, FILE_MODE)
        write(partial)
        with open(partial, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
