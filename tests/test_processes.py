"""Helper processes die with the main process, even when it is SIGKILLed; thread counts are bounded and inherited.

Every check that changes process-wide state (environment, torch's thread pools, a watchdog thread) runs in a
subprocess, so the test session itself is left as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pathgen.processes import THREAD_ENV_VARS, usable_cpus, worker_process_setup

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_ENV_VARS, "PATHGEN_THREADS")}
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra)
    return env


def _run_json(code: str, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=_env(**env), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    """True while /proc/<pid> exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


# The "main": starts two spawn children that arm themselves and sleep; with "server", first runs a block under
# ensure_api_server() to the end and reports on it, then enters another; prints a JSON report and sleeps until killed.
MAIN = """
import json, multiprocessing, os, sys, time, urllib.request

from pathgen.processes import die_with_parent, ensure_api_server, worker_process_setup


def child(ready, how):
    if how == "watchdog-only":
        die_with_parent(pdeathsig=False)
    elif how == "worker_process_setup":
        assert worker_process_setup() is not None
    ready.send(os.getpid())
    time.sleep(600)


def server_pids():
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            command = open(f"/proc/{entry}/cmdline", "rb").read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"serve-prefect-api" in command:
            found.append(int(entry))
    return found


def used_and_stopped():
    from prefect.settings import PREFECT_API_URL

    with ensure_api_server(timeout=120) as url:
        inside = [os.environ.get("PREFECT_API_URL"), PREFECT_API_URL.value()]
        health = urllib.request.urlopen(url + "/health", timeout=10).status
        running = server_pids()
    try:
        urllib.request.urlopen(url + "/health", timeout=5)
        closed = False
    except OSError:
        closed = True
    after = [os.environ.get("PREFECT_API_URL"), PREFECT_API_URL.value()]
    return {"url": url, "inside": inside, "health": health, "running": running, "closed": closed,
            "left": server_pids(), "after": after}


if __name__ == "__main__":
    how, with_server = sys.argv[1], sys.argv[2] == "server"
    report = {"main": os.getpid()}
    if with_server:
        report["normal"] = used_and_stopped()
        session = ensure_api_server(timeout=120)  # held open (a dropped generator context would close)
        session.__enter__()
        report["server"] = server_pids()
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(2)]  # pipes, not a Queue: no semaphores left behind
    for _, writer in pipes:
        context.Process(target=child, args=(writer, how)).start()
    report["children"] = sorted(reader.recv() for reader, _ in pipes)
    print(json.dumps(report), flush=True)
    time.sleep(600)
"""


def _kill_main_and_check(
    tmp_path: Path, how: str, server: bool, env: dict[str, str], within: float = 10.0, expect_gone: bool = True
) -> dict:
    """Run MAIN, SIGKILL it once it reports, and check that the processes it started are gone ``within`` seconds
    (or, with ``expect_gone=False``, still there after that long)."""
    script = tmp_path / "main.py"
    script.write_text(MAIN)
    main = subprocess.Popen(
        [sys.executable, str(script), how, "server" if server else "none"], env=env, stdout=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        line = main.stdout.readline()
        assert line, f"the main process exited early with {main.wait()}"
        report = json.loads(line)
        pids = report["children"] + report.get("server", [])
        assert len(pids) == (3 if server else 2) and all(_alive(pid) for pid in pids), report
        main.send_signal(signal.SIGKILL)  # the main only, as the OOM killer does
        main.wait(timeout=10)
        if expect_gone:
            left = _wait_gone(pids, within)
            assert not left, f"still alive {within:.0f} s after the main was killed: {left}"
        else:
            time.sleep(within)
            assert all(_alive(pid) for pid in pids), "the control children died on their own"
        return report
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        for pid in pids:  # never leave a stray behind, whatever failed above
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["worker_process_setup", "watchdog-only"])
def test_workers_die_when_the_main_process_is_sigkilled(tmp_path, how):
    _kill_main_and_check(tmp_path, how, server=False, env=_env())


def test_unarmed_workers_outlive_the_main_process(tmp_path):
    """The control: without die_with_parent the children run on (and are killed by the test's cleanup)."""
    _kill_main_and_check(tmp_path, "unarmed", server=False, env=_env(), within=2.0, expect_gone=False)


@pytest.mark.prefect
@pytest.mark.timeout(240)
def test_api_server_stops_in_order_and_dies_with_the_main_process(tmp_path):
    # With a URL configured it starts nothing.
    given = _run_json(
        """
        import json
        from pathgen.processes import ensure_api_server

        with ensure_api_server() as url:
            print(json.dumps({"url": url}))
        """,
        PREFECT_API_URL="http://127.0.0.1:9/api",
    )
    assert given == {"url": "http://127.0.0.1:9/api"}
    # Without one (the CLI's database, as a plain `pathgen extract` would use): SIGKILL of the main takes the server
    # and the workers down with it.
    report = _kill_main_and_check(tmp_path, "worker_process_setup", server=True, env=_env())
    # Before that, normal use: a server for the block, PREFECT_API_URL pointing at it, then stopped, settings restored.
    normal = report["normal"]
    assert normal["url"].startswith("http://127.0.0.1:") and normal["inside"] == [normal["url"]] * 2
    assert normal["health"] == 200 and len(normal["running"]) == 1
    assert normal["closed"] and normal["left"] == [] and normal["after"] == [None, None]


def test_worker_process_setup_does_nothing_in_the_main_process():
    assert worker_process_setup() is None  # not a multiprocessing child: no watchdog, no thread settings
    assert not any(t.name == "pathgen-parent-watchdog" for t in threading.enumerate())


# -- bound_threads -------------------------------------------------------------------------------------------------

SCENARIOS = """
import json, os, sys
import torch
from pathgen.processes import THREAD_ENV_VARS, bound_threads

def run(env, *args, **kwargs):
    for name in (*THREAD_ENV_VARS, "PATHGEN_THREADS"):
        os.environ.pop(name, None)
    os.environ.update(env)
    n = bound_threads(*args, **kwargs)
    return {"n": n, "torch": torch.get_num_threads(), "env": {k: os.environ.get(k) for k in THREAD_ENV_VARS}}

out = {
    "default": run({}),
    "again": run({}),
    "explicit": run({"OMP_NUM_THREADS": "1", "PATHGEN_THREADS": "2"}, 3),
    "pathgen_threads": run({"OMP_NUM_THREADS": "1", "PATHGEN_THREADS": "2"}),
    "omp": run({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "5"}),
    "bad_env": run({"PATHGEN_THREADS": "lots"}),
}
try:
    bound_threads(0)
    out["zero"] = "accepted"
except ValueError:
    out["zero"] = "ValueError"
print(json.dumps(out))
"""


def test_bound_threads_sets_the_environment_and_torch():
    out = _run_json(SCENARIOS)
    default = max(1, min(8, usable_cpus() // 2))
    for case in ("default", "again", "bad_env"):
        assert out[case]["n"] == out[case]["torch"] == default
        assert out[case]["env"] == dict.fromkeys(THREAD_ENV_VARS, str(default))
    # an explicit count wins over PATHGEN_THREADS and OMP_NUM_THREADS, and is passed on to children
    assert out["explicit"]["n"] == out["explicit"]["torch"] == 3
    assert out["explicit"]["env"] == dict.fromkeys(THREAD_ENV_VARS, "3")
    assert out["pathgen_threads"]["n"] == out["pathgen_threads"]["torch"] == 2
    assert out["pathgen_threads"]["env"]["OMP_NUM_THREADS"] == "2"
    # an existing OMP_NUM_THREADS is respected, and other variables already set are left alone
    assert out["omp"]["n"] == out["omp"]["torch"] == 1
    assert out["omp"]["env"] == {**dict.fromkeys(THREAD_ENV_VARS, "1"), "MKL_NUM_THREADS": "5"}
    assert out["zero"] == "ValueError"


def test_bound_threads_reaches_libraries_imported_later_and_child_processes():
    out = _run_json(
        """
        import json, subprocess, sys
        from pathgen.processes import bound_threads

        n = bound_threads(1)
        imported_early = "torch" in sys.modules or "cv2" in sys.modules
        import cv2, torch  # they read OMP_NUM_THREADS and OPENCV_FOR_THREADS_NUM when they load
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(json.dumps({"n": n, "imported_early": imported_early, "torch": torch.get_num_threads(),
                          "cv2": cv2.getNumThreads(), "child_omp": int(child)}))
        """
    )
    assert out == {"n": 1, "imported_early": False, "torch": 1, "cv2": 1, "child_omp": 1}
