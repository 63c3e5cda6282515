"""Slide features (tasks/features): every tissue patch through the encoder, the exactly-once contract per slide, the
encoder identity and features hash, and the CLAM/TRIDENT h5 export."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time

import cv2
import h5py
import numpy as np
import pytest
import tifffile

from pathgen.errors import ModelUnavailable
from pathgen.settings import load_settings
from tasks.features import encoder as encoder_module
from tasks.features import extract as features_module
from tasks.features.encoder import encoder_identity, load_encoder, resolve_encoder_spec
from tasks.features.export import FeaturesNotFound, export_h5
from tasks.features.extract import FeatureJob, feature_slide, feature_slides, prefetched
from tasks.features.hashing import features_hash
from tasks.features.store import failed_key, features_key, read_features
from tasks.mil.h5 import read_features_folder
from tasks.slides.sources import resolve_sources
from tasks.slides.tissue import grid_cells, tissue_mask
from tasks.store.objects import Store
from tasks.work.units import PendingWork

from .conftest import write_tiff_slide

MPP = 0.25  # the test slide's scan: features at 0.5 µm/px span 2 x 64 = 128 level-0 px per patch
SIDE0 = 128


@pytest.fixture(scope="module")
def slide_rgb():
    from .conftest import cmu_pixels

    return np.ascontiguousarray(cmu_pixels()[:1024, :1280])


@pytest.fixture
def small_slide(tmp_path, slide_rgb):
    (tmp_path / "slides").mkdir()
    return write_tiff_slide(tmp_path / "slides" / "small.svs", slide_rgb, mpp=MPP)


def _settings(store, **overrides):
    return load_settings(overrides={"store": str(store), "retries.io_retries": 0, **overrides}, environ={})


def _job(settings, spec="tiny-random"):
    identity = encoder_identity(spec)
    loaded = load_encoder(spec, identity, "cpu")
    return FeatureJob(settings, Store(settings.store), loaded, features_hash(settings, identity), logging.getLogger())


def _ref(path, settings):
    (ref,) = resolve_sources([str(path)], settings)
    return ref


def test_every_tissue_patch_is_featured_with_level0_boxes_and_counts(tmp_path, small_slide, slide_rgb):
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    outcome = feature_slide(_ref(small_slide, settings), job)
    assert outcome.status == "ok", outcome.error
    table = read_features(job.store, job.features_hash, "small")
    meta = table.meta
    # the grid of every tissue cell, computed here from the same mask: the rows are those cells minus the rejected
    from tasks.slides.readers import open_slide

    with open_slide(str(small_slide)) as reader:
        overview, downsample = reader.overview(settings.tissue.mask_downsample)
        mask = tissue_mask(overview, downsample, MPP, settings.tissue)
    cells = grid_cells(mask, downsample, (1280, 1024), SIDE0, settings.tissue.threshold)
    counts = meta["counts"]
    assert counts["tissue_cells"] == len(cells) > 20
    assert counts["read"] == len(cells)
    assert len(table.boxes) == counts["kept"] == len(cells) - sum(counts["rejected"].values()) == outcome.items
    assert {tuple(b) for b in table.boxes} <= {c.box for c in cells}
    assert (table.boxes[:, 2:] == SIDE0).all() and table.features.shape == (len(table.boxes), 32)
    assert meta["patch_size_level0"] == SIDE0 and meta["patch_px"] == 64 and meta["mpp"] == 0.5
    assert meta["slide_mpp"] == pytest.approx(MPP) and (meta["width"], meta["height"]) == (1280, 1024)
    assert meta["random_weights"] is True and meta["encoder"]["digest"] == "random-init"
    assert meta["slide_inputs"]["source"]["kind"] == "file" and meta["l2_normalised"] is False
    assert outcome.random_weights is True


def test_features_are_the_encoders_forward_pass_on_each_patch(tmp_path, small_slide):
    """A few rows against open_clip's encode_image on patches cut here from the slide's own level-0 pixels."""
    import torch
    from PIL import Image

    from tasks.clip.spec import ModelSpec
    from tasks.selection.embedding import load_clip_model

    settings = _settings(tmp_path / "store")
    job = _job(settings)
    assert feature_slide(_ref(small_slide, settings), job).status == "ok"
    table = read_features(job.store, job.features_hash, "small")
    level0 = tifffile.TiffFile(small_slide).pages[0].asarray()
    model = load_clip_model(ModelSpec("tiny-random"), "cpu")
    rows = [0, len(table.boxes) // 2, len(table.boxes) - 1]
    patches = []
    for row in rows:
        x, y, w, h = table.boxes[row]
        patch = cv2.resize(level0[y : y + h, x : x + w], (64, 64), interpolation=cv2.INTER_AREA)
        patches.append(model.preprocess(Image.fromarray(patch)))
    with torch.inference_mode():
        expected = model.model.encode_image(torch.stack(patches)).float().numpy()
    np.testing.assert_allclose(table.features[rows], expected, rtol=1e-4, atol=1e-4)
    # raw encode_image output: not L2-normalised
    assert not np.allclose(np.linalg.norm(table.features, axis=1), 1.0, atol=1e-3)


def test_rerun_skips_and_a_changed_source_is_featured_again(tmp_path, small_slide, slide_rgb):
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    ref = _ref(small_slide, settings)
    assert feature_slide(ref, job).status == "ok"
    key = job.store.path(features_key(job.features_hash, "small"))
    written = os.stat(key).st_mtime_ns
    again = feature_slide(_ref(small_slide, settings), job)
    assert (again.status, again.items) == (
        "skipped",
        read_features(job.store, job.features_hash, "small").meta["counts"]["kept"],
    )
    assert os.stat(key).st_mtime_ns == written
    # the file rewritten at the same path (other pixels): redone, and the rows describe the new slide
    time.sleep(0.01)
    write_tiff_slide(small_slide, np.ascontiguousarray(slide_rgb[:, ::-1]), mpp=MPP)
    redone = feature_slide(_ref(small_slide, settings), job)
    assert redone.status == "ok"
    assert os.stat(key).st_mtime_ns != written
    source = read_features(job.store, job.features_hash, "small").meta["slide_inputs"]["source"]
    assert source["mtime_ns"] == os.stat(small_slide).st_mtime_ns


def test_failed_slide_is_recorded_and_final_while_the_others_complete(tmp_path, small_slide, bad_slides):
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    refs = resolve_sources([str(bad_slides["glass"]), str(small_slide)], settings)
    outcomes = {
        o.unit: o for o in feature_slides(refs, settings, "tiny-random", job.encoder.identity, job.features_hash)
    }
    assert outcomes["small"].status == "ok"
    assert outcomes["white-glass"].status == "failed" and "no tissue" in outcomes["white-glass"].error
    record = job.store.read_json(failed_key(job.features_hash, "white-glass"))
    assert record["error"] == outcomes["white-glass"].error and record["slide_inputs"]["source"]["kind"] == "file"
    assert not job.store.exists(features_key(job.features_hash, "white-glass"))
    # final until its inputs change: the next run reports it from the record without reading the slide
    again = feature_slide(_ref(bad_slides["glass"], settings), job)
    assert (again.status, again.error) == ("failed", record["error"])


def test_unreadable_and_mpp_less_slides_fail_with_their_reason(tmp_path, bad_slides):
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    text = feature_slide(_ref(bad_slides["text"], settings), job)
    no_mpp = feature_slide(_ref(bad_slides["no_mpp"], settings), job)
    assert text.status == no_mpp.status == "failed"
    assert "mpp" in no_mpp.error.lower() and job.store.exists(failed_key(job.features_hash, "no-mpp"))


def test_encoder_that_cannot_be_loaded_leaves_slides_pending(tmp_path, small_slide, monkeypatch):
    settings = _settings(tmp_path / "store")
    identity = encoder_identity("tiny-random")
    fhash = features_hash(settings, identity)

    def hub_down(*args, **kwargs):
        raise OSError("Failed to download weights: connection refused")

    monkeypatch.setattr(encoder_module, "load_clip_model", hub_down)
    with pytest.raises(PendingWork) as caught:
        feature_slides([_ref(small_slide, settings)], settings, "tiny-random", identity, fhash)
    assert [o.status for o in caught.value.outcomes] == ["pending"]
    assert isinstance(caught.value.__cause__, ModelUnavailable)
    store = Store(settings.store)
    assert not store.exists(features_key(fhash, "small")) and not store.exists(failed_key(fhash, "small"))


def test_storage_failure_while_committing_leaves_the_slide_pending(tmp_path, small_slide, monkeypatch):
    settings = _settings(tmp_path / "store")
    job = _job(settings)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features_module, "write_features", disk_full)
    outcome = feature_slide(_ref(small_slide, settings), job)
    assert outcome.status == "pending" and "pending" in outcome.error
    assert not job.store.exists(failed_key(job.features_hash, "small"))


def _checkpoint(path, seed):
    import torch

    from tasks.clip.spec import ModelSpec
    from tasks.selection.embedding import load_clip_model

    state = load_clip_model(ModelSpec("tiny-random"), "cpu").model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    torch.save({k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in state.items()}, path)  # fmt: skip


def test_features_hash_follows_the_checkpoint_bytes_and_the_vector_settings(tmp_path):
    checkpoint = tmp_path / "encoder.pt"
    _checkpoint(checkpoint, seed=1)
    spec = f"tiny-random:{checkpoint}"
    base = _settings(tmp_path / "store")
    first = encoder_identity(spec)
    assert first["digest"].startswith("sha256:") and first["random_weights"] is False
    assert (first["image_size"], first["dim"]) == (64, 32)
    before = features_hash(base, first)
    stat = os.stat(checkpoint)
    _checkpoint(checkpoint, seed=2)  # same path, other bytes
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert features_hash(base, encoder_identity(spec)) != before
    _checkpoint(checkpoint, seed=1)  # the first bytes again, at another time: the same features
    assert features_hash(base, encoder_identity(spec)) == before
    moved = tmp_path / "elsewhere.pt"
    os.replace(checkpoint, moved)
    assert features_hash(base, encoder_identity(f"tiny-random:{moved}")) == before

    for key, value in {
        "features.target_mpp": 1.0,
        "tissue.threshold": 0.7,
        "quality.min_sharpness": 50.0,
        "slides.default_mpp": 0.5,
    }.items():
        assert features_hash(_settings(tmp_path / "store", **{key: value}), first) != before, key
    for key, value in {
        "features.batch_size": 3,
        "features.device": "cpu",
        "features.prefetch_batches": 5,
        "features.concurrency": 2,
    }.items():
        assert features_hash(_settings(tmp_path / "store", **{key: value}), first) == before, key
    assert features_hash(base, encoder_identity("tiny-random")) != before


def test_missing_checkpoint_is_model_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable, match="pending"):
        encoder_identity(f"tiny-random:{tmp_path / 'missing.pt'}")


def test_encoder_spec_resolution(tmp_path):
    store = Store(str(tmp_path / "store"))
    assert resolve_encoder_spec(None, store) == "tiny-random"
    assert resolve_encoder_spec("ViT-B-16:openai", store) == "ViT-B-16:openai"
    for stage, epoch in (("stage1", 1), ("stage1", 2), ("stage2", 1)):
        store.write_bytes(f"models/clip/run-a/{stage}/checkpoints/epoch_{epoch}.pt", b"x")
        time.sleep(0.01)
    newest = store.uri("models/clip/run-a/stage2/checkpoints/epoch_1.pt")
    assert resolve_encoder_spec(None, store) == newest
    assert resolve_encoder_spec("run-a", store) == newest
    key = "models/clip/run-a/stage1/checkpoints/epoch_2.pt"
    assert resolve_encoder_spec(key, store) == store.uri(key)


def test_export_h5_reads_back_as_clam_reads_it(tmp_path, small_slide):
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    store = job.store
    with pytest.raises(FeaturesNotFound, match="pathgen features"):
        export_h5(store, None, str(tmp_path / "none"))
    assert feature_slide(_ref(small_slide, settings), job).status == "ok"
    from flows.features import write_manifest

    write_manifest(store, settings, job.encoder.identity, job.features_hash)
    (path,) = export_h5(store, None, str(tmp_path / "h5"))
    table = read_features(store, job.features_hash, "small")
    with h5py.File(path, "r") as f:  # CLAM: dataset_modules/dataset_generic.py and dataset_h5.py
        features, coords = f["features"][:], f["coords"][:]
        assert f["coords"].attrs["patch_size"] == SIDE0 and f["coords"].attrs["patch_level"] == 0
        assert f["coords"].attrs["patch_size_level0"] == SIDE0 and f.attrs["mpp"] == 0.5
        assert json.loads(f.attrs["encoder_identity"])["digest"] == "random-init" and f.attrs["random_weights"]
    np.testing.assert_array_equal(features, table.features)
    np.testing.assert_array_equal(coords, table.boxes[:, :2])
    folder = read_features_folder(tmp_path / "h5")
    assert list(folder) == ["small"] and folder["small"].features.shape == table.features.shape
    write_manifest(store, _settings(tmp_path / "store", **{"features.target_mpp": 1.0}), job.encoder.identity, "0" * 16)
    with pytest.raises(FeaturesNotFound, match=job.features_hash):
        export_h5(store, None, str(tmp_path / "several"))
    with pytest.raises(FeaturesNotFound, match="holds no features"):
        export_h5(store, "f" * 16, str(tmp_path / "wrong"))


def test_prefetch_is_bounded_raises_the_producers_error_and_stops_with_the_consumer():
    made = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise OSError("read failed")
            made.append(i)
            yield i

    stream = prefetched(items(100), depth=2)
    assert next(stream) == 0
    time.sleep(0.3)
    assert len(made) <= 4  # one handed over, two queued, one waiting to be queued
    stream.close()  # the consumer stops early: the producer thread ends
    assert not [t for t in threading.enumerate() if t.name == "pathgen-features-read"]
    assert list(prefetched(items(5), depth=1)) == [0, 1, 2, 3, 4]
    with pytest.raises(OSError, match="read failed"):
        list(prefetched(items(5, fail_at=3), depth=2))


def test_checkpoint_in_s3_is_known_by_its_bytes(tmp_path, bucket, monkeypatch):
    """An S3 checkpoint is fetched once per ETag into the cache; its digest is the sha256 of its bytes."""
    import hashlib

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the checkpoint cache lives under ~/.cache/pathgen
    store = Store(bucket)
    local = tmp_path / "encoder.pt"
    _checkpoint(local, seed=1)
    store.write_bytes("models/encoder.pt", local.read_bytes())
    spec = f"tiny-random:{store.uri('models/encoder.pt')}"
    first = encoder_identity(spec)
    assert first["digest"] == "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()
    assert first["pretrained"] == store.uri("models/encoder.pt") and first["random_weights"] is False
    _checkpoint(local, seed=2)
    store.write_bytes("models/encoder.pt", local.read_bytes())  # same key, other bytes: another ETag
    assert encoder_identity(spec)["digest"] == "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()


def test_a_changed_slide_that_fails_loses_its_outdated_features(tmp_path, small_slide, slide_rgb):
    """Features of the slide's earlier content must not stay for a MIL task to train on once the file changed."""
    settings = _settings(tmp_path / "store")
    job = _job(settings)
    assert feature_slide(_ref(small_slide, settings), job).status == "ok"
    time.sleep(0.01)
    write_tiff_slide(small_slide, np.full_like(slide_rgb, 245), mpp=MPP)  # now glass: no tissue
    failed = feature_slide(_ref(small_slide, settings), job)
    assert failed.status == "failed" and "no tissue" in failed.error
    assert job.store.exists(failed_key(job.features_hash, "small"))
    assert not job.store.exists(features_key(job.features_hash, "small"))


def test_encoder_identity_never_holds_credentials_of_a_checkpoint_url(monkeypatch):
    """NAME:URL is not a URL itself: the identity (written into every file's metadata) must still hide its secret."""
    monkeypatch.setattr(encoder_module, "_weights_digest", lambda parsed: "sha256:x")
    monkeypatch.setattr(encoder_module, "_shape", lambda parsed: (224, 512))
    identity = encoder_identity("ViT-B-16:s3://AKIAKEY:s3cr3t@minio.local/bucket/epoch_2.pt")
    assert "s3cr3t" not in json.dumps(identity) and "AKIAKEY" not in json.dumps(identity)
    assert identity["spec"] == "ViT-B-16:s3://***@minio.local/bucket/epoch_2.pt"
