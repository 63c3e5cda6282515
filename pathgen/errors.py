"""The two kinds of failure the factory tells apart, and its one retry policy.

A ``SlideError`` is about the input (corrupt, unsupported, no MPP, no tissue): retrying cannot help, so it is
recorded at once with a message that names the cause and the fix. Infrastructure failures (a dropped connection,
a timeout, an endpoint that does not answer, a model server or engine that fails, a full disk or any other storage
error, model weights that cannot be fetched, a CUDA fault or out-of-memory) are never final: a call is
retried by the one policy (``retrying``: tenacity, exponential backoff with jitter, a server's ``Retry-After``
honoured; ``retry_io`` for storage; settings ``retries.io_retries``), then the task raises and Prefect retries it
(``retries.task_retries``); if that fails too, its units stay pending and the run names the cause.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import errno
import re
import reprlib
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import tenacity

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


class InfrastructureError(RuntimeError):
    """Storage, a model server or an engine failed: nothing is committed for the work it touched."""


class TransientIOError(InfrastructureError):
    """An I/O failure that persisted through every retry."""


class BackendError(InfrastructureError):
    """A model backend failed (server unreachable, 5xx or 429 after retries, engine or CUDA error); the message
    names the endpoint or engine."""


class StorageError(InfrastructureError):
    """Writing to or reading from the store failed for a reason of the storage itself (a full disk, a quota, a
    read-only mount, an I/O error): nothing of the slide is committed and it stays pending."""


class ModelUnavailable(InfrastructureError):
    """A model's weights could not be fetched or loaded (hub or network error, missing model, incomplete files) or
    its device failed (CUDA fault, out of memory at the smallest batch): the work stays pending, never failed."""


class WorkPending(InfrastructureError):
    """Infrastructure failed for some of a task's units: they stay pending and Prefect retries the task (the base of
    ``tasks.work.units.PendingWork``, which carries the outcomes of the units that did finish)."""


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


# HTTP answers whose ``Retry-After`` is honoured (rate limited, unavailable), and the longest wait taken from it: a
# server asking for an hour is asked again sooner; if it still refuses, the work stays pending for Prefect's retries.
RETRY_AFTER_STATUS = frozenset({429, 503})
MAX_RETRY_AFTER_SECONDS = 120.0


class RetryableStatus(Exception):
    """A server's answer worth asking again (a 429 or a 5xx); ``retry_after``: the seconds it asked us to wait."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after

    @classmethod
    def of(cls, status: int, headers: Mapping[str, str]) -> RetryableStatus:
        """The answer with its ``Retry-After`` header read (only for 429 and 503, where HTTP defines it)."""
        asked = parse_retry_after(headers.get("retry-after")) if status in RETRY_AFTER_STATUS else None
        return cls(status, asked)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date), at most ``MAX_RETRY_AFTER_SECONDS``;
    None when absent or unreadable (the backoff then decides)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def pause(seconds: float) -> None:
    """How the retry policy waits between attempts (tests replace it: no real waiting)."""
    time.sleep(seconds)


async def async_pause(seconds: float) -> None:
    """How the retry policy waits between attempts of a coroutine (tests replace it)."""
    await asyncio.sleep(seconds)


def backoff_wait(backoff_seconds: float) -> Callable[[tenacity.RetryCallState], float]:
    """The wait before the next attempt: what the server asked for (``Retry-After``), else exponential backoff with
    jitter: ``backoff_seconds`` x 1, 2, 4 ... plus up to one ``backoff_seconds`` at random, so that many workers
    refused at once do not come back at once."""
    exponential = tenacity.wait_exponential_jitter(multiplier=backoff_seconds, jitter=backoff_seconds)

    def wait(state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        asked = getattr(failure, "retry_after", None)
        return float(asked) if asked is not None else exponential(state)

    return wait


def _policy(
    retries: int,
    backoff_seconds: float,
    retry_on: Callable[[BaseException], bool],
    on_retry: Callable[[int, BaseException], None] | None,
) -> dict[str, Any]:
    def notify(state: tenacity.RetryCallState) -> None:
        if on_retry and state.outcome:
            on_retry(state.attempt_number, state.outcome.exception())

    return {
        "stop": tenacity.stop_after_attempt(retries + 1),
        "wait": backoff_wait(backoff_seconds),
        "retry": tenacity.retry_if_exception(retry_on),
        "before_sleep": notify,
        "reraise": True,  # the last failure itself, with its traceback, for the caller to name and chain
    }


def retrying(
    *,
    retries: int,
    backoff_seconds: float,
    retry_on: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> tenacity.Retrying:
    """The factory's one retry policy (settings ``retries.io_retries``, ``retries.backoff_seconds``): up to
    ``retries`` more attempts while ``retry_on`` says the failure is worth it, waiting as :func:`backoff_wait`
    says; then the last failure is raised as it was. ``on_retry(attempt, failure)`` runs before each wait."""
    return tenacity.Retrying(sleep=pause, **_policy(retries, backoff_seconds, retry_on, on_retry))


def async_retrying(
    *,
    retries: int,
    backoff_seconds: float,
    retry_on: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> tenacity.AsyncRetrying:
    """:func:`retrying` for coroutines: ``await async_retrying(...)(coroutine_function, *args)``."""
    return tenacity.AsyncRetrying(sleep=async_pause, **_policy(retries, backoff_seconds, retry_on, on_retry))


def retry_io(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff_seconds: float,
    what: str,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Call ``fn``; retry transient I/O errors by the one policy; bad-input errors pass straight through. When the
    retries are spent: TransientIOError naming ``what``, caused by the last failure."""
    try:
        return retrying(retries=retries, backoff_seconds=backoff_seconds, on_retry=on_retry)(fn)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise TransientIOError(
            f"{what} failed after {retries + 1} attempts ({type(exc).__name__}: {_short(exc)}); "
            "check that the storage endpoint is up and reachable, then run again"
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_urls(text)[:200]


def short_error(exc: BaseException) -> str:
    """One line for a table or a log: the type and the first line of the message."""
    return f"{type(exc).__name__}: {_short(exc)}"


CUT_CHARS = 300  # the most characters of an input that an error message quotes

_REPR = reprlib.Repr()
# Few items and levels: the repr of a nested input (a YAML alias bomb shares its lists thousands of times over)
# costs a few hundred item visits at most, never its expanded size.
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = CUT_CHARS, CUT_CHARS, 60


def cut(text: str, limit: int = CUT_CHARS) -> str:
    """``text`` with its middle replaced by a count of the characters left out when it is longer than ``limit``."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}...[{len(text) - head - tail} characters cut]...{text[-tail:]}"


def short_repr(value: Any, limit: int = CUT_CHARS) -> str:
    """A bounded ``repr`` of a user input for an error message (cheap however large or deeply shared the input)."""
    return cut(_REPR.repr(value), limit)


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*@)")


def without_userinfo(url: str) -> str:
    """``https://user:secret@host/v1`` -> ``https://***@host/v1``: what a URL may show in errors, logs and records.

    Credentials written into a URL (basic auth) must never reach a message; the host stays, so the message still
    names the endpoint.
    """
    parts = urllib.parse.urlsplit(str(url))
    if "@" not in parts.netloc:
        return str(url)
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def redact_urls(text: str) -> str:
    """Every ``scheme://user:secret@`` in free text (an exception message, a reply) -> ``scheme://***@``."""
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


# Errors of the machine rather than of the input, whatever the file: a full disk, a quota, a read-only mount,
# memory or file handles exhausted.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
# Hub and download failures by type name, so that neither huggingface_hub nor requests has to be imported here.
_HUB_NAMES = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "HfHubHTTPError",
    "RepositoryNotFoundError",
    "GatedRepoError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "RemoteEntryNotFoundError",
    "URLError",
    "HTTPError",
}
_DEVICE_MARKERS = ("cuda error", "cuda out of memory", "out of memory", "cudnn_status", "cublas_status", "nccl error")


def _chain(exc: BaseException) -> list[BaseException]:
    found, current = [], exc
    while current is not None and len(found) < 8:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def is_storage_fault(exc: BaseException) -> bool:
    """A full disk, quota, read-only mount or I/O error anywhere in the chain."""
    return any(isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS for e in _chain(exc))


def is_model_fault(exc: BaseException) -> bool:
    """A hub or download failure, or a CUDA fault or out-of-memory (by type name or message, torch not imported)."""
    for current in _chain(exc):
        name = type(current).__name__
        if name in _HUB_NAMES or name in ("OutOfMemoryError", "AcceleratorError"):
            return True
        text = str(current).lower()
        if isinstance(current, RuntimeError) and any(marker in text for marker in _DEVICE_MARKERS):
            return True
        if "failed to download" in text:  # open_clip's wrapper of any download failure
            return True
    return False


def is_infrastructure(exc: BaseException) -> bool:
    """Work that failed for this stays pending: storage, network, hub, device, model server, engine."""
    if isinstance(exc, InfrastructureError) or is_transient(exc):
        return True
    return not isinstance(exc, SlideError) and (is_storage_fault(exc) or is_model_fault(exc))


def retry_infrastructure(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a task for infrastructure trouble, never for bad input (recorded)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified only
        return is_infrastructure(exc)
    return False
