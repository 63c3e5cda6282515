"""A stage's checkpoints, mirrored between the trainer's folder and the store, so an interrupted stage resumes on
this machine or another.

The trainer writes ``checkpoint-N/`` (weights, optimizer, scheduler, RNG states, trainer_state.json; under FSDP one
shard per device) into the stage's local ``checkpoints/``; once every process has written its part, rank 0 adds the
metric rows so far and ``state.json`` (the marker: a folder without it is not a checkpoint) and uploads the folder to
``models/llava/<run>/<stage>/checkpoints/step_N/`` with ``state.json`` last, then drops the older ones there (the
trainer rotates its own: ``save_total_limit``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tasks.llava.plan import TrainPlan
from tasks.store.objects import Store

STEP_DIR = re.compile(r"step_(\d+)$")
LOCAL_DIR = re.compile(r"checkpoint-(\d+)$")  # the trainer's own name
MARKER = "state.json"


def local_checkpoints(plan: TrainPlan) -> list[Path]:
    """Committed checkpoints here, oldest first."""
    found = [p for p in plan.checkpoint_dir.glob("checkpoint-*") if LOCAL_DIR.search(p.name)]
    found = [p for p in found if (p / MARKER).is_file()]
    return sorted(found, key=step_of)


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
    (folder / MARKER).write_text(json.dumps({"step": step, "stage": plan.stage, "run": plan.run, "mode": plan.mode}))
    key = f"{plan.prefix}/checkpoints/step_{step:07d}"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    for file in [*files, folder / MARKER]:
        store.put_file(file, f"{key}/{file.relative_to(folder).as_posix()}")
    store.put_file(folder / "metrics.jsonl", f"{plan.prefix}/metrics.jsonl")  # progress, visible while it trains
    drop_older(plan, store, step)


def drop_older(plan: TrainPlan, store: Store, step: int) -> None:
    """Only checkpoints from ``step`` on are kept: a full fine-tune's optimizer state is several times the model."""
    for path in local_checkpoints(plan):
        if step_of(path) < step:
            shutil.rmtree(path, ignore_errors=True)
    for key in store_checkpoints(store, plan.prefix):
        if step_of(key) < step:
            store.delete(key)  # state.json first: what is left is no longer a checkpoint
            store.fs.rm(store.path(key.rsplit("/", 1)[0]), recursive=True)


def fetch_newest(plan: TrainPlan, store: Store) -> Path | None:
    """The newest checkpoint, here or (brought here) from the store, whichever is further."""
    local = local_checkpoints(plan)
    remote = store_checkpoints(store, plan.prefix)
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
