import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pathgen.settings import load_settings
from tasks.slides import extract as extract_module
from tasks.slides import passes as passes_module
from tasks.slides.extract import extract_slide, shard_key, slide_json_key, thumbnail_key
from tasks.slides.hashing import slide_extraction_hash
from tasks.slides.record import SlideRecord
from tasks.slides.shard import SCHEMA_VERSION, patch_id_for, read_shard
from tasks.slides.sources import resolve_sources, source_identity
from tasks.store.objects import Store

from .conftest import CMU, DAPI


def _settings(store, **overrides):
    base = {"store": str(store), "retries.io_retries": 0, "patch.patch_px": 224}
    base.update(overrides)
    return load_settings(overrides=base, environ={})


def _run(path, settings):
    store = Store(settings.store)
    (ref,) = resolve_sources([str(path)], settings)
    return extract_slide(ref, settings, store), store


def test_cmu_patches_thumbnail_and_slide_json(tmp_path):
    settings = _settings(tmp_path / "store", **{"selection.method": "all"})
    outcome, store = _run(CMU, settings)
    assert outcome.status == "ok", outcome.error
    record = store.read_json(slide_json_key("CMU-1-Small-Region"))
    assert record["status"] == "ok" and record["error"] is None
    assert record["vendor"] == "aperio" and record["width"] == 2220 and record["height"] == 2967
    assert record["mpp"] == pytest.approx(0.499) and record["mpp_source"] == "metadata"
    assert record["levels"][0]["downsample"] == 1.0
    assert record["counts"]["kept"] == outcome.patches > 20
    assert record["seconds"]["total"] > 0 and record["source_uri"].endswith("CMU-1-Small-Region.svs")
    assert SlideRecord.model_validate(record) == outcome.record and outcome.record.kept == outcome.patches
    (ref,) = resolve_sources([str(CMU)], settings)
    assert record["extraction_hash"] == slide_extraction_hash(ref, settings, source_identity(ref, settings))
    assert store.exists(thumbnail_key("CMU-1-Small-Region"))

    with store.open(shard_key("CMU-1-Small-Region")) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        meta = shard.schema_arrow.metadata
        table = shard.read()
    assert meta[b"pathgen.schema_version"].decode() == SCHEMA_VERSION
    assert meta[b"pathgen.extraction_hash"].decode() == record["extraction_hash"]
    assert table.num_rows == outcome.patches
    row = table.slice(0, 1).to_pylist()[0]
    assert row["patch_id"] == patch_id_for("CMU-1-Small-Region", (row["x"], row["y"], row["w0"], row["h0"]), 0.5, 224)
    assert row["w0"] == row["h0"] == round(224 * 0.5 / 0.499)
    assert row["tissue_fraction"] >= 0.5 and row["selected_by"] == ["all"]
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "JPEG" and image.size == (224, 224)
    assert len(set(table["patch_id"].to_pylist())) == table.num_rows


def test_random_selection_is_capped_and_deterministic(tmp_path):
    capped = {"selection.method": "random", "selection.max_per_slide": 7, "selection.seed": 3}
    a, store_a = _run(CMU, _settings(tmp_path / "a", **capped))
    b, store_b = _run(CMU, _settings(tmp_path / "b", **capped))
    c, store_c = _run(CMU, _settings(tmp_path / "c", **{**capped, "selection.seed": 4}))
    ids = []
    for store in (store_a, store_b, store_c):
        with store.open(shard_key("CMU-1-Small-Region")) as handle:
            ids.append(read_shard(handle)["patch_id"].to_pylist())
    assert a.patches == 7 and len(ids[0]) == 7
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_rerun_skips_a_committed_slide_and_new_settings_redo_it(tmp_path):
    settings = _settings(tmp_path / "store")
    first, store = _run(CMU, settings)
    again, _ = _run(CMU, settings)
    assert (first.status, again.status) == ("ok", "skipped")
    assert again.patches == first.patches
    changed, _ = _run(CMU, _settings(tmp_path / "store", **{"patch.patch_px": 256}))
    assert changed.status == "ok"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated"),
        ("zero", "zero-byte"),
        ("text", "not a readable whole-slide image"),
        ("glass", "no tissue found"),
        ("no_mpp", "default_mpp"),
        ("missing", "does not exist"),
    ],
)
def test_bad_input_becomes_a_failed_record_without_a_shard(tmp_path, bad_slides, kind, message):
    settings = _settings(tmp_path / "store")
    outcome, store = _run(bad_slides[kind], settings)
    assert outcome.status == "failed"
    record = store.read_json(slide_json_key(bad_slides[kind].stem))
    assert record["status"] == "failed" and message in record["error"]
    assert not store.exists(shard_key(bad_slides[kind].stem))
    assert store.list("patches") == []


def test_fluorescence_slide_says_no_bright_field_tissue(tmp_path):
    outcome, store = _run(DAPI, _settings(tmp_path / "store"))
    assert outcome.status == "failed"
    record = store.read_json(slide_json_key(DAPI.stem))
    assert "no bright-field tissue" in record["error"] and record["vendor"] == "hamamatsu"


def test_default_mpp_and_per_slide_override_rescue_a_slide_without_mpp(tmp_path, bad_slides):
    path = bad_slides["no_mpp"]
    ok, store = _run(path, _settings(tmp_path / "a", **{"slides.default_mpp": 0.5}))
    assert ok.status == "ok" and store.read_json(slide_json_key(path.stem))["mpp_source"] == "default_mpp"
    ok, store = _run(path, _settings(tmp_path / "b", **{"slides.mpp_overrides": {path.stem: 0.25}}))
    record = store.read_json(slide_json_key(path.stem))
    assert ok.status == "ok" and record["mpp"] == 0.25 and record["mpp_source"] == "mpp_overrides"


def test_a_crash_mid_shard_leaves_no_partial_shard(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = passes_module.score_patch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash in the middle of a shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(passes_module, "score_patch", flaky)
    outcome, store = _run(CMU, _settings(tmp_path / "store", **{"selection.method": "all"}))
    assert outcome.status == "failed" and "simulated crash" in outcome.error
    assert not store.exists(shard_key("CMU-1-Small-Region"))
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name != "slide.json"]
    assert leftovers == []


def test_transient_errors_are_retried_then_left_pending(tmp_path, monkeypatch):
    attempts = {"n": 0}

    real_open = extract_module.open_slide

    def flaky_open(*args, **kwargs):
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionResetError(104, "connection reset by peer")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(extract_module, "open_slide", flaky_open)
    settings = _settings(tmp_path / "store", **{"retries.io_retries": 3, "retries.backoff_seconds": 0.01})
    outcome, _ = _run(CMU, settings)
    assert outcome.status == "ok" and attempts["n"] == 3

    attempts["n"] = -100
    settings = _settings(tmp_path / "other", **{"retries.io_retries": 2, "retries.backoff_seconds": 0.01})
    outcome, store = _run(CMU, settings)
    # Storage that stays down is infrastructure, not the slide: nothing is written, the next run does the slide.
    assert outcome.status == "pending" and outcome.record is None
    assert "after 3 attempts" in outcome.error and "check that the storage endpoint is up" in outcome.error
    assert attempts["n"] == -97
    assert not store.exists(slide_json_key("CMU-1-Small-Region")) and not store.exists(shard_key("CMU-1-Small-Region"))


def test_pathgen_json_positions_are_re_extracted_exactly(tmp_path):
    positions = [(100, 200), (900, 1500), (1300, 2100)]
    records = [
        {"wsi_id": "CMU-1-Small-Region", "position": [str(x), str(y)], "caption": f"caption {i}", "file_id": "f-1"}
        for i, (x, y) in enumerate(positions)
    ]
    records.append({"wsi_id": "TCGA-XX-0000-01Z-00-DX1.ABC", "position": ["1", "2"], "caption": "gone"})
    source = tmp_path / "pathgen.json"
    source.write_text(json.dumps(records))
    settings = _settings(tmp_path / "store", **{"slides.roots": [str(CMU.parent)], "patch.patch_px": 672})
    store = Store(settings.store)
    refs = resolve_sources([str(source)], settings)
    assert [r.slide_id for r in refs] == ["CMU-1-Small-Region", "TCGA-XX-0000-01Z-00-DX1.ABC"]
    outcomes = [extract_slide(r, settings, store) for r in refs]
    assert outcomes[0].status == "ok" and outcomes[0].patches == 3
    assert outcomes[1].status == "failed" and "was not found under" in outcomes[1].error
    with store.open(shard_key("CMU-1-Small-Region")) as handle:
        table = read_shard(handle)
    assert sorted(zip(table["x"].to_pylist(), table["y"].to_pylist(), strict=True)) == positions
    assert set(table["w0"].to_pylist()) == {672} and sorted(table["source_caption"].to_pylist())[0] == "caption 0"
    import io

    import openslide
    from PIL import Image

    row = table.slice(0, 1).to_pylist()[0]
    with openslide.OpenSlide(str(CMU)) as slide:
        expected = np.asarray(slide.read_region((row["x"], row["y"]), 0, (672, 672)).convert("RGB")).astype(int)
    got = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
    in_image = (slice(0, 2967 - row["y"]), slice(0, 2220 - row["x"]))
    assert np.abs(got[in_image] - expected[in_image]).mean() < 3  # JPEG round trip only
