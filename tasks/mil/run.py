"""One ``train-mil`` run end to end: the task's slide features (a features hash in the store or a CLAM/TRIDENT h5
folder), the run's name, training in a local work folder mirrored into the store, the evaluation JSON with its
confusion PNG, and an attention heatmap per test slide.

Store layout (``models/mil/<run>/`` and ``eval/mil/<run>/``)::

    models/mil/<run>/run.json            task file and its sha256, features source and identity, model, recipe,
                                         classes, chosen lr, random_weights, status (training | finished)
    models/mil/<run>/metrics.jsonl       one line per epoch per (lr, seed): lr (the grid's), seed, epoch, train_loss,
                                         val_loss, val_<metric>, lr_now (the cosine schedule's lr in that epoch)
    models/mil/<run>/<lr>/<seed>/...     the training core's files (fingerprint, metrics, state.pt to resume from,
                                         best.pt, done.json): a run killed on one worker resumes on another
    models/mil/<run>/selection.json, test.json
    eval/mil/<run>/<task>.json, <task>-confusion.png, heatmaps/<slide_id>.png

``<run>`` is ``<task stem>-<model>-<12 hex>``, the hex a sha256 over the task file's bytes, the features' identity
(the features hash and a digest of the task slides' inputs as their files' footers record them, or their feature
and coordinate arrays where a file names no slide source; for an h5 folder the arrays' digest alone, so moving the
folder makes no new run), the model name and the recipe. A run whose ``run.json`` says finished and whose
evaluation is in the store is skipped before any vector is read. Every store write is atomic
(Store.write_bytes/put_file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import get_run_logger, task

from pathgen.errors import is_infrastructure, retry_infrastructure, short_error
from pathgen.settings import MilSettings, Settings
from tasks.clip.lease import RunBusy, RunLease
from tasks.clip.spec import TINY_RANDOM
from tasks.features.store import (
    failed_key,
    featured_slides,
    features_hashes,
    features_key,
    manifest_key,
    read_features,
    read_meta,
)
from tasks.files import write_atomic
from tasks.mil.h5 import CLAM_SUBFOLDER, FeaturesFileError, SlideFeatures, read_features_folder, read_slide_h5
from tasks.mil.metrics import STD_DEFINITION, mean_std, mean_std_text
from tasks.mil.tasks import Task, TaskError, read_task, require_slides
from tasks.mil.train import (
    FINGERPRINT,
    MilRecipe,
    MilResult,
    load_best,
    lr_key,
    prepare_data,
    resolve_device,
    train_mil,
)
from tasks.models import RandomWeightsRefused
from tasks.store.objects import Store
from tasks.work.units import UnitOutcome

RUNS = "models/mil"
EVAL = "eval/mil"
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
READ_THREADS = 8  # slide feature files read at once from the store
MIRROR_SECONDS = 30.0  # at most this long between uploads of a training (lr, seed)'s resume point
RANDOM_DIGEST = "random-init"  # the weights digest tasks/features/encoder.py gives an encoder without weights


class FeaturesSourceError(ValueError):
    """``--features`` names neither a features hash in the store nor a folder of h5 files; says which exist."""


class FeaturesChanged(RuntimeError):
    """A features file was written again between naming the run and reading it: the unit stays pending."""


class UnreadableStoreObject(RuntimeError):
    """A store object exists but cannot be parsed (a truncated parquet, a damaged JSON): not the task's content, so
    the run stays pending (never recorded failed); the message names the object and what to do."""


def unreadable(store: Store, key: str, exc: BaseException) -> UnreadableStoreObject:
    return UnreadableStoreObject(
        f"{store.uri(key)} cannot be read ({short_error(exc)}); check the object, delete it if it is damaged so "
        "that the stage that writes it makes it again (`pathgen features` for a features file), then run again"
    )


def read_store_json(store: Store, key: str) -> Any:
    """A JSON object of the store; FileNotFoundError when absent, UnreadableStoreObject when it does not parse."""
    data = store.read_bytes(key)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise unreadable(store, key, exc) from exc


# --------------------------------------------------------------------------------------------------- features


def load_mil_features(
    source: str, store: Store, slides: Collection[str] | None = None
) -> tuple[dict[str, SlideFeatures], dict[str, Any]]:
    """The slide features of ``source`` (a features hash in ``store`` or a local folder of ``<slide_id>.h5``), only
    ``slides`` when given, and their identity (:func:`plan_features`)."""
    planned = plan_features(source, store, slides)
    return read_planned(planned, store), planned.identity


@dataclass
class PlannedFeatures:
    """The identity of a features source for some slides, named before all their vectors are read: ``loaded`` holds
    what naming them needed (an h5 folder: every slide; the store: the files that name no slide source)."""

    source: str
    identity: dict[str, Any]
    wanted: list[str]
    loaded: dict[str, SlideFeatures]


def plan_features(source: str, store: Store, slides: Collection[str] | None = None) -> PlannedFeatures:
    """Identity {kind, source, features_hash, encoder, random_weights, digest} of the features of ``slides`` (all when
    None), nothing of other slides. An h5 folder's digest covers the slides' arrays; a features hash's covers what each
    file's footer says it was made from (store_features_digest), so a finished run is found without its vectors."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        loaded = read_h5_slides(folder, slides)
        identity = {"kind": "h5", "source": str(folder.resolve()), "features_hash": None}
        identity |= {"encoder": _h5_encoder(loaded), "random_weights": _h5_random_weights(loaded)}
        return PlannedFeatures(source, identity | {"digest": features_digest(loaded)}, sorted(loaded), loaded)
    wanted = [s for s in _featured(store, source) if slides is None or s in slides]
    metas = _read_each(lambda s: _store_meta(store, source, s), wanted)
    loaded = _read_each(lambda s: _store_slide(store, source, s), [s for s in wanted if not _source_inputs(metas[s])])
    encoder = _manifest_encoder(store, source) or next((m.get("encoder") for m in metas.values()), None)
    random = bool(isinstance(encoder, dict) and encoder.get("random_weights"))
    random = random or any(bool(m.get("random_weights")) for m in metas.values())
    identity = {"kind": "store", "source": source, "features_hash": source, "encoder": encoder}
    identity |= {"random_weights": random, "digest": store_features_digest(metas, loaded)}
    return PlannedFeatures(source, identity, wanted, loaded)


def read_planned(planned: PlannedFeatures, store: Store) -> dict[str, SlideFeatures]:
    """Every planned slide's features; FeaturesChanged when a file was featured again since they were named."""
    missing = [s for s in planned.wanted if s not in planned.loaded]
    loaded = planned.loaded | _read_each(lambda s: _store_slide(store, planned.source, s), missing)
    if missing and store_features_digest({s: f.attrs for s, f in loaded.items()}, loaded) != planned.identity["digest"]:
        raise FeaturesChanged(
            f"features in {planned.source} were written again while this run was planned (their footers changed); "
            "the run stays pending: run it again to name it after the new features"
        )
    return {s: loaded[s] for s in planned.wanted}


def _read_each(read: Any, slide_ids: list[str]) -> dict[str, Any]:
    with ThreadPoolExecutor(READ_THREADS) as pool:  # one object per slide: reads overlap their latency
        return dict(zip(slide_ids, pool.map(read, slide_ids), strict=True))


def _source_inputs(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The slide inputs a features file records when they name its source's identity (the features stage)."""
    inputs = meta.get("slide_inputs")
    return inputs if isinstance(inputs, dict) and inputs.get("source") else None


def store_features_digest(metas: Mapping[str, Mapping[str, Any]], vectors: Mapping[str, SlideFeatures]) -> str:
    """sha256 over each slide's inputs as its file's footer records them, or its vectors when the file names no
    source identity. Under one features hash (settings and encoder weights) the features stage makes a slide's
    vectors from its inputs alone and features it again exactly when they change, so the inputs name the vectors:
    a finished run is found by reading footers, not gigabytes of vectors."""
    named = {s: _source_inputs(metas[s]) for s in sorted(metas)}
    digest = hashlib.sha256(json.dumps({s: i for s, i in named.items() if i}, sort_keys=True).encode())
    digest.update(features_digest({s: vectors[s] for s, i in named.items() if not i}).encode())
    return digest.hexdigest()


def h5_slide_files(folder: Path) -> dict[str, Path]:
    """``<slide_id>.h5`` files of a folder, else of its CLAM ``h5_files/`` subfolder (as read_features_folder looks),
    by slide id; hidden names are unfinished temporary files, never a slide."""
    for place in (folder, folder / CLAM_SUBFOLDER):
        files = sorted(p for p in place.glob("*.h5") if p.is_file() and not p.name.startswith("."))
        if files:
            return {f.stem: f for f in files}
    return {}


def read_h5_slides(folder: Path, slides: Collection[str] | None = None) -> dict[str, SlideFeatures]:
    """The h5 files of ``slides`` (all when None) in ``folder``: a foreign slide's file is never opened, so its
    dimension or damage cannot fail a task that does not name it. The slides read must share one dimension."""
    files = h5_slide_files(folder)
    if not files:
        return read_features_folder(folder)  # raises its FeaturesFileError naming the folder and the fix
    loaded = {s: read_slide_h5(files[s]) for s in sorted(files) if slides is None or s in slides}
    dims = {slide.dim for slide in loaded.values()}
    if len(dims) > 1:
        first = next(iter(loaded.values()))
        odd = next(s for s in loaded.values() if s.dim != first.dim)
        raise FeaturesFileError(
            f"{files[odd.slide_id]}: features have {odd.dim} dimensions but {first.slide_id}.h5 has {first.dim}; the "
            "slides of a task must come from the same encoder, so re-extract the odd ones"
        )
    return loaded


def _featured(store: Store, features_hash: str) -> list[str]:
    featured = featured_slides(store, features_hash) if re.fullmatch(r"[0-9a-f]{6,64}", features_hash) else []
    if not featured:
        hashes = features_hashes(store)
        raise FeaturesSourceError(
            f"--features {features_hash}: neither a folder of <slide_id>.h5 files nor a features hash with slides in "
            f"{store.uri('features')} (found: {', '.join(hashes) or 'none'}); run `pathgen features SOURCE...` "
            "first or pass an h5 folder"
        )
    return featured


def _store_meta(store: Store, features_hash: str, slide_id: str) -> dict[str, Any]:
    key = features_key(features_hash, slide_id)
    try:
        return read_meta(store, key)  # the footer alone
    except (pa.ArrowException, ValueError, KeyError) as exc:
        raise unreadable(store, key, exc) from exc


def _store_slide(store: Store, features_hash: str, slide_id: str) -> SlideFeatures:
    try:
        table = read_features(store, features_hash, slide_id)
    except (pa.ArrowException, ValueError, KeyError) as exc:  # a truncated or foreign file: not the task's content
        raise unreadable(store, features_key(features_hash, slide_id), exc) from exc
    attrs = dict(table.meta)
    size = attrs.get("patch_size_level0")
    attrs |= {"patch_level": 0, "patch_size": size, "boxes": table.boxes}  # the h5 meaning of the level-0 patch
    features = torch.from_numpy(np.require(table.features, requirements="W"))  # Arrow buffers are read-only
    return SlideFeatures(slide_id, features, table.coords, attrs)


def _manifest_encoder(store: Store, features_hash: str) -> Any:
    try:
        return read_store_json(store, manifest_key(features_hash)).get("encoder")
    except FileNotFoundError:
        return None


def _h5_encoder(slides: Mapping[str, SlideFeatures]) -> Any:
    """The encoder the files name (a JSON identity is decoded), None when they name none."""
    value = next((f.encoder for f in slides.values() if f.encoder), None)
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _h5_random_weights(slides: Mapping[str, SlideFeatures]) -> bool:
    """True when some file says its features came from random weights."""
    return any(_h5_says_random(slide) for slide in slides.values())


def _h5_says_random(slide: SlideFeatures) -> bool:
    """A ``random_weights`` attribute (our export writes it, True or False) or an encoder identity JSON with
    ``random_weights`` is trusted; otherwise only our random encoder's name (``tiny-random``) or weights digest
    (``random-init``) mean random: a real checkpoint whose path contains "random" is not."""
    flag = slide.attrs.get("random_weights")
    if flag is not None:
        return flag is True or str(flag).strip().lower() in ("true", "1")
    identity = _json_dict(slide.attrs.get("encoder_identity")) or _json_dict(slide.encoder)
    if identity is not None:
        if "random_weights" in identity:
            return bool(identity["random_weights"])
        names = {identity.get("name"), identity.get("spec")}
        return TINY_RANDOM in names or identity.get("digest") == RANDOM_DIGEST
    name, _, digest = str(slide.encoder or "").partition(" (")  # our export's "spec (digest)"
    return name.strip() == TINY_RANDOM or digest.rstrip(")") == RANDOM_DIGEST


def _json_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None
    return None


def features_digest(slides: Mapping[str, SlideFeatures]) -> str:
    """sha256 over each slide's id, feature and coordinate arrays, in slide order."""
    digest = hashlib.sha256()
    for slide_id in sorted(slides):
        slide = slides[slide_id]
        digest.update(json.dumps([slide_id, list(slide.features.shape)]).encode())
        digest.update(slide.features.contiguous().numpy().astype(np.float32, copy=False).tobytes())
        digest.update(np.ascontiguousarray(slide.coords, dtype=np.int64).tobytes())
    return digest.hexdigest()


def task_features(task: Task, source: str, store: Store) -> PlannedFeatures:
    """The features of every slide ``task`` names, planned; one TaskError naming the task file and rows when some
    lack them (with the reason recorded when featuring them failed)."""
    wanted = {row.slide_id for row in task.rows}
    planned = plan_features(source, store, wanted)
    try:
        require_slides(task, planned.wanted, f"features in {source}")
    except TaskError as exc:
        reasons = _failed_reasons(store, planned.identity, wanted - set(planned.wanted))
        raise TaskError(f"{exc}{reasons}") from None
    return planned


def _failed_reasons(store: Store, identity: dict[str, Any], missing: Collection[str]) -> str:
    if not identity.get("features_hash"):
        return ""
    reasons = []
    for slide_id in sorted(missing)[:5]:
        key = failed_key(identity["features_hash"], slide_id)
        if store.exists(key):
            record = read_store_json(store, key)
            reasons.append(f"{slide_id}: {record.get('error') or record}")
    return f" (featuring failed for {'; '.join(reasons)})" if reasons else ""


# --------------------------------------------------------------------------------------------------- naming


def available_slides(source: str, store: Store) -> list[str]:
    """The slide ids ``source`` has features for, listed without reading them (h5 file names, or the store's
    committed files); FeaturesSourceError when it is neither a folder nor a features hash with slides."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return sorted(h5_slide_files(folder))
    return _featured(store, source)


def check_task(task_path: str | Path, source: str, store: Store) -> Task:
    """The task, refused before any work when it is unreadable, has no test split or names slides without
    features (TaskError naming the file and rows)."""
    task = read_task(task_path)
    if not task.split("test"):
        raise TaskError(
            f"{task.path}: no slide has split 'test'; train-mil evaluates on the test split, so mark the held-out "
            "slides split=test (`pathgen mil-task` does)"
        )
    known = set(available_slides(source, store))
    try:
        require_slides(task, known, f"features in {source}")
    except TaskError as exc:
        hashed = {"features_hash": None if Path(source).expanduser().is_dir() else source}
        raise TaskError(f"{exc}{_failed_reasons(store, hashed, {r.slide_id for r in task.rows} - known)}") from None
    return task


def resolve_features(settings: Settings, store: Store, features: str | None) -> str:
    """``features`` as given, else ``mil.features``, else the features hash these settings make with
    ``features.encoder`` (FeaturesSourceError naming `pathgen features` when the store has none under it)."""
    chosen = features or settings.mil.features
    if chosen:
        return chosen
    from tasks.features.encoder import encoder_identity, resolve_encoder_spec
    from tasks.features.hashing import features_hash

    spec = resolve_encoder_spec(settings.features.encoder, store)
    current = features_hash(settings, encoder_identity(spec))
    if not featured_slides(store, current):
        raise FeaturesSourceError(
            f"no slide features in {store.uri('features/' + current)} (the features hash of these settings with "
            f"encoder {spec}); run `pathgen features SOURCE...` first, or pass --features HASH|DIR"
        )
    return current


def recipe_from_settings(mil: MilSettings) -> MilRecipe:
    return MilRecipe(
        epochs=mil.epochs,
        learning_rates=tuple(float(lr) for lr in mil.learning_rates),
        weight_decay=mil.weight_decay,
        seeds=tuple(range(mil.seeds)),
        acmil_branches=mil.acmil_branches,
        acmil_top_k=mil.acmil_top_k,
        acmil_mask_prob=mil.acmil_mask_prob,
        selection_metric=mil.selection_metric,
    )


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _named_by(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of a features identity that names a run: content, not where the files lie."""
    return {"features_hash": identity.get("features_hash"), "digest": identity["digest"]}


def mil_run_name(task_path: str | Path, identity: dict[str, Any], model: str, recipe: MilRecipe) -> str:
    """``<task stem>-<model>-<12 hex>`` over the task file's bytes, the features' identity, model and recipe."""
    inputs = {
        "task": file_sha256(task_path),
        "features": _named_by(identity),
        "model": model,
        "recipe": asdict(recipe),
    }
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(task_path).stem).strip("-.") or "task"
    return f"{stem}-{model}-{hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]}"


def work_root(mil: MilSettings) -> Path:
    return Path(mil.work_dir).expanduser() if mil.work_dir else Path.home() / ".cache" / "pathgen" / "mil"


# --------------------------------------------------------------------------------------------------- mirror


class RunMirror:
    """The local run folder and its copy under ``models/mil/<run>/``: pulled before training (what another worker
    finished or left to resume), pushed as training goes (each (lr, seed) folder at most every MIRROR_SECONDS while
    it trains, whole when it ends). Within a folder, ``done.json`` goes up last and ``state.pt`` after the metrics
    it covers, so a copy is never ahead of what it claims."""

    ORDER = (FINGERPRINT, "metrics.jsonl", "best.pt", "state.pt", "done.json")

    def __init__(
        self, store: Store, run: str, local: Path, every_s: float | None = None, still_held=lambda: True
    ) -> None:
        self.store, self.prefix, self.local = store, f"{RUNS}/{run}", local
        self.every_s = MIRROR_SECONDS if every_s is None else every_s
        self.still_held = still_held  # a trainer whose lease was taken over copies nothing more to the store
        self._pushed: dict[str, tuple[int, int]] = {}
        self._last: dict[str, float] = {}

    def pull(self, log: logging.Logger) -> None:
        keys = self.store.list(self.prefix)
        folders = sorted({k[len(self.prefix) + 1 :].rsplit("/", 1)[0] for k in keys if k.count("/") == 5})
        for folder in folders:
            self._pull_folder(folder, log)

    def _pull_folder(self, folder: str, log: logging.Logger) -> None:
        local = self.local / folder
        remote = f"{self.prefix}/{folder}"
        if (local / "done.json").exists():
            if self.store.exists(f"{remote}/done.json"):  # done.json goes up last: the store has the whole folder
                for name in self.ORDER:
                    if (local / name).exists():
                        self._pushed[str(local / name)] = _stamp(local / name)
            return
        if self.store.exists(f"{remote}/done.json"):
            log.info("%s: finished in the store, taken from there", remote)
            for name in (n for n in self.ORDER if n != "state.pt" and self.store.exists(f"{remote}/{n}")):
                self._fetch(remote, name, local / name)
            return
        if not self.store.exists(f"{remote}/state.pt"):
            return
        staged = self._staged(remote)
        self._fetch(remote, "state.pt", staged)
        if _epoch(staged) <= _epoch(local / "state.pt"):
            return  # this machine got as far itself
        log.info("%s: resuming from the store's state after epoch %d", remote, _epoch(staged))
        self._fetch(remote, FINGERPRINT, local / FINGERPRINT)
        staged.replace(local / "state.pt")
        self._pushed[str(local / "state.pt")] = _stamp(local / "state.pt")
        self._fetch(remote, "metrics.jsonl", local / "metrics.jsonl")  # uploaded before the state: as new or newer

    def _staged(self, remote: str) -> Path:
        return self.local / ".pulled" / remote.replace("/", "_")

    def _fetch(self, remote: str, name: str, target: Path) -> None:
        write_atomic(target, lambda partial: partial.write_bytes(self.store.read_bytes(f"{remote}/{name}")))
        self._pushed[str(target)] = _stamp(target)  # the store has it already

    def push_folder(self, lr: float, seed: int, force: bool = False) -> None:
        folder = f"{lr_key(lr)}/{seed}"
        if not force and time.monotonic() - self._last.get(folder, 0.0) < self.every_s:
            return
        self._last[folder] = time.monotonic()
        for name in self.ORDER:
            self.push(f"{folder}/{name}")

    def push(self, relative: str) -> None:
        """Upload one local file of the run when it changed since it was last pushed or pulled."""
        path = self.local / relative
        if not self.still_held() or not path.exists() or self._pushed.get(str(path)) == _stamp(path):
            return
        self.store.put_file(path, f"{self.prefix}/{relative}")
        self._pushed[str(path)] = _stamp(path)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _epoch(state_path: Path) -> int:
    if not state_path.exists():
        return 0
    return int(torch.load(state_path, weights_only=True, map_location="cpu")["progress"]["epoch"])


def combined_metrics(local: Path, recipe: MilRecipe) -> list[dict[str, Any]]:
    """Every (lr, seed)'s epoch lines with the grid lr and seed on each (``lr_now``: the scheduled lr)."""
    lines = []
    for lr in recipe.learning_rates:
        for seed in recipe.seeds:
            path = local / lr_key(lr) / str(seed) / "metrics.jsonl"
            for text in path.read_text().splitlines() if path.exists() else []:
                record = json.loads(text)
                lines.append({**record, "lr": float(lr), "seed": seed, "lr_now": record["lr"]})
    return lines


def write_local_json(path: Path, obj: Any) -> None:
    """A whole file or none: a temporary file in the same folder renamed over the target."""
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str) + "\n"
    write_atomic(path, lambda partial: partial.write_text(text))


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class MilRun:
    """What one train-mil run is about: the task, its features and their identity, the model and recipe."""

    task: Task
    task_sha256: str
    source: str
    planned: PlannedFeatures
    model: str
    recipe: MilRecipe
    name: str
    settings: MilSettings
    local: Path = field(init=False)
    _slides: dict[str, SlideFeatures] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.local = work_root(self.settings) / "runs" / self.name

    @property
    def identity(self) -> dict[str, Any]:
        return self.planned.identity

    @property
    def slides(self) -> dict[str, SlideFeatures]:
        """The task slides' features, once load_slides read them (after the finished check: a skip reads none)."""
        if self._slides is None:
            raise RuntimeError(f"{self.name}: slides used before load_slides(store) read them")
        return self._slides

    def load_slides(self, store: Store) -> dict[str, SlideFeatures]:
        if self._slides is None:
            self._slides = read_planned(self.planned, store)
        return self._slides

    @property
    def task_name(self) -> str:
        return self.task.path.stem

    @property
    def eval_key(self) -> str:
        return f"{EVAL}/{self.name}/{self.task_name}.json"

    @property
    def random_weights(self) -> bool:
        return bool(self.identity.get("random_weights"))


def plan_run(task_path: str | Path, source: str, model: str, settings: Settings, store: Store) -> MilRun:
    """Read the task and what names its features, name the run. TaskError / FeaturesFileError / FeaturesSourceError (all
    ValueErrors) for bad input, naming the file and the fix."""
    task = check_task(task_path, source, store)
    planned = task_features(task, source, store)
    if planned.identity.get("random_weights") and not settings.models.allow_random_weights:
        raise RandomWeightsRefused(
            f"models.allow_random_weights is false and the features in {source} come from an encoder with random "
            "weights (their files say so); feature the slides with a trained encoder, or allow random weights"
        )
    recipe = recipe_from_settings(settings.mil)
    name = mil_run_name(task.path, planned.identity, model, recipe)
    return MilRun(task, file_sha256(task.path), source, planned, model, recipe, name, settings.mil)


def run_record(run: MilRun, status: str, result: MilResult | None = None) -> dict[str, Any]:
    return {
        "run": run.name,
        "task": run.task_name,
        "task_file": str(run.task.path),
        "task_sha256": run.task_sha256,
        "features": run.identity,
        "model": run.model,
        "recipe": asdict(run.recipe),
        "classes": run.task.labels,
        "chosen_lr": result.chosen_lr if result else None,
        "grid": result.grid if result else None,
        "random_weights": run.random_weights,
        "status": status,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finished_eval(run: MilRun, store: Store) -> dict[str, Any] | None:
    """The run's evaluation when the store holds it finished (run.json status finished, eval JSON present)."""
    try:
        record = read_store_json(store, f"{RUNS}/{run.name}/run.json")
    except FileNotFoundError:
        return None
    if record.get("status") != "finished" or not store.exists(run.eval_key):
        return None
    return read_store_json(store, run.eval_key)


def train_run(run: MilRun, store: Store, logger: logging.Logger, lease: RunLease) -> MilResult:
    """Train every (lr, seed) in the local folder, resuming from it or the store, mirrored into the store while
    ``lease`` holds the run."""
    mirror = RunMirror(store, run.name, run.local, still_held=lease.held)
    mirror.pull(logger)
    write_local_json(run.local / "run.json", run_record(run, "training"))
    mirror.push("run.json")
    task_identity = {"task": run.task_sha256, "features": _named_by(run.identity)}
    data_id = hashlib.sha256(json.dumps(task_identity, sort_keys=True).encode()).hexdigest()

    def on_run_done(lr: float, seed: int, done: dict) -> None:
        mirror.push_folder(lr, seed, force=True)
        _push_metrics(run, mirror)

    result = train_mil(
        run.task,
        {slide_id: slide.features for slide_id, slide in run.slides.items()},
        run.model,
        run.recipe,
        run.local,
        log=logger.info,
        on_epoch=lambda lr, seed, record: mirror.push_folder(lr, seed),
        data_id=data_id,
        on_run_done=on_run_done,
        device=resolve_device(run.settings.device),
    )
    _push_results(run, mirror)
    return result


def _push_results(run: MilRun, mirror: RunMirror) -> None:
    """Every (lr, seed) folder, the combined metrics and the lr selection and test results, to the store.

    Every (lr, seed), also those found done locally: a push that failed after done.json (a store outage, then a
    retry on this worker) or a worker killed in that window left them local only; already pushed files are skipped.
    """
    for lr in run.recipe.learning_rates:
        for seed in run.recipe.seeds:
            mirror.push_folder(lr, seed, force=True)
    _push_metrics(run, mirror)
    for name in ("selection.json", "test.json"):
        mirror.push(name)


def _push_metrics(run: MilRun, mirror: RunMirror) -> None:
    lines = combined_metrics(run.local, run.recipe)
    write_local_json(run.local / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    mirror.push("metrics.jsonl")


def finish_run(run: MilRun, result: MilResult, evaluation: dict[str, Any], store: Store) -> None:
    """run.json with status finished, written after the evaluation so finished always means evaluated."""
    record = run_record(run, "finished", result) | {"eval": store.uri(run.eval_key)}
    write_local_json(run.local / "run.json", record)
    store.put_file(run.local / "run.json", f"{RUNS}/{run.name}/run.json")


# --------------------------------------------------------------------------------------------------- evaluation


def evaluation(run: MilRun, result: MilResult) -> dict[str, Any]:
    """The eval JSON (contract fields) from the test results of the chosen lr's best checkpoints over seeds."""
    per_seed = result.test["per_seed"]
    confusion, recall = _summed_confusion(per_seed, result.classes)
    summary = {name: mean_std([m[name] for m in per_seed.values()]) for name in HEADLINE}
    return {
        "task": run.task_name,
        "task_file": str(run.task.path),
        "task_sha256": run.task_sha256,
        "run": run.name,
        "model": run.model,
        "features": _features_identity(run),
        "classes": result.classes,
        "chosen_lr": result.chosen_lr,
        "selection_metric": run.recipe.selection_metric,
        "grid": result.grid,
        "seeds": list(run.recipe.seeds),
        "n_test_slides": len(run.task.split("test")),
        "mean": {name: pair[0] for name, pair in summary.items()},
        "std": {name: pair[1] for name, pair in summary.items()},
        "std_definition": STD_DEFINITION,
        "per_seed": per_seed,
        "per_class_recall": recall,
        "per_class_recall_of": "the summed confusion matrix (equal to the mean over seeds: one test set)",
        "confusion": confusion.tolist(),
        "confusion_of": f"summed over the {len(per_seed)} seed(s)' best checkpoints of the chosen lr; rows true, "
        "columns predicted",
        "random_weights": run.random_weights,
    }


def _summed_confusion(per_seed: dict[str, dict], classes: list[str]) -> tuple[np.ndarray, dict[str, float | None]]:
    """The seeds' confusion matrices summed, and each class's recall from it (None for a class with no test
    slide)."""
    confusion = np.sum([np.asarray(m["confusion_matrix"]) for m in per_seed.values()], axis=0)
    support = confusion.sum(axis=1)
    recall = {c: (float(confusion[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return confusion, recall


def _features_identity(run: MilRun) -> dict[str, Any]:
    return {
        "source": run.identity["source"],
        "features_hash": run.identity.get("features_hash"),
        "encoder": run.identity.get("encoder"),
        "random_weights": run.random_weights,
    }


def confusion_title(result: dict[str, Any]) -> str:
    mean, std = result["mean"], result["std"]
    auc = "n/a" if mean["auc"] is None else f"{mean['auc']:.3f}±{std['auc']:.3f}"
    random = " (RANDOM WEIGHTS features)" if result["random_weights"] else ""
    return (
        f"{result['task']}: {result['model']}{random}, test AUC {auc}, accuracy "
        f"{mean['accuracy']:.3f}±{std['accuracy']:.3f} (n={result['n_test_slides']} x {len(result['seeds'])} seeds)"
    )


def publish_confusion(store: Store, run: MilRun, result: dict[str, Any]) -> str:
    """``eval/mil/<run>/<task>-confusion.png`` (the CLIP confusion drawing; a RANDOM WEIGHTS band when so)."""
    from tasks.clip.metrics import confusion_png
    from tasks.slides.pictures import random_weights_banner

    key = f"{EVAL}/{run.name}/{run.task_name}-confusion.png"
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "confusion.png"
        confusion_png(result["confusion"], result["classes"], png, confusion_title(result))
        if result["random_weights"]:
            banded = random_weights_banner(np.asarray(Image.open(png).convert("RGB")), "these numbers are noise")
            Image.fromarray(banded).save(png)
        store.put_file(png, key)
    return key


def publish_evaluation(store: Store, run: MilRun, result: dict[str, Any]) -> str:
    store.write_bytes(run.eval_key, (json.dumps(result, indent=1, default=str) + "\n").encode())
    return run.eval_key


# --------------------------------------------------------------------------------------------------- heatmaps


class HeatmapUnavailable(Exception):
    """A test slide's heatmap cannot be drawn (no slide source, the slide cannot be opened); the run goes on."""


def slide_boxes(slide: SlideFeatures) -> np.ndarray:
    """N x 4 level-0 boxes of the slide's patches (stored ones, or coords with the level-0 patch side)."""
    if slide.attrs.get("boxes") is not None:
        return np.asarray(slide.attrs["boxes"], dtype=np.int64)
    side = slide.attrs.get("patch_size_level0")
    if side is None and slide.patch_level == 0:
        side = slide.patch_size
    if not side:
        raise HeatmapUnavailable("its features name no level-0 patch size (patch_size_level0 or patch_level 0)")
    coords = np.asarray(slide.coords, dtype=np.int64)
    return np.concatenate([coords, np.full((len(coords), 2), int(side), dtype=np.int64)], axis=1)


@torch.no_grad()
def attention_and_prediction(model: torch.nn.Module, bag: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch attention (ACMIL: the mean over its branches, what its slide classifier pools with) and the
    class probabilities of one slide."""
    output = model(bag)
    attention = output.attention.mean(dim=0) if output.attention.dim() == 2 else output.attention
    return attention.double().cpu().numpy(), torch.softmax(output.logits.double(), dim=0).cpu().numpy()


def heatmap_png(
    slide: SlideFeatures, label: str, classes: list[str], model: torch.nn.Module, top_k: int, random: bool
) -> bytes:
    """One test slide's heatmap; HeatmapUnavailable when its slide cannot be read."""
    from tasks.mil.heatmap import THUMBNAIL_MAX_PX, render_heatmap
    from tasks.slides.readers import open_slide

    boxes = slide_boxes(slide)
    uri = slide.attrs.get("source_uri")
    if not uri:
        raise HeatmapUnavailable("its features record no slide source (source_uri) to draw the thumbnail from")
    attention, probabilities = attention_and_prediction(model, slide.features.to(_device_of(model)))
    predicted = int(probabilities.argmax())
    mpp = slide.attrs.get("slide_mpp")
    try:
        with open_slide(str(uri), mpp_override=float(mpp) if mpp else None) as reader:
            side = max(reader.info.width, reader.info.height)
            thumbnail, downsample = reader.overview(max(1.0, side / THUMBNAIL_MAX_PX))
            level0 = (reader.info.mpp_x, reader.info.mpp_y)

            def patch(i: int) -> np.ndarray:  # at level-0 resolution: the pixels the slide has, cells visible
                x, y, w, h = (int(v) for v in boxes[i])
                return reader.read_rect((x, y), (w, h), level0)

            return render_heatmap(
                thumbnail, downsample, boxes, attention, patch, label, classes[predicted],
                float(probabilities[predicted]), slide.slide_id, top_k=top_k, random_weights=random,
            )  # fmt: skip
    except HeatmapUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - a slide that moved or cannot be read costs its picture, not the run
        if is_infrastructure(exc):
            raise  # a timeout or outage is not the slide's fault: the task retries, the run stays unfinished
        raise HeatmapUnavailable(f"its slide {uri} cannot be read ({short_error(exc)})") from None


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def publish_heatmaps(run: MilRun, result: MilResult, store: Store, logger: logging.Logger) -> tuple[list, list]:
    """``eval/mil/<run>/heatmaps/<slide_id>.png`` per test slide from the chosen lr's first seed's best model;
    returns (keys, skipped [{slide_id, reason}]). A slide that cannot be drawn is skipped with its reason."""
    if not run.settings.heatmaps:
        return [], []
    seed = run.recipe.seeds[0]
    in_dim = next(iter(run.slides.values())).dim
    path = run.local / lr_key(result.chosen_lr) / str(seed) / "best.pt"
    device = resolve_device(run.settings.device)
    model = load_best(path, run.model, in_dim, result.classes, run.recipe, device)
    keys, skipped = [], []
    for row in run.task.split("test"):
        try:
            png = heatmap_png(
                run.slides[row.slide_id], row.label, result.classes, model, run.settings.heatmap_top_k,
                run.random_weights,
            )  # fmt: skip
        except HeatmapUnavailable as exc:
            logger.warning("heatmap of %s skipped: %s", row.slide_id, exc)
            skipped.append({"slide_id": row.slide_id, "reason": str(exc)})
            continue
        key = f"{EVAL}/{run.name}/heatmaps/{row.slide_id}.png"
        store.write_bytes(key, png)
        keys.append(key)
    return keys, skipped


# --------------------------------------------------------------------------------------------------- end to end


def train_and_evaluate(run: MilRun, store: Store, logger: logging.Logger) -> dict[str, Any]:
    """The run's evaluation: found finished in the store (``status`` skipped), or trained (resuming what the local
    folder or the store holds), evaluated, its heatmaps drawn and its run.json marked finished."""
    found = finished_eval(run, store)
    if found is not None:
        logger.info("%s: finished before (%s), skipped", run.name, store.uri(run.eval_key))
        return found | {"status": "skipped"}
    run.load_slides(store)  # only now: a finished run is found without reading its vectors
    if run.random_weights:
        logger.warning(random_features_warning(run))
    prepare_data(run.task, {s: f.features for s, f in run.slides.items()}, run.recipe.selection_metric)  # fail fast
    # one trainer per run (RunBusy: another worker holds it; the unit stays pending)
    with RunLease(store, f"{RUNS}/{run.name}", run.local, logger) as lease:
        result = train_run(run, store, logger, lease)
        evaluated = evaluation(run, result)
        lease.ensure_held()  # LeaseLost: another trainer took the run over during an outage; it publishes
        evaluated["confusion_png"] = publish_confusion(store, run, evaluated)
        evaluated["heatmaps"], evaluated["heatmaps_skipped"] = publish_heatmaps(run, result, store, logger)
        publish_evaluation(store, run, evaluated)
        finish_run(run, result, evaluated, store)
    return evaluated | {"status": "trained"}


def random_features_warning(run: MilRun) -> str:
    return (
        f"{run.name}: the features in {run.source} come from an encoder with RANDOM WEIGHTS; the slide metrics and "
        "heatmaps measure noise. Feature the slides with a trained encoder (pathgen features --encoder SPEC)"
    )


def flow_summary(evaluated: dict[str, Any], store: Store, status: str) -> dict[str, Any]:
    """The flow's summary (contract keys) from an evaluation JSON, trained now or found finished."""
    key = f"{EVAL}/{evaluated['run']}/{evaluated['task']}.json"
    return {
        "run": evaluated["run"],
        "model": evaluated["model"],
        "task": evaluated.get("task_file") or evaluated["task"],
        "features": evaluated["features"]["source"],
        "encoder": evaluated["features"].get("encoder"),
        "eval": key,
        "eval_uri": store.uri(key),
        "mean": evaluated["mean"],
        "std": evaluated["std"],
        "std_definition": evaluated.get("std_definition", STD_DEFINITION),
        "per_seed": evaluated.get("per_seed", {}),
        "seeds": evaluated.get("seeds", []),
        "chosen_lr": evaluated["chosen_lr"],
        "status": status,
        "random_weights": bool(evaluated.get("random_weights")),
        "confusion_png": store.uri(evaluated["confusion_png"]) if evaluated.get("confusion_png") else None,
        "heatmaps": [store.uri(k) for k in evaluated.get("heatmaps", [])],
        "heatmaps_skipped": evaluated.get("heatmaps_skipped", []),
        "run_prefix": store.uri(f"{RUNS}/{evaluated['run']}"),
    }


def headline_text(mean: dict[str, Any], std: dict[str, Any]) -> dict[str, str]:
    """Each headline metric as "mean ± std" (4 decimals), "n/a" when undefined."""
    return {name: mean_std_text(mean.get(name), std.get(name), digits=4) for name in HEADLINE}


# --------------------------------------------------------------------------------------------------- the task


# Final failures: what is wrong with the task file or the features themselves (a truncated parquet or a damaged
# store JSON is not: UnreadableStoreObject leaves the unit pending).
CONTENT_ERRORS = (TaskError, FeaturesFileError, FeaturesSourceError, RandomWeightsRefused)


def train_mil_units(units: list[dict[str, Any]], settings: Settings, logger: logging.Logger) -> list[UnitOutcome]:
    """Each unit {task, features, model}: trained and evaluated (ok), found finished (skipped), failed for its input
    (CONTENT_ERRORS: the task file's or the features' own content, naming the file), or pending (another worker
    holds the run; a store object cannot be read). Anything else raises: the unit stays pending and the task is
    retried when it is infrastructure."""
    store = Store(settings.store, settings.s3)
    outcomes = []
    for unit in units:
        started = time.perf_counter()
        name = Path(unit["task"]).stem
        try:
            run = plan_run(unit["task"], unit["features"], unit["model"], settings, store)
            evaluated = train_and_evaluate(run, store, logger)
        except CONTENT_ERRORS as exc:
            outcomes.append(UnitOutcome(name, "failed", error=short_error(exc)))
            continue
        except (RunBusy, UnreadableStoreObject, FeaturesChanged) as exc:  # another worker has it; or run again later
            outcomes.append(UnitOutcome(name, "pending", error=str(exc)))
            continue
        status = "skipped" if evaluated["status"] == "skipped" else "ok"
        columns = {"run": run.name, "model": run.model, "chosen_lr": evaluated["chosen_lr"], "eval": run.eval_key}
        columns |= headline_text(evaluated["mean"], evaluated["std"])
        seconds = time.perf_counter() - started
        items = len(run.task.rows)
        outcomes.append(UnitOutcome(name, status, items, seconds, None, run.random_weights, columns))
    return outcomes


@task(name="train-mil", retry_condition_fn=retry_infrastructure, tags=["train-mil", "gpu"])
def train_mil_task(units: list[dict[str, Any]], settings: Settings) -> list[UnitOutcome]:
    return train_mil_units(units, settings, get_run_logger())
