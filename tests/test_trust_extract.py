"""Issue 17: a changed slide is extracted again; infrastructure (unfetchable weights, the GPU, a full or unwritable
store) leaves slides pending and never removes a committed shard; positions off the slide are named; a PNG that
cannot be encoded is an error."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pathgen.errors import ModelUnavailable, is_infrastructure
from pathgen.settings import load_settings
from tasks.slides import extract as extract_module
from tasks.slides.extract import extract_slide, extract_slides, shard_key, slide_json_key, thumbnail_key
from tasks.slides.hashing import legacy_extraction_hash, slide_extraction_hash
from tasks.slides.record import SlideRecord
from tasks.slides.shard import read_shard
from tasks.slides.sources import SlideRef, resolve_sources, source_identity
from tasks.store.objects import Store
from tasks.work.units import PendingWork

from .conftest import CMU, write_tiff_slide

ROOT = Path(__file__).resolve().parents[1]


def _settings(store, **overrides):
    base = {"store": str(store), "retries.io_retries": 0, "patch.patch_px": 224, "selection.method": "all"}
    base.update(overrides)
    return load_settings(overrides=base, environ={})


def _extract(spec, settings):
    (ref,) = resolve_sources([str(spec)], settings)
    return extract_slide(ref, settings, Store(settings.store, settings.s3))


def _record(store: Store, slide_id: str) -> dict:
    return store.read_json(slide_json_key(slide_id))


def _footer_hash(store: Store, slide_id: str) -> str:
    import pyarrow.parquet as pq

    with store.open(shard_key(slide_id)) as handle:
        return pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata[b"pathgen.extraction_hash"].decode()


def _set_footer_hash(store: Store, slide_id: str, extraction_hash: str) -> None:
    """Rewrite the shard's footer hash, as the code of the time wrote it."""
    import pyarrow.parquet as pq

    with store.open(shard_key(slide_id)) as handle:
        table = pq.read_table(handle)
    meta = {**table.schema.metadata, b"pathgen.extraction_hash": extraction_hash.encode()}
    with store.staged_file(shard_key(slide_id)) as local:
        pq.write_table(table.replace_schema_metadata(meta), local)


def _rows(store: Store, key: str) -> list[dict]:
    with store.open(key) as handle:
        return read_shard(handle, ["patch_id", "x", "y", "image"]).to_pylist()


@pytest.fixture
def two_tissues(cmu_rgb) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(cmu_rgb[512:1536, 600:1624]), np.ascontiguousarray(cmu_rgb[1900:2924, 600:1624])


# -- point 1: the source's identity ---------------------------------------------------------------------------------


def test_changed_local_slide_is_extracted_again_unchanged_one_skipped(tmp_path, two_tissues):
    (tmp_path / "slides").mkdir()
    slide = write_tiff_slide(tmp_path / "slides" / "S1.tif", two_tissues[0], mpp=0.5)
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    first = _extract(slide, settings)
    assert first.status == "ok", first.error
    record, stat = _record(store, "S1"), os.stat(slide)
    assert _extract(slide, settings).status == "skipped"  # unchanged: still skipped
    before = {r["patch_id"]: r["image"] for r in _rows(store, shard_key("S1"))}

    replacement = write_tiff_slide(tmp_path / "other.tif", two_tissues[1], mpp=0.5)
    os.replace(replacement, slide)  # another scan under the same name
    again = _extract(slide, settings)
    assert again.status == "ok", again.error  # the old code logged "already committed" and kept the old patches
    source = {k: v for k, v in record["source"].items() if v is not None}
    assert source == {"kind": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "modified": stat.st_mtime}
    redone = _record(store, "S1")
    assert redone["source"]["size"] == os.path.getsize(slide) and redone["source"] != record["source"]
    assert redone["extraction_hash"] != record["extraction_hash"]
    # the shard's footer carries the new hash: the slide's pairs are pending for caption
    assert _footer_hash(store, "S1") == redone["extraction_hash"]
    after = {r["patch_id"]: r["image"] for r in _rows(store, shard_key("S1"))}
    shared = before.keys() & after.keys()
    assert shared and all(before[k] != after[k] for k in shared)  # new pixels, not the old patches
    assert _extract(slide, settings).status == "skipped"


def test_slide_extracted_before_identities_is_kept_until_its_source_changes(tmp_path, two_tissues):
    """A store written before source identities: a slide is kept while its file is older than its record (no
    re-extraction, so no re-captioning, on upgrade), and extracted again once the file changes."""
    (tmp_path / "slides").mkdir()
    slide = write_tiff_slide(tmp_path / "slides" / "S2.tif", two_tissues[0], mpp=0.5)
    os.utime(slide, (1_600_000_000, 1_600_000_000))  # written long before it was extracted
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    assert _extract(slide, settings).status == "ok"
    (ref,) = resolve_sources([str(slide)], settings)
    legacy = {**_record(store, "S2"), "extraction_hash": legacy_extraction_hash(ref, settings)}
    del legacy["source"], legacy["failed_positions"]  # as the earlier code wrote it
    store.write_json(slide_json_key("S2"), legacy)
    _set_footer_hash(store, "S2", legacy["extraction_hash"])
    assert _extract(slide, settings).status == "skipped"
    assert "source" not in _record(store, "S2")  # left as it was
    other = _settings(tmp_path / "store", **{"patch.jpeg_quality": 70})  # other settings: redone, as ever
    assert _extract(slide, other).status == "ok"
    store.write_json(slide_json_key("S2"), legacy)
    _set_footer_hash(store, "S2", legacy["extraction_hash"])
    os.utime(slide)  # the file changed after its record was written: redone, with its identity
    again = _extract(slide, settings)
    assert again.status == "ok" and _record(store, "S2")["source"]["kind"] == "file"


def test_manifest_md5_is_the_identity_and_other_slides_do_not_count(tmp_path):
    copy = tmp_path / "CMU.svs"
    shutil.copy(CMU, copy)
    settings = _settings(tmp_path / "store")
    with_md5 = SlideRef("CMU", str(copy), "manifest.tsv", md5="A" * 32)
    identity = source_identity(with_md5, settings)
    assert identity.kind == "md5" and identity.md5 == "a" * 32
    os.utime(copy, ns=(1, 1))  # a re-download of the same bytes: the same slide
    assert source_identity(with_md5, settings) == identity
    other_md5 = SlideRef("CMU", str(copy), "manifest.tsv", md5="b" * 32)
    assert slide_extraction_hash(with_md5, settings, identity) != slide_extraction_hash(
        other_md5, settings, source_identity(other_md5, settings)
    )
    plain = SlideRef("CMU", str(copy), str(copy))
    stamp = source_identity(plain, settings)
    assert stamp.kind == "file" and stamp.mtime_ns == 1 and stamp.size == CMU.stat().st_size
    # a slide's hash covers its own source only: the same slide hashes alike beside any other
    assert slide_extraction_hash(plain, settings, stamp) == slide_extraction_hash(plain, settings, stamp.model_copy())
    missing = SlideRef("gone", str(tmp_path / "gone.svs"), "x")
    assert source_identity(missing, settings) is None


@pytest.mark.s3
def test_changed_s3_object_is_extracted_again(bucket, tmp_path, two_tissues):
    settings = _settings(f"{bucket}/store")
    fs = Store(bucket).fs
    key = f"{bucket[5:]}/slides/S3.tif"
    fs.put_file(str(write_tiff_slide(tmp_path / "a.tif", two_tissues[0], mpp=0.5)), key)
    url = f"{bucket}/slides/S3.tif"
    store = Store(settings.store, settings.s3)
    assert _extract(url, settings).status == "ok"
    first = _record(store, "S3")
    assert _extract(url, settings).status == "skipped"
    fs.put_file(str(write_tiff_slide(tmp_path / "b.tif", two_tissues[1], mpp=0.5)), key)
    again = _extract(url, settings)
    assert again.status == "ok", again.error
    assert first["source"]["kind"] == "object" and first["source"]["etag"]
    assert _record(store, "S3")["source"]["etag"] != first["source"]["etag"]
    assert _footer_hash(store, "S3") != first["extraction_hash"]


# -- point 6: weights that cannot be fetched, the GPU --------------------------------------------------------------


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """No hub, and an empty hub cache: as a worker that cannot reach huggingface.co."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_production_weights_unreachable_stop_before_the_first_slide(tmp_path, hub_offline, prefect_api):
    from flows.extract import extract_flow
    from tasks.models import require_real_models

    production = str(ROOT / "deploy" / "production.yaml")
    settings = load_settings(production, {"store": str(tmp_path / "store")}, environ={})
    with pytest.raises(ModelUnavailable) as caught:
        require_real_models(settings, ["extract", "caption", "train-clip"])
    message = str(caught.value)
    assert "embedding.model / embedding.pretrained ViT-L-14-336-quickgelu:openai" in message
    assert "agents.describe.model Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert "clip.model / clip.pretrained ViT-B-16-quickgelu:openai" in message
    assert is_infrastructure(caught.value) and "stays pending" in message
    state = extract_flow(
        sources=[str(CMU)], store=str(tmp_path / "store"), config=production, processes=False, return_state=True
    )
    assert isinstance(state.result(raise_on_failure=False), ModelUnavailable)  # before any slide: none failed
    assert not (tmp_path / "store" / "slides").exists()


def test_unfetchable_embedding_weights_leave_the_slide_pending_and_its_shard(tmp_path, hub_offline):
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    assert _extract(CMU, settings).status == "ok"
    committed = _record(store, "CMU-1-Small-Region")
    shard = store.read_bytes(shard_key("CMU-1-Small-Region"))
    production_like = _settings(
        tmp_path / "store",
        **{"selection.method": "representative", "embedding.model": "ViT-B-32", "embedding.pretrained": "openai"},
    )
    outcome = _extract(CMU, production_like)  # a worker that skipped the preflight: the load fails per slide
    assert outcome.status == "pending", (outcome.status, outcome.error)
    assert "ViT-B-32-quickgelu:openai" in outcome.error and "pending" in outcome.error  # the -quickgelu twin
    assert _record(store, "CMU-1-Small-Region") == committed  # not "failed"
    assert store.read_bytes(shard_key("CMU-1-Small-Region")) == shard  # the good shard was not deleted


def _hub_cache_snapshot(cache: Path, model_id: str, files: dict[str, bytes]) -> None:
    """A model in the hub cache's layout, as a download leaves it: refs/main names the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_a_worker_without_network_starts_from_a_filled_hub_cache(tmp_path, monkeypatch):
    """Online settings (no HF_HUB_OFFLINE) on a worker that cannot reach the hub: a model in its hub cache is
    loaded from there, so the preflight lets the work start; a model it lacks is still refused, naming both."""
    import huggingface_hub.constants as constants

    from tasks.models import resolve_model_weights

    cache = tmp_path / "hub-cache"
    _hub_cache_snapshot(cache, "pathgen-test/cached", {"config.json": b"{}", "model.safetensors": b"weights"})
    _hub_cache_snapshot(cache, "pathgen-test/no-weights", {"config.json": b"{}"})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network

    def caption(model: str):
        return _settings(tmp_path / "store", **{"agents.describe.model": model})

    resolve_model_weights(caption("pathgen-test/cached"), ["caption"])  # the old code: ModelUnavailable
    for model, reason in [("pathgen-test/absent", "holds no snapshot"), ("pathgen-test/no-weights", "no weight files")]:
        with pytest.raises(ModelUnavailable) as caught:
            resolve_model_weights(caption(model), ["caption"])
        message = str(caught.value)
        assert f"agents.describe.model {model}" in message and "the hub cannot be reached" in message, message
        assert reason in message and "ConnectError" in message and "stays pending" in message


@pytest.mark.parametrize(
    "fault",
    [
        "oom",
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
)
def test_gpu_faults_leave_the_slide_pending(tmp_path, monkeypatch, fault):
    import torch

    from tasks.selection import embedding

    def forward(self, tensors):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if fault == "oom" else fault

    monkeypatch.setattr(embedding.PatchEmbedder, "_forward", forward)
    monkeypatch.setattr(embedding, "empty_cuda_cache", lambda: None)
    settings = _settings(tmp_path / "store", **{"selection.method": "representative", "embedding.batch_size": 4})
    outcome = _extract(CMU, settings)
    assert outcome.status == "pending", (outcome.status, outcome.error)
    assert not Store(settings.store).exists(slide_json_key("CMU-1-Small-Region"))


def test_failed_rerun_keeps_the_committed_shard(tmp_path, monkeypatch):
    """A content failure of a re-run (new settings) is reported, and the earlier whole extraction stays."""
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    assert _extract(CMU, settings).status == "ok"
    committed = _record(store, "CMU-1-Small-Region")
    strict = _settings(tmp_path / "store", **{"tissue.threshold": 1.0, "quality.max_background_fraction": 0.0})
    outcome = _extract(CMU, strict)
    assert outcome.status == "failed" and "keeps its earlier extraction" in outcome.error
    assert _record(store, "CMU-1-Small-Region") == committed
    assert store.exists(shard_key("CMU-1-Small-Region"))
    assert _extract(CMU, settings).status == "skipped"


def _png_writes_fail(monkeypatch) -> None:
    real = Store.write_bytes

    def write_bytes(store, key, data):
        if key.endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(store, key, data)

    monkeypatch.setattr(Store, "write_bytes", write_bytes)


def test_a_rerun_stopped_after_its_shard_leaves_no_ok_record_of_other_patches(tmp_path, monkeypatch):
    """A re-run whose shard was committed but whose pictures or record were not (a storage error, a kill): the old
    ``ok`` record no longer describes the shard, so the slide is redone, and a failing re-run cannot claim to keep
    an earlier extraction that is gone."""
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    slide_id = "CMU-1-Small-Region"
    assert _extract(CMU, settings).status == "ok"
    committed = _record(store, slide_id)
    with monkeypatch.context() as patch:
        _png_writes_fail(patch)
        stopped = _extract(CMU, _settings(tmp_path / "store", **{"patch.jpeg_quality": 70}))
    assert stopped.status == "pending", stopped.error
    assert _record(store, slide_id) == committed and _footer_hash(store, slide_id) != committed["extraction_hash"]

    strict = _settings(tmp_path / "store", **{"tissue.threshold": 1.0, "quality.max_background_fraction": 0.0})
    failed = _extract(CMU, strict)  # the old code: "the store keeps its earlier extraction", and kept the record
    assert failed.status == "failed" and "keeps its earlier extraction" not in failed.error, failed.error
    assert _record(store, slide_id)["status"] == "failed" and not store.exists(shard_key(slide_id))

    with monkeypatch.context() as patch:
        _png_writes_fail(patch)
        assert _extract(CMU, _settings(tmp_path / "store", **{"patch.jpeg_quality": 70})).status == "pending"
    store.write_json(slide_json_key(slide_id), committed)  # the ok record of the first settings, over other patches
    redone = _extract(CMU, settings)  # the old code: "skipped", with the jpeg_quality 70 patches under this record
    assert redone.status == "ok", (redone.status, redone.error)
    assert _footer_hash(store, slide_id) == _record(store, slide_id)["extraction_hash"] == committed["extraction_hash"]


def test_a_picture_that_fails_on_a_rerun_leaves_the_earlier_extraction_whole(tmp_path, monkeypatch):
    settings = _settings(tmp_path / "store", **{"selection.method": "representative"})
    store = Store(settings.store)
    slide_id = "CMU-1-Small-Region"
    assert _extract(CMU, settings).status == "ok"
    committed, shard = _record(store, slide_id), store.read_bytes(shard_key(slide_id))
    monkeypatch.setattr(extract_module.cv2, "imencode", lambda ext, img: (False, np.zeros(0, np.uint8)))
    outcome = _extract(
        CMU, _settings(tmp_path / "store", **{"selection.method": "representative", "patch.jpeg_quality": 70})
    )
    assert outcome.status == "failed" and "could not be encoded as PNG" in outcome.error
    assert "keeps its earlier extraction" in outcome.error
    assert _record(store, slide_id) == committed
    assert store.read_bytes(shard_key(slide_id)) == shard  # the old code had committed the new shard under it
    assert _footer_hash(store, slide_id) == committed["extraction_hash"]


def test_storage_errors_never_show_the_credentials_of_a_store_url():
    from types import SimpleNamespace

    store = SimpleNamespace(url="https://pathgen:s3cret@minio.example:9000/bucket/store")
    cause = OSError(errno.EACCES, "Access denied for https://pathgen:s3cret@minio.example:9000/bucket")
    message = str(extract_module._storage_error(store, "writing slides/S/slide.json", cause))
    assert "s3cret" not in message and "pathgen:" not in message
    assert "https://***@minio.example:9000/bucket/store" in message and "stays pending" in message


# -- point 11: storage errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, error",
    [
        ("shard", OSError(errno.ENOSPC, "No space left on device")),
        ("thumbnail", OSError(errno.EDQUOT, "Disk quota exceeded")),
        ("record", PermissionError(errno.EACCES, "Permission denied")),
    ],
)
def test_storage_errors_leave_slides_pending(tmp_path, monkeypatch, where, error):
    from tasks.slides import shard as shard_module

    def fail(*args, **kwargs):
        raise error

    if where == "shard":
        monkeypatch.setattr(shard_module.PatchShardWriter, "add", fail)
    elif where == "thumbnail":
        real = Store.write_bytes
        monkeypatch.setattr(Store, "write_bytes", lambda s, k, d: fail() if k.endswith(".png") else real(s, k, d))
    else:
        monkeypatch.setattr(Store, "write_json", fail)
    settings = _settings(tmp_path / "store")
    refs = resolve_sources([str(CMU)], settings)
    with pytest.raises(PendingWork) as caught:
        extract_slides(refs, settings)
    (outcome,) = caught.value.outcomes
    assert outcome.status == "pending" and str(tmp_path / "store") in outcome.error, outcome.error
    assert not Store(settings.store).exists(slide_json_key("CMU-1-Small-Region"))  # nothing recorded failed


# -- point 12: positions off the slide ------------------------------------------------------------------------------


def _positions_file(tmp_path: Path, positions: list[tuple[float, float]]) -> Path:
    folder = tmp_path / "pathgen"
    folder.mkdir(exist_ok=True)
    shutil.copy(CMU, folder / "CMU-1-Small-Region.svs")
    records = [
        {"wsi_id": "CMU-1-Small-Region", "position": [str(x), str(y)], "caption": f"caption {i}"}
        for i, (x, y) in enumerate(positions)
    ]
    source = folder / "PathGen.json"
    source.write_text(json.dumps(records))
    return source


def test_positions_outside_the_slide_are_named_not_white_patches(tmp_path):
    settings = _settings(tmp_path / "store")
    store = Store(settings.store)
    source = _positions_file(tmp_path, [(0, 0), (1000, 1500), (1e7, 1e7), (2000, 0)])
    outcome = _extract(source, settings)
    assert outcome.status == "ok", outcome.error
    record = SlideRecord.model_validate(_record(store, "CMU-1-Small-Region"))
    assert [(p.x, p.y) for p in record.failed_positions] == [(10_000_000, 10_000_000), (2000, 0)]
    assert "leaves the slide (2220 x 2967 px" in record.failed_positions[0].reason
    assert record.kept == 2 and record.counts["rejected"]["outside_slide"] == 2
    assert sorted((r["x"], r["y"]) for r in _rows(store, shard_key("CMU-1-Small-Region"))) == [
        (0, 0),
        (1000, 1500),
    ]

    only_outside = _positions_file(tmp_path, [(1e7, 1e7), (5000, 5000)])
    failed = _extract(only_outside, _settings(tmp_path / "store2"))
    assert failed.status == "failed"
    assert "(10000000, 10000000)" in failed.error and "(5000, 5000)" in failed.error


# -- point 15: an image that cannot be encoded -----------------------------------------------------------------------


def test_png_that_cannot_be_encoded_is_an_error_not_an_empty_file(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module.cv2, "imencode", lambda ext, img: (False, np.zeros(0, np.uint8)))
    settings = _settings(tmp_path / "store")
    outcome = _extract(CMU, settings)
    assert outcome.status == "failed" and "could not be encoded as PNG" in outcome.error
    assert not Store(settings.store).exists(thumbnail_key("CMU-1-Small-Region"))


def test_a_corrupt_slide_json_is_redone_and_the_batch_goes_on(tmp_path):
    """A slide.json that is not JSON (a torn copy, a hand edit) must not stop the slide group: it is redone."""
    settings = _settings(tmp_path / "store")
    assert _extract(CMU, settings).status == "ok"
    store = Store(settings.store, settings.s3)
    slide_id = CMU.stem
    store.write_bytes(slide_json_key(slide_id), b'{"status": "ok", "slide_id": ')
    assert _extract(CMU, settings).status == "ok"
    assert _record(store, slide_id)["status"] == "ok"


# -- review of issue 17: one flag for a checkpoint trained from random, one CUDA cache helper --------------------------


def test_selection_with_a_checkpoint_trained_from_random_says_random_weights(tmp_path):
    """``pathgen evaluate`` calls a PathGen-CLIP checkpoint whose run started from random weights RANDOM WEIGHTS;
    selection with the same checkpoint says so too (the flag of the loaded model), and the guard refuses it."""
    import open_clip
    import torch

    from pathgen.settings import load_settings
    from tasks.clip.spec import ModelSpec, register_model_configs
    from tasks.models import random_weight_models
    from tasks.selection.embedding import load_clip_model

    register_model_configs()
    model = open_clip.create_model("tiny-random")
    checkpoints = tmp_path / "run" / "stage1" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, checkpoints / "epoch_1.pt")
    checkpoint = str(checkpoints / "epoch_1.pt")
    (tmp_path / "run" / "stage1" / "params.txt").write_text("model: tiny-random\npretrained: None\n")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"random_weights": True}))
    loaded = load_clip_model(ModelSpec("tiny-random", checkpoint), "cpu")
    assert loaded.random_weights and loaded.describe()["random_weights"]  # the old code: False
    settings = load_settings(
        overrides={"selection.method": "representative", "embedding.pretrained": checkpoint}, environ={}
    )
    assert any(checkpoint in line for line in random_weight_models(settings, ["extract"]))

    (tmp_path / "run" / "run.json").write_text(json.dumps({"random_weights": False}))
    other = tmp_path / "run" / "stage1" / "checkpoints" / "epoch_2.pt"
    shutil.copy(checkpoint, other)  # another spec: not the model loaded above
    assert not load_clip_model(ModelSpec("tiny-random", str(other)), "cpu").random_weights


def test_one_cuda_cache_helper_serves_selection_and_the_caption_backends():
    import agents.backends
    from pathgen import devices
    from tasks.selection import embedding

    assert agents.backends.empty_cuda_cache is devices.empty_cuda_cache is embedding.empty_cuda_cache
    assert not hasattr(embedding, "_empty_cuda_cache")
    devices.empty_cuda_cache()  # nothing to do without CUDA, and no error
