"""Process hygiene: helper processes that die with the process that started them, and bounded thread pools.

Two problems this module fixes:

* When the OOM killer (or anyone) SIGKILLs the main ``pathgen`` process, nothing runs in it any more: no ``finally``,
  no ``atexit``. Its process-pool workers and the temporary Prefect API server then run on, unsupervised, until their
  current work ends. :func:`die_with_parent` makes a process follow its parent: the kernel sends it SIGKILL when the
  parent goes (``PR_SET_PDEATHSIG`` on Linux) and a watchdog thread polls for the parent as a second line.
  :func:`ensure_api_server` runs the temporary Prefect API server as such a child; :func:`worker_process_setup` arms
  a pool worker.
* :func:`prefect_offline_defaults` keeps Prefect from printing its telemetry notice and sending usage data.
* torch, OpenMP and the BLAS libraries each start one thread per core, so two busy processes on one machine
  oversubscribe it many times over. :func:`bound_threads` picks one thread count and hands it to this process's
  libraries and, through the environment, to every child.

Only the standard library is imported at module level; Prefect, uvicorn, torch and OpenCV are imported when needed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "THREAD_ENV_VARS",
    "ApiServer",
    "bound_threads",
    "die_with_parent",
    "ensure_api_server",
    "prefect_offline_defaults",
    "start_api_server",
    "usable_cpus",
    "worker_process_setup",
]

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
ORPHANED_EXIT_CODE = 137  # what a shell reports for SIGKILL, which is what PR_SET_PDEATHSIG would have sent
WATCHDOG_INTERVAL_S = 0.5

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",  # OpenMP, and torch's intra-op pool (torch reads it when imported)
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",  # OpenCV's own pool ignores OMP_NUM_THREADS; it reads this one
)
DEFAULT_MAX_THREADS = 8

# Prefect's usage data, off unless asked for: the server's analytics, and the client's (whose first import in a
# terminal prints a telemetry notice and sends a first-use event).
OFFLINE_ENVIRONMENT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}

_armed_in_pid: int | None = None  # the process in which die_with_parent() has run (a fork child must arm again)
_armed_lock = threading.Lock()


# -- dying with the parent -----------------------------------------------------------------------------------------


def die_with_parent(parent_pid: int | None = None, *, pdeathsig: bool = True) -> None:
    """Make this process exit as soon as its parent process is gone. Idempotent per process.

    Two mechanisms, because each has a gap:

    * ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux only): the kernel kills this process the moment its parent dies,
      even when this process is stuck in C code holding the GIL. The kernel ties it to the parent *thread* that
      started this process, though, so it also fires when only that thread ends; pass ``pdeathsig=False`` when the
      process was started from a thread that may end before the parent process does.
    * A daemon watchdog thread that polls ``os.getppid()`` every ~0.5 s (and, in a ``multiprocessing`` child, the
      parent's sentinel pipe) and calls ``os._exit`` once the parent is gone. It covers other platforms, the
      race before the ``prctl`` call, and ``pdeathsig=False``.

    Args:
        parent_pid: the pid this process expects as its parent, e.g. passed down on the command line. When given
            and it is no longer the parent, the parent died before this call and the process exits at once.
            Default: the current parent.
        pdeathsig: also arm ``PR_SET_PDEATHSIG`` (on Linux).
    """
    global _armed_in_pid
    with _armed_lock:
        if _armed_in_pid == os.getpid():
            return
        _armed_in_pid = os.getpid()
    expected = os.getppid() if parent_pid is None else parent_pid
    mp_parent = multiprocessing.parent_process()
    if pdeathsig:
        _set_pdeathsig(signal.SIGKILL)
    if _parent_gone(expected, mp_parent):  # checked after arming, so a death in between is not missed
        os._exit(ORPHANED_EXIT_CODE)
    threading.Thread(
        target=_watch_parent, args=(expected, mp_parent), name="pathgen-parent-watchdog", daemon=True
    ).start()


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where that does not exist (not Linux) or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _parent_gone(expected_ppid: int, mp_parent: multiprocessing.process.BaseProcess | None) -> bool:
    if os.getppid() != expected_ppid:  # reparented to init or a subreaper: the parent has exited
        return True
    # A multiprocessing child also holds a pipe from its parent that closes when the parent dies; this catches a
    # parent that died before die_with_parent() ran, and forkserver children (whose OS parent is the fork server).
    try:
        return mp_parent is not None and not mp_parent.is_alive()
    except (OSError, ValueError):  # the sentinel went away with the parent
        return True


def _watch_parent(expected_ppid: int, mp_parent: multiprocessing.process.BaseProcess | None) -> None:
    while not _parent_gone(expected_ppid, mp_parent):
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(ORPHANED_EXIT_CODE)


# -- threads -------------------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _cgroup_cpu_quota() -> int | None:
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(fields) != 2 or fields[0] == "max":
            return None
        return max(1, math.ceil(int(fields[0]) / int(fields[1])))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number >= 1 else None


def bound_threads(threads: int | None = None, *, import_libraries: bool = False) -> int:
    """Choose how many threads each numeric library may use, apply it here and pass it on to child processes.

    The count is, first that applies: ``threads``; the ``PATHGEN_THREADS`` environment variable; an existing
    ``OMP_NUM_THREADS``; else ``max(1, min(8, usable_cpus() // 2))``.

    It is written to ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``NUMEXPR_NUM_THREADS``,
    ``VECLIB_MAXIMUM_THREADS`` and ``OPENCV_FOR_THREADS_NUM``, which child processes inherit and the libraries read
    when they load. A variable that is already set is left alone, unless the count was asked for explicitly
    (``threads`` or ``PATHGEN_THREADS``), which then wins everywhere.

    torch and OpenCV, when already imported, are set directly (``torch.set_num_threads``, once
    ``torch.set_num_interop_threads``, ``cv2.setNumThreads``). Not yet imported, they are not imported here
    (torch takes seconds to import) unless ``import_libraries``: when they load they read the variables above.

    Safe to call any number of times; returns the count.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        count, explicit = threads, True
    elif (from_env := _positive_int(os.environ.get("PATHGEN_THREADS"))) is not None:
        count, explicit = from_env, True
    elif (from_omp := _positive_int(os.environ.get("OMP_NUM_THREADS"))) is not None:
        count, explicit = from_omp, False
    else:
        count, explicit = max(1, min(DEFAULT_MAX_THREADS, usable_cpus() // 2)), False

    for name in THREAD_ENV_VARS:
        if explicit:
            os.environ[name] = str(count)
        else:
            os.environ.setdefault(name, str(count))

    torch = _loaded_module("torch", import_libraries)
    if torch is not None:
        torch.set_num_threads(count)
        with contextlib.suppress(RuntimeError):  # settable once, and only before inter-op work has started
            torch.set_num_interop_threads(count)
    cv2 = _loaded_module("cv2", import_libraries)
    if cv2 is not None:
        cv2.setNumThreads(count)
    return count


def _loaded_module(name: str, import_it: bool) -> types.ModuleType | None:
    module = sys.modules.get(name)
    if module is None and import_it:
        try:
            module = __import__(name)
        except ImportError:
            return None
    return module


def worker_process_setup(threads: int | None = None) -> int | None:
    """Arm a worker process (e.g. of Prefect's ``ProcessPoolTaskRunner``): die with the parent, bound threads.

    Meant for the start of a task, or as the pool's ``initializer``. In a process that is not a ``multiprocessing``
    child (the main process, a task run in a thread) it does nothing and returns None; otherwise it returns the
    thread count. Idempotent.
    """
    if multiprocessing.parent_process() is None:
        return None
    die_with_parent()
    return bound_threads(threads)


# -- the Prefect API server ----------------------------------------------------------------------------------------


class ApiServer:
    """A Prefect API server running in a child process of this one (see :func:`start_api_server`)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds) and reap it. Idempotent."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prefect_offline_defaults() -> None:
    """Switch Prefect's usage data off (:data:`OFFLINE_ENVIRONMENT`) where the environment does not say otherwise.

    Call it before Prefect is imported: the client decides on import whether to print its telemetry notice.
    """
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def start_api_server(timeout: float | None = None) -> ApiServer:
    """Start a Prefect API server on 127.0.0.1 as a child process that dies with this one, and wait until it answers.

    The same server Prefect starts on its own when no ``PREFECT_API_URL`` is set (its "ephemeral" server: the
    app from ``prefect.server.api.server.create_app(ephemeral=True)``, served by uvicorn, SQLite database from the
    current settings), but started by us, so the child runs :func:`die_with_parent` first and a SIGKILL of this
    process takes it down too. It gets its own session, so a Ctrl-C in the terminal reaches only this process, which
    then stops the server in order. This process binds the port and hands the socket over, so no other program can
    take the port in between. Also stopped at exit (``atexit``).

    Call it from the main thread: ``PR_SET_PDEATHSIG`` follows the starting thread, so from any other thread the
    child relies on its watchdog alone.

    Args:
        timeout: seconds to wait for ``/api/health``; default ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
            else 60.

    Raises:
        RuntimeError: the server exited or did not answer in time.
    """
    prefect_home().mkdir(parents=True, exist_ok=True)  # SQLite creates the database file, not its folder
    return _await_api_server(_spawn_api_server(), timeout)


def prefect_home() -> Path:
    """Prefect's home folder (``PREFECT_HOME``, default ~/.prefect): its database and settings live there."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def _spawn_api_server(env: dict[str, str] | None = None) -> ApiServer:
    """Start the server's process (see :func:`start_api_server`) without waiting for it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        on_main_thread = threading.current_thread() is threading.main_thread()
        command = [
            sys.executable,
            "-m",
            "pathgen.processes",
            "serve-prefect-api",
            str(listener.fileno()),
            str(os.getpid()),
            "1" if on_main_thread else "0",
        ]
        process = subprocess.Popen(
            command,
            pass_fds=(listener.fileno(),),
            env=_server_environment() if env is None else env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        listener.close()  # the child holds its own copy
    server = ApiServer(process, port)
    atexit.register(server.stop)
    return server


def _await_api_server(server: ApiServer, timeout: float | None) -> ApiServer:
    """Wait until ``server`` answers; stop it and raise when it does not."""
    if timeout is None:
        timeout = startup_timeout()
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        server.stop(timeout=1.0)
        raise
    return server


def startup_timeout() -> float:
    """Seconds to wait for a starting API server: Prefect's own setting for its temporary server, else 60."""
    return float(_positive_int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")) or 60)


def _server_environment() -> dict[str, str]:
    env = dict(os.environ)
    if "prefect.settings" in sys.modules:  # settings changed in this process (profiles, temporary_settings) count
        from prefect.settings import get_current_settings

        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_UI_ENABLED"] = "0"
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["DO_NOT_TRACK"] = "1"  # a background server has no use for the client's usage data, or its notice
    package_root = str(Path(__file__).resolve().parents[1])  # so `-m pathgen.processes` works without an install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _wait_healthy(server: ApiServer, timeout: float) -> None:
    def exited() -> str | None:
        code = server.process.poll()
        return None if code is None else f"the Prefect API server exited with code {code} while starting"

    wait_for_health(server.api_url, exited, timeout, RuntimeError, "the Prefect API server")


def wait_for_health(api_url: str, exited, timeout: float, error: type[Exception], what: str) -> None:
    """Poll ``<api_url>/health`` until it answers 200; raise ``error`` when ``exited()`` names a reason (the server
    process is gone) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    health = f"{api_url}/health"
    while True:
        reason = exited()
        if reason:
            raise error(reason)
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise error(f"{what} did not answer {health} within {timeout:.0f} s")
        time.sleep(0.05)


def _configured_api_url() -> tuple[str | None, bool]:
    """(the API URL Prefect will use, whether Prefect may start a server itself when there is none)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], True
    # Also a profile, .env, prefect.toml or temporary_settings may set it: ask Prefect.
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.api.url, bool(settings.server.ephemeral.enabled)


def _refresh_prefect_settings() -> None:
    """Let an already imported Prefect see a changed ``PREFECT_API_URL`` (it reads the environment on import)."""
    context = sys.modules.get("prefect.context")
    if context is not None and hasattr(context, "refresh_global_settings_context"):
        context.refresh_global_settings_context()


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the logs and events Prefect still holds before their server goes (as ``prefect_test_harness`` does)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return  # in a running event loop drain_all() returns awaitables; leave it to Prefect's own exit hooks
    workers = []
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        workers.append(APILogWorker)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        workers.append(EventsWorker)
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def ensure_api_server(timeout: float | None = None) -> Iterator[str | None]:
    """Within the block Prefect has an API server, one that cannot outlive this process.

    When an API URL is configured (``PREFECT_API_URL``, a profile, ...) this does nothing and yields it. Otherwise
    it starts one with :func:`start_api_server`, points ``PREFECT_API_URL`` at it (the environment, which child
    processes inherit, and an already imported Prefect), and yields its URL; on leaving the block it sends Prefect's
    pending logs and events, stops the server and restores the settings. Prefect then never starts its own
    temporary server, neither here nor in pool workers. When Prefect's ephemeral mode is switched off it yields None
    and starts nothing, so Prefect reports the missing URL as usual. Commands share one server instead
    (:mod:`pathgen.local_api`) unless ``PATHGEN_LOCAL_API_IDLE_S`` is 0.
    """
    url, ephemeral_allowed = _configured_api_url()
    if url or not ephemeral_allowed:
        yield url
        return
    server = start_api_server(timeout)
    os.environ["PREFECT_API_URL"] = server.api_url
    _refresh_prefect_settings()
    try:
        yield server.api_url
    finally:
        try:
            _drain_prefect_workers()
        finally:
            server.stop()
            if os.environ.get("PREFECT_API_URL") == server.api_url:
                del os.environ["PREFECT_API_URL"]
            _refresh_prefect_settings()


def _serve_prefect_api(fd: int, parent_pid: int, pdeathsig: bool) -> None:
    """The child side of :func:`start_api_server`: follow the parent, then serve the API on the inherited socket."""
    die_with_parent(parent_pid, pdeathsig=pdeathsig)
    import uvicorn
    from prefect.server.api.server import create_app

    listener = socket.socket(fileno=fd)
    app = create_app(ephemeral=True, final=True)
    config = uvicorn.Config(app, log_level="error", lifespan="on", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[listener])


def _main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "serve-prefect-api":
        _serve_prefect_api(int(argv[1]), int(argv[2]), argv[3] == "1")
        return 0
    print("usage: python -m pathgen.processes serve-prefect-api FD PARENT_PID PDEATHSIG(0|1)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
