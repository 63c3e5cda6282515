"""Small checks for deploy/local-stack.sh that are clumsy in bash: which ports are taken, and idempotent setup of
the local SeaweedFS bucket, the Postgres database, the work pools, and waiting for a worker to report to its pool.
Each subcommand exits 0 on success and prints one line saying why not otherwise. Only the standard library plus
what the project already installs (httpx, botocore, asyncpg) is used, and only 127.0.0.1 is contacted."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable


def busy_ports(specs: list[str]) -> int:
    """Each spec is PORT=LABEL; prints `PORT LABEL` for every port that cannot be bound on 127.0.0.1."""
    busy = 0
    for spec in specs:
        port, _, label = spec.partition("=")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                print(f"{port} {label}")
                busy += 1
    return 1 if busy else 0


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool], process: str, pid: int | None, timeout: float, pause: float, late: str
) -> int:
    """Calls ``ready`` until it returns True (0); 1, saying why, when the ``process`` (pid) exits first or ``timeout``
    passes (``late`` says what did not happen, with the last error)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"{process} (pid {pid}) exited")
            return 1
        try:
            if ready():
                return 0
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = f" ({type(exc).__name__}: {exc})"
        time.sleep(pause)
    print(f"{late} within {timeout:.0f} s{last}")
    return 1


def ensure_bucket(endpoint: str, key: str, secret: str, bucket: str, timeout: float, pid: int | None) -> int:
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
    return wait_until(written, "SeaweedFS", pid, timeout, 1, late)


def ensure_database(port: int, user: str, password: str, database: str, timeout: float, pid: int | None) -> int:
    """Waits until Postgres accepts a login on 127.0.0.1, then creates ``database`` if it does not exist."""
    import asyncio

    import asyncpg

    async def attempt() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, password=password, database="postgres", timeout=5
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()

    def logged_in() -> bool:
        asyncio.run(attempt())
        return True

    late = f"PostgreSQL on 127.0.0.1:{port} did not accept a login"
    return wait_until(logged_in, "PostgreSQL", pid, timeout, 0.5, late)


def redis_ping(port: int, timeout: float, pid: int | None) -> int:
    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    return wait_until(pong, "redis-server", pid, timeout, 0.3, f"Redis on 127.0.0.1:{port} did not answer PING")


def ensure_pool(api: str, name: str, template_path: str, kind: str = "process") -> int:
    """Creates the work pool (of type ``kind``) with this base job template, or sets the template on the existing
    one."""
    import httpx

    with open(template_path) as f:
        template = json.load(f)
    with httpx.Client(base_url=api.rstrip("/") + "/", timeout=30) as client:
        got = client.get(f"work_pools/{name}")
        if got.status_code == 404:
            made = client.post("work_pools/", json={"name": name, "type": kind, "base_job_template": template})
            if made.status_code not in (200, 201):
                print(f"creating work pool {name} failed: HTTP {made.status_code} {made.text[:300]}")
                return 1
            return 0
        got.raise_for_status()
        if got.json().get("type") != kind:
            found = got.json().get("type")
            print(f"work pool {name} exists with type {found!r}, not {kind!r}: prefect work-pool delete {name}")
            return 1
        if got.json().get("base_job_template") != template:
            patched = client.patch(f"work_pools/{name}", json={"base_job_template": template})
            if patched.status_code not in (200, 204):
                print(f"updating work pool {name} failed: HTTP {patched.status_code} {patched.text[:300]}")
                return 1
    return 0


def ensure_gpu_slots(api: str, slots: int) -> int:
    """The ``gpu`` tag concurrency limit: as many GPU-holding task runs at once as the stack has GPU workers."""
    import httpx

    reply = httpx.post(f"{api.rstrip('/')}/concurrency_limits/", json={"tag": "gpu", "concurrency_limit": slots})
    if reply.status_code not in (200, 201):
        print(f"setting the gpu concurrency limit failed: HTTP {reply.status_code} {reply.text[:300]}")
        return 1
    return 0


def wait_worker(api: str, pool: str, worker: str, timeout: float, pid: int | None) -> int:
    """Waits until the worker named ``worker`` has sent its heartbeat to ``pool`` (it is then ONLINE)."""
    import httpx

    with httpx.Client(base_url=api.rstrip("/") + "/", timeout=10) as client:

        def online() -> bool:
            reply = client.post(f"work_pools/{pool}/workers/filter", json={})
            found = reply.json() if reply.status_code == 200 else []
            return any(w.get("name") == worker and w.get("status", "ONLINE") == "ONLINE" for w in found)

        late = f"worker {worker} did not report to pool {pool}"
        return wait_until(online, f"worker for pool {pool}", pid, timeout, 1, late)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="local_stack_helper")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("busy-ports")
    p.add_argument("specs", nargs="*")
    p = sub.add_parser("ensure-bucket")
    for a in ("endpoint", "key", "secret", "bucket"):
        p.add_argument(a)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--pid", type=int)
    p = sub.add_parser("ensure-database")
    p.add_argument("port", type=int)
    p.add_argument("user")
    p.add_argument("database")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--pid", type=int)
    p = sub.add_parser("redis-ping")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--pid", type=int)
    p = sub.add_parser("ensure-pool")
    for a in ("api", "name", "template"):
        p.add_argument(a)
    p.add_argument("--type", default="process")
    p = sub.add_parser("ensure-gpu-slots")
    p.add_argument("api")
    p.add_argument("slots", type=int)
    p = sub.add_parser("wait-worker")
    for a in ("api", "pool", "worker"):
        p.add_argument(a)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--pid", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "busy-ports":
        return busy_ports(args.specs)
    if args.cmd == "ensure-bucket":
        return ensure_bucket(args.endpoint, args.key, args.secret, args.bucket, args.timeout, args.pid)
    if args.cmd == "ensure-database":  # the password comes in the environment, not on the command line
        password = os.environ.get("STACK_PG_PASSWORD", "")
        return ensure_database(args.port, args.user, password, args.database, args.timeout, args.pid)
    if args.cmd == "redis-ping":
        return redis_ping(args.port, args.timeout, args.pid)
    if args.cmd == "ensure-pool":
        return ensure_pool(args.api, args.name, args.template, args.type)
    if args.cmd == "ensure-gpu-slots":
        return ensure_gpu_slots(args.api, args.slots)
    return wait_worker(args.api, args.pool, args.worker, args.timeout, args.pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
