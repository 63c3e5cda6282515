"""The process manager under the local stack (deploy/local_stack_helper.py), on Python's own subprocess management.

Each service runs in its own session (so that stopping it reaches its whole process group), with the stack's marker
in its environment (so that `down` also finds what a service left behind in another group, flow runs included), and
its log in the state folder. A service is recorded as NAME.pid and NAME.start: the start time from /proc tells a
reused pid from the process the stack started, so a stale record never gets another process killed.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pathgen.errors import redact_urls

KILL_EXTRA_WAIT = 5.0  # seconds a process group gets to vanish after SIGKILL
POLL = 0.2


@dataclass(frozen=True)
class StopPolicy:
    """How one service is stopped: ``signal`` to its process group (or to the process alone), ``grace`` seconds to
    go, then SIGKILL to the group."""

    name: str
    signal: signal.Signals = signal.SIGTERM
    whole_group: bool = True
    grace: float = 30.0


def proc_status(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def _signal(pid: int, sig: signal.Signals, whole_group: bool) -> None:
    """``sig`` to the process group led by ``pid`` (to ``pid`` alone if that fails or is not wanted)."""
    if whole_group:
        try:
            os.killpg(pid, sig)
            return
        except OSError:
            pass
    with suppress(OSError):
        os.kill(pid, sig)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except OSError:
        return False
    return True


class LockBusy(RuntimeError):
    """Another process holds the stack's lock."""


@contextmanager
def exclusive(lock_path: Path, wait: float, busy: str) -> Iterator[None]:
    """Holds an exclusive flock on ``lock_path``; LockBusy(``busy``) when another holder keeps it ``wait`` s."""
    with open(lock_path, "w") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockBusy(busy) from None
                time.sleep(0.1)
        yield


class ProcessTable:
    """The services one stack started, recorded in its ``state`` folder and marked with ``marker`` (NAME=VALUE)."""

    def __init__(self, state: Path, marker: str, cwd: Path) -> None:
        self.state = state
        self.marker = marker
        self.cwd = cwd
        self._children: dict[int, subprocess.Popen] = {}  # started by this process: reaped while it waits

    def pid(self, name: str) -> int | None:
        """The pid of ``name`` if its record names a live process that is still the one the stack started."""
        try:
            pid = int((self.state / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        status = proc_status(pid)
        if status is None or status[0] == "Z":
            return None
        start = self.state / f"{name}.start"
        if start.exists() and start.read_text().strip() != status[1]:
            return None
        return pid

    def recorded(self) -> list[str]:
        """The names of every service with a record, running or not."""
        return sorted(path.stem for path in self.state.glob("*.pid"))

    def forget(self, name: str) -> None:
        for suffix in (".pid", ".start"):
            (self.state / f"{name}{suffix}").unlink(missing_ok=True)

    def launch(self, name: str, argv: list[str], env: dict[str, str], user: str | None = None) -> int:
        """Starts ``argv`` as service ``name`` in its own session, marked, logging to NAME.log; records it."""
        log_path = self.state / f"{name}.log"
        with open(log_path, "a") as log:
            log.write(f"=== {datetime.now().astimezone().isoformat(timespec='seconds')}: ")
            log.write(redact_urls(" ".join(argv)) + "\n")  # a URL's user and password never logged
            log.flush()
            process = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env={**env, self.marker.split("=", 1)[0]: self.marker.split("=", 1)[1]},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user(user),
            )
        self._children[process.pid] = process
        status = proc_status(process.pid)
        _write_atomically(self.state / f"{name}.start", f"{status[1] if status else ''}\n")
        _write_atomically(self.state / f"{name}.pid", f"{process.pid}\n")
        return process.pid

    def exited(self, pid: int) -> bool:
        """Whether the process ``pid`` is gone (a child of this process is reaped on the way)."""
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return True
        status = proc_status(pid)
        return status is None or status[0] == "Z"

    def _gone(self, name: str, pid: int) -> bool:
        self.exited(pid)  # reaps our own child, whose zombie would keep its group alive
        return not _group_alive(pid) and self.pid(name) is None

    def _wait_gone(self, pids: dict[str, int], since: float, until: float) -> dict[str, float]:
        """Seconds (from ``since``) after which each service and its group were gone, for those gone by ``until``."""
        took: dict[str, float] = {}
        while True:
            for name, pid in pids.items():
                if name not in took and self._gone(name, pid):
                    took[name] = time.monotonic() - since
            if len(took) == len(pids) or time.monotonic() >= until:
                return took
            time.sleep(POLL)

    def stop(self, policies: Iterable[StopPolicy]) -> list[str]:
        """Stops the services side by side: each gets its signal, then the longest grace of those stopped, then
        SIGKILL to what is left. One line per service it stopped; a stale record is only removed."""
        since = time.monotonic()
        targets: dict[str, int] = {}
        grace = 0.0
        for policy in policies:
            if not (self.state / f"{policy.name}.pid").exists():
                continue
            pid = self.pid(policy.name)
            if pid is None:
                self.forget(policy.name)
                continue
            _signal(pid, policy.signal, policy.whole_group)
            targets[policy.name] = pid
            grace = max(grace, policy.grace)
        took = self._wait_gone(targets, since, since + grace)
        killed = {name: pid for name, pid in targets.items() if name not in took}
        for pid in killed.values():
            _signal(pid, signal.SIGKILL, True)
        took |= self._wait_gone(killed, since, since + grace + KILL_EXTRA_WAIT)
        return [self._stopped_line(name, pid, took.get(name), name in killed, grace) for name, pid in targets.items()]

    def _stopped_line(self, name: str, pid: int, took: float | None, killed: bool, grace: float) -> str:
        if took is None:
            return f"{name} (pid {pid}) did NOT stop"
        self.forget(name)
        how = f", SIGKILL after {grace:g} s" if killed else ""
        return f"{name} (pid {pid}, stopped in {took:.1f} s{how})"

    def marked(self) -> list[int]:
        """Processes with the marker in their environment: what the stack started and their children, wherever they
        moved to another process group (this process excluded)."""
        wanted = self.marker.encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if wanted in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return sorted(found)

    def stop_marked(self, wait: float) -> list[int]:
        """SIGTERM to the marked leftovers, ``wait`` s for them to go, SIGKILL to the rest; their pids."""
        leftovers = self.marked()
        for pid in leftovers:
            _signal(pid, signal.SIGTERM, False)
        deadline = time.monotonic() + wait
        while self.marked() and time.monotonic() < deadline:
            time.sleep(POLL)
        for pid in self.marked():
            _signal(pid, signal.SIGKILL, False)
        if leftovers:
            time.sleep(POLL)
        return leftovers


def as_user(user: str | None) -> dict:
    """Popen's arguments that run a process as ``user`` with its groups (PostgreSQL refuses to run as root)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": os.getgrouplist(user, entry.pw_gid)}
