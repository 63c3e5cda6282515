"""The model-free PathGen-CLIP evaluation pieces: specs, folders, prompt ensembles, metrics, probes, retrieval, PNG."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from tasks.clip.metrics import (
    DEFAULT_TEMPLATES,
    ClassSpec,
    _k_shot_indices,
    class_weights,
    classification_metrics,
    confusion_png,
    has_splits,
    linear_probe,
    load_class_spec,
    load_labelled_images,
    retrieval_recall,
    zero_shot_predict,
)

# -- zero-shot and classification metrics, by hand ------------------------------------------------------------

# class weights deliberately not unit length: cosine similarity must ignore their norms
WEIGHTS = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
IMAGES = np.array(
    [
        [2.0, 1.0, 0.0],  # true 0 -> 0
        [3.0, 0.0, 1.0],  # true 0 -> 0
        [0.0, 1.0, 5.0],  # true 0 -> 2
        [0.0, 4.0, 1.5],  # true 1 -> 1 by cosine (4 > 1.5); a raw dot product would say 2 (1*4 < 3*1.5)
        [1.0, 3.0, 0.0],  # true 1 -> 1
        [5.0, 1.0, 0.0],  # true 1 -> 0
        [0.0, 0.0, 2.0],  # true 2 -> 2
    ]
)
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2])


def test_zero_shot_and_metrics_by_hand():
    pred = zero_shot_predict(IMAGES, WEIGHTS)
    assert pred.dtype == np.int64
    assert pred.tolist() == [0, 0, 2, 1, 1, 0, 2]
    m = classification_metrics(Y_TRUE, pred, ["tumor", "stroma", "necrosis"])
    assert m["n"] == 7
    # rows true, columns predicted
    assert m["confusion"] == [[2, 0, 1], [1, 2, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(5 / 7)  # diagonal 2 + 2 + 1 = 5 of 7
    assert m["per_class_recall"] == pytest.approx({"tumor": 2 / 3, "stroma": 2 / 3, "necrosis": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(7 / 9)  # (2/3 + 2/3 + 1) / 3
    # F1 = 2TP / (2TP + FP + FN): tumor 4 / (4 + 1 + 1) = 2/3, stroma 4 / (4 + 0 + 1) = 4/5,
    # necrosis 2 / (2 + 1 + 0) = 2/3
    # weighted by support 3, 3, 1: (3 * 2/3 + 3 * 4/5 + 1 * 2/3) / 7 = (2 + 12/5 + 2/3) / 7 = (76/15) / 7 = 76/105
    assert m["weighted_f1"] == pytest.approx(76 / 105)
    json.dumps(m)  # plain Python types only
    assert all(type(v) is float for v in (m["accuracy"], m["balanced_accuracy"], m["weighted_f1"]))


def test_class_without_true_samples_has_no_recall():
    m = classification_metrics([0, 0], [0, 2], ["a", "b", "c"])
    assert m["per_class_recall"] == {"a": 0.5, "b": None, "c": None}
    assert m["balanced_accuracy"] == 0.5  # only class a occurs in y_true
    assert m["confusion"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    # F1 of a: 2 / (2 + 0 + 1) = 2/3, the only class with support
    assert m["weighted_f1"] == pytest.approx(2 / 3)


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 0], ["a", "b"])
    with pytest.raises(ValueError, match="y_pred has 1"):
        classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], ["a", "b"])


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = 5
    # odd seeds leave the last class out of y_true, to check that its missing recall is handled as sklearn does
    y_true = rng.integers(0, c - (seed % 2), size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, c, size=200))
    m = classification_metrics(y_true, y_pred, [f"c{i}" for i in range(c)])
    labels = list(range(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the class absent from y_true
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
        f1 = skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["weighted_f1"] == pytest.approx(f1)
    assert m["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    for i in range(c):
        expected = recall[i] if (y_true == i).any() else None
        assert m["per_class_recall"][f"c{i}"] == (pytest.approx(expected) if expected is not None else None)


# -- prompt ensemble -----------------------------------------------------------------------------------------


def test_class_weights_is_the_normalised_mean_of_normalised_prompts():
    vectors = {
        "a x.": [3.0, 0.0, 0.0],  # norm 3 -> (1, 0, 0)
        "b x.": [0.0, 0.5, 0.0],  # norm 0.5 -> (0, 1, 0)
        "a y.": [0.0, 0.0, 2.0],
        "b y.": [0.0, 0.0, 5.0],
        "a why.": [0.0, 0.0, 1.0],
        "b why.": [0.0, 7.0, 0.0],
    }
    calls: list[list[str]] = []

    def text_features(prompts: list[str]) -> np.ndarray:
        calls.append(prompts)
        return np.array([vectors[p] for p in prompts], dtype=np.float32)

    spec = ClassSpec(folders=["X", "Y"], names={"X": ["x"], "Y": ["y", "why"]}, templates=["a {}.", "b {}."])
    w = class_weights(text_features, spec)
    assert w.shape == (2, 3)
    assert calls == [["a x.", "b x."], ["a y.", "b y.", "a why.", "b why."]]
    # X: mean of (1,0,0) and (0,1,0) = (.5,.5,0) -> (1/sqrt2, 1/sqrt2, 0); averaging raw vectors would lean to x
    assert w[0] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    # Y: mean of (0,0,1), (0,0,1), (0,0,1), (0,1,0) = (0, 1/4, 3/4) -> (0, 1, 3) / sqrt(10)
    assert w[1] == pytest.approx([0.0, 1 / math.sqrt(10), 3 / math.sqrt(10)])
    assert np.linalg.norm(w, axis=1) == pytest.approx([1.0, 1.0])


# -- retrieval -----------------------------------------------------------------------------------------------


def test_retrieval_recall_by_hand_with_pessimistic_ties():
    e = np.eye(4)
    texts = np.stack([e[0], e[1], e[1], e[3]])  # texts 1 and 2 are identical: a tie for images 1 and 2
    images = np.stack([e[0], e[1], e[1], np.array([3.0, 2.0, 0.0, 1.0])])
    r = retrieval_recall(images, texts, ks=(1, 2, 3, 4, 10))
    assert r["n"] == 4
    # image -> text similarities and the true text's 0-based pessimistic rank:
    #   image 0 = e0: [1, 0, 0, 0]                    -> rank 0
    #   image 1 = e1: [0, 1, 1, 0], text 2 ties       -> rank 1 (an optimistic rule would say 0)
    #   image 2 = e1: [0, 1, 1, 0], text 1 ties       -> rank 1
    #   image 3 = (3,2,0,1)/sqrt14: [3, 2, 2, 1]/sqrt14 -> rank 3
    # ranks [0, 1, 1, 3]: R@1 = 1/4, R@2 = R@3 = 3/4, R@4 = 1, R@10 clamped to R@4 = 1
    assert r["image_to_text"] == pytest.approx({"R@1": 0.25, "R@2": 0.75, "R@3": 0.75, "R@4": 1.0, "R@10": 1.0})
    # text -> image:
    #   text 0 = e0: [1, 0, 0, 3/sqrt14 = 0.80]        -> rank 0
    #   text 1 = e1: [0, 1, 1, 2/sqrt14], image 2 ties -> rank 1
    #   text 2 = e1: same, image 1 ties                -> rank 1
    #   text 3 = e3: [0, 0, 0, 1/sqrt14]               -> rank 0
    # ranks [0, 1, 1, 0]: R@1 = 1/2, R@2 onwards = 1
    assert r["text_to_image"] == pytest.approx({"R@1": 0.5, "R@2": 1.0, "R@3": 1.0, "R@4": 1.0, "R@10": 1.0})


def test_retrieval_all_equal_scores_gets_no_top1_credit():
    r = retrieval_recall(np.ones((3, 2)), np.ones((3, 2)), ks=(1, 3))
    assert r["image_to_text"] == {"R@1": 0.0, "R@3": 1.0}


def test_retrieval_rejects_unpaired_features():
    with pytest.raises(ValueError, match="one shape"):
        retrieval_recall(np.ones((3, 2)), np.ones((4, 2)))


# -- linear probe --------------------------------------------------------------------------------------------


def _two_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, 8))
    centres[0, 0] = centres[1, 1] = 10.0  # different directions: the probe sees L2-normalised features
    y = np.repeat([0, 1], n)
    return centres[y] + rng.normal(size=(2 * n, 8)), y


def test_linear_probe_separates_blobs_and_reports_k_shots():
    train_x, train_y = _two_blobs(40, seed=0)
    test_x, test_y = _two_blobs(20, seed=1)
    r = linear_probe(train_x, train_y, test_x, test_y, ["a", "b"], shots=[1, 5, 100], seeds=3)
    assert r["full"]["accuracy"] == 1.0
    assert r["full"]["n"] == 40
    assert set(r["shots"]) == {"1", "5", "100"}
    for k in ("1", "5", "100"):
        s = r["shots"][k]
        assert set(s) == {"accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "seeds"}
        assert s["seeds"] == 3
        assert 0.0 <= s["accuracy_mean"] <= 1.0
    # 100 shots exceed the 40 per class: every seed trains on the whole set, so no spread
    assert r["shots"]["100"] == {"accuracy_mean": 1.0, "accuracy_std": 0.0, "balanced_accuracy_mean": 1.0, "seeds": 3}
    json.dumps(r)


def test_k_shot_sampling_takes_k_per_class_or_all():
    y = np.array([0] * 10 + [1] * 3 + [2] * 6)
    idx = _k_shot_indices(y, 4, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [4, 3, 4]
    assert len(set(idx.tolist())) == idx.size  # without replacement


def test_linear_probe_needs_two_classes():
    x = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe(x, [1] * 6, x, [1] * 6, ["a", "b"])


# -- class specs ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_class_spec(tmp_path):
    spec = load_class_spec(
        _write(tmp_path / "s.json", json.dumps({"TUM": ["tumor", "carcinoma"], "ADI": "adipose", "templates": ["{}."]}))
    )
    assert spec.folders == ["TUM", "ADI"]  # the file's order, "templates" not a class
    assert spec.names == {"TUM": ["tumor", "carcinoma"], "ADI": ["adipose"]}
    assert spec.templates == ["{}."]
    default = load_class_spec(_write(tmp_path / "d.json", '{"b": "x", "a": "y"}'))
    assert default.folders == ["b", "a"]
    assert default.templates == DEFAULT_TEMPLATES
    assert 5 <= len(DEFAULT_TEMPLATES) <= 8 and all("{}" in t for t in DEFAULT_TEMPLATES)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "cannot be read"),
        ("[1, 2]", "JSON object"),
        ('{"templates": ["{}"]}', "no classes"),
        ('{"a": []}', "no names"),
        ('{"a": [1]}', "list of names"),
        ('{"a": "x", "templates": ["an image of a cell."]}', "has no {}"),
        ('{"a": "x", "templates": []}', "non-empty list"),
    ],
)
def test_load_class_spec_errors(tmp_path, text, match):
    path = _write(tmp_path / "spec.json", text)
    with pytest.raises(ValueError, match=match) as info:
        load_class_spec(path)
    assert str(path) in str(info.value)


def test_load_class_spec_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        load_class_spec(tmp_path / "absent.json")


# -- labelled image folders ----------------------------------------------------------------------------------


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 100, 150)).save(path, format="PNG")


def test_load_labelled_images(tmp_path):
    _png(tmp_path / "a" / "2.png")
    _png(tmp_path / "a" / "1.PNG")  # suffixes are case-insensitive
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _png(tmp_path / "b" / "x.jpeg")
    _png(tmp_path / "extra" / "ignored.png")  # not in the spec
    spec = ClassSpec(folders=["b", "a"], names={"b": ["b"], "a": ["a"]}, templates=["{}"])
    data = load_labelled_images(tmp_path, spec)
    assert [p.relative_to(tmp_path).as_posix() for p in data.paths] == ["b/x.jpeg", "a/1.PNG", "a/2.png"]
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [0, 1, 1]
    assert data.classes == ["b", "a"]


def test_load_labelled_images_missing_or_empty_class(tmp_path):
    _png(tmp_path / "a" / "1.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("")
    missing = ClassSpec(folders=["a", "c"], names={"a": ["a"], "c": ["c"]}, templates=["{}"])
    with pytest.raises(ValueError, match=r"'c' .* is missing.*folders present: a, empty"):
        load_labelled_images(tmp_path, missing)
    empty = ClassSpec(folders=["a", "empty"], names={"a": ["a"], "empty": ["e"]}, templates=["{}"])
    with pytest.raises(ValueError, match=r"'empty' .* has no images"):
        load_labelled_images(tmp_path, empty)


def test_has_splits(tmp_path):
    assert not has_splits(tmp_path)
    (tmp_path / "train").mkdir()
    assert not has_splits(tmp_path)
    (tmp_path / "test").mkdir()
    assert has_splits(tmp_path)


# -- confusion picture ---------------------------------------------------------------------------------------


def test_confusion_png(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "out" / "large.png"
    confusion_png([[5, 1], [0, 7]], ["tumor", "stroma"], small, title="zero-shot")
    classes = ["tumor", "stroma", "necrosis", "lymphocytes", "a very long class name that must be shortened", "x"]
    counts = (np.eye(6, dtype=int) * 20 + 1).tolist()
    confusion_png(counts, classes, large)
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG"
        assert b.width > a.width and b.height > a.height
        pixels = np.asarray(a.convert("RGB")).reshape(-1, 3)
    assert ((pixels == [8, 48, 107]).all(axis=1)).any()  # the stroma row (0, 7) has recall 1: the darkest blue
    # written atomically: nothing but the pictures is left behind
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["large.png", "small.png"]


def test_confusion_png_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="2x2"):
        confusion_png([[1, 2, 3]], ["a", "b"], tmp_path / "c.png")
