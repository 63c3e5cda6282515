"""The same extraction against a real S3 endpoint (SeaweedFS on 127.0.0.1), and against one that is down."""

import socket

import fsspec
import pytest

from pathgen.settings import load_settings
from tasks.slides.extract import extract_slide, shard_key, slide_json_key, thumbnail_key
from tasks.slides.shard import read_shard
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store, StoreError, is_temporary

from .conftest import CMU

pytestmark = pytest.mark.s3


def _settings(store, **overrides):
    return load_settings(overrides={"store": store, "patch.patch_px": 224, **overrides}, environ={})


def test_store_commits_atomically_and_lists_only_committed_keys(bucket):
    store = Store(f"{bucket}/run")
    store.check()
    store.write_json("slides/a/slide.json", {"status": "ok"})
    store.write_bytes("patches/a.parquet", b"PAR1")
    assert store.read_json("slides/a/slide.json") == {"status": "ok"}
    assert store.list("patches") == ["patches/a.parquet"]
    assert not any(is_temporary(p) for p in store.fs.find(store.root))


def test_extract_cmu_into_s3_then_skip_on_rerun(bucket):
    settings = _settings(f"{bucket}/factory", **{"selection.method": "all"})
    store = Store(settings.store, settings.s3)
    store.check()
    (ref,) = resolve_sources([str(CMU)], settings)
    first = extract_slide(ref, settings, store)
    assert first.status == "ok", first.error
    assert store.exists(thumbnail_key(ref.slide_id))
    assert store.read_json(slide_json_key(ref.slide_id))["counts"]["kept"] == first.patches
    with store.open(shard_key(ref.slide_id)) as handle:
        assert read_shard(handle).num_rows == first.patches
    assert extract_slide(ref, settings, store).status == "skipped"
    assert not any(is_temporary(p) for p in store.fs.find(store.root))


def test_slides_read_from_s3_with_ranged_reads_match_local(bucket, tmp_path):
    fs = fsspec.filesystem("s3", **Store(bucket).fs.storage_options)
    fs.put_file(str(CMU), f"{bucket[5:]}/slides/CMU-1-Small-Region.svs")
    remote_settings = _settings(str(tmp_path / "remote"), **{"selection.method": "all"})
    refs = resolve_sources([f"{bucket}/slides/"], remote_settings)
    assert [r.uri for r in refs] == [f"{bucket}/slides/CMU-1-Small-Region.svs"]
    remote = extract_slide(refs[0], remote_settings, Store(remote_settings.store))
    local_settings = _settings(str(tmp_path / "local"), **{"selection.method": "all"})
    local = extract_slide(resolve_sources([str(CMU)], local_settings)[0], local_settings, Store(local_settings.store))
    assert remote.status == local.status == "ok"
    assert remote.record.backend == "tiffslide" and remote.record.tile_reader
    tables = []
    for store in (tmp_path / "remote", tmp_path / "local"):
        tables.append(read_shard(store / "patches" / "CMU-1-Small-Region.parquet"))
    assert tables[0]["patch_id"].to_pylist() == tables[1]["patch_id"].to_pylist()
    assert tables[0]["image"].to_pylist() == tables[1]["image"].to_pylist()


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes


def test_unanswering_endpoint_is_retried_then_left_pending(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHGEN_S3_ENDPOINT_URL", _dead_endpoint())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    fsspec.AbstractFileSystem.clear_instance_cache()
    settings = _settings(
        str(tmp_path / "store"),
        **{"retries.io_retries": 2, "retries.backoff_seconds": 0.05, "s3.max_attempts": 1, "s3.connect_timeout": 1},
    )
    store = Store(settings.store)
    (ref,) = resolve_sources(["s3://slides/TCGA-XX.svs"], settings)
    outcome = extract_slide(ref, settings, store)
    # Infrastructure, not the slide: nothing is recorded, the slide stays pending for the next run.
    assert outcome.status == "pending" and outcome.record is None
    assert "after 3 attempts" in outcome.error and "endpoint" in outcome.error
    assert "very-secret-value" not in outcome.error
    assert not store.exists(slide_json_key("TCGA-XX")) and not store.exists(shard_key("TCGA-XX"))


def test_unanswering_store_fails_early_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATHGEN_S3_ENDPOINT_URL", _dead_endpoint())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    fsspec.AbstractFileSystem.clear_instance_cache()
    settings = _settings("s3://factory/run", **{"s3.max_attempts": 1, "s3.connect_timeout": 1})
    with pytest.raises(StoreError, match="cannot be reached") as err:
        Store(settings.store, settings.s3).check()
    assert "very-secret-value" not in str(err.value)


def test_extract_flow_writes_to_s3_and_reports(prefect_api, bucket):
    from flows.extract import extract_flow

    from .conftest import DAPI

    summary = extract_flow(sources=[str(CMU), str(DAPI)], store=f"{bucket}/flow", processes=False)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert summary["store"] == f"{bucket}/flow"
    store = Store(f"{bucket}/flow")
    assert store.list("patches") == ["patches/CMU-1-Small-Region.parquet"]
    assert store.read_json(slide_json_key(DAPI.stem))["status"] == "failed"


def test_remote_reads_fetch_tiles_not_the_whole_slide(bucket, tmp_path):
    from bench.synthetic_slide import build_slide
    from tasks.slides.readers import open_slide

    local = build_slide(tmp_path / "big.svs", width=12_000, height=9_000)
    fs = Store(bucket).fs
    remote = f"{bucket}/big.svs"
    fs.put_file(str(local), remote[5:])
    from pathgen.settings import S3Settings
    from tasks.store.objects import storage_options

    with open_slide(remote, storage_opts=storage_options(remote, S3Settings(block_size=2**18))) as reader:
        assert reader.info.backend == "tiffslide" and reader.info.fast_tiles
        patches = list(reader.read_boxes([(4000, 3000, 512, 512), (4512, 3000, 512, 512)], 0.25, 512))
        handle = reader._slide.ts_tifffile.filehandle._fh
        fetched = handle.cache.total_requested_bytes
    size = local.stat().st_size
    assert len(patches) == 2 and patches[0].shape == (512, 512, 3)
    assert fetched < 0.5 * size, f"fetched {fetched} of {size} bytes"
