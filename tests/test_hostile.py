"""Hostile input: bounded memory and time, short errors, no credentials in messages (issue point 7)."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pathgen.settings import RetrySettings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]

# The 445-byte "billion laughs" of the issue, under `sources`: 9^8 strings once its aliases are expanded.
BOMB = "sources:\n" + "".join(
    f"  - &{name} [{','.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
)


def _run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Python in a child with 3 GiB of address space at most, so that a regression fails instead of swapping."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
    return subprocess.run(
        [sys.executable, "-c", limit + code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# -- settings bounds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("selection.max_per_slide", 10**30, "less than or equal to 100000"),
        ("patch.target_mpp", 0.000001, "greater than or equal to 0.05"),
        ("selection.seed", -1, "greater than or equal to 0"),
        ("agents.describe.seed", 2**40, "less than or equal to"),
        ("tissue.mask_downsample", 1e9, "less than or equal to 1024"),
        ("slides.mpp_overrides.a", 0.0, "greater than 0"),
        ("s3.read_timeout", 1e12, "less than or equal to 3600"),
    ],
)
def test_settings_are_bounded_to_sane_ranges(key, value, expected):
    with pytest.raises(SettingsError, match=expected) as err:
        load_settings(overrides={key: value}, environ={})
    assert key.split(".")[-1] in str(err.value)


def test_cli_refuses_an_absurd_setting_with_exit_2(capsys):
    from pathgen.cli import main

    assert main(["settings", "--set", f"selection.max_per_slide={10**30}"]) == 2
    err = capsys.readouterr().err
    assert "selection.max_per_slide" in err and "unexpected" not in err and len(err) < 400


def test_long_inputs_are_cut_in_settings_errors():
    with pytest.raises(SettingsError) as err:
        load_settings(overrides={"patch.patch_px": "9" * 1_000_000, "store": ["x" * 1000] * 1000}, environ={})
    message = str(err.value)
    assert "patch.patch_px" in message and "store" in message
    assert len(message) < 1200, len(message)
    with pytest.raises(SettingsError) as err:
        load_settings(overrides=["k" * 100_000 + "=1"], environ={})
    assert len(str(err.value)) < 800


# -- YAML without alias expansion ------------------------------------------------------------------------------


def test_the_alias_bomb_fails_fast_small_and_cheap(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert len(BOMB) < 450
    code = (
        "import resource, sys, time\n"
        "from pathgen.settings import SettingsError, load_settings\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    load_settings(sys.argv[1], environ={})\n"
        "    print('loaded')\n"
        "except SettingsError as exc:\n"
        "    print(exc)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(f'KB={grown} S={time.perf_counter() - start:.2f}', file=sys.stderr)\n"
    )
    child = _run_child(code, str(config))
    assert child.returncode == 0, child.stderr[-2000:]
    grown_kb, seconds = (float(part.split("=")[1]) for part in child.stderr.strip().splitlines()[-1].split())
    assert "alias *a" in child.stdout and str(config) in child.stdout and "write the value out" in child.stdout
    assert len(child.stdout) < 1000, len(child.stdout)
    assert grown_kb < 100 * 1024, grown_kb  # under 100 MB more than the interpreter with its imports
    assert seconds < 5, seconds


def test_aliases_are_refused_in_set_values_and_environment():
    bomb_value = "[" + ",".join(["*a"] * 9) + "]"
    with pytest.raises(SettingsError, match=r"sources.*alias \*a"):
        load_settings(overrides=[f"sources={bomb_value}"], environ={})
    with pytest.raises(SettingsError, match=r"alias \*a"):
        load_settings(environ={"PATHGEN_STORE": "&a [x, *a]"})
    # Anchors alone expand nothing and stay allowed.
    assert load_settings(overrides=["store=&s file://./other"], environ={}).store == "file://./other"


def test_an_oversized_config_file_is_refused_before_parsing(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("store: file://./store\n" + "# padding\n" * 200_000)
    with pytest.raises(SettingsError, match="big.yaml.*bytes"):
        load_settings(config, environ={})


# -- credentials in agents.openai_base_url ---------------------------------------------------------------------

SECRET = "s3cr3t-pass"


class _RefusingServer:
    """A /v1 server that answers 400 to every chat request (echoing the URL it was called at) and 404 to /models."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(404, {"error": "no"})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                host = self.headers["Host"]
                self._send(400, {"error": f"bad request for http://user:{SECRET}@{host}/v1"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def refusing_server():
    server = _RefusingServer()
    yield server
    server.httpd.shutdown()


def test_url_credentials_never_appear_in_backend_errors_or_replies(refusing_server):
    from agents.backends.openai_compat import OpenAIBackend
    from agents.identity import served_model
    from agents.protocol import ChatRequest, Sampling
    from pathgen.errors import BackendError

    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    request = ChatRequest(system="s", before_image="hello")
    good = f"http://user:{SECRET}@127.0.0.1:{refusing_server.port}/v1"
    replies = OpenAIBackend(good, "m", retries=0, backoff_seconds=0).generate([request], sampling)
    assert replies[0].error and "127.0.0.1" in replies[0].error and "***@" in replies[0].error
    assert SECRET not in replies[0].error  # the failed table's detail
    refused = "http://user:" + SECRET + "@127.0.0.1:9/v1"  # nothing listens on port 9
    with pytest.raises(BackendError) as err:
        OpenAIBackend(refused, "m", retries=0, backoff_seconds=0, timeout=2).generate([request], sampling)
    assert "***@127.0.0.1:9" in str(err.value) and SECRET not in str(err.value)
    for url in (good, refused):
        with pytest.raises(BackendError) as err:
            served_model(url, "m", 2.0, RetrySettings(io_retries=0, backoff_seconds=0))
        assert "***@127.0.0.1" in str(err.value) and SECRET not in str(err.value)


def test_redaction_helpers():
    from pathgen.errors import redact_urls, short_error, without_userinfo

    assert without_userinfo("https://user:pass@host:8000/v1") == "https://***@host:8000/v1"
    assert without_userinfo("http://gpu-node:8000/v1") == "http://gpu-node:8000/v1"
    text = "POST https://u:p@ss@h/v1/chat failed; see http://h/x?a=b@c"
    assert redact_urls(text) == "POST https://***@h/v1/chat failed; see http://h/x?a=b@c"
    assert SECRET not in short_error(ConnectionError(f"cannot reach https://me:{SECRET}@host/v1"))


# -- huge stripped TIFFs ---------------------------------------------------------------------------------------

STRIPPED_SIDE = 12_000  # 432 MB decoded; written sparse, so it costs almost no disk
READ_BUDGET_MB = 300  # what one slide's reader may add to the process, well under the image's decoded size

_READ_STRIPPED = """
import resource, sys
import numpy as np
from tasks.slides.readers import open_slide
path, side = sys.argv[1], int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open_slide(path, mpp_override=0.5) as reader:
    overview, downsample = reader.overview(32)
    boxes = [(0, 0, 672, 672), (5000, 6000, 672, 672), (side - 672, side - 672, 672, 672)]
    patches = list(reader.read_boxes(boxes, 0.5, 672))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(overview.shape[0], overview.shape[1], round(downsample, 3), int(patches[1][10, 10, 0]),
      int(patches[0][10, 10, 0]), int(overview[6000 // 32 + 2, 5000 // 32 + 2, 0]), grown // 1024)
"""


def test_a_huge_single_strip_tiff_is_read_in_bands_within_the_memory_budget(tmp_path):
    path = tmp_path / "stripped.tif"
    side = STRIPPED_SIDE
    tifffile.imwrite(path, shape=(side, side, 3), dtype=np.uint8, photometric="rgb", rowsperstrip=side)
    assert tifffile.TiffFile(path).pages[0].rowsperstrip == side  # one strip of the whole image
    pixels = tifffile.memmap(path)
    pixels[6000:6672, 5000:5672] = 7  # a dark square, found again in the patch and the overview
    pixels.flush()
    del pixels
    child = _run_child(_READ_STRIPPED, str(path), str(side), timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    height, width, downsample, inside, outside, overview_inside, grown_mb = map(float, child.stdout.split())
    assert (height, width, downsample) == (side / 32, side / 32, 32.0)
    assert (inside, outside, overview_inside) == (7, 0, 7)
    assert grown_mb < READ_BUDGET_MB, f"reading grew the process by {grown_mb:.0f} MB"


def test_a_stripped_tiff_whose_strip_is_over_budget_is_refused_with_the_fix(tmp_path, monkeypatch):
    from pathgen.errors import SlideError
    from tasks.slides.readers import open_slide, tiles

    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), photometric="rgb", rowsperstrip=512, compression="zlib")
    monkeypatch.setattr(tiles, "MAX_STRIP_BYTES", 256 * 1024)  # the 768 KiB strip stands for a multi-GB one
    with pytest.raises(SlideError) as err:
        open_slide(str(path), mpp_override=0.5)
    message = str(err.value)
    assert "one-strip.tif" in message and "512 x 512" in message and "tiled pyramidal TIFF" in message
    assert "vips tiffsave" in message


def test_small_compressed_strips_are_read_strip_by_strip(tmp_path):
    from tasks.slides.readers import open_slide

    data = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, data, photometric="rgb", rowsperstrip=64, compression="zlib")
    with open_slide(str(path), mpp_override=0.5) as slide:
        assert slide.info.fast_tiles
        assert (slide.read_level(0, 10, 50, 150, 200) == data[50:250, 10:160]).all()
        edge = slide.read_level(0, 190, 290, 20, 20)
        assert (edge[:10, :10] == data[290:, 190:]).all() and (edge[10:] == 255).all()


@pytest.mark.parametrize(
    "record",
    [
        {"wsi_id": "a", "position": [float("nan"), "3"], "caption": "x"},
        {"wsi_id": "a", "caption": "no position"},
        {"wsi_id": "a", "position": ["-5", "3"]},
        "not a record",
    ],
)
def test_a_malformed_pathgen_json_record_names_the_file_and_the_record(tmp_path, record):
    from pathgen.settings import load_settings
    from tasks.slides.sources import SourceError, resolve_sources

    good = {"wsi_id": "a", "position": ["10", "20"], "caption": "fine"}
    source = tmp_path / "pathgen.json"
    source.write_text(json.dumps([good, record]).replace("NaN", "NaN"))
    settings = load_settings(overrides={"slides.roots": [str(tmp_path)]}, environ={})
    with pytest.raises(SourceError) as caught:
        resolve_sources([str(source)], settings)
    message = str(caught.value)
    assert str(source) in message and "record 1" in message and "fix or remove that record" in message
    assert len(message) < 600


def test_credentials_in_a_url_setting_stay_out_of_flow_parameters(monkeypatch):
    """Prefect stores a flow run's parameters (and shows them in the UI): a URL with user-info goes to the
    environment of this process instead, where the settings still find it."""
    from pathgen.cli.args import credentials_to_environment

    monkeypatch.delenv("PATHGEN_AGENTS__OPENAI_BASE_URL", raising=False)
    url = "http://user:s3cret@127.0.0.1:9/v1"
    kept = credentials_to_environment({"agents.openai_base_url": url, "patch.patch_px": 224})
    assert kept == {"patch.patch_px": 224} and "s3cret" not in json.dumps(kept)
    import os

    assert load_settings(overrides=kept, environ=dict(os.environ)).agents.openai_base_url == url
    # Not monkeypatch.delenv: it would restore the URL this test set once the test ends (Settings() reads it).
    os.environ.pop("PATHGEN_AGENTS__OPENAI_BASE_URL")
