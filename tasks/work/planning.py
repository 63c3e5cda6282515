"""Planning a slide stage from the store: read what each slide has committed, a few slides at a time.

A plan only decides which slides can be skipped; every slide it cannot judge is left to its task, which reads it
again and reports it failed or pending. So one slide whose record cannot be read never stops the plan, and a store
that stops answering costs one round of retries, not one per slide: after the first infrastructure error the
remaining slides are left to their tasks unread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pathgen.errors import is_infrastructure, short_error

T = TypeVar("T")
PLAN_THREADS = 16  # slides whose records a plan reads at once: a remote store answers each read in a round trip


def read_committed(
    units: list[Any], read: Callable[[Any], T | None], unit_id: Callable[[Any], str], logger: logging.Logger
) -> list[T | None]:
    """``read(unit)`` for every unit, ``PLAN_THREADS`` at a time; None (to do) where it raised or was not tried."""
    outage = threading.Event()
    unread: list[str] = []

    def one(unit: Any) -> T | None:
        if outage.is_set():
            unread.append(unit_id(unit))
            return None
        try:
            return read(unit)
        except Exception as exc:  # noqa: BLE001 - the plan never decides a failure: the slide's task reads it again
            if is_infrastructure(exc):
                outage.set()
            logger.warning("%s: cannot be planned (%s); its task reads it again", unit_id(unit), short_error(exc))
            return None

    with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
        found = list(pool.map(one, units))
    if unread:
        logger.warning("the store did not answer while planning: %d more slides are left to their tasks", len(unread))
    return found
