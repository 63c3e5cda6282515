"""Readers of Skin Cancer, MHIST, WSSS4LUAD, LC25000 and Kather 2016, each on a tiny fixture the test writes in the
dataset's official download layout (file and folder names as released, tiny images), the Kather 2016 reader also on
the shared real samples; and detection across every format there is a reader for (A1's builders included)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tasks.benchmark.datasets import class_spec, detect_format, find_datasets, formats
from tasks.benchmark.readers import kather2016, lc25000, mhist, skin, wsss4luad
from tests.test_benchmark_readers_a import BUILDERS as A1_BUILDERS
from tests.test_benchmark_readers_a import assert_probe_held_out, prompts

SHARED_KATHER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches" / "kather2016-samples"


def _image(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, 90, 200 - value % 200)).save(path)
    return path


def _names(split) -> list[str]:
    return [Path(split.images.name(i)).name for i in range(len(split.labels))]


def _keys(task, split) -> dict[str, str]:
    """File name -> class key, as the reader labelled it."""
    return {name: task.classes.folders[label] for name, label in zip(_names(split), split.labels, strict=True)}


# -- builders: each writes one dataset as downloaded under root and returns the folder a reader is given -------

SKIN_TILES = [  # class, set, tile number: two classes of the 16, every set
    ("nontumor_skin_dermis_dermis", "Train", 1),
    ("nontumor_skin_dermis_dermis", "Train", 2),
    ("nontumor_skin_dermis_dermis", "Test", 3),
    ("nontumor_skin_dermis_dermis", "Validation", 4),
    ("tumor_skin_epithelial_bcc", "Train", 1),
    ("tumor_skin_epithelial_bcc", "Test", 2),
    ("tumor_skin_epithelial_bcc", "Test", 3),
]


def make_skin(root: Path) -> Path:
    """heiDATA data.zip unpacked: data/{tiles-v2.csv, class_dict.json, tiles/<class>/<class>_ws_<n>_<k>.jpg}."""
    folder = root / "skin" / "data"
    rows = []
    for i, (cls, subset, k) in enumerate(SKIN_TILES):
        tile = f"tiles/{cls}/{cls}_ws_{40 + i % 2}_{k}.jpg"
        _image(folder / tile, 30 * i)
        rows.append({"file": f"data/{tile}", "class": cls, "malignicy": cls.split("_")[0], "set": subset})
    with (folder / "tiles-v2.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class", "malignicy", "set"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "class_dict.json").write_text(json.dumps({cls: i for i, cls in enumerate(class_spec("skin").folders)}))
    return folder


MHIST_ROWS = [  # Image Name, Majority Vote Label, SSA votes out of 7, Partition
    ("MHIST_aaa.png", "SSA", 6, "train"),
    ("MHIST_aab.png", "HP", 0, "train"),
    ("MHIST_aac.png", "HP", 1, "test"),
    ("MHIST_aad.png", "SSA", 4, "test"),
    ("MHIST_aae.png", "HP", 3, "test"),
]


def make_mhist(root: Path) -> Path:
    """images.zip unpacked into images/, beside annotations.csv."""
    folder = root / "mhist"
    folder.mkdir(parents=True)
    lines = ["Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"]
    for i, (name, label, votes, partition) in enumerate(MHIST_ROWS):
        _image(folder / "images" / name, 40 * i)
        lines.append(f"{name},{label},{votes},{partition}")
    (folder / "annotations.csv").write_text("\n".join(lines) + "\n")
    return folder


WSSS_PATCHES = [  # slide, label vector [tumor, stroma, normal]
    (slide, vector)
    for slide in ("436219", "436220", "436221", "436222", "436223", "436224", "436225", "436226")
    for vector in ("[1, 0, 0]", "[0, 1, 1]", "[1, 1, 0]", "[0, 0, 1]")
]


def make_wsss4luad(root: Path) -> Path:
    """1.training/<slide>-<x>-<y>-[tumor, stroma, normal].png, 2.validation/ and 3.testing/ with img/ and mask/."""
    folder = root / "WSSS4LUAD"
    for i, (slide, vector) in enumerate(WSSS_PATCHES):
        _image(folder / "1.training" / f"{slide}-{1000 + 224 * i}-{5000 + 7 * i}-{vector}.png", 9 * i)
    for part in ("2.validation", "3.testing"):
        for kind in ("img", "mask"):
            _image(folder / part / kind / "00.png", 5)
    return folder


def make_lc25000(root: Path) -> Path:
    """LC25000.zip unpacked: lung_colon_image_set/{lung_image_sets,colon_image_sets}/<class>/<prefix><n>.jpeg."""
    folder = root / "lung_colon_image_set"
    prefixes = {
        "lung_aca": "lungaca",
        "lung_n": "lungn",
        "lung_scc": "lungscc",
        "colon_aca": "colonca",
        "colon_n": "colonn",
    }
    for cls, prefix in prefixes.items():
        half = "lung_image_sets" if cls.startswith("lung") else "colon_image_sets"
        for n in range(1, 7):
            _image(folder / half / cls / f"{prefix}{n}.jpeg", 20 * n + len(cls))
    return folder


def make_kather2016(root: Path) -> Path:
    """zenodo 53169 Kather_texture_2016_image_tiles_5000/<class>/<hex>_CRC-Prim-HE-NN_MMM.tif_Row_r_Col_c.tif."""
    folder = root / "Kather_texture_2016_image_tiles_5000"
    for c, cls in enumerate(class_spec("kather2016").folders):
        for k in range(3):
            slide = (3 * c + k) % 10 + 1
            name = f"{10 * c + k:X}A_CRC-Prim-HE-{slide:02d}_{k + 5:03d}.tif_Row_{151 * k + 1}_Col_1.tif"
            _image(folder / cls / name, 25 * c + k)
    return folder


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "skin": make_skin,
    "mhist": make_mhist,
    "wsss4luad": make_wsss4luad,
    "lc25000": make_lc25000,
    "kather2016": make_kather2016,
}


# -- every format -----------------------------------------------------------------------------------------------


def test_every_layout_is_detected_as_its_own_format_only_across_all_formats(tmp_path):
    known = formats()
    builders = {**A1_BUILDERS, **BUILDERS}
    assert sorted(builders) == sorted(known), "a format without a fixture builder, or a builder without a reader"
    folders = {name: build(tmp_path) for name, build in builders.items()}
    for name, folder in folders.items():
        assert [f for f, fmt in known.items() if fmt.detect(folder)] == [name], folder
        assert detect_format(folder).name == name
    assert not any(fmt.detect(tmp_path) for fmt in known.values())
    assert find_datasets(tmp_path, list(known.values())) == {name: [folder] for name, folder in folders.items()}


# the prompts of the PathGen-1.6M authors' zero-shot scripts (PathFoundation/PathGen-1.6M,
# Zero-shot_classification/clip_acc_{WSSS4LUAD,lc25000_lung,lc25000_colon,skincancer}.py), in the class files' order
PAPER_PROMPTS = {
    "wsss4luad": ["An H&E image of tumor tissue.", "An H&E image of normal tissue."],
    "lc25000-lung": [
        "An image of benign lung tissue", "An image of lung adenocarcinoma",
        "An image of lung squamous cell carcinomas",
    ],
    "lc25000-colon": ["An image of normal colon tissue", "An image of colon adenocarcinoma"],
}  # fmt: skip
SKIN_NAMES = [  # clip_acc_skincancer.py's label_dict, lower-cased as it formats them
    "chondral tissue", "dermis", "elastosis", "epidermis", "hair follicle", "skeletal muscle", "necrosis", "nerves",
    "sebaceous glands", "subcutis", "sweat glands", "vessel",
]  # fmt: skip
SKIN_TUMOURS = ["epithelial basal cell carcinoma", "epithelial squamous cell carcinoma", "melanoma", "naevus"]


def test_each_format_names_a_source_a_layout_and_the_papers_prompts():
    for module in (skin, mhist, wsss4luad, lc25000, kather2016):
        fmt = module.FORMAT
        assert fmt.paper is (fmt.name != "kather2016"), fmt.name
        assert fmt.source.startswith("https://") and fmt.layout and fmt.title
    for name, expected in PAPER_PROMPTS.items():
        assert prompts(class_spec(name)) == expected, name
    skin_prompts = [f"An H&E image of non-tumor {n}" for n in SKIN_NAMES]
    assert prompts(class_spec("skin")) == skin_prompts + [f"An H&E image of tumor {n}" for n in SKIN_TUMOURS]
    assert len(class_spec("skin").folders) == 16 and class_spec("mhist").folders == ["HP", "SSA"]


# -- Skin Cancer ----------------------------------------------------------------------------------------------


def test_skin_scores_zero_shot_on_every_row_and_the_probe_on_the_official_sets(tmp_path):
    (task,) = skin.read(make_skin(tmp_path))
    assert (task.name, task.format) == ("skin", "skin")
    expected = {f"{cls}_ws_{40 + i % 2}_{k}.jpg": (cls, subset) for i, (cls, subset, k) in enumerate(SKIN_TILES)}
    assert _keys(task, task.test) == {name: cls for name, (cls, _) in expected.items()}
    assert _keys(task, task.train) == {name: cls for name, (cls, subset) in expected.items() if subset == "Train"}
    assert _keys(task, task.probe_test) == {name: cls for name, (cls, subset) in expected.items() if subset == "Test"}
    assert "zero-shot on all 7 tiles" in task.split and "trains on the 3 Train tiles and is scored on the 3 Test" in (
        task.split
    )
    assert task.test.images.load(0).mode == "RGB"


def test_skin_finds_tiles_when_data_was_renamed_and_counts_missing_ones(tmp_path):
    folder = make_skin(tmp_path).rename(tmp_path / "skin" / "kriegsmann")  # file column still says data/...
    next(iter(sorted((folder / "tiles" / "tumor_skin_epithelial_bcc").glob("*_3.jpg")))).unlink()
    (task,) = skin.read(folder)
    assert len(task.test.labels) == 6 and len(task.probe_test.labels) == 2 and len(task.train.labels) == 3
    assert "1 rows left out: their tile is not under" in task.split


def test_skin_table_with_an_unknown_class_or_without_its_columns_is_a_clear_error(tmp_path):
    folder = make_skin(tmp_path)
    table = folder / "tiles-v2.csv"
    table.write_text(table.read_text().replace("tumor_skin_epithelial_bcc,tumor,Test", "tumor_skin_bcc,tumor,Test", 1))
    with pytest.raises(ValueError, match=r"class 'tumor_skin_bcc' is not in skin-classes.json"):
        skin.read(folder)
    table.write_text("path,label\ndata/tiles/x.jpg,nontumor_skin_dermis_dermis\n")
    with pytest.raises(ValueError, match="lacks the column"):
        skin.read(folder)


# -- MHIST ----------------------------------------------------------------------------------------------------


def test_mhist_reads_the_official_partition(tmp_path):
    (task,) = mhist.read(make_mhist(tmp_path))
    assert task.classes.folders == ["HP", "SSA"]
    assert _keys(task, task.test) == {name: label for name, label, _, part in MHIST_ROWS if part == "test"}
    assert _keys(task, task.train) == {name: label for name, label, _, part in MHIST_ROWS if part == "train"}
    assert "3 test images for zero-shot, 2 train images" in task.split


def test_mhist_counts_missing_images_and_rejects_unknown_labels(tmp_path):
    folder = make_mhist(tmp_path)
    (folder / "images" / "MHIST_aac.png").unlink()
    (task,) = mhist.read(folder)
    assert sorted(_names(task.test)) == ["MHIST_aad.png", "MHIST_aae.png"]
    assert "1 test and 0 train rows left out" in task.split
    annotations = folder / "annotations.csv"
    annotations.write_text(annotations.read_text().replace("MHIST_aab.png,HP", "MHIST_aab.png,TA"))
    with pytest.raises(ValueError, match=r"line 3: label 'TA' is not one of HP, SSA"):
        mhist.read(folder)


def test_mhist_is_not_any_images_folder_with_an_annotations_csv(tmp_path):
    folder = make_mhist(tmp_path)
    for path in (folder / "images").iterdir():
        path.rename(path.with_name(path.name.replace("MHIST_", "slide_")))
    assert not mhist.detect(folder)


# -- WSSS4LUAD ------------------------------------------------------------------------------------------------


def test_wsss4luad_scores_every_patch_tumor_or_not_and_splits_the_probe_by_slide(tmp_path):
    folder = make_wsss4luad(tmp_path)
    (folder / "1.training" / "notes.png").write_bytes(b"")  # a .png without a label: left out, and said
    (task,) = wsss4luad.read(folder)
    assert task.classes.folders == ["tumor", "non-tumor"]
    labels = _keys(task, task.test)
    assert len(labels) == len(WSSS_PATCHES)
    assert all(
        value == ("tumor" if name.rsplit("-", 1)[1].startswith("[1") else "non-tumor") for name, value in labels.items()
    )
    assert sum(value == "tumor" for value in labels.values()) == 16
    assert_probe_held_out(task)
    slides = [{name.split("-")[0] for name in _names(split)} for split in (task.train, task.probe_test)]
    assert not slides[0] & slides[1]
    assert "1 .png files without a label in the name left out (e.g. notes.png)" in task.split


def test_wsss4luad_of_one_slide_is_scored_zero_shot_without_a_probe(tmp_path):
    folder = tmp_path / "WSSS4LUAD"
    for i, vector in enumerate(("[1, 0, 0]", "[0, 1, 0]", "[0, 0, 1]")):
        _image(folder / "1.training" / f"436219-{100 * i}-7-{vector}.png", i)
    (task,) = wsss4luad.read(folder)  # one slide cannot be split in two: zero-shot still counts
    assert task.test.labels.tolist() == [0, 1, 1] and task.train is None and task.probe_test is None
    assert "no probe: the slides all fall on one side" in task.split


def test_wsss4luad_without_labelled_patches_is_a_clear_error(tmp_path):
    folder = tmp_path / "WSSS4LUAD"
    _image(folder / "1.training" / "patch.png", 1)
    with pytest.raises(ValueError, match=r"holds no patch named <slide>-<x>-<y>-\[tumor, stroma, normal\]\.png"):
        wsss4luad.read(folder)


# -- LC25000 --------------------------------------------------------------------------------------------------


def test_lc25000_gives_a_lung_and_a_colon_task_scored_on_every_image(tmp_path):
    tasks = {task.name: task for task in lc25000.read(make_lc25000(tmp_path))}
    assert sorted(tasks) == ["lc25000-colon", "lc25000-lung"]
    assert tasks["lc25000-lung"].classes.folders == ["lung_n", "lung_aca", "lung_scc"]
    assert tasks["lc25000-colon"].classes.folders == ["colon_n", "colon_aca"]
    for task in tasks.values():
        assert task.format == "lc25000"
        keys = _keys(task, task.test)
        assert len(keys) == 6 * len(task.classes.folders)
        prefix = {"lung_aca": "lungaca", "lung_n": "lungn", "lung_scc": "lungscc", "colon_aca": "colonca"}
        assert all(re.sub(r"\d+\.jpeg$", "", name) == prefix.get(key, "colonn") for name, key in keys.items())
        assert_probe_held_out(task)
        assert "augmentations of one original may be on both sides" in task.split


def test_lc25000_with_one_half_downloaded_gives_that_task(tmp_path):
    folder = make_lc25000(tmp_path)
    for path in sorted((folder / "lung_image_sets").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder / "lung_image_sets").rmdir()
    assert lc25000.detect(folder)
    assert [task.name for task in lc25000.read(folder)] == ["lc25000-colon"]


# -- Kather 2016 ----------------------------------------------------------------------------------------------


def test_kather2016_scores_every_tile_and_splits_the_probe_by_source_slide(tmp_path):
    (task,) = kather2016.read(make_kather2016(tmp_path))
    assert task.classes.folders == class_spec("kather2016").folders
    assert len(task.test.labels) == 24
    assert_probe_held_out(task)
    slides = [{kather2016.SLIDE.search(name).group(0) for name in _names(s)} for s in (task.train, task.probe_test)]
    assert not slides[0] & slides[1]


def test_kather2016_reads_the_shared_real_samples():
    assert detect_format(SHARED_KATHER).name == "kather2016"
    (task,) = kather2016.read(SHARED_KATHER)
    assert len(task.test.labels) == 24
    assert_probe_held_out(task)
    slides = [{kather2016.SLIDE.search(name).group(0) for name in _names(s)} for s in (task.train, task.probe_test)]
    assert not slides[0] & slides[1]
    assert task.test.images.load(0).size == (150, 150)
