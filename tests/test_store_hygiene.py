"""Store hygiene: temporary files no reader sees, cleanup of what killed writers left on local disk, S3 writes
that go straight to the final key and leave nothing behind when they fail,
staged files in one folder, and S3 calls that end in bounded time when the endpoint never answers."""

from __future__ import annotations

import fnmatch
import glob
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pathgen.settings import S3Settings, Settings, load_settings
from tasks.store.objects import (
    Store,
    StoreError,
    is_temporary,
    remove_stale_staging,
    staging_dir,
    storage_options,
    temporary_name,
)

HOUR = 3600.0


def dead_pid() -> int:
    """The id of a process that has exited and been reaped (ids are reused only after wrapping around)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def this_host() -> str:
    """The host part of this process's temporary names: `.<name>.<host>~<pid>~<token>.tmp`."""
    owner = temporary_name("x")[: -len(".tmp")].rsplit(".", 1)[1]
    return owner.split("~")[0]


def temp_name(name: str, pid: int, host: str | None = None) -> str:
    return f".{name}.{this_host() if host is None else host}~{pid}~{uuid.uuid4().hex[:12]}.tmp"


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def parquet_bytes(values: list[int]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": values}), sink)
    return sink.getvalue().to_pybytes()


# -- names ----------------------------------------------------------------------------------------------------


def test_temporary_names_are_hidden_and_parse_back(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node-1.example.com")
    name = temporary_name("TCGA-A1.v2.parquet")
    assert name.startswith(".TCGA-A1.v2.parquet.node-1_example_com~") and name.endswith(".tmp")
    assert is_temporary(name) and is_temporary(f"pairs/a/{name}")
    assert not fnmatch.fnmatch(name, "*.parquet")
    assert is_temporary(".tmp-0123456789ab-a.parquet")  # the older format is still recognised
    for committed in ("a.parquet", "pairs/a.tmp.parquet", ".hidden", "a.tmp", "x~1~0123456789ab.tmp"):
        assert not is_temporary(committed), committed


# -- local disk -----------------------------------------------------------------------------------------------


def test_local_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_bytes("pairs/a/committed.parquet", b"PAR1")
    folder = tmp_path / "store" / "pairs" / "a"
    gone = {
        "dead": folder / temp_name("dead.parquet", dead_pid()),
        "other_host_old": folder / temp_name("old.parquet", os.getpid(), host="elsewhere"),
        "live_but_old": folder / temp_name("stuck.parquet", os.getpid()),
        "legacy_old": folder / ".tmp-0123456789ab-legacy.parquet",
    }
    kept = {
        "live": folder / temporary_name("live.parquet"),
        "other_host_fresh": folder / temp_name("remote.parquet", dead_pid(), host="elsewhere"),
    }
    for path in [*gone.values(), *kept.values()]:
        path.write_bytes(b"half")
    for key in ("other_host_old", "live_but_old", "legacy_old"):
        age(gone[key], 2 * HOUR)

    assert store.remove_stale_temporaries(["pairs", "does/not/exist"], grace_seconds=HOUR) == len(gone)
    assert not any(p.exists() for p in gone.values())
    assert all(p.exists() for p in kept.values())
    assert (folder / "committed.parquet").exists()


def test_readers_and_globs_never_see_temporary_files(tmp_path):
    store = Store(str(tmp_path / "store"))
    with store.staged_file("pairs/a/shard.parquet") as local:
        pq.write_table(pa.table({"x": [1, 2, 3]}), local)
    folder = tmp_path / "store" / "pairs" / "a"
    (folder / temp_name("crashed.parquet", dead_pid())).write_bytes(parquet_bytes([7] * 100))

    assert store.list("pairs") == ["pairs/a/shard.parquet"]
    assert [Path(p).name for p in glob.glob(str(tmp_path / "store" / "pairs" / "*" / "*.parquet"))] == ["shard.parquet"]
    assert [Path(p).name for p in store.fs.glob(f"{store.root}/pairs/*/*.parquet")] == ["shard.parquet"]
    assert ds.dataset(str(folder), format="parquet").to_table().column("x").to_pylist() == [1, 2, 3]
    assert ds.dataset(str(tmp_path / "store" / "pairs"), format="parquet").count_rows() == 3


def test_a_failed_local_staged_write_leaves_nothing(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RuntimeError, match="boom"), store.staged_file("pairs/a.parquet") as local:
        Path(local).write_bytes(b"half")
        raise RuntimeError("boom")
    assert list((tmp_path / "store" / "pairs").iterdir()) == []


# -- staging folder -------------------------------------------------------------------------------------------


def test_stale_staged_files_are_removed(tmp_path, monkeypatch):
    folder = tmp_path / "staging"
    monkeypatch.setenv("PATHGEN_STAGING_DIR", str(folder))
    assert staging_dir() == str(folder)
    assert remove_stale_staging(HOUR) == 0  # no folder yet
    folder.mkdir()
    token = "0123456789ab"
    dead = folder / f"{dead_pid()}~{token}~dead.parquet"
    live = folder / f"{os.getpid()}~{token}~live.parquet"
    stuck = folder / f"{os.getpid()}~{token[::-1]}~stuck.parquet"
    foreign = folder / "notes.txt"
    for path in (dead, live, stuck, foreign):
        path.write_bytes(b"x")
    age(stuck, 2 * HOUR)
    age(foreign, 2 * HOUR)

    assert remove_stale_staging(HOUR) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, foreign.name])
    assert remove_stale_staging(HOUR, folder=str(tmp_path / "missing")) == 0


def test_staging_defaults_to_one_folder_under_the_temp_dir(monkeypatch):
    monkeypatch.delenv("PATHGEN_STAGING_DIR", raising=False)
    assert Path(staging_dir()).name == "pathgen-staging"


# -- S3 (SeaweedFS) -------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_writes_go_to_the_final_key_and_older_temporaries_are_left_to_listings(bucket):
    store = Store(f"{bucket}/run")
    store.check()
    calls: list[str] = []
    original = store.fs._call_s3

    async def recording(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    store.fs._call_s3 = recording
    try:
        store.write_bytes("pairs/a/committed.parquet", b"PAR1")
    finally:
        del store.fs._call_s3
    assert calls == ["put_object"]  # no temporary key, no copy, no delete
    # A temporary object an older version left is never swept by listing the bucket (remote writes leave none),
    # and listings still skip it.
    old = f"pairs/a/{temp_name('dead.parquet', dead_pid())}"
    store.fs.pipe_file(store.path(old), b"half")
    assert store.remove_stale_temporaries(["pairs"], grace_seconds=0) == 0
    store.fs.invalidate_cache()
    assert store.list("pairs") == ["pairs/a/committed.parquet"]


@pytest.mark.s3
def test_s3_a_failed_multipart_upload_leaves_no_object_and_no_upload(bucket, tmp_path, monkeypatch):
    import s3fs.core

    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 * 2**20)
    store = Store(f"{bucket}/run")
    store.check()
    big = tmp_path / "big.parquet"
    big.write_bytes(os.urandom(10 * 2**20 + 1))  # three parts of 5 MiB at most
    original = store.fs._call_s3
    parts = []

    async def second_part_fails(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                raise OSError("connection reset while sending part 2")
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "_call_s3", second_part_fails)
    with pytest.raises(OSError, match="part 2"):
        store.put_file(big, "pairs/a/big.parquet")
    monkeypatch.undo()
    store.fs.invalidate_cache()
    assert parts and not store.exists("pairs/a/big.parquet")
    assert not any(is_temporary(p) for p in store.fs.find(store.root))
    uploads = store.fs.call_s3("list_multipart_uploads", Bucket=store.root.split("/")[0]).get("Uploads", [])
    assert [u for u in uploads if u["Key"].endswith("big.parquet")] == []  # s3fs aborted it

    store.put_file(big, "pairs/a/big.parquet")  # the same upload completes when nothing fails
    assert store.read_bytes("pairs/a/big.parquet") == big.read_bytes()


@pytest.mark.s3
def test_s3_listing_and_globs_never_see_temporary_objects(bucket):
    store = Store(f"{bucket}/run")
    store.write_bytes("pairs/a/shard.parquet", parquet_bytes([1, 2]))
    store.fs.pipe_file(store.path(f"pairs/a/{temp_name('crashed.parquet', dead_pid())}"), parquet_bytes([9]))
    store.fs.invalidate_cache()
    assert store.list("pairs") == ["pairs/a/shard.parquet"]
    assert store.list("pairs", suffix=".parquet") == ["pairs/a/shard.parquet"]
    assert store.fs.glob(f"{store.root}/pairs/*/*.parquet") == [store.path("pairs/a/shard.parquet")]


@pytest.mark.s3
def test_s3_staged_writes_leave_nothing_in_the_staging_folder(bucket, tmp_path, monkeypatch):
    folder = tmp_path / "staging"
    monkeypatch.setenv("PATHGEN_STAGING_DIR", str(folder))
    store = Store(f"{bucket}/run")
    with store.staged_file("pairs/a.parquet") as local:
        assert Path(local).parent == folder and Path(local).name.endswith("~a.parquet")
        Path(local).write_bytes(b"PAR1")
    assert store.read_bytes("pairs/a.parquet") == b"PAR1"
    assert list(folder.iterdir()) == []

    with pytest.raises(RuntimeError, match="boom"), store.staged_file("pairs/b.parquet") as local:
        Path(local).write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(folder.iterdir()) == []
    store.fs.invalidate_cache()
    assert store.list("pairs") == ["pairs/a.parquet"]
    assert not any(is_temporary(p) for p in store.fs.find(store.root))


@pytest.mark.s3
def test_s3_check_creates_a_missing_bucket(s3_env):
    store = Store(f"s3://hygiene-{uuid.uuid4().hex[:8]}/run")
    store.check()
    assert store.fs.exists(store.root.split("/")[0])


# -- deadlines ------------------------------------------------------------------------------------------------


def test_s3fs_retries_and_botocore_attempts_are_bounded():
    s3 = S3Settings(max_attempts=2, s3fs_retries=0)
    options = storage_options("s3://bucket/run", s3)
    assert options["config_kwargs"]["retries"] == {"total_max_attempts": 2, "mode": "standard"}
    assert Store("s3://bucket/run", s3).fs.retries == 1
    assert Store("s3://bucket/run", S3Settings(s3fs_retries=3)).fs.retries == 4
    assert Settings().cleanup.stale_temp_grace_seconds == HOUR
    tuned = load_settings(overrides=["cleanup.stale_temp_grace_seconds=60"], environ={})
    assert tuned.cleanup.stale_temp_grace_seconds == 60


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts TCP connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)  # closing a socket does not wake a blocked accept(): poll the stop flag instead
    stop = threading.Event()
    held: list[socket.socket] = []

    def hold() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
        for conn in held:
            conn.close()


def test_a_silent_endpoint_fails_the_store_check_within_the_deadline(silent_endpoint, monkeypatch):
    monkeypatch.setenv("PATHGEN_S3_ENDPOINT_URL", silent_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.AbstractFileSystem.clear_instance_cache()
    s3 = S3Settings(connect_timeout=1, read_timeout=1, max_attempts=1, s3fs_retries=0)
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot be reached") as err:
        Store("s3://factory/run", s3).check()
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert silent_endpoint.removeprefix("http://") in str(err.value)
    assert "s3://factory/run" in str(err.value)
    assert "very-secret-value" not in str(err.value)


def test_credentials_in_the_endpoint_url_stay_out_of_errors(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    monkeypatch.setenv("PATHGEN_S3_ENDPOINT_URL", f"http://k:very-secret-value@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    fsspec.AbstractFileSystem.clear_instance_cache()
    s3 = S3Settings(connect_timeout=1, read_timeout=1, max_attempts=1, s3fs_retries=0)
    with pytest.raises(StoreError) as err:
        Store("s3://factory/run", s3).check()
    assert f"127.0.0.1:{port}" in str(err.value) and "very-secret-value" not in str(err.value)


def test_a_killed_writer_not_yet_reaped_counts_as_dead_so_its_temporaries_are_swept():
    """A SIGKILLed process answers signal 0 until its parent reaps it; its temporaries must not outlive it."""
    import signal

    from tasks.store.objects import pid_alive

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(child.pid) and time.monotonic() < deadline:  # a zombie now, not yet waited for
            time.sleep(0.02)
        assert not pid_alive(child.pid)
        assert child.poll() == -signal.SIGKILL  # reaped only now: it was a zombie when judged dead
    finally:
        child.kill()
        child.wait()
