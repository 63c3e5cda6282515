"""The one retry policy (pathgen.errors, on tenacity) as storage, the OpenAI-compatible backend and the served-model
look-up use it: the configured number of attempts, exponential backoff with jitter, a server's Retry-After honoured
for 429 and 503, the last failure kept as the cause, and permanent failures never retried. No real waiting: the
policy's pauses are replaced by recorders."""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from agents.backends.openai_compat import OpenAIBackend
from agents.identity import _hub_revision, served_model
from agents.openai_http import worth_retrying
from agents.protocol import ChatRequest, Sampling
from pathgen import errors
from pathgen.errors import (
    MAX_RETRY_AFTER_SECONDS,
    BackendError,
    RetryableStatus,
    SlideError,
    TransientIOError,
    WorkPending,
    is_infrastructure,
    parse_retry_after,
    retry_io,
    retrying,
)
from pathgen.settings import RetrySettings
from tasks.work.units import PendingWork

SAMPLING = Sampling(0.0, 1.0, 8, 0)


@pytest.fixture()
def waits(monkeypatch) -> list[float]:
    """The seconds the policy would have waited, in order (sync and async pauses alike)."""
    seen: list[float] = []

    async def async_record(seconds: float) -> None:
        seen.append(seconds)

    monkeypatch.setattr(errors, "pause", seen.append)
    monkeypatch.setattr(errors, "async_pause", async_record)
    return seen


def _flaky(failures: list[BaseException]):
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return "done"

    return call, calls


def test_storage_retries_the_configured_number_of_times_with_jittered_exponential_backoff(waits):
    call, calls = _flaky([ConnectionResetError(104, "reset")] * 3)
    retried = []
    result = retry_io(call, retries=3, backoff_seconds=0.5, what="reading x", on_retry=lambda n, e: retried.append(n))
    assert result == "done" and calls["n"] == 4 and retried == [1, 2, 3]
    # backoff x 1, 2, 4, each plus up to one backoff of jitter
    assert [0.5 <= waits[0] <= 1.0, 1.0 <= waits[1] <= 1.5, 2.0 <= waits[2] <= 2.5] == [True] * 3


def test_exhausted_storage_retries_name_what_failed_and_keep_the_cause(waits):
    last = TimeoutError("read timed out")
    call, calls = _flaky([ConnectionResetError(104, "reset"), ConnectionResetError(104, "reset"), last])
    with pytest.raises(TransientIOError, match=r"reading x failed after 3 attempts \(TimeoutError") as err:
        retry_io(call, retries=2, backoff_seconds=0.01, what="reading x")
    assert calls["n"] == 3 and len(waits) == 2
    assert err.value.__cause__ is last and is_infrastructure(err.value)


@pytest.mark.parametrize("permanent", [FileNotFoundError("gone"), SlideError("no MPP"), ValueError("bad input")])
def test_permanent_errors_are_not_retried(waits, permanent):
    call, calls = _flaky([permanent])
    with pytest.raises(type(permanent)) as err:
        retry_io(call, retries=5, backoff_seconds=0.01, what="reading x")
    assert err.value is permanent and calls["n"] == 1 and waits == []


@pytest.mark.parametrize("wrong", [httpx.UnsupportedProtocol("ftp://"), httpx.LocalProtocolError("bad header")])
def test_a_url_or_request_httpx_cannot_send_is_tried_once(waits, wrong):
    """A bad URL or configuration, not an outage: asking again would fail the same way."""
    call, calls = _flaky([wrong])
    with pytest.raises(type(wrong)):
        retrying(retries=3, backoff_seconds=0.01, retry_on=worth_retrying)(call)
    assert calls["n"] == 1 and waits == []
    call, calls = _flaky([httpx.ConnectError("refused")])  # an outage is still asked again
    assert retrying(retries=3, backoff_seconds=0.01, retry_on=worth_retrying)(call) == "done" and calls["n"] == 2
    with pytest.raises(BackendError, match=r"cannot be reached \(UnsupportedProtocol\); start it") as err:
        served_model("ftp://127.0.0.1:9/v1", "m", 5, RetrySettings(io_retries=3, backoff_seconds=0.01))
    assert isinstance(err.value.__cause__, httpx.UnsupportedProtocol) and len(waits) == 1


def test_retry_after_is_read_as_seconds_or_a_date_capped_and_only_for_429_and_503():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # a date past: ask again at once
    assert parse_retry_after("86400") == MAX_RETRY_AFTER_SECONDS
    assert [parse_retry_after(v) for v in (None, "", "soon", "-3", "1.5")] == [None] * 5
    assert RetryableStatus.of(429, {"retry-after": "3"}).retry_after == 3.0
    assert RetryableStatus.of(503, {"retry-after": "4"}).retry_after == 4.0
    assert RetryableStatus.of(500, {"retry-after": "5"}).retry_after is None  # HTTP defines it for 429 and 503
    assert str(RetryableStatus.of(502, {})) == "HTTP 502"


def test_pending_work_is_infrastructure_without_the_ground_floor_importing_tasks():
    assert issubclass(PendingWork, WorkPending) and issubclass(WorkPending, errors.InfrastructureError)
    assert is_infrastructure(PendingWork("storage down", []))
    source = Path(errors.__file__).read_text()
    assert "import tasks" not in source and "from tasks" not in source


class ScriptedServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers each request with the next scripted (status, headers)
    and then 200: a chat reply for POST, the model list for GET /models."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer({"data": [{"id": "m", "root": "/models/m"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self._answer({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]})

            def _answer(self, ok_payload):
                server.requests += 1
                status, headers = server.script.pop(0) if server.script else (200, {})
                data = json.dumps(ok_payload if status == 200 else {"error": {"message": "busy"}}).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def scripted():
    server = ScriptedServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_the_backend_honours_retry_after_and_backs_off_with_jitter_otherwise(scripted, waits):
    scripted.script = [(429, {"Retry-After": "9"}), (503, {"Retry-After": "2"}), (500, {"Retry-After": "60"})]
    backend = OpenAIBackend(scripted.url, "m", concurrency=1, retries=4, backoff_seconds=0.25)
    (reply,) = backend.generate([ChatRequest("s", "t")], SAMPLING)
    assert reply.ok and reply.text == "fine" and scripted.requests == 4
    assert waits[:2] == [9.0, 2.0] and 1.0 <= waits[2] <= 1.25  # a 500's Retry-After is not HTTP's: backoff x 4


def test_the_backend_keeps_the_last_failure_as_the_cause_and_never_retries_a_permanent_answer(scripted, waits):
    scripted.script = [(503, {})] * 3
    backend = OpenAIBackend(scripted.url, "m", concurrency=1, retries=2, backoff_seconds=0.01)
    with pytest.raises(BackendError, match="HTTP 503, after 3 attempts") as err:
        backend.generate([ChatRequest("s", "t")], SAMPLING)
    assert isinstance(err.value.__cause__, RetryableStatus) and err.value.__cause__.status == 503
    assert scripted.requests == 3 and len(waits) == 2
    scripted.script, waits[:] = [(401, {})], []
    with pytest.raises(BackendError, match="HTTP 401"):
        backend.generate([ChatRequest("s", "t")], SAMPLING)
    assert scripted.requests == 4 and waits == []


def test_the_served_model_look_up_uses_the_same_policy(scripted, waits):
    scripted.script = [(503, {"Retry-After": "3"}), (429, {})]
    assert served_model(scripted.url, "m", 5, RetrySettings(io_retries=2, backoff_seconds=0.5))["root"] == "/models/m"
    assert scripted.requests == 3 and waits[0] == 3.0 and 1.0 <= waits[1] <= 1.5
    scripted.script, waits[:] = [(502, {})] * 2, []
    with pytest.raises(BackendError, match=r"cannot be reached \(HTTP 502, after 2 attempts\)") as err:
        served_model(scripted.url, "m", 5, RetrySettings(io_retries=1, backoff_seconds=0.01))
    assert err.value.__cause__.status == 502 and len(waits) == 1
    scripted.script, waits[:] = [(404, {})], []
    with pytest.raises(BackendError, match="HTTP 404"):
        served_model(scripted.url, "m", 5, RetrySettings(io_retries=3, backoff_seconds=0.01))
    assert waits == []


def test_a_hub_revision_is_resolved_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "a" * 40
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert _hub_revision("org/tiny", None) == commit
    assert _hub_revision("org/tiny", "main") == commit
    assert _hub_revision("org/tiny", "v2") == "v2 (not in the local cache)"
    assert _hub_revision("org/other", None) == "main (not in the local cache)"
    assert _hub_revision("org/other", "b" * 40) == "b" * 40  # a commit is its own identity
