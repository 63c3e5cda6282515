"""Readers of PCam, CRC-100K, SICAPv2, BACH and Osteo, each on a tiny fixture the test writes in the dataset's
official download layout (file and folder names as released, tiny images), scoring zero-shot where the paper's own
scripts do, with their prompts. The builders (``BUILDERS``) are also
used by other benchmark tests."""

from __future__ import annotations

import csv
import gzip
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from tasks.benchmark.datasets import DatasetFormat, class_spec, detect_format, find_datasets, positions_in
from tasks.benchmark.readers import bach, crc100k, osteo, pcam, sicapv2

A1_FORMATS: dict[str, DatasetFormat] = {m.FORMAT.name: m.FORMAT for m in (pcam, crc100k, sicapv2, bach, osteo)}


def _image(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, 40, 200 - value % 200)).save(path)
    return path


# -- builders: each writes one dataset as downloaded under root and returns the folder a reader is given -------


def make_pcam(root: Path, gzipped: bool = False) -> Path:
    folder = root / "pcam"
    folder.mkdir(parents=True)
    for split, labels in {"train": [0, 1, 1, 0], "valid": [1, 0], "test": [0, 1, 0, 1, 1, 0]}.items():
        x = np.stack([np.full((96, 96, 3), 10 * i + (100 if split == "test" else 0), np.uint8) for i in labels])
        x[:, 0, 0, 0] = np.arange(len(labels))  # each patch is told apart by its first pixel
        for kind, data in (("x", x), ("y", np.asarray(labels, np.uint8).reshape(-1, 1, 1, 1))):
            path = folder / f"camelyonpatch_level_2_split_{split}_{kind}.h5"
            with h5py.File(path, "w") as handle:
                handle.create_dataset(kind, data=data)
            if gzipped:
                with path.open("rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
                    shutil.copyfileobj(raw, packed)
                path.unlink()
    return folder


def make_crc100k(root: Path, held_out: bool = True) -> Path:
    folder = root / "crc100k"
    sets = ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K") if held_out else ("NCT-CRC-HE-100K",)
    for name in sets:
        for i, cls in enumerate(crc100k.CLASSES):
            _image(folder / name / cls / f"{cls}-{name[:3]}-AAAA{i}.tif", i * 20)
    return folder


SICAP_ROWS = {  # image_name, NC, G3, G4, G5, G4C
    "Train.xlsx": [("16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg", 1, 0, 0, 0, 0),
                   ("16B0001851_Block_Region_1_1_0_xini_7315_yini_59786.jpg", 0, 1, 0, 0, 0),
                   ("16B0003394_Block_Region_2_0_1_xini_1200_yini_2200.jpg", 0, 0, 1, 0, 1),
                   ("16B0003394_Block_Region_2_1_1_xini_1712_yini_2200.jpg", 0, 0, 0, 1, 0)],
    "Test.xlsx": [("18B0006169_Block_Region_5_2_3_xini_100_yini_300.jpg", 0, 0, 0, 1, 0),
                  ("18B0006169_Block_Region_5_3_3_xini_612_yini_300.jpg", 0, 0, 1, 0, 0),
                  ("18B0006169_Block_Region_5_4_3_xini_1124_yini_300.jpg", 1, 0, 0, 0, 0),
                  ("18B0006169_Block_Region_5_5_3_xini_1636_yini_300.jpg", 0, 1, 0, 0, 0),
                  ("18B0006169_Block_Region_5_6_3_xini_2148_yini_300.jpg", 0, 0, 0, 0, 0),  # no grade: left out
                  ("18B0006169_Block_Region_5_7_3_xini_2660_yini_300.jpg", 0, 1, 0, 0, 0)],  # no image: left out
}  # fmt: skip


def make_sicapv2(root: Path) -> Path:
    folder = root / "SICAPv2"
    (folder / "masks").mkdir(parents=True)
    for sheet, rows in SICAP_ROWS.items():
        book = Workbook()
        book.active.append(["image_name", "NC", "G3", "G4", "G5", "G4C"])
        for row in rows:
            book.active.append(list(row))
            if "_7_3_" not in row[0]:
                _image(folder / "images" / row[0], len(row[0]))
        (folder / "partition" / "Test").mkdir(parents=True, exist_ok=True)
        book.save(folder / "partition" / "Test" / sheet)
    return folder


BACH_PHOTOS = {  # class folder -> photo numbers (train by eva's patient split: b1-41,60,91-100 is1-39,70-100 ...)
    "Benign": (1, 41, 42, 60, 61, 100),
    "InSitu": (39, 40, 69, 70),
    "Invasive": (40, 41, 58, 59),
    "Normal": (45, 46, 68, 69),
}
BACH_TRAIN = {"b001", "b041", "b060", "b100", "is039", "is070", "iv040", "iv059", "n045", "n069"}


def make_bach(root: Path) -> Path:
    top = root / "bach" / "ICIAR2018_BACH_Challenge"
    truth = []
    for cls, numbers in BACH_PHOTOS.items():
        for n in numbers:
            name = f"{bach.PREFIXES[cls]}{n:03d}.tif"
            _image(top / "Photos" / cls / name, n)
            truth.append(f"{name},{cls}")
    _image(top / "Photos" / "Benign" / "copy of b001.tif", 1)  # not a release name: left out
    (top / "Photos" / "microscopy_ground_truth.csv").write_text("\n".join(truth) + "\n")
    (top / "WSI").mkdir()
    return top


OSTEO_ROWS = [  # image.name as the table spells it, classification, Training-Set, set
    ("Case 3 A10-10547-25283", "Non-Tumor", 1, 1),
    ("Case 3 A10-10900-25283", "Viable", 1, 1),
    ("Case 3 A14-37149-17859", "Non-Viable-Tumor", 1, 2),
    ("Case 4 C21-2000-3000", "Viable", 1, 3),
    ("Case 4 C22-2000-3000", "Non-Tumor", 1, 3),
    ("Case 48 - P5 C13-24121-14200", "Non-Viable-Tumor", 2, 5),
    ("Case 48 - P5 C14-24121-14200", "Viable", 2, 5),
    ("P9 B11-10159-22267", "Non-Tumor", 2, 6),
    ("P9 B12-10159-22267", "Non-Tumor", 2, 6),
    ("P9 B13-10159-22267", "Non-Tumor", 2, 6),
    ("Case 4 C24-100-200", "viable: non-viable", 1, 4),  # mixed: labelled viable, as the paper's script does
]


def make_osteo(root: Path) -> Path:
    folder = root / "Osteosarcoma-UT"
    for i, (name, _, tile_set, subset) in enumerate(OSTEO_ROWS):
        file_name = name.replace(" ", "-").replace("---", "-") + ".jpg"  # how the release names the tiles
        _image(folder / f"Training-Set-{tile_set}" / f"set{subset}" / file_name, 10 * i)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "ML_Features_1144.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image.name", "Nuclei.count", "classification"])
        writer.writerows([name, 12, cls] for name, cls, _, _ in OSTEO_ROWS)
        writer.writerow(["Case 3 A18-1-1", 3, "Viable"])  # no tile file: left out
    return folder


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "pcam": make_pcam,
    "crc100k": make_crc100k,
    "sicapv2": make_sicapv2,
    "bach": make_bach,
    "osteo": make_osteo,
}


def _read_one(name: str, folder: Path):
    (task,) = A1_FORMATS[name].read(folder)
    assert task.name == task.format == name
    assert task.classes.folders == class_spec(name).folders
    return task


def _names(split) -> list[str]:
    return [Path(split.images.name(i)).name for i in range(len(split.labels))]


def _labelled(task, split) -> dict[str, int]:
    return dict(zip(_names(split), split.labels.tolist(), strict=True))


def assert_probe_held_out(task) -> None:
    """The probe trains and is scored on two disjoint parts of the zero-shot images (their labels kept)."""
    assert task.train is not None and task.probe_test is not None
    train, scored, every = _labelled(task, task.train), _labelled(task, task.probe_test), _labelled(task, task.test)
    assert train and scored and not train.keys() & scored.keys()
    assert {**train, **scored} == every
    for side in (task.train, task.probe_test):  # cut from the zero-shot images: their features serve both sides
        at = positions_in(side, task.test)
        assert at is not None and [task.test.images.name(i) for i in at] == [
            side.images.name(i) for i in range(len(side))
        ]


# the prompts of the PathGen-1.6M authors' zero-shot scripts (PathFoundation/PathGen-1.6M,
# Zero-shot_classification/clip_acc_{crc,SICAP_v2,BACH,osteo}.py), as they build them: template.format(name.lower())
PAPER_PROMPTS = {
    "crc100k": [
        "An H&E patch of adipose", "An H&E patch of background", "An H&E patch of debris",
        "An H&E patch of lymphocytes", "An H&E patch of mucus", "An H&E patch of smooth muscle",
        "An H&E patch of normal colon mucosa", "An H&E patch of cancer-associated stroma",
        "An H&E patch of colorectal adenocarcinoma epithelium",
    ],
    "sicapv2": [
        "An H&E image of non-cancerous",
        "An H&E image of gleason grade 3: atrophic well differentiated and dense glandular regions",
        "An H&E image of gleason grade 4: cribriform, ill-formed, large-fused and papillary glandular patterns",
        "An H&E image of gleason grade 5: isolated cells or file of cells, nests of cells without lumina formation "
        "and pseudo-rosetting patterns",
    ],
    "bach": [
        "An H&E image of benign tissue", "An H&E image of in-situ carcinoma", "An H&E image of invasive carcinoma",
        "An H&E image of normal tissue",
    ],
    "osteo": [
        "An H&E image patch of non-tumor", "An H&E image patch of necrotic tumor", "An H&E image patch of viable tumor",
    ],
}  # fmt: skip


def prompts(spec) -> list[str]:
    """Every prompt zero-shot embeds, class by class (tasks.clip.metrics.class_weights)."""
    return [template.format(name) for key in spec.folders for name in spec.names[key] for template in spec.templates]


# -- detection ------------------------------------------------------------------------------------------------


def test_each_layout_is_detected_as_its_own_format_only(tmp_path):
    folders = {name: build(tmp_path) for name, build in BUILDERS.items()}
    for name, folder in folders.items():
        assert [f for f in A1_FORMATS if A1_FORMATS[f].detect(folder)] == [name], folder
        assert detect_format(folder, list(A1_FORMATS.values())).name == name
    # the root holding them all is none of them, and each is found once, at its own folder
    assert not any(fmt.detect(tmp_path) for fmt in A1_FORMATS.values())
    found = find_datasets(tmp_path, list(A1_FORMATS.values()))
    assert found == {name: [folder] for name, folder in folders.items()}


def test_every_format_names_a_source_a_layout_and_its_classes():
    for name, fmt in A1_FORMATS.items():
        assert fmt.paper and fmt.source.startswith("https://") and fmt.layout and fmt.title
        assert class_spec(name).folders
    for name, expected in PAPER_PROMPTS.items():  # one prompt per class, exactly the paper's
        assert prompts(class_spec(name)) == expected, name


# -- PCam -----------------------------------------------------------------------------------------------------


def test_pcam_reads_the_official_splits_lazily_from_hdf5(tmp_path):
    task = _read_one("pcam", make_pcam(tmp_path))
    assert task.test.labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert task.train is not None and task.train.labels.tolist() == [0, 1, 1, 0]
    assert task.probe_test is None  # the probe is scored on the official test split too
    assert task.classes.folders == ["normal", "tumor"]
    assert "camelyonpatch_level_2_split_test_{x,y}.h5" in task.split and "train" in task.split
    images = pickle.loads(pickle.dumps(task.test.images))  # a worker process gets the path, not an open file
    for i in range(len(images)):
        pixels = np.asarray(images.load(i))
        assert (
            pixels.shape == (96, 96, 3) and pixels[0, 0, 0] == i and pixels[5, 5, 0] == 100 + 10 * task.test.labels[i]
        )
    assert images.name(2).endswith("camelyonpatch_level_2_split_test_x.h5[2]")


def test_pcam_threads_share_one_handle_and_closing_the_task_closes_it(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    task = _read_one("pcam", make_pcam(tmp_path))
    with ThreadPoolExecutor(4) as pool:  # as evaluate's loading threads read it
        list(pool.map(task.test.images.load, range(6)))
    opened = [handle for (pid, path), handle in pcam._OPEN.items() if str(tmp_path) in path]
    assert len(opened) == 1 and opened[0].id.valid
    task.close()
    assert not opened[0].id.valid and not any(str(tmp_path) in path for _, path in pcam._OPEN)
    assert np.asarray(task.test.images.load(1))[0, 0, 0] == 1  # opened again when asked


def test_pcam_without_train_files_has_no_probe(tmp_path):
    folder = make_pcam(tmp_path)
    (folder / "camelyonpatch_level_2_split_train_y.h5").unlink()
    task = _read_one("pcam", folder)
    assert task.train is None and "no probe" in task.split


def test_pcam_still_gzipped_or_malformed_is_a_clear_error(tmp_path):
    packed = make_pcam(tmp_path / "gz", gzipped=True)
    assert pcam.detect(packed)  # found as downloaded, so the benchmark can say what to do
    with pytest.raises(ValueError, match="gunzip"):
        pcam.read(packed)
    bad = make_pcam(tmp_path / "bad")
    with h5py.File(bad / "camelyonpatch_level_2_split_test_x.h5", "w") as handle:
        handle.create_dataset("x", data=np.zeros((6, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, 96, 96, 3\]"):
        pcam.read(bad)


# -- CRC-100K -------------------------------------------------------------------------------------------------


def test_crc100k_scores_zero_shot_on_nct_crc_he_100k_and_the_probe_on_crc_val_he_7k(tmp_path):
    folder = make_crc100k(tmp_path)
    for given in (folder, folder / "NCT-CRC-HE-100K"):
        task = _read_one("crc100k", given)
        assert task.test.labels.tolist() == list(range(9)) and task.train is task.test
        assert _names(task.test)[0] == "ADI-NCT-AAAA0.tif" and all(n.split("-")[1] == "NCT" for n in _names(task.test))
        assert task.probe_test.labels.tolist() == list(range(9)) and positions_in(task.probe_test, task.test) is None
        assert all(n.split("-")[1] == "CRC" for n in _names(task.probe_test))
        assert positions_in(task.train, task.test).tolist() == list(range(9))  # one embedding serves both
        assert "zero-shot on all of NCT-CRC-HE-100K/" in task.split and "CRC-VAL-HE-7K/" in task.split


def test_crc100k_without_the_held_out_set_has_no_probe_and_without_100k_is_missing(tmp_path):
    folder = make_crc100k(tmp_path, held_out=False)
    task = _read_one("crc100k", folder)
    assert task.train is None and task.probe_test is None and "no probe" in task.split
    (folder / "my-other-dataset").mkdir()
    assert not crc100k.detect(folder) and crc100k.detect(folder / "NCT-CRC-HE-100K")
    only_7k = make_crc100k(tmp_path / "val")
    shutil.rmtree(only_7k / "NCT-CRC-HE-100K")
    assert not crc100k.detect(only_7k) and not crc100k.detect(only_7k / "CRC-VAL-HE-7K")
    with pytest.raises(ValueError, match="holds no NCT-CRC-HE-100K/, the set the paper scores"):
        crc100k.read(only_7k)


# -- SICAPv2 --------------------------------------------------------------------------------------------------


def test_sicapv2_scores_zero_shot_on_train_xlsx_and_the_probe_on_test_xlsx(tmp_path):
    task = _read_one("sicapv2", make_sicapv2(tmp_path))
    assert task.classes.folders == ["NC", "G3", "G4", "G5"]
    assert task.test.labels.tolist() == [0, 1, 2, 3] and task.train is task.test
    assert _names(task.test)[0] == SICAP_ROWS["Train.xlsx"][0][0] and task.test.name == "partition/Test/Train.xlsx"
    assert task.probe_test.labels.tolist() == [3, 2, 0, 1]
    assert "zero-shot on partition/Test/Train.xlsx (4 single-grade patches)" in task.split
    assert "1 Test.xlsx rows without a single grade" in task.split
    assert "1 Test.xlsx rows whose image is not in images/" in task.split


def test_sicapv2_bad_train_sheet_is_a_clear_error_and_a_bad_test_sheet_only_drops_the_probe(tmp_path):
    folder = make_sicapv2(tmp_path)
    sheets = folder / "partition" / "Test"
    book = Workbook()
    book.active.append(["image_name", "Gleason"])
    book.active.append([SICAP_ROWS["Test.xlsx"][0][0], 5])
    book.save(sheets / "Test.xlsx")
    task = _read_one("sicapv2", folder)  # zero-shot needs Train.xlsx only
    assert task.train is None and task.probe_test is None and task.test.labels.tolist() == [0, 1, 2, 3]
    assert "no probe: " in task.split and "lacks the columns NC, G3, G4, G5" in task.split
    (sheets / "Test.xlsx").unlink()
    task = _read_one("sicapv2", folder)
    assert task.train is None and "no probe: SICAPv2 partition" in task.split and "Test.xlsx is missing" in task.split
    book.save(sheets / "Train.xlsx")
    with pytest.raises(ValueError, match="lacks the columns NC, G3, G4, G5"):
        sicapv2.read(folder)
    (sheets / "Train.xlsx").write_text("not a spreadsheet")
    with pytest.raises(ValueError, match="cannot be read as an .xlsx"):
        sicapv2.read(folder)


# -- BACH -----------------------------------------------------------------------------------------------------


def test_bach_scores_zero_shot_on_every_photo_and_the_probe_by_patient_as_eva_splits(tmp_path):
    top = make_bach(tmp_path)
    for given in (top, top.parent):  # the release folder, or the folder the zip was unpacked into
        task = _read_one("bach", given)
        assert task.folder == top
        assert len(task.test.labels) == sum(map(len, BACH_PHOTOS.values()))
        assert_probe_held_out(task)
        assert {n.removesuffix(".tif") for n in _names(task.train)} == BACH_TRAIN
        assert "1 files in Photos/Benign/ not named b001..b100.tif" in task.split
        assert task.test.labels[_names(task.test).index("is040.tif")] == task.classes.folders.index("InSitu")


def test_bach_partial_download_with_one_side_of_the_patient_split_scores_zero_shot_without_a_probe(tmp_path):
    top = make_bach(tmp_path)
    for photo in top.glob("Photos/*/*.tif"):
        if photo.stem not in BACH_TRAIN:
            photo.unlink()
    task = _read_one("bach", top)
    assert task.train is None and task.probe_test is None and len(task.test.labels) == len(BACH_TRAIN)
    assert "no probe: every photo there is on kaiko-ai/eva's train side" in task.split


def test_bach_split_tables_match_evas_ranges():
    # eva's train index ranges over the 400 sorted photos (Benign, InSitu, Invasive, Normal, 100 each)
    ranges = [(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)]
    order = ["Benign", "InSitu", "Invasive", "Normal"]
    from_ranges = {(order[i // 100], i % 100 + 1) for a, b in ranges for i in range(a, b)}
    tables = {(cls, n) for cls, numbers in bach.TRAIN_NUMBERS.items() for n in numbers}
    assert tables == from_ranges and len(tables) == 268


# -- Osteo ----------------------------------------------------------------------------------------------------


def test_osteo_scores_zero_shot_on_every_tile_mixed_ones_viable_and_splits_the_probe_by_slide(tmp_path):
    task = _read_one("osteo", make_osteo(tmp_path))
    assert task.classes.folders == ["Non-Tumor", "Non-Viable-Tumor", "Viable"]
    expected = {
        osteo._key(name) + ".jpg": cls.replace("viable: non-viable", "Viable") for name, cls, _, _ in OSTEO_ROWS
    }
    seen = {name.lower(): task.classes.folders[label] for name, label in _labelled(task, task.test).items()}
    assert seen == expected
    assert_probe_held_out(task)
    slides = [{osteo._slide(Path(n).stem.lower()) for n in _names(s)} for s in (task.train, task.probe_test)]
    assert not slides[0] & slides[1]
    assert "1 mixed 'viable: non-viable' tiles labelled viable tumour" in task.split
    assert "1 rows with no tile file" in task.split


def test_osteo_table_without_its_columns_is_a_clear_error(tmp_path):
    folder = make_osteo(tmp_path)
    (folder / "ML_Features_1144.csv").write_text("name,label\nCase 3 A10-10547-25283,Viable\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) image.name, classification"):
        osteo.read(folder)
