"""One trainer per run: a lease on ``models/clip/<run>/lease.json`` in the store and a lock on the run's local folder.

Two trainers of one run would share its checkpoint folder and its checkpoints in the store: the second resumed
from the first's half-written ``epoch_N.pt``. So a trainer first locks the run's local folder (``flock``: released
by the kernel when its process dies, SIGKILL included), then takes the store's lease: it writes its own record,
waits a moment and reads the record back; the one whose record is there holds the run. The holder renews the
record every ``RENEW_SECONDS`` while it trains; a record not renewed for ``LEASE_SECONDS``, or one whose process on
this host is gone, is stale and taken over. The second trainer stops at once with a message naming the holder.
A holder that could not reach the store for longer than ``LEASE_SECONDS`` may find, once it can, that another
trainer took the run over: it then stops renewing, copies nothing more to the store, and its stage ends pending
(``LeaseLost``) instead of both trainers going on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.store.objects import Store, pid_alive

LEASE_SECONDS = 300.0  # a record older than this was left by a trainer that is gone
RENEW_SECONDS = 30.0
SETTLE_SECONDS = 1.0  # between writing our record and reading it back: a rival's write lands in between


class RunBusy(RuntimeError):
    """Another trainer holds the run: this one leaves it alone."""


class LeaseLost(RunBusy):
    """Another trainer took the run over while this one held it (after an outage longer than the lease)."""


class RunLease:
    def __init__(self, store: Store, run_prefix: str, local_folder: Path, logger: logging.Logger | None = None):
        self.store, self.key, self.folder = store, f"{run_prefix}/lease.json", local_folder
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.logger = logger or logging.getLogger("pathgen.clip")
        self.lost: str | None = None  # why this trainer no longer holds the run, once it has found out
        self._lock: Any = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._keep_renewing, name="clip-run-lease", daemon=True)

    def __enter__(self) -> RunLease:
        self._lock_folder()
        try:
            self._take()
        except BaseException:
            self._unlock_folder()
            raise
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._renewer.join()
        try:
            with contextlib.suppress(Exception):  # an outage at the end: the record goes stale by itself
                if (self._read() or {}).get("owner") == self.record["owner"]:
                    self.store.delete(self.key)
        finally:
            self._unlock_folder()

    def _lock_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = (self.folder / "trainer.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunBusy(
                f"{self.folder} is in use by another trainer of this run ({holder}); wait for it to finish, "
                "then run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._lock = handle

    def _unlock_folder(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _read(self) -> dict[str, Any] | None:
        if not self.store.exists(self.key):
            return None
        try:
            return self.store.read_json(self.key)
        except ValueError:  # a record cut short: nobody holds it
            return None

    def _take(self) -> None:
        held = self._read()
        if held and held.get("owner") != self.record["owner"] and not _stale(held):
            raise RunBusy(_busy_message(self.store.uri(self.key), held))
        self._write()
        time.sleep(SETTLE_SECONDS)
        now = self._read() or {}
        if now.get("owner") != self.record["owner"]:
            raise RunBusy(_busy_message(self.store.uri(self.key), now))

    def _keep_renewing(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self.renew()
            except LeaseLost:
                return  # renewing now would take the run back from its new holder
            except Exception:  # noqa: BLE001, S112 - an outage: renewed next round, stale only after LEASE_SECONDS
                continue

    def held(self) -> bool:
        return self.lost is None

    def ensure_held(self) -> None:
        """Raise ``LeaseLost`` when another trainer took the run over while this one trained."""
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def renew(self) -> None:
        """Write our record again with the time (every ``RENEW_SECONDS``, from this lease's own thread), once the
        record read back is still ours; another owner's record means the run was taken over: ``LeaseLost``."""
        if self.lost is None:
            now = self._read()
            if now is not None and now.get("owner") != self.record["owner"]:
                self.lost = _lost_message(self.store.uri(self.key), now)
                self.logger.error(self.lost)
        self.ensure_held()
        self._write()

    def _write(self) -> None:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.store.write_json(self.key, self.record | {"renewed_at": stamp, "renewed": time.time()})


def _stale(record: dict[str, Any]) -> bool:
    if time.time() - float(record.get("renewed", 0)) > LEASE_SECONDS:
        return True
    return record.get("host") == socket.gethostname() and not pid_alive(int(record.get("pid", 0)))


def _holder(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}, renewed {record.get('renewed_at')}"


def _lost_message(uri: str, record: dict[str, Any]) -> str:
    return (
        f"LEASE LOST: another trainer ({_holder(record)}) took this run over (lease {uri}), most likely after the "
        f"store could not be reached for more than {LEASE_SECONDS:.0f} s; this trainer stops renewing and copies "
        "nothing more to the store, and its stage stays pending. Run again once the other trainer has finished"
    )


def _busy_message(uri: str, record: dict[str, Any]) -> str:
    holder = _holder(record)
    return (
        f"this run is being trained by another trainer ({holder}; lease {uri}): two trainers of one run would "
        "share its checkpoints. Wait for it to finish, then run again (it resumes or skips what is done)"
    )
