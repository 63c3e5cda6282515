"""Shared fixtures: real slides from ../shared, small bad slides built per test, a real SeaweedFS S3 server and a
real (ephemeral) Prefect API for the whole session. Servers bind to 127.0.0.1 and stop with the session."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PATHGEN_LOCAL_API_IDLE_S", "20")  # a shared local API a test started stops soon after it

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


# The longest test files, longest first (seconds on two busy cores). `make test` hands files to two pytest-xdist
# workers in collection order (--no-loadscope-reorder), two each to start with: the suite ends when its last file
# does, so the long ones go first and are paired so that both workers carry about the same load.
# Seconds per file in a two-worker run (--durations), 963 s in all: at least these (the sums of each file's slowest
# tests), then less where a later change cut a file. Files not named take well under a minute each (test_benchmark,
# test_serve, test_serve_browser, test_reviews: 30 s or less alone); they follow in collection order.
LONGEST_FIRST = (
    "test_exactly_once.py",  # 375, about 300 with 3 kill trials per stage instead of 5
    "test_local_stack.py",  # 303
    "test_caption_flow.py",  # 117
    "test_clip.py",  # 201
    "test_mil_learnability.py",  # 130
    "test_startup.py",  # 86
    "test_instruct.py",  # 68
    "test_trust_clip.py",  # 57 (alphabetically last but few: it must not start last)
    "test_deployment.py",  # 53
    "test_flow_cli.py",  # 66, about 45 since a run with nothing to fetch no longer imports open_clip
    "test_parts_workers.py",  # 46
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> dict[str, str]:
    """A real S3 endpoint on 127.0.0.1 for the session; killed at the end (and by `timeout` if pytest dies)."""
    from bench.seaweed import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), S3_KEY, S3_SECRET, TEST_BUCKET) as endpoint:
        yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET}


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


@pytest.fixture(scope="session")
def captioned_store(tmp_path_factory, extracted_store, tiny_models):
    """extracted_store with its 12 patches captioned by the tiny models (pairs/<agents_hash>/), for CLIP tests."""
    import shutil

    from agents.identity import agents_hash, identities
    from pathgen.settings import load_settings
    from tasks.captions.caption import caption_slides

    root = tmp_path_factory.mktemp("captioned") / "store"
    shutil.copytree(extracted_store, root)
    settings = load_settings(overrides={"store": str(root), "agents.model_cache": str(tiny_models[0])}, environ={})
    hash_ = agents_hash(settings.agents, identities(settings.agents, settings.retries))
    outcomes = caption_slides([CMU.stem], settings, hash_)
    assert [o.status for o in outcomes] == ["ok"] and outcomes[0].items >= 8, outcomes
    return root


def pytest_unconfigure(config):
    # pyarrow's S3 client, once up, keeps C++ threads that can abort the interpreter at exit ("terminate called
    # without an active exception"), which would turn a green run red: shut it down first.
    try:
        import pyarrow.fs

        pyarrow.fs.finalize_s3()
    except Exception:  # noqa: BLE001 - nothing to finalize
        pass


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op torch thread inside, the former count after: MIL bags of a few dozen small instances wait on a
    second thread more than it helps them, on a shared 2-core runner (an epoch took 5x longer)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
