"""Content digests of the files and folders that settings name (prompt files, checkpoints, model folders).

A hash that covers only a path misses an edited file; hashing a multi-gigabyte checkpoint on every run is slow. So a
file's sha256 is computed once and remembered, per machine, under its (path, size, mtime): an edited or replaced file
has a new stamp and is hashed again. Both memories are bounded (the newest ``MEMORY_ENTRIES`` in the process, the
newest ``DISK_ENTRIES`` on disk): a long-lived worker hashing ever new files does not grow without end.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

MEMORY_ENTRIES = 4096
DISK_ENTRIES = 20_000
_memory: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_lock = threading.Lock()


def _cache_file() -> Path:
    root = os.environ.get("PATHGEN_DIGEST_CACHE") or Path.home() / ".cache" / "pathgen" / "digests.json"
    return Path(root)


def cache_dir() -> Path:
    """The folder of this machine's digest caches: that of ``PATHGEN_DIGEST_CACHE``, else ~/.cache/pathgen."""
    return _cache_file().parent


def save_json_cache(path: Path, data: Any) -> None:
    """Write a cache file whole (staged, then renamed: a reader never sees half of it). A cache that cannot be
    written (a read-only home, a full disk) only costs hashing again next time, so the error is not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(data))
        os.replace(staging, path)
    except OSError:
        pass


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _load_disk() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk(entries: dict[str, str]) -> None:
    """The newest ``DISK_ENTRIES`` (a dict keeps insertion order, and a new entry is inserted last)."""
    save_json_cache(_cache_file(), dict(list(entries.items())[-DISK_ENTRIES:]))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered under its (path, size, mtime)."""
    file = Path(path)
    stamp = _stamp(file)
    disk_key = "|".join(str(part) for part in stamp)
    with _lock:
        if stamp in _memory:
            _memory.move_to_end(stamp)
            return _memory[stamp]
        disk = _load_disk()
        if disk_key in disk:
            _remember(stamp, disk[disk_key])
            return disk[disk_key]
    with open(file, "rb") as handle:
        value = hashlib.file_digest(handle, "sha256").hexdigest()
    with _lock:
        _remember(stamp, value)
        disk = _load_disk()
        disk.pop(disk_key, None)  # inserted again, last: the newest
        disk[disk_key] = value
        _save_disk(disk)
    return value


def _remember(stamp: tuple[str, int, int], value: str) -> None:
    _memory[stamp] = value
    _memory.move_to_end(stamp)
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)  # the least recently used


def folder_digest(path: str | os.PathLike) -> str:
    """sha256 over every file of a folder (relative name and content digest), hidden files and caches excluded."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in relative.split("/")):
            continue
        digest.update(f"{relative}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """The digest of a file or a folder."""
    return folder_digest(path) if Path(path).is_dir() else file_digest(path)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
