"""Exactly-once under overlap and SIGKILL, through the real ``pathgen`` command.

Two runs started together on one store, and runs killed (SIGKILL, no cleanup of any kind) at random moments and
then run again, must end with the store an uninterrupted run would have written: every slide's patch shard and
pair shard once, every selected patch captioned or recorded as failed exactly once, every object whole and
readable, and no temporary object or staged file left behind.

Every run is a ``python -m pathgen`` subprocess against the session's Prefect API. The slides are honest small
slides: 1024 px crops of CMU-1-Small-Region's pixels written as tiled JPEG TIFFs at 0.5 µm/px.

The default trials are few and small (3 per stage: the first kill before any write, the others amid the writes);
``-m slow`` runs 20 kill trials per stage (PATHGEN_KILL_TRIALS overrides the count of either, PATHGEN_KILL_SEED the
seed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tasks.store.objects import STAGING_ENV_VAR, is_temporary

from .conftest import CMU, write_tiff_slide

pytestmark = pytest.mark.prefect

# Four 1024 px regions of CMU-1-Small-Region that hold tissue (top-left corners, y then x).
CROPS = {"crop0": (1943, 1196), "crop1": (1943, 500), "crop2": (1200, 1000), "crop3": (900, 400)}
TRIAL_SLIDES = ("crop0", "crop1")  # the kill trials use two slides

EXTRACT_SETTINGS = {
    "patch.patch_px": 224,
    "selection.method": "random",  # no embeddings: fast, and the picks are still seeded, hence reproducible
    "selection.max_per_slide": 8,
    "extract.group_size": 1,
    "extract.concurrency": 2,
    "retries.task_retries": 0,
}
CAPTION_SETTINGS = {
    "agents.slides_per_task": 1,
    "agents.describe.max_new_tokens": 12,
    "agents.revise.max_new_tokens": 12,
    "agents.summarize.max_new_tokens": 12,
    # A short word limit makes some descriptions over-long, so both the pair shards and the failed tables hold rows.
    "agents.describe.max_words": 6,
    "retries.task_retries": 0,
}
RUN_TIMEOUT_S = 600


def _sets(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


# -- running pathgen -----------------------------------------------------------------------------------------------


@dataclass
class Env:
    """What every pathgen subprocess of this module shares: the Prefect API, a staging folder, the models."""

    environ: dict[str, str]
    staging: Path
    cwd: Path
    logs: Path
    model_cache: Path

    def extract_args(self, sources: Path, store: Path, *extra: str) -> list[str]:
        return ["extract", str(sources), "--store", str(store), *_sets(EXTRACT_SETTINGS), *extra]

    def caption_args(self, store: Path, **overrides) -> list[str]:
        settings = {**CAPTION_SETTINGS, "agents.model_cache": self.model_cache, **overrides}
        return ["caption", "--store", str(store), *_sets(settings)]

    def with_staging(self, staging: Path) -> Env:
        """The same, with a staging folder of its own (for runs alongside others whose staging is checked)."""
        staging.mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(self, environ={**self.environ, STAGING_ENV_VAR: str(staging)}, staging=staging)


def side_by_side(*calls):
    """Run the calls in threads at once (each drives its own pathgen subprocesses); their results, in order. The
    first failure is raised once all have ended."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        concurrent.futures.wait(futures)
    return [future.result() for future in futures]


@dataclass
class Run:
    process: subprocess.Popen
    log: Path
    started: float

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> tuple[int, float]:
        """Wait for the run; its exit status and wall seconds. A run that hangs is killed with its group."""
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
            raise AssertionError(f"pathgen did not finish within {timeout} s:\n{self.tail()}") from None
        return rc, time.monotonic() - self.started


_counter = iter(range(10**6))
_started: list[Run] = []


@pytest.fixture(autouse=True)
def _no_strays() -> Iterator[None]:
    """A test that fails while runs are going leaves none behind: they are killed with their process groups."""
    yield
    while _started:
        run = _started.pop()
        if run.process.poll() is None:
            _kill_group(run.process)


def start(env: Env, args: list[str], name: str) -> Run:
    """One ``python -m pathgen`` in a session (process group) of its own; output to a log file."""
    log = env.logs / f"{next(_counter):03d}-{name}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "pathgen", *args],
            cwd=env.cwd,
            env=env.environ,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started.append(Run(process, log, time.monotonic()))
    return _started[-1]


def run_ok(env: Env, args: list[str], name: str) -> tuple[Run, float]:
    run = start(env, args, name)
    rc, seconds = run.finish()
    assert rc == 0, f"pathgen {' '.join(args[:1])} exited {rc}:\n{run.tail()}"
    return run, seconds


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


# -- reading the store ---------------------------------------------------------------------------------------------


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def leftovers(root: Path) -> list[str]:
    """Temporary objects: the store's own format, anything hidden, anything that looks like a temp file."""
    return [
        str(p.relative_to(root))
        for p in all_files(root)
        if is_temporary(str(p)) or p.name.startswith(".") or ".tmp" in p.name or p.name.endswith("~")
    ]


def staged_leftovers(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def assert_every_object_reads(root: Path) -> None:
    from PIL import Image

    for path in all_files(root):
        if path.suffix == ".parquet":
            table = pq.ParquetFile(path).read()
            assert table.num_rows >= 0, path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()


def column(path: Path, name: str = "patch_id") -> list[str]:
    return pq.read_table(path, columns=[name]).column(name).to_pylist()


def patch_ids(root: Path) -> dict[str, list[str]]:
    """{slide_id: patch ids of its shard}."""
    return {p.stem: column(p) for p in sorted((root / "patches").glob("*.parquet"))}


def assert_extracted(root: Path, slides: set[str]) -> dict[str, list[str]]:
    """Every slide: exactly one patch shard (no duplicate rows) and an ok slide.json naming it."""
    shards = patch_ids(root)
    assert set(shards) == slides, sorted(p.name for p in (root / "patches").iterdir())
    for slide_id, ids in shards.items():
        assert len(ids) == len(set(ids)) > 0, f"{slide_id}: duplicate or no patch rows"
        record = json.loads((root / "slides" / slide_id / "slide.json").read_text())
        assert record["status"] == "ok", record
        assert record["shard"] == f"patches/{slide_id}.parquet" and record["counts"]["kept"] == len(ids)
    return shards


def agents_hash_of(root: Path) -> str:
    (folder,) = list((root / "pairs").iterdir())
    return folder.name


def shard_meta(path: Path) -> dict[str, str]:
    raw = pq.ParquetFile(path).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


@dataclass
class Captions:
    agents_hash: str
    pairs: dict[str, list[str]]  # slide_id -> patch ids in its pair shard
    failed: dict[str, list[str]]  # slide_id -> patch ids in its failed table

    def pair_ids(self) -> set[str]:
        return {i for ids in self.pairs.values() for i in ids}

    def failed_ids(self) -> set[str]:
        return {i for ids in self.failed.values() for i in ids}


def assert_captioned_once(root: Path) -> Captions:
    """Every patch of every patch shard appears exactly once over the pair shards and failed tables of the one
    agents_hash; one pair shard and one failed table per slide, from the same commit."""
    shards = patch_ids(root)
    agents_hash = agents_hash_of(root)
    pairs_dir, failed_dir = root / "pairs" / agents_hash, root / "failed" / agents_hash
    pairs = {p.stem: column(p) for p in sorted(pairs_dir.glob("*.parquet"))}
    failed = {p.stem: column(p) for p in sorted(failed_dir.glob("*.parquet"))} if failed_dir.exists() else {}
    assert set(pairs) == set(shards), f"pair shards {sorted(pairs)} for slides {sorted(shards)}"
    assert set(failed) <= set(shards)
    seen = collections.Counter(i for table in (pairs, failed) for ids in table.values() for i in ids)
    twice = {i: n for i, n in seen.items() if n > 1}
    assert not twice, f"patches captioned or failed more than once: {twice}"
    expected = {i for ids in shards.values() for i in ids}
    missing, unknown = sorted(expected - set(seen)), sorted(set(seen) - expected)
    assert not missing and not unknown, f"missing {missing[:5]}, unknown {unknown[:5]}"
    for slide_id in shards:
        assert set(pairs[slide_id]) | set(failed.get(slide_id, [])) == set(shards[slide_id]), slide_id
        pair_commit = shard_meta(pairs_dir / f"{slide_id}.parquet").get("pathgen.commit_id")
        if slide_id in failed:
            failed_commit = shard_meta(failed_dir / f"{slide_id}.parquet").get("pathgen.commit_id")
            assert pair_commit == failed_commit, f"{slide_id}: pair shard and failed table from different commits"
    assert ds.dataset(str(pairs_dir), format="parquet").count_rows() == sum(map(len, pairs.values()))
    return Captions(agents_hash, pairs, failed)


def duckdb_pair_rows(root: Path) -> int | None:
    """Rows DuckDB reads from ``pairs/*/*.parquet``, or None when duckdb is not installed."""
    try:
        import duckdb
    except ImportError:
        return None
    with duckdb.connect() as con:
        return con.execute(f"select count(*) from read_parquet('{root}/pairs/*/*.parquet')").fetchone()[0]


def assert_clean(root: Path, env: Env) -> None:
    assert leftovers(root) == [], "temporary objects left in the store"
    assert staged_leftovers(env.staging) == [], "staged files left in the staging folder"


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(prefect_api, tiny_models, tmp_path_factory) -> Env:
    cache, _ = tiny_models
    base = tmp_path_factory.mktemp("exactly-once")
    staging, cwd, logs = base / "staging", base / "cwd", base / "logs"
    for folder in (staging, cwd, logs):
        folder.mkdir()
    environ = dict(
        os.environ,
        PREFECT_API_URL=prefect_api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **{STAGING_ENV_VAR: str(staging)},
    )
    return Env(environ, staging, cwd, logs, Path(cache))


@pytest.fixture(scope="module")
def sources(cmu_rgb, tmp_path_factory) -> dict[str, Path]:
    """Two source folders: the four crops, and the two the kill trials use (the same files)."""
    base = tmp_path_factory.mktemp("sources")
    four, two = base / "four", base / "two"
    four.mkdir()
    two.mkdir()
    for name, (y, x) in CROPS.items():
        path = write_tiff_slide(four / f"{name}.svs", np.ascontiguousarray(cmu_rgb[y : y + 1024, x : x + 1024]), 0.5)
        if name in TRIAL_SLIDES:
            shutil.copyfile(path, two / path.name)
    return {"four": four, "two": two}


@dataclass
class Reference:
    store: Path
    seconds: float  # start to exit
    first_write_s: float  # start to the first file the run wrote into the store (a temporary one, usually)
    changes: int  # how many times the files it had written were seen to change (appear, be renamed, vanish)


def written(store: Path, stage: str) -> frozenset[str]:
    """The files a run of ``stage`` has written into the store so far (temporary ones included)."""
    folders = [store] if stage == "extract" else [store / "failed", store / "pairs"]
    return frozenset(str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


def watch(run: Run, store: Path, stage: str, stop_at: int | None = None) -> tuple[int, float | None]:
    """Poll what the run has written until it exits or, with ``stop_at``, until that many changes were seen; the
    changes seen and when (after the start) it first wrote."""
    seen, changes, first = frozenset(), 0, None
    while run.process.poll() is None and (stop_at is None or changes < stop_at):
        now = written(store, stage)
        if now != seen:
            seen, changes = now, changes + 1
            first = first or time.monotonic() - run.started
        time.sleep(0.003)
    return changes, first


def copy_slides(source: Path, store: Path, slides) -> Path:
    """A store holding these slides' patch shards and slide records, as an extract of just them writes."""
    (store / "patches").mkdir(parents=True)
    for slide in slides:
        shutil.copy2(source / "patches" / f"{slide}.parquet", store / "patches")
        shutil.copytree(source / "slides" / slide, store / "slides" / slide)
    return store


def timed_reference(env: Env, args: list[str], store: Path, name: str, stage: str) -> Reference:
    """An uninterrupted run, timed, noting when it first wrote into the store and how often its files changed."""
    run = start(env, args, name)
    changes, first = watch(run, store, stage)
    rc, seconds = run.finish()
    assert rc == 0, run.tail()
    return Reference(store, seconds, seconds if first is None else first, max(1, changes))


@pytest.fixture(scope="module")
def reference_four(env, sources, tmp_path_factory) -> Reference:
    """One uninterrupted extract of the four slides."""
    store = tmp_path_factory.mktemp("ref-four") / "store"
    ref = timed_reference(env, env.extract_args(sources["four"], store), store, "ref-extract-four", "extract")
    assert_extracted(store, set(CROPS))
    assert_clean(store, env)
    return ref


@pytest.fixture(scope="module")
def trial_references(env, sources, reference_four, tmp_path_factory) -> dict[str, tuple[Reference, Captions | None]]:
    """The kill trials' uninterrupted references over the two trial slides, run side by side as the trials are:
    an extract (from scratch), and a caption run (on a store holding just their patches)."""
    base = tmp_path_factory.mktemp("trial-references")
    extract_store = base / "extract"
    caption_store = copy_slides(reference_four.store, base / "caption", TRIAL_SLIDES)
    extract_ref, caption_ref = side_by_side(
        lambda: timed_reference(
            env.with_staging(base / "staging-extract"),
            env.extract_args(sources["two"], extract_store),
            extract_store,
            "ref-extract-two",
            "extract",
        ),
        lambda: timed_reference(
            env.with_staging(base / "staging-caption"),
            env.caption_args(caption_store),
            caption_store,
            "ref-caption-two",
            "caption",
        ),
    )
    shards = assert_extracted(extract_store, set(TRIAL_SLIDES))
    # The same slides give the same patches whatever else a run extracts.
    assert shards == {k: v for k, v in patch_ids(reference_four.store).items() if k in TRIAL_SLIDES}
    captions = assert_captioned_once(caption_store)
    for store in (extract_store, caption_store):
        assert leftovers(store) == []
    return {"extract": (extract_ref, None), "caption": (caption_ref, captions)}


# -- two runs at once ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_two_extract_runs_at_once_write_each_slide_once(env, sources, reference_four, tmp_path):
    store = tmp_path / "store"
    runs = [start(env, env.extract_args(sources["four"], store), f"extract-together-{i}") for i in range(2)]
    for run in runs:
        rc, _ = run.finish()
        assert rc == 0, run.tail()
    shards = assert_extracted(store, set(CROPS))
    assert shards == patch_ids(reference_four.store)
    assert_every_object_reads(store)
    assert_clean(store, env)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("slides_per_task", [(1, 1), (1, 3)], ids=["same-groups", "different-groups"])
def test_two_caption_runs_at_once_caption_each_patch_once(env, reference_four, tmp_path, slides_per_task):
    store = tmp_path / "store"
    shutil.copytree(reference_four.store, store)
    runs = [
        start(env, env.caption_args(store, **{"agents.slides_per_task": n}), f"caption-together-{n}-{i}")
        for i, n in enumerate(slides_per_task)
    ]
    for run in runs:
        rc, _ = run.finish()
        assert rc == 0, run.tail()
    captions = assert_captioned_once(store)
    assert set(captions.pairs) == set(CROPS)
    assert_every_object_reads(store)
    assert_clean(store, env)
    rows = duckdb_pair_rows(store)
    assert rows is None or rows == len(captions.pair_ids())


# -- SIGKILL at random moments -------------------------------------------------------------------------------------


def trial_count(default: int) -> int:
    return int(os.environ.get("PATHGEN_KILL_TRIALS", default))


@dataclass
class Trial:
    plan: str  # when the kill was meant to land
    killed_at_s: float  # after the start
    finished_before_kill: bool
    committed_at_kill: int  # the stage's shards committed when the kill landed
    temporaries_at_kill: int  # temporary objects in the store just after the kill


def kill_at_random(
    run: Run, stage: str, store: Path, ref: Reference, rng: random.Random, early: bool = False
) -> tuple[str, bool]:
    """SIGKILL the run's process group at a random moment; returns the plan and whether the run had ended first.

    With ``early`` (and for a fifth of the other kills) the kill lands before the run writes anything (start-up,
    reading, captioning), uniformly over the reference's time to its first write. The rest land amid the writes,
    where timing alone would rarely hit on a machine whose speed varies: right at, or a moment after, the k-th
    change of the run's files (a temporary object appearing, a rename, ...), k uniform over the changes seen in the
    reference run.
    """
    if early or rng.random() < 0.2:
        delay = rng.uniform(0, ref.first_write_s)
        plan = f"{delay:.2f} s after the start"
        deadline = run.started + delay
    else:
        k, pause = rng.randint(1, ref.changes), rng.choice([0.0, rng.uniform(0, 0.3)])
        plan = f"{pause:.2f} s after change {k} of {ref.changes}"
        watch(run, store, stage, stop_at=k)
        deadline = time.monotonic() + pause
    try:
        run.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        finished = True
    except subprocess.TimeoutExpired:
        finished = False
    _kill_group(run.process)
    return plan, finished


def kill_trials(stage: str, trials: int, env: Env, sources, reference: Reference, captions: Captions | None, base):
    """``trials`` times: start a run, SIGKILL its whole process group at a random moment, run again to completion,
    and check the store against the uninterrupted reference's.

    ``reference`` is the timed uninterrupted run over the two trial slides, extract or caption.
    """
    rng = random.Random(f"{stage}-{os.environ.get('PATHGEN_KILL_SEED', '0')}")
    expected = {slide: ids for slide, ids in patch_ids(reference.store).items() if slide in TRIAL_SLIDES}
    results: list[Trial] = []
    for trial in range(trials):
        store = base / f"{stage}-{trial}"
        if stage == "extract":
            args = env.extract_args(sources["two"], store)  # process-pool workers, as in production
            again = [*args, "--threads"]  # recovery does not depend on them, and threads start faster
            shards = store / "patches"
        else:
            copy_slides(reference.store, store, TRIAL_SLIDES)
            args = again = env.caption_args(store)
            shards = store / "pairs" / captions.agents_hash
        run = start(env, args, f"{stage}-kill-{trial}")
        # The first kill of each stage lands before any write, so that even the default few trials cover both
        # kinds of moment.
        plan, finished = kill_at_random(run, stage, store, reference, rng, early=trial == 0)
        killed_at = round(time.monotonic() - run.started, 2)
        committed = len(list(shards.glob("*.parquet"))) if shards.exists() else 0
        results.append(Trial(plan, killed_at, finished, committed, len(leftovers(store)) if store.exists() else 0))

        run_ok(env, again, f"{stage}-again-{trial}")
        context = f"trial {trial}: {results[-1]}"
        assert_every_object_reads(store)
        assert leftovers(store) == [], context
        assert staged_leftovers(env.staging) == [], context
        assert_extracted(store, set(TRIAL_SLIDES))
        assert patch_ids(store) == expected, context
        if stage == "caption":
            got = assert_captioned_once(store)
            assert got.agents_hash == captions.agents_hash, context
            assert got.pair_ids() == captions.pair_ids(), context
            assert got.failed_ids() == captions.failed_ids(), context
            rows = duckdb_pair_rows(store)
            assert rows is None or rows == len(captions.pair_ids()), context
        shutil.rmtree(store)
    print(f"\n{stage}: reference {reference.seconds:.1f} s, first write at {reference.first_write_s:.1f} s; trials:")
    for trial in results:
        print(f"  {trial}")
    # Guard the test itself: had every run ended before its kill, it would have checked nothing about kills.
    assert not all(t.finished_before_kill for t in results), "every run ended before its kill: check the timing"
    return results


def trials_side_by_side(trials: int, env: Env, sources, references, base: Path) -> None:
    """The extract trials and the caption trials at once, each with its own staging folder (two cores: while one
    run starts up, the other works)."""
    side_by_side(
        *[
            functools.partial(
                kill_trials,
                stage,
                trials,
                env.with_staging(base / f"staging-{stage}"),
                sources,
                *references[stage],
                base / stage,
            )
            for stage in ("extract", "caption")
        ]
    )


@pytest.mark.timeout(3600)
def test_runs_killed_at_random_moments_then_run_again(env, sources, trial_references, tmp_path):
    trials_side_by_side(trial_count(3), env, sources, trial_references, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_many_runs_killed_at_random_moments(env, sources, trial_references, tmp_path, monkeypatch):
    monkeypatch.setenv("PATHGEN_KILL_SEED", os.environ.get("PATHGEN_KILL_SEED", "slow"))
    trials_side_by_side(trial_count(20), env, sources, trial_references, tmp_path)


@pytest.mark.timeout(1200)
def test_duckdb_and_pyarrow_read_pairs_beside_a_killed_writers_temporary(trial_references, tmp_path):
    """Readers of pairs/ see committed shards only, even with a dead writer's temporary object beside them."""
    duckdb = pytest.importorskip("duckdb")
    ref, captions = trial_references["caption"]
    store = tmp_path / "store"
    shutil.copytree(ref.store, store)
    folder = store / "pairs" / captions.agents_hash
    shard = next(folder.glob("*.parquet"))
    (folder / f".{shard.name}.somehost~1~0123456789ab.tmp").write_bytes(shard.read_bytes()[:100])
    expected = len(captions.pair_ids())
    assert ds.dataset(str(folder), format="parquet").count_rows() == expected
    with duckdb.connect() as con:
        query = f"select count(distinct patch_id), count(*) from read_parquet('{store}/pairs/*/*.parquet')"
        assert con.execute(query).fetchone() == (expected, expected)


# -- the main process killed alone ---------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ..., starttime at index 19), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live process below ``root`` (from the ppid in /proc/*/stat)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children[int(fields[1])].append(int(entry.name))
            starts[int(entry.name)] = fields[19]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, started: str) -> bool:
    """Whether that very process (not a later one with its id) still runs; a zombie counts as gone."""
    fields = _stat(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


@contextlib.contextmanager
def reaped(recorded: dict[int, str]) -> Iterator[None]:
    """Whatever the outcome, kill the recorded processes that still run, so no test leaves strays behind."""
    try:
        yield
    finally:
        for pid, started in recorded.items():
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_workers_die_with_a_killed_main_process(env, sources, tmp_path):
    """SIGKILL of the main ``pathgen extract`` process alone: its process-pool workers (and anything else it
    started) must be gone within seconds, not run on unsupervised."""
    folder = tmp_path / "slides"
    shutil.copytree(sources["four"], folder)
    shutil.copyfile(CMU, folder / CMU.name)  # a bigger slide keeps a worker busy
    store = tmp_path / "store"
    args = env.extract_args(folder, store, "--set", "selection.max_per_slide=48")
    run = start(env, args, "extract-main-killed")
    recorded: dict[int, str] = {}
    with reaped(recorded):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # Wait until the workers run slides (the first shard is committed), noting every descendant meanwhile.
        while not list(store.glob("patches/*.parquet")):
            assert run.process.poll() is None, f"the run ended before any slide was done:\n{run.tail()}"
            assert time.monotonic() < deadline, "no slide done in time"
            recorded.update(descendants(run.pid))
            time.sleep(0.05)
        recorded.update(descendants(run.pid))
        assert run.process.poll() is None, "the run ended before the kill: give it more work"
        assert len(recorded) >= 2, f"expected process-pool workers below pid {run.pid}, found {recorded}"
        os.kill(run.pid, signal.SIGKILL)
        run.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p, s) for p, s in recorded.items()):
            time.sleep(0.2)
        survivors = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p, s in recorded.items() if alive(p, s)}
        assert not survivors, f"processes of the killed run still alive 15 s later: {survivors}"


def test_a_failed_table_replaced_by_an_overlapping_run_is_rebuilt_from_the_pair_shard(tmp_path):
    """The interleaving no timing trial hits reliably: run B replaces the failed table after run A's pair shard
    won. The pair shard carries its failed rows, so the table is rebuilt to match whatever pair shard stands."""
    import pyarrow as pa

    from tasks.captions.caption import SlideWork, _metadata, commit_slide, sync_failed_table
    from tasks.captions.records import FAILED_SCHEMA, failed_key, pair_key
    from tasks.slides.shard import shard_metadata
    from tasks.store.objects import Store

    store = Store(str(tmp_path / "store"))
    work = SlideWork("slide-a", "e" * 12, [])
    row = {"patch_id": "p1", "slide_id": "slide-a", "x": 0, "y": 0, "stage": "describe", "reason": "empty"}
    row |= {"detail": "", "agents_hash": "h" * 12, "created_at": "2026-11-29T00:00:00+00:00"}
    assert commit_slide(store, work, [], [row], "h" * 12, {}) == "ok"
    committed = _metadata(store, pair_key("h" * 12, "slide-a"))["pathgen.commit_id"]
    other = pa.Table.from_pylist([], FAILED_SCHEMA.with_metadata(shard_metadata("failed", {"pathgen.commit_id": "b"})))
    with store.staged_file(failed_key("h" * 12, "slide-a")) as local:  # run B's failed table lands late
        pq.write_table(other, local)
    assert sync_failed_table(store, "h" * 12, "slide-a") is True
    rebuilt = pq.read_table(store.path(failed_key("h" * 12, "slide-a")))
    assert rebuilt.to_pylist() == [row]
    assert _metadata(store, failed_key("h" * 12, "slide-a"))["pathgen.commit_id"] == committed
    assert sync_failed_table(store, "h" * 12, "slide-a") is False  # consistent now: nothing to do
