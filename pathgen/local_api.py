"""A local Prefect API server that commands share, so only the first command of a session waits for one to boot.

Without a configured ``PREFECT_API_URL`` every command needs a Prefect API, and booting one costs 6-9 s (importing
Prefect's server alone is over 5 s). Here the first command starts a server in the background and later commands
(in any shell, with the same Prefect settings) reuse it. Each command holds a *lease* on it while it runs: a file
named after its process, which a SIGKILL cannot take back but which the server recognises as stale once that process
is gone. The server stops by itself when no live lease has been held for ``PATHGEN_LOCAL_API_IDLE_S`` seconds
(default 600); ``PATHGEN_LOCAL_API_IDLE_S=0`` gives each command its own private server instead, one that dies with
it (:func:`pathgen.processes.ensure_api_server`).

The state lives under Prefect's home, in a folder per set of Prefect settings (database, home, Python, Prefect
version), so a command never talks to a server that runs with other settings than its own::

    $PREFECT_HOME/pathgen-api/<digest>/server.json   pid, port and URL of the running server
                                      /leases/        one file per command that uses it
                                      /lock           serialises start, lease and stop decisions
                                      /server.log     the server's own output

The server decides to stop under the same lock under which commands take leases, and removes ``server.json`` first,
so a command that found the record holds a server that stays up. Only the standard library is imported at module
level.

While a command runs, a watchdog thread asks its API (whichever it uses) for ``/health`` every few seconds. An API
that refuses connections (nobody listens: its server was killed) or whose host cannot be reached for
``PATHGEN_API_LOST_S`` seconds (default 20; 0 switches the watchdog off) is lost: the command says which API it lost
(its URL without credentials), which units stay pending and to run again, and exits 1 at once. Otherwise Prefect's
client retries every request with exponential back-off (``PREFECT_CLIENT_MAX_RETRIES``, about a minute per request),
so a killed server kept a command waiting for minutes. An API that is there but slow (probes time out: a CPU-starved
machine, a locked SQLite database) is not lost that soon: only after ``SLOW_LOST_S`` (5 minutes, or
``PATHGEN_API_LOST_S`` when that is longer) without any HTTP answer; any answer, whatever its status, resets both
clocks. Nothing is lost by exiting: outputs are committed whole, one object each, and the next run skips what is
committed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pathgen import processes

IDLE_ENV = "PATHGEN_LOCAL_API_IDLE_S"
DEFAULT_IDLE_S = 600
LOST_ENV = "PATHGEN_API_LOST_S"
DEFAULT_LOST_S = 20.0
PROBE_S = 2.0  # how often the watchdog asks the API for /health
PROBE_TIMEOUT_S = 5.0  # how long one /health probe waits for its answer (a busy server may take seconds)
SLOW_LOST_S = 300.0  # how long an API that is there (probes time out, not refused) may stay without answering
EXIT_API_LOST = 1
GONE_ERRNOS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)  # nobody listens / no route to its host
LEASE_POLL_S = 1.0
RECORD = "server.json"
# Prefect settings only the client reads: commands that differ in these (`--debug` sets the logging level) still
# share a server.
CLIENT_ONLY_PREFIXES = (
    "PREFECT_LOGGING_",
    "PREFECT_CLIENT_",
    "PREFECT_TASKS_",
    "PREFECT_FLOWS_",
    "PREFECT_RESULTS_",
    "PREFECT_RUNNER_",
    "PREFECT_WORKER_",
    "PREFECT_TASK_",
    "PREFECT_CLOUD_",
)

_lease_numbers = itertools.count()


class LocalApiError(RuntimeError):
    """The shared local server could not be started or reached."""


def idle_seconds() -> float:
    """``PATHGEN_LOCAL_API_IDLE_S``: how long the shared server waits for the next command; 0 means no sharing."""
    return _seconds_env(IDLE_ENV, DEFAULT_IDLE_S)


def lost_seconds() -> float:
    """``PATHGEN_API_LOST_S``: how long the API may refuse connections before a command gives up; 0 means never."""
    return _seconds_env(LOST_ENV, DEFAULT_LOST_S)


def _seconds_env(name: str, default: float) -> float:
    """The environment variable ``name`` as a number of seconds >= 0; ``default`` when unset or empty.

    Raises:
        LocalApiError: it is set to something else, naming the variable and its default.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise LocalApiError(f"{name}={raw!r} is not a number of seconds >= 0; unset it for {default:g}")
    return value


@contextlib.contextmanager
def api_server(timeout: float | None = None) -> Iterator[str | None]:
    """Within the block Prefect has an API: the configured one, else the shared local server, else a private one.

    As :func:`pathgen.processes.ensure_api_server` (which this falls back to when ``PATHGEN_LOCAL_API_IDLE_S`` is
    0), but the server outlives the block: this process holds a lease on it until the block ends, and the server
    stops by itself once nobody has held one for the idle time. Prints one line to stderr when it starts a server.
    """
    url, ephemeral_allowed = processes._configured_api_url()
    idle, lost = idle_seconds(), lost_seconds()
    if url or not ephemeral_allowed or idle == 0:
        with processes.ensure_api_server(timeout) as served, watching(served, lost, started_here=not url):
            yield served
        return
    with _shared_server(idle, timeout) as served, watching(served, lost, started_here=True):
        yield served


@contextlib.contextmanager
def _shared_server(idle: float, timeout: float | None) -> Iterator[str]:
    """A lease on the shared server for the block, ``PREFECT_API_URL`` pointing at it (see :func:`api_server`)."""
    directory = state_directory()
    record, lease, started = acquire(directory, idle, timeout)
    if started:
        print(
            f"pathgen: started a local Prefect API at {record['url']} for this and later commands; it stops "
            f"{idle:.0f} s after the last one ends ({IDLE_ENV}=0: a private server per command)",
            file=sys.stderr,
        )
    os.environ["PREFECT_API_URL"] = record["url"]
    processes._refresh_prefect_settings()
    try:
        yield record["url"]
    finally:
        try:
            processes._drain_prefect_workers()
        finally:
            lease.unlink(missing_ok=True)
            if os.environ.get("PREFECT_API_URL") == record["url"]:
                del os.environ["PREFECT_API_URL"]
            processes._refresh_prefect_settings()


def state_directory() -> Path:
    """The folder of the shared server for this process's Prefect settings (see the module's docstring)."""
    from prefect import __version__ as prefect_version

    env = processes._server_environment()
    identity = {
        "prefect": prefect_version,
        "python": sys.executable,
        "settings": {name: value for name, value in sorted(env.items()) if _server_side(name)},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return processes.prefect_home() / "pathgen-api" / digest


def _server_side(name: str) -> bool:
    """Whether environment variable ``name`` may change what the server does (client-only settings do not)."""
    return name.startswith("PREFECT_") and not name.startswith(CLIENT_ONLY_PREFIXES)


def acquire(directory: Path, idle: float, timeout: float | None = None) -> tuple[dict, Path, bool]:
    """A lease on the shared server in ``directory``, starting the server when none runs.

    Returns (the server's record, this process's lease file, whether this call started the server). Waits until the
    server answers; a server that dies while booting is replaced once.

    Raises:
        LocalApiError: no server answered within ``timeout`` seconds (default as
            :func:`pathgen.processes.start_api_server`).
    """
    timeout = processes.startup_timeout() if timeout is None else timeout
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        with _locked(directory):
            record = read_record(directory)
            started = record is None or not process_alive(record["pid"], record["pid_start"])
            if started:
                record = _spawn(directory, idle)
            lease = _take_lease(directory)
        try:
            _wait_healthy(record, timeout)
            return record, lease, started
        except LocalApiError:
            lease.unlink(missing_ok=True)
            if attempt == 1 or process_alive(record["pid"], record["pid_start"]):
                raise
    raise AssertionError("unreachable")


def read_record(directory: Path) -> dict | None:
    try:
        return json.loads((directory / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def process_alive(pid: int, start: int) -> bool:
    """True while process ``pid`` runs and is the one that started at ``start`` (not a later one with its number)."""
    return _process_start(pid) == start if start else _pid_exists(pid)


def live_leases(directory: Path) -> list[Path]:
    """The leases whose processes still run; removes the others (left by a command that was killed)."""
    live = []
    for lease in (directory / "leases").glob("*"):
        try:
            pid, start, _ = lease.name.split("-")
            alive = process_alive(int(pid), int(start))
        except ValueError:
            alive = False
        if alive:
            live.append(lease)
        else:
            lease.unlink(missing_ok=True)
    return live


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / "lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _take_lease(directory: Path) -> Path:
    leases = directory / "leases"
    leases.mkdir(exist_ok=True)
    pid = os.getpid()
    lease = leases / f"{pid}-{_process_start(pid)}-{next(_lease_numbers)}"
    lease.touch()
    return lease


def _spawn(directory: Path, idle: float) -> dict:
    """Start the server detached from this process (its own session, output to server.log) and record it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        command = [sys.executable, "-m", "pathgen.local_api", "serve", str(listener.fileno()), str(directory)]
        command.append(str(idle))
        with open(directory / "server.log", "ab") as log:
            process = subprocess.Popen(
                command,
                pass_fds=(listener.fileno(),),
                env=processes._server_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        listener.close()  # the server holds its own copy
    process.returncode = 0  # never waited for here: it outlives this process (keeps Popen.__del__ quiet)
    record = {
        "pid": process.pid,
        "pid_start": _process_start(process.pid),
        "port": port,
        "url": f"http://127.0.0.1:{port}/api",
        "idle_s": idle,
        "started_at": time.time(),
    }
    temporary = directory / f"{RECORD}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record))
    os.replace(temporary, directory / RECORD)
    return record


def _wait_healthy(record: dict, timeout: float) -> None:
    def exited() -> str | None:
        if process_alive(record["pid"], record["pid_start"]):
            return None
        return f"the local Prefect API server (pid {record['pid']}) exited while starting"

    processes.wait_for_health(record["url"], exited, timeout, LocalApiError, "the local Prefect API server")


def _process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown; -1 when there is no process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return -1
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return -1
    return int(fields[19])


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the watchdog: a lost API ends the command in seconds, not minutes ---------------------------------------------

_command = "pathgen"  # how the watchdog's message names the command (set by the CLI)
_lost: tuple[BaseException, str] | None = None  # an API error that ended a block whose API was gone, and its message


def name_command(name: str) -> None:
    global _command
    _command = name


@contextlib.contextmanager
def watching(url: str | None, lost_s: float, started_here: bool) -> Iterator[None]:
    """Within the block a daemon thread probes ``url``; see the module's docstring. ``started_here``: the API is a
    local server this command started or shared (running again starts another), not a configured one. A connection
    error that ends the block while the API does not answer is noted for :func:`lost_api_explanation`."""
    stop = threading.Event()
    if url and lost_s > 0:
        watchdog = threading.Thread(
            target=_watch_api, args=(url, lost_s, started_here, stop), name="pathgen-api-watchdog", daemon=True
        )
        watchdog.start()
    try:
        yield
    except Exception as exc:
        _note_if_lost(exc, url, started_here)  # now, before a private server is stopped on the way out
        raise
    finally:
        stop.set()


def _watch_api(url: str, lost_s: float, started_here: bool, stop: threading.Event) -> None:
    clock = LostClock(lost_s, max(lost_s, SLOW_LOST_S), time.monotonic())
    while not stop.wait(PROBE_S):
        gone, reason = probe(url)
        why = clock.lost(gone, reason, time.monotonic())
        if why and not stop.is_set():
            print(lost_api_message(url, why, started_here), file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            # os._exit, not an exception in the main thread: that thread is inside Prefect's client retries, and
            # unwinding it runs Prefect's engine and our `finally` blocks, which report the crash to the API that is
            # gone, with the same minute-long retries per request. What os._exit skips is safe to skip: outputs are
            # committed whole and the next run skips them (staging leftovers are removed then), a stale lease is
            # recognised by its dead pid, and a private API server and the process-pool workers die with this
            # process (pathgen.processes.die_with_parent: PR_SET_PDEATHSIG and a parent watchdog).
            os._exit(EXIT_API_LOST)


class LostClock:
    """When an API counts as lost, from the outcomes of its probes: ``lost_s`` seconds of refused connections
    (nobody listens, or its host cannot be reached), or ``slow_s`` seconds without any HTTP answer (it is there but
    does not answer in time: a busy machine, a locked database). Any answer resets both."""

    def __init__(self, lost_s: float, slow_s: float, now: float) -> None:
        self.lost_s, self.slow_s = lost_s, slow_s
        self.answered_at: float = now
        self.gone_since: float | None = None

    def lost(self, gone: bool, reason: str | None, now: float) -> str | None:
        """Why the API is lost after a probe at ``now`` (see :func:`probe`), or None while it is not."""
        if reason is None:
            self.answered_at, self.gone_since = now, None
            return None
        self.gone_since = (self.gone_since or now) if gone else None
        if self.gone_since is not None and now - self.gone_since >= self.lost_s:
            return f"nobody answered for {self.lost_s:.0f} s ({reason})"
        if now - self.answered_at >= self.slow_s:
            return f"it accepted connections but gave no answer for {self.slow_s:.0f} s ({reason})"
        return None


def _note_if_lost(exc: BaseException, url: str | None, started_here: bool) -> None:
    global _lost
    httpx = sys.modules.get("httpx")  # Prefect's client raises httpx's errors
    if url and httpx is not None and isinstance(exc, httpx.TransportError):
        reason = unreachable(url)
        if reason is not None:
            _lost = (exc, lost_api_message(url, f"{reason} ({type(exc).__name__})", started_here))


def lost_api_explanation(exc: BaseException) -> str | None:
    """The lost-API message when ``exc`` ended an :func:`api_server` block because its API was gone (the watchdog
    was off, or Prefect gave up first); None otherwise."""
    return _lost[1] if _lost is not None and _lost[0] is exc else None


def unreachable(url: str) -> str | None:
    """Why the API at ``url`` does not answer ``/health``; None when it answers (any HTTP status: it is there)."""
    return probe(url)[1]


def probe(url: str) -> tuple[bool, str | None]:
    """Ask the API at ``url`` for ``/health``: (whether nobody is there, why it did not answer); (False, None) when it
    answered with any HTTP status. Nobody is there when the connection is refused or the host or network cannot be
    reached; a timeout, a reset or a garbled answer come from something that is there."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(public_url(url).rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return False, None
    except urllib.error.HTTPError:
        return False, None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        gone = isinstance(reason, ConnectionRefusedError) or getattr(reason, "errno", None) in GONE_ERRNOS
        return gone, why


def public_url(url: str) -> str:
    """``url`` without user and password: what a message may show (the API's own credentials are not in it)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def lost_api_message(url: str, why: str, started_here: bool) -> str:
    """What a command says when its Prefect API is gone: which API, which units stay pending, and what to do."""
    fix = (
        "Run the command again: it starts a new local API"
        if started_here
        else f"Bring the Prefect API at {public_url(url)} back (or point PREFECT_API_URL at one that runs) and run "
        "the command again"
    )
    return (
        f"{_command}: lost the Prefect API at {public_url(url)}: {why}; its server stopped or cannot be reached. "
        f"Stopped here: committed work stays, {_unfinished_text()}. {fix}; it skips what is committed."
    )


def _unfinished_text() -> str:
    runner = sys.modules.get("tasks.work.runner")  # only a run that got as far as its units has any in flight
    unfinished = runner.unfinished_units() if runner else {}
    if not unfinished:
        return "and the work this command had not started stays pending"
    parts = []
    for (stage, kind), units in sorted(unfinished.items()):
        shown = ", ".join(units[:10]) + (f" and {len(units) - 10} more" if len(units) > 10 else "")
        parts.append(f"{stage}: {len(units)} {kind} ({shown})")
    return "and these had not reported back, so they stay pending: " + "; ".join(parts)


# -- the server's side ---------------------------------------------------------------------------------------------


def _serve(fd: int, directory: Path, idle: float) -> None:
    """Serve the API on the inherited socket until :func:`_watch_leases` says stop."""
    import uvicorn
    from prefect.server.api.server import create_app

    listener = socket.socket(fileno=fd)
    app = create_app(ephemeral=True, final=True)
    config = uvicorn.Config(app, log_level="error", lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    threading.Thread(target=_watch_leases, args=(server, directory, idle), name="pathgen-leases", daemon=True).start()
    server.run(sockets=[listener])


def _watch_leases(server, directory: Path, idle: float) -> None:
    """Tell ``server`` to stop once no live lease has been held for ``idle`` seconds, or its record is gone."""
    idle_since = time.monotonic()
    while not server.should_exit:
        time.sleep(LEASE_POLL_S)
        try:
            with _locked(directory):
                record = read_record(directory)
                if record is None or record["pid"] != os.getpid():
                    server.should_exit = True  # replaced or removed: this server is nobody's any more
                elif live_leases(directory):
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= idle:
                    (directory / RECORD).unlink()  # first, under the lock: no command takes a lease on it now
                    server.should_exit = True
        except OSError:  # the folder was removed
            server.should_exit = True


def _main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "serve":
        _serve(int(argv[1]), Path(argv[2]), float(argv[3]))
        return 0
    print("usage: python -m pathgen.local_api serve FD STATE_DIR IDLE_S", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
