"""One training stage with open_clip's own trainer (``open_clip_train.main``) on exported WebDataset tars.

The trainer runs in this process for one device and under ``torchrun --nproc-per-node N`` for N GPUs. It writes
``<logs>/<stage>/{out.log, params.txt, checkpoints/epoch_N.pt}``; we always pass ``--resume latest``, so a re-run
continues from the newest checkpoint of its stage. Checkpoints are mirrored to ``models/clip/<run>/<stage>/`` in
the store while training goes (a checkpoint is copied once the trainer has moved past it, so never half-written),
and fetched back from there when another machine resumes the run. ``metrics.jsonl`` (step, loss, lr, samples/s)
comes from the trainer's structured output (``tasks.clip.scalars``), not from its log's wording.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.settings import clip_batch_per_device
from tasks.clip import scalars
from tasks.clip.spec import ModelSpec, fetch_whole, local_checkpoint, register_model_configs
from tasks.store.objects import Store

CHECKPOINT = re.compile(r"epoch_(\d+)\.pt$")


@dataclass
class StagePlan:
    """Everything one trainer run needs; ``folder`` is the local logs root, ``name`` the stage folder in it."""

    run: str
    name: str  # stage1 | stage2
    folder: Path
    spec: ModelSpec  # the model trained, with the weights it starts from
    tars: list[Path]
    samples: int
    epochs: int
    batch_size: int
    workers: int
    lr: float
    weight_decay: float
    warmup: int
    precision: str
    grad_checkpointing: bool
    devices: int
    seed: int
    launcher: str = "auto"
    random_start: bool = False  # the run began from random weights (stage 2 starts from stage 1 all the same)

    @property
    def stage_dir(self) -> Path:
        return self.folder / self.name

    @property
    def steps_per_epoch(self) -> int:
        return scalars.batches_per_epoch(self.samples, self.batch_size, self.devices, self.workers)

    def store_prefix(self) -> str:
        return f"models/clip/{self.run}/{self.name}"


def fitted_batch(batch_size: int, samples: int, devices: int, logger: logging.Logger) -> int:
    """The per-device batch open_clip_train gets (its ``--batch-size``) for the global ``clip.batch_size``: an equal
    share of it per device (the paper states its 384 globally), lowered to the pairs each device has, since the
    trainer drops partial batches and a batch larger than the data would train on nothing. A contrastive batch needs
    two pairs; with several devices one each is enough, as the trainer gathers every device's features."""
    per_device = clip_batch_per_device(batch_size, devices)
    fitted = max(2 if devices == 1 else 1, min(per_device, samples // devices))
    if fitted < per_device:
        logger.warning(
            "clip.batch_size %d (%d per device) is more than the %d pairs per device: batches of %d per device",
            batch_size,
            per_device,
            samples // devices,
            fitted,
        )
    return fitted


def fitted_workers(tar_sizes: list[int], batch_size: int, workers: int, devices: int, logger: logging.Logger) -> int:
    """Loader workers such that each one's tars fill a batch.

    Without resampling, open_clip_train gives each worker every Nth tar of a shuffled list, drops partial batches
    and repeats the worker's tars until it has yielded its share of the epoch: a worker whose tars hold fewer pairs
    than a batch yields nothing, ever, and spins in WebDataset's repeat loop (one tar per worker, a few pairs per
    tar: the training hangs). So a worker gets at least ``tars // workers`` tars, and the smallest that many hold
    together must fill a batch, whichever tars the shuffle deals it. With several devices shards are resampled (an
    endless stream per worker), which cannot starve; the tars are then only shared out between devices."""
    if devices > 1:
        return max(0, min(workers, len(tar_sizes) // devices))
    ascending = sorted(tar_sizes)
    fitted = min(workers, len(ascending))
    while fitted > 1 and sum(ascending[: len(ascending) // fitted]) < batch_size:
        fitted -= 1
    if fitted < workers:
        logger.warning(
            "clip.workers %d: %d loader workers, so that each one's share of the %d tars fills a batch of %d",
            workers,
            fitted,
            len(ascending),
            batch_size,
        )
    return fitted


def trainer_args(plan: StagePlan) -> list[str]:
    args = [
        "--model", plan.spec.name,
        "--dataset-type", "webdataset",
        "--train-data", "::".join(str(t) for t in plan.tars),
        "--train-num-samples", str(plan.samples),
        "--batch-size", str(plan.batch_size),
        "--epochs", str(plan.epochs),
        "--lr", repr(plan.lr),
        "--wd", repr(plan.weight_decay),
        "--warmup", str(plan.warmup),
        "--precision", plan.precision,
        "--workers", str(plan.workers),
        "--seed", str(plan.seed),
        "--logs", str(plan.folder),
        "--name", plan.name,
        "--resume", "latest",
        "--save-frequency", "1",
        "--report-to", "tensorboard",  # its scalars, through scalars.ScalarLog: the metrics we read
        "--log-every-n-steps", "10",
        "--device", "cuda" if _cuda() else "cpu",
    ]  # fmt: skip
    if plan.spec.pretrained:
        args += ["--pretrained", local_checkpoint(plan.spec.pretrained)]
    if plan.grad_checkpointing:
        args.append("--grad-checkpointing")
    if plan.devices > 1:
        # Tars are per slide and uneven: sampling shards with replacement gives every device the same number of
        # batches, where splitting whole tars between devices would leave one waiting on the others.
        args += ["--dist-backend", "nccl" if _cuda() else "gloo", "--ddp-static-graph", "--dataset-resampled"]
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("epoch_*.pt") if CHECKPOINT.search(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.search(p.name).group(1)))


def epoch_of(path: Path | str) -> int:
    match = CHECKPOINT.search(str(path))
    return int(match.group(1)) if match else 0


def run_trainer(plan: StagePlan, logger: logging.Logger) -> None:
    """open_clip_train on the plan; raises with the trainer's own words when it fails."""
    args = trainer_args(plan)
    plan.stage_dir.mkdir(parents=True, exist_ok=True)
    if plan.launcher == "in-process" or (plan.launcher == "auto" and plan.devices == 1):
        import open_clip_train.main as trainer

        register_model_configs()
        scalars.install(trainer)
        with _isolated_logging(trainer):
            status = trainer.main(args)
        if status not in (None, 0):
            raise RuntimeError(f"open_clip_train stopped (status {status}); see {plan.stage_dir / 'out.log'}")
        return
    # --standalone: a rendezvous on a free local port, so two trainings on one machine do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.devices}"]
    # The trainer's arguments travel in a file: torchrun's own parser would take --logs for its --logs-specs.
    args_file = plan.stage_dir / "trainer-args.json"
    args_file.write_text(json.dumps(args))
    command += ["-m", "tasks.clip.trainer_entry", "--args-file", str(args_file)]
    logger.info("torchrun on %d devices: %s", plan.devices, " ".join(command[:7]))
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise RuntimeError(f"torchrun exited with {done.returncode}; see {plan.stage_dir / 'out.log'}")


def complete_checkpoint(path: Path) -> bool:
    """A torch checkpoint written to the end: a zip archive whose directory (written last) opens and lists the
    pickled object, which reads back with a matching CRC. A file still being written, or cut short, is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
            return len(pickles) == 1 and bool(archive.read(pickles[0]))
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def set_aside_incomplete(folder: Path, logger: logging.Logger) -> None:
    """A run killed while saving leaves a truncated epoch_N.pt, which ``--resume latest`` would pick and fail on:
    only complete checkpoints (``complete_checkpoint``) stay where the trainer looks for one to resume from."""
    for path in checkpoints(folder):
        if not complete_checkpoint(path):
            path.rename(path.with_name(path.name + ".incomplete"))
            logger.warning("%s was cut short (killed while saving?): set aside, resuming from the one before", path)


TRAINER_PROGRESS = ("Start epoch", "Train Epoch", "Eval Epoch")


class TrainerProgressOnly(logging.Filter):
    """For a terminal's handler while the trainer runs: of the trainer's own records (the root logger's) below
    WARNING, only its progress lines pass; its model dump and parameter list (about 110 lines) stay in out.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or record.levelno >= logging.WARNING:
            return True
        return record.getMessage().startswith(TRAINER_PROGRESS)


@contextlib.contextmanager
def _isolated_logging(trainer):
    """open_clip_train's setup_logging adds a console handler to the root logger and sets every logger to INFO.
    Here it only writes out.log at INFO; the root logger's own handlers (Prefect's console) show the trainer's
    progress and what they showed before; afterwards the root logger gets its handlers and level back, so a second
    stage does not write into the first one's log."""
    root = logging.getLogger()
    handlers, level, original = list(root.handlers), root.level, trainer.setup_logging
    terminal = TrainerProgressOnly()

    def file_only(log_file, level, include_host=False):
        root.setLevel(level)
        for handler in handlers:
            handler.addFilter(terminal)
        if log_file:
            handler = logging.FileHandler(filename=log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d,%H:%M:%S"))
            root.addHandler(handler)

    trainer.setup_logging = file_only
    try:
        yield
    finally:
        trainer.setup_logging = original
        for handler in handlers:
            handler.removeFilter(terminal)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def write_metrics(plan: StagePlan) -> list[dict[str, Any]]:
    """``metrics.jsonl`` from the trainer's scalars; raises ``scalars.MetricsUnreadable`` when they cannot be read."""
    rows = scalars.read_metrics(plan.stage_dir, plan.steps_per_epoch, plan.name)
    (plan.stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


class CheckpointMirror:
    """Copies a stage's finished files to the store: at start (fetching), every ``interval`` seconds, at the end.

    A checkpoint is finished once this trainer has recorded a step of epoch N after it (open_clip saves epoch_N.pt
    in place, then trains epoch N; :func:`scalars.epochs_started`) and the file is a complete zip; records of earlier
    runs in the same file prove nothing about a file this run is writing again."""

    def __init__(
        self,
        plan: StagePlan,
        store: Store,
        interval: float = 30.0,
        logger: logging.Logger | None = None,
        still_held: Callable[[], bool] = lambda: True,
    ):
        self.plan, self.store, self.interval = plan, store, interval
        self.still_held = still_held  # False once another trainer took the run over: its files are not ours to add
        self.logger = logger or logging.getLogger("pathgen.clip")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clip-mirror", daemon=True)
        self._records_start = 0  # where this trainer's scalar records begin in the stage's records file

    def _key(self, name: str) -> str:
        return f"{self.plan.store_prefix()}/{name}"

    def fetch_newest(self) -> Path | None:
        """The newest checkpoint of this stage, brought here (with the store's log) when the store has a newer one."""
        remote = sorted(self.store.list(self._key("checkpoints"), ".pt"), key=epoch_of)
        local = checkpoints(self.plan.stage_dir / "checkpoints")
        if not remote or (local and epoch_of(local[-1]) >= epoch_of(remote[-1])):
            return local[-1] if local else None
        target = self.plan.stage_dir / "checkpoints" / remote[-1].rsplit("/", 1)[-1]
        self._download(remote[-1], target)
        if not complete_checkpoint(target):
            target.rename(target.with_name(target.name + ".incomplete"))
            raise RuntimeError(f"{self.store.uri(remote[-1])} is not a complete checkpoint; remove it and run again")
        for name in ("out.log", "params.txt", scalars.SCALARS):  # the store's logs go with its newer checkpoint
            if self.store.exists(self._key(name)):
                self._download(self._key(name), self.plan.stage_dir / name)
        return target

    def _download(self, key: str, target: Path) -> None:
        fetch_whole(self.store.fs, self.store.path(key), target)

    def __enter__(self) -> CheckpointMirror:
        self._records_start = scalars.records_size(self.plan.stage_dir)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sync(final=exc[0] is None)
        except Exception as error:  # noqa: BLE001 - never hide the trainer's own exception behind the mirror's
            if exc[0] is None:
                raise
            self.logger.warning("copying the stage's files to the store failed too: %s", error)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync(final=False)
            except Exception as error:  # noqa: BLE001 - retried next round and at the end
                self.logger.warning("copying checkpoints to the store failed (retried): %s", error)

    def sync(self, final: bool) -> None:
        """Copy checkpoints the trainer is done with (all complete ones when it has stopped), then the logs."""
        if not self.still_held():
            return
        stage_dir = self.plan.stage_dir
        started = scalars.epochs_started(stage_dir, self._records_start, self.plan.steps_per_epoch)
        for path in checkpoints(stage_dir / "checkpoints"):
            if (final or epoch_of(path) in started) and complete_checkpoint(path):
                key = self._key(f"checkpoints/{path.name}")
                if not self.store.exists(key):
                    self.store.put_file(path, key)
        with contextlib.suppress(scalars.MetricsUnreadable):  # none yet; at the end train_stage says so
            write_metrics(self.plan)
        for name in ("params.txt", "out.log", scalars.SCALARS, "metrics.jsonl"):
            if (stage_dir / name).exists():
                self.store.put_file(stage_dir / name, self._key(name))
