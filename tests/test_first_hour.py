"""The first hour's errors: one sentence with the cause and the fix, before any flow starts, and tracebacks only
with ``--debug``."""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pathgen.cli.app as cli
import pathgen.cli.inspect as inspect_module
from pathgen.cli.export import out_problem
from pathgen.cli.runs import source_problem

from .conftest import CMU

# A Prefect API nobody listens on: a command that reached Prefect would fail slowly or differently.
DEAD_API = "http://127.0.0.1:9/api"


def _pathgen(args, cwd, timeout=120):
    env = dict(os.environ, PREFECT_API_URL=DEAD_API, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pathgen", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return run, time.monotonic() - started


def _one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


# -- extract: a missing local SOURCE is a usage error before Prefect starts ----------------------------------------


@pytest.mark.parametrize("spec", ["missing.svs", "file://{tmp}/missing.svs", "{tmp}/no-folder", "{tmp}/manifest.txt"])
def test_extract_of_a_missing_path_says_so_at_once_and_writes_nothing(tmp_path, spec):
    spec = spec.format(tmp=tmp_path)
    run, seconds = _pathgen(["extract", spec, "--store", str(tmp_path / "store")], tmp_path)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert _one_line(run.stderr) == (
        f"pathgen extract: {spec} does not exist; give a slide file, a folder, a glob, an s3:// URL, "
        "a GDC manifest or a PathGen JSON file"
    )
    assert seconds < 5, f"{seconds:.1f} s: Prefect was started for a missing path"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store folder, no record


def test_extract_stops_on_the_missing_path_among_existing_ones_with_the_default_store(tmp_path):
    run, seconds = _pathgen(["extract", str(CMU), str(tmp_path / "typo.svs")], tmp_path)
    assert run.returncode == 2 and seconds < 5, run.stderr[-2000:]
    assert f"{tmp_path / 'typo.svs'} does not exist" in _one_line(run.stderr)
    assert not (tmp_path / "store").exists()  # the default store, file://./store, is not made either


def test_extract_of_a_glob_matching_no_slide_says_so_at_once(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "notes.md").write_text("not a slide")
    pattern = str(tmp_path / "slides" / "*.svs")
    run, seconds = _pathgen(["extract", pattern, "--store", str(tmp_path / "store")], tmp_path)
    assert run.returncode == 2 and seconds < 5, run.stdout[-2000:] + run.stderr[-2000:]
    line = _one_line(run.stderr)
    assert line.startswith(f"pathgen extract: the glob {pattern} matches no slide file; check the pattern")
    assert not (tmp_path / "store").exists()


def test_sources_that_exist_or_are_remote_pass_the_check(tmp_path):
    assert source_problem(str(CMU)) is None
    assert source_problem(f"file://{CMU}") is None
    assert source_problem(str(CMU.parent)) is None
    assert source_problem(str(CMU.parent / "*.svs")) is None
    assert source_problem("s3://bucket/slides/") is None  # whether it reads is the flow's to find out
    assert "does not exist" in source_problem(str(tmp_path / "x.svs"))


# -- export: --out into a missing folder ------------------------------------------------------------------------


def _store_with_pairs(tmp_path):
    store = tmp_path / "store"
    (store / "pairs" / "abc123").mkdir(parents=True)
    table = pa.table({"slide_id": ["s1"], "x": [0], "y": [672], "caption": ["Tumour cells in sheets."]})
    pq.write_table(table, store / "pairs" / "abc123" / "s1.parquet")
    return store


def test_export_pathgen_json_into_a_missing_folder_is_one_sentence(tmp_path):
    store = _store_with_pairs(tmp_path)
    out = tmp_path / "exports" / "pairs.json"
    run, _ = _pathgen(["export", "pathgen-json", "--store", str(store), "--out", str(out)], tmp_path)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert _one_line(run.stderr) == (
        f"pathgen export: folder {tmp_path / 'exports'} does not exist; create it or choose another --out"
    )
    assert not (tmp_path / "exports").exists()

    (tmp_path / "exports").mkdir()  # the fix the sentence names works
    done, _ = _pathgen(["export", "pathgen-json", "--store", str(store), "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())[0]["wsi_id"] == "s1"


def test_export_out_checks_by_format(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert out_problem("webdataset", str(tmp_path / "new" / "tars")) is None  # a folder: made when missing
    assert "is a file" in out_problem("webdataset", str(tmp_path / "a-file"))
    assert "is a folder" in out_problem("pathgen-json", str(tmp_path))
    assert out_problem("pathgen-json", str(tmp_path / "pairs.json")) is None


# -- inspect: corrupt shards and files that are not stores ------------------------------------------------------


def test_inspect_of_a_corrupt_parquet_names_the_file(tmp_path):
    shard = tmp_path / "x.parquet"
    shard.write_bytes(b"PAR1 this is not parquet at all" * 3)
    run, _ = _pathgen(["inspect", str(shard), "--out", str(tmp_path / "sheet.png")], tmp_path)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    line = _one_line(run.stderr)
    assert line.startswith(f"pathgen inspect: file://{shard} is not a Parquet file (")
    assert line.endswith("); it may be truncated: re-run the stage that wrote it")


def test_inspect_of_a_store_with_a_truncated_shard_names_the_shard_and_the_stage(tmp_path):
    patches = tmp_path / "store" / "patches"
    patches.mkdir(parents=True)
    pq.write_table(pa.table({"slide_id": ["s1"]}), patches / "s1.parquet")
    data = (patches / "s1.parquet").read_bytes()
    (patches / "s1.parquet").write_bytes(data[: len(data) // 2])
    run, _ = _pathgen(["inspect", str(tmp_path / "store"), "--out", str(tmp_path / "sheet.png")], tmp_path)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    line = _one_line(run.stderr)
    assert f"file://{patches / 's1.parquet'} is not a Parquet file" in line
    assert line.endswith("re-run the stage that wrote it (pathgen extract)")


def test_inspect_of_a_text_file_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes\n")
    run, _ = _pathgen(["inspect", "notes.txt"], tmp_path)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "notes.txt is a file, not a store folder or a .parquet shard" in _one_line(run.stderr)
    assert "store" not in run.stdout and not (tmp_path / "contact-sheet.png").exists()


# -- unexpected errors: one line, the traceback with --debug ----------------------------------------------------


@pytest.fixture
def failing_inspect(monkeypatch):
    monkeypatch.setattr(cli, "bound_threads", lambda: None)  # keep this process's thread settings

    def fails(url, **kwargs):
        raise RuntimeError("the disk\nwent away " + "x" * 2000)

    monkeypatch.setattr(inspect_module, "inspect_url", fails)


def test_an_unexpected_error_is_one_line_without_debug(failing_inspect, capsys):
    assert cli.main(["inspect", "somewhere"]) == 1
    err = capsys.readouterr().err
    line = _one_line(err)
    assert line.startswith("pathgen inspect: RuntimeError: the disk went away xxx")
    assert line.endswith("(run with --debug for the traceback)")
    assert "characters cut" in line and len(line) < 500


@pytest.mark.parametrize("argv", [["--debug", "inspect", "somewhere"], ["inspect", "somewhere", "--debug"]])
def test_debug_shows_the_traceback(failing_inspect, argv):
    with pytest.raises(RuntimeError, match="the disk"):
        cli.main(argv)


def test_debug_after_the_subcommand_does_not_hide_the_global_one():
    args = cli.parser().parse_args(["--debug", "settings"])
    assert args.debug is True
    assert cli.parser().parse_args(["settings"]).debug is False
