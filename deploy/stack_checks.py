"""Whether the local stack's services answer (deploy/local_stack_helper.py): each check returns None once its
service does what the factory needs, else why not; ``gone`` tells that the service's process exited, so a check
stops waiting for it. Only 127.0.0.1 is contacted; httpx, botocore and asyncpg are imported where a check needs
them (asyncpg only for --production)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path


def wait_until(
    ready: Callable[[], bool], process: str, gone: Callable[[], bool], timeout: float, pause: float, late: str
) -> str | None:
    """Calls ``ready`` until it returns True; why not when the ``process`` is ``gone`` first or ``timeout`` passes
    (``late`` says what did not happen, with the last error)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if gone():
            return f"{process} exited"
        try:
            if ready():
                return None
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = f" ({type(exc).__name__}: {exc})"
        time.sleep(pause)
    return f"{late} within {timeout:.0f} s{last}"


def prefect_healthy(api: str, timeout: float, gone: Callable[[], bool]) -> str | None:
    import httpx

    def healthy() -> bool:
        return httpx.get(f"{api}/health", timeout=5).text.strip() == "true"

    return wait_until(healthy, "the Prefect server", gone, timeout, 1, f"{api}/health did not answer")


def ensure_bucket(
    endpoint: str, key: str, secret: str, bucket: str, timeout: float, gone: Callable[[], bool]
) -> str | None:
    """Creates the bucket if missing, then writes and deletes one object: SeaweedFS allocates volumes lazily, so
    only a write proves the S3 gateway is ready for the factory."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 1}),
    )

    def written() -> bool:
        try:
            client.head_bucket(Bucket=bucket)
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)
        probe = ".local-stack-probe"
        client.put_object(Bucket=bucket, Key=probe, Body=b"1")
        client.delete_object(Bucket=bucket, Key=probe)
        return True

    late = f"S3 at {endpoint} did not take a write to s3://{bucket}"
    return wait_until(written, "SeaweedFS", gone, timeout, 1, late)


def ensure_database(port: int, password: str, timeout: float, gone: Callable[[], bool]) -> str | None:
    """Waits until Postgres accepts the `prefect` login on 127.0.0.1, then creates the `prefect` database if
    missing."""
    import asyncio

    import asyncpg

    async def attempt() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="prefect", password=password, database="postgres", timeout=5
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", "prefect"):
                await conn.execute('CREATE DATABASE "prefect"')
        finally:
            await conn.close()

    def logged_in() -> bool:
        asyncio.run(attempt())
        return True

    late = f"PostgreSQL on 127.0.0.1:{port} did not accept a login"
    return wait_until(logged_in, "PostgreSQL", gone, timeout, 0.5, late)


def redis_ping(port: int, timeout: float, gone: Callable[[], bool]) -> str | None:
    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    return wait_until(pong, "redis-server", gone, timeout, 0.3, f"Redis on 127.0.0.1:{port} did not answer PING")


def ensure_pool(api: str, name: str, template_path: Path, kind: str = "process") -> str | None:
    """Creates the work pool (of type ``kind``) with this base job template, or sets the template on the existing
    one."""
    import httpx

    template = json.loads(template_path.read_text())
    with httpx.Client(base_url=api.rstrip("/") + "/", timeout=30) as client:
        got = client.get(f"work_pools/{name}")
        if got.status_code == 404:
            made = client.post("work_pools/", json={"name": name, "type": kind, "base_job_template": template})
            if made.status_code not in (200, 201):
                return f"creating work pool {name} failed: HTTP {made.status_code} {made.text[:300]}"
            return None
        got.raise_for_status()
        if got.json().get("type") != kind:
            found = got.json().get("type")
            return f"work pool {name} exists with type {found!r}, not {kind!r}: prefect work-pool delete {name}"
        if got.json().get("base_job_template") != template:
            patched = client.patch(f"work_pools/{name}", json={"base_job_template": template})
            if patched.status_code not in (200, 204):
                return f"updating work pool {name} failed: HTTP {patched.status_code} {patched.text[:300]}"
    return None


def ensure_gpu_slots(api: str, slots: int) -> str | None:
    """The ``gpu`` tag concurrency limit: as many GPU-holding task runs at once as the stack has GPU workers."""
    import httpx

    reply = httpx.post(f"{api}/concurrency_limits/", json={"tag": "gpu", "concurrency_limit": slots}, timeout=30)
    if reply.status_code not in (200, 201):
        return f"setting the gpu concurrency limit failed: HTTP {reply.status_code} {reply.text[:300]}"
    return None


def wait_worker(api: str, pool: str, worker: str, timeout: float, gone: Callable[[], bool]) -> str | None:
    """Waits until the worker named ``worker`` has sent its heartbeat to ``pool`` (it is then ONLINE)."""
    import httpx

    with httpx.Client(base_url=api.rstrip("/") + "/", timeout=10) as client:

        def online() -> bool:
            reply = client.post(f"work_pools/{pool}/workers/filter", json={})
            found = reply.json() if reply.status_code == 200 else []
            return any(w.get("name") == worker and w.get("status", "ONLINE") == "ONLINE" for w in found)

        late = f"worker {worker} did not report to pool {pool}"
        return wait_until(online, f"the worker for pool {pool}", gone, timeout, 1, late)


def busy_ports(wanted: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The (port, label) pairs whose port cannot be bound on 127.0.0.1."""
    busy = []
    for port, label in wanted:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append((port, label))
    return busy
