"""What a new user and a reviewer meet: a named CLIP architecture trained as named, evaluation of a checkpoint trained
from random weights saying so, the trainer's model dump kept out of the terminal, reports that group failures by a
reason code and show one whole message, a report that reads shard footers, the contact sheet in the store, and the
local stack's environment and tiny-model profile."""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pathgen.settings import load_settings
from tasks.store.objects import Store

from . import kather

ROOT = Path(__file__).resolve().parents[1]
KATHER = str(kather.KATHER.resolve())


def _is_red(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(int)
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)


def _clip_settings(root: Path, **changes):
    data = kather.build(root / "kather", views_per_tile=1)  # 16 pairs, one view of two tiles per class
    base = {
        "store": str(root / "store"),
        "clip.work_dir": str(root / "work"),
        "clip.stage1.folder": str(data["folder"]),
        "clip.stage1.captions": str(data["captions"]),
        "clip.batch_size": 4,
        "clip.workers": 0,
    }
    return load_settings(overrides=base | changes, environ={})


# -- point 5: clip.model without clip.pretrained trains that architecture, from random weights --------------------


def test_clip_model_without_pretrained_trains_that_architecture_from_random_weights(tmp_path):
    from tasks.clip.spec import TINY_RANDOM, ModelSpec
    from tasks.clip.stages import data_digest, export_set, run_name, stage_plan, start_spec, write_run_record
    from tasks.clip.train import trainer_args
    from tasks.models import random_weight_models

    settings = _clip_settings(tmp_path, **{"clip.model": "ViT-B-16"})
    spec = start_spec(settings.clip)
    assert (spec.name, spec.pretrained, spec.random_weights) == ("ViT-B-16", None, True)
    store = Store(settings.store)
    export = export_set(store, settings.clip.stage1, settings)
    plan = stage_plan(settings, "run", "stage1", Path(export.out), spec, logging.getLogger("test"))
    args = trainer_args(plan)
    assert args[args.index("--model") + 1] == "ViT-B-16" and "--pretrained" not in args  # random initialisation
    assert plan.random_start
    assert random_weight_models(settings, ["train-clip"]) == [
        "clip.pretrained is unset: training would start ViT-B-16 from random"
    ]
    write_run_record(store, "run", settings.clip, [], [])
    record = store.read_json("models/clip/run/run.json")
    assert (record["model"], record["random_weights"]) == ("ViT-B-16", True)
    digest = [data_digest(Path(export.out))]
    tiny = _clip_settings(tmp_path / "again")
    assert start_spec(tiny.clip) == ModelSpec(TINY_RANDOM)  # neither set: the tiny model
    assert run_name(tiny.clip, digest) != run_name(settings.clip, digest)  # another model, another run
    pretrained = _clip_settings(tmp_path / "third", **{"clip.pretrained": "openai"})
    # a tag alone loads into ViT-B-16; OpenAI's, trained with QuickGELU, into its QuickGELU twin
    assert start_spec(pretrained.clip) == ModelSpec("ViT-B-16-quickgelu", "openai")


# -- points 21 and 24: a checkpoint trained from random weights, and what the trainer prints -----------------------


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """One stage of the tiny model trained from random weights into a file store (16 pairs, one epoch), with what
    a console handler on the root logger (as Prefect's) showed while the trainer ran."""
    from tasks.clip.stages import (
        data_digest,
        export_set,
        run_name,
        stage_plan,
        start_spec,
        train_stage,
        write_run_record,
    )

    root = tmp_path_factory.mktemp("random-run")
    settings = _clip_settings(root)
    store = Store(settings.store)
    export = export_set(store, settings.clip.stage1, settings)
    run = run_name(settings.clip, [data_digest(Path(export.out))])
    logger = logging.getLogger("test.random_run")
    terminal = io.StringIO()
    console, root_logger = logging.StreamHandler(terminal), logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(console)
    root_logger.setLevel(logging.WARNING)
    try:
        plan = stage_plan(settings, run, "stage1", Path(export.out), start_spec(settings.clip), logger)
        result = train_stage(plan, store, logger, mirror_seconds=600)
    finally:
        root_logger.removeHandler(console)
        root_logger.setLevel(level)
    write_run_record(store, run, settings.clip, [result.row() | {"status": "ok"}], [])
    return SimpleNamespace(
        store=root / "store", run=run, plan=plan, plan_settings=settings, result=result, terminal=terminal.getvalue()
    )


def test_the_trainers_model_dump_goes_to_out_log_and_its_progress_to_the_terminal(random_run):
    out_log = (random_run.plan.stage_dir / "out.log").read_text()
    assert "Params:" in out_log and "VisionTransformer(" in out_log and "  batch_size: 4" in out_log
    shown = random_run.terminal
    assert "Params:" not in shown and "VisionTransformer(" not in shown and "batch_size: 4" not in shown, shown
    assert "Start epoch 0" in shown and "Train Epoch: 0" in shown  # progress still shows
    assert "trains tiny-random from RANDOM WEIGHTS" in shown
    assert len(shown.splitlines()) < 20, shown


def test_under_torchrun_the_trainers_console_shows_its_progress_and_not_its_model_dump(tmp_path):
    """tasks.clip.trainer_entry (what torchrun starts) sets up open_clip's logging with the same filter."""
    script = """
import logging, sys
import open_clip_train.main as trainer
from tasks.clip.trainer_entry import _progress_on_the_terminal
_progress_on_the_terminal(trainer)
trainer.setup_logging(sys.argv[1], logging.INFO)
for line in ("Model:", "CLIP(", "Params:", "  batch_size: 4", "Start epoch 0", "Train Epoch: 0 [4/16 (25%)]"):
    logging.info(line)
logging.warning("No pretrained weights loaded")
"""
    log = tmp_path / "out.log"
    command = [sys.executable, "-c", script, str(log)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Params:" in log.read_text() and "  batch_size: 4" in log.read_text()
    assert "Params:" not in done.stderr and "CLIP(" not in done.stderr and "batch_size" not in done.stderr
    assert "Start epoch 0" in done.stderr and "Train Epoch: 0" in done.stderr and "No pretrained" in done.stderr


def test_trained_from_random_follows_run_json_and_the_trainers_params(tmp_path):
    from tasks.clip.spec import trained_from_random

    def stage(run: str, name: str, params: str) -> str:
        folder = tmp_path / run / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "params.txt").write_text(params)
        return str(folder / "checkpoints" / "epoch_1.pt")

    first = stage("a", "stage1", "model: tiny-random\npretrained: \n")
    second = stage("a", "stage2", f"model: tiny-random\npretrained: {first}\n")
    baseline = stage("b", "stage1", "model: ViT-B-16\npretrained: openai\n")
    assert trained_from_random(first) and trained_from_random(second)  # stage 2 goes on from stage 1
    assert not trained_from_random(baseline) and not trained_from_random("openai")
    assert not trained_from_random(str(tmp_path / "elsewhere" / "model.pt"))  # not a run's checkpoint
    (tmp_path / "b" / "run.json").write_text(json.dumps({"random_weights": True}))
    assert trained_from_random(baseline)  # the run's record decides


def test_the_confusion_picture_of_such_a_checkpoint_has_the_band_and_the_accuracy(random_run, monkeypatch):
    import tasks.clip.evaluate as evaluate_module
    from pathgen.settings import EvalSettings
    from tasks.clip.spec import parse_model_spec
    from tasks.selection.embedding import load_clip_model

    checkpoint = Store(str(random_run.store)).uri(f"models/clip/{random_run.run}/stage1/checkpoints/epoch_1.pt")
    model = load_clip_model(parse_model_spec(checkpoint))
    assert model.random_weights is True  # weights were loaded, but they descend from random initialisation
    result = evaluate_module.evaluate(model, Path(KATHER), kather.CLASSES, EvalSettings())
    assert result["random_weights"] is True and result["model"]["random_weights"] is True
    titles = []
    real = evaluate_module.confusion_png
    monkeypatch.setattr(evaluate_module, "confusion_png", lambda *a: titles.append(a[3]) or real(*a))
    evaluate_module.publish(Store(str(random_run.store)), "picture", result)
    zero = result["zero_shot"]
    assert f"accuracy {zero['accuracy']:.3f}" in titles[0] and f"balanced {zero['balanced_accuracy']:.3f}" in titles[0]
    picture = np.asarray(Image.open(random_run.store / "eval" / "picture" / "kather2016-samples-confusion.png"))
    assert _is_red(picture[:10, :, :3]).mean() > 0.6  # the RANDOM WEIGHTS band on top


def test_a_run_that_starts_from_a_checkpoint_trained_from_random_records_random_weights(random_run):
    """Fine-tuning a descendant of random weights is still random weights: run.json and the plan say so."""
    from tasks.clip.stages import start_spec, write_run_record

    store = Store(str(random_run.store))
    checkpoint = store.uri(f"models/clip/{random_run.run}/stage1/checkpoints/epoch_1.pt")
    clip = random_run.plan_settings.clip.model_copy(update={"model": "tiny-random", "pretrained": checkpoint})
    assert start_spec(clip).random_weights is False  # weights are loaded from the checkpoint...
    write_run_record(store, "follow-up", clip, [], [])
    assert store.read_json("models/clip/follow-up/run.json")["random_weights"] is True  # ...random ones


@pytest.mark.prefect
def test_pathgen_evaluate_of_a_checkpoint_trained_from_random_weights_says_so(random_run, prefect_api, tmp_path):
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    command = [sys.executable, "-m", "pathgen", "evaluate", "--dataset", KATHER, "--classes", str(kather.CLASSES),
               "--store", str(random_run.store), "--set", f"clip.work_dir={tmp_path / 'work'}"]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{random_run.run}-stage1" in done.stdout and "accuracy=" in done.stdout  # the store's newest checkpoint
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RANDOM WEIGHTS")]
    assert "its training run started from random initialisation" in line
    result = json.loads(
        (random_run.store / "eval" / f"{random_run.run}-stage1" / "kather2016-samples.json").read_text()
    )
    assert result["random_weights"] is True and result["model"]["random_weights"] is True


# -- point 22: failures grouped by a reason code, one whole message each; the median of extracted slides ----------

BRIGHTNESS = (
    "no bright-field tissue found: the slide's background is dark (brightness {}/255) and only 2% of it has H&E or "
    "IHC stain colours, as in a fluorescence or dark-field scan; PathGen extracts bright-field (H&E) slides only, so "
    "leave this slide out (or lower tissue.min_background_value if it is bright-field)"
)
DOWNLOAD = (
    "unexpected RuntimeError (Failed to download weights for tag 'openai' from vit_large_patch14_clip_336.openai "
    "on the hub); report it with this slide attached"
)


def _slide(store: Store, slide_id: str, status: str, seconds: float, error: str | None = None) -> None:
    record = {"slide_id": slide_id, "status": status, "error": error, "seconds": {"total": seconds}}
    record["counts"] = {"kept": 3 if status == "ok" else 0}
    store.write_json(f"slides/{slide_id}/slide.json", record)


def test_the_report_groups_failures_by_reason_code_with_one_whole_message_and_times_extracted_slides(tmp_path):
    from tasks.report import store_report, text

    store = Store(str(tmp_path / "store"))
    _slide(store, "ok-1", "ok", 10.0)
    _slide(store, "ok-2", "ok", 12.0)
    _slide(store, "dark-1", "failed", 90.0, BRIGHTNESS.format(40))
    _slide(store, "dark-2", "failed", 95.0, BRIGHTNESS.format(61))
    _slide(store, "hub-1", "failed", 99.0, DOWNLOAD)
    report = store_report(store)
    failures = report["slides"]["failures"]
    assert sorted(failures) == ["no bright-field tissue found", "unexpected RuntimeError"]
    assert failures["no bright-field tissue found"]["slides"] == ["dark-1", "dark-2"]
    shown = text(report)
    assert BRIGHTNESS.format(40) in shown and DOWNLOAD in shown  # digits, names and the fix, whole
    assert "N/N" not in shown and "patchN" not in shown
    assert "failed x2, no bright-field tissue found: dark-1, dark-2" in shown
    assert report["slides"]["median_seconds_per_slide"] == 11.0  # the failed slides' seconds left out


# -- point 17: the report reads the pair and instruct shards' footers, not their rows ----------------------------


def _unreadable_rows(path: Path) -> None:
    """Zero every byte between the leading magic and the footer: the footer still answers, the rows cannot."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4 : len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(bytes(data))


def test_the_report_counts_pairs_and_conversations_from_shard_footers(tmp_path):
    from tasks.report import store_report, text

    root = tmp_path / "store"
    images = [bytes([i]) * 20_000 for i in range(6)]  # the pairs' JPEG bytes, which the report never needs
    for folder, random in (("pairs/aaaa", [False] * 5 + [True]), ("pairs/bbbb", [False] * 6)):
        (root / folder).mkdir(parents=True)
        table = pa.table({"patch_id": [f"p{i}" for i in range(6)], "image": images, "random_weights": random})
        pq.write_table(table, root / folder / "slide-1.parquet", row_group_size=2)
        _unreadable_rows(root / folder / "slide-1.parquet")
    (root / "instruct" / "cccc").mkdir(parents=True)
    pq.write_table(pa.table({"patch_id": ["p0", "p1", "p2"]}), root / "instruct" / "cccc" / "slide-1.parquet")
    _unreadable_rows(root / "instruct" / "cccc" / "slide-1.parquet")
    (root / "failed" / "aaaa").mkdir(parents=True)
    reply = "The reply ran past 77 CLIP tokens at every sentence and word prefix of caption 3 of 4"
    failed = {"stage": ["summarize"], "reason": ["over-long"], "detail": [reply]}
    pq.write_table(pa.table(failed), root / "failed" / "aaaa" / "slide-1.parquet")
    report = store_report(Store(str(root)))
    pairs = {p["agents_hash"]: p for p in report["pairs"]}
    assert (pairs["aaaa"]["pairs"], pairs["aaaa"]["random_weights"]) == (6, True)
    assert (pairs["bbbb"]["pairs"], pairs["bbbb"]["random_weights"]) == (6, False)
    assert report["instruct"][0]["conversations"] == 3
    assert pairs["aaaa"]["failures"] == {"summarize:over-long": {"count": 1, "example": reply}}
    assert f"failed x1, summarize:over-long\n    for example: {reply}" in text(report)


def test_a_shard_without_column_statistics_is_read_for_its_flag(tmp_path):
    from tasks.report import store_report

    folder = tmp_path / "store" / "pairs" / "dddd"
    folder.mkdir(parents=True)
    table = pa.table({"patch_id": ["p0", "p1"], "random_weights": [False, True]})
    pq.write_table(table, folder / "slide-1.parquet", write_statistics=False)
    assert store_report(Store(str(tmp_path / "store")))["pairs"][0]["random_weights"] is True


def test_the_report_shows_the_probe_of_evaluations_written_before_the_headline(tmp_path):
    from tasks.report import store_report

    store = Store(str(tmp_path / "store"))
    store.write_json("eval/new/kather.json", {"linear_probe": {"headline": {"balanced_accuracy": 0.9}}})
    store.write_json("eval/old/kather.json", {"linear_probe": {"full": {"balanced_accuracy": 0.8}}})
    shown = {e["eval"]: e["headline"] for e in store_report(store)["evaluations"]}
    assert shown == {"new": {"linear_probe_balanced_accuracy": 0.9}, "old": {"linear_probe_balanced_accuracy": 0.8}}


# -- point 23: the contact sheet goes into the store's reports/ ---------------------------------------------------


def test_inspect_writes_the_contact_sheet_under_the_stores_reports_and_says_where(
    extracted_store, tmp_path, monkeypatch, capsys
):
    import pathgen.cli.app as cli

    store = tmp_path / "store"
    shutil.copytree(extracted_store, store)
    monkeypatch.setattr(cli, "bound_threads", lambda: None)  # keep this process's thread settings
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", str(store), "--samples", "4"]) == 0
    sheet = store / "reports" / "contact-sheet.png"
    assert sheet.is_file() and not (tmp_path / "contact-sheet.png").exists()
    assert (
        f"contact sheet of 4 patches: {Store(str(store)).uri('reports/contact-sheet.png')}" in capsys.readouterr().out
    )
    sheet.unlink()
    (pairs := store / "pairs" / "abcd").mkdir(parents=True)
    shard = pairs / "CMU-1-Small-Region.parquet"
    shutil.copy(next((store / "patches").glob("*.parquet")), shard)
    assert cli.main(["inspect", str(shard), "--samples", "2"]) == 0  # a pair shard: the store that holds it
    assert sheet.is_file() and not (pairs / "reports").exists()
    given = tmp_path / "mine.png"
    assert cli.main(["inspect", str(store), "--samples", "2", "--out", str(given)]) == 0
    assert given.is_file() and f"contact sheet of 2 patches: {given}" in capsys.readouterr().out


def test_inspect_of_a_read_only_store_says_to_pass_out(extracted_store, tmp_path, monkeypatch, capsys):
    """Everything is printed first; the sheet, which cannot go into the store, is one clear line and exit 1."""
    import errno

    import pathgen.cli.app as cli

    def read_only(self, key):
        raise OSError(errno.EROFS, "Read-only file system", self.path(key))

    monkeypatch.setattr(Store, "staged_file", read_only)  # the tests run as root: chmod would not stop a write
    monkeypatch.setattr(cli, "bound_threads", lambda: None)
    assert cli.main(["inspect", str(extracted_store), "--samples", "2"]) == 1
    captured = capsys.readouterr()
    assert "shard(s):" in captured.out  # the listing came before
    assert "contact sheet cannot be written to" in captured.err and "Read-only file system" in captured.err
    assert "pass --out FILE" in captured.err
    given = tmp_path / "sheet.png"
    assert cli.main(["inspect", str(extracted_store), "--samples", "2", "--out", str(given)]) == 0
    assert given.is_file()


def test_inspect_reads_random_weights_without_a_thread_pool(tmp_path, monkeypatch):
    """Arrow's pool threads reading a Python file object can outlive the command and abort the interpreter."""
    from tasks.contact_sheet import random_pairs

    folder = tmp_path / "store" / "pairs" / "dddd"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"patch_id": ["p0"], "random_weights": [True]}), folder / "s.parquet")
    calls = []
    real_read = pq.ParquetFile.read

    def read(self, *args, **kwargs):
        calls.append(kwargs.get("use_threads", True))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", read)
    assert random_pairs(Store(str(tmp_path / "store")), "pairs/dddd/s.parquet") is True
    assert calls == [False]


# -- point 20: the local stack's environment and its tiny-model profile, as the README uses them -------------------


def test_the_stack_env_puts_the_projects_prefect_first_on_path(tmp_path):
    script = 'eval "$(deploy/local-stack.sh env)" && command -v prefect && command -v pathgen && echo "$PATH"'
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STATE": str(tmp_path / "state")}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    prefect, pathgen, path = done.stdout.splitlines()
    assert (prefect, pathgen) == (str(ROOT / ".venv" / "bin" / "prefect"), str(ROOT / ".venv" / "bin" / "pathgen"))
    assert path.endswith(":/usr/bin:/bin")  # prepended, the rest kept


def _readme_factory_run() -> dict:
    """The parameters of the README's `prefect deployment run factory/factory --params '...'` line."""
    readme = (ROOT / "README.md").read_text()
    (params,) = re.findall(r"^prefect deployment run factory/factory --params '(.+)'$", readme, re.MULTILINE)
    return json.loads(params)


def test_the_readmes_factory_run_on_the_stack_uses_only_models_built_offline():
    import inspect as pyinspect

    from flows.factory import factory_flow
    from tasks.clip.spec import TINY_RANDOM
    from tasks.clip.stages import start_spec
    from tasks.models import MODEL_STAGES, require_real_models
    from tasks.selection.embedding import embedding_spec

    (factory,) = [
        d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "factory"
    ]
    params = factory["parameters"] | _readme_factory_run()  # as the server merges a run's parameters
    pyinspect.signature(factory_flow.fn).bind(**params)
    config = ROOT / params["config"]  # a flow run reads it from the checkout ($PATHGEN_HOME)
    settings = load_settings(str(config), params.get("overrides"), environ={})
    assert settings.store.startswith("s3://factory/")
    require_real_models(settings, list(MODEL_STAGES))  # allowed: random weights, said in every output
    assert embedding_spec(settings.embedding).name == TINY_RANDOM
    assert start_spec(settings.clip).name == TINY_RANDOM
    for role in ("describe", "revise", "summarize"):
        agent = getattr(settings.agents, role)
        assert (agent.backend, agent.model) == ("transformers", None)  # the tiny VLM, built on the spot
    assert (settings.instruct.backend, settings.instruct.model) == ("transformers", None)
    assert settings.llava.language_model is None
    assert settings.sources and all((ROOT / source).exists() for source in settings.sources)
    for dataset in settings.clip.evaluate:
        assert (ROOT / dataset["dataset"]).is_dir() and (ROOT / dataset["classes"]).is_file()
