"""A model-server outage never loses work: with the openai backend pointed at a dead port nothing is committed and
`pathgen caption` exits 1 naming the endpoint; a server that starts failing mid-run leaves its slides pending; once
a working server answers on the same port, the same store ends with every patch as a pair or a content failure.

The server is a small OpenAI-compatible one started here on 127.0.0.1 that answers with the tiny random-weight
models through the transformers backend (their replies are real model output, and noise)."""

import os
import shutil
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from .test_openai_backend import TinyModelServer

pytestmark = pytest.mark.prefect


def _server(paths, port: int, fail_after: int | None = None) -> TinyModelServer:
    """Up on ``port``; with ``fail_after``, chat requests past that many are answered 503 (a dying engine)."""
    server = TinyModelServer(paths, port)
    if fail_after is not None:
        server.fail_next = [200] * fail_after + [503] * 10_000
    return server


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

    failing = _server(paths, port, fail_after=5)  # up for planning, then down mid-captioning
    try:
        broken = _caption(store, port, prefect_api, tmp_path)
    finally:
        failing.stop()
    assert broken.returncode == 1, broken.stdout[-2000:] + broken.stderr[-2000:]
    assert "pending" in broken.stderr and f"127.0.0.1:{port}" in broken.stderr + broken.stdout
    assert not list(store.glob("pairs/*/*")) and not list(store.glob("failed/*/*"))

    working = _server(paths, port)
    try:
        done = _caption(store, port, prefect_api, tmp_path)
    finally:
        working.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    paired, failed = _ids(store, "pairs"), _ids(store, "failed")
    assert sorted(paired + failed) == sorted(patch_ids)  # every patch exactly once
    reasons = {r for path in store.glob("failed/*/*.parquet") for r in pq.read_table(path)["reason"].to_pylist()}
    assert reasons <= {"empty", "refusal", "garbage", "over-long", "repetition"}  # content failures only
