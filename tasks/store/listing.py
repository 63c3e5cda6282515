"""Object listings with modification times: planning works from these, never by reading every shard."""

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


def list_mtimes(store: Store, prefix: str, suffix: str = "") -> dict[str, float]:
    """{committed key: modification time} below a prefix; temporary objects are never listed."""
    base = store.path(prefix)
    store.fs.invalidate_cache(base)  # another process may have committed since this client last listed
    if not store.fs.exists(base):
        return {}
    found = store.fs.find(base, detail=True)
    listed = {}
    for path, info in found.items():
        key = posixpath.relpath(path, store.root)
        if key.endswith(suffix) and not is_temporary(key):
            listed[key] = _mtime(info)
    return listed
