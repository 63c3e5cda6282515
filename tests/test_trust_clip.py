"""PathGen-CLIP on a store of four small slides (four copies of CMU-1-Small-Region, four pairs each, named as TCGA
slides, two of one case): training that never hangs, a holdout split by case, one trainer per run, checkpoints
resumed only when complete, metrics read from the trainer's own structured output, and an export that always exits
cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tasks.store.objects import Store

from .conftest import CMU

# Two slides of case TCGA-AA-0001, one of each other case. At the default clip.holdout_fraction (0.05) none of these
# cases is held out, so the default export is four tars of four pairs (the store of issue 17, point 8); at 0.3 the
# case TCGA-AA-0001 (both its slides) is, and the others are not.
SLIDES = ["TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0001-01Z-00-DX2", "TCGA-BB-0002-01Z-00-DX1", "TCGA-CC-0003-01Z-00-DX1"]
PAIRS_PER_SLIDE = 4


@pytest.fixture(scope="module")
def four_slide_store(tmp_path_factory, tiny_models) -> Path:
    """Four copies of CMU-1-Small-Region, four 224 px patches each, captioned by the tiny models: 16 pairs."""
    from agents.identity import agents_hash, identities
    from pathgen.settings import load_settings
    from tasks.captions.caption import caption_slides
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources

    root = tmp_path_factory.mktemp("four-slides")
    slides = root / "slides"
    slides.mkdir()
    for name in SLIDES:
        shutil.copy(CMU, slides / f"{name}.svs")
    store = root / "store"
    extract = {"store": str(store), "patch.patch_px": 224, "selection.method": "random"}
    settings = load_settings(overrides=extract | {"selection.max_per_slide": PAIRS_PER_SLIDE}, environ={})
    for source in resolve_sources([str(slides)], settings):
        outcome = extract_slide(source, settings, Store(settings.store))
        assert outcome.status == "ok" and outcome.patches == PAIRS_PER_SLIDE, outcome
    short = {f"agents.{role}.max_new_tokens": 12 for role in ("describe", "revise", "summarize")}  # fast captions
    captioning = {"store": str(store), "agents.model_cache": str(tiny_models[0]), **short}
    settings = load_settings(overrides=captioning, environ={})
    hash_ = agents_hash(settings.agents, identities(settings.agents, settings.retries))
    outcomes = caption_slides(SLIDES, settings, hash_)
    assert [(o.status, o.items) for o in outcomes] == [("ok", PAIRS_PER_SLIDE)] * 4, outcomes
    return store


def _agents_hash(store: Path) -> str:
    (folder,) = list((store / "pairs").iterdir())
    return folder.name


def _slides_in(folder: Path) -> dict[str, set[str]]:
    """slide_id -> patch ids of the pairs in the tars of ``folder``, from each sample's provenance."""
    found: dict[str, set[str]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found.setdefault(meta["slide_id"], set()).add(meta["patch_id"])
    return found


def test_the_holdout_takes_whole_cases_never_neighbouring_patches(four_slide_store, tmp_path):
    from tasks.clip.webdataset import export_pairs

    out = tmp_path / "wds"
    summary = export_pairs(Store(str(four_slide_store)), _agents_hash(four_slide_store), out, holdout_fraction=0.3)
    train, held = _slides_in(out), _slides_in(out / "holdout")
    assert not set(train) & set(held), "a slide has pairs on both sides of the split"
    cases = {side: {slide[:12] for slide in slides} for side, slides in (("train", train), ("held", held))}
    assert not cases["train"] & cases["held"], "a case has slides on both sides of the split"
    assert sorted(held) == SLIDES[:2] and sorted(train) == SLIDES[2:]  # the case TCGA-AA-0001, whole
    assert (summary.pairs, summary.holdout_pairs) == (8, 8)

    from tasks.clip.webdataset import holdout_group

    assert holdout_group("TCGA-AA-0001-01Z-00-DX2.abc") == "TCGA-AA-0001" and holdout_group("CMU-1") == "CMU-1"

    default = export_pairs(Store(str(four_slide_store)), _agents_hash(four_slide_store), tmp_path / "d", 0.05)
    assert (default.tars, default.pairs, default.holdout_pairs) == (4, 16, 0)


def _pathgen_within(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``python -m pathgen ARGS``; a run still going after ``timeout`` seconds is killed with all its processes
    (the trainer's data workers too) and fails the test."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pathgen", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"pathgen {args[0]} still running after {timeout:.0f} s (hung):\n{output[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@pytest.mark.prefect
def test_train_clip_with_default_settings_finishes_on_four_small_slides(prefect_api, four_slide_store, tmp_path):
    """Four tars of four pairs, clip.workers 4 and a batch fitted to the 16 pairs: each loader worker's one tar
    never filled a batch, so the worker spun in WebDataset's repeat loop and the training never ended."""
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_LOGGING_LEVEL="INFO")
    work = tmp_path / "work"
    done = _pathgen_within(
        ["train-clip", "--store", str(four_slide_store), "--set", f"clip.work_dir={work}"], env, tmp_path, 150
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "stage1: ok  16 pairs" in done.stdout, done.stdout[-2000:]
    assert "loader workers, so that each one's share of the 4 tars fills a batch of 16" in done.stdout


def test_loader_workers_each_get_tars_that_fill_a_batch():
    import logging

    from tasks.clip.train import fitted_workers

    logger = logging.getLogger("test")
    assert fitted_workers([4, 4, 4, 4], 16, 4, 1, logger) == 1  # one worker takes all four tars
    assert fitted_workers([4, 4, 4, 4], 8, 4, 1, logger) == 2  # two tars each
    assert fitted_workers([100] * 8, 16, 4, 1, logger) == 4  # every tar fills a batch: as many as asked
    assert fitted_workers([1, 1, 1, 50, 50, 50], 40, 3, 1, logger) == 1  # two small tars could meet in one worker
    assert fitted_workers([4, 4], 8, 0, 1, logger) == 0  # the main process reads all tars
    assert fitted_workers([4] * 8, 16, 4, 2, logger) == 4  # resampled shards (several devices): never starve


# -- metrics from the trainer's structured output ----------------------------------------------------------------


def _training(store: Path, data_store: Path, tmp_path: Path, **overrides):
    """Settings, run name and the exported tars of the four-slide store, to train on in this process."""
    from pathgen.settings import load_settings
    from tasks.clip.webdataset import export_pairs

    settings = load_settings(
        overrides={"store": str(store), "clip.work_dir": str(tmp_path / "work"), "clip.workers": 0, **overrides},
        environ={},
    )
    out = tmp_path / "wds"
    export_pairs(Store(str(data_store)), _agents_hash(data_store), out, holdout_fraction=0.0)
    return settings, [{"stage": "stage1", "data": str(out)}]


class _Reworded:
    """open_clip_train's ``logging`` with its progress line in other words (as another trainer version might)."""

    def __init__(self, original):
        self._original = original

    def info(self, message, *args, **kwargs):
        if str(message).startswith("Train Epoch"):
            message = "progress " + str(message).replace("Loss", "objective").replace("LR", "rate")
        self._original.info(message, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._original, name)


def test_training_metrics_come_from_the_trainers_records_not_its_log_wording(four_slide_store, tmp_path, monkeypatch):
    import logging

    import open_clip_train.train

    from tasks.clip.work import train_units

    monkeypatch.setattr(open_clip_train.train, "logging", _Reworded(open_clip_train.train.logging))
    store = tmp_path / "store"
    settings, units = _training(store, four_slide_store, tmp_path, **{"clip.stage1.epochs": 2, "clip.batch_size": 4})
    (outcome,) = train_units(units, settings, "metrics", "tiny-random", None, logging.getLogger("test"))
    assert outcome.status == "ok", outcome
    assert "progress Train Epoch" in (tmp_path / "work" / "runs" / "metrics" / "stage1" / "out.log").read_text()
    assert outcome.columns["steps"] == 2 * 16 // 4 and isinstance(outcome.columns["final_loss"], float), outcome
    rows = (store / "models" / "clip" / "metrics" / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [0, 0, 1, 1]  # steps 1 and 4 of each epoch (every 10th)


def test_a_stage_whose_metrics_cannot_be_read_is_not_ok(four_slide_store, tmp_path, monkeypatch):
    """A trainer that leaves its checkpoints but no metrics this reader understands: the stage failed, naming why,
    never "ok" with 0 steps and no loss."""
    import logging

    import torch

    import tasks.clip.stages
    from tasks.clip.work import train_units

    def trainer_without_metrics(plan, logger):
        (plan.stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 1, "state_dict": {}}, plan.stage_dir / "checkpoints" / "epoch_1.pt")
        (plan.stage_dir / "out.log").write_text("step 1 of 1: objective 3.2\n")  # a wording nobody parses

    monkeypatch.setattr(tasks.clip.stages, "run_trainer", trainer_without_metrics)
    settings, units = _training(tmp_path / "store", four_slide_store, tmp_path)
    (outcome,) = train_units(units, settings, "unread", "tiny-random", None, logging.getLogger("test"))
    assert outcome.status == "failed" and "training metrics cannot be read" in outcome.error, outcome
    assert "scalars.jsonl is missing" in outcome.error


# -- one trainer per run -----------------------------------------------------------------------------------------


def _wait_for(condition, seconds: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process is None or process.poll() is None, f"the first trainer ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.2)


@pytest.mark.prefect
def test_a_second_trainer_of_a_run_stops_with_a_clear_message(prefect_api, four_slide_store, tmp_path):
    """Two `pathgen train-clip` of one run at once: the second resumed from the first's half-written epoch_N.pt.
    Now the second stops at once, naming the trainer that holds the run, and the first trains on undisturbed."""
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_LOGGING_LEVEL="INFO")
    work = tmp_path / "work"
    args = ["train-clip", "--store", str(four_slide_store), "--set", f"clip.work_dir={work}"]
    args += ["--set", "clip.stage1.epochs=400", "--set", "clip.run=twice", "--set", "clip.workers=0"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "pathgen", *args], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        checkpoints = work / "runs" / "twice" / "stage1" / "checkpoints"
        _wait_for(lambda: len(list(checkpoints.glob("epoch_*.pt"))) >= 2, 180, "checkpoint", first)
        second = _pathgen_within(args, env, tmp_path, 90)
        assert second.returncode == 1, second.stdout[-3000:]
        assert "this run is being trained by another trainer" in second.stdout or "in use by another trainer" in (
            second.stdout
        ), second.stdout[-3000:]
        assert f"pid {first.pid}" in second.stdout  # the holder, named
        assert first.poll() is None, "the first trainer was disturbed"
        assert "resuming" not in second.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_lease_left_by_a_dead_trainer_is_taken_over_and_a_live_one_is_not(tmp_path):
    import socket

    from tasks.clip.lease import RunBusy, RunLease

    store = Store(str(tmp_path / "store"))
    store.check()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"owner": "gone", "host": socket.gethostname(), "pid": int(dead.stdout), "renewed_at": "now"}
    store.write_json("models/clip/r/lease.json", record | {"renewed": time.time()})
    with RunLease(store, "models/clip/r", tmp_path / "runs" / "r") as lease:  # its process is gone: stale
        assert store.read_json("models/clip/r/lease.json")["owner"] == lease.record["owner"]
        with pytest.raises(RunBusy, match="in use by another trainer"):  # the local folder is locked
            RunLease(store, "models/clip/r", tmp_path / "runs" / "r").__enter__()
        with pytest.raises(RunBusy, match=f"pid {os.getpid()} on"):  # another machine: the store's lease
            RunLease(store, "models/clip/r", tmp_path / "elsewhere").__enter__()
    assert not store.exists("models/clip/r/lease.json")  # given back


def test_a_trainer_whose_lease_was_taken_over_stops_renewing_and_says_so(tmp_path, monkeypatch, caplog):
    """After an outage longer than the lease, another trainer took the run: renewing blindly would make both train
    on. The holder reads the record back first, gives the run up (LeaseLost, a RunBusy: the stage stays pending)
    and leaves the new holder's record alone."""
    import tasks.clip.lease
    from tasks.clip.lease import LeaseLost, RunBusy, RunLease

    monkeypatch.setattr(tasks.clip.lease, "SETTLE_SECONDS", 0.0)
    store = Store(str(tmp_path / "store"))
    store.check()
    key = "models/clip/r/lease.json"
    with RunLease(store, "models/clip/r", tmp_path / "runs" / "r") as lease:
        lease.renew()  # still ours: renewed
        assert lease.held() and store.read_json(key)["owner"] == lease.record["owner"]
        rival = {"owner": "rival", "host": "elsewhere", "pid": 7, "renewed_at": "now", "renewed": time.time()}
        store.write_json(key, rival)
        with pytest.raises(LeaseLost, match="LEASE LOST: another trainer \\(pid 7 on elsewhere"):
            lease.renew()
        assert not lease.held() and store.read_json(key)["owner"] == "rival"  # not taken back
        with pytest.raises(LeaseLost):
            lease.renew()  # found out once: never writes again
        with pytest.raises(RunBusy, match="stage stays pending"):
            lease.ensure_held()
    assert store.read_json(key)["owner"] == "rival"  # not given back either: it is not ours
    assert "LEASE LOST" in caplog.text


def test_a_stage_whose_run_was_taken_over_while_it_trained_ends_pending(
    four_slide_store, tmp_path, monkeypatch, caplog
):
    """The trainer finishes, but another took the run over meanwhile: its checkpoints are not copied into the
    store and the unit is pending, saying why, never "ok"."""
    import logging

    import torch

    import tasks.clip.lease
    import tasks.clip.stages
    from tasks.clip.work import train_units

    monkeypatch.setattr(tasks.clip.lease, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(tasks.clip.lease, "RENEW_SECONDS", 0.05)
    store = tmp_path / "store"
    lease_key = "models/clip/taken/lease.json"

    def trainer_outlived_by_an_outage(plan, logger):
        (plan.stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 1, "state_dict": {}}, plan.stage_dir / "checkpoints" / "epoch_1.pt")
        Store(str(store)).write_json(lease_key, {"owner": "rival", "host": "elsewhere", "pid": 7})
        _wait_for(lambda: "LEASE LOST" in caplog.text, 10, "the renewer noticing the takeover")

    monkeypatch.setattr(tasks.clip.stages, "run_trainer", trainer_outlived_by_an_outage)
    settings, units = _training(store, four_slide_store, tmp_path)
    (outcome,) = train_units(units, settings, "taken", "tiny-random", None, logging.getLogger("test"))
    assert outcome.status == "pending" and "LEASE LOST" in outcome.error, outcome
    assert not (store / "models" / "clip" / "taken" / "stage1" / "checkpoints").exists()  # nothing copied
    assert Store(str(store)).read_json(lease_key)["owner"] == "rival"


def test_the_renewer_thread_notices_a_takeover_and_stops(tmp_path, monkeypatch):
    import tasks.clip.lease
    from tasks.clip.lease import RunLease

    monkeypatch.setattr(tasks.clip.lease, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(tasks.clip.lease, "RENEW_SECONDS", 0.05)
    store = Store(str(tmp_path / "store"))
    store.check()
    with RunLease(store, "models/clip/r", tmp_path / "runs" / "r") as lease:
        store.write_json("models/clip/r/lease.json", {"owner": "rival", "host": "elsewhere", "pid": 7})
        _wait_for(lambda: not lease.held(), 5, "lease loss noticed")
        lease._renewer.join(timeout=5)
        assert not lease._renewer.is_alive()
        assert store.read_json("models/clip/r/lease.json")["owner"] == "rival"


def test_a_finished_stages_metrics_in_the_store_may_have_an_integer_loss(tmp_path):
    """JSON writes a loss of 2.0 as 2 in some writers; it parses as an int and is a loss all the same."""
    from types import SimpleNamespace

    from tasks.clip.scalars import MetricsUnreadable
    from tasks.clip.stages import _finished_rows

    store = Store(str(tmp_path / "store"))
    store.check()
    prefix = "models/clip/r/stage1"
    plan = SimpleNamespace(stage_dir=tmp_path / "stage1", steps_per_epoch=1, name="stage1", store_prefix=lambda: prefix)
    plan.stage_dir.mkdir()  # no trainer records here: the store's metrics.jsonl is read
    rows = [{"step": 1, "epoch": 0, "loss": 3, "samples_per_s": 1.0}, {"step": 2, "epoch": 0, "loss": 2.5}]
    store.write_bytes(f"{prefix}/metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    assert _finished_rows(plan, store) == rows
    store.write_bytes(f"{prefix}/metrics.jsonl", json.dumps({"step": 1, "loss": True}).encode())
    with pytest.raises(MetricsUnreadable, match="is missing"):  # a bool is no loss
        _finished_rows(plan, store)


# -- leftovers: partial downloads, a bounded checkpoint cache, bounded digest memories ---------------------------


def _interrupted_get(fs_class, monkeypatch):
    """fs.get and fs.get_file (fsspec's caches fetch through it) that write half the file, then lose the connection
    (as a dropped download does)."""

    def get(self, remote, local, **kwargs):
        Path(local).write_bytes(b"half a checkpoint")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(fs_class, "get", get)
    monkeypatch.setattr(fs_class, "get_file", get)


def test_an_interrupted_checkpoint_fetch_leaves_no_partial_file(tmp_path, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from tasks.clip.spec import local_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with fsspec.open("memory://runs/a/epoch_1.pt", "wb") as handle:
        handle.write(b"x" * 1000)
    _interrupted_get(MemoryFileSystem, monkeypatch)
    with pytest.raises(ConnectionResetError):
        local_checkpoint("memory://runs/a/epoch_1.pt")
    cache = tmp_path / "home" / ".cache" / "pathgen" / "checkpoints"
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []


def test_the_mirror_leaves_no_partial_checkpoint_and_clears_a_killed_fetchs(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from tasks.clip.spec import ModelSpec
    from tasks.clip.train import CheckpointMirror, StagePlan

    plan = StagePlan(run="r", name="stage1", folder=tmp_path / "runs" / "r", spec=ModelSpec("tiny-random"), tars=[],
                     samples=4, epochs=3, batch_size=2, workers=0, lr=1e-3, weight_decay=0.1, warmup=0,
                     precision="fp32", grad_checkpointing=False, devices=1, seed=0)  # fmt: skip
    store = Store(str(tmp_path / "store"))
    store.check()
    store.write_bytes("models/clip/r/stage1/checkpoints/epoch_2.pt", b"x" * 100)
    local = plan.stage_dir / "checkpoints"
    local.mkdir(parents=True)
    (local / ".epoch_1.pt.part").write_bytes(b"left by a fetch killed before this version")
    _interrupted_get(LocalFileSystem, monkeypatch)
    with pytest.raises(ConnectionResetError):
        CheckpointMirror(plan, store).fetch_newest()
    assert sorted(p.name for p in local.iterdir()) == []


def test_the_checkpoint_cache_keeps_the_most_recently_used_within_its_bound(tmp_path, monkeypatch):
    import fsspec

    from tasks.clip.spec import local_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATHGEN_CHECKPOINT_CACHE_GB", str(2500 / 2**30))  # room for two of 1000 bytes
    fetched = []
    for run in ("a", "b", "c"):
        with fsspec.open(f"memory://cache-runs/{run}/epoch_1.pt", "wb") as handle:
            handle.write(run.encode() * 1000)
        fetched.append(Path(local_checkpoint(f"memory://cache-runs/{run}/epoch_1.pt")))
        time.sleep(0.02)  # distinct use times
    assert [path.exists() for path in fetched] == [False, True, True]
    assert fetched[-1].read_bytes() == b"c" * 1000


def test_a_fetched_checkpoint_is_reused_until_it_is_written_again(tmp_path, monkeypatch):
    """fsspec's whole-file cache serves the copy it has; a checkpoint written again is another version, fetched
    again into its own folder; no staging folder is left beside a copy."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from tasks.clip.spec import local_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = "memory://reused-runs/a/epoch_1.pt"
    fsspec.filesystem("memory").pipe(url, b"first" * 100)
    first = Path(local_checkpoint(url))
    assert first.name == "epoch_1.pt" and first.read_bytes() == b"first" * 100
    fetched = []
    get_file = MemoryFileSystem.get_file
    monkeypatch.setattr(MemoryFileSystem, "get_file", lambda fs, *a, **kw: fetched.append(a) or get_file(fs, *a, **kw))
    assert Path(local_checkpoint(url)) == first and not fetched  # from the cache
    fsspec.filesystem("memory").pipe(url, b"second" * 100)
    second = Path(local_checkpoint(url))
    assert second != first and second.read_bytes() == b"second" * 100 and len(fetched) == 1
    assert [p.name for p in second.parent.iterdir()] == ["epoch_1.pt"]


@pytest.mark.s3
def test_a_checkpoint_on_s3_is_fetched_once_per_version(bucket, tmp_path, monkeypatch):
    """On S3 a checkpoint's version is its ETag: the same bytes rewritten keep their copy, other bytes of the same
    size are fetched again."""
    import fsspec

    from tasks.clip.spec import local_checkpoint
    from tasks.store.objects import storage_options

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = f"{bucket}/runs/a/stage1/checkpoints/epoch_1.pt"
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    fs.pipe_file(path, b"a" * 1000)
    first = Path(local_checkpoint(url))
    assert first.read_bytes() == b"a" * 1000 and Path(local_checkpoint(url)) == first
    fs.pipe_file(path, b"a" * 1000)
    assert Path(local_checkpoint(url)) == first
    fs.pipe_file(path, b"b" * 1000)
    second = Path(local_checkpoint(url))
    assert second != first and second.read_bytes() == b"b" * 1000


def test_the_digest_memories_are_bounded(tmp_path, monkeypatch):
    from pathgen import digest

    monkeypatch.setenv("PATHGEN_DIGEST_CACHE", str(tmp_path / "digests.json"))
    monkeypatch.setattr(digest, "MEMORY_ENTRIES", 3, raising=False)
    monkeypatch.setattr(digest, "DISK_ENTRIES", 5, raising=False)
    monkeypatch.setattr(digest, "_memory", type(digest._memory)())
    files = []
    for number in range(12):
        files.append(tmp_path / f"f{number}")
        files[-1].write_text(str(number))
        digest.file_digest(files[-1])
    assert len(digest._memory) <= 3
    assert len(json.loads((tmp_path / "digests.json").read_text())) <= 5
    import hashlib

    assert digest.file_digest(files[0]) == hashlib.sha256(b"0").hexdigest()  # forgotten, hashed again: the same


# -- the export exits cleanly -------------------------------------------------------------------------------------

EXPORT_AND_COUNT_THREADS = """
import os, sys
from pathgen.cli import main
import tasks.clip.webdataset, tasks.captions.export
before = set(os.listdir("/proc/self/task"))
status = main(["export", "webdataset", "--store", sys.argv[1], "--out", sys.argv[2]])
print("native threads started by the export and alive at exit:", len(set(os.listdir("/proc/self/task")) - before))
sys.exit(status)
"""


def test_export_webdataset_leaves_no_native_thread_alive_at_exit(four_slide_store, tmp_path):
    """Exit 134, "terminate called without an active exception", once in 17 runs: Arrow's CPU pool threads, started
    by a threaded read through a Python file object, alive at interpreter exit. The export starts none now; each of
    these runs (a fresh interpreter, tars written anew) checks that, and that the command exits 0."""
    runs = 12
    started = time.monotonic()
    for run in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_AND_COUNT_THREADS, str(four_slide_store), str(tmp_path / f"out{run}")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "terminate called" not in output, f"run {run}: {done.returncode}\n{output}"
        assert "alive at exit: 0" in output, output
        assert len(list((tmp_path / f"out{run}").glob("*.tar"))) == 4
    print(f"\n{runs} exports, all clean, in {time.monotonic() - started:.1f} s")


def test_a_run_resumes_only_from_a_complete_checkpoint(tmp_path):
    """A checkpoint cut short, or one whose contents do not read back (a zip directory alone proves nothing about
    the data before it), is set aside: the trainer's --resume latest then finds the newest good one."""
    import logging

    import torch

    from tasks.clip.train import checkpoints, set_aside_incomplete

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2, 3):
        torch.save({"epoch": epoch, "state_dict": {"w": torch.zeros(64)}}, folder / f"epoch_{epoch}.pt")
    damaged = (folder / "epoch_2.pt").read_bytes().replace(b"state_dict", b"state_dicT")  # inside data.pkl
    (folder / "epoch_2.pt").write_bytes(damaged)
    whole = (folder / "epoch_3.pt").read_bytes()
    (folder / "epoch_3.pt").write_bytes(whole[: len(whole) // 2])  # still being written
    set_aside_incomplete(folder, logging.getLogger("test"))
    assert [path.name for path in checkpoints(folder)] == ["epoch_1.pt"]
    assert sorted(p.name for p in folder.glob("*.incomplete")) == ["epoch_2.pt.incomplete", "epoch_3.pt.incomplete"]
