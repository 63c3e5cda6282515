import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest

from pathgen.errors import SlideError
from pathgen.settings import load_settings
from tasks.slides.extract import extract_slide, shard_key, slide_json_key
from tasks.slides.sources import SlideRef, SourceError, resolve_sources
from tasks.store.objects import Store

from .conftest import CMU, SLIDES


def _settings(**overrides):
    return load_settings(overrides=overrides, environ={})


def test_folder_glob_and_file_resolve_without_duplicates():
    refs = resolve_sources([str(SLIDES), str(SLIDES / "*.svs"), str(CMU)], _settings())
    assert [r.slide_id for r in refs] == ["CMU-1-Small-Region", "test3-DAPI-2-387"]
    assert all(os.path.isabs(r.uri) for r in refs)


def test_missing_path_still_yields_a_reference_to_record():
    (ref,) = resolve_sources(["/nowhere/at/all.svs"], _settings())
    assert ref.slide_id == "all" and ref.uri == "/nowhere/at/all.svs"


def test_gdc_manifest_finds_slides_in_gdc_client_layout(tmp_path):
    file_id = "0b7e6a4e-1f7c-4d5e-9a3b-2f4c7d9e8a11"
    (tmp_path / file_id).mkdir()
    os.symlink(CMU, tmp_path / file_id / "CMU-1-Small-Region.svs")
    manifest = tmp_path / "gdc_manifest.txt"
    manifest.write_text(
        "id\tfilename\tmd5\tsize\tstate\n"
        f"{file_id}\tCMU-1-Small-Region.svs\tabc123\t{CMU.stat().st_size}\treleased\n"
        "11111111-2222-3333-4444-555555555555\tTCGA-AA-0000.svs\tdef\t10\treleased\n"
        "22222222-2222-3333-4444-555555555555\tnotes.txt\tdef\t10\treleased\n"
    )
    refs = resolve_sources([str(manifest)], _settings())
    assert [r.slide_id for r in refs] == ["CMU-1-Small-Region", "TCGA-AA-0000"]
    assert refs[0].file_id == file_id and refs[0].md5 == "abc123" and refs[0].missing_reason is None
    assert refs[0].uri.endswith(f"{file_id}/CMU-1-Small-Region.svs")
    assert "gdc-client download 11111111" in refs[1].missing_reason


def test_malformed_manifest_and_json_say_what_they_expected(tmp_path):
    bad = tmp_path / "manifest.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(SourceError, match="GDC manifest"):
        resolve_sources([str(bad)], _settings())
    js = tmp_path / "x.json"
    js.write_text('{"not": "a list"}')
    with pytest.raises(SourceError, match="PathGen-1.6M"):
        resolve_sources([str(js)], _settings())


def test_shared_pathgen_sample_groups_records_by_slide(tmp_path):
    sample = SLIDES.parent / "captions" / "PathGen-1.6M_sample.json"
    refs = resolve_sources([str(sample)], _settings(**{"slides.roots": [str(tmp_path)]}))
    assert len(refs) == 3582
    assert sum(len(r.positions) for r in refs) == 5000
    assert all(r.missing_reason for r in refs)  # none of the TCGA slides is here


# -- issue: md5, distinct ids, slides read only inside their roots -------------------------------------------------

FILE_ID = "0b7e6a4e-1f7c-4d5e-9a3b-2f4c7d9e8a11"


def _store_settings(store, **overrides):
    base = {
        "store": str(store),
        "retries.io_retries": 0,
        "patch.patch_px": 224,
        "selection.method": "random",
        "selection.max_per_slide": 2,
    }
    return _settings(**{**base, **overrides})


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _manifest(path: Path, rows: list[tuple[str, str, str, int]]) -> Path:
    lines = ["id\tfilename\tmd5\tsize\tstate"] + [f"{i}\t{n}\t{m}\t{s}\treleased" for i, n, m, s in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gdc_md5_mismatch_fails_the_slide_naming_both_digests(tmp_path):
    (tmp_path / FILE_ID).mkdir()
    slide = tmp_path / FILE_ID / "CMU-1-Small-Region.svs"
    shutil.copy(CMU, slide)
    actual = hashlib.md5(slide.read_bytes()).hexdigest()
    expected = hashlib.md5(b"the file the GDC holds").hexdigest()
    size = slide.stat().st_size
    settings = _store_settings(tmp_path / "store")
    store = Store(settings.store)

    (ref,) = resolve_sources(
        [str(_manifest(tmp_path / "bad_manifest.txt", [(FILE_ID, slide.name, expected, size)]))], settings
    )
    outcome = extract_slide(ref, settings, store)
    assert outcome.status == "failed"
    assert expected in outcome.error and actual in outcome.error and "download it again" in outcome.error
    record = store.read_json(slide_json_key("CMU-1-Small-Region"))
    assert record["status"] == "failed" and record["md5"] == expected and actual in record["error"]
    assert not store.exists(shard_key("CMU-1-Small-Region"))

    (ref,) = resolve_sources(
        [str(_manifest(tmp_path / "junk_manifest.txt", [(FILE_ID, slide.name, "abc123", size)]))], settings
    )
    outcome = extract_slide(ref, settings, store)
    assert outcome.status == "failed" and "'abc123', not an md5 digest" in outcome.error

    (ref,) = resolve_sources(
        [str(_manifest(tmp_path / "good_manifest.txt", [(FILE_ID, slide.name, actual.upper(), size)]))], settings
    )
    outcome = extract_slide(ref, settings, store)
    assert outcome.status == "ok", outcome.error


def test_remote_md5_is_checked_only_when_asked():
    from tasks.slides.extract import _check_md5 as check_md5

    fs = fsspec.filesystem("memory")
    fs.pipe("/md5-test/TCGA-XX.svs", b"slide bytes" * 1000)
    actual = hashlib.md5(b"slide bytes" * 1000).hexdigest()
    expected = hashlib.md5(b"other").hexdigest()
    ref = SlideRef("TCGA-XX", "memory://md5-test/TCGA-XX.svs", origin="m.txt", md5=expected)
    settings = _settings()
    check_md5(ref, settings)  # off by default: a remote slide is not read twice
    on = SimpleNamespace(slides=SimpleNamespace(verify_md5_remote=True), s3=settings.s3)
    with pytest.raises(SlideError, match=f"md5 {actual} but the manifest says {expected}"):
        check_md5(ref, on)
    check_md5(SlideRef("TCGA-XX", ref.uri, origin="m.txt", md5=actual), on)
    fs.rm("/md5-test", recursive=True)


def test_same_file_name_in_different_folders_gets_distinct_stable_ids(tmp_path):
    root = tmp_path / "slides"
    for sub in ("a", "b/deeper"):
        (root / sub).mkdir(parents=True)
        shutil.copy(CMU, root / sub / "S1.svs")
    shutil.copy(CMU, root / "a" / "unique.svs")
    settings = _settings()

    refs = resolve_sources([str(root)], settings)
    twin_a = "S1-" + hashlib.sha256(b"a/S1.svs").hexdigest()[:6]
    twin_b = "S1-" + hashlib.sha256(b"b/deeper/S1.svs").hexdigest()[:6]
    assert [r.slide_id for r in refs] == [twin_a, "unique", twin_b]
    assert [r.slide_id for r in resolve_sources([str(root)], settings)] == [r.slide_id for r in refs]
    globbed = resolve_sources([str(root / "**" / "*.svs")], settings)
    assert sorted(r.slide_id for r in globbed) == sorted(r.slide_id for r in refs)

    # files given one by one keep their names; a later one under a taken id is told apart by its path
    first, second = resolve_sources([str(root / "a" / "S1.svs"), str(root / "b" / "deeper" / "S1.svs")], settings)
    assert first.slide_id == "S1"
    assert second.slide_id == "S1-" + hashlib.sha256(str(root / "b" / "deeper" / "S1.svs").encode()).hexdigest()[:6]
    # the same file named twice is still one slide
    assert len(resolve_sources([str(root / "a" / "S1.svs"), str(root / "a"), str(root / "a" / "*.svs")], settings)) == 2

    # a GDC manifest listing two files of one name (gdc-client layout): told apart by <id>/<filename>
    other = "11111111-2222-3333-4444-555555555555"
    for fid in (FILE_ID, other):
        (tmp_path / "gdc" / fid).mkdir(parents=True)
        shutil.copy(CMU, tmp_path / "gdc" / fid / "TCGA-01.svs")
    manifest = _manifest(tmp_path / "gdc" / "manifest.txt", [(FID, "TCGA-01.svs", "", 1) for FID in (FILE_ID, other)])
    refs = resolve_sources([str(manifest)], settings)
    assert [r.slide_id for r in refs] == [
        f"TCGA-01-{hashlib.sha256(f'{fid}/TCGA-01.svs'.encode()).hexdigest()[:6]}" for fid in (FILE_ID, other)
    ]
    assert [r.slide_id for r in resolve_sources([str(tmp_path / "gdc")], settings)] == [r.slide_id for r in refs]


def test_names_that_leave_the_roots_are_failed_and_never_read(tmp_path):
    root = tmp_path / "a" / "b" / "root"
    (root / FILE_ID).mkdir(parents=True)
    shutil.copy(CMU, root / "inside.svs")
    shutil.copy(CMU, tmp_path / "escape.svs")  # a real slide outside the root
    shutil.copy(CMU, tmp_path / "a" / "b" / "escape.svs")
    store_dir = tmp_path / "out" / "store"
    settings = _store_settings(store_dir, **{"slides.roots": [str(root)]})

    records = [
        {"wsi_id": "../escape", "position": ["0", "0"], "caption": "c"},
        {"wsi_id": str(tmp_path / "escape"), "position": ["0", "0"], "caption": "c"},
        {"wsi_id": "inside", "position": ["0", "0"], "caption": "c", "file_id": "../../../.."},
        {"wsi_id": "inside", "position": ["10", "10"], "caption": "c"},
    ]
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps(records))
    manifest = _manifest(
        tmp_path / "manifest.txt",
        [
            (FILE_ID, "../../../escape.svs", "", 1),
            ("..", "escape.svs", "", 1),
            ("", str(tmp_path / "escape.svs"), "", 1),
        ],
    )
    before = _files(tmp_path)
    json_refs = resolve_sources([str(sample)], settings)
    gdc_refs = resolve_sources([str(manifest)], settings)
    escaping = json_refs[:2] + gdc_refs
    assert len(json_refs) == 3 and len(gdc_refs) == 3
    for ref in escaping:
        assert ref.missing_reason and "slides.roots" in ref.missing_reason, ref
    assert "'..'" in json_refs[0].missing_reason and "absolute path" in json_refs[1].missing_reason
    # a bad file id is refused too, whatever the name
    assert json_refs[2].slide_id == "inside" and "file id" in json_refs[2].missing_reason

    store = Store(settings.store)
    for ref in escaping:
        outcome = extract_slide(ref, settings, store)
        assert outcome.status == "failed" and "slides.roots" in outcome.error
        record = store.read_json(slide_json_key(ref.slide_id))
        assert record["status"] == "failed" and record["error"] == outcome.error
    assert {p for p in _files(tmp_path) - before if store_dir not in p.parents} == set()


def test_dot_and_separator_names_become_safe_ids_inside_the_store(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("..svs", "...svs", ".hidden.svs", "tab\there.svs"):
        (folder / name).write_text("not a slide\n")
    store_dir = tmp_path / "store"
    settings = _store_settings(store_dir)
    refs = resolve_sources([str(folder / n) for n in ("..svs", "...svs", ".hidden.svs", "tab\there.svs")], settings)
    assert [r.slide_id for r in refs] == ["_", "__", "_hidden", "tab_here"]
    store = Store(settings.store)
    before = _files(tmp_path)
    for ref in refs:
        assert extract_slide(ref, settings, store).status == "failed"
    written = _files(tmp_path) - before
    assert written and all(store_dir / "slides" in p.parents for p in written)
    assert {p.parent.name for p in written} == {"_", "__", "_hidden", "tab_here"}

    from tasks.slides.sources import safe_slide_id

    assert safe_slide_id("a/b\\c") == "a_b_c" and safe_slide_id("") == "_" and safe_slide_id("x\x00y") == "x_y"
    long = safe_slide_id("x" * 500)
    assert len(long) <= 160 and long == safe_slide_id("x" * 500) and long != safe_slide_id("x" * 499)
    for bad in (".", "..", "a/b", "..\\x", "", ".x", "a\nb"):
        with pytest.raises(ValueError, match="cannot name a store key"):
            slide_json_key(bad)
    # a reference built by hand with such an id is failed without writing anything
    outcome = extract_slide(SlideRef("..", str(folder / "..svs"), origin="hand"), settings, store)
    assert outcome.status == "failed" and "cannot name a store key" in outcome.error
    assert _files(tmp_path) - before == written
