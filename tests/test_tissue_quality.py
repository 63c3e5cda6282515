import cv2
import numpy as np
import pytest

from pathgen.errors import SlideError
from pathgen.settings import QualitySettings, TissueSettings
from tasks.slides.quality import rejection_reason, score_patch
from tasks.slides.readers import open_slide
from tasks.slides.tissue import grid_cells, stained_share, tissue_mask

from .conftest import CMU, DAPI, SHARED, write_tiff_slide

KATHER = SHARED / "patches" / "kather2016-samples"


def _overview(path):
    with open_slide(str(path)) as reader:
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


def test_fluorescence_message_names_the_missing_stain():
    image, ds, info = _overview(DAPI)
    with pytest.raises(SlideError, match=r"brightness 56/255\) and only 0% of it has H&E or IHC stain colours"):
        tissue_mask(image, ds, info.mpp, TissueSettings())


@pytest.mark.parametrize("folder", sorted(p.name for p in KATHER.iterdir()))
def test_kather_tiles_without_glass_are_bright_field(folder):
    # Kather 2016 H&E tiles are cut from inside the tissue: no glass, so the brightest quarter of a lymphocyte or
    # tumour tile is 74..140/255, below tissue.min_background_value. The stain, not the glass, says bright-field.
    # mpp=None: the mask's minimum piece area (0.05 mm2) is larger than a whole 74 um tile; that is not what this
    # test is about. EMPTY tiles are plain glass: bright-field with no tissue, so "no tissue found" is their answer.
    tiles = sorted((KATHER / folder).glob("*.tif"))
    assert len(tiles) == 3
    for tile in tiles:
        image, ds, _ = _overview(tile)
        if folder == "08_EMPTY":
            with pytest.raises(SlideError, match="no tissue found"):
                tissue_mask(image, ds, None, TissueSettings())
            continue
        try:
            mask = tissue_mask(image, ds, None, TissueSettings())
        except SlideError as exc:
            # Fat is unstained vacuoles with membranes too thin for a 5x5 px overview: glass-like, still bright-field.
            assert folder == "07_ADIPOSE" and "no tissue found" in str(exc), f"{tile.name}: {exc}"
            continue
        assert mask.any(), tile.name


def _stain_rgb(concentrations: list[np.ndarray], vectors: list[tuple[float, float, float]]) -> np.ndarray:
    """White light through stains by Beer-Lambert, with Ruifrok & Johnston's optical-density vectors."""
    od = sum(c[..., None] * np.asarray(v, np.float32) for c, v in zip(concentrations, vectors, strict=True))
    return np.clip(245 * np.exp(-od), 0, 255).astype(np.uint8)


HEMATOXYLIN, EOSIN, DAB = (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78)


@pytest.mark.parametrize("stains", [(HEMATOXYLIN, EOSIN), (HEMATOXYLIN, DAB)], ids=["h&e", "ihc-dab"])
def test_densely_stained_section_without_glass_is_bright_field(stains):
    # Haematoxylin-rich (Kather's lymphocyte tiles: median overview pixel (65, 28, 63) to (97, 73, 119)) with a lighter
    # counterstain; concentrations keep the optical density of the darkest channel under ~2.5, as scanners record.
    rng = np.random.default_rng(3)
    ranges = [(1.0, 2.5), (0.3, 1.2)]
    amounts = [cv2.GaussianBlur(rng.uniform(lo, hi, (96, 96)).astype(np.float32), (0, 0), 2) for lo, hi in ranges]
    image = _stain_rgb(amounts, list(stains))
    assert np.percentile(image.max(axis=2), 75) < TissueSettings().min_background_value  # dark: no glass
    assert tissue_mask(image, 32, None, TissueSettings()).any()


def _fluorescence_rgb(palette, edge_to_edge: bool, size: int = 2048, seed: int = 0) -> np.ndarray:
    """A multiplex immunofluorescence composite as a viewer renders it (a QPTIFF's channels in pseudo-colour).

    Camera black with its noise, tissue autofluorescence (mostly green), dense nuclei (DAPI), a cytoplasm marker in
    epithelial islands (e.g. pan-cytokeratin) and a membrane marker on some cells (e.g. CD8); each channel is added
    in its colour from ``palette``. Without ``edge_to_edge`` the section is an ellipse on black glass.
    """
    rng = np.random.default_rng(seed)
    tissue = np.zeros((size, size), np.uint8)
    if edge_to_edge:
        tissue[:] = 1
    else:
        cv2.ellipse(tissue, (size // 2, size // 2), (size * 3 // 8, size * 5 // 16), 20, 0, 360, 1, -1)
    ys, xs = rng.integers(0, size, (2, int(tissue.sum()) // 300))
    inside = tissue[ys, xs] > 0
    nuclei = np.zeros((size, size), np.float32)
    membrane = np.zeros((size, size), np.float32)
    for i, (y, x) in enumerate(zip(ys[inside].tolist(), xs[inside].tolist(), strict=True)):
        cv2.circle(nuclei, (x, y), int(rng.integers(5, 9)), float(rng.uniform(120, 255)), -1)
        if i % 6 == 0:
            cv2.circle(membrane, (x, y), 11, float(rng.uniform(120, 255)), 2)
    field = cv2.GaussianBlur(rng.random((size // 16, size // 16)).astype(np.float32), (0, 0), 2)
    field = cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
    islands = (field > np.median(field)).astype(np.float32) * tissue
    cytoplasm = islands * cv2.GaussianBlur(rng.uniform(40, 160, (size, size)).astype(np.float32), (0, 0), 3)
    rgb = rng.normal(6, 2, (size, size, 3)).astype(np.float32)
    rgb[..., 1] += 15.0 * tissue
    for signal, colour in zip((nuclei, cytoplasm, membrane), palette, strict=True):
        rgb += cv2.GaussianBlur(signal, (0, 0), 1.2)[..., None] * np.asarray(colour, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


BLUE_GREEN_RED = ((0, 0, 1), (0, 1, 0), (1, 0, 0))
GREY_DAPI_ONLY = ((1, 1, 1), (0, 0, 0), (0, 0, 0))
HE_LIKE = ((0, 0, 1), (1, 0.6, 0), (1, 0, 1))  # blue, orange, magenta: mixtures look pink and purple


@pytest.mark.parametrize(
    "palette, edge_to_edge",
    [(BLUE_GREEN_RED, False), (BLUE_GREEN_RED, True), (GREY_DAPI_ONLY, True), (HE_LIKE, False)],
    ids=["multiplex-slide", "multiplex-tissue-only", "dapi-grey-tissue-only", "he-like-palette-slide"],
)
def test_fluorescence_composites_are_not_bright_field(tmp_path, palette, edge_to_edge):
    path = write_tiff_slide(tmp_path / "fluorescence.tif", _fluorescence_rgb(palette, edge_to_edge), mpp=0.5)
    image, ds, info = _overview(path)
    assert stained_share(image, TissueSettings().min_saturation) < 0.3
    with pytest.raises(SlideError, match="no bright-field tissue found"):
        tissue_mask(image, ds, info.mpp, TissueSettings())


def test_white_glass_has_no_tissue():
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(240, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    with pytest.raises(SlideError, match="no tissue found"):
        tissue_mask(glass, 32, 0.5, TissueSettings())


def test_quality_scores_tell_tissue_blur_glass_and_ink(cmu_rgb):
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


@pytest.mark.parametrize("folder", ["01_TUMOR", "04_LYMPHO", "02_STROMA"])
def test_a_kather_tile_extracts_at_its_real_pixel_size(tmp_path, folder):
    """A 150 px H&E tile of tissue edge to edge: its 72 dpi tag is no pixel size (so without one the slide says so),
    and at its real 0.495 µm/px the whole tile is tissue, not a speck under the whole-slide minimum area."""
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    tile = sorted((SHARED / "patches" / "kather2016-samples" / folder).glob("*.tif"))[0]
    base = {"store": str(tmp_path / "store"), "patch.patch_px": 128, "selection.method": "all"}
    unknown = load_settings(overrides=base, environ={})
    outcome = extract_slide(resolve_sources([str(tile)], unknown)[0], unknown, Store(unknown.store))
    assert outcome.status == "failed" and "mpp" in (outcome.error or "").lower(), outcome.error
    settings = load_settings(overrides=base | {"slides.default_mpp": 0.495, "store": str(tmp_path / "s2")}, environ={})
    outcome = extract_slide(resolve_sources([str(tile)], settings)[0], settings, Store(settings.store))
    assert outcome.status == "ok" and outcome.patches == 1, outcome.error
