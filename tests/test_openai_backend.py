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
from agents.prompts import load_prompt
from agents.protocol import ChatRequest, Sampling
from agents.tiny import TINY_LM, TINY_VLM

from .test_agents import _jpeg


class _Server:
    def __init__(self, paths):
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
                        self._send(status if status != 200 else 404, {"error": {"message": "try again"}})
                        return
                    self._send(200, server.answer(body))
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

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
    s = _Server(paths)
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


def test_exhausted_retries_and_bad_requests_become_error_replies(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-leak")
    server.fail_next = [500, 500, 500]
    backend = OpenAIBackend(server.url, "tiny-lm", concurrency=1, timeout=30, retries=2, backoff_seconds=0.01)
    reply = backend.generate([ChatRequest("s", "text")], Sampling(0.7, 0.9, 8, 0))[0]
    assert not reply.ok and "HTTP 500" in reply.error and "after 3 attempts" in reply.error
    assert "sk-do-not-leak" not in reply.error
    wrong = OpenAIBackend(server.url.replace("/v1", "/v2"), "tiny-lm", retries=0)
    assert "HTTP 404" in wrong.generate([ChatRequest("s", "text")], Sampling(0.7, 0.9, 8, 0))[0].error
    down = OpenAIBackend("http://127.0.0.1:9/v1", "tiny-lm", retries=1, timeout=2, backoff_seconds=0.01)
    assert "ConnectError" in down.generate([ChatRequest("s", "t")], Sampling(0.7, 0.9, 8, 0))[0].error


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
    assert isinstance(backend.sampling_params(Sampling(0.2, 0.9, 16, 0)), vllm.SamplingParams)
