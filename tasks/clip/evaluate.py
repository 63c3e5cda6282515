"""Evaluate an open_clip model the way pathology CLIP models are compared, on labelled patch datasets.

A dataset is a folder with one folder per class and a class file (``--classes``; or ``train/`` and ``test/``
splits, each with one folder per class), or a benchmark dataset as downloaded, read by its format's reader
(``tasks/benchmark/readers/``; ``--format``, or detected from its files). Either way it becomes one or more
``BenchmarkTask``, and every task is evaluated the same way (:func:`evaluate_dataset`): zero-shot classification,
ensembling every class name and template, on its test split; with a train split, the linear probe ``eval.probe``
names (``tasks/clip/probe.py``) on frozen image features. Retrieval recall uses pairs held out of training
(``holdout/`` tars of an export). Results are JSON-ready dicts; ``publish`` writes them to
``eval/<run>/<task>.json`` with a confusion-matrix PNG beside them.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathgen.settings import EvalSettings
from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, Split, detect_format, folder_split, formats
from tasks.clip.metrics import (
    class_weights,
    classification_metrics,
    confusion_png,
    has_splits,
    load_class_spec,
    retrieval_recall,
    zero_shot_predict,
)
from tasks.clip.webdataset import training_tars
from tasks.selection.embedding import EmbeddingModel, PatchEmbedder
from tasks.slides.pictures import random_weights_banner
from tasks.store.objects import Store

CLASS_FOLDERS = "folders"  # the format of a class-folder dataset given with --classes
LOAD_THREADS = 4  # images decoded at once while the model embeds: decoding, not the model, bounds a CPU run


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


def embed_split(model: EmbeddingModel, split: Split, batch_size: int) -> np.ndarray:
    """The split's image features, [N, D]; images are read a batch at a time, never all at once."""
    embedder = PatchEmbedder(model, batch_size)
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for start in range(0, len(split.images), batch_size):
            indices = range(start, min(start + batch_size, len(split.images)))
            for image in pool.map(split.images.load, indices):  # a bad image raises a ValueError naming it
                embedder.add(np.asarray(image))
    return embedder.finish()


def evaluate_dataset(model: EmbeddingModel, task: BenchmarkTask, cfg: EvalSettings) -> dict[str, Any]:
    """Zero-shot on the task's test split and, when it has a train split, the linear probe ``cfg.probe`` trained
    there and scored on ``probe_test`` (else on the test split). A probe that cannot be fitted (one class in the
    train split) is recorded with its reason; zero-shot still counts."""
    spec = task.classes
    test_x = embed_split(model, task.test, cfg.batch_size)
    predicted = zero_shot_predict(test_x, class_weights(model.embed_texts, spec))
    about = model.describe()  # its random_weights counts a checkpoint trained from random too
    probe_test = task.probe_test if task.probe_test is not None else task.test
    result: dict[str, Any] = {
        "dataset": task.name,
        "format": task.format,
        "folder": str(task.folder),
        "split": task.split,
        "test_split": task.test.name,
        "train_split": task.train.name if task.train is not None else None,
        "probe_test_split": probe_test.name if task.train is not None else None,
        "model": about,
        "random_weights": about["random_weights"],
        "classes": spec.folders,
        "templates": spec.templates,
        "zero_shot": classification_metrics(task.test.labels, predicted, spec.folders),
    }
    if task.train is not None:
        from tasks.clip.probe import run_probe

        features = _FeaturesOf(model, cfg.batch_size, task.test, test_x)
        train_x, probe_x = features.of(task.train), features.of(probe_test)
        try:
            result["linear_probe"] = run_probe(
                train_x, task.train.labels, probe_x, probe_test.labels, spec.folders, cfg
            )
        except ValueError as exc:
            result["linear_probe"] = {"method": cfg.probe, "error": str(exc)}
    return result


class _FeaturesOf:
    """Features of a split: the test split's rows when every image of it is one of the test split's (a derived
    train split of a dataset scored whole by zero-shot), else embedded; so no image is embedded twice."""

    def __init__(self, model: EmbeddingModel, batch_size: int, test: Split, test_x: np.ndarray) -> None:
        self.model, self.batch_size, self.test, self.test_x = model, batch_size, test, test_x
        self._rows: dict[str, int] | None = None

    def of(self, split: Split) -> np.ndarray:
        if split is self.test:
            return self.test_x
        if self._rows is None:
            self._rows = {self.test.images.name(i): i for i in range(len(self.test.images))}
        rows = [self._rows.get(split.images.name(i)) for i in range(len(split.images))]
        if all(row is not None for row in rows):
            return self.test_x[np.asarray(rows, dtype=np.int64)]
        return embed_split(self.model, split, self.batch_size)


def folder_task(dataset: Path, classes: Path) -> BenchmarkTask:
    """A folder of class folders with its class file as a task: ``test/`` and ``train/`` when it has them, else
    every image is scored zero-shot and there is nothing to train a probe on."""
    dataset, spec = Path(dataset), load_class_spec(classes)
    if has_splits(dataset):
        test, train = folder_split(dataset / "test", spec, "test"), folder_split(dataset / "train", spec, "train")
        split = f"the test/ folder of {dataset} (zero-shot), its train/ folder for the linear probe"
    else:
        test, train = folder_split(dataset, spec, "all"), None
        split = f"every image under {dataset} (no train/ and test/ folders, so no linear probe)"
    return BenchmarkTask(dataset.name, CLASS_FOLDERS, dataset, spec, test, train, split)


def dataset_format(name: str) -> DatasetFormat:
    known = formats()
    if name not in known:
        raise ValueError(f"unknown dataset format {name!r}; --format takes one of: {', '.join(known)}")
    return known[name]


def read_tasks(dataset: Path, classes: Path | None = None, format_name: str | None = None) -> list[BenchmarkTask]:
    """The tasks a dataset folder holds: with ``classes``, one folder per class; else what the reader of
    ``format_name`` (given, or detected from the folder's files) reads."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise ValueError(
            f"dataset folder {dataset} does not exist (--dataset: a folder as downloaded, or one folder per class "
            "with --classes)"
        )
    if classes is not None:
        if format_name is not None:
            raise ValueError(f"give --classes (a folder per class) or --format {format_name}, not both")
        return [folder_task(dataset, Path(classes))]
    fmt = dataset_format(format_name) if format_name else detect_format(dataset)
    return read_dataset(fmt, dataset)


def read_dataset(fmt: DatasetFormat, folder: Path) -> list[BenchmarkTask]:
    """``fmt.read(folder)``; whatever stops a reader is this download's problem (a file missing or cut short), so
    it is a ValueError naming the folder and the layout expected, and the other datasets go on."""
    try:
        tasks = fmt.read(folder)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the same files fail the same way on a retry
        raise ValueError(
            f"{folder} cannot be read as {fmt.name} ({type(exc).__name__}: {exc}); expected: {fmt.layout}"
        ) from None
    if not tasks:
        raise ValueError(f"{folder} holds no {fmt.name} task; expected: {fmt.layout}")
    return tasks


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
    """One folder of class folders with its class file, plus retrieval on held-out pairs when given."""
    result = evaluate_dataset(model, folder_task(dataset, classes), cfg)
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
    probe = result.get("linear_probe") or {}
    if probe.get("headline"):
        task = f"linear probe ({probe.get('method', 'logistic')})"
        rows.append({"run": run, "dataset": result["dataset"], "task": task, **_headline(probe["headline"])})
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
