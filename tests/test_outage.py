"""A model-server outage never loses work: with the openai backend pointed at a dead port nothing is committed and
`pathgen caption` exits 1 naming the endpoint; a server that starts failing mid-run leaves its slides pending; once
a working server answers on the same port, the same store ends with every patch as a pair or a content failure.

The server is a small OpenAI-compatible one started here on 127.0.0.1 that answers with the tiny random-weight
models through the transformers backend (their replies are real model output, and noise)."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from agents.backends.hf import TransformersBackend
from agents.protocol import ChatRequest, Sampling
from agents.tiny import TINY_LM, TINY_VLM

pytestmark = pytest.mark.prefect


class TinyModelServer:
    """GET /v1/models and POST /v1/chat/completions; ``fail_after`` chat requests it answers 503 from then on."""

    def __init__(self, paths, port: int, fail_after: int | None = None) -> None:
        self.backends = {
            "tiny-vlm": TransformersBackend(str(paths[TINY_VLM]), "cpu", random_weights=True),
            "tiny-lm": TransformersBackend(str(paths[TINY_LM]), "cpu", random_weights=True),
        }
        self.paths = paths
        self.fail_after = fail_after
        self.chats = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                models = [{"id": "tiny-vlm", "root": str(server.paths[TINY_VLM])}, {"id": "tiny-lm", "root": "lm"}]
                self._send(200, {"data": models} if self.path == "/v1/models" else {"error": "no such path"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.chats += 1
                    failing = server.fail_after is not None and server.chats > server.fail_after
                    if failing:
                        self._send(503, {"error": {"message": "engine is down"}})
                        return
                    self._send(200, server.answer(body))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, body):
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        parts = next(m["content"] for m in body["messages"] if m["role"] == "user")
        texts = [p["text"] for p in parts if p["type"] == "text"]
        image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
        jpeg = base64.b64decode(image.split(",", 1)[1]) if image else None
        request = ChatRequest(system, texts[0] if texts else "", jpeg, "\n".join(texts[1:]))
        sampling = Sampling(body["temperature"], body["top_p"], body["max_tokens"], body["seed"])
        reply = self.backends[body["model"]].generate([request], sampling)[0]
        choice = {"message": {"role": "assistant", "content": reply.text}, "finish_reason": reply.finish_reason}
        return {"choices": [choice]}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _caption(store, port, prefect_api, cwd):
    settings = {
        "agents.openai_base_url": f"http://127.0.0.1:{port}/v1",
        "agents.openai_timeout_seconds": 20,
        "retries.io_retries": 1,
        "retries.backoff_seconds": 0.05,
        "retries.task_retries": 0,
        # short replies keep the test quick: the server answers one request at a time
        "agents.describe.max_new_tokens": 40,
        "agents.revise.max_new_tokens": 40,
        "agents.summarize.max_new_tokens": 24,
    }
    for role, model in (("describe", "tiny-vlm"), ("revise", "tiny-vlm"), ("summarize", "tiny-lm")):
        settings[f"agents.{role}.backend"] = "openai"
        settings[f"agents.{role}.model"] = model
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run(
        [sys.executable, "-m", "pathgen", "caption", "--store", str(store), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _ids(store, folder):
    ids = []
    for path in sorted(store.glob(f"{folder}/*/*.parquet")):
        ids.extend(pq.read_table(path, columns=["patch_id"])["patch_id"].to_pylist())
    return ids


def test_an_outage_leaves_every_slide_pending_and_a_rerun_completes(
    prefect_api, tiny_models, extracted_store, tmp_path
):
    _, paths = tiny_models
    store = tmp_path / "store"
    shutil.copytree(extracted_store, store)
    patch_ids = pq.read_table(next(store.glob("patches/*.parquet")), columns=["patch_id"])["patch_id"].to_pylist()
    port = _free_port()

    dead = _caption(store, port, prefect_api, tmp_path)
    assert dead.returncode == 1, dead.stdout[-2000:] + dead.stderr[-2000:]
    assert f"127.0.0.1:{port}" in dead.stderr + dead.stdout
    assert not list(store.glob("pairs/*/*")) and not list(store.glob("failed/*/*"))

    failing = TinyModelServer(paths, port, fail_after=5)  # up for planning, then down mid-captioning
    try:
        broken = _caption(store, port, prefect_api, tmp_path)
    finally:
        failing.stop()
    assert broken.returncode == 1, broken.stdout[-2000:] + broken.stderr[-2000:]
    assert "pending" in broken.stderr and f"127.0.0.1:{port}" in broken.stderr + broken.stdout
    assert not list(store.glob("pairs/*/*")) and not list(store.glob("failed/*/*"))

    working = TinyModelServer(paths, port)
    try:
        done = _caption(store, port, prefect_api, tmp_path)
    finally:
        working.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    paired, failed = _ids(store, "pairs"), _ids(store, "failed")
    assert sorted(paired + failed) == sorted(patch_ids)  # every patch exactly once
    reasons = {r for path in store.glob("failed/*/*.parquet") for r in pq.read_table(path)["reason"].to_pylist()}
    assert reasons <= {"empty", "refusal", "garbage", "over-long", "repetition"}  # content failures only
