"""`pathgen serve` in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run` installs when missing),
driven through the Chrome DevTools Protocol over a websocket (https://chromedevtools.github.io/devtools-protocol/:
Page.navigate, Runtime.evaluate, Input.dispatchMouseEvent, Page.captureScreenshot, Network.responseReceived; the
browser writes its port to ``<user-data-dir>/DevToolsActivePort``), against a real `pathgen serve` on 127.0.0.1.

The slide page of the shared CMU slide opens in OpenSeadragon, its DeepZoom tiles are fetched and drawn (the viewer's
part of the screenshot holds the slide's stain colours, not a blank), a click on a patch overlay opens the patch
page, whose review form saves a review into ``reviews/<agents_hash>/<slide_id>.parquet``. Screenshots go to the
test's folder and to /tmp/serve-screens/. Without chromium the test is skipped, except in CI (``CI`` set), where it
fails.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CMU

ROOT = Path(__file__).resolve().parents[1]
SCREENS = Path("/tmp/serve-screens")
AGENTS_HASH = "b0b0b0b0b0b0"
HOSTILE_CAPTION = "<b>bold?</b> <script>window.pwned = 1</script> epithelium"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    if os.environ.get("CI"):
        pytest.fail("CI: chromium is missing; .ci/run installs Debian's chromium package before `make test`", False)
    pytest.skip(
        "chromium is not installed (apt-get install chromium; .ci/run installs it in CI)", allow_module_level=True
    )


# -- the store: the CMU slide extracted, its patches captioned by a fixture shard ------------------------------------


def _extract(root: Path) -> str:
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    overrides = {"store": str(root), "patch.patch_px": 224, "selection.max_per_slide": 8}
    settings = load_settings(overrides=overrides, environ={})
    outcome = extract_slide(resolve_sources([str(CMU)], settings)[0], settings, Store(settings.store))
    assert outcome.status == "ok" and outcome.patches == 8, outcome
    return CMU.stem


def _caption(root: Path, slide_id: str) -> list[str]:
    """Pairs for the slide's selected patches, committed as the caption stage commits them; the captions are
    written here (no caption model runs in this test), marked random_weights like the tiny models' ones."""
    from tasks.captions.caption import SlideWork, commit_slide
    from tasks.captions.records import PATCH_FIELDS, patches_key
    from tasks.slides.shard import read_shard
    from tasks.store.objects import Store

    store = Store(str(root))
    with store.open(patches_key(slide_id)) as handle:
        table = read_shard(handle, columns=[f.name for f in PATCH_FIELDS])
    extraction_hash = table.schema.metadata[b"pathgen.extraction_hash"].decode()
    rows, pairs = table.to_pylist(), []
    now = dt.datetime.now(dt.UTC).isoformat()
    for n, row in enumerate(rows[1:]):  # the first patch stays uncaptioned: a failed item
        caption = HOSTILE_CAPTION if n == 0 else f"RANDOM WEIGHTS fixture caption {n}: glands in stroma"
        pairs.append(row | {
            "description": f"Glands and stroma, patch {n}.", "revised_description": f"Glands and fibrous stroma {n}.",
            "revise_changed": True, "revise_change": 0.25, "caption": caption, "caption_tokens": len(caption.split()),
            "caption_trimmed": False, "describe_model": "tiny-vlm", "revise_model": "tiny-lm",
            "summarize_model": "tiny-lm", "prompt_versions": json.dumps({"describe": "describe.v1"}),
            "sampling": json.dumps({"describe": {"temperature": 0.0}}), "agents_hash": AGENTS_HASH,
            "extraction_hash": extraction_hash, "random_weights": True, "factory_version": "test",
            "created_at": now,
        })  # fmt: skip
    failed = [{"patch_id": rows[0]["patch_id"], "slide_id": slide_id, "x": rows[0]["x"], "y": rows[0]["y"],
               "stage": "describe", "reason": "empty reply", "detail": "the model said nothing",
               "agents_hash": AGENTS_HASH, "created_at": now}]  # fmt: skip
    provenance = {"random_weights": True, "roles": {}}
    work = SlideWork(slide_id, extraction_hash, rows)
    assert commit_slide(store, work, pairs, failed, AGENTS_HASH, {"pathgen.provenance": json.dumps(provenance)}) == "ok"
    return [pair["patch_id"] for pair in pairs]


# -- the server ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Ask a process this test started to end; kill it when it does not within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _serve(store: Path, log: Path) -> Iterator[str]:
    port = _free_port()
    command = [sys.executable, "-m", "pathgen", "serve", "--store", str(store), "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen([*command, "--reviewer", "dr-browser"], cwd=ROOT, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/slides", timeout=5) as reply:
                if reply.status == 200:
                    break
            assert server.poll() is None, f"pathgen serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"pathgen serve did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base
    finally:
        _stop(server)


# -- the browser, through the DevTools protocol ----------------------------------------------------------------------


class Chromium:
    """One headless tab: commands by id, events kept in order of arrival."""

    def __init__(self, socket_url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(socket_url, max_size=64 * 2**20, open_timeout=20)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == number:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {expression}; page: {self.evaluate('location.href')}")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", f"load of {url}")

    def click(self, selector: str) -> None:
        """A real mouse click (OpenSeadragon listens to the pointer, not to click()) at a point of the element that no
        other element covers (patch overlays may overlap), the nearest such point to its centre."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); const r = e.getBoundingClientRect();"
            " const points = [];"
            " for (let i = 1; i < 8; i++) for (let j = 1; j < 8; j++) points.push([i / 8, j / 8]);"
            " points.sort((a, b) => Math.hypot(a[0] - .5, a[1] - .5) - Math.hypot(b[0] - .5, b[1] - .5));"
            " for (const [u, v] of points) { const x = r.left + u * r.width, y = r.top + v * r.height;"
            "   if (document.elementFromPoint(x, y) === e) return [x, y]; }"
            " return null; })()"
        )
        assert box, f"{selector} is covered everywhere: a click cannot reach it"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], **extra)

    def screenshot(self, path: Path) -> Image.Image:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENS / path.name)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def _chromium(profile: Path) -> Iterator[Chromium]:
    command = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
        "--remote-allow-origins=*", f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank",
    ]  # fmt: skip
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tab = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            pages = [t for t in json.load(reply) if t["type"] == "page"]
        tab = Chromium(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Network"):
            tab.send(f"{domain}.enable")
        yield tab
    finally:
        if tab is not None:
            tab.close()
        _stop(browser)


# -- the test --------------------------------------------------------------------------------------------------------


def _tile_responses(tab: Chromium) -> list[dict[str, Any]]:
    found = []
    for event in tab.events:
        if event["method"] == "Network.responseReceived":
            response = event["params"]["response"]
            if "/slide_files/" in response["url"]:
                found.append(response)
    return found


def _viewer_pixels(tab: Chromium, shot: Image.Image) -> np.ndarray:
    left, top, width, height = tab.evaluate(
        "(() => { const r = document.getElementById('viewer').getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height]; })()"
    )
    scale = shot.width / tab.evaluate("window.innerWidth")
    box = [round(v * scale) for v in (left, top, left + width, top + height)]
    return np.asarray(shot.crop(box), dtype=np.float32)


def test_a_pathologist_opens_the_slide_zooms_opens_a_patch_and_rejects_it(tmp_path):
    from tasks.reviews.store import review_history
    from tasks.store.objects import Store

    started = time.monotonic()
    store = tmp_path / "store"
    slide_id = _extract(store)
    captioned = _caption(store, slide_id)
    with _serve(store, tmp_path / "serve.log") as base, _chromium(tmp_path / "profile") as tab:
        tab.open(f"{base}/slides/{slide_id}")
        viewer = tab.wait_for("document.body.dataset.viewer", "the slide viewer to start")
        missing = tab.evaluate("(document.getElementById('viewer-missing') || {}).textContent")
        assert viewer == "open", f"the slide viewer is {viewer}: {missing or tab.evaluate('document.body.innerText')}"
        tab.wait_for("Number(document.body.dataset.tilesLoaded || 0) >= 1", "a DeepZoom tile to load")
        tab.wait_for("document.body.dataset.patches", "the patch overlays")
        tab.wait_for("document.body.dataset.outline", "the tissue outline")
        tab.wait_for("window.pathgenViewer.world.getItemAt(0).getFullyLoaded()", "every tile in view to load")
        tiles = _tile_responses(tab)
        assert tiles and all(t["status"] == 200 for t in tiles), tiles[:3]
        assert {t["mimeType"] for t in tiles} <= {"image/jpeg", "image/png"}
        page = tab.evaluate("document.body.innerText")
        assert "RANDOM WEIGHTS" in page and slide_id in page and "Legend" in page
        assert tab.evaluate("document.querySelectorAll('#viewer a.patch-overlay').length") == 8
        assert tab.evaluate("document.querySelectorAll('#viewer svg.tissue-outline polygon').length") >= 1
        shot = tab.screenshot(tmp_path / "slide-page.png")
        pixels = _viewer_pixels(tab, shot)
        # The drawn slide: its H&E colours vary across the viewer (a blank canvas is one colour), and many pixels
        # are stained, pink to purple: red above green.
        assert pixels.std() > 20, pixels.std()
        stained = (pixels[..., 0] - pixels[..., 1] > 25).mean()
        assert stained > 0.05, f"only {stained:.1%} of the viewer's pixels look stained"

        target = captioned[0]  # the patch whose caption holds HTML
        tab.click(f"#viewer a.patch-overlay[data-patch='{target}']")
        tab.wait_for(f"location.pathname === '/patches/{target}' && document.readyState === 'complete'", "the patch")
        tab.wait_for("document.getElementById('patch-image').naturalWidth > 0", "the patch image")
        assert tab.evaluate("document.getElementById('patch-image').naturalWidth") == 224
        assert tab.evaluate("document.getElementById('caption').textContent") == HOSTILE_CAPTION
        assert tab.evaluate("document.querySelector('#caption b, #caption script') === null && !window.pwned")
        page = tab.evaluate("document.body.innerText")
        assert "RANDOM WEIGHTS" in page and "CLIP tokens" in page and "empty reply" in page
        assert tab.evaluate("document.querySelectorAll('#revise-diff ins, #revise-diff del').length") >= 1

        tab.evaluate("document.getElementById('reason').value = 'other'")
        tab.evaluate("document.getElementById('details').value = 'markup in the caption'")
        tab.click("#reject")
        tab.wait_for("document.body.dataset.reviewSaved === 'reject'", "the review to be saved")
        status = tab.evaluate("document.getElementById('review-status').textContent")
        assert status.startswith("saved: reject by dr-browser"), status
        tab.screenshot(tmp_path / "patch-page.png")

    saved = review_history(Store(str(store)), AGENTS_HASH, slide_id)
    assert [(r.patch_id, r.verdict, r.reason, r.reviewer) for r in saved] == [
        (target, "reject", "other: markup in the caption", "dr-browser")
    ]
    assert time.monotonic() - started < 90
