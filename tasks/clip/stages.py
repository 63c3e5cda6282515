"""The PathGen-CLIP run: which pairs each stage trains on, the run's name, and one stage trained end to end.

A run is named by a hash of everything that changes the model it produces: the model and the weights it starts
from (a checkpoint by its content), the hyperparameters, and each stage's data (the export manifest: which pair
shards, by commit id, or which external files). So a re-run with the same inputs resumes the same run, and new
pairs or new settings start a new run beside it under ``models/clip/<run>/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.digest import path_digest
from pathgen.settings import ClipSettings, PairSetSettings, Settings
from tasks.captions.export import agents_hashes
from tasks.clip.lease import RunLease
from tasks.clip.scalars import MetricsUnreadable
from tasks.clip.spec import TINY_RANDOM, ModelSpec, has_random_weights, local_checkpoint, quick_gelu_name
from tasks.clip.train import (
    CheckpointMirror,
    StagePlan,
    checkpoints,
    epoch_of,
    fitted_batch,
    fitted_workers,
    run_trainer,
    set_aside_incomplete,
    write_metrics,
)
from tasks.clip.webdataset import (
    ExportSummary,
    export_external,
    export_pairs,
    sample_count,
    tar_sizes,
    training_tars,
)
from tasks.store.listing import list_mtimes
from tasks.store.objects import Store

RUNS = "models/clip"


def work_root(cfg: ClipSettings) -> Path:
    return Path(cfg.work_dir).expanduser() if cfg.work_dir else Path.home() / ".cache" / "pathgen" / "clip"


def stage_sets(cfg: ClipSettings) -> list[tuple[str, PairSetSettings]]:
    return [("stage1", cfg.stage1)] + ([("stage2", cfg.stage2)] if cfg.stage2 else [])


def resolve_pair_set(store: Store, pair_set: PairSetSettings) -> PairSetSettings:
    """An agents_hash for a generated set (the only one in the store when unset); external sets as they are."""
    if pair_set.external:
        return pair_set
    found = agents_hashes(store)
    if pair_set.agents_hash is None:
        if len(found) != 1:
            raise ValueError(
                f"choose the pairs to train on with clip.stage1.agents_hash (found in {store.uri('pairs')}: "
                f"{', '.join(found) or 'none; run pathgen caption first'})"
            )
        return pair_set.model_copy(update={"agents_hash": found[0]})
    if pair_set.agents_hash not in found:
        raise ValueError(f"no pairs under agents_hash {pair_set.agents_hash!r} (found: {', '.join(found) or 'none'})")
    return pair_set


def set_folder(cfg: ClipSettings, pair_set: PairSetSettings) -> Path:
    if pair_set.external:  # the captions file too: two stages may caption one image folder differently
        source = f"{Path(pair_set.folder).resolve()}|{Path(pair_set.captions or '').resolve()}"
        key = hashlib.sha256(source.encode()).hexdigest()[:12]
        return work_root(cfg) / "data" / f"external-{key}"
    return work_root(cfg) / "data" / f"pairs-{pair_set.agents_hash}"


def export_set(store: Store, pair_set: PairSetSettings, settings: Settings, logger=None) -> ExportSummary:
    cfg = settings.clip
    out = set_folder(cfg, pair_set)
    if pair_set.external:
        return export_external(pair_set, out, cfg.pairs_per_tar, cfg.holdout_fraction)
    return export_pairs(store, pair_set.agents_hash, out, cfg.holdout_fraction, logger, settings.export.reviews)


PRETRAINED_ARCHITECTURE = "ViT-B-16"  # what clip.pretrained (openai, say) loads into when clip.model is unset


def start_spec(cfg: ClipSettings) -> ModelSpec:
    """The model stage 1 starts from. ``clip.model`` is trained as named: from ``clip.pretrained`` when given, else
    from random initialisation (random weights, and says so); neither set: the tiny model, from random weights.
    A tag trained with QuickGELU trains the name's ``-quickgelu`` twin (``ViT-B-16`` with ``openai``)."""
    if cfg.pretrained:
        return ModelSpec(quick_gelu_name(cfg.model or PRETRAINED_ARCHITECTURE, cfg.pretrained), cfg.pretrained)
    return ModelSpec(cfg.model or TINY_RANDOM)


def run_name(cfg: ClipSettings, data_digests: list[str]) -> str:
    if cfg.run:
        return cfg.run
    spec = start_spec(cfg)
    weights = spec.pretrained
    local = local_checkpoint(weights) if weights and ("://" in weights or Path(weights).exists()) else None
    if local and Path(local).exists():
        weights = path_digest(local)  # by content, wherever it lies
    train = cfg.model_dump(include={"lr", "weight_decay", "batch_size", "warmup", "seed", "devices", "workers"})
    if cfg.devices > 1:
        # batch_size became the global batch: a run trained with the per-device batch under the same settings is
        # another model and keeps its own name; on one device the two are the same, and so is the name
        train["batch"] = "global"
    train["precision"] = resolved_precision(cfg.precision)
    inputs = {
        "model": spec.name,
        "weights": weights,
        "train": train,
        "epochs": [pair_set.epochs for _, pair_set in stage_sets(cfg)],
        "data": data_digests,
        "holdout_fraction": cfg.holdout_fraction,
    }
    return "clip-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def data_digest(folder: Path) -> str:
    """What an export holds, not where its sources lie: moving the data does not make another run."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k not in ("folder", "captions")},
                                     sort_keys=True).encode()).hexdigest()  # fmt: skip


def resolved_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    import torch

    return "amp" if torch.cuda.is_available() else "fp32"


def random_start_warning(run: str, model: str) -> str:
    return (
        f"{run} trains {model} from RANDOM WEIGHTS (random initialisation, no pretrained weights): set "
        "clip.pretrained (with clip.model) to start from trained weights"
    )


@dataclass
class StageResult:
    stage: str
    checkpoint: str  # the store URI of the stage's last checkpoint
    local_checkpoint: str
    trained: bool  # False: the store already held the finished stage
    steps: int
    final_loss: float | None
    samples_per_s: float | None
    random_weights: bool
    metrics_error: str | None = None  # the trainer's metrics could not be read: the stage is not ok

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_plan(
    settings: Settings, run: str, stage: str, data: Path, start: ModelSpec, logger: logging.Logger
) -> StagePlan:
    cfg = settings.clip
    tars = training_tars(data)
    samples = sample_count(tars)
    if samples < 2:
        raise ValueError(f"{stage}: {samples} training pairs in {data}; contrastive training needs at least 2")
    pair_set = dict(stage_sets(cfg))[stage]
    precision = resolved_precision(cfg.precision)
    batch_size = fitted_batch(cfg.batch_size, samples, cfg.devices, logger)
    return StagePlan(
        run=run,
        name=stage,
        folder=work_root(cfg) / "runs" / run,
        spec=start,
        tars=tars,
        samples=samples,
        epochs=pair_set.epochs,
        batch_size=batch_size,
        workers=fitted_workers(tar_sizes(tars), batch_size, cfg.workers, cfg.devices, logger),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        precision=precision,
        grad_checkpointing=cfg.grad_checkpointing,
        devices=cfg.devices,
        seed=cfg.seed,
        launcher=cfg.launcher,
        random_start=has_random_weights(start_spec(cfg)),
    )


def train_stage(plan: StagePlan, store: Store, logger: logging.Logger, mirror_seconds: float = 30.0) -> StageResult:
    """Train one stage to its last epoch, resuming from its newest checkpoint here or in the store."""
    final_key = f"{plan.store_prefix()}/checkpoints/epoch_{plan.epochs}.pt"
    with RunLease(store, f"{RUNS}/{plan.run}", plan.folder, logger) as lease:  # RunBusy while another holds the run
        mirror = CheckpointMirror(plan, store, mirror_seconds, logger, still_held=lease.held)
        trained = not store.exists(final_key)
        set_aside_incomplete(plan.stage_dir / "checkpoints", logger)
        newest = mirror.fetch_newest()
        if trained:
            if newest:
                logger.info("%s %s: resuming from %s (epoch %d)", plan.run, plan.name, newest.name, epoch_of(newest))
            if plan.random_start:
                logger.warning(random_start_warning(plan.run, plan.spec.name))
            with mirror:
                run_trainer(plan, logger)
        lease.ensure_held()  # LeaseLost (pending): another trainer took the run over while this one trained
    local = checkpoints(plan.stage_dir / "checkpoints")
    if not local or epoch_of(local[-1]) < plan.epochs:
        raise RuntimeError(f"{plan.run} {plan.name}: the trainer ended without epoch_{plan.epochs}.pt")
    result = StageResult(plan.name, store.uri(final_key), str(local[-1]), trained, 0, None, None, plan.random_start)
    try:
        rows = write_metrics(plan) if trained else _finished_rows(plan, store)
    except MetricsUnreadable as exc:
        result.metrics_error = f"{plan.run} {plan.name}: its training metrics cannot be read ({exc})"
        return result
    last = rows[-1]
    result.steps, result.final_loss, result.samples_per_s = last["step"], last["loss"], last["samples_per_s"]
    return result


def _finished_rows(plan: StagePlan, store: Store) -> list[dict[str, Any]]:
    """A stage finished earlier: its trainer's records, else the metrics.jsonl its run left in the store (a run of
    an earlier version, before the records were kept)."""
    try:
        return write_metrics(plan)
    except MetricsUnreadable:
        key = f"{plan.store_prefix()}/metrics.jsonl"
        try:
            rows = [json.loads(line) for line in store.read_bytes(key).decode().splitlines()]
        except (FileNotFoundError, ValueError):
            rows = []
        if not rows or not all(isinstance(row, dict) and _is_loss(row.get("loss")) for row in rows):
            raise
        return rows


def _is_loss(value: Any) -> bool:
    """A JSON number (``2`` parses as an int); a bool is an int in Python but never a loss."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_run_record(store: Store, run: str, cfg: ClipSettings, stages: list[dict], exports: list[dict]) -> None:
    """``models/clip/<run>/run.json``: what the run trained on and from, and each stage's checkpoint."""
    spec = start_spec(cfg)
    record = {
        "run": run,
        "model": spec.name,
        "random_weights": has_random_weights(spec),
        "clip": cfg.model_dump(),
        "stages": stages,
        "exports": exports,
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    store.write_json(f"{RUNS}/{run}/run.json", record)


def newest_checkpoint(store: Store, prefix: str = RUNS) -> str | None:
    """The last epoch's checkpoint of the most recently trained stage under ``prefix`` (its highest epoch, not the
    newest file: a slow S3 clock or an interrupted run's partial epochs never win over a stage's end); None when
    there is none."""
    found = list_mtimes(store, prefix, ".pt")
    if not found:
        return None
    stages: dict[str, list[str]] = {}
    for key in found:
        stages.setdefault(key.rsplit("/checkpoints/", 1)[0], []).append(key)
    newest_stage = max(stages, key=lambda stage: max(found[k] for k in stages[stage]))
    return store.uri(max(stages[newest_stage], key=epoch_of))
