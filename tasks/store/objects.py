"""One store addressed by an fsspec URL: ``file://./store`` on a laptop, ``s3://bucket/prefix`` in production.

Writers never expose half an object, so a reader sees the old object or the whole new one. On S3 the final key
is written directly: a single PUT, or a multipart upload that becomes visible only when completed (s3fs aborts it
when a part fails), is already atomic, so no copy and delete doubles the traffic and no temporary object is left
behind. s3fs's ``open(key, "wb")`` is NOT used for this: fsspec's file ``__exit__`` closes, and so commits, even when
the block raised. On a local disk bytes go to a temporary file beside the final one and ``os.replace`` moves it
onto the final path. A temporary name is ``<dir>/.<name>.<host>~<pid>~<random>.tmp``: the leading dot hides it from
pyarrow.dataset, the ``.tmp`` suffix from ``*.parquet`` globs (DuckDB), and the owner lets a later run remove what a
killed writer left. Listings still skip temporary keys, so ones that older versions left on S3 stay invisible. S3
endpoint and credentials come from the environment only; nothing here logs or stores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec

from pathgen.settings import S3Settings

ENDPOINT_ENV_VARS = ("PATHGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TMP_SUFFIX = ".tmp"
LEGACY_TMP_MARKER = ".tmp-"  # `.tmp-<hex>-<name>`, written before temporary keys named their owner
STAGING_ENV_VAR = "PATHGEN_STAGING_DIR"
# `~` separates the owner's parts: it cannot appear in a host tag (see _host_tag), a pid or a hex token.
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]*)~(?P<pid>\d+)~(?P<token>[0-9a-f]{12})\.tmp$")
_STAGED_NAME = re.compile(r"^(?P<pid>\d+)~(?P<token>[0-9a-f]{12})~(?P<name>.+)$")


class StoreError(RuntimeError):
    """The store cannot be reached or written; the message names the URL and what to check."""


def s3_endpoint() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def storage_options(url: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """fsspec options for a URL: for S3 the endpoint from the environment and bounded botocore timeouts and retries.

    s3fs's own retry loop is not a constructor option; ``url_to_fs`` bounds it on the filesystem it returns.
    """
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
            # total_max_attempts counts the first request too; botocore's max_attempts would count only retries.
            "retries": {"total_max_attempts": s3.max_attempts, "mode": "standard"},
        },
    }
    endpoint = s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def url_to_fs(url: str, s3: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with every retry loop bounded, so an endpoint that never answers ends a call."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, s3))
    if is_remote(url) and hasattr(fs, "retries"):
        # s3fs retries each call `retries` times in all (5 by default, backoff between) around botocore's own
        # max_attempts and takes no constructor option for it; fsspec caches the instance per storage options,
        # so this also bounds other users of the same options in this process.
        fs.retries = (s3 or S3Settings()).s3fs_retries + 1
    return fs, path


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
    return f"endpoint {_without_userinfo(endpoint)}" if endpoint else "the default AWS endpoint"


def _without_userinfo(url: str) -> str:
    # An endpoint written as http://key:secret@host must not put the secret into an error message.
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _server_replied(exc: BaseException) -> bool:
    # s3fs turns an error reply (botocore ClientError: 403, 404, ...) into an OSError and keeps the reply as the
    # cause; a timeout or a refused connection carries no reply.
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) or isinstance(exc.__cause__, ClientError)


# -- temporary keys and staged files -------------------------------------------------------------------------


def _host_tag() -> str:
    # Host names hold letters, digits, '-' and '.'; dots become '_' so the owner parses back from the name's end.
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:63]


def temporary_name(name: str) -> str:
    """``name`` -> ``.<name>.<host>~<pid>~<random>.tmp``: hidden from dataset readers and ``*.parquet`` globs."""
    return f".{name}.{_host_tag()}~{os.getpid()}~{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def is_temporary(key: str) -> bool:
    """Whether a key (or path) names a temporary object, of this format or the older ``.tmp-`` one."""
    base = posixpath.basename(key)
    return bool(_TMP_NAME.match(base)) or base.startswith(LEGACY_TMP_MARKER)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without signalling)."""
    if pid <= 0:
        return False  # kill(0) and kill(-n) address process groups, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists but belongs to someone else
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet still answers signal 0, but it writes nothing more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # the state follows the (command name)
    except (OSError, IndexError):
        return False  # no /proc (macOS): signal 0 decides alone


def _temporary_owner_dead(key: str) -> bool:
    match = _TMP_NAME.match(posixpath.basename(key))
    return bool(match) and match["host"] == _host_tag() and not pid_alive(int(match["pid"]))


def _older_than(modified: float | None, grace_seconds: float) -> bool:
    # An entry without a time is never taken as old: only a dead owner makes it stale.
    return modified is not None and time.time() - modified >= grace_seconds


def staging_dir() -> str:
    """One folder for local copies of remote objects, so a killed run's leftovers can be found and removed."""
    return os.environ.get(STAGING_ENV_VAR) or os.path.join(tempfile.gettempdir(), "pathgen-staging")


def _new_staged_path(key: str) -> str:
    folder = staging_dir()
    os.makedirs(folder, exist_ok=True)
    # The tail of the key's name keeps the file recognisable while staying under the 255-byte name limit.
    local = os.path.join(folder, f"{os.getpid()}~{uuid.uuid4().hex[:12]}~{posixpath.basename(key)[-200:]}")
    with open(local, "xb"):
        pass
    return local


def remove_stale_staging(grace_seconds: float, folder: str | None = None) -> int:
    """Remove staged files whose process is dead or that are untouched for ``grace_seconds``; returns how many."""
    folder = folder or staging_dir()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        match = _STAGED_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue  # not ours: leave it
        with contextlib.suppress(FileNotFoundError):
            if not pid_alive(int(match["pid"])) or _older_than(entry.stat().st_mtime, grace_seconds):
                os.remove(entry.path)
                removed += 1
    return removed


class Store:
    """Keys are '/'-separated paths below the store root."""

    def __init__(self, url: str, s3: S3Settings | None = None) -> None:
        self.url = str(url).rstrip("/")
        if is_remote(self.url):
            self.fs, self.root = url_to_fs(self.url, s3)
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
                self._ensure_bucket()
            else:
                Path(self.root).mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
            where = f" at {describe_endpoint()}" if self.remote else ""
            raise StoreError(
                f"store {self.url}{where} cannot be reached or created ({type(exc).__name__}); "
                "check the store URL and, for S3, PATHGEN_S3_ENDPOINT_URL and the AWS_* credentials"
            ) from None

    def _ensure_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        if hasattr(self.fs, "call_s3"):
            # One call that raises when the endpoint does not answer: s3fs's exists() swallows errors and probes
            # twice, and mkdir() probes again, so a silent endpoint would cost five call deadlines instead of one.
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
                return
            except Exception as exc:  # noqa: BLE001 - only a reply from the server goes on to the probes below
                if not _server_replied(exc):
                    raise
        if not self.fs.exists(bucket):
            self.fs.mkdir(bucket)

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
        return sorted(k for k in keys if k.endswith(suffix) and not is_temporary(k))

    def remove_stale_temporaries(self, prefixes: list[str], grace_seconds: float) -> int:
        """Delete temporary files below the prefixes of a local store that a dead process on this host left, or that
        are untouched for ``grace_seconds``; a live writer's fresh temporary file is kept. Returns how many were
        deleted. A remote store has none to sweep: its writes go to the final key (see the module docstring)."""
        if self.remote:
            return 0
        removed = 0
        for prefix in prefixes:
            for path, info in self._temporaries(prefix).items():
                if _temporary_owner_dead(path) or _older_than(info.get("mtime"), grace_seconds):
                    removed += self._delete_path(path)
        return removed

    def _temporaries(self, prefix: str) -> dict[str, Mapping[str, Any]]:
        base = self.path(prefix)
        self.fs.invalidate_cache(base)  # other processes wrote and removed objects since this one last listed
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {path: info for path, info in found.items() if is_temporary(path)}

    def _delete_path(self, path: str) -> int:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return 0  # its writer committed or discarded it meanwhile
        return 1

    def _tmp_key(self, key: str) -> str:
        head, tail = posixpath.split(key)
        return posixpath.join(head, temporary_name(tail))

    def _commit(self, tmp: str, key: str) -> None:
        os.replace(self.path(tmp), self.path(key))

    def _parent(self, key: str) -> None:
        os.makedirs(posixpath.dirname(self.path(key)), exist_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically write a whole object: on S3 straight to the key, on disk a temporary file then a rename."""
        if self.remote:
            self.fs.pipe_file(self.path(key), data)
            return
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
        if self.remote:
            self.fs.put_file(str(local_file), self.path(key))
            return
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
            local = _new_staged_path(key)
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
        with contextlib.suppress(OSError):  # best effort; a temporary file is never listed as committed
            os.remove(self.path(tmp))
