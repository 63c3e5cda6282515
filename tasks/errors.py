"""The two kinds of failure the factory tells apart.

A ``SlideError`` is about the input (corrupt, unsupported, no MPP, no tissue): retrying cannot help, so it is
recorded at once with a message that names the cause and the fix. Anything ``is_transient`` says yes to (a
dropped connection, a timeout, an endpoint that does not answer) is retried with backoff first.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_TRANSIENT_ERRNOS = {errno.EIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE}
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
}


class SlideError(ValueError):
    """The slide itself is the problem; the message names the cause and the fix."""


class TransientIOError(RuntimeError):
    """An I/O failure that persisted through every retry."""


def is_transient(exc: BaseException) -> bool:
    """True for network and storage hiccups worth retrying; False for bad input."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, (SlideError, *_PERMANENT_OS_ERRORS)):
            return False
        if type(current).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def retry_io(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff_seconds: float,
    what: str,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Call ``fn``; retry transient I/O errors with exponential backoff; bad-input errors pass straight through."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt >= retries:
                raise TransientIOError(
                    f"{what} failed after {attempt + 1} attempts ({type(exc).__name__}: {_short(exc)}); "
                    "check that the storage endpoint is up and reachable, then run again"
                ) from None
            attempt += 1
            if on_retry:
                on_retry(attempt, exc)
            time.sleep(backoff_seconds * 2 ** (attempt - 1))


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a task for infrastructure trouble, never for bad input (recorded)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified only
        return isinstance(exc, TransientIOError) or is_transient(exc)
    return False
