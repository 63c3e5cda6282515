"""What every call to an OpenAI-compatible server shares: the API key from the environment (PATHGEN_OPENAI_API_KEY or
OPENAI_API_KEY), which failures are worth asking again (a dropped connection, a timeout, a busy or failing server,
with its ``Retry-After``), and how a failure that outlived its retries is named (never with a credential)."""

from __future__ import annotations

import os

import httpx

from pathgen.errors import RetryableStatus


def api_key() -> str | None:
    return os.environ.get("PATHGEN_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")


def auth_headers() -> dict[str, str]:
    key = api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def worth_retrying(exc: BaseException) -> bool:
    """A dropped connection or a timeout (httpx's TransportError covers both), or an answer to ask again; not a URL
    httpx cannot use (UnsupportedProtocol) nor a request it refuses to send (LocalProtocolError): asking again
    gives the same, as the configuration is wrong, not the server."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return False
    return isinstance(exc, httpx.TransportError | RetryableStatus)


def attempts_note(exc: BaseException, attempts: int) -> str:
    """``, after N attempts`` for a failure that was asked again; nothing for one tried once."""
    return f", after {attempts} attempts" if worth_retrying(exc) else ""


def failure_name(exc: BaseException) -> str:
    """``HTTP 503`` for an answer, the exception's type (``ConnectError``, ``ReadTimeout``) for a transport failure:
    the type only, as its message may quote the URL."""
    return str(exc) if isinstance(exc, RetryableStatus) else type(exc).__name__
