"""The openai backend over real HTTP, against a small OpenAI-compatible server started here on 127.0.0.1 that
answers with the transformers backend (tiny models). It can be told to fail requests first, to test retries."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agents.backends.hf import TransformersBackend
from agents.backends.openai_compat import OpenAIBackend
from agents.identity import agents_hash, identities, served_model
from agents.prompts import load_prompt
from agents.protocol import ChatRequest, Sampling
from agents.tiny import TINY_LM, TINY_VLM
from agents.validation import problem
from pathgen.errors import BackendError
from pathgen.settings import RetrySettings, load_settings

from .test_agents import _jpeg


class TinyModelServer:
    """An OpenAI-compatible server on 127.0.0.1 (GET /v1/models, POST /v1/chat/completions) answering with the tiny
    models through the transformers backend: real model output (noise). ``fail_next`` lists status codes to answer
    the next chat requests with (200 answers properly)."""

    def __init__(self, paths, port: int = 0):
        self.backends = {
            "tiny-vlm": TransformersBackend(str(paths[TINY_VLM]), "cpu", random_weights=True),
            "tiny-lm": TransformersBackend(str(paths[TINY_LM]), "cpu", random_weights=True),
        }
        self.fail_next: list[int] = []  # status codes to answer with before answering properly
        self.seen_auth: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.generate_lock = threading.Lock()  # one model, one generate at a time
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.seen_auth.add(self.headers.get("Authorization", ""))
                if self.path != "/v1/models":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                served = [{"id": name, "object": "model", "root": f"/models/{name}"} for name in server.backends]
                self._send(200, {"object": "list", "data": served})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.seen_auth.add(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    status = server.fail_next.pop(0) if server.fail_next else 200
                try:
                    time.sleep(0.05)
                    if self.path != "/v1/chat/completions" or status != 200:
                        reply = (status if status != 200 else 404, {"error": {"message": "try again"}})
                    else:
                        reply = (200, server.answer(body))
                finally:
                    # Out of flight before the reply leaves: once the client has it, it may send the next request.
                    with server.lock:
                        server.in_flight -= 1
                self._send(*reply)

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body):
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        parts = next(m["content"] for m in body["messages"] if m["role"] == "user")
        texts = [p["text"] for p in parts if p["type"] == "text"]
        image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
        jpeg = base64.b64decode(image.split(",", 1)[1]) if image else None
        request = ChatRequest(system, texts[0] if texts else "", jpeg, "\n".join(texts[1:]))
        sampling = Sampling(body["temperature"], body["top_p"], body["max_tokens"], body["seed"])
        with self.generate_lock:
            reply = self.backends[body["model"]].generate([request], sampling)[0]
        return {
            "choices": [{"message": {"role": "assistant", "content": reply.text}, "finish_reason": reply.finish_reason}]
        }


@pytest.fixture(scope="module")
def server(tiny_models):
    _, paths = tiny_models
    s = TinyModelServer(paths)
    yield s
    s.httpd.shutdown()


def test_batch_over_http_with_images_and_a_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")
    backend = OpenAIBackend(server.url, "tiny-vlm", concurrency=3, timeout=30)
    prompt = load_prompt("describe.v1")
    replies = backend.generate([prompt.request(_jpeg(i)) for i in range(8)], Sampling(0.7, 0.9, 12, 0))
    assert len(replies) == 8 and all(r.ok and r.text for r in replies)
    assert "Bearer sk-test-not-a-secret" in server.seen_auth
    assert 1 < server.max_in_flight <= 3


def test_429_and_500_are_retried_with_backoff(server):
    server.fail_next = [429, 503, 500]
    backend = OpenAIBackend(server.url, "tiny-lm", concurrency=1, timeout=30, retries=4, backoff_seconds=0.01)
    before = server.requests
    replies = backend.generate(
        [load_prompt("summarize.v1").request(description="x", limit=77, words=40)], Sampling(0.7, 0.9, 8, 0)
    )
    assert replies[0].ok and server.requests - before == 4


def _no_leak(err: pytest.ExceptionInfo, secret: str) -> None:
    seen, current = [], err.value
    while current is not None:
        seen.append(f"{current!s} {current!r}")
        current = current.__cause__ or current.__context__
    assert secret not in " ".join(seen)


def test_exhausted_retries_raise_a_backend_error_naming_the_endpoint(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    server.fail_next = [500, 500, 500]
    backend = OpenAIBackend(server.url, "tiny-lm", concurrency=1, timeout=30, retries=2, backoff_seconds=0.01)
    before = server.requests
    with pytest.raises(BackendError) as err:
        backend.generate([ChatRequest("s", "text")], Sampling(0.7, 0.9, 8, 0))
    assert server.url in str(err.value) and "HTTP 500" in str(err.value) and "after 3 attempts" in str(err.value)
    assert server.requests - before == 3
    _no_leak(err, "sk-do-not-leak")


def test_wrong_path_and_refused_connection_raise_backend_errors(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    wrong_url = server.url.replace("/v1", "/v2")
    wrong = OpenAIBackend(wrong_url, "tiny-lm", retries=0)
    with pytest.raises(BackendError) as err:
        wrong.generate([ChatRequest("s", "text")], Sampling(0.7, 0.9, 8, 0))
    assert "HTTP 404" in str(err.value) and wrong_url in str(err.value)
    _no_leak(err, "sk-do-not-leak")
    down = OpenAIBackend("http://127.0.0.1:9/v1", "tiny-lm", retries=1, timeout=2, backoff_seconds=0.01)
    with pytest.raises(BackendError) as err:
        down.generate([ChatRequest("s", "t")], Sampling(0.7, 0.9, 8, 0))
    assert "ConnectError" in str(err.value) and "http://127.0.0.1:9/v1" in str(err.value)
    assert "after 2 attempts" in str(err.value)
    _no_leak(err, "sk-do-not-leak")


def test_a_request_the_server_rejects_is_that_requests_error_reply(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    server.fail_next = [400]
    backend = OpenAIBackend(server.url, "tiny-lm", concurrency=1, timeout=30, retries=2, backoff_seconds=0.01)
    before = server.requests
    prompt = load_prompt("summarize.v1")
    requests = [prompt.request(description=f"x{i}", limit=77, words=40) for i in range(2)]
    rejected, answered = backend.generate(requests, Sampling(0.7, 0.9, 8, 0))
    assert not rejected.ok and "HTTP 400" in rejected.error and "sk-do-not-leak" not in rejected.error
    assert problem(rejected, 400) == "rejected"
    assert answered.ok and server.requests - before == 2  # a rejection is final for its request: no retry


def test_the_served_model_is_the_identity_and_an_unreachable_server_fails_at_once(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    quick = RetrySettings(io_retries=1, backoff_seconds=0.01)
    assert served_model(server.url, "tiny-vlm", 10, quick) == {
        "id": "tiny-vlm",
        "object": "model",
        "root": "/models/tiny-vlm",
    }
    with pytest.raises(BackendError, match="does not serve 'other-model'") as err:
        served_model(server.url, "other-model", 10, quick)
    assert "tiny-lm" in str(err.value)
    with pytest.raises(BackendError, match="cannot be reached") as err:
        served_model("http://127.0.0.1:9/v1", "tiny-lm", 2, quick)
    assert "http://127.0.0.1:9/v1" in str(err.value) and "after 2 attempts" in str(err.value)
    _no_leak(err, "sk-do-not-leak")

    agents = load_settings(
        overrides={
            "agents.openai_base_url": server.url,
            **{f"agents.{role}.backend": "openai" for role in ("describe", "revise", "summarize")},
            **{f"agents.{role}.model": "tiny-vlm" for role in ("describe", "revise")},
            "agents.summarize.model": "tiny-lm",
        },
        environ={},
    ).agents
    found = identities(agents, quick)
    assert found["describe"] == "served:tiny-vlm root=/models/tiny-vlm"
    assert found["summarize"] == "served:tiny-lm root=/models/tiny-lm"
    assert agents_hash(agents, found) != agents_hash(agents, {**found, "summarize": "served:tiny-lm root=/models/v2"})


def test_vllm_request_building_matches_its_public_api():
    vllm = pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from agents.backends.vllm_engine import VLLMBackend, engine_arguments
    from pathgen.settings import AgentsSettings

    args = engine_arguments("Qwen/Qwen2-VL-2B-Instruct", AgentsSettings())
    assert args["enable_prefix_caching"] and args["limit_mm_per_prompt"] == {"image": 1}
    backend = VLLMBackend.__new__(VLLMBackend)
    backend.max_image_pixels = 672 * 672
    (conversation,) = backend.conversations([load_prompt("describe.v1").request(_jpeg(0))])
    assert conversation[1]["content"][1]["type"] == "image_url"
    requests = [ChatRequest("", "a", seed=7), ChatRequest("", "b")]
    params = backend.sampling_params(requests, Sampling(0.2, 0.9, 16, 0))
    assert all(isinstance(p, vllm.SamplingParams) for p in params) and [p.seed for p in params] == [7, 0]
