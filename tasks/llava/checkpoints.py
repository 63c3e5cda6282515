"""A stage's checkpoints, mirrored between the trainer's folder and the store, so an interrupted stage resumes on
this machine or another.

The trainer writes ``checkpoint-N/`` (weights, optimizer, scheduler, RNG states, trainer_state.json; under FSDP one
shard per device) into the stage's local ``checkpoints/``; once every process has written its part, rank 0 adds the
metric rows so far and ``state.json`` (the marker: a folder without it is not a checkpoint) and uploads the folder to
``models/llava/<run>/<stage>/checkpoints/step_N/`` with ``state.json`` last, then drops the older ones there (the
trainer rotates its own: ``save_total_limit``).

The marker also records the checkpoint's layout (:func:`layout`: the format of its files, the stage's mode, the
sharding and, sharded, the number of devices). A stage resumes only from a checkpoint of its own layout: one written
before the move onto the Trainer, or with another ``llava.sharding`` or device count (neither is in the run name),
cannot be loaded, and resuming from it would fail every re-run. Those are ignored with a log line: the stage resumes
from an older one that fits or starts over.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from tasks.llava.plan import TrainPlan
from tasks.store.objects import Store

STEP_DIR = re.compile(r"step_(\d+)$")
LOCAL_DIR = re.compile(r"checkpoint-(\d+)$")  # the trainer's own name
MARKER = "state.json"
FORMAT = "hf-trainer-1"  # transformers' Trainer checkpoint folders (FSDP2 shards, trained weights or adapters)
LOG = logging.getLogger("pathgen.llava")


def layout(plan: TrainPlan) -> dict[str, Any]:
    """What decides the files of a checkpoint, as the trainer shards (trainer.sharding_config): FSDP's sharded state
    is split by device count; an unsharded one (one device, ``none`` or LoRA) is the same on any number."""
    sharded = plan.devices > 1 and plan.sharding != "none" and plan.mode != "lora"
    return {"format": FORMAT, "mode": plan.mode, "sharding": plan.sharding if sharded else "none",
            "devices": plan.devices if sharded else 1}  # fmt: skip


def fits(marker: dict[str, Any], plan: TrainPlan, where: str, logger: logging.Logger = LOG) -> bool:
    """Whether this plan can resume from the checkpoint of ``marker``; if not, say why it is ignored."""
    wanted = layout(plan)
    found = {key: marker.get(key) for key in wanted}
    if found == wanted:
        return True
    logger.warning("%s %s: ignoring checkpoint %s, written as %s; this run resumes only from %s", plan.run,
                   plan.stage, where, found, wanted)  # fmt: skip
    return False


def committed_local(plan: TrainPlan) -> list[Path]:
    """Committed checkpoints here, whatever their layout, oldest first."""
    found = [p for p in plan.checkpoint_dir.glob("checkpoint-*") if LOCAL_DIR.search(p.name)]
    found = [p for p in found if (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def local_checkpoints(plan: TrainPlan) -> list[Path]:
    """Committed checkpoints here this plan can resume from, oldest first."""
    return [p for p in committed_local(plan) if fits(json.loads((p / MARKER).read_text()), plan, str(p))]


def store_checkpoints(store: Store, prefix: str) -> list[str]:
    """Committed checkpoint folders of a stage in the store (keys of their state.json, the last file uploaded)."""
    keys = [k for k in store.list(f"{prefix}/checkpoints", f"/{MARKER}") if STEP_DIR.search(k.rsplit("/", 2)[-2])]
    return sorted(keys, key=step_of)


def step_of(path: str | Path) -> int:
    name = str(path).rstrip("/").removesuffix(f"/{MARKER}").rsplit("/", 1)[-1]
    match = STEP_DIR.search(name) or LOCAL_DIR.search(name)
    return int(match.group(1)) if match else 0


def commit(plan: TrainPlan, store: Store, folder: Path, rows: list[dict]) -> None:
    """Mark the trainer's checkpoint folder committed, upload it (state.json last), then drop the older ones."""
    step = step_of(folder)
    write_rows(folder / "metrics.jsonl", rows)
    marker = {"step": step, "stage": plan.stage, "run": plan.run} | layout(plan)
    (folder / MARKER).write_text(json.dumps(marker))
    key = f"{plan.prefix}/checkpoints/step_{step:07d}"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    for file in [*files, folder / MARKER]:
        store.put_file(file, f"{key}/{file.relative_to(folder).as_posix()}")
    store.put_file(folder / "metrics.jsonl", f"{plan.prefix}/metrics.jsonl")  # progress, visible while it trains
    drop_older(plan, store, step)


def drop_older(plan: TrainPlan, store: Store, step: int) -> None:
    """Only checkpoints from ``step`` on are kept: a full fine-tune's optimizer state is several times the model."""
    for path in committed_local(plan):
        if step_of(path) < step:
            shutil.rmtree(path, ignore_errors=True)
    for key in store_checkpoints(store, plan.prefix):
        if step_of(key) < step:
            store.delete(key)  # state.json first: what is left is no longer a checkpoint
            store.fs.rm(store.path(key.rsplit("/", 1)[0]), recursive=True)


def fetch_newest(plan: TrainPlan, store: Store, logger: logging.Logger = LOG) -> Path | None:
    """The newest checkpoint this plan can resume from, here or (brought here) from the store, whichever is further.
    Those here it cannot resume from are removed (the store keeps its copies): the trainer's rotation would keep a
    newer one of them and delete the checkpoint it has just written."""
    for path in committed_local(plan):
        if not fits(json.loads((path / MARKER).read_text()), plan, str(path), logger):
            shutil.rmtree(path, ignore_errors=True)
    local = committed_local(plan)
    remote = [k for k in store_checkpoints(store, plan.prefix) if fits(store.read_json(k), plan, k, logger)]
    if not remote or (local and step_of(local[-1]) >= step_of(remote[-1])):
        return local[-1] if local else None
    folder = remote[-1].rsplit("/", 1)[0]
    target = plan.checkpoint_dir / f"checkpoint-{step_of(folder)}"
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for key in store.list(folder):
        local_file = partial / key[len(folder) + 1 :]
        local_file.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get(store.path(key), str(local_file))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def resumed_rows(folder: Path) -> list[dict]:
    """The metric rows a checkpoint carries, up to its step."""
    step = json.loads((folder / MARKER).read_text())["step"]
    return [r for r in read_rows(folder / "metrics.jsonl") if r["step"] <= step]
