"""One store addressed by an fsspec URL: ``file://./store`` on a laptop, ``s3://bucket/prefix`` in production.

Writers never expose half an object: bytes go to a temporary key beside the final one and are then moved onto
the final key (a rename on a local disk, a server-side copy on S3), so a reader sees the old object or the whole
new one. S3 endpoint and credentials come from the environment only; nothing here logs or stores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from pathgen.settings import S3Settings

ENDPOINT_ENV_VARS = ("PATHGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TMP_MARKER = ".tmp-"


class StoreError(RuntimeError):
    """The store cannot be reached or written; the message names the URL and what to check."""


def s3_endpoint() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def storage_options(url: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """fsspec options for a URL: for S3 the endpoint from the environment and bounded timeouts and retries."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    s3 = s3 or S3Settings()
    options: dict[str, Any] = {
        # Slides are read with ranged requests at scattered tile offsets: small blocks, kept in an LRU block cache,
        # instead of s3fs's 50 MB read-ahead that would fetch far more than the tiles a patch needs.
        "default_block_size": s3.block_size,
        "default_cache_type": "blockcache",
        "config_kwargs": {
            "connect_timeout": s3.connect_timeout,
            "read_timeout": s3.read_timeout,
            "retries": {"max_attempts": s3.max_attempts, "mode": "standard"},
        },
    }
    endpoint = s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def is_remote(url: str) -> bool:
    scheme, sep, _ = str(url).partition("://")
    return bool(sep) and scheme not in ("file", "local")


def local_path(url: str) -> str:
    """``file://./store`` or ``./store`` -> an absolute local path."""
    text = str(url)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return os.path.abspath(os.path.expanduser(text))


def describe_endpoint() -> str:
    endpoint = s3_endpoint()
    return f"endpoint {endpoint}" if endpoint else "the default AWS endpoint"


class Store:
    """Keys are '/'-separated paths below the store root."""

    def __init__(self, url: str, s3: S3Settings | None = None) -> None:
        self.url = str(url).rstrip("/")
        if is_remote(self.url):
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(self.url, s3))
            self.root = self.root.rstrip("/")
        else:
            self.fs = fsspec.filesystem("file")
            self.root = local_path(self.url)
            self.url = "file://" + self.root

    @property
    def remote(self) -> bool:
        return self.fs.protocol not in ("file", ("file", "local"), "local")

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def uri(self, key: str) -> str:
        return posixpath.join(self.url, key)

    def check(self) -> None:
        """Fail early, with a clear message, when the store cannot be reached or created."""
        try:
            if self.remote:
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    self.fs.mkdir(bucket)
            else:
                Path(self.root).mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
            where = f" at {describe_endpoint()}" if self.remote else ""
            raise StoreError(
                f"store {self.url}{where} cannot be reached or created ({type(exc).__name__}); "
                "check the store URL and, for S3, PATHGEN_S3_ENDPOINT_URL and the AWS_* credentials"
            ) from None

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def open(self, key: str, mode: str = "rb"):
        return self.fs.open(self.path(key), mode)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Committed keys below a prefix (temporary keys are never listed)."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        keys = [posixpath.relpath(p, self.root) for p in found]
        return sorted(k for k in keys if k.endswith(suffix) and TMP_MARKER not in posixpath.basename(k))

    def _tmp_key(self, key: str) -> str:
        head, tail = posixpath.split(key)
        return posixpath.join(head, f"{TMP_MARKER}{uuid.uuid4().hex[:12]}-{tail}")

    def _commit(self, tmp: str, key: str) -> None:
        if self.remote:
            self.fs.mv(self.path(tmp), self.path(key))
        else:
            os.replace(self.path(tmp), self.path(key))

    def _parent(self, key: str) -> None:
        if not self.remote:
            os.makedirs(posixpath.dirname(self.path(key)), exist_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically write a whole object: temporary key, then the final key."""
        self._parent(key)
        tmp = self._tmp_key(key)
        try:
            self.fs.pipe_file(self.path(tmp), data)
            self._commit(tmp, key)
        except BaseException:
            self._discard(tmp)
            raise

    def put_file(self, local_file: str | os.PathLike, key: str) -> None:
        """Atomically upload a finished local file to a key."""
        self._parent(key)
        tmp = self._tmp_key(key)
        try:
            self.fs.put_file(str(local_file), self.path(tmp))
            self._commit(tmp, key)
        except BaseException:
            self._discard(tmp)
            raise

    @contextlib.contextmanager
    def staged_file(self, key: str) -> Iterator[str]:
        """A local path to write a large object into; committed atomically to ``key`` when the block succeeds."""
        if self.remote:
            handle, local = tempfile.mkstemp(prefix="pathgen-", suffix="-" + posixpath.basename(key))
            os.close(handle)
            try:
                yield local
                self.put_file(local, key)
            finally:
                if os.path.exists(local):
                    os.remove(local)
            return
        self._parent(key)
        tmp = self._tmp_key(key)
        try:
            yield self.path(tmp)
            self._commit(tmp, key)
        except BaseException:
            self._discard(tmp)
            raise

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self.path(key))

    def _discard(self, tmp: str) -> None:
        try:
            if self.fs.exists(self.path(tmp)):
                self.fs.rm(self.path(tmp))
        except Exception:  # noqa: BLE001 - best effort; the temporary key is never listed as committed
            pass
