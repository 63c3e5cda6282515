"""Training metrics from open_clip_train's structured output, never from its log's wording.

open_clip_train hands every progress record (loss, learning rate, samples/s, keyed by its global step) to a
TensorBoard ``SummaryWriter`` when run with ``--report-to tensorboard``. ``ScalarLog`` stands in for that writer
(TensorBoard is not needed) and appends each scalar as one JSON line to ``<stage>/tensorboard/scalars.jsonl``;
``read_metrics`` turns those lines into the stage's ``metrics.jsonl`` rows. A stage whose metrics cannot be read
raises ``MetricsUnreadable``: it is not reported as trained.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

SCALARS = "tensorboard/scalars.jsonl"  # relative to the stage folder; the trainer's --report-to tensorboard path
REQUIRED = {"loss": "train/loss", "lr": "train/lr", "samples_per_s": "train/samples_per_second"}


class MetricsUnreadable(ValueError):
    """The trainer's metrics are missing or not what this reader understands."""


class ScalarLog:
    """What open_clip_train calls of a ``torch.utils.tensorboard.SummaryWriter``, as JSON lines."""

    def __init__(self, log_dir: str, **_: Any) -> None:
        self.path = Path(log_dir) / Path(SCALARS).name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a")

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        self._handle.write(json.dumps({"step": int(step), "tag": tag, "value": float(value)}) + "\n")
        self._handle.flush()  # read while the trainer runs, and complete up to the last record when it is killed

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def install(trainer_main: types.ModuleType) -> None:
    """Make ``open_clip_train.main`` write its TensorBoard scalars through ``ScalarLog``."""
    trainer_main.tensorboard = types.SimpleNamespace(SummaryWriter=ScalarLog)


def batches_per_epoch(samples: int, batch_size: int, devices: int, workers: int) -> int:
    """Optimizer steps per epoch, as open_clip_train's WebDataset loader counts them (rounded up to full batches,
    then to a multiple of the loader workers)."""
    batches = math.ceil(samples / (batch_size * devices))
    per_worker = math.ceil(batches / max(1, workers))
    return per_worker * max(1, workers)


def _records(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) in the order trained; a record of a step before the last starts a resumed run, whose
    steps replace those the run before it trained past its last checkpoint."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        raise MetricsUnreadable(f"{path} is missing: the trainer wrote no metrics") from None
    steps: list[tuple[int, dict[str, float]]] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step, tag, value = int(record["step"]), str(record["tag"]), float(record["value"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # the last line of a trainer killed while writing it
                break
            raise MetricsUnreadable(f"{path}: line {number} is not a metrics record: {line[:120]!r}") from None
        while steps and steps[-1][0] > step:
            steps.pop()
        if not steps or steps[-1][0] != step:
            steps.append((step, {}))
        steps[-1][1][tag] = value
    return steps


def epochs_started(stage_dir: Path, offset: int, per_epoch: int) -> set[int]:
    """The epochs of the steps recorded past ``offset`` (a byte position in the records: where this trainer's
    begin), numbered as open_clip numbers them: it records the first step of every epoch."""
    try:
        with (stage_dir / SCALARS).open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return set()
    started = set()
    for line in lines:
        try:
            started.add(int(json.loads(line)["step"]) // per_epoch)
        except (ValueError, KeyError, TypeError):
            continue  # the line the trainer is writing
    return started


def records_size(stage_dir: Path) -> int:
    """Where the next trainer's records will begin (they are appended)."""
    path = stage_dir / SCALARS
    return path.stat().st_size if path.exists() else 0


def read_metrics(stage_dir: Path, per_epoch: int, stage: str) -> list[dict[str, Any]]:
    """One row per logged step; ``step`` counts optimizer steps from the start of the stage."""
    path = stage_dir / SCALARS
    records = _records(path)
    rows: list[dict[str, Any]] = []
    for index, (step, values) in enumerate(records):
        missing = [tag for tag in REQUIRED.values() if tag not in values]
        if missing and index == len(records) - 1 and rows:
            break  # the step a killed trainer was recording
        if missing:
            raise MetricsUnreadable(f"{path}: step {step} lacks {', '.join(missing)} (another trainer version?)")
        row = {"stage": stage, "epoch": step // per_epoch, "step": step + 1}
        rows.append(row | {name: values[tag] for name, tag in REQUIRED.items()})
    if not rows:
        raise MetricsUnreadable(f"{path} holds no training step")
    return rows
