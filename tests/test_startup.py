"""Start-up of a command: commands share one local Prefect API server, which stops by itself when idle, and Prefect
prints no telemetry notice. Each check runs in a subprocess (process-wide state: environment, a server child)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pathgen import local_api
from pathgen.processes import _server_environment

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
WARM_TARGET_S = 0.5  # a command's wait for the Prefect API when a shared server runs; the old code: 6-9 s
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "JENKINS_URL", "TRAVIS", "TF_BUILD")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "DO_NOT_TRACK", *CI_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


ENTER = """
import json, sys, time
import prefect  # a command has imported its flows, and with them Prefect, before it needs the API
from pathgen import local_api

entered = time.monotonic()
with local_api.api_server(timeout=240) as url:
    blocked_s = time.monotonic() - entered
    record = local_api.read_record(local_api.state_directory())
    print(json.dumps({"url": url, "blocked_s": blocked_s, "pid": record["pid"], "pid_start": record["pid_start"],
                      "directory": str(local_api.state_directory())}), flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for this module's shared servers: its database is created (migrated) once."""
    return tmp_path_factory.mktemp("prefect-home")


def _enter(home: Path, idle: float, hold_s: float = 0.0) -> subprocess.Popen:
    """A process that takes a lease on the shared server, reports it as JSON, holds it ``hold_s`` seconds."""
    env = _env(PREFECT_HOME=str(home), PATHGEN_LOCAL_API_IDLE_S=str(idle), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-c", textwrap.dedent(ENTER), str(hold_s)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"exited with {process.wait()}: {process.stderr.read()[-3000:]}")
    return json.loads(line)


def _alive(report: dict) -> bool:
    return local_api.process_alive(report["pid"], report["pid_start"])


def _wait_stopped(report: dict, seconds: float) -> float:
    started = time.monotonic()
    while _alive(report) and time.monotonic() - started < seconds:
        time.sleep(0.2)
    return time.monotonic() - started


def _kill_server(report: dict) -> None:
    if _alive(report):
        os.kill(report["pid"], signal.SIGKILL)


@pytest.mark.timeout(300)
def test_commands_share_one_local_server_that_stops_when_idle(prefect_home: Path) -> None:
    first = _enter(prefect_home, idle=10)
    one = _report(first)
    try:
        assert first.wait(timeout=60) == 0
        assert "started a local Prefect API" in first.stderr.read()
        second = _enter(prefect_home, idle=10)
        two = _report(second)
        assert second.wait(timeout=60) == 0
        assert second.stderr.read().count("started a local Prefect API") == 0  # reused, said nothing
        assert (two["url"], two["pid"]) == (one["url"], one["pid"])  # the same server
        assert two["blocked_s"] < WARM_TARGET_S, two  # the old code booted a server per command: 6-9 s
        waited = _wait_stopped(two, 60)
        assert not _alive(two), "the shared server did not stop after 10 s without a command"
        assert waited < 25 and local_api.read_record(Path(two["directory"])) is None
    finally:
        _kill_server(one)


@pytest.mark.timeout(300)
def test_a_held_lease_keeps_the_server_and_a_killed_holder_releases_it(prefect_home: Path) -> None:
    holder = _enter(prefect_home, idle=1, hold_s=600)
    report = _report(holder)
    try:
        time.sleep(5)  # five times the idle time
        assert _alive(report), "the server stopped while a command held it"
        assert urllib.request.urlopen(report["url"] + "/health", timeout=10).status == 200
        holder.send_signal(signal.SIGKILL)  # as the OOM killer would: no cleanup runs in the holder
        holder.wait(timeout=10)
        _wait_stopped(report, 30)
        assert not _alive(report), "the server outlived its killed holder's lease"
    finally:
        if holder.poll() is None:
            holder.kill()
        _kill_server(report)


@pytest.mark.timeout(300)
def test_commands_starting_together_start_one_server(prefect_home: Path) -> None:
    processes = [_enter(prefect_home, idle=2) for _ in range(3)]
    reports = [_report(process) for process in processes]
    try:
        assert all(process.wait(timeout=60) == 0 for process in processes)
        assert sum(process.stderr.read().count("started a local Prefect API") for process in processes) == 1
        assert len({(r["url"], r["pid"]) for r in reports}) == 1, reports
    finally:
        for report in reports:
            _kill_server(report)


def test_idle_zero_gives_a_private_server_and_a_bad_value_is_named(prefect_home: Path) -> None:
    code = (
        "from pathgen import local_api\n"
        "with local_api.api_server(timeout=240) as url: print(url)\n"
        "print(local_api.read_record(local_api.state_directory()))"
    )
    env = _env(PREFECT_HOME=str(prefect_home), PATHGEN_LOCAL_API_IDLE_S="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    url, record = done.stdout.strip().split("\n")[-2:]
    assert url.startswith("http://127.0.0.1:") and url not in record  # not the shared server's
    env[local_api.IDLE_ENV] = "ten minutes"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "PATHGEN_LOCAL_API_IDLE_S='ten minutes' is not a number" in done.stderr


def test_other_prefect_settings_get_another_server(tmp_path: Path) -> None:
    code = "from pathgen import local_api; print(local_api.state_directory())"

    def folder(**extra: str) -> Path:
        env = _env(PREFECT_HOME=str(tmp_path), **extra)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip())

    base, debug = folder(), folder(PREFECT_LOGGING_LEVEL="DEBUG")
    other = folder(PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path}/other.db")
    assert base.parent == other.parent == tmp_path / "pathgen-api"
    assert base == debug != other  # a client-only setting (--debug's log level) shares; another database does not


def test_the_temporary_server_sends_no_usage_data() -> None:
    env = _server_environment()
    assert env["DO_NOT_TRACK"] == "1"
    asked = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's own settings export writes booleans as "False": compare the value, not its spelling.
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == asked.lower() == "false"


def _run_in_terminal(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdin/stdout/stderr (Prefect's notice shows only in a terminal)."""
    main, child = pty.openpty()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: the command and its children are done
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            process.kill()
        return process.wait(timeout=30), output.decode(errors="replace")
    finally:
        os.close(main)


def test_a_command_in_a_terminal_prints_no_telemetry_notice(prefect_home: Path, tmp_path: Path) -> None:
    """A first-time user in a terminal: neither the CLI nor its local API server prints it."""
    assert not (prefect_home / ".sdk_telemetry" / "notice_shown").exists()  # Prefect's "shown once" marker
    env = _env(PREFECT_HOME=str(prefect_home))
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # as outside `make`
    command = [sys.executable, "-m", "pathgen", "extract", str(SLIDE), "--store", str(tmp_path / "store")]
    command += ["--set", "selection.method=all", "--set", "patch.patch_px=224"]
    code, output = _run_in_terminal(command, env, timeout=240)
    assert code == 0, output
    assert "anonymous usage data" not in output and "telemetry" not in output.lower(), output
