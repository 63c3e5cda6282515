"""``pathgen serve`` through HTTP: every page and its JSON API, DeepZoom tiles of the shared CMU slide, reviews (one
at a time, concurrent, on SeaweedFS), paging over 100,000 pairs with a bound on the rows read, and hostile input.

The stores are built here, cheaply and directly with the factory's own record and shard code (a slide record, a patch
shard of real patches read from the CMU slide, pair shards in PAIR_SCHEMA): the browser reads what the factory
writes, and no model runs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pathgen import __version__
from pathgen.serve.app import create_app
from pathgen.serve.queries import PairFilter, PairIndex, page_pairs
from pathgen.settings import load_settings
from tasks.captions.records import FAILED_SCHEMA, PAIR_SCHEMA, failed_key, pair_key, patches_key
from tasks.reviews.store import Review, review_key, save_review
from tasks.slides.readers import open_slide
from tasks.slides.shard import PatchRecord, PatchShardWriter, patch_id_for
from tasks.store.objects import Store
from tests.conftest import CMU

SLIDE = CMU.stem
BROKEN = "broken-slide"
AGENTS = "a1b2c3d4e5f6"
PATCH_MPP, PATCH_PX = 1.0, 224
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


# -- building a store --------------------------------------------------------------------------------------------


def _patches(slide_uri: str) -> list[PatchRecord]:
    """12 real patches of the CMU slide on a grid over its tissue, in 3 clusters, one retrieval pick."""
    records = []
    with open_slide(slide_uri) as reader:
        info = reader.info
        side = round(PATCH_PX * PATCH_MPP / info.mpp)
        for i in range(12):
            x, y = 200 + (i % 4) * side, 600 + (i // 4) * side
            pixels = reader.read_rect((x, y), (PATCH_PX, PATCH_PX), PATCH_MPP)
            jpeg = io.BytesIO()
            Image.fromarray(pixels).save(jpeg, format="JPEG", quality=85)
            selected = [f"cluster:{i % 3}"] + (["retrieval:findings"] if i == 5 else [])
            records.append(
                PatchRecord(
                    patch_id=patch_id_for(SLIDE, (x, y, side, side), PATCH_MPP, PATCH_PX),
                    slide_id=SLIDE,
                    source_uri=slide_uri,
                    project="TCGA-TEST",
                    file_id=None,
                    x=x,
                    y=y,
                    w0=side,
                    h0=side,
                    level=0,
                    mpp=PATCH_MPP,
                    slide_mpp=info.mpp,
                    patch_px=PATCH_PX,
                    tissue_fraction=0.9,
                    background_fraction=0.1,
                    sharpness=50.0,
                    pen_fraction=0.0,
                    image=jpeg.getvalue(),
                    selected_by=selected,
                    cluster=i % 3,
                )  # fmt: skip
            )
    return records


def _slide_record(slide_uri: str, kept: int) -> dict:
    with open_slide(slide_uri) as reader:
        info = reader.info
    return {
        "slide_id": SLIDE, "status": "ok", "source_uri": slide_uri, "origin": slide_uri, "project": "TCGA-TEST",
        "vendor": info.vendor, "width": info.width, "height": info.height, "mpp": info.mpp,
        "levels": [{"level": 0, "width": info.width, "height": info.height, "downsample": 1.0}],
        "target_mpp": PATCH_MPP, "patch_px": PATCH_PX, "tissue_threshold": 0.5, "extraction_hash": "ex123",
        "random_weights": True, "counts": {"kept": kept}, "schema_version": "1", "factory_version": __version__,
    }  # fmt: skip


def _pair_row(patch: dict, i: int, caption: str) -> dict:
    return {
        **patch,
        "description": f"Description {i}: sheets of tumour cells with pleomorphic nuclei.",
        "revised_description": f"Description {i}: sheets of malignant cells with enlarged pleomorphic nuclei.",
        "revise_changed": True, "revise_change": 0.2, "caption": caption, "caption_tokens": 10 + i % 50,
        "caption_trimmed": i % 7 == 0, "describe_model": "tiny-vlm (random weights)", "revise_model": "tiny-lm",
        "summarize_model": "tiny-lm", "prompt_versions": json.dumps({"describe": "v1", "revise": "v2"}),
        "sampling": json.dumps({"describe": {"temperature": 0.0}}), "agents_hash": AGENTS, "extraction_hash": "ex123",
        "random_weights": True, "factory_version": __version__, "created_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip


def _write(store: Store, key: str, rows: list[dict], schema: pa.Schema, row_group_size: int | None = None) -> None:
    with store.staged_file(key) as local:
        pq.write_table(pa.Table.from_pylist(rows, schema), local, row_group_size=row_group_size)


def build_store(store: Store, slide_uri: str) -> list[str]:
    """The CMU slide (record, patch shard), 11 of its 12 patches captioned (one with HTML in its caption), the 12th a
    failed item, and a failed slide. Returns the patch ids."""
    patches = _patches(slide_uri)
    with store.staged_file(patches_key(SLIDE)) as local:
        writer = PatchShardWriter(local, {"pathgen.extraction_hash": "ex123"})
        writer.add(patches)
        writer.close()
    store.write_json(f"slides/{SLIDE}/slide.json", _slide_record(slide_uri, len(patches)))
    broken = {**_slide_record(slide_uri, 0), "slide_id": BROKEN, "status": "failed", "width": None, "project": None}
    broken["error"] = "no bright-field tissue found: the slide's background is dark; leave this slide out"
    store.write_json(f"slides/{BROKEN}/slide.json", broken)
    fields = {f.name for f in PAIR_SCHEMA}
    rows = [
        _pair_row({k: v for k, v in vars(p).items() if k in fields}, i, HOSTILE if i == 1 else f"Caption {i} tumour.")
        for i, p in enumerate(patches[:11])
    ]
    _write(store, pair_key(AGENTS, SLIDE), rows, PAIR_SCHEMA)
    failed = {"patch_id": patches[11].patch_id, "slide_id": SLIDE, "x": patches[11].x, "y": patches[11].y,
              "stage": "describe", "reason": "empty reply", "detail": "the model answered nothing",
              "agents_hash": AGENTS, "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    _write(store, failed_key(AGENTS, SLIDE), [failed], FAILED_SCHEMA)
    return [p.patch_id for p in patches]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("serve") / "store"
    ids = build_store(Store(str(root)), str(CMU))
    return root, ids


def _client(app) -> TestClient:
    """A client whose requests name 127.0.0.1 as Host, as a browser on this machine does (the app refuses others)."""
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture
def client(built) -> TestClient:
    return _client(create_app(Store(str(built[0])), "dr-test", False, load_settings(environ={})))


@pytest.fixture
def fresh(built, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the built store of this test's own: reviews written to it reach no other test."""
    root = tmp_path / "store"
    shutil.copytree(built[0], root)
    return root, built[1]


# -- pages ---------------------------------------------------------------------------------------------------


def test_slides_page_lists_filters_and_sorts(client):
    page = client.get("/slides")
    assert page.status_code == 200
    assert SLIDE in page.text and BROKEN in page.text and "RANDOM WEIGHTS" in page.text
    assert "no bright-field tissue found" in page.text  # the failure reason, grouped as pathgen status does
    failed = client.get("/slides", params={"status": "failed"}).text
    assert BROKEN in failed and f"/slides/{SLIDE}" not in failed
    assert BROKEN not in client.get("/slides", params={"q": "cmu"}).text
    api = client.get("/api/slides", params={"sort": "kept", "order": "desc"}).json()
    assert [s["slide_id"] for s in api["slides"]] == [SLIDE, BROKEN]
    assert api["slides"][0]["pairs_by_hash"] == {AGENTS: 11} and api["slides"][0]["kept"] == 12
    assert client.get("/api/slides", params={"sort": "nonsense"}).status_code == 400


def test_an_unreadable_slide_record_is_named_not_fatal(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_bytes("slides/bad/slide.json", b"{not json")
    page = _client(create_app(store, None, False, load_settings(environ={}))).get("/slides")
    assert page.status_code == 200 and "unreadable" in page.text and "bad" in page.text


def test_slide_page_overlay_and_deepzoom_tiles(client):
    page = client.get(f"/slides/{SLIDE}")
    assert page.status_code == 200 and 'id="viewer"' in page.text and "RANDOM WEIGHTS" in page.text
    assert "cluster 2: 4 patches" in page.text and "retrieval picks" in page.text
    info = client.get(f"/api/slides/{SLIDE}").json()
    assert len(info["patches"]) == 12 and [e["cluster"] for e in info["legend"]] == [0, 1, 2]
    assert [p["retrieval"] for p in info["patches"] if p["retrieval"]] == [["findings"]]
    dzi = client.get(info["dzi"])
    assert dzi.status_code == 200 and 'Width="2220" Height="2967"' in dzi.text
    deepest = 12  # ceil(log2(2967)) + 1 levels: level 12 is full resolution
    tile = client.get(f"/api/slides/{SLIDE}/slide_files/{deepest}/1_3.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    pixels = Image.open(io.BytesIO(tile.content)).convert("L")
    assert pixels.size == (256, 256) and pixels.getextrema()[1] - pixels.getextrema()[0] > 50  # tissue, not blank
    assert client.get(f"/api/slides/{SLIDE}/slide_files/{deepest}/99_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/{SLIDE}/slide_files/{deepest + 1}/0_0.jpeg").status_code == 404
    outline = client.get(info["outline_url"]).json()
    assert outline["polygons"] and all(0 <= x <= 2220 and 0 <= y <= 2967 for p in outline["polygons"] for x, y in p)


def test_patch_page_shows_the_pair_its_diff_and_the_failures(client, built):
    patch_id = built[1][1]  # the patch whose caption holds HTML
    page = client.get(f"/patches/{patch_id}", params={"slide": SLIDE})
    assert page.status_code == 200, page.text
    text = page.text
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    assert "11 CLIP tokens" in text and "tiny-vlm (random weights)" in text and AGENTS in text
    assert "<del>tumour</del> <ins>malignant</ins>" in text  # the revise agent's changes, words kept apart
    assert "empty reply" in text and "describe" in text  # the slide's failed item, stage and reason
    assert "RANDOM WEIGHTS" in text
    image = client.get(f"/api/patches/{patch_id}/image.jpg", params={"slide": SLIDE})
    assert Image.open(io.BytesIO(image.content)).size == (PATCH_PX, PATCH_PX)
    thumb = client.get(f"/api/patches/{patch_id}/image.jpg", params={"size": "thumb"})  # found without the slide
    assert Image.open(io.BytesIO(thumb.content)).size == (192, 192)
    uncaptioned = client.get(f"/patches/{built[1][11]}", params={"slide": SLIDE})
    assert uncaptioned.status_code == 200 and "no caption yet" in uncaptioned.text


def test_pairs_page_pages_and_filters(client):
    page = client.get("/pairs", params={"size": 4})
    assert page.status_code == 200 and "Page 1 of 3 (11 pairs)" in page.text and page.text.count('class="card') == 4
    assert "&lt;script&gt;" in page.text and "<script>alert" not in page.text
    last = client.get("/api/pairs", params={"size": 4, "page": 3}).json()
    assert len(last["rows"]) == 3 and not last["has_next"]
    found = client.get("/api/pairs", params={"text": "SCRIPT"}).json()
    assert [r["caption"] for r in found["rows"]] == [HOSTILE]
    trimmed = client.get("/api/pairs", params={"trimmed": "true"}).json()
    assert {r["caption_trimmed"] for r in trimmed["rows"]} == {True} and len(trimmed["rows"]) == 2  # rows 0 and 7
    tokens = client.get("/api/pairs", params={"min_tokens": 15, "max_tokens": 17}).json()
    assert sorted(r["caption_tokens"] for r in tokens["rows"]) == [15, 16, 17]
    fields = ("text", "agents_hash", "project", "slide", "min_tokens", "max_tokens", "trimmed", "revise_changed")
    blank = dict.fromkeys((*fields, "review"), "")  # the filter form submitted with every field on "any"
    assert "Page 1 of 1 (11 pairs)" in client.get("/pairs", params=blank).text
    assert client.get("/api/pairs", params={"trimmed": "maybe"}).status_code == 400


# -- reviews -------------------------------------------------------------------------------------------------


def _review_rows(store_root: Path) -> list[dict]:
    return pq.read_table(store_root / review_key(AGENTS, SLIDE)).to_pylist()


def test_reviews_are_validated_saved_and_filterable(fresh):
    root, ids = fresh
    client = _client(create_app(Store(str(root)), "dr-test", False, load_settings(environ={})))
    spoofed = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"},
                          headers={"X-Forwarded-User": "dr-spoofed"})  # fmt: skip
    assert spoofed.status_code == 201 and spoofed.json()["review"]["reviewer"] == "dr-test"  # no proxy: ignored
    proxy = load_settings(overrides={"serve.trust_reviewer_header": True}, environ={})
    behind = _client(create_app(Store(str(root)), "dr-test", False, proxy))
    by_proxy = behind.post(
        "/api/reviews",
        json={"patch_id": ids[2], "verdict": "reject", "reason": "hallucinated finding: no mitoses are visible"},
        headers={"X-Forwarded-User": "dr-proxy"},
    )
    assert by_proxy.status_code == 201, by_proxy.text
    corrected = client.post("/api/reviews", json={"patch_id": ids[3], "verdict": "correct", "caption": "Better."})
    assert corrected.status_code == 201
    plain = client.post("/api/reviews", content=json.dumps({"patch_id": ids[4], "verdict": "accept"}),
                        headers={"content-type": "text/plain"})  # fmt: skip
    assert plain.status_code == 422  # what a cross-site form could send: not JSON, never saved
    for body, words in (
        ({"patch_id": ids[4], "verdict": "reject"}, "needs a reason"),
        ({"patch_id": ids[4], "verdict": "correct"}, "corrected caption"),
        ({"patch_id": ids[4], "verdict": "maybe"}, "verdict"),
        ({"patch_id": ids[11], "verdict": "accept"}, "no caption yet"),
        ({"patch_id": "0" * 20, "verdict": "accept"}, "no patch"),
    ):
        refused = client.post("/api/reviews", json=body)
        assert 400 <= refused.status_code < 500 and words in refused.json()["error"], (body, refused.text)
    rows = {r["patch_id"]: r for r in _review_rows(root)}
    assert rows[ids[0]]["reviewer"] == "dr-test" and rows[ids[2]]["reviewer"] == "dr-proxy"
    assert rows[ids[3]]["caption"] == "Better." and len(rows) == 3
    rejected = client.get("/api/pairs", params={"review": "reject"}).json()["rows"]
    assert [r["patch_id"] for r in rejected] == [ids[2]]
    assert len(client.get("/api/pairs", params={"review": "unreviewed"}).json()["rows"]) == 8
    page = client.get(f"/patches/{ids[2]}", params={"slide": SLIDE, "agents_hash": AGENTS}).text
    assert "hallucinated finding: no mitoses are visible" in page and "dr-proxy" in page
    nobody = _client(create_app(Store(str(root)), None, False, load_settings(environ={})))
    refused = nobody.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"},
                          headers={"X-Forwarded-User": "dr-spoofed"})  # fmt: skip
    assert refused.status_code == 403 and "--behind-proxy" in refused.json()["error"]
    remote = load_settings(
        overrides={"serve.reviewer_header": "X-Remote-User", "serve.trust_reviewer_header": True}, environ={}
    )
    proxied = _client(create_app(Store(str(root)), None, False, remote))
    body = {"patch_id": ids[5], "verdict": "accept"}
    assert proxied.post("/api/reviews", json=body, headers={"X-Forwarded-User": "spoofed"}).status_code == 403
    assert proxied.post("/api/reviews", json=body, headers={"X-Remote-User": "dr-remote"}).status_code == 201
    assert {r["reviewer"] for r in _review_rows(root) if r["patch_id"] == ids[5]} == {"dr-remote"}


def test_read_only_disables_reviews(built):
    root, ids = built
    before = (root / review_key(AGENTS, SLIDE)).stat().st_mtime if (root / review_key(AGENTS, SLIDE)).exists() else 0
    client = _client(create_app(Store(str(root)), "dr-test", True, load_settings(environ={})))
    page = client.get(f"/patches/{ids[0]}", params={"slide": SLIDE}).text
    assert "<fieldset disabled>" in page and "Reviews are disabled" in page and "READ-ONLY" in page
    refused = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"})
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    after = (root / review_key(AGENTS, SLIDE)).stat().st_mtime if (root / review_key(AGENTS, SLIDE)).exists() else 0
    assert after == before


def test_a_store_that_refuses_a_review_turns_the_browser_read_only(built, monkeypatch):
    """As an S3 store with read-only credentials does: the write is refused, the browser says so and stops offering."""
    root, ids = built

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr("pathgen.serve.api.save_review", refuse)
    client = _client(create_app(Store(str(root)), "dr-test", False, load_settings(environ={})))
    refused = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"})
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    assert "<fieldset disabled>" in client.get(f"/patches/{ids[0]}", params={"slide": SLIDE}).text


def test_a_store_folder_this_process_cannot_write_is_read_only(built, monkeypatch):
    root, ids = built
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    client = _client(create_app(Store(str(root)), "dr-test", False, load_settings(environ={})))
    page = client.get(f"/patches/{ids[0]}", params={"slide": SLIDE}).text
    assert "<fieldset disabled>" in page and "is not writable by this process" in page
    refused = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"})
    assert refused.status_code == 403 and "not writable" in refused.json()["error"]


def test_a_corrupt_review_file_is_named_and_overwritten_by_nothing(fresh):
    root, ids = fresh
    (root / review_key(AGENTS, SLIDE)).parent.mkdir(parents=True)
    (root / review_key(AGENTS, SLIDE)).write_bytes(b"not parquet")
    client = _client(create_app(Store(str(root)), "dr-test", False, load_settings(environ={})))
    refused = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"})
    assert refused.status_code == 409 and review_key(AGENTS, SLIDE) in refused.json()["error"], refused.text
    page = client.get(f"/patches/{ids[0]}", params={"slide": SLIDE})
    assert page.status_code == 200 and "review file cannot be read" in page.text and "<fieldset disabled>" in page.text
    assert (root / review_key(AGENTS, SLIDE)).read_bytes() == b"not parquet"


def test_the_latest_review_is_the_latest_in_time_as_exports_apply(fresh):
    root, ids = fresh
    store, now = Store(str(root)), time.time()
    import datetime as dt

    newer = Review(patch_id=ids[0], verdict="accept", reviewer="dr-new", time=dt.datetime.fromtimestamp(now, dt.UTC))
    older = Review(patch_id=ids[0], verdict="correct", caption="Old.", reviewer="dr-old",
                   time=dt.datetime.fromtimestamp(now - 3600, dt.UTC))  # fmt: skip
    save_review(store, AGENTS, SLIDE, newer)
    save_review(store, AGENTS, SLIDE, older)  # committed last, but an hour older
    client = _client(create_app(store, "dr-test", False, load_settings(environ={})))
    view = client.get(f"/api/patches/{ids[0]}", params={"slide": SLIDE}).json()
    assert view["review"]["reviewer"] == "dr-new" and len(view["reviews"]) == 2


def test_a_rewritten_shard_never_shows_an_image_of_its_old_rows(fresh):
    root, ids = fresh
    client = _client(create_app(Store(str(root)), "dr-test", False, load_settings(environ={})))
    ctx = client.app.state.ctx
    first = client.get(f"/api/patches/{ids[0]}/image.jpg", params={"slide": SLIDE}).content
    table = pq.read_table(root / pair_key(AGENTS, SLIDE))
    with Store(str(root)).staged_file(pair_key(AGENTS, SLIDE)) as local:  # the same rows, in reverse order
        pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), local)
    ctx.index._listed_at = float("-inf")  # list again now, not after the listing's few seconds
    assert client.get(f"/api/patches/{ids[0]}/image.jpg", params={"slide": SLIDE}).content == first
    other = client.get(f"/api/patches/{ids[10]}/image.jpg", params={"slide": SLIDE}).content
    assert other != first


def test_only_loopback_and_allowed_hosts_are_answered_and_no_cdn_docs(built):
    client = _client(create_app(Store(str(built[0])), "dr-test", False, load_settings(environ={})))
    assert client.get("/slides", headers={"host": "evil.example:8765"}).status_code == 400  # DNS rebinding
    assert client.get("/slides", headers={"host": "localhost:8765"}).status_code == 200
    assert client.get("/api/docs").status_code == 404 and client.get("/api/openapi.json").status_code == 200
    named = load_settings(overrides={"serve.allowed_hosts": ["review.example.org"]}, environ={})
    proxied = _client(create_app(Store(str(built[0])), "dr-test", False, named, host="10.0.0.5"))
    for host in ("review.example.org", "10.0.0.5:8765"):
        assert proxied.get("/slides", headers={"host": host}).status_code == 200, host


@pytest.fixture
def server(tmp_path):
    """A real ``pathgen serve`` app under uvicorn on 127.0.0.1 (port 0: any free); yields (base URL, store root)."""
    import uvicorn

    root = tmp_path / "store"
    ids = build_store(Store(str(root)), str(CMU))
    behind_proxy = load_settings(overrides={"serve.trust_reviewer_header": True}, environ={})
    app = create_app(Store(str(root)), "dr-a", False, behind_proxy)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", root, ids
    srv.should_exit = True
    thread.join(10)


def test_concurrent_reviews_of_one_slide_lose_nothing(server):
    import httpx

    base, root, ids = server
    errors: list[str] = []

    def review(patch_id: str, who: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            reply = http.post("/api/reviews", json={"patch_id": patch_id, "verdict": "accept"},
                              headers={"X-Forwarded-User": who})  # fmt: skip
            if reply.status_code != 201:
                errors.append(reply.text)

    threads = [threading.Thread(target=review, args=(pid, f"dr-{i % 3}")) for i, pid in enumerate(ids[:11])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    rows = _review_rows(root)
    assert sorted(r["patch_id"] for r in rows) == sorted(ids[:11])
    assert {r["reviewer"] for r in rows} == {"dr-0", "dr-1", "dr-2"}


# -- hostile input -----------------------------------------------------------------------------------------


def test_hostile_ids_and_page_numbers(client, built):
    root, _ = built
    for path in ("/slides/%2E%2E", "/slides/.hidden", "/api/slides/%2E%2E/slide.dzi", "/patches/%2E%2E",
                 "/api/patches/..evil/image.jpg"):  # fmt: skip
        reply = client.get(path)
        assert reply.status_code == 400, (path, reply.status_code)
    for path in ("/slides/..%2F..%2Fetc%2Fpasswd", "/patches/..%2F..%2Fetc"):
        assert client.get(path).status_code == 404  # a '/' in an id matches no route
    assert client.get("/api/patches/abc/image.jpg", params={"slide": "../../etc"}).status_code == 400
    assert client.get("/api/pairs", params={"agents_hash": "../x"}).status_code == 400
    missing = client.get("/slides/nope")
    assert missing.status_code == 404 and "no slide" in missing.text and "reviewing as dr-test" in missing.text
    huge = client.get("/api/pairs", params={"page": 10**15}).json()
    assert huge["rows"] == [] and huge["rows_read"] == 0 and huge["total"] == 11
    huge_filtered = client.get("/api/pairs", params={"page": 10**15, "text": "tumour"}).json()
    assert huge_filtered["rows"] == [] and huge_filtered["rows_read"] == 0
    assert "past the last pair" in client.get("/pairs", params={"page": 10**15}).text
    assert client.get("/api/pairs", params={"page": 0}).status_code == 422
    assert client.get("/api/pairs", params={"page": "x"}).status_code == 422
    text_page = client.get("/api/pairs", params={"text": "SCRIPT", "size": 4, "page": 2}).json()
    assert text_page["rows"] == [] and text_page["total"] == 1 and not text_page["has_next"]  # 1 match of 11 pairs
    assert "past the last pair" in client.get("/pairs", params={"text": "SCRIPT", "size": 4, "page": 2}).text


# -- paging at scale ---------------------------------------------------------------------------------------


SHARDS, ROWS_PER_SHARD, ROW_GROUP = 100, 1000, 256


def _scale_store(root: Path) -> Store:
    """100,000 pairs: 100 shards of 1000 rows in row groups of 256, written column-wise (no per-row objects)."""
    store = Store(str(root))
    for s in range(SHARDS):
        n, slide = ROWS_PER_SHARD, f"slide-{s:03d}"
        ids = [f"p{s:03d}x{i:05d}" for i in range(n)]
        columns = {f.name: pa.nulls(n, f.type) for f in PAIR_SCHEMA}
        columns |= {
            "patch_id": pa.array(ids), "slide_id": pa.array([slide] * n), "source_uri": pa.array(["x"] * n),
            "project": pa.array([f"TCGA-P{s % 4}"] * n), "x": pa.array(range(n), pa.int64()),
            "y": pa.array([0] * n, pa.int64()), "image": pa.array([b""] * n, pa.binary()),
            "caption": pa.array([f"caption {i}" + (" mitosis" if i % 100 == 0 else "") for i in range(n)]),
            "caption_tokens": pa.array([i % 77 for i in range(n)], pa.int16()),
            "caption_trimmed": pa.array([False] * n), "revise_changed": pa.array([i % 2 == 0 for i in range(n)]),
            "random_weights": pa.array([False] * n), "agents_hash": pa.array([AGENTS] * n),
        }  # fmt: skip
        table = pa.table({f.name: columns[f.name].cast(f.type) for f in PAIR_SCHEMA})
        with store.staged_file(pair_key(AGENTS, slide)) as local:
            pq.write_table(table, local, row_group_size=ROW_GROUP)
    return store


def test_paging_100k_pairs_reads_only_the_page(tmp_path):
    store = _scale_store(tmp_path / "store")
    index = PairIndex(store)

    def page(number: int, flt: PairFilter | None = None, size: int = 50, counts=None):
        tick = time.perf_counter()
        result = page_pairs(index, flt or PairFilter(), number, size, lambda h, s: {}, counts)
        return result, time.perf_counter() - tick

    first, _ = page(1)
    assert first.total == 100_000 and index.footers_read == SHARDS
    figures = {}
    for number in (1, 1000, 2000):  # the first, a middle and the last page
        result, seconds = page(number)
        figures[number] = (result.rows_read, round(seconds * 1000, 1))
        offset = (number - 1) * 50
        assert [r["patch_id"] for r in result.rows] == [
            f"p{(offset + i) // 1000:03d}x{(offset + i) % 1000:05d}" for i in range(50)
        ]
        assert result.rows_read <= 2 * ROW_GROUP  # the row groups holding the page, never the store
    assert index.footers_read == SHARDS  # footers read once
    print(f"\npaging 100,000 pairs, 50 a page: page -> (rows read, ms): {figures}")
    project, _ = page(300, PairFilter(project="TCGA-P3"))  # row-group statistics skip the other projects
    assert {r["project"] for r in project.rows} == {"TCGA-P3"} and project.rows_read <= 2 * ROW_GROUP
    from pathgen.serve.queries import MatchCounts

    counts = MatchCounts()
    flt = PairFilter(text="MITOSIS")  # 1 in 100 rows: a scan, remembered per row group
    first_text, _ = page(1, flt, 10, counts)
    assert len(first_text.rows) == 10 and all("mitosis" in r["caption"] for r in first_text.rows)
    scanned, _ = page(80, flt, 10, counts)  # the first visit counts the matches of every row group before it
    again, _ = page(80, flt, 10, counts)
    assert [r["patch_id"] for r in again.rows] == [r["patch_id"] for r in scanned.rows]
    assert again.rows[0]["patch_id"] == "p079x00000" and scanned.rows_read > 79 * ROWS_PER_SHARD
    assert again.rows_read <= 2 * ROWS_PER_SHARD  # only the shard holding the page: its filter and grid columns
    assert page(10**12)[0].rows_read == 0


# -- S3 ----------------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_serve_a_store_on_seaweedfs(bucket, tmp_path):
    """Slides, a patch, a page of pairs, tiles of a slide on S3 and a review, all on SeaweedFS."""
    store = Store(bucket)
    store.check()
    store.put_file(CMU, "sources/CMU-1-Small-Region.svs")
    ids = build_store(store, store.uri("sources/CMU-1-Small-Region.svs"))
    client = _client(create_app(Store(bucket), "dr-s3", False, load_settings(environ={})))
    assert SLIDE in client.get("/slides").text
    assert client.get("/api/pairs").json()["total"] == 11
    assert "Caption 0 tumour." in client.get(f"/patches/{ids[0]}", params={"slide": SLIDE}).text
    tile = client.get(f"/api/slides/{SLIDE}/slide_files/12/1_3.jpeg")  # read through tiffslide's ranged reads
    assert tile.status_code == 200 and Image.open(io.BytesIO(tile.content)).size == (256, 256)
    saved = client.post("/api/reviews", json={"patch_id": ids[0], "verdict": "accept"})
    assert saved.status_code == 201, saved.text
    assert store.exists(review_key(AGENTS, SLIDE))


def test_slide_page_says_how_to_fetch_a_missing_viewer(built, tmp_path):
    settings = load_settings(overrides={"serve.openseadragon_dir": str(tmp_path / "empty")}, environ={})
    client = _client(create_app(Store(str(built[0])), "dr-test", False, settings))
    page = client.get(f"/slides/{SLIDE}").text
    assert 'id="viewer-missing"' in page and "npm install" in page and "openseadragon.min.js" not in page
    assert client.get("/vendor/openseadragon/openseadragon.min.js").status_code == 404


def test_serve_command_help_and_missing_store(tmp_path, capsys):
    from pathgen.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "X-Forwarded-User" in capsys.readouterr().out
    assert main(["serve", "--store", str(tmp_path / "missing")]) == 2
    assert "no store at" in capsys.readouterr().err
