"""``pathgen benchmark`` and ``pathgen evaluate --format``: datasets recognised under a root in their download
layouts, every model on every dataset with the tiny model on CPU, the summary checked against the per-task results,
a broken dataset a failed cell while the others complete, and the missing datasets listed with their sources."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from . import kather

LUNG = ("lung_aca", "lung_n", "lung_scc")
COLON = ("colon_aca", "colon_n")
MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition")


def _tile(path: Path, seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _mhist(folder: Path) -> None:
    """images/MHIST_*.png and annotations.csv with the official columns: two images per class and partition."""
    rows = []
    for index in range(8):
        name = f"MHIST_a{index:02d}.png"
        _tile(folder / "images" / name, index)
        label, partition = ("HP", "SSA")[index % 2], ("train", "test")[index // 4]
        votes = 0 if label == "HP" else 7
        rows.append([name, label, votes, partition])
    with (folder / "annotations.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MHIST_COLUMNS)
        writer.writerows(rows)


def _lc25000(folder: Path) -> None:
    """lung_colon_image_set/ with four images per class; one colon image is not an image (cut short in download)."""
    for half, classes in (("lung_image_sets", LUNG), ("colon_image_sets", COLON)):
        for number, name in enumerate(classes):
            for index in range(4):
                _tile(folder / half / name / f"{name.replace('_', '')}{index + 1}.jpeg", 100 + 10 * number + index)
    (folder / "colon_image_sets" / "colon_n" / "colonn4.jpeg").write_bytes(b"\xff\xd8 cut short")


def _kather_root(root: Path) -> Path:
    """Kather 2016 as downloaded: the shared samples, linked."""
    (root / "Kather_texture_2016_image_tiles_5000").parent.mkdir(parents=True)
    (root / "Kather_texture_2016_image_tiles_5000").symlink_to(kather.KATHER.resolve(), target_is_directory=True)
    return root


def _benchmark_root(root: Path) -> Path:
    """A download folder: MHIST, LC25000 and a SICAPv2 whose partition spreadsheets are broken."""
    _mhist(root / "mhist")
    _lc25000(root / "downloads" / "lung_colon_image_set")
    sicap = root / "SICAPv2"
    _tile(sicap / "images" / "16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg", 7)
    (sicap / "partition" / "Test").mkdir(parents=True)
    (sicap / "partition" / "Test" / "Test.xlsx").write_text("not a spreadsheet")
    (sicap / "partition" / "Test" / "Train.xlsx").write_text("not a spreadsheet")
    return root


def _random_checkpoint(store: Path) -> Path:
    """A PathGen-CLIP run as train-clip leaves it (run.json, params.txt, a checkpoint), trained from random
    weights: other weights than tiny-random's seed, and RANDOM WEIGHTS all the same."""
    import open_clip
    import torch

    from tasks.clip.spec import register_model_configs

    register_model_configs()  # tiny-random's config, as the tests that build it do
    stage = store / "models" / "clip" / "r1" / "stage1"
    (stage / "checkpoints").mkdir(parents=True)
    (stage.parent / "run.json").write_text(json.dumps({"random_weights": True}))
    (stage / "params.txt").write_text("model: tiny-random\npretrained: None\n")
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-random")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, stage / "checkpoints" / "epoch_1.pt")
    return stage / "checkpoints" / "epoch_1.pt"


@pytest.mark.prefect
def test_benchmark_puts_models_side_by_side_from_their_per_task_results(prefect_api, tmp_path, capsys):
    from flows.benchmark import benchmark_flow
    from pathgen.cli.benchmark import print_summary
    from tasks.benchmark.datasets import formats
    from tasks.report import store_report, text
    from tasks.store.objects import Store

    root, store = _benchmark_root(tmp_path / "data"), tmp_path / "store"
    _random_checkpoint(store)
    overrides = {"eval.baselines": ["tiny-random"], "eval.device": "cpu", "eval.batch_size": 16}
    summary = benchmark_flow(suite="all", root=str(root), store=str(store), overrides=overrides, run="b1")

    # no --model: eval.baselines, then the newest PathGen-CLIP in the store; both descend from random weights
    models = summary["models"]
    checkpoint = f"{store.as_uri()}/models/clip/r1/stage1/checkpoints/epoch_1.pt"
    assert [m["model"] for m in models] == ["tiny-random", f"tiny-random:{checkpoint}"]
    assert [m["eval_run"] for m in models] == ["tiny-random", "r1-stage1"]
    assert all(m["random_weights"] for m in models) and summary["random_weights"]
    rows = {row["task"]: row for row in summary["rows"]}
    assert list(rows) == ["lc25000-colon", "lc25000-lung", "mhist", "sicapv2"]
    for model in (m["model"] for m in models):
        assert rows["sicapv2"]["cells"][model]["status"] == "failed"
        assert "Train.xlsx" in rows["sicapv2"]["cells"][model]["error"]
        assert rows["lc25000-colon"]["cells"][model]["status"] == "failed"
        assert "colonn4.jpeg" in rows["lc25000-colon"]["cells"][model]["error"]
    assert summary["failed"] == 4

    # every ok cell is its per-task result's zero-shot headline; means and differences recomputed from those
    ok = ["lc25000-lung", "mhist"]
    values = {}
    for entry in models:
        for task in ok:
            result = json.loads((store / "eval" / entry["eval_run"] / f"{task}.json").read_text())
            cell = rows[task]["cells"][entry["model"]]
            # the summary links the run's own copy: a later evaluation of the model rewrites eval/<eval_run>/
            copy = store / "eval" / "benchmark" / "b1" / entry["eval_run"] / f"{task}.json"
            assert cell["json"] == copy.as_uri() and json.loads(copy.read_text()) == result | {"benchmark": "b1"}
            assert cell["status"] == "ok" and result["format"] in task and result["split"] == rows[task]["split"]
            for metric in ("balanced_accuracy", "weighted_f1"):
                assert cell[metric] == result["zero_shot"][metric]
            probe = result["linear_probe"]  # the probe's headline, or why it could not be fitted (too few images)
            expected = (
                {"method": probe["method"], "error": probe["error"]}
                if "error" in probe
                else {
                    "method": "logistic",
                    **{k: probe["headline"][k] for k in ("n", "balanced_accuracy", "weighted_f1")},
                }
            )
            assert cell["probe"] == expected
            values[entry["model"], task] = np.array([cell["balanced_accuracy"], cell["weighted_f1"]])
        mean = np.mean([values[entry["model"], t] for t in ok], axis=0)
        assert [entry["mean"]["balanced_accuracy"], entry["mean"]["weighted_f1"]] == pytest.approx(mean)
        assert entry["mean"]["tasks"] == 2
    first, second = (m["model"] for m in models)
    difference = np.mean([values[second, t] - values[first, t] for t in ok], axis=0)
    assert [models[1]["difference"][k] for k in ("balanced_accuracy", "weighted_f1")] == pytest.approx(difference)
    assert models[1]["difference"]["to"] == first and "difference" not in models[0]

    found = {"lc25000", "mhist", "sicapv2"}
    assert {m["format"] for m in summary["missing"]} == set(formats()) - found
    pcam = next(m for m in summary["missing"] if m["format"] == "pcam")
    assert pcam["source"].startswith("http")

    written = store / "eval" / "benchmark" / "b1"
    assert json.loads((written / "summary.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    md = (written / "summary.md").read_text()
    assert "| dataset | tiny-random (RANDOM WEIGHTS) | r1-stage1 (RANDOM WEIGHTS) |" in md
    assert f"| mhist | {values[first, 'mhist'][0]:.3f} / {values[first, 'mhist'][1]:.3f} | " in md
    assert "colonn4.jpeg cannot be read as an image" in md and pcam["source"] in md and "## Missing datasets" in md
    assert "tiny-random, results in eval/tiny-random/. RANDOM WEIGHTS: no weights loaded: its numbers are noise" in md
    assert "eval/r1-stage1/. RANDOM WEIGHTS: its training run started from random initialisation, not from" in md

    assert print_summary(summary) == 1  # some cells failed
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "lc25000-colon" in printed and str(written / "summary.md") in printed
    report = text(store_report(Store(store.as_uri())))
    assert "Benchmark b1 (suite all" in report and "Missing datasets: " in report


@pytest.mark.prefect
def test_evaluate_detects_the_format_and_names_classes_the_probe_never_trained_on(prefect_api, tmp_path):
    """pathgen evaluate --dataset DIR without --classes: the format is detected; the slide-derived probe split of
    the shared samples puts every tile of a class on the scored side, and the result says so."""
    from flows.evaluate import evaluate_flow

    root, store = _kather_root(tmp_path / "data"), tmp_path / "store"
    folder = root / "Kather_texture_2016_image_tiles_5000"
    overrides = {"eval.device": "cpu", "eval.batch_size": 16}
    alone = evaluate_flow([{"dataset": str(folder)}], model="tiny-random", store=str(store), overrides=overrides)
    (evaluated,) = alone["results"]
    assert evaluated["dataset"] == "kather2016" and evaluated["format"] == "kather2016" and evaluated["status"] == "ok"
    result = json.loads((store / "eval" / "tiny-random" / "kather2016.json").read_text())
    assert evaluated["balanced_accuracy"] == round(result["zero_shot"]["balanced_accuracy"], 4)
    assert result["random_why"] == alone["random_why"] and alone["random_why"].startswith("no weights loaded")
    probe = result["linear_probe"]
    train_sides = {result["classes"][i] for i in set(_labels_of(result, "train"))}
    assert probe["untrained_classes"] == [c for c in result["classes"] if c not in train_sides] != []


def _labels_of(result: dict, side: str) -> list[int]:
    """The labels of a kather2016 result's probe side, read again as the reader reads the folder."""
    from tasks.benchmark.readers import kather2016

    (task,) = kather2016.read(Path(result["folder"]))
    return (task.train if side == "train" else task.probe_test).labels.tolist()


@pytest.mark.prefect
def test_the_factory_evaluate_stage_runs_the_benchmark_when_a_suite_is_set(prefect_api, tmp_path):
    """eval.suite and eval.root set: the evaluate stage benchmarks the newest PathGen-CLIP (no baselines here) on
    the suite's datasets under the root, and the factory report shows the summary's table."""
    from flows.factory import factory_flow
    from pathgen.settings import SettingsError

    root, store = tmp_path / "data", tmp_path / "store"
    _mhist(root / "MHIST")
    _random_checkpoint(store)
    placeholder = {"eval.suite": "paper", "eval.root": "/FILL-IN/benchmark-datasets"}  # as deploy/paper.yaml has it
    with pytest.raises(SettingsError, match="eval.root is still the placeholder"):  # before train-clip runs
        factory_flow(store=str(store), overrides=placeholder, stages=["train-clip", "evaluate"])
    assert not (store / "eval").exists() and not (store / "exports").exists()
    from flows.train_clip import train_clip_flow  # clip.evaluate entries are pathgen evaluate's, checked up front

    with pytest.raises(ValueError, match="not both"):
        train_clip_flow(
            store=str(store), overrides={"clip.evaluate": [{"dataset": "d", "classes": "c", "format": "mhist"}]}
        )
    assert sorted(p.name for p in store.iterdir()) == ["models"]
    overrides = {"eval.suite": "paper", "eval.root": str(root), "eval.device": "cpu"}
    summary = factory_flow(store=str(store), overrides=overrides, stages=["evaluate"])
    (row,) = summary["stages"]
    assert row["state"] == "Completed" and row["failed_cells"] == 0 and row["random_weights"] is True, row
    written = json.loads((store / "eval" / "benchmark" / row["benchmark"] / "summary.json").read_text())
    assert [m["eval_run"] for m in written["models"]] == ["r1-stage1"] and len(written["missing"]) == 8
    assert f"Benchmark {row['benchmark']} (suite paper" in summary["report"]
    assert "| mhist | " in summary["report"] and "r1-stage1 (RANDOM WEIGHTS)" in summary["report"]


def test_means_and_differences_count_only_the_tasks_a_model_has(tmp_path):
    """A failed cell leaves its task out of that model's mean and out of every difference with it."""
    from tasks.benchmark.run import BenchmarkPlan
    from tasks.benchmark.summary import ModelResults, build_summary, markdown

    def ok(balanced: float, f1: float) -> dict:
        return {"status": "ok", "n": 10, "balanced_accuracy": balanced, "weighted_f1": f1, "probe": None}

    failed = {"status": "failed", "error": "ValueError: x.png cannot be read as an image"}
    rows = {t: {"task": t, "format": t, "folder": "/d", "split": "test"} for t in ("a", "b", "c")}
    base = ModelResults("base", "base", False, {"a": ok(0.5, 0.4), "b": ok(0.6, 0.5), "c": failed}, rows)
    trained = ModelResults("trained", "r-stage1", False, {"a": ok(0.7, 0.5), "b": failed, "c": ok(0.9, 0.9)}, rows)
    summary = build_summary(BenchmarkPlan("paper", tmp_path, [], []), "r", "now", [base, trained])
    assert summary["models"][0]["mean"] == pytest.approx({"balanced_accuracy": 0.55, "weighted_f1": 0.45, "tasks": 2})
    assert summary["models"][1]["mean"] == pytest.approx({"balanced_accuracy": 0.8, "weighted_f1": 0.7, "tasks": 2})
    difference = summary["models"][1]["difference"]  # task a only: the one both have
    assert difference == pytest.approx({"to": "base", "balanced_accuracy": 0.2, "weighted_f1": 0.1, "tasks": 1})
    assert summary["failed"] == 2 and summary["rows"][0]["cells"]["trained"]["difference"]["balanced_accuracy"] == (
        pytest.approx(0.2)
    )
    md = markdown(summary)
    assert "| a | 0.500 / 0.400 | 0.700 / 0.500 (+0.200 / +0.100) |" in md
    assert "failed: ValueError: x.png cannot be read" in md and "RANDOM WEIGHTS" not in md


def test_a_model_whose_task_crashed_gets_the_rows_of_the_tasks_its_dataset_holds(tmp_path):
    """A crashed task's outcomes are named by unit (the format, lc25000); the other model's by task."""
    from tasks.benchmark.run import BenchmarkPlan
    from tasks.benchmark.summary import ModelResults, build_summary, markdown

    ok = {"status": "ok", "n": 4, "balanced_accuracy": 0.5, "weighted_f1": 0.5}
    rows = {
        t: {"task": t, "format": "lc25000", "folder": "/d", "split": "s"} for t in ("lc25000-lung", "lc25000-colon")
    }
    probe = {"method": "logistic", "n": 4, "balanced_accuracy": 0.25, "weighted_f1": 0.2, "untrained_classes": ["x"]}
    fine = ModelResults("a", "a", False, {t: dict(ok, probe=probe) for t in rows}, rows)
    crashed = {"lc25000": {"status": "pending", "error": "the worker died"}}
    lost = ModelResults("b", "b", True, crashed, {"lc25000": {"task": "lc25000"}}, "no weights loaded: noise")
    summary = build_summary(BenchmarkPlan("all", tmp_path, [], []), "r", "now", [fine, lost])
    assert [row["task"] for row in summary["rows"]] == ["lc25000-colon", "lc25000-lung"]
    assert all(row["cells"]["b"]["status"] == "pending" for row in summary["rows"]) and summary["failed"] == 2
    md = markdown(summary)
    assert "| lc25000-lung | 0.250 / 0.200 (1 class unseen in training) | n/a |" in md
    assert "- lc25000-lung: not in the probe's training side: x" in md and "RANDOM WEIGHTS: no weights loaded" in md


def test_a_split_inside_the_test_split_is_not_embedded_again(tmp_path, monkeypatch):
    """A dataset scored whole by zero-shot whose probe splits are derived from it: their features are the test
    split's rows, also for a subset of a subset (the paper probe's samples of a derived train split); a split of
    other images is embedded."""
    from pathgen.settings import EvalSettings
    from tasks.benchmark.datasets import ImageFiles, Split
    from tasks.clip import evaluate

    paths = tuple(tmp_path / f"{i}.png" for i in range(6))
    everything = Split(ImageFiles(paths), np.array([0, 1, 0, 1, 0, 1]), "all")
    test_x = np.arange(12, dtype=np.float32).reshape(6, 2)
    embedded = []
    monkeypatch.setattr(evaluate, "embed_split", lambda model, split, batch_size: embedded.append(split.name))
    features = evaluate._FeaturesOf(None, EvalSettings(batch_size=4), everything, test_x)
    train = everything.subset(np.array([4, 1, 3]), "train (derived)")
    assert features.of(everything) is test_x and features.of(train).tolist() == [[8, 9], [2, 3], [6, 7]]
    assert features.of(train.subset(np.array([2, 0]), "drawn")).tolist() == [[6, 7], [8, 9]]
    assert embedded == []
    mixed = Split(ImageFiles((paths[0], tmp_path / "elsewhere.png")), np.array([0, 1]), "probe test")
    features.of(mixed)  # one image is not the test split's: the split is embedded
    assert embedded == ["probe test"]


def test_the_paper_probe_embeds_only_the_images_its_seeds_draw(tmp_path, monkeypatch):
    """A separate train split (PCam's 262,144 patches): only the union of the seeds' samples is embedded, and the
    probe's numbers are those of embedding every training image."""
    from pathgen.settings import EvalSettings
    from tasks.benchmark.datasets import BenchmarkTask, ImageFiles, Split
    from tasks.clip import evaluate
    from tasks.clip.metrics import ClassSpec
    from tasks.clip.probe import run_probe

    rng = np.random.default_rng(0)
    every_x = rng.normal(size=(90, 8)) + np.repeat(np.eye(8)[:3] * 2, 30, axis=0)
    labels = np.repeat(np.arange(3), 30)
    train = Split(ImageFiles(tuple(tmp_path / f"{i}.png" for i in range(90))), labels, "train")
    test = Split(ImageFiles(tuple(tmp_path / f"t{i}.png" for i in range(9))), np.repeat(np.arange(3), 3), "test")
    test_x = every_x[::10]
    embedded = []

    def embed(model, split, batch_size):  # each image's features by its file name
        rows = [int(Path(split.images.name(i)).stem) for i in range(len(split))]
        embedded.append(len(rows))
        return every_x[rows]

    monkeypatch.setattr(evaluate, "embed_split", embed)
    classes = ClassSpec(["a", "b", "c"], {c: [c] for c in "abc"}, ["{}"])
    task = BenchmarkTask("t", "t", tmp_path, classes, test, train, "test")
    cfg = EvalSettings(probe="paper", probe_shots=4, seeds=2, probe_epochs=3)
    result = evaluate._probe(task, test, evaluate._FeaturesOf(None, cfg, test, test_x), cfg)
    assert embedded and embedded[0] <= 2 * 4 * 3 < 90
    assert result["runs"] == run_probe(every_x, labels, test_x, test.labels, ["a", "b", "c"], cfg)["runs"]


def test_a_folder_that_is_no_dataset_is_refused_before_anything_runs(tmp_path, capsys):
    from pathgen.cli import main
    from pathgen.cli.clip import dataset_entry

    assert dataset_entry(str(kather.KATHER), None, None) == {"dataset": str(kather.KATHER), "format": "kather2016"}
    from tasks.clip.evaluate import dataset_entry as entry_of  # the one check of evaluate, the flows, clip.evaluate

    assert entry_of({"dataset": "d", "format": "mhist"}) == {"dataset": "d", "format": "mhist"}
    assert entry_of({"dataset": "d", "classes": "c.json"}) == {"dataset": "d", "classes": "c.json"}
    for bad, message in (
        ({"dataset": "d", "classes": "c", "format": "mhist"}, "not both"),
        ({"dataset": "d", "clases": "c"}, "unknown keys"),
        ({"classes": "c"}, "names no dataset"),
    ):
        with pytest.raises(ValueError, match=message):
            entry_of(bad)
    with pytest.raises(ValueError, match="unknown dataset format 'pcm'.*pcam"):
        dataset_entry(str(kather.KATHER), None, "pcm")
    empty = tmp_path / "empty"
    (empty / "something").mkdir(parents=True)
    assert main(["evaluate", "--dataset", str(empty), "--model", "tiny-random"]) == 2
    error = capsys.readouterr().err
    assert "is not laid out as any known dataset" in error and "--format" in error and "--classes" in error

    assert main(["benchmark", "--root", str(empty), "--suite", "paper", "--model", "tiny-random"]) == 2
    out, err = capsys.readouterr()
    assert "no dataset of suite paper" in err
    assert "missing: pcam (" in out and "download it from http" in out and out.count("missing: ") == 9
    assert main(["benchmark", "--root", str(empty), "--model", "tiny-random", "--model", "tiny-random"]) == 2
    assert "given twice" in capsys.readouterr().err
