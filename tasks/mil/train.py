"""Training core of the whole-slide MIL stage: the paper's recipe, the learning-rate grid chosen on validation,
resumable runs, and the test evaluation of the chosen learning rate over seeds. Pure: no Prefect, no store.

Layout under ``out_dir``::

    <lr>/<seed>/fingerprint.json  what the folder was trained on and with (data, model, recipe, lr, seed)
    <lr>/<seed>/metrics.jsonl   one JSON line per finished epoch: epoch, lr, train_loss, val_loss, val_<metric>
    <lr>/<seed>/state.pt        resume point after the last finished epoch (model, optimizer, scheduler, RNG, and
                                the best epoch's weights so far)
    <lr>/<seed>/best.pt         the weights of the best epoch on validation, written once the (lr, seed) finishes
    <lr>/<seed>/done.json       completion marker: the run is skipped when present
    selection.json              the class encoding, every (lr, seed)'s best validation metric and the chosen lr
    test.json                   the chosen lr's best checkpoints on the test split, per seed, mean and std

A folder is reused (skipped when done, resumed from its state) only when its ``fingerprint.json`` matches the
current data, model, recipe, lr and seed: an ``out_dir`` reused for other inputs (another task, features or recipe)
has its stale folders trained afresh instead of silently mixing two experiments.

Selection metric: validation AUC by default (binary ROC AUC, macro one-vs-rest for more classes), because it ranks
the slides independently of the 0.5 threshold, which a few epochs on a small validation split set poorly; the
recipe can choose balanced accuracy instead. The validation loss is the slide cross-entropy alone (without ACMIL's
branch and diversity terms), so it is comparable across models. Every file is written as a temporary file renamed
over the target, so a kill never leaves half a checkpoint; a killed run restarts from its last finished epoch and
reaches exactly the weights an uninterrupted run reaches (the shuffle order is a function of seed and epoch, the
global RNG that dropout and ACMIL's masking draw from is saved with each epoch). The standard deviation over
seeds is the sample standard deviation (ddof 1; 0 for one seed): :func:`tasks.mil.metrics.mean_std`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.files import write_atomic
from tasks.mil.h5 import FeaturesFileError
from tasks.mil.metrics import classification_metrics, mean_std
from tasks.mil.models import build_mil_model, mil_loss
from tasks.mil.tasks import Task, TaskError, require_slides

SelectionMetric = Literal["auc", "balanced_accuracy"]
EpochCallback = Callable[[float, int, dict], None]
RunDoneCallback = Callable[[float, int, dict], None]
FINGERPRINT = "fingerprint.json"
RUN_FILES = ("state.pt", "metrics.jsonl", "best.pt", "done.json")  # what a stale folder loses


@dataclass(frozen=True)
class MilRecipe:
    """The PathGen-CLIP paper's whole-slide protocol as defaults (its reproducibility statement)."""

    epochs: int = 50
    learning_rates: tuple[float, ...] = (1e-4, 2e-4, 5e-4)  # grid, chosen on validation
    weight_decay: float = 1e-4  # Adam
    seeds: tuple[int, ...] = (0,)
    schedule: Literal["cosine"] = "cosine"  # cosine decay from lr to 0 over the epochs, stepped once per epoch
    acmil_branches: int = 5  # M
    acmil_top_k: int = 10  # K
    acmil_mask_prob: float = 0.6  # p
    hidden_dim: int | None = None  # None: the model's default width
    selection_metric: SelectionMetric = "auc"
    # An epoch ties the best on the selection metric (a small validation split reaches AUC 1.0 within the first
    # epochs): the lower validation loss wins, so a barely trained checkpoint is not kept for a perfect ranking.
    tie_break: Literal["val_loss"] = "val_loss"

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.learning_rates or not self.seeds:
            raise ValueError(f"a MIL recipe needs epochs >= 1, learning rates and seeds; got {self}")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"learning rates must be positive; got {self.learning_rates}")

    def model_hyper(self, model_name: str) -> dict[str, object]:
        hyper: dict[str, object] = {} if self.hidden_dim is None else {"hidden_dim": self.hidden_dim}
        if model_name == "acmil":
            hyper |= {"n_branches": self.acmil_branches, "top_k": self.acmil_top_k, "mask_prob": self.acmil_mask_prob}
        return hyper


@dataclass
class MilResult:
    classes: list[str]
    chosen_lr: float
    grid: dict[str, dict]  # lr key -> {"per_seed": {seed: best val metric}, "mean": ...}
    test: dict  # {"per_seed": {seed: metrics}, "mean": {...}, "std": {...}}
    skipped_runs: list[str] = field(default_factory=list)  # "<lr>/<seed>" found finished


@dataclass(frozen=True)
class _Data:
    bags: dict[str, list[tuple[str, Tensor, int]]]  # split -> (slide_id, features, class index)
    classes: list[str]
    in_dim: int


def lr_key(lr: float) -> str:
    """The folder name of a learning rate: its shortest exact repr (1e-4 -> "0.0001")."""
    return repr(float(lr))


# --------------------------------------------------------------------------------------------------- inputs


def prepare_data(task: Task, features: Mapping[str, Tensor], selection_metric: SelectionMetric = "auc") -> _Data:
    """Encode the labels (sorted names -> 0..C-1), pair each row with its features, check splits and dimensions."""
    require_slides(task, features.keys())
    classes = task.labels
    if len(classes) < 2:
        raise TaskError(f"{task.path}: every slide has the label {classes[0]!r}; a classifier needs two labels")
    index = {name: i for i, name in enumerate(classes)}
    bags = {
        split: [
            (row.slide_id, torch.as_tensor(features[row.slide_id]).float(), index[row.label])
            for row in task.split(split)
        ]
        for split in ("train", "val", "test")
    }
    for split in ("train", "val"):
        if not bags[split]:
            raise TaskError(
                f"{task.path}: no slide has split {split!r}; MIL training needs train and val rows "
                "(add a split column, e.g. with `pathgen mil-task`)"
            )
    if selection_metric == "auc" and (absent := sorted({*index} - {classes[c] for _, _, c in bags["val"]})):
        raise TaskError(
            f"{task.path}: the val split has no slide labelled {', '.join(absent)}, so its AUC cannot choose the "
            "learning rate; put such slides in val or select on balanced_accuracy"
        )
    dims = {slide: bag.shape[1] if bag.dim() == 2 else None for rows in bags.values() for slide, bag, _ in rows}
    in_dim = next(iter(dims.values()))
    if odd := [slide for slide, dim in dims.items() if dim is None or dim != in_dim]:
        raise FeaturesFileError(
            f"{task.path}: features of slide(s) {odd[:5]} are not N x {in_dim} like the others; recompute them"
        )
    return _Data(bags, classes, in_dim)


# --------------------------------------------------------------------------------------------------- files


def _save_torch(obj: object, path: Path) -> None:
    write_atomic(path, lambda partial: torch.save(obj, partial))


def _save_json(obj: object, path: Path) -> None:
    write_atomic(path, lambda partial: partial.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def data_digest(data: _Data) -> str:
    """sha256 over what training sees: the class encoding, each split's slide ids and labels, and every bag's bytes."""
    digest = hashlib.sha256(json.dumps([data.classes, data.in_dim]).encode())
    for split in ("train", "val", "test"):
        for slide_id, bag, label in data.bags[split]:
            digest.update(json.dumps([split, slide_id, label, list(bag.shape)]).encode())
            digest.update(bag.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(data_id: str, model_name: str, recipe: MilRecipe, lr: float, seed: int) -> dict:
    """What one (lr, seed) folder is a function of; a folder with another fingerprint is not this run's."""
    found = {"data": data_id, "model": model_name, "recipe": asdict(recipe), "lr": lr_key(lr), "seed": seed}
    return json.loads(json.dumps(found))  # as it reads back from its file (tuples as lists)


def claim_folder(folder: Path, fingerprint: dict, log: Callable[[str], None]) -> None:
    """Make ``folder`` this run's: keep its files when its fingerprint matches, else remove them (they were trained
    on other data, another model or recipe, or by a version that wrote no fingerprint) and write ours."""
    path = folder / FINGERPRINT
    found = json.loads(path.read_text()) if path.exists() else None
    if found == fingerprint:
        return
    stale = [name for name in RUN_FILES if (folder / name).exists()]
    if stale:
        why = "has no fingerprint" if found is None else "was trained on other inputs"
        log(f"{folder}: {why} ({', '.join(stale)}); training it afresh")
        for name in stale:
            (folder / name).unlink()
    _save_json(fingerprint, path)


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """The epoch lines of a run up to ``up_to_epoch`` (a kill after a line but before its state drops the line)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record["epoch"] <= up_to_epoch]


def _write_metrics(path: Path, records: list[dict]) -> None:
    write_atomic(path, lambda partial: partial.write_text("".join(json.dumps(r) + "\n" for r in records)))


# --------------------------------------------------------------------------------------------------- one epoch


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, bags: list, seed: int, epoch: int) -> float:
    """One pass over the training slides, one slide per step, in an order fixed by (seed, epoch)."""
    model.train()
    order = torch.randperm(len(bags), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    total = 0.0
    for i in order.tolist():
        _, bag, label = bags[i]
        loss = mil_loss(model(bag), torch.tensor(label, device=bag.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / len(bags)


@torch.no_grad()
def predict(model: nn.Module, bags: list) -> tuple[list[int], np.ndarray, float]:
    """Labels, S x C softmax probabilities and the mean slide cross-entropy of ``bags`` in eval mode."""
    model.eval()
    labels, probabilities, losses = [], [], []
    for _, bag, label in bags:
        logits = model(bag).logits
        losses.append(float(F.cross_entropy(logits.unsqueeze(0), torch.tensor([label], device=logits.device))))
        probabilities.append(torch.softmax(logits.double(), dim=0).cpu().numpy())
        labels.append(label)
    return labels, np.stack(probabilities), float(np.mean(losses))


def _selection_value(metrics: dict, selection_metric: SelectionMetric) -> float:
    value = metrics[selection_metric]
    return -math.inf if value is None else float(value)  # prepare_data made val AUC defined; belt and braces


# --------------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class _Run:
    data: _Data
    model_name: str
    recipe: MilRecipe
    lr: float
    seed: int
    folder: Path
    device: torch.device = torch.device("cpu")

    def build(self) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(self.seed)
        model = build_mil_model(
            self.model_name, self.data.in_dim, len(self.data.classes), **self.recipe.model_hyper(self.model_name)
        ).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.recipe.epochs)
        return model, optimizer, scheduler


def _resume(run: _Run, model, optimizer, scheduler) -> dict:
    """Load ``state.pt`` into the fresh objects; return the progress record (epoch 0 when starting afresh)."""
    state_path = run.folder / "state.pt"
    if not state_path.exists():
        torch.manual_seed(run.seed)  # the same RNG stream whether or not the model was built just before
        return {"epoch": 0, "best_epoch": None, "best_value": -math.inf, "best_loss": math.inf, "best_model": None}
    state = torch.load(state_path, weights_only=True, map_location=run.device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), run.device)
    return state["progress"]


def _rng_state(device: torch.device) -> dict:
    """The RNG streams dropout and ACMIL's masking draw from: the CPU's, and the device's on a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda}


def _run_one(run: _Run, log: Callable[[str], None], on_epoch: EpochCallback | None) -> dict:
    """Train one (lr, seed) to the end (or from its last finished epoch); return its completion record."""
    model, optimizer, scheduler = run.build()
    progress = _resume(run, model, optimizer, scheduler)
    metrics_path = run.folder / "metrics.jsonl"
    records = _read_metrics(metrics_path, progress["epoch"])
    if progress["epoch"]:
        log(f"lr={run.lr:g} seed={run.seed}: resuming after epoch {progress['epoch']}")
    for epoch in range(progress["epoch"] + 1, run.recipe.epochs + 1):
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_epoch(model, optimizer, run.data.bags["train"], run.seed, epoch)
        scheduler.step()
        labels, probabilities, val_loss = predict(model, run.data.bags["val"])
        value = _selection_value(classification_metrics(labels, probabilities), run.recipe.selection_metric)
        record = {"epoch": epoch, "lr": epoch_lr, "train_loss": train_loss, "val_loss": val_loss}
        record[f"val_{run.recipe.selection_metric}"] = value
        records.append(record)
        if value > progress["best_value"] or (value == progress["best_value"] and val_loss < progress["best_loss"]):
            # kept in the state (saved each epoch anyway), so best.pt is written once, when the (lr, seed) ends
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = {"best_epoch": epoch, "best_value": value, "best_loss": val_loss, "best_model": best_model}
            progress = {**progress, **best}
        progress = {**progress, "epoch": epoch}
        _write_metrics(metrics_path, records)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **_rng_state(run.device)}
        _save_torch({**state, "scheduler": scheduler.state_dict(), "progress": progress}, run.folder / "state.pt")
        log(f"lr={run.lr:g} seed={run.seed} epoch {epoch}: train {train_loss:.4f} val {val_loss:.4f} {value:.4f}")
        if on_epoch is not None:
            on_epoch(run.lr, run.seed, record)
    best = {"model": progress["best_model"], "epoch": progress["best_epoch"], "classes": run.data.classes}
    _save_torch(best, run.folder / "best.pt")
    done = {"best_epoch": progress["best_epoch"], "best_val": progress["best_value"], "epochs": run.recipe.epochs}
    _save_json(done, run.folder / "done.json")
    return done


# --------------------------------------------------------------------------------------------------- the grid


def load_best(
    path: Path, model_name: str, in_dim: int, classes: list[str], recipe: MilRecipe, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model of a finished (lr, seed) with its best epoch's weights, in eval mode on ``device``."""
    model = build_mil_model(model_name, in_dim, len(classes), **recipe.model_hyper(model_name))
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu")["model"])
    return model.to(device).eval()


def _evaluate_test(data: _Data, model_name: str, recipe: MilRecipe, folder: Path, device: torch.device) -> dict:
    """The best checkpoint of each seed of the chosen lr on the test split: per seed, mean and std over seeds."""
    if not data.bags["test"]:
        return {"per_seed": {}, "mean": {}, "std": {}, "note": "the task has no test split"}
    per_seed = {}
    for seed in recipe.seeds:
        model = load_best(folder / str(seed) / "best.pt", model_name, data.in_dim, data.classes, recipe, device)
        labels, probabilities, loss = predict(model, data.bags["test"])
        per_seed[str(seed)] = {**classification_metrics(labels, probabilities, data.classes), "loss": loss}
    scalars = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "loss")
    summary = {name: mean_std([m[name] for m in per_seed.values()]) for name in scalars}
    return {
        "per_seed": per_seed,
        "mean": {name: pair[0] for name, pair in summary.items()},
        "std": {name: pair[1] for name, pair in summary.items()},
    }


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _on_device(data: _Data, device: torch.device) -> _Data:
    if device.type == "cpu":
        return data
    bags = {split: [(s, bag.to(device), c) for s, bag, c in rows] for split, rows in data.bags.items()}
    return _Data(bags, data.classes, data.in_dim)


def _train_or_skip(run: _Run, fingerprint: dict, log, on_epoch, on_run_done) -> tuple[dict, bool]:
    """The completion record of one (lr, seed), trained now or found finished (then True) in its folder."""
    claim_folder(run.folder, fingerprint, log)
    if (run.folder / "done.json").exists():
        log(f"lr={run.lr:g} seed={run.seed}: finished before, skipped")
        return json.loads((run.folder / "done.json").read_text()), True
    done = _run_one(run, log, on_epoch)
    if on_run_done is not None:
        on_run_done(run.lr, run.seed, done)
    return done, False


def _train_seeds(
    runs: list[_Run],
    data_id: str,
    skipped: list[str],
    log: Callable[[str], None],
    on_epoch: EpochCallback | None,
    on_run_done: RunDoneCallback | None,
) -> dict[str, Any]:
    """Every seed of one lr, trained or found finished (appended to ``skipped`` as ``<lr>/<seed>``): the best
    validation metric per seed and their mean."""
    per_seed = {}
    for run in runs:
        fingerprint = run_fingerprint(data_id, run.model_name, run.recipe, run.lr, run.seed)
        done, was_done = _train_or_skip(run, fingerprint, log, on_epoch, on_run_done)
        skipped += [f"{lr_key(run.lr)}/{run.seed}"] if was_done else []
        per_seed[str(run.seed)] = done["best_val"]
    return {"per_seed": per_seed, "mean": float(np.mean(list(per_seed.values())))}


def train_mil(
    task: Task,
    features: Mapping[str, Tensor],
    model_name: str,
    recipe: MilRecipe | None = None,
    out_dir: str | Path = ".",
    log: Callable[[str], None] = lambda message: None,
    on_epoch: EpochCallback | None = None,
    *,
    data_id: str | None = None,
    on_run_done: RunDoneCallback | None = None,
    device: str | torch.device = "cpu",
) -> MilResult:
    """Train ``model_name`` on every (lr, seed) of the recipe, choose the lr by the mean over seeds of the best
    validation metric (ties: the smaller lr), record the choice and evaluate its best checkpoints on test.
    ``on_epoch(lr, seed, record)`` is called after each epoch's files are written, ``on_run_done(lr, seed, done)``
    after an (lr, seed) trained here finished (``done.json`` written). ``data_id`` names the data in the folders'
    fingerprints (a caller that already has a content hash of the task and features); unset, the bags' bytes are
    hashed (:func:`data_digest`)."""
    recipe = recipe or MilRecipe()
    out = Path(out_dir)
    data = prepare_data(task, features, recipe.selection_metric)
    data_id = data_id or data_digest(data)
    device = resolve_device(device) if isinstance(device, str) else device
    data = _on_device(data, device)
    skipped: list[str] = []
    grid: dict[str, dict] = {}
    for lr in recipe.learning_rates:
        runs = [_Run(data, model_name, recipe, lr, seed, out / lr_key(lr) / str(seed), device) for seed in recipe.seeds]
        grid[lr_key(lr)] = _train_seeds(runs, data_id, skipped, log, on_epoch, on_run_done)
    chosen = max(sorted(recipe.learning_rates), key=lambda lr: grid[lr_key(lr)]["mean"])
    selection = {
        "classes": data.classes,
        "model": model_name,
        "recipe": asdict(recipe),
        "selection_metric": recipe.selection_metric,
        "grid": grid,
        "chosen_lr": chosen,
    }
    _save_json(selection, out / "selection.json")
    test = _evaluate_test(data, model_name, recipe, out / lr_key(chosen), device)
    _save_json({"classes": data.classes, "model": model_name, "lr": chosen, **test}, out / "test.json")
    return MilResult(data.classes, chosen, grid, test, skipped)
