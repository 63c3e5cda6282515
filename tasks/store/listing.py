"""Object listings with modification times (planning works from these, never by reading every shard) or with
versions (what tells a changed object from the one last read)."""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import Any

from tasks.store.objects import Store, is_temporary


def _mtime(info: dict[str, Any]) -> float:
    for name in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(name)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return 0.0


ObjectVersion = tuple[float, int | None, str | None]


def object_version(info: dict[str, Any]) -> ObjectVersion:
    """(modification time, size, ETag) of a listed object. S3 and SeaweedFS give times to the second, so two commits
    within one second are told apart by their size or their ETag (a digest of the content on S3)."""
    etag = info.get("ETag") or info.get("etag")
    size = info.get("size")
    return _mtime(info), int(size) if isinstance(size, int | float) else None, str(etag) if etag else None


def _listed(store: Store, prefix: str, suffix: str) -> dict[str, dict[str, Any]]:
    base = store.path(prefix)
    store.fs.invalidate_cache(base)  # another process may have committed since this client last listed
    if not store.fs.exists(base):
        return {}
    found = store.fs.find(base, detail=True)
    listed = {}
    for path, info in found.items():
        key = posixpath.relpath(path, store.root)
        if key.endswith(suffix) and not is_temporary(key):
            listed[key] = info
    return listed


def list_mtimes(store: Store, prefix: str, suffix: str = "") -> dict[str, float]:
    """{committed key: modification time} below a prefix; temporary objects are never listed."""
    return {key: _mtime(info) for key, info in _listed(store, prefix, suffix).items()}


def list_versions(store: Store, prefix: str, suffix: str = "") -> dict[str, ObjectVersion]:
    """{committed key: ``object_version``} below a prefix; temporary objects are never listed."""
    return {key: object_version(info) for key, info in _listed(store, prefix, suffix).items()}
