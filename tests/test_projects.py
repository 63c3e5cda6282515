"""A slide's TCGA project: the settings, else its source's GDC metadata, else its barcode's tissue source site
(the GDC's TSS code table); the prompts and the extraction hash follow the project so resolved."""

import json
from pathlib import Path

import pytest

from pathgen.settings import load_settings
from tasks.selection.retrieval import load_prompts
from tasks.slides.hashing import slide_extraction_hash, slide_project
from tasks.slides.projects import STUDY_PROJECTS, barcode_project, load_sites, resolve_project
from tasks.slides.sources import SlideRef, resolve_sources

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "captions" / "PathGen-1.6M_sample.json"

# wsi_ids of the released PathGen-1.6M sample, with the GDC project each case belongs to (GDC case pages).
KNOWN = {
    "TCGA-BH-A0AU-01Z-00-DX1.E852F218-B15C-4CF8-8FD0-F284043834C4": "TCGA-BRCA",
    "TCGA-DU-7015-01Z-00-DX1.E604489D-E82C-4129-9CDC-16AD1D33B3F2": "TCGA-LGG",
    "TCGA-DJ-A3VA-01Z-00-DX1.FA6843C7-BB03-4B4D-B6CE-FA93800F9351": "TCGA-THCA",
    "TCGA-HC-A6AO-01Z-00-DX1.826FFDEE-62D9-4946-906B-97166208019E": "TCGA-PRAD",
    "TCGA-CM-6676-01Z-00-DX1.dcc2bf23-ecaa-4952-8485-fc609af66298": "TCGA-COAD",
    "TCGA-77-7141-01Z-00-DX1.3263490a-cfba-43a8-8198-5139dbf00bf9": "TCGA-LUSC",
    "TCGA-VD-AA8M-01Z-00-DX1.AA194E33-B494-44E3-9C7C-29AA6A68393F": "TCGA-UVM",
    "TCGA-IB-7646-01Z-00-DX1.532D893D-E7AC-4D64-A0A7-A1AB553E7673": "TCGA-PAAD",
    "TCGA-DD-AACB-01Z-00-DX1.D4A7846E-8B38-4FBA-BAB3-BDAF2EC84E9E": "TCGA-LIHC",
}


def _settings(**overrides):
    return load_settings(overrides=overrides, environ={})


def _ref(slide_id: str, project: str | None = None) -> SlideRef:
    return SlideRef(slide_id, f"s3://bucket/slides/{slide_id}.svs", "s3://bucket/slides/", project=project)


def test_real_barcodes_resolve_to_their_projects_and_every_sample_slide_gets_project_prompts():
    for wsi_id, project in KNOWN.items():
        resolved = barcode_project([wsi_id])
        assert (resolved.project, resolved.source) == (project, "barcode"), wsi_id
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} is not here")
    wsi_ids = {record["wsi_id"] for record in json.loads(SAMPLE.read_text())}
    prompts = load_prompts(None)
    unresolved = [w for w in wsi_ids if barcode_project([w]).project not in prompts]
    assert len(wsi_ids) > 3000 and unresolved == []


def test_the_shipped_table_names_only_known_studies_and_projects_with_prompts():
    sites = load_sites()
    assert len(sites) == 1052  # the GDC table as published, one row per code
    prompts = load_prompts(None)
    named = {p for site in sites.values() for p in site.projects if p}
    assert named - set(prompts) == {"TCGA-LAML"}  # leukaemia: no tissue slides, no attribute prompts
    assert set(STUDY_PROJECTS.values()) - {None} == named


def test_a_code_of_several_projects_or_of_no_project_names_none_and_says_why(tmp_path):
    table = tmp_path / "tss.csv"
    table.write_text(
        '"TSS Code","Source Site","Study Name","BCR"\n'
        '"Q1","Somewhere","Colon adenocarcinoma","IGC"\n'
        '"Q1","Somewhere","Rectum adenocarcinoma","IGC"\n'
        '"Q2","Elsewhere","Cell Line Control","NCH"\n'
        '"Q3","Elsewhere","Lung adenocarcinoma","NCH"\n'
    )
    sites = load_sites(table)
    shared = barcode_project(["TCGA-Q1-0001-01Z-00-DX1"], sites)
    assert shared.project is None and "several studies" in shared.note and "Rectum adenocarcinoma" in shared.note
    control = barcode_project(["TCGA-Q2-0001"], sites)
    assert control.project is None and "Cell Line Control" in control.note
    unknown = barcode_project(["TCGA-Q9-0001"], sites)
    assert unknown.project is None and "Q9" in unknown.note
    assert barcode_project(["slide-7", "TCGA-Q3-0001-01Z.svs"], sites).project == "TCGA-LUAD"  # the file name
    assert barcode_project(["NOTTCGA-Q3-0001X"], sites).project is None  # not a barcode on its own
    table.write_text('"TSS Code","Source Site","Study Name","BCR"\n"Q4","Somewhere","Made-up carcinoma","IGC"\n')
    with pytest.raises(ValueError, match="Made-up carcinoma"):
        load_sites(table)


def test_settings_win_then_gdc_metadata_then_the_barcode():
    ref = _ref("TCGA-BH-A0AU-01Z-00-DX1")
    assert resolve_project(ref, _settings()).source == "barcode"
    assert slide_project(ref, _settings()) == "TCGA-BRCA"
    assert slide_project(_ref(ref.slide_id, project="TCGA-LUAD"), _settings()) == "TCGA-LUAD"  # GDC metadata
    with_global = _settings(**{"slides.project": "TCGA-SKCM"})
    assert slide_project(_ref(ref.slide_id, project="TCGA-LUAD"), with_global) == "TCGA-SKCM"
    per_slide = _settings(**{"slides.project": "TCGA-SKCM", "slides.projects": {ref.slide_id: "TCGA-OV"}})
    assert resolve_project(_ref(ref.slide_id, project="TCGA-LUAD"), per_slide).source == "slides.projects"
    assert slide_project(_ref(ref.slide_id, project="TCGA-LUAD"), per_slide) == "TCGA-OV"
    assert slide_project(_ref("CMU-1-Small-Region"), _settings()) is None


def test_the_hash_follows_the_resolved_project():
    settings = _settings()
    breast, glioma = _ref("TCGA-BH-A0AU-01Z-00-DX1"), _ref("TCGA-DU-7015-01Z-00-DX1")
    plain = _ref("slide-without-barcode")
    assert slide_extraction_hash(breast, settings) != slide_extraction_hash(glioma, settings)
    assert slide_extraction_hash(breast, settings) != slide_extraction_hash(plain, settings)
    # the same project however it was resolved: the same hash
    named = _settings(**{"slides.projects": {plain.slide_id: "TCGA-BRCA"}})
    assert slide_extraction_hash(plain, named) == slide_extraction_hash(breast, settings)
    overridden = _settings(**{"slides.project": "TCGA-LGG"})
    assert slide_extraction_hash(breast, overridden) == slide_extraction_hash(glioma, settings)


def test_a_gdc_sample_sheet_gives_each_slide_its_project(tmp_path):
    (tmp_path / "f1").mkdir()
    (tmp_path / "f1" / "TCGA-BH-A0AU-01Z-00-DX1.svs").write_bytes(b"not read here")
    header = "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tSample Type\n"
    sheet = tmp_path / "gdc_sample_sheet.2025-05-22.tsv"
    sheet.write_text(
        header
        + "f1\tTCGA-BH-A0AU-01Z-00-DX1.svs\tBiospecimen\tSlide Image\tTCGA-BRCA\tTCGA-BH-A0AU\tTCGA-BH-A0AU-01Z\tPT\n"
        + "f2\tTCGA-DU-7015-01Z-00-DX1.svs\tBiospecimen\tSlide Image\tTCGA-LGG, TCGA-GBM\tc\ts\tPT\n"
    )
    refs = {r.slide_id: r for r in resolve_sources([str(sheet)], _settings())}
    first, second = refs["TCGA-BH-A0AU-01Z-00-DX1"], refs["TCGA-DU-7015-01Z-00-DX1"]
    assert (first.project, first.file_id, first.missing_reason) == ("TCGA-BRCA", "f1", None)
    assert second.project is None and second.missing_reason  # two projects named: none taken; not downloaded
    assert resolve_project(second, _settings()).source == "barcode"  # then its barcode decides
    manifest = tmp_path / "gdc_manifest.txt"
    manifest.write_text(
        "id\tfilename\tmd5\tsize\tstate\tproject_id\nf1\tTCGA-BH-A0AU-01Z-00-DX1.svs\t\t\t\tTCGA-BRCA\n"
    )
    assert resolve_sources([str(manifest)], _settings())[0].project == "TCGA-BRCA"


def test_an_extracted_slide_records_its_barcode_project_and_a_setting_re_extracts_it(tmp_path, cmu_rgb):
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.captions.records import patches_key
    from tasks.slides.extract import extract_slide
    from tasks.store.objects import Store

    from .conftest import write_tiff_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    write_tiff_slide(folder / "TCGA-BH-A0AU-01Z-00-DX1.tif", np.ascontiguousarray(cmu_rgb[:1536, :1536]), mpp=0.5)
    base = {"store": str(tmp_path / "store"), "selection.method": "random", "selection.max_per_slide": 2}
    base["patch.patch_px"] = 224

    def run(**extra):
        settings = _settings(**base, **extra)
        store = Store(settings.store)
        (ref,) = resolve_sources([str(folder)], settings)
        status = extract_slide(ref, settings, store).status
        with store.open(patches_key(ref.slide_id)) as handle:
            return status, set(pq.read_table(handle, columns=["project"]).column("project").to_pylist())

    assert run() == ("ok", {"TCGA-BRCA"})
    assert run() == ("skipped", {"TCGA-BRCA"})
    assert run(**{"slides.project": "TCGA-LGG"}) == ("ok", {"TCGA-LGG"})  # the hash followed the project
