"""Evaluate an open_clip model the way pathology CLIP models are compared, on labelled patch folders.

A dataset folder holds one folder per class (or ``train/`` and ``test/`` splits, each with one folder per class).
Zero-shot classification ensembles every class name and template; with splits, a logistic-regression probe on
frozen image features is fitted on ``train/`` and scored on ``test/``. Retrieval recall uses pairs held out of
training (``holdout/`` tars of an export). Results are a JSON-ready dict; ``publish`` writes them to
``eval/<run>/<dataset>.json`` with a confusion-matrix PNG beside them.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathgen.settings import EvalSettings
from tasks.clip.metrics import (
    ClassSpec,
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
from tasks.clip.webdataset import training_tars
from tasks.selection.embedding import EmbeddingModel, PatchEmbedder
from tasks.slides.pictures import random_weights_banner
from tasks.store.objects import Store


def embed_images(model: EmbeddingModel, images: list[Image.Image | Path], batch_size: int) -> np.ndarray:
    embedder = PatchEmbedder(model, batch_size)
    for image in images:
        try:
            picture = image if isinstance(image, Image.Image) else Image.open(image)
            rgb = np.asarray(picture.convert("RGB"))
        except OSError as exc:  # the dataset's content: named, and the unit fails instead of retrying
            raise ValueError(f"{image} cannot be read as an image ({exc}); remove or replace it") from None
        embedder.add(rgb)
    return embedder.finish()


def evaluate_dataset(model: EmbeddingModel, dataset: Path, spec: ClassSpec, cfg: EvalSettings) -> dict[str, Any]:
    """Zero-shot (on ``test/`` when the folder has splits) and, with splits, the linear probe."""
    split = has_splits(dataset)
    test = load_labelled_images(dataset / "test" if split else dataset, spec)
    test_x = embed_images(model, list(test.paths), cfg.batch_size)
    weights = class_weights(model.embed_texts, spec)
    predicted = zero_shot_predict(test_x, weights)
    about = model.describe()  # its random_weights counts a checkpoint trained from random too
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "model": about,
        "random_weights": about["random_weights"],
        "classes": spec.folders,
        "templates": spec.templates,
        "zero_shot": classification_metrics(test.labels, predicted, spec.folders),
    }
    if split:
        train = load_labelled_images(dataset / "train", spec)
        train_x = embed_images(model, list(train.paths), cfg.batch_size)
        result["linear_probe"] = linear_probe(
            train_x, train.labels, test_x, test.labels, spec.folders, cfg.probe_c, cfg.shots, cfg.seeds
        )
    return result


def read_holdout(folder: Path, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and captions of the held-out tars of an export (the pairs no training step saw), the first ``limit``
    in tar and key order, so every evaluation of a run scores the same pairs."""
    if not (folder / "sizes.json").is_file():
        raise ValueError(f"{folder} is not the holdout/ folder of a pathgen export (no sizes.json); --holdout DIR")
    images, captions = [], []
    for tar_path in training_tars(folder.parent, holdout=True):  # listed in sizes.json: this export's own tars
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in members.values():
            image = next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)
            if image is not None and "txt" in sample:
                images.append(Image.open(io.BytesIO(image)))
                captions.append(sample["txt"].decode())
            if limit and len(images) >= limit:
                return images, captions
    return images, captions


def holdout_retrieval(model: EmbeddingModel, folder: Path, cfg: EvalSettings) -> dict[str, Any] | None:
    """Recall@k among at most ``eval.retrieval_pairs`` held-out pairs (the similarity matrix is N x N)."""
    images, captions = read_holdout(folder, cfg.retrieval_pairs)
    if len(images) < 2:
        return None
    image_x = embed_images(model, images, cfg.batch_size)
    text_x = np.concatenate([model.embed_texts(captions[i : i + 256]) for i in range(0, len(captions), 256)])
    return retrieval_recall(image_x, text_x) | {"pairs": str(folder)}


def evaluate(
    model: EmbeddingModel, dataset: Path, classes: Path, cfg: EvalSettings, holdout: Path | None = None
) -> dict[str, Any]:
    """One dataset folder with its class file, plus retrieval on held-out pairs when given."""
    dataset, spec = Path(dataset), load_class_spec(classes)
    if not dataset.is_dir():
        raise ValueError(f"dataset folder {dataset} does not exist (--dataset: one folder per class)")
    result = evaluate_dataset(model, dataset, spec, cfg)
    if holdout is not None:
        result["retrieval"] = holdout_retrieval(model, holdout, cfg)
    return result


def publish(store: Store, run: str, result: dict[str, Any], logger: logging.Logger | None = None) -> str:
    """``eval/<run>/<dataset>.json`` and ``<dataset>-confusion.png``; returns the JSON's URI."""
    name = result.get("dataset") or "holdout"
    prefix = f"eval/{run}"
    if "zero_shot" in result:
        with tempfile.TemporaryDirectory() as folder:
            png = Path(folder) / "confusion.png"
            confusion_png(result["zero_shot"]["confusion"], result["classes"], png, confusion_title(name, result))
            if result["random_weights"]:  # said where the picture is looked at, not only in the JSON beside it
                banded = random_weights_banner(np.asarray(Image.open(png).convert("RGB")), "these numbers are noise")
                Image.fromarray(banded).save(png)
            store.put_file(png, f"{prefix}/{name}-confusion.png")
        result = result | {"confusion_png": store.uri(f"{prefix}/{name}-confusion.png")}
    store.write_bytes(f"{prefix}/{name}.json", (json.dumps(result, indent=1, default=str) + "\n").encode())
    if logger:
        logger.info("evaluation of %s on %s: %s", run, name, store.uri(f"{prefix}/{name}.json"))
    return store.uri(f"{prefix}/{name}.json")


def confusion_title(name: str, result: dict[str, Any]) -> str:
    """What the picture shows and how well: the model, then zero-shot accuracy and balanced accuracy on n images."""
    zero = result["zero_shot"]
    model = result["model"]["model"] + (" (RANDOM WEIGHTS)" if result["random_weights"] else "")
    return (
        f"{name}: {model}, zero-shot accuracy {zero['accuracy']:.3f}, "
        f"balanced {zero['balanced_accuracy']:.3f} (n={zero['n']})"
    )


def table_rows(run: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline numbers of one result, as rows of a Prefect table artifact."""
    rows = []
    zero = result.get("zero_shot")
    if zero:
        rows.append({"run": run, "dataset": result["dataset"], "task": "zero-shot", **_headline(zero)})
    probe = (result.get("linear_probe") or {}).get("full")
    if probe:
        rows.append({"run": run, "dataset": result["dataset"], "task": "linear probe", **_headline(probe)})
    retrieval = result.get("retrieval")
    if retrieval:
        for direction in ("image_to_text", "text_to_image"):
            recall = retrieval[direction]
            rows.append({"run": run, "dataset": "held-out pairs", "task": direction, "n": retrieval["n"], **recall})
    for row in rows:
        row["random_weights"] = bool(result.get("random_weights"))
    return rows


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "n": metrics["n"],
        "accuracy": round(metrics["accuracy"], 4),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "weighted_f1": round(metrics["weighted_f1"], 4),
    }
