"""Slide features as h5 (tasks/mil/h5.py): our files read the way CLAM and TRIDENT read them, and theirs read by us.

The CLAM-written fixture follows CLAM's own writer (``utils/file_utils.py:save_hdf5`` called by
``extract_features_fp.py``): chunked, resizable datasets, float32 features, int32 coords and no attributes at all.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tasks.mil.h5 import FeaturesFileError, read_features_folder, read_slide_h5, write_slide_h5


def _slide(n: int = 7, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    coords = rng.integers(0, 100_000, size=(n, 2))
    return feats, coords


def _write(path: Path, feats: np.ndarray, coords: np.ndarray, **extra) -> Path:
    return write_slide_h5(
        path, feats, coords, patch_size=224, patch_level=0, mpp=0.5, encoder="ViT-B-16:abc123", **extra
    )


def _clam_style(path: Path, assets: dict[str, np.ndarray], chunk_size: int = 32) -> Path:
    """Write as CLAM's save_hdf5 does in extract_features_fp.py (attr_dict=None), in two appended batches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for batch, mode in ((slice(0, 3), "w"), (slice(3, None), "a")):
        with h5py.File(path, mode) as f:
            for key, val in assets.items():
                val = val[batch]
                if key not in f:
                    dset = f.create_dataset(
                        key,
                        shape=val.shape,
                        maxshape=(None,) + val.shape[1:],
                        chunks=(chunk_size,) + val.shape[1:],
                        dtype=val.dtype,
                    )
                    dset[:] = val
                else:
                    dset = f[key]
                    dset.resize(len(dset) + val.shape[0], axis=0)
                    dset[-val.shape[0] :] = val
    return path


def test_round_trip_keeps_vectors_coords_and_attributes(tmp_path):
    feats, coords = _slide()
    path = _write(tmp_path / "slide_a.h5", feats, coords, patch_size_level0=448, extra_attrs={"tiles": [1, 2]})
    slide = read_slide_h5(path)
    assert slide.slide_id == "slide_a"
    assert slide.features.dtype == torch.float32
    assert torch.equal(slide.features, torch.from_numpy(feats))
    np.testing.assert_array_equal(slide.coords, coords)
    assert (slide.patch_size, slide.patch_level, slide.mpp, slide.encoder) == (224, 0, 0.5, "ViT-B-16:abc123")
    assert slide.attrs["patch_size_level0"] == 448
    assert slide.attrs["tiles"] == "[1, 2]"  # structured values are JSON, as TRIDENT stores them
    assert [p.name for p in tmp_path.iterdir()] == ["slide_a.h5"]  # no temporary file left behind


def test_written_file_reads_with_plain_h5py_as_clam_and_trident_do(tmp_path):
    feats, coords = _slide(n=5, dim=8)
    path = _write(tmp_path / "h5_files" / "s1.h5", feats, coords, patch_size_level0=448)
    with h5py.File(path, "r") as f:  # Generic_MIL_Dataset.__getitem__
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["features"][:].dtype == np.float32 and f["features"].shape == (5, 8)
        assert f["coords"].shape == (5, 2) and f["coords"].dtype.kind == "i"
        assert f["coords"].attrs["patch_level"] == 0  # Whole_Slide_Bag_FP
        assert f["coords"].attrs["patch_size"] == 224
        assert f["coords"].attrs["patch_size_level0"] == 448  # TRIDENT slide encoders
        assert f["features"].attrs["encoder"] == "ViT-B-16:abc123"
        assert f.attrs["mpp"] == 0.5 and f.attrs["feature_dim"] == 8 and f.attrs["num_patches"] == 5


def test_file_written_the_clam_way_is_read(tmp_path):
    feats, coords = _slide(n=9, dim=12, seed=3)
    path = _clam_style(tmp_path / "tumor_001.h5", {"features": feats, "coords": coords.astype(np.int32)})
    slide = read_slide_h5(path)
    assert slide.slide_id == "tumor_001"
    assert torch.equal(slide.features, torch.from_numpy(feats))
    np.testing.assert_array_equal(slide.coords, coords)
    assert slide.coords.dtype == np.int64
    assert (slide.patch_size, slide.patch_level, slide.mpp, slide.encoder) == (None, None, None, None)


def test_file_written_the_trident_way_is_read_with_its_attributes(tmp_path):
    """As trident/IO.py:save_h5 stores WSI.extract_patch_features' output (int64 coords, coords_to_h5's attrs)."""
    feats, coords = _slide(n=6, dim=10, seed=5)
    path = tmp_path / "TCGA-XX.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, chunks=(1, 10), maxshape=(None, 10))
        f["features"].attrs.update({"name": "TCGA-XX", "savetodir": str(tmp_path), "encoder": "None"})
        f.create_dataset("coords", data=coords.astype(np.int64), chunks=(1, 2), maxshape=(None, 2))
        f["coords"].attrs.update(
            {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20}
        )
    slide = read_slide_h5(path)
    np.testing.assert_array_equal(slide.coords, coords)
    assert torch.equal(slide.features, torch.from_numpy(feats))
    assert slide.patch_size == 256 and slide.attrs["patch_size_level0"] == 512
    assert slide.encoder is None  # TRIDENT writes an unknown encoder as the string 'None'


def test_folder_reads_clam_h5_files_subfolder_keyed_by_stem(tmp_path):
    for i, name in enumerate(["normal_001", "tumor_002"]):
        feats, coords = _slide(n=4 + i, dim=6, seed=i)
        _clam_style(tmp_path / "h5_files" / f"{name}.h5", {"features": feats, "coords": coords})
    (tmp_path / "h5_files" / ".tumor_003.h5.0f.tmp").write_bytes(b"unfinished")  # an interrupted write
    slides = read_features_folder(tmp_path)
    assert sorted(slides) == ["normal_001", "tumor_002"]
    assert [len(s.features) for s in slides.values()] == [4, 5]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    feats, coords = _slide()
    path = tmp_path / "s.h5"

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tasks.mil.h5.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _write(path, feats, coords)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("assets", "message"),
    [
        ({"features": np.zeros((3, 4), np.float32)}, r"bad\.h5: no 'coords' dataset"),
        ({"coords": np.zeros((3, 2), np.int32)}, r"bad\.h5: no 'features' dataset"),
        (
            {"features": np.zeros((3, 4), np.float32), "coords": np.zeros((4, 2), np.int32)},
            r"bad\.h5: 3 feature rows but 4 coords",
        ),
        (
            {"features": np.zeros((1, 3, 4), np.float32), "coords": np.zeros((3, 2), np.int32)},
            r"bad\.h5: 'features' has shape \(1, 3, 4\); it must be 2-D",
        ),
        (
            {"features": np.zeros((3, 4), np.float32), "coords": np.zeros((3, 3), np.int32)},
            r"bad\.h5: 'coords' has shape \(3, 3\)",
        ),
    ],
)
def test_bad_file_is_refused_naming_it(tmp_path, assets, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            f.create_dataset(key, data=val)
    with pytest.raises(FeaturesFileError, match=message):
        read_slide_h5(path)
    with pytest.raises(FeaturesFileError, match=message):
        read_features_folder(tmp_path)


def test_mixed_dimensions_across_slides_are_refused_naming_both(tmp_path):
    _write(tmp_path / "a.h5", *_slide(dim=16))
    _write(tmp_path / "b.h5", *_slide(dim=32))
    with pytest.raises(FeaturesFileError, match=r"b\.h5: features have 32 dimensions but a\.h5 has 16"):
        read_features_folder(tmp_path)


def test_not_h5_missing_and_empty_are_refused_naming_them(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeaturesFileError, match=r"junk\.h5: not a readable h5 file"):
        read_slide_h5(tmp_path / "junk.h5")
    with pytest.raises(FeaturesFileError, match=r"nope\.h5: no such features file"):
        read_slide_h5(tmp_path / "nope.h5")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeaturesFileError, match=r"empty: no <slide_id>\.h5 files"):
        read_features_folder(empty)


def test_writer_refuses_bad_arrays_naming_the_target(tmp_path):
    feats, coords = _slide(n=4)
    with pytest.raises(FeaturesFileError, match=r"out\.h5: 4 feature rows but 3 coords"):
        _write(tmp_path / "out.h5", feats, coords[:3])
    with pytest.raises(FeaturesFileError, match=r"out\.h5: extra attribute\(s\) mpp would overwrite"):
        _write(tmp_path / "out.h5", feats, coords, extra_attrs={"mpp": 1.0})
    assert list(tmp_path.iterdir()) == []
