"""Model-free part of the PathGen-CLIP evaluation harness: class specs, labelled image folders, prompt ensembles,
zero-shot prediction, classification metrics, linear probes, retrieval recall and a confusion-matrix picture.

Everything here works on plain numpy arrays of features, so it is tested without any model; the code that loads a
checkpoint and embeds images and text passes its encoders in (``text_features``) or their outputs (arrays).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_TEMPLATES: list[str] = [
    "An H&E image of {}.",
    "An H&E stained image of {}.",
    "a histopathology image showing {}.",
    "a histopathology slide of {}.",
    "a photomicrograph of {}.",
    "an image of {} tissue.",
    "a pathology image of {}.",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
TEMPLATES_KEY = "templates"


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    # an all-zero row stays zero instead of becoming NaN (it then scores 0 against everything)
    return x / np.maximum(norms, 1e-12)


# -- class specs and labelled folders ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSpec:
    folders: list[str]  # class folder names, in the file's order: label i is folders[i]
    names: dict[str, list[str]]  # folder -> class names / synonyms put into the templates
    templates: list[str]  # each contains "{}"


def _spec_names(path: Path, folder: str, value: object) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class spec {path}: class {folder!r} must map to a name or a list of names (strings)")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f'class spec {path}: class {folder!r} has no names; give it at least one, e.g. ["{folder}"]')
    return names


def _spec_templates(path: Path, value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ValueError(f'class spec {path}: "{TEMPLATES_KEY}" must be a non-empty list of strings, or be left out')
    for template in value:
        if "{}" not in template:
            raise ValueError(
                f"class spec {path}: template {template!r} has no {{}} for the class name; "
                "add it, e.g. 'an image of {}.'"
            )
    return list(value)


def load_class_spec(path: Path | str) -> ClassSpec:
    """Read a JSON class spec: ``{"folder": ["name", "synonym"], ..., "templates": ["an image of {}."]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"class spec {path} cannot be read ({exc}); it must be a JSON object of folder -> names"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"class spec {path} must be a JSON object mapping each class folder to its names")
    templates = _spec_templates(path, data[TEMPLATES_KEY]) if TEMPLATES_KEY in data else list(DEFAULT_TEMPLATES)
    # dicts keep JSON order, so the file decides the label numbering
    names = {folder: _spec_names(path, folder, value) for folder, value in data.items() if folder != TEMPLATES_KEY}
    if not names:
        raise ValueError(f'class spec {path} names no classes; add entries like "tumor": ["tumor", "carcinoma"]')
    return ClassSpec(folders=list(names), names=names, templates=templates)


@dataclass
class LabelledImages:
    paths: list[Path]
    labels: np.ndarray  # int64, indices into classes
    classes: list[str]  # the spec's folders


def has_splits(folder: Path) -> bool:
    """True when ``folder`` holds a ``train/`` and a ``test/`` split (a linear probe can then run)."""
    folder = Path(folder)
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name
    )


def load_labelled_images(folder: Path, spec: ClassSpec) -> LabelledImages:
    """Images from ``folder/<class folder>/``, one subfolder per class of ``spec``; other subfolders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist; it must hold one subfolder per class")
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(spec.folders):
        sub = folder / name
        images = _images_in(sub) if sub.is_dir() else []
        if not images:
            why = "has no images" if sub.is_dir() else "is missing"
            raise ValueError(
                f"class folder {name!r} in {folder} {why} (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"folders present: {', '.join(present) or 'none'}"
            )
        paths.extend(images)
        labels.extend([label] * len(images))
    return LabelledImages(paths=paths, labels=np.asarray(labels, dtype=np.int64), classes=list(spec.folders))


# -- zero-shot -----------------------------------------------------------------------------------------------


def class_weights(text_features: Callable[[list[str]], np.ndarray], spec: ClassSpec) -> np.ndarray:
    """The CLIP prompt ensemble: per class, the normalised mean of the normalised embeddings of every
    template x name prompt; returns [C, D] unit rows."""
    rows = []
    for folder in spec.folders:
        prompts = [template.format(name) for name in spec.names[folder] for template in spec.templates]
        emb = np.asarray(text_features(prompts), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError(f"text_features returned shape {emb.shape} for {len(prompts)} prompts; expected [n, D]")
        # normalise before averaging so that no prompt outweighs the others by its norm
        rows.append(_l2_normalise(emb).mean(axis=0))
    return _l2_normalise(np.stack(rows))


def zero_shot_predict(image_features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Index of the class weight with the highest cosine similarity to each image feature."""
    logits = _l2_normalise(image_features) @ _l2_normalise(weights).T
    return np.argmax(logits, axis=1).astype(np.int64)


# -- classification metrics ----------------------------------------------------------------------------------


def _labels(y: np.ndarray | Sequence[int], n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what} has labels outside 0..{n_classes - 1}")
    return y


def classification_metrics(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], classes: list[str]
) -> dict:
    """Accuracy, balanced accuracy, support-weighted F1, per-class recall and the confusion matrix (rows true,
    columns predicted), by scikit-learn's metrics over every class of ``classes``, as JSON types."""
    from sklearn import metrics as skm  # imported here: the benchmark readers import this module for its specs

    c = len(classes)
    t, p = _labels(y_true, c, "y_true"), _labels(y_pred, c, "y_pred")
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no samples to score: y_true is empty")
    labels = np.arange(c)
    present = np.bincount(t, minlength=c) > 0
    recall = skm.recall_score(t, p, labels=labels, average=None, zero_division=0.0)
    return {
        "n": int(t.size),
        "accuracy": float(skm.accuracy_score(t, p)),
        # sklearn's balanced_accuracy_score, the mean recall over the classes present in y_true, without the
        # warnings it gives for a class only predicted or a single class (expected here, not worth a warning)
        "balanced_accuracy": float(recall[present].mean()),
        # F1 = 2TP / (2TP + FP + FN) per class, weighted by true support: a class never true has weight 0
        "weighted_f1": float(skm.f1_score(t, p, labels=labels, average="weighted", zero_division=0.0)),
        "per_class_recall": {name: float(recall[i]) if present[i] else None for i, name in enumerate(classes)},
        "confusion": skm.confusion_matrix(t, p, labels=labels).tolist(),
    }


# -- linear probe ---------------------------------------------------------------------------------------------


def _fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float, max_iter: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression  # imported here: only the probe needs scikit-learn

    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(train_x, train_y)
    return model.predict(test_x).astype(np.int64)


def _k_shot_indices(train_y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    picked = []
    for label in np.unique(train_y):
        idx = np.flatnonzero(train_y == label)
        # a class with fewer than k examples gives all it has rather than being dropped
        picked.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(picked))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray | Sequence[int],
    test_x: np.ndarray,
    test_y: np.ndarray | Sequence[int],
    classes: list[str],
    c: float = 1.0,
    shots: Sequence[int] = (),
    seeds: int = 3,
    max_iter: int = 1000,
) -> dict:
    """Logistic regression on L2-normalised features: the full train set, then k examples per class over seeds."""
    train_x, test_x = _l2_normalise(train_x), _l2_normalise(test_x)
    train_y = _labels(train_y, len(classes), "train_y")
    test_y = _labels(test_y, len(classes), "test_y")
    if np.unique(train_y).size < 2:
        raise ValueError("a linear probe needs at least two classes in the training set; add images of another class")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    result: dict = {
        "full": classification_metrics(test_y, _fit_predict(train_x, train_y, test_x, c, max_iter), classes),
        "shots": {},
    }
    for k in shots:
        if k < 1:
            raise ValueError(f"shots must be positive, got {k}")
        runs = []
        for seed in range(seeds):
            idx = _k_shot_indices(train_y, k, np.random.default_rng(seed))
            runs.append(
                classification_metrics(test_y, _fit_predict(train_x[idx], train_y[idx], test_x, c, max_iter), classes)
            )
        acc = np.array([r["accuracy"] for r in runs])
        result["shots"][str(k)] = {
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()),  # population std (ddof=0) over the seeds
            "balanced_accuracy_mean": float(np.mean([r["balanced_accuracy"] for r in runs])),
            "seeds": seeds,
        }
    return result


# -- retrieval ------------------------------------------------------------------------------------------------


def _recall_at(similarity: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    n = similarity.shape[0]
    true_score = np.diag(similarity)[:, None]
    # pessimistic ties: the rank of the true match counts every other item scoring at least as high as it, so a
    # tie never helps (a model that scores everything equal gets no credit); sklearn's top_k_accuracy_score breaks
    # ties by index instead, which would give such a model credit, so recall@k stays written out here
    others = similarity >= true_score
    np.fill_diagonal(others, False)
    rank = others.sum(axis=1)  # 0 = the true match is strictly first
    return {f"R@{k}": float(np.mean(rank < min(k, n))) for k in ks}


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways for paired features: image i matches text i; cosine similarity."""
    image_features, text_features = np.asarray(image_features), np.asarray(text_features)
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"paired features must be [N, D] of one shape, got {image_features.shape} and {text_features.shape}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("no pairs to score")
    if any(k < 1 for k in ks):
        raise ValueError(f"recall ks must be positive, got {list(ks)}")
    similarity = _l2_normalise(image_features) @ _l2_normalise(text_features).T  # rows images, columns texts
    return {
        "n": int(similarity.shape[0]),
        "image_to_text": _recall_at(similarity, ks),
        "text_to_image": _recall_at(similarity.T, ks),
    }


# -- confusion-matrix picture ---------------------------------------------------------------------------------

_WHITE = np.array([255.0, 255.0, 255.0])
_DARK_BLUE = np.array([8.0, 48.0, 107.0])
_MAX_LABEL = 24  # characters; longer class names are shortened so the picture stays readable
_PAD = 8
_FONT_SIZE = 13  # the default FreeType font; Pillow without FreeType falls back to its fixed bitmap font
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _shorten(name: str, limit: int = _MAX_LABEL) -> str:
    return name if len(name) <= limit else name[: limit - 2] + ".."


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: _Font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def text_image(text: str, font: _Font, rotate: bool = False, margin: int = 1) -> Image.Image:
    """Black text on white, turned to read bottom-to-top when ``rotate`` (column labels take little width then)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    img = Image.new("RGB", (max(1, int(right - left)) + 2 * margin, max(1, int(bottom - top)) + 2 * margin), "white")
    ImageDraw.Draw(img).text((margin - left, margin - top), text, fill="black", font=font)
    return img.rotate(90, expand=True) if rotate else img


def _cell_colour(value: float) -> tuple[int, int, int]:
    rgb = _WHITE + (_DARK_BLUE - _WHITE) * min(max(value, 0.0), 1.0)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _save_png_atomically(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file in the same folder, then a rename: readers never see a half-written PNG
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _draw_cells(image: Image.Image, counts: np.ndarray, origin: tuple[int, int], cell: int, font: _Font) -> None:
    draw = ImageDraw.Draw(image)
    rows = counts.sum(axis=1, keepdims=True)
    shade = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)  # row-normalised: per-class recall
    x0, y0 = origin
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell, y0 + (i + 1) * cell)
            draw.rectangle(box, fill=_cell_colour(float(shade[i, j])), outline=(200, 200, 200))
            text = str(int(counts[i, j]))
            w, h = _text_size(draw, text, font)
            colour = "white" if shade[i, j] > 0.5 else "black"  # keep the count readable on dark cells
            left, top, _, _ = draw.textbbox((0, 0), text, font=font)
            draw.text((box[0] + (cell - w) / 2 - left, box[1] + (cell - h) / 2 - top), text, fill=colour, font=font)


def confusion_png(confusion: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """A confusion-matrix PNG: rows true, columns predicted, cells shaded by row-normalised count."""
    counts = np.asarray(confusion, dtype=np.int64)
    c = len(classes)
    if counts.shape != (c, c):
        raise ValueError(f"confusion must be {c}x{c} for {c} classes, got shape {counts.shape}")
    font = ImageFont.load_default(size=_FONT_SIZE)
    labels = [_shorten(name) for name in classes]
    row_imgs = [text_image(lab, font, rotate=False) for lab in labels]
    col_imgs = [text_image(lab, font, rotate=True) for lab in labels]
    true_img, pred_img = text_image("true", font, rotate=True), text_image("predicted", font, rotate=False)
    title_img = text_image(title, font, rotate=False) if title else None
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max(36, _text_size(probe, str(int(counts.max(initial=0))), font)[0] + 12)
    gx = _PAD + true_img.width + _PAD + max((im.width for im in row_imgs), default=0) + _PAD
    gy = _PAD + (title_img.height + _PAD if title_img else 0)
    col_h = max((im.height for im in col_imgs), default=0)
    width = max(gx + c * cell + _PAD, (title_img.width + 2 * _PAD) if title_img else 0)
    height = gy + c * cell + _PAD + col_h + _PAD + pred_img.height + _PAD
    image = Image.new("RGB", (width, height), "white")
    if title_img:
        image.paste(title_img, ((width - title_img.width) // 2, _PAD))
    image.paste(true_img, (_PAD, gy + (c * cell - true_img.height) // 2))
    for i, im in enumerate(row_imgs):  # right-aligned against the grid
        image.paste(im, (gx - _PAD - im.width, gy + i * cell + (cell - im.height) // 2))
    for j, im in enumerate(col_imgs):
        image.paste(im, (gx + j * cell + (cell - im.width) // 2, gy + c * cell + _PAD))
    image.paste(pred_img, (gx + (c * cell - pred_img.width) // 2, gy + c * cell + _PAD + col_h + _PAD))
    _draw_cells(image, counts, (gx, gy), cell, font)
    _save_png_atomically(image, Path(path))
