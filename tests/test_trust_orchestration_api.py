"""A command whose Prefect API is lost mid-run (its server SIGKILLed) gives up within seconds, naming the API it lost
and the slides that stay pending, and says to run again; before, Prefect's client retried every request for about a
minute and the command needed minutes to end in a bare ``ConnectError``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from pathgen import local_api

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
SLIDES = 6
LOST_S = 4  # the test's watchdog setting, to keep it short; the default is checked below
EXIT_WITHIN_S = 30  # what the issue asks of a command after its API is gone


def test_the_default_gives_up_within_about_30_s(monkeypatch):
    monkeypatch.delenv(local_api.LOST_ENV, raising=False)
    assert local_api.lost_seconds() + 2 * local_api.PROBE_S <= EXIT_WITHIN_S
    monkeypatch.setenv(local_api.LOST_ENV, "soon")
    with pytest.raises(local_api.LocalApiError, match="PATHGEN_API_LOST_S=.soon. is not a number"):
        local_api.lost_seconds()


def test_the_message_names_the_api_without_credentials_and_what_to_do():
    message = local_api.lost_api_message("https://user:secret@prefect.example:4200/api", "no answer", False)
    assert "secret" not in message and "user" not in message
    assert "https://prefect.example:4200/api" in message and "run the command again" in message.lower()


def test_a_refused_connection_is_unreachable_and_an_http_error_is_not(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "refused" in local_api.unreachable(f"http://127.0.0.1:{port}/api").lower()

    def http_error(*args, **kwargs):
        raise urllib.error.HTTPError("http://x/api/health", 401, "unauthorised", {}, None)

    monkeypatch.setattr("urllib.request.urlopen", http_error)
    assert local_api.unreachable("http://x/api") is None  # it answered: it is there


@pytest.mark.timeout(240)
def test_a_killed_api_server_ends_the_command_in_seconds_naming_it_and_the_pending_slides(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for index in range(SLIDES):  # copies, not links: a link to the same file is the same slide
        shutil.copy(SLIDE, slides / f"CMU-copy-{index}.svs")
    store, home = tmp_path / "store", tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATHGEN_LOCAL_API_IDLE_S="5",
        PATHGEN_API_LOST_S=str(LOST_S),
    )
    command = [sys.executable, "-m", "pathgen", "extract", str(slides), "--store", str(store), "--threads"]
    for setting in ("extract.concurrency=1", "selection.method=random", "selection.max_per_slide=2"):
        command += ["--set", setting]
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not list(store.glob("slides/*/slide.json")):  # mid-run: the first slide is committed
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no slide committed within 180 s"
            time.sleep(0.05)
        record = json.loads(next(home.glob("pathgen-api/*/server.json")).read_text())
        os.kill(record["pid"], signal.SIGKILL)
        killed = time.monotonic()
        try:
            out, err = process.communicate(timeout=EXIT_WITHIN_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command still ran {EXIT_WITHIN_S + 30} s after its Prefect API was killed")
        took = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err[-3000:]
    assert took <= EXIT_WITHIN_S, f"{took:.0f} s"
    said = err[err.index("pathgen extract: lost the Prefect API") :]
    assert record["url"] in said and "run the command again" in said.lower()
    named = set(re.findall(r"CMU-copy-\d+", said))
    committed = {p.parent.name for p in store.glob("slides/*/slide.json")}
    assert named, said  # slides were still in flight when the API went
    assert {f"CMU-copy-{i}" for i in range(SLIDES)} - committed <= named  # every slide not committed is named


def test_a_connection_error_after_the_api_went_is_told_as_a_lost_api():
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    # The watchdog off: Prefect's error ends the block.
    with pytest.raises(httpx.ConnectError) as caught, local_api.watching(url, 0, started_here=True):
        raise httpx.ConnectError("[Errno 111] Connection refused")
    told = local_api.lost_api_explanation(caught.value)
    assert told and url in told and "run the command again" in told.lower()
    assert local_api.lost_api_explanation(httpx.ConnectError("another one")) is None  # only the error that ended it


WATCHED = """
import sys, time
from pathgen import local_api
local_api.PROBE_S = local_api.PROBE_TIMEOUT_S = 0.2  # probe often, each waiting briefly for its answer
with local_api.watching(sys.argv[1], float(sys.argv[2]), started_here=True):
    time.sleep(float(sys.argv[3]))
print("the command went on")
"""


def _watched_command(url: str, lost_s: float, runs_s: float) -> subprocess.Popen:
    """A command that runs ``runs_s`` seconds under the watchdog of ``url`` (whose os._exit needs its own process)."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHED, url, str(lost_s), str(runs_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_slow_api_is_not_lost_but_a_refused_one_is():
    """A server that accepts connections and never answers (a CPU-starved server, a locked database) is not lost
    after PATHGEN_API_LOST_S; a port nobody listens on is, within about that time."""
    import socket
    import threading

    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        held = []  # accepted and never answered
        threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(1000)], daemon=True).start()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        slow = _watched_command(f"http://127.0.0.1:{silent.getsockname()[1]}/api", 0.5, 4.0)
        refused = _watched_command(f"http://127.0.0.1:{closed.getsockname()[1]}/api", 0.5, 30.0)
        started = time.monotonic()
        refused_out, refused_err = refused.communicate(timeout=60)
        refused_took = time.monotonic() - started
        slow_out, slow_err = slow.communicate(timeout=60)
        for connection, _ in held:
            connection.close()
    assert held, "the slow server was never asked"
    assert slow.returncode == 0 and "the command went on" in slow_out, slow_err
    assert refused.returncode == local_api.EXIT_API_LOST and "lost the Prefect API" in refused_err, refused_err
    assert "refused" in refused_err.lower() and refused_took < 15, (refused_took, refused_err)


def test_the_lost_clock_tolerates_timeouts_far_longer_than_refusals_and_any_answer_resets_it():
    clock = local_api.LostClock(lost_s=20, slow_s=300, now=0)
    assert clock.lost(False, "timed out", 100) is None  # there, but slow: far past lost_s
    assert clock.lost(True, "Connection refused", 110) is None
    assert "nobody answered for 20 s" in clock.lost(True, "Connection refused", 130)
    clock = local_api.LostClock(lost_s=20, slow_s=300, now=0)
    assert clock.lost(True, "Connection refused", 10) is None
    assert clock.lost(False, None, 25) is None  # an answer (any HTTP status) resets the refusals
    assert clock.lost(True, "Connection refused", 30) is None
    assert clock.lost(False, "timed out", 290) is None
    assert "no answer for 300 s" in clock.lost(False, "timed out", 330)  # 300 s after the last answer
    assert local_api.SLOW_LOST_S >= 10 * local_api.DEFAULT_LOST_S


def test_both_seconds_settings_are_parsed_alike(monkeypatch):
    monkeypatch.setenv(local_api.IDLE_ENV, "-1")
    with pytest.raises(local_api.LocalApiError, match=f"{local_api.IDLE_ENV}='-1' is not a number of seconds"):
        local_api.idle_seconds()
    monkeypatch.setenv(local_api.IDLE_ENV, " 7 ")
    monkeypatch.setenv(local_api.LOST_ENV, "")
    assert (local_api.idle_seconds(), local_api.lost_seconds()) == (7.0, local_api.DEFAULT_LOST_S)
