import os

import pytest

from pathgen.settings import load_settings
from tasks.slides.sources import SourceError, resolve_sources

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
