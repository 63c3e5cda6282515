"""Representative selection with the tiny random-weight open_clip model (built here, never downloaded)."""

import json
import logging

import numpy as np
import torch

from pathgen.settings import EmbeddingSettings, load_settings
from tasks.selection.embedding import PatchEmbedder, load_embedding_model
from tasks.selection.representative import ATTRIBUTES, FINDINGS, cluster_count, kmeans, select_representative
from tasks.selection.retrieval import load_prompts, prompts_for
from tasks.slides.extract import extract_slide, selection_key, shard_key, slide_json_key
from tasks.slides.record import SlideRecord
from tasks.slides.shard import read_shard
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store

from .conftest import CMU


def _blobs(n_per: int, centres: int, dim: int = 16, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = np.repeat(c, n_per, axis=0) + spread * rng.normal(size=(centres * n_per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _select(x, **kw):
    args = dict(max_per_slide=256, top_k=0, duplicate_threshold=0.88, seed=0)
    args.update(kw)
    return select_representative(x, kw.pop("attributes", None), None, **args)


def test_k_follows_the_paper_rule():
    assert cluster_count(0) == 0
    assert cluster_count(1) == 1
    assert cluster_count(128) == 2  # ceil(sqrt(1.6))
    assert cluster_count(10_000) == 12  # ceil(sqrt(125))
    assert cluster_count(50_000) == 25
    assert cluster_count(50_000, fixed=7) == 7 and cluster_count(3, fixed=7) == 3
    assert cluster_count(1000, factor=6.4) == 8  # ceil(sqrt(50))


def test_kmeans_separates_blobs_and_is_seeded():
    x = _blobs(50, 4, spread=0.01)
    labels, _ = kmeans(x, 4, seed=1)
    assert sorted(np.bincount(labels)) == [50, 50, 50, 50]
    assert all(len(set(labels[i * 50 : (i + 1) * 50])) == 1 for i in range(4))
    assert np.array_equal(kmeans(x, 4, seed=1)[0], labels)


def test_cap_is_kept_and_every_cluster_gets_its_share():
    x = _blobs(200, 8, spread=0.6)
    sel = select_representative(x, None, None, max_per_slide=40, top_k=0, duplicate_threshold=0.999, seed=0, clusters=8)
    assert len(sel.indices) == 40 and sel.k == 8
    per_cluster = np.bincount(sel.labels[sel.indices], minlength=8)
    assert per_cluster.min() == per_cluster.max() == 5
    assert all(r[0].startswith("cluster:") for r in sel.reasons.values())


def test_selection_is_deterministic_under_a_seed():
    x = _blobs(300, 5, spread=0.5)
    scores = x @ x[0]
    a = select_representative(x, scores, None, max_per_slide=30, top_k=5, duplicate_threshold=0.95, seed=3)
    b = select_representative(x, scores, None, max_per_slide=30, top_k=5, duplicate_threshold=0.95, seed=3)
    c = select_representative(x, scores, None, max_per_slide=30, top_k=5, duplicate_threshold=0.95, seed=4)
    assert a.indices == b.indices and a.reasons == b.reasons
    assert a.indices != c.indices


def test_fewer_candidates_than_the_cap_keep_what_survives_the_filter():
    distinct = _blobs(1, 25, dim=64, seed=2)  # 25 unrelated directions
    x = np.concatenate([distinct, np.repeat(distinct[:1], 5, axis=0)])  # plus 5 exact copies of the first
    sel = select_representative(x, None, None, max_per_slide=256, top_k=0, duplicate_threshold=0.88, seed=0)
    assert len(sel.indices) == 25 and sel.dropped_duplicates == 5


def test_identical_patches_collapse_to_one_with_the_tiny_model(cmu_rgb):
    model = load_embedding_model(EmbeddingSettings())
    a = np.ascontiguousarray(cmu_rgb[1400:1624, 700:924])
    b = np.ascontiguousarray(cmu_rgb[2400:2624, 1500:1724])
    embedder = PatchEmbedder(model, batch_size=4)
    for patch in [a] * 6 + [b] * 6:
        embedder.add(patch)
    x = embedder.finish()
    assert x.shape == (12, 32) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.allclose(x[:6], x[0], atol=1e-6) and not np.allclose(x[0], x[6], atol=1e-3)
    sel = select_representative(x, None, None, max_per_slide=256, top_k=0, duplicate_threshold=0.9999, seed=0)
    assert len(sel.indices) == 2 and sel.dropped_duplicates == 10
    assert {i // 6 for i in sel.indices} == {0, 1}


def test_retrieval_picks_come_first_and_are_marked():
    x = _blobs(100, 4, spread=0.5)
    attributes = np.zeros(len(x), np.float32)
    attributes[[5, 150, 300]] = 1.0
    findings = np.zeros(len(x), np.float32)
    findings[[7]] = 2.0
    sel = select_representative(x, attributes, findings, max_per_slide=20, top_k=3, duplicate_threshold=0.999, seed=0)
    assert sel.indices[:3] == [5, 150, 300]
    assert ATTRIBUTES in sel.reasons[5] and FINDINGS in sel.reasons[7]
    assert sel.picks["attributes"] == 3 and sel.picks["findings"] >= 1


def test_out_of_memory_halves_the_batch_and_finishes(cmu_rgb, caplog):
    model = load_embedding_model(EmbeddingSettings())
    real = model.model.encode_image

    def limited(batch):
        if batch.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    model.model.encode_image = limited
    try:
        embedder = PatchEmbedder(model, batch_size=16)
        with caplog.at_level(logging.WARNING):
            for i in range(20):
                embedder.add(np.ascontiguousarray(cmu_rgb[i * 100 : i * 100 + 64, 800:864]))
            out = embedder.finish()
    finally:
        model.model.encode_image = real
    assert out.shape == (20, 32) and embedder.batch_size == 4
    assert "batch size halved to 4" in caplog.text


def test_prompts_cover_32_projects_and_unknown_falls_back(caplog):
    prompts = load_prompts()
    projects = [p for p in prompts if p.startswith("TCGA-")]
    assert len(projects) == 32 and all(len(prompts[p]) == 20 for p in projects)
    assert prompts_for("s", "BRCA").project == "TCGA-BRCA"
    with caplog.at_level(logging.WARNING):
        fallback = prompts_for("s", "TCGA-NOPE")
    assert fallback.project == "generic" and "TCGA-NOPE" in caplog.text


def _extract(tmp_path, name, **overrides):
    settings = load_settings(
        overrides={"store": str(tmp_path / name), "patch.patch_px": 224, "selection.max_per_slide": 24, **overrides},
        environ={},
    )
    store = Store(settings.store)
    outcome = extract_slide(resolve_sources([str(CMU)], settings)[0], settings, store)
    assert outcome.status == "ok", outcome.error
    with store.open(shard_key(CMU.stem)) as handle:
        table = read_shard(handle)
    record = store.read_json(slide_json_key(CMU.stem))
    assert SlideRecord.model_validate(record) == outcome.record  # the typed record is what slide.json holds
    return record, table, store


def test_extract_selects_representatively_by_default(tmp_path):
    record, table, store = _extract(tmp_path, "a")
    selection = record["selection"]
    assert selection["method"] == "representative" and record["random_weights"] is True
    assert selection["candidates"] == record["counts"]["candidates"] > 24
    assert selection["k"] == cluster_count(selection["candidates"]) and selection["K"] == 16
    assert selection["duplicate_threshold"] == 0.88 and selection["embedding"]["model"] == "tiny-random"
    assert selection["duplicate_filter"].startswith("skipped")
    assert table.num_rows == 24 == record["counts"]["kept"]
    rows = table.to_pylist()
    assert all(r["selected_by"] and r["cluster"] is not None and len(r["embedding"]) == 32 for r in rows)
    assert sum(ATTRIBUTES in r["selected_by"] for r in rows) == 16
    assert store.exists(selection_key(CMU.stem))
    _, again, _ = _extract(tmp_path, "b")
    assert again["patch_id"].to_pylist() == table["patch_id"].to_pylist()


def test_retrieval_picks_move_when_the_prompts_change(tmp_path):
    picks = []
    for i, sentences in enumerate([["Dense sheets of keratinocytes."], ["Loose adipose tissue with vessels."]]):
        prompts = tmp_path / f"prompts{i}.yaml"
        prompts.write_text(json.dumps({"projects": {"SKIN-DEMO": sentences}}))
        _, table, _ = _extract(
            tmp_path,
            f"p{i}",
            **{"selection.prompts_file": str(prompts), "slides.project": "SKIN-DEMO", "selection.retrieval_top_k": 4},
        )
        picks.append({r["patch_id"] for r in table.to_pylist() if ATTRIBUTES in r["selected_by"]})
    assert len(picks[0]) == len(picks[1]) == 4
    assert picks[0] != picks[1]


def test_findings_and_a_local_checkpoint(tmp_path):
    model = load_embedding_model(EmbeddingSettings())
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.model.state_dict(), checkpoint)
    findings = tmp_path / "findings.json"
    findings.write_text(json.dumps({CMU.stem: ["Squamous epithelium with keratinization.", "Dermal collagen."]}))
    record, table, _ = _extract(
        tmp_path,
        "f",
        **{
            "selection.findings_file": str(findings),
            "embedding.model": "tiny-random",
            "embedding.pretrained": str(checkpoint),
        },
    )
    assert record["random_weights"] is False  # a checkpoint the user named: the factory cannot know it is noise
    assert record["selection"]["embedding"]["pretrained"] == str(checkpoint)
    assert record["selection"]["prompts"]["findings"] == 2
    assert any(FINDINGS in r["selected_by"] for r in table.to_pylist())


def test_large_slides_re_read_the_chosen_patches_and_get_the_same_shard(tmp_path, monkeypatch):
    import tasks.slides.passes as passes

    few = {"selection.max_per_slide": 8}  # 46 candidates > 3 x 8: chosen patches are read again
    record, reread, _ = _extract(tmp_path, "reread", **few)
    assert record["counts"]["read"] == record["counts"]["candidates"] + 8
    monkeypatch.setattr(passes, "REREAD_FACTOR", 100)  # now encoded during the first pass
    record, encoded, _ = _extract(tmp_path, "encoded", **few)
    assert record["counts"]["read"] == record["counts"]["candidates"]
    assert reread["patch_id"].to_pylist() == encoded["patch_id"].to_pylist()
    assert reread["image"].to_pylist() == encoded["image"].to_pylist()
