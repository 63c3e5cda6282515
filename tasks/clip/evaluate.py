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
from tasks.benchmark.datasets import (
    BenchmarkTask,
    DatasetFormat,
    Split,
    detect_format,
    folder_split,
    formats,
    positions_in,
)
from tasks.clip.metrics import (
    class_weights,
    classification_metrics,
    confusion_png,
    has_splits,
    load_class_spec,
    retrieval_recall,
    zero_shot_predict,
)
from tasks.clip.spec import ModelSpec
from tasks.clip.webdataset import training_tars
from tasks.selection.embedding import EmbeddingModel, PatchEmbedder
from tasks.slides.pictures import random_weights_banner
from tasks.store.objects import Store

CLASS_FOLDERS = "folders"  # the format of a class-folder dataset given with --classes
LOAD_THREADS = 4  # images decoded at once while the model embeds: decoding, not the model, bounds a CPU run
DATASET_KEYS = ("dataset", "classes", "format")  # a dataset entry: {dataset, classes} or {dataset[, format]}
# why a model is RANDOM WEIGHTS, said wherever its numbers are (a trained toy model's numbers are not noise)
NO_WEIGHTS = "no weights loaded: its numbers are noise"
RANDOM_START = (
    "its training run started from random initialisation, not from pretrained weights: a toy model, not comparable "
    "with pretrained ones"
)
_BANNER = {NO_WEIGHTS: "these numbers are noise", RANDOM_START: "a toy model trained from random init"}


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


def random_weights_why(spec: ModelSpec, random_weights: bool) -> str | None:
    """Why a model is RANDOM WEIGHTS (``has_random_weights``), or None: nothing loaded (a bare name, tiny-random),
    or a checkpoint whose run started from random initialisation."""
    if not random_weights:
        return None
    return NO_WEIGHTS if spec.random_weights else RANDOM_START


def evaluate_dataset(model: EmbeddingModel, task: BenchmarkTask, cfg: EvalSettings) -> dict[str, Any]:
    """Zero-shot on the task's test split and, when it has a train split, the linear probe ``cfg.probe`` trained
    there and scored on ``probe_test`` (else on the test split). A probe that cannot be fitted (one class in the
    train split) is recorded with its reason; zero-shot still counts. The task's open files are closed after."""
    try:
        return _evaluate(model, task, cfg)
    finally:
        task.close()  # PCam's HDF5 handles, held only while one evaluation reads them


def _evaluate(model: EmbeddingModel, task: BenchmarkTask, cfg: EvalSettings) -> dict[str, Any]:
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
        "random_why": random_weights_why(ModelSpec(model.name, model.pretrained), about["random_weights"]),
        "classes": spec.folders,
        "templates": spec.templates,
        "zero_shot": classification_metrics(task.test.labels, predicted, spec.folders),
    }
    if task.train is not None:
        result["linear_probe"] = _probe(task, probe_test, _FeaturesOf(model, cfg, task.test, test_x), cfg)
    return result


def _probe(task: BenchmarkTask, scored: Split, features: _FeaturesOf, cfg: EvalSettings) -> dict:
    """The probe ``cfg.probe`` names; the paper probe's per-seed samples are drawn from the labels first and only
    their images embedded (PCam: 256 per class of 262,144 train patches), with the same numbers as embedding all."""
    from tasks.clip.probe import paper_draws, run_probe

    train, draws = task.train, None
    if cfg.probe == "paper":
        draws = paper_draws(train.labels, cfg)
        union = np.unique(np.concatenate(draws))
        train, draws = train.subset(union, train.name), [np.searchsorted(union, d) for d in draws]
    train_x, scored_x = features.of(train), features.of(scored)
    try:
        return run_probe(train_x, train.labels, scored_x, scored.labels, task.classes.folders, cfg, draws)
    except ValueError as exc:
        return {"method": cfg.probe, "error": str(exc)}


class _FeaturesOf:
    """Features of a split: the test split's rows when it is the test split or cut from it (``positions_in``: a
    derived train split of a dataset scored whole by zero-shot), else embedded; so no image is embedded twice."""

    def __init__(self, model: EmbeddingModel, cfg: EvalSettings, test: Split, test_x: np.ndarray) -> None:
        self.model, self.batch_size, self.test, self.test_x = model, cfg.batch_size, test, test_x

    def of(self, split: Split) -> np.ndarray:
        if split is self.test:
            return self.test_x
        rows = positions_in(split, self.test)
        return self.test_x[rows] if rows is not None else embed_split(self.model, split, self.batch_size)


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


def dataset_entry(entry: dict[str, Any]) -> dict[str, str]:
    """A dataset entry as ``pathgen evaluate``, the evaluate flow and ``clip.evaluate`` take it: ``{dataset,
    classes}`` (one folder per class) or ``{dataset[, format]}`` (as downloaded; the format detected when not
    named), its keys and format checked. Whether the folder holds such a dataset is found when it is read."""
    if not isinstance(entry, dict) or not entry.get("dataset"):
        raise ValueError(
            f"dataset entry {entry} names no dataset folder: give {{dataset: DIR, classes: FILE}} (one folder per "
            "class) or {dataset: DIR[, format: NAME]} (a dataset as downloaded)"
        )
    unknown = set(entry) - set(DATASET_KEYS)
    if unknown:
        raise ValueError(f"dataset entry {entry}: unknown keys {sorted(unknown)}; known: {', '.join(DATASET_KEYS)}")
    if entry.get("classes") and entry.get("format"):
        raise ValueError(
            f"dataset {entry['dataset']}: give classes (--classes, one folder per class) or format "
            f"(--format {entry['format']}), not both"
        )
    if entry.get("format"):
        dataset_format(str(entry["format"]))
    return {key: str(entry[key]) for key in DATASET_KEYS if entry.get(key)}


def located_entry(entry: dict[str, Any]) -> dict[str, str]:
    """``dataset_entry``, its folder checked to be there and, with neither classes nor format, its format detected
    from its files."""
    entry = dataset_entry(entry)
    folder = Path(entry["dataset"])
    if not folder.is_dir():
        raise ValueError(
            f"dataset folder {folder} does not exist (--dataset: a folder as downloaded, or one folder per class "
            "with --classes)"
        )
    if not entry.get("classes") and not entry.get("format"):
        entry["format"] = detect_format(folder).name
    return entry


def read_tasks(dataset: Path, classes: Path | None = None, format_name: str | None = None) -> list[BenchmarkTask]:
    """The tasks a dataset folder holds: with ``classes``, one folder per class; else what the reader of
    ``format_name`` (given, or detected from the folder's files) reads."""
    entry = located_entry({"dataset": str(dataset), "classes": classes, "format": format_name})
    if entry.get("classes"):
        return [folder_task(Path(entry["dataset"]), Path(entry["classes"]))]
    return read_dataset(dataset_format(entry["format"]), Path(entry["dataset"]))


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


def publish(
    store: Store, run: str, result: dict[str, Any], logger: logging.Logger | None = None, copy: str | None = None
) -> str:
    """``eval/<run>/<dataset>.json`` and ``<dataset>-confusion.png``; returns the JSON's URI. With ``copy`` (a
    benchmark run's key for it) the same JSON is also written there, and that URI is returned: eval/<run>/ holds
    the newest evaluation, while a benchmark summary must keep linking the numbers it shows."""
    name = result.get("dataset") or "holdout"
    prefix = f"eval/{run}"
    if "zero_shot" in result:
        with tempfile.TemporaryDirectory() as folder:
            png = Path(folder) / "confusion.png"
            confusion_png(result["zero_shot"]["confusion"], result["classes"], png, confusion_title(name, result))
            if result["random_weights"]:  # said where the picture is looked at, not only in the JSON beside it
                why = _BANNER.get(result.get("random_why"), "these numbers are noise")
                banded = random_weights_banner(np.asarray(Image.open(png).convert("RGB")), why)
                Image.fromarray(banded).save(png)
            store.put_file(png, f"{prefix}/{name}-confusion.png")
        result = result | {"confusion_png": store.uri(f"{prefix}/{name}-confusion.png")}
    store.write_bytes(f"{prefix}/{name}.json", (json.dumps(result, indent=1, default=str) + "\n").encode())
    if logger:
        logger.info("evaluation of %s on %s: %s", run, name, store.uri(f"{prefix}/{name}.json"))
    if copy:
        store.write_bytes(copy, (json.dumps(result, indent=1, default=str) + "\n").encode())
        return store.uri(copy)
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
