"""Reviews of pairs (tasks/reviews): the record and its checks, the append-only file per slide, concurrent reviewers
(threads and processes, on file:// and on SeaweedFS S3) losing nothing, the exports applying or ignoring the reviews
with the counts in their provenance, and review coverage in the store report."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.reviews.store import (
    REJECT_REASONS,
    Review,
    apply_reviews,
    load_reviews,
    load_slide_reviews,
    review_history,
    review_key,
    save_review,
)
from tasks.store.objects import Store

ROOT = Path(__file__).resolve().parents[1]
HASH = "abc123def456"
SLIDES = {"slide-a": 4, "slide-b": 4}


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 100, 150)).save(out, "JPEG")
    return out.getvalue()


def _pair_store(root: Path) -> Store:
    """Two slides of four pairs each under pairs/HASH/, written directly (the columns the exports read)."""
    store = Store(str(root))
    for slide_id, count in SLIDES.items():
        rows = [
            {"patch_id": f"{slide_id}-p{i}", "slide_id": slide_id, "x": 224 * i, "y": 0, "caption": f"caption {i}",
             "caption_tokens": 3, "image": _jpeg(40 * i), "random_weights": True, "agents_hash": HASH}
            for i in range(count)
        ]  # fmt: skip
        meta = {b"pathgen.commit_id": f"{slide_id}-commit-1".encode()}
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata(meta), sink)
        store.write_bytes(f"pairs/{HASH}/{slide_id}.parquet", sink.getvalue())
    return store


def _review(patch_id: str, verdict: str, reviewer: str = "ann", **fields) -> Review:
    return Review(patch_id=patch_id, verdict=verdict, reviewer=reviewer, **fields)


def _reviewed(store: Store) -> None:
    """slide-a: p0 accepted, p1 rejected, p2 corrected (after an earlier reject of it); slide-b untouched."""
    save_review(store, HASH, "slide-a", _review("slide-a-p0", "accept"))
    save_review(store, HASH, "slide-a", _review("slide-a-p1", "reject", reason="hallucinated finding: no necrosis"))
    save_review(store, HASH, "slide-a", _review("slide-a-p2", "reject", reason="not informative"))
    save_review(store, HASH, "slide-a", _review("slide-a-p2", "correct", "bob", caption="<b>Tumour</b> & stroma"))


# -- the record ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"verdict": "reject"}, "needs a reason, one of wrong tissue"),
        ({"verdict": "reject", "reason": "looks odd"}, "needs a reason"),
        ({"verdict": "reject", "reason": "other"}, "'other' needs free text"),
        ({"verdict": "correct"}, "needs the corrected caption"),
        ({"verdict": "accept", "caption": "x"}, "only a 'correct' review carries a caption"),
        ({"verdict": "maybe"}, "'accept', 'reject' or 'correct'"),
        ({"verdict": "accept", "patch_id": "../../etc"}, "is not a patch id"),
        ({"verdict": "accept", "time": dt.datetime(2026, 1, 1)}, "must carry a timezone"),
        ({"verdict": "accept", "reviewer": "  "}, "reviewer"),
    ],
)
def test_a_review_that_cannot_count_is_refused_with_the_fix(fields, says):
    with pytest.raises(ValueError, match=says):
        Review.model_validate({"patch_id": "p1", "reviewer": "ann"} | fields)


def test_listed_reasons_with_free_text_are_taken():
    assert "other" in REJECT_REASONS
    review = _review("p1", "reject", reason="Other: pen mark over the nuclei")
    assert review.reason == "Other: pen mark over the nuclei"
    assert _review("p1", "reject", reason="wrong tissue").time.tzinfo == dt.UTC


@pytest.mark.parametrize("slide_id", ["..", "../x", "a/b", ".hidden", ""])
def test_a_slide_id_that_names_another_path_never_becomes_a_key(tmp_path, slide_id):
    with pytest.raises(ValueError, match="cannot name a review file"):
        save_review(Store(str(tmp_path)), HASH, slide_id, _review("p1", "accept"))
    with pytest.raises(ValueError, match="is not one"):
        review_key("../x", "slide-a")
    assert not any(tmp_path.rglob("*.parquet"))


# -- the file ------------------------------------------------------------------------------------------------------


def test_every_review_is_kept_and_the_latest_counts(tmp_path):
    store = _pair_store(tmp_path)
    _reviewed(store)
    key = review_key(HASH, "slide-a")
    assert key == f"reviews/{HASH}/slide-a.parquet" and store.list(f"reviews/{HASH}", ".parquet") == [key]
    table = pq.read_table(store.path(key))
    assert table.column_names[:6] == ["patch_id", "verdict", "reason", "caption", "reviewer", "time"]
    assert table.num_rows == 4 and table.schema.field("time").type == pa.timestamp("us", tz="UTC")
    history = review_history(store, HASH, "slide-a")
    assert [(r.patch_id, r.verdict) for r in history][-2:] == [("slide-a-p2", "reject"), ("slide-a-p2", "correct")]
    latest = load_slide_reviews(store, HASH, "slide-a")
    assert {p: r.verdict for p, r in latest.items()} == {
        "slide-a-p0": "accept", "slide-a-p1": "reject", "slide-a-p2": "correct",
    }  # fmt: skip
    assert latest["slide-a-p2"].caption == "<b>Tumour</b> & stroma" and latest["slide-a-p2"].reviewer == "bob"
    assert load_reviews(store, HASH) == latest
    assert review_history(store, HASH, "slide-b") == []


def test_an_unreadable_review_file_is_named_and_the_others_still_load(tmp_path):
    store = _pair_store(tmp_path)
    _reviewed(store)
    store.write_bytes(review_key(HASH, "slide-b"), b"not parquet")
    problems: list[str] = []
    assert set(load_reviews(store, HASH, problems)) == {"slide-a-p0", "slide-a-p1", "slide-a-p2"}
    assert problems and "slide-b.parquet is not a Parquet review file" in problems[0]
    with pytest.raises(ValueError, match="move it aside"):
        save_review(store, HASH, "slide-b", _review("slide-b-p0", "accept"))


def test_apply_drops_rejected_and_swaps_corrected_captions():
    pairs = [{"patch_id": f"p{i}", "caption": f"c{i}", "caption_tokens": 2} for i in range(4)]
    reviews = {
        "p0": _review("p0", "accept"),
        "p1": _review("p1", "reject", reason="wrong tissue"),
        "p2": _review("p2", "correct", caption="fixed"),
    }
    kept, counts = apply_reviews(pairs, reviews, "apply")
    assert [(p["patch_id"], p["caption"]) for p in kept] == [("p0", "c0"), ("p2", "fixed"), ("p3", "c3")]
    assert kept[1]["caption_tokens"] is None and kept[1]["review"] == "correct"
    assert counts == {"reviewed": 3, "accepted": 1, "rejected": 1, "corrected": 1}
    same, ignored = apply_reviews(pairs, reviews, "ignore")
    assert same == pairs and ignored == counts
    with pytest.raises(ValueError, match="export.reviews must be one of apply, ignore"):
        apply_reviews(pairs, reviews, "drop")


# -- concurrent reviewers ------------------------------------------------------------------------------------------

WORKER = """
import sys
from tasks.reviews.store import Review, save_review
from tasks.store.objects import Store
store, tag, count = Store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(count):
    review = Review(patch_id=f"slide-a-p{i % 4}", verdict="accept", reviewer=tag, review_id=f"{tag}-{i}")
    save_review(store, "HASH", "slide-a", review)
""".replace("HASH", HASH)


def _review_at_once(store_url: str, processes: int = 2, per_process: int = 8, threads: int = 4, per_thread: int = 4):
    """Reviewers of one slide at once: ``processes`` processes and ``threads`` threads of this one."""
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, store_url, f"proc{n}", str(per_process)], cwd=ROOT)
        for n in range(processes)
    ]
    store = Store(store_url)
    errors: list[BaseException] = []

    def reviewer(tag: str) -> None:
        try:
            for i in range(per_thread):
                review = _review(f"slide-a-p{i % 4}", "accept", tag, review_id=f"{tag}-{i}")
                save_review(store, HASH, "slide-a", review)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=reviewer, args=(f"thread{n}",)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert [worker.wait(timeout=120) for worker in workers] == [0] * processes
    assert not errors, errors
    wanted = {f"proc{n}-{i}" for n in range(processes) for i in range(per_process)}
    wanted |= {f"thread{n}-{i}" for n in range(threads) for i in range(per_thread)}
    found = [review.review_id for review in review_history(store, HASH, "slide-a")]
    assert sorted(found) == sorted(wanted), f"lost: {sorted(wanted - set(found))}"


def test_concurrent_reviewers_lose_nothing_on_a_local_store(tmp_path):
    _review_at_once(str(tmp_path / "store"))
    assert not [p.name for p in (tmp_path / "store" / "reviews" / HASH).iterdir() if p.name.endswith(".tmp")]


def test_concurrent_reviewers_lose_nothing_on_seaweedfs(bucket):
    from tasks.reviews.store import _conditional_writes

    store = Store(bucket)
    store.check()
    # SeaweedFS enforces If-None-Match / If-Match on PutObject: the compare-and-swap path is the one tested here.
    assert _conditional_writes(store) is True
    _review_at_once(bucket)
    assert store.list("reviews", ".parquet") == [review_key(HASH, "slide-a")]
    assert [k for k in store.list("reviews") if "probe" in k] == []


def test_a_server_without_conditional_writes_still_commits_by_verifying(bucket, monkeypatch):
    import tasks.reviews.store as reviews_store

    store = Store(bucket)
    store.check()
    monkeypatch.setattr(reviews_store, "_conditional_writes", lambda store: False)
    for n in range(3):
        save_review(store, HASH, "slide-a", _review(f"slide-a-p{n}", "accept"))
    assert len(review_history(store, HASH, "slide-a")) == 3


# -- exports -------------------------------------------------------------------------------------------------------


def test_pathgen_json_applies_reviews_by_default_and_counts_them(tmp_path):
    from tasks.captions.export import export_pathgen_json, provenance_path

    store = _pair_store(tmp_path / "store")
    _reviewed(store)
    out = tmp_path / "pairs.json"
    assert export_pathgen_json(store, out) == 7
    records = json.loads(out.read_text())
    captions = {(r["wsi_id"], r["position"][0]): r["caption"] for r in records}
    assert ("slide-a", "224") not in captions and captions[("slide-a", "448")] == "<b>Tumour</b> & stroma"
    reviews = json.loads(provenance_path(out).read_text())["reviews"]
    assert reviews == {"mode": "apply", "pairs_read": 8, "reviewed": 3, "accepted": 1, "rejected": 1,
                       "corrected": 1, "left_out": 1, "captions_corrected": 1}  # fmt: skip

    assert export_pathgen_json(store, out, reviews="ignore") == 8
    assert {r["caption"] for r in json.loads(out.read_text())} == {f"caption {i}" for i in range(4)}
    ignored = json.loads(provenance_path(out).read_text())["reviews"]
    assert ignored["mode"] == "ignore" and ignored["rejected"] == 1 and ignored["left_out"] == 0


def test_an_unreadable_review_file_stops_an_applying_export_and_names_the_way_around(tmp_path):
    from tasks.captions.export import export_pathgen_json

    store = _pair_store(tmp_path / "store")
    store.write_bytes(review_key(HASH, "slide-b"), b"not parquet")
    with pytest.raises(ValueError, match="slide-b.parquet is not a Parquet review file.*export.reviews=ignore"):
        export_pathgen_json(store, tmp_path / "pairs.json")
    assert export_pathgen_json(store, tmp_path / "pairs.json", reviews="ignore") == 8


def _tar_captions(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name[:-4]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}


def test_webdataset_applies_reviews_and_rewrites_a_slide_whose_reviews_changed(tmp_path):
    from tasks.clip.webdataset import export_pairs

    store = _pair_store(tmp_path / "store")
    _reviewed(store)
    out = tmp_path / "wds"
    summary = export_pairs(store, HASH, out, 0.0)
    assert summary.pairs == 7 and summary.written == 2
    assert summary.reviews == {"mode": "apply", "pairs_read": 8, "reviewed": 3, "accepted": 1, "rejected": 1,
                               "corrected": 1, "left_out": 1, "captions_corrected": 1}  # fmt: skip
    captions = _tar_captions(out / "slide-a.tar")
    assert set(captions) == {"slide-a-p0", "slide-a-p2", "slide-a-p3"}
    assert captions["slide-a-p2"] == "<b>Tumour</b> & stroma"
    assert json.loads((out / "manifest.json").read_text())["reviews"]["rejected"] == 1

    assert export_pairs(store, HASH, out, 0.0).written == 0  # nothing changed: nothing rewritten
    save_review(store, HASH, "slide-b", _review("slide-b-p3", "reject", reason="wrong stain/artefact"))
    again = export_pairs(store, HASH, out, 0.0)
    assert again.written == 1 and again.pairs == 6 and again.reviews["rejected"] == 2
    assert "slide-b-p3" not in _tar_captions(out / "slide-b.tar")

    ignored = export_pairs(store, HASH, out, 0.0, reviews="ignore")
    assert ignored.pairs == 8 and ignored.reviews["mode"] == "ignore" and ignored.reviews["rejected"] == 2
    assert ignored.reviews["left_out"] == 0 and ignored.reviews["captions_corrected"] == 0


def test_llava_export_applies_reviews_and_lets_a_pair_back_in(tmp_path):
    from tasks.instruct.export import export_llava

    store = _pair_store(tmp_path / "store")
    _reviewed(store)
    out = tmp_path / "llava"
    result = export_llava(store, out)
    stage1 = {r["id"]: r["conversations"][1]["value"] for r in json.loads((out / "stage1.json").read_text())}
    assert result.stage1 == 7 and "slide-a-p1" not in stage1 and stage1["slide-a-p2"] == "<b>Tumour</b> & stroma"
    assert not (out / "images" / "slide-a-p1.jpg").exists()
    provenance = json.loads((out / "provenance.json").read_text())["reviews"]
    assert provenance["rejected"] == 1 and provenance["corrected"] == 1 and provenance["mode"] == "apply"

    assert export_llava(store, out).written == 0  # unchanged store and reviews: nothing written
    save_review(store, HASH, "slide-a", _review("slide-a-p1", "accept", "carol"))  # a second look lets it back in
    again = export_llava(store, out)
    assert again.stage1 == 8 and again.written == 1 and (out / "images" / "slide-a-p1.jpg").is_file()
    assert again.reviews["rejected"] == 0 and again.reviews["accepted"] == 2


# -- the report ----------------------------------------------------------------------------------------------------


def test_status_shows_review_coverage_and_rejections_by_reason(tmp_path):
    from tasks.report import markdown, store_report, text

    store = _pair_store(tmp_path / "store")
    _reviewed(store)
    save_review(store, HASH, "slide-b", _review("slide-b-p0", "reject", "bob", reason="wrong tissue"))
    store.write_bytes("reviews/stray.parquet", b"x")  # not under an agents_hash: left out, never fatal
    store.write_bytes("reviews/not.a.hash/slide-a.parquet", b"x")
    report = store_report(store)
    entry = next(e for e in report["reviews"]["by_agents_hash"] if e["agents_hash"] == HASH)
    assert entry["reviewed"] == 4 and entry["reviewers"] == 2 and entry["slides"] == 2
    assert entry["rejected_by_reason"] == {"hallucinated finding": 1, "wrong tissue": 1}
    shown = text(report)
    assert (
        f"Reviews {HASH}: 4 of 8 pairs reviewed (50.0%) on 2 slides by 2 reviewer(s): 1 accepted, 2 rejected (50.0% "
        "of reviewed), 1 corrected"
    ) in shown
    assert "rejected x1, hallucinated finding: 25.0% of reviewed" in shown
    assert f"pathgen serve --store {store.url}" in shown
    assert "unreadable review: agents_hash 'not.a.hash' is not one" in shown
    assert f"[{store.url}]({store.url})" in markdown(report)
