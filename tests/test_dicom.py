"""DICOM whole-slide images: the shared CMU slide converted with wsidicomizer reads like the SVS it came from,
folders are scanned for series, and a non-conforming file fails with a clear record."""

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest

from .conftest import CMU

pytest.importorskip("wsidicom")


@pytest.fixture(scope="module")
def cmu_dicom(tmp_path_factory) -> Path:
    """CMU-1-Small-Region.svs as a DICOM WSI series (wsidicomizer, through tiffslide: no libjpeg-turbo needed)."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import TiffSlideSource

    folder = tmp_path_factory.mktemp("dicom") / "slides" / "CMU-1-dicom"
    folder.mkdir(parents=True)
    WsiDicomizer.convert(str(CMU), str(folder), preferred_source=TiffSlideSource)
    assert list(folder.glob("*.dcm"))
    return folder


def test_a_dicom_series_reads_like_the_slide_it_came_from(cmu_dicom):
    from tasks.slides.readers import open_slide

    reader = open_slide(str(cmu_dicom))
    assert reader.info.backend == "wsidicom" and (reader.info.width, reader.info.height) == (2220, 2967)
    assert reader.info.mpp == pytest.approx(0.499, abs=1e-3)  # from the DICOM pixel spacing
    ours = reader.read_level(0, 600, 900, 256, 256)
    with openslide.OpenSlide(str(CMU)) as slide:
        truth = np.asarray(slide.read_region((600, 900), 0, (256, 256)).convert("RGB"))
    assert np.abs(ours.astype(int) - truth).mean() < 6  # the same pixels, re-encoded once
    edge = reader.read_level(0, 2100, 2900, 256, 256)  # past the slide's corner: glass
    assert (edge[-20:, -20:] == 255).all()


def test_folders_are_scanned_for_dicom_series_and_they_extract(cmu_dicom, tmp_path):
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    settings = load_settings(
        overrides={"store": str(tmp_path / "store"), "patch.patch_px": 224, "selection.method": "all"}, environ={}
    )
    (ref,) = resolve_sources([str(cmu_dicom.parent)], settings)
    assert ref.slide_id == "CMU-1-dicom" and Path(ref.uri) == cmu_dicom
    one_file = next(cmu_dicom.glob("*.dcm"))
    assert resolve_sources([str(one_file)], settings)[0].uri == str(cmu_dicom)  # a file stands for its series
    outcome = extract_slide(ref, settings, Store(settings.store))
    assert outcome.status == "ok" and outcome.patches > 0, outcome.error


def test_a_non_conforming_dicom_file_fails_with_a_clear_record(cmu_dicom, tmp_path):
    import pydicom

    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    broken = tmp_path / "broken"
    shutil.copytree(cmu_dicom, broken)
    for path in broken.glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.ImageType
        dataset.save_as(path)
    settings = load_settings(overrides={"store": str(tmp_path / "store")}, environ={})
    (ref,) = resolve_sources([str(broken)], settings)
    outcome = extract_slide(ref, settings, Store(settings.store))
    assert outcome.status == "failed" and "DICOM" in outcome.error and "broken" in outcome.error, outcome.error
