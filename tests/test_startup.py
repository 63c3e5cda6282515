"""Start-up of a command: the temporary Prefect API server boots while the command works, and Prefect prints no
telemetry notice. Each check runs in a subprocess (process-wide state: environment, a server child)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pathgen.processes import _server_environment

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
ADOPT_TARGET_S = 0.5  # blocking in ensure_api_server once a prestarted server has booted; the old code: 4-9 s
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "JENKINS_URL", "TRAVIS", "TF_BUILD")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "DO_NOT_TRACK", *CI_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


PRESTART = """
import json, os, time, urllib.request
from pathgen import processes

started = time.monotonic()
server = processes.prestart_api_server()
prestart_s = time.monotonic() - started
import flows.extract  # the command's own work, meanwhile
processes._wait_healthy(server, 120)  # ... for as long as the server takes to boot
entered = time.monotonic()
with processes.ensure_api_server(timeout=120) as url:
    blocked_s = time.monotonic() - entered
    health = urllib.request.urlopen(url + "/health", timeout=10).status
try:
    urllib.request.urlopen(url + "/health", timeout=5)
    closed = False
except OSError:
    closed = True
print(json.dumps({"prestart_s": prestart_s, "blocked_s": blocked_s, "url": url, "own": server.api_url,
                  "health": health, "closed": closed, "exit": server.process.poll()}))
"""


def test_a_prestarted_server_is_adopted_without_waiting() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PRESTART)], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["url"] == report["own"], report  # the prestarted server, not a second one
    assert report["health"] == 200 and report["closed"] and report["exit"] is not None, report
    assert report["prestart_s"] < 2.0, report  # starting it does not wait for it
    assert report["blocked_s"] < ADOPT_TARGET_S, report


def test_prestart_does_nothing_when_an_api_is_configured() -> None:
    code = "from pathgen import processes; print(processes.prestart_api_server())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(PREFECT_API_URL="http://127.0.0.1:9/api"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None"


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


def test_a_command_in_a_terminal_prints_no_telemetry_notice(tmp_path: Path) -> None:
    """A first-time user (empty PREFECT_HOME) in a terminal: neither the CLI nor its temporary server prints it."""
    env = _env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # as outside `make`
    command = [sys.executable, "-m", "pathgen", "extract", str(SLIDE), "--store", str(tmp_path / "store")]
    command += ["--set", "selection.method=all", "--set", "patch.patch_px=224"]
    code, output = _run_in_terminal(command, env, timeout=240)
    assert code == 0, output
    assert "anonymous usage data" not in output and "telemetry" not in output.lower(), output
