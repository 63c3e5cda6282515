import numpy as np
import pytest

from pathgen.settings import QualitySettings, TissueSettings
from tasks.errors import SlideError
from tasks.slides.quality import rejection_reason, score_patch
from tasks.slides.reader import SlideReader
from tasks.slides.tissue import grid_cells, tissue_mask

from .conftest import CMU, DAPI


def _overview(path):
    with SlideReader(str(path)) as reader:
        image, ds = reader.overview(32)
        return image, ds, reader.info


def test_cmu_mask_covers_the_tissue_and_not_the_glass():
    image, ds, info = _overview(CMU)
    mask = tissue_mask(image, ds, info.mpp, TissueSettings())
    assert 0.3 < mask.mean() < 0.9
    # The top-left corner of the CMU region is glass.
    assert not mask[:3, :3].any()


def test_grid_keeps_cells_at_the_threshold_only():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue
    cells = grid_cells(mask, 1.0, (100, 100), 25, threshold=0.5)
    assert {c.x for c in cells} == {0, 25}
    assert all(c.tissue_fraction == 1.0 for c in cells)
    straddling = grid_cells(mask, 1.0, (100, 100), 40, threshold=0.5)
    assert [(c.x, c.tissue_fraction) for c in straddling if c.y == 0] == [(0, 1.0), (40, 0.25)][:1]


def test_fluorescence_is_not_bright_field():
    image, ds, info = _overview(DAPI)
    with pytest.raises(SlideError, match="no bright-field tissue found"):
        tissue_mask(image, ds, info.mpp, TissueSettings())


def test_white_glass_has_no_tissue():
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(240, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    with pytest.raises(SlideError, match="no tissue found"):
        tissue_mask(glass, 32, 0.5, TissueSettings())


def test_quality_scores_tell_tissue_blur_glass_and_ink(cmu_rgb):
    import cv2

    cfg = QualitySettings()
    tissue = np.ascontiguousarray(cmu_rgb[1400:2072, 700:1372])
    assert rejection_reason(score_patch(tissue, cfg.analysis_px), cfg) is None
    blurred = cv2.GaussianBlur(tissue, (0, 0), 12)
    assert rejection_reason(score_patch(blurred, cfg.analysis_px), cfg) == "blur"
    glass = np.full((672, 672, 3), 242, np.uint8)
    assert rejection_reason(score_patch(glass, cfg.analysis_px), cfg) == "background"
    inked = tissue.copy()
    inked[:, :200] = (20, 160, 40)  # green marker
    assert rejection_reason(score_patch(inked, cfg.analysis_px), cfg) == "pen"
    assert rejection_reason(score_patch(inked, cfg.analysis_px), QualitySettings(enabled=False)) is None
