"""One train-mil run end to end without Prefect (tasks/mil/run.py): features read from the store or an h5 folder, the
run's name, training mirrored into the store and resumed from it on another worker, the finished run skipped, the
evaluation JSON with its confusion PNG and the heatmaps; and the training core's folder fingerprint."""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.mil.run as mil_run
from pathgen.settings import Settings, load_settings
from tasks.features.store import FeatureTable, failed_key, features_key, manifest_key, write_features
from tasks.mil.h5 import FeaturesFileError, write_slide_h5
from tasks.mil.metrics import mean_std, mean_std_text
from tasks.mil.run import (
    HeatmapUnavailable,
    load_mil_features,
    mil_run_name,
    plan_run,
    recipe_from_settings,
    train_and_evaluate,
)
from tasks.mil.tasks import TaskError, TaskRow, read_task, write_task
from tasks.mil.train import MilRecipe, lr_key, train_mil
from tasks.models import RandomWeightsRefused
from tasks.slides.pictures import BANNER_RGB
from tasks.store.objects import Store

from .conftest import CMU, one_torch_thread

DIM = 8
HASH = "0123456789abcdef"
SPLITS = {"train": 24, "val": 8, "test": 4}
CMU_MPP = 0.499
ENCODER = {"spec": "tiny-random", "name": "tiny-random", "digest": "random-init", "random_weights": True}
LOG = logging.getLogger("test-mil-run")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def tissue_boxes(n: int) -> np.ndarray:
    """n level-0 224 px boxes in a grid over CMU-1-Small-Region (2220 x 2967), as the features stage records them."""
    j = np.arange(n)
    return np.stack([200 + (j % 8) * 224, 300 + (j // 8) * 224, np.full(n, 224), np.full(n, 224)], axis=1)


def slide_vectors(positive: bool, rng: np.random.Generator) -> np.ndarray:
    """Background vectors; a positive slide holds 3 witness vectors shifted on half the dimensions (learnable)."""
    vectors = rng.normal(size=(int(rng.integers(16, 33)), DIM)).astype(np.float32)
    if positive:
        vectors[:3, : DIM // 2] += 3.0
    return vectors


def build_features(store: Store, features_hash: str = HASH, seed: int = 0, source: str | None = str(CMU)) -> list:
    """Features of every task slide under ``features_hash`` (metadata as the features stage writes it); the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in SPLITS.items():
        for i in range(count):
            slide_id, positive = f"{split}_{i:02d}", i % 2 == 1
            vectors = slide_vectors(positive, rng)
            meta = {"encoder": ENCODER, "mpp": 0.5, "patch_px": 224, "patch_size_level0": 224, "random_weights": True}
            meta |= {"slide_mpp": CMU_MPP, "width": 2220, "height": 2967, "source_uri": source}
            table = FeatureTable(slide_id, vectors, tissue_boxes(len(vectors)), np.ones(len(vectors)))
            write_features(store, features_hash, table, meta)
            rows.append(TaskRow(slide_id, "tumor" if positive else "normal", slide_id, split))
    store.write_json(manifest_key(features_hash), {"encoder": ENCODER, "created_at": "test"})
    return rows


def settings_for(root: Path | str, work: Path, **mil) -> Settings:
    overrides = {"store": str(root), "mil.epochs": 3, "mil.learning_rates": [1e-3, 5e-3], "mil.seeds": 1}
    overrides |= {"mil.work_dir": str(work), "mil.heatmap_top_k": 2, "mil.device": "cpu"}
    overrides |= {f"mil.{k}": v for k, v in mil.items()}
    return load_settings(overrides=overrides, environ={})


@pytest.fixture
def featured(tmp_path: Path) -> tuple[Store, Path]:
    store = Store(str(tmp_path / "store"))
    task = write_task(build_features(store), tmp_path / "task.csv")
    return store, task


def _best_weights(store: Store, run: str, lr: float, seed: int = 0) -> dict:
    data = store.read_bytes(f"models/mil/{run}/{lr_key(lr)}/{seed}/best.pt")
    return torch.load(io.BytesIO(data), weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------ naming


def test_the_run_name_changes_exactly_with_task_bytes_features_model_and_recipe(featured, tmp_path: Path) -> None:
    store, task = featured
    slides, identity = load_mil_features(HASH, store)
    recipe = MilRecipe(epochs=3)
    name = mil_run_name(task, identity, "abmil", recipe)
    assert name.startswith("task-abmil-") and len(name.rsplit("-", 1)[1]) == 12
    assert mil_run_name(task, load_mil_features(HASH, store)[1], "abmil", recipe) == name  # deterministic

    copy = tmp_path / "elsewhere" / "task.csv"
    copy.parent.mkdir()
    shutil.copy(task, copy)
    assert mil_run_name(copy, identity, "abmil", recipe) == name  # the bytes, not the path
    copy.write_bytes(task.read_bytes().replace(b"train_00,normal", b"train_00,tumor"))
    assert mil_run_name(copy, identity, "abmil", recipe) != name

    assert mil_run_name(task, identity, "acmil", recipe) != name
    assert mil_run_name(task, identity, "abmil", replace(recipe, epochs=4)) != name
    assert mil_run_name(task, identity, "abmil", replace(recipe, seeds=(0, 1))) != name

    # one slide featured again with other vectors (same features hash): the run changes with it
    table = FeatureTable("test_00", np.zeros((4, DIM)), tissue_boxes(4), np.ones(4))
    write_features(store, HASH, table, {"encoder": ENCODER, "patch_size_level0": 224})
    assert mil_run_name(task, load_mil_features(HASH, store)[1], "abmil", recipe) != name
    # a slide the task does not name changes nothing
    write_features(store, HASH, FeatureTable("other", np.ones((2, DIM)), tissue_boxes(2), np.ones(2)), {})
    wanted = {row.slide_id for row in read_task(task).rows}
    assert load_mil_features(HASH, store, wanted)[1]["digest"] == load_mil_features(HASH, store, wanted)[1]["digest"]
    before = load_mil_features(HASH, store, wanted)[1]["digest"]
    write_features(store, HASH, FeatureTable("other", np.zeros((3, DIM)), tissue_boxes(3), np.ones(3)), {})
    assert load_mil_features(HASH, store, wanted)[1]["digest"] == before


def test_the_recipe_comes_from_the_mil_settings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tmp_path, seeds=3, weight_decay=0.01, acmil_top_k=7)
    recipe = recipe_from_settings(settings.mil)
    assert recipe.seeds == (0, 1, 2) and recipe.learning_rates == (1e-3, 5e-3) and recipe.epochs == 3
    assert (recipe.weight_decay, recipe.acmil_top_k, recipe.selection_metric) == (0.01, 7, "auc")


# ------------------------------------------------------------------------------------------------ a whole run


def test_a_run_trains_evaluates_draws_heatmaps_and_is_skipped_once_finished(featured, tmp_path, monkeypatch):
    store, task = featured
    settings = settings_for(tmp_path / "store", tmp_path / "work")
    run = plan_run(task, HASH, "abmil", settings, store)
    evaluated = train_and_evaluate(run, store, LOG)
    assert evaluated["status"] == "trained"

    record = store.read_json(f"models/mil/{run.name}/run.json")
    assert record["status"] == "finished" and record["chosen_lr"] == evaluated["chosen_lr"]
    assert record["task_sha256"] == mil_run.file_sha256(task) and record["random_weights"] is True
    assert record["features"]["features_hash"] == HASH and record["classes"] == ["normal", "tumor"]
    lines = [json.loads(t) for t in store.read_bytes(f"models/mil/{run.name}/metrics.jsonl").decode().splitlines()]
    assert sorted((line["lr"], line["seed"], line["epoch"]) for line in lines) == [
        (lr, 0, epoch) for lr in (1e-3, 5e-3) for epoch in (1, 2, 3)
    ]
    assert all({"train_loss", "val_loss", "val_auc", "lr_now"} <= line.keys() for line in lines)
    assert [line["lr_now"] for line in lines if line["lr"] == 5e-3][0] == 5e-3  # cosine: starts at the grid lr

    result = store.read_json(f"eval/mil/{run.name}/task.json")
    assert result == {k: v for k, v in evaluated.items() if k != "status"}
    assert (result["task"], result["run"], result["model"], result["seeds"]) == ("task", run.name, "abmil", [0])
    assert result["features"]["source"] == HASH and result["features"]["encoder"] == ENCODER
    assert result["random_weights"] is True and result["features"]["random_weights"] is True
    seed0 = result["per_seed"]["0"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert result["mean"][name] == seed0[name] and result["std"][name] == 0.0
    assert result["mean"]["auc"] >= 0.9  # the witness vectors are learnable
    assert np.asarray(result["confusion"]).sum() == SPLITS["test"] and result["confusion"] == seed0["confusion_matrix"]
    assert result["per_class_recall"] == seed0["per_class_recall"]
    assert "ddof 1" in result["std_definition"] and "summed" in result["confusion_of"]

    png = Image.open(io.BytesIO(store.read_bytes(result["confusion_png"]))).convert("RGB")
    assert result["confusion_png"] == f"eval/mil/{run.name}/task-confusion.png"
    assert tuple(np.asarray(png)[2, 2]) == BANNER_RGB  # the RANDOM WEIGHTS band: the features are random
    test_ids = [row.slide_id for row in read_task(task).split("test")]
    assert result["heatmaps"] == [f"eval/mil/{run.name}/heatmaps/{s}.png" for s in test_ids]
    heatmap = np.asarray(Image.open(io.BytesIO(store.read_bytes(result["heatmaps"][1]))).convert("RGB"))
    assert heatmap.shape[0] > 500 and heatmap.shape[1] > 900  # thumbnail + colour bar + top patches at 256 px
    assert tuple(heatmap[2, 2]) == BANNER_RGB

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mil_run, "train_mil", must_not_train)
    again = train_and_evaluate(plan_run(task, HASH, "abmil", settings, store), store, LOG)
    assert again["status"] == "skipped" and again["mean"] == result["mean"]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_run_killed_on_one_worker_resumes_on_another_from_the_store(kind, tmp_path, monkeypatch, request):
    root = request.getfixturevalue("bucket") if kind == "s3" else str(tmp_path / "store")
    store = Store(root)
    task = write_task(build_features(store), tmp_path / "task.csv")
    whole_store = Store(str(tmp_path / "whole"))
    build_features(whole_store)  # the same vectors: the same run, trained without interruption
    whole = train_and_evaluate(
        plan_run(task, HASH, "acmil", settings_for(tmp_path / "whole", tmp_path / "w0"), whole_store),
        whole_store,
        LOG,
    )

    class Killed(RuntimeError):
        pass

    real_train = mil_run.train_mil
    monkeypatch.setattr(mil_run, "MIRROR_SECONDS", 0.0)  # push each epoch, as a long epoch would

    def killed_at(lr_to_kill: float, epoch: int, seen: list):
        def train(*args, on_epoch, **kwargs):
            def hook(lr, seed, record):
                on_epoch(lr, seed, record)
                seen.append((lr, record["epoch"]))
                if lr == lr_to_kill and record["epoch"] == epoch:
                    raise Killed("worker lost")

            return real_train(*args, on_epoch=hook, **kwargs)

        return train

    first: list = []
    monkeypatch.setattr(mil_run, "train_mil", killed_at(5e-3, 2, first))
    settings_a = settings_for(root, tmp_path / "worker-a")
    with pytest.raises(Killed):
        train_and_evaluate(plan_run(task, HASH, "acmil", settings_a, store), store, LOG)
    run = plan_run(task, HASH, "acmil", settings_a, store).name
    assert store.read_json(f"models/mil/{run}/run.json")["status"] == "training"
    assert store.exists(f"models/mil/{run}/{lr_key(1e-3)}/0/done.json")
    assert not store.exists(f"eval/mil/{run}/task.json")

    second: list = []
    monkeypatch.setattr(mil_run, "train_mil", killed_at(-1.0, 0, second))
    settings_b = settings_for(root, tmp_path / "worker-b")  # another machine: nothing local
    resumed = train_and_evaluate(plan_run(task, HASH, "acmil", settings_b, store), store, LOG)
    assert second == [(5e-3, 3)]  # lr 1e-3 taken finished from the store, lr 5e-3 resumed after epoch 2
    assert resumed["run"] == whole["run"] == run
    for key in ("mean", "per_seed", "chosen_lr", "confusion", "grid"):
        assert resumed[key] == whole[key], key
    for lr in (1e-3, 5e-3):
        a, b = _best_weights(store, run, lr), _best_weights(whole_store, run, lr)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_h5_folder_trains_and_heatmaps_without_a_source_are_skipped_with_a_reason(featured, tmp_path) -> None:
    store, task = featured
    slides, _ = load_mil_features(HASH, store)
    folder = tmp_path / "h5"
    for slide_id, slide in slides.items():
        write_slide_h5(folder / f"{slide_id}.h5", slide.features, slide.coords, patch_size=224, patch_level=0,
                       mpp=0.5, encoder="tiny-random", patch_size_level0=224)  # fmt: skip
    settings = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3])
    run = plan_run(task, str(folder), "mean", settings, store)
    assert run.identity["kind"] == "h5" and run.identity["features_hash"] is None
    assert run.random_weights is True  # the files name the tiny-random encoder
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert plan_run(task, str(moved), "mean", settings, store).name == run.name  # content, not place

    production = load_settings(overrides={**settings.model_dump(mode="json"), "models.allow_random_weights": False},
                               environ={})  # fmt: skip
    with pytest.raises(RandomWeightsRefused, match=f"{folder}.*random"):
        plan_run(task, str(folder), "mean", production, store)

    evaluated = train_and_evaluate(run, store, LOG)
    assert evaluated["features"]["source"] == str(folder.resolve()) and evaluated["heatmaps"] == []
    assert len(evaluated["heatmaps_skipped"]) == SPLITS["test"]
    assert all("source_uri" in skip["reason"] for skip in evaluated["heatmaps_skipped"])
    assert store.exists(evaluated["confusion_png"])


def test_a_slide_that_moved_costs_its_heatmap_only(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    task = write_task(build_features(store, source=str(tmp_path / "gone.svs")), tmp_path / "task.csv")
    settings = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3], epochs=1)
    evaluated = train_and_evaluate(plan_run(task, HASH, "abmil", settings, store), store, LOG)
    assert evaluated["heatmaps"] == [] and all("gone.svs" in s["reason"] for s in evaluated["heatmaps_skipped"])

    off = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3], epochs=1, heatmaps=False)
    again = train_and_evaluate(plan_run(task, HASH, "mean", off, store), store, LOG)
    assert again["heatmaps"] == [] and again["heatmaps_skipped"] == []


def test_boxes_without_a_level0_patch_size_cannot_make_a_heatmap() -> None:
    from tasks.mil.h5 import SlideFeatures

    slide = SlideFeatures("s", torch.zeros(2, DIM), np.zeros((2, 2), dtype=np.int64), {"patch_level": 1})
    with pytest.raises(HeatmapUnavailable, match="level-0 patch size"):
        mil_run.slide_boxes(slide)
    level0 = SlideFeatures("s", torch.zeros(2, DIM), np.array([[0, 0], [10, 5]]), {"patch_level": 0, "patch_size": 7})
    assert mil_run.slide_boxes(level0).tolist() == [[0, 0, 7, 7], [10, 5, 7, 7]]


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_features_name_the_task_file_row_and_recorded_failure(featured, tmp_path: Path) -> None:
    store, task = featured
    rows = [*read_task(task).rows, TaskRow("absent_slide", "tumor", "absent_slide", "train")]
    bigger = write_task(rows, tmp_path / "bigger.csv")
    store.write_json(failed_key(HASH, "absent_slide"), {"error": "SlideError: no tissue found"})
    settings = settings_for(tmp_path / "store", tmp_path / "work")
    with pytest.raises(TaskError, match=r"bigger\.csv.*line \d+: 'absent_slide'.*no tissue found"):
        plan_run(bigger, HASH, "abmil", settings, store)
    with pytest.raises(mil_run.FeaturesSourceError, match="pathgen features"):
        plan_run(task, "feedfacefeedface", "abmil", settings, store)
    no_test = write_task([r for r in read_task(task).rows if r.split != "test"], tmp_path / "notest.csv")
    with pytest.raises(TaskError, match="notest.csv: no slide has split 'test'"):
        plan_run(no_test, HASH, "abmil", settings, store)


# ------------------------------------------------------------------------------------------------ training core


def _core_task(tmp_path: Path, seed: int):
    store = Store(str(tmp_path / f"core{seed}"))
    rows = build_features(store, seed=seed)
    slides, _ = load_mil_features(HASH, store)
    return read_task(write_task(rows, tmp_path / f"core{seed}.csv")), {s: f.features for s, f in slides.items()}


def test_a_folder_trained_on_other_data_is_trained_afresh_not_reused(tmp_path: Path) -> None:
    recipe = MilRecipe(epochs=2, learning_rates=(5e-3,), hidden_dim=16)
    task_a, features_a = _core_task(tmp_path, 0)
    task_b, features_b = _core_task(tmp_path, 1)
    train_mil(task_a, features_a, "abmil", recipe, tmp_path / "shared")
    fresh = train_mil(task_b, features_b, "abmil", recipe, tmp_path / "fresh")

    epochs = []
    reused = train_mil(task_b, features_b, "abmil", recipe, tmp_path / "shared", on_epoch=lambda *a: epochs.append(a))
    assert len(epochs) == 2 and reused.skipped_runs == []  # the old code skipped it: done.json was there
    assert reused.test == fresh.test and reused.grid == fresh.grid
    folder = tmp_path / "shared" / lr_key(5e-3) / "0"
    assert (
        json.loads((folder / "fingerprint.json").read_text())["data"]
        == json.loads((tmp_path / "fresh" / lr_key(5e-3) / "0" / "fingerprint.json").read_text())["data"]
    )

    again = train_mil(task_b, features_b, "abmil", recipe, tmp_path / "shared")
    assert again.skipped_runs == [f"{lr_key(5e-3)}/0"]  # same inputs: reused
    other_recipe = replace(recipe, weight_decay=0.0)
    assert train_mil(task_b, features_b, "abmil", other_recipe, tmp_path / "shared").skipped_runs == []


def test_best_checkpoint_is_written_once_per_run_not_every_epoch(tmp_path: Path) -> None:
    task, features = _core_task(tmp_path, 0)
    folder = tmp_path / "run" / lr_key(5e-3) / "0"
    seen = []

    def on_epoch(lr, seed, record):
        seen.append((folder / "best.pt").exists())

    recipe = MilRecipe(epochs=3, learning_rates=(5e-3,), hidden_dim=16)
    train_mil(task, features, "abmil", recipe, tmp_path / "run", on_epoch=on_epoch)
    assert seen == [False, False, False] and (folder / "best.pt").exists()
    best = torch.load(folder / "best.pt", weights_only=True)
    state = torch.load(folder / "state.pt", weights_only=True)
    assert best["epoch"] == state["progress"]["best_epoch"]
    assert all(torch.equal(best["model"][k], state["progress"]["best_model"][k]) for k in best["model"])


def test_std_over_seeds_is_the_sample_standard_deviation() -> None:
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)  # ddof 1 (ddof 0 would be 0.163)
    assert mean_std([0.8]) == (0.8, 0.0) and mean_std([0.8, None]) == (None, None)


def test_a_run_another_worker_holds_stays_pending_and_is_not_touched(featured, tmp_path: Path) -> None:
    from tasks.clip.lease import RunLease

    store, task = featured
    settings = settings_for(tmp_path / "store", tmp_path / "mine", learning_rates=[5e-3], epochs=1)
    run = plan_run(task, HASH, "mean", settings, store)
    unit = {"task": str(task), "features": HASH, "model": "mean"}
    with RunLease(store, f"models/mil/{run.name}", tmp_path / "other-worker", LOG):
        [outcome] = mil_run.train_mil_units([unit], settings, LOG)
    assert outcome.status == "pending" and "another trainer" in outcome.error, outcome
    assert not store.exists(f"models/mil/{run.name}/run.json") and not store.exists(run.eval_key)
    [again] = mil_run.train_mil_units([unit], settings, LOG)  # the holder is gone: this worker trains it
    assert again.status == "ok" and again.columns["run"] == run.name and store.exists(run.eval_key)


# ------------------------------------------------------------------------------------------------ review fixes


def test_a_finished_folder_whose_push_failed_reaches_the_store_on_the_retry(featured, tmp_path, monkeypatch) -> None:
    store, task = featured
    settings = settings_for(tmp_path / "store", tmp_path / "work", epochs=1)
    real_train = mil_run.train_mil

    def outage_after_done(*args, on_run_done, **kwargs):
        def push(lr, seed, done):
            raise ConnectionError("store outage")  # done.json is written locally, its forced push fails

        return real_train(*args, on_run_done=push, **kwargs)

    monkeypatch.setattr(mil_run, "train_mil", outage_after_done)
    with pytest.raises(ConnectionError):
        train_and_evaluate(plan_run(task, HASH, "mean", settings, store), store, LOG)
    monkeypatch.setattr(mil_run, "train_mil", real_train)
    run = plan_run(task, HASH, "mean", settings, store)  # the Prefect retry, on the same worker
    assert train_and_evaluate(run, store, LOG)["status"] == "trained"
    assert store.read_json(f"models/mil/{run.name}/run.json")["status"] == "finished"
    for lr in (1e-3, 5e-3):  # lr 1e-3 was found done locally on the retry: it is pushed all the same
        for name in ("best.pt", "done.json", "metrics.jsonl", "fingerprint.json"):
            assert store.exists(f"models/mil/{run.name}/{lr_key(lr)}/0/{name}"), (lr, name)


def test_a_slide_read_timeout_leaves_the_run_unfinished_not_its_heatmap_skipped(featured, tmp_path, monkeypatch):
    import tasks.slides.readers as readers

    store, task = featured
    settings = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3], epochs=1)
    real_open = readers.open_slide

    class ReadTimeoutError(Exception):  # what botocore raises when S3 does not answer (matched by type name)
        pass

    def timing_out(*args, **kwargs):
        raise ReadTimeoutError("Read timeout on endpoint URL")

    monkeypatch.setattr(readers, "open_slide", timing_out)
    run = plan_run(task, HASH, "mean", settings, store)
    with pytest.raises(ReadTimeoutError):
        train_and_evaluate(run, store, LOG)
    assert store.read_json(f"models/mil/{run.name}/run.json")["status"] == "training"
    assert not store.exists(run.eval_key)  # not finished: the retry draws the heatmaps
    monkeypatch.setattr(readers, "open_slide", real_open)
    evaluated = train_and_evaluate(run, store, LOG)
    assert len(evaluated["heatmaps"]) == SPLITS["test"] and evaluated["heatmaps_skipped"] == []


def _h5_slide(folder: Path, slide_id: str, dim: int = DIM, encoder: str = "tiny-random", **extra) -> Path:
    vectors = np.random.default_rng(len(slide_id)).normal(size=(4, dim)).astype(np.float32)
    return write_slide_h5(folder / f"{slide_id}.h5", vectors, tissue_boxes(4)[:, :2], patch_size=224, patch_level=0,
                          mpp=0.5, encoder=encoder, extra_attrs=extra or None)  # fmt: skip


def test_h5_random_weights_trusts_the_files_flag_and_only_our_random_encoder_names(tmp_path: Path) -> None:
    def random(encoder: str, **extra) -> bool:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        _h5_slide(folder, "s", encoder=encoder, **extra)
        return load_mil_features(str(folder), Store(str(tmp_path / "unused")))[1]["random_weights"]

    real = "/models/random_crop_finetune/ckpt.pt (sha256:ab12)"  # a trained checkpoint with "random" in its path
    assert random(real) is False  # the old substring test called it random (and production refused it)
    assert random(real, random_weights=False, encoder_identity={"name": "x", "digest": "sha256:ab12"}) is False
    assert random("tiny-random (random-init)", random_weights=False) is False  # the file's own flag is trusted
    assert random(real, random_weights=True) is True
    assert random("tiny-random") is True and random("tiny-random (random-init)") is True
    assert random("ViT-B-16 (random-init)") is True  # no weights: the encoder digest says so
    assert random(json.dumps({"name": "ViT-B-16", "random_weights": True})) is True
    assert random(json.dumps({"name": "random-ish", "digest": "sha256:1", "random_weights": False})) is False


def test_an_h5_folder_reads_only_the_task_slides_also_in_clam_layout(featured, tmp_path: Path) -> None:
    store, task = featured
    slides, _ = load_mil_features(HASH, store)
    plain, clam = tmp_path / "plain", tmp_path / "clam" / "h5_files"
    for folder in (plain, clam):
        for slide_id, slide in slides.items():
            write_slide_h5(folder / f"{slide_id}.h5", slide.features, slide.coords, patch_size=224, patch_level=0,
                           mpp=0.5, encoder="tiny-random", patch_size_level0=224)  # fmt: skip
    settings = settings_for(tmp_path / "store", tmp_path / "work")
    name = plan_run(task, str(plain), "mean", settings, store).name
    _h5_slide(plain, "foreign", dim=DIM + 3)  # another encoder's slide the task does not name
    (plain / "damaged.h5").write_bytes(b"not an h5 file")
    run = plan_run(task, str(plain), "mean", settings, store)
    assert run.name == name and "foreign" not in run.load_slides(store)  # never read, not in the digest
    assert plan_run(task, str(clam.parent), "mean", settings, store).name == name  # CLAM's h5_files/ subfolder
    with pytest.raises(FeaturesFileError, match="foreign.h5|damaged.h5"):
        load_mil_features(str(plain), store)  # asked for every slide, the folder's odd files are still refused


def test_an_unreadable_store_object_leaves_the_run_pending_a_bad_task_fails(featured, tmp_path: Path) -> None:
    store, task = featured
    settings = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3], epochs=1)
    unit = {"task": str(task), "features": HASH, "model": "mean"}
    key = features_key(HASH, "train_03")
    whole = store.read_bytes(key)
    store.write_bytes(key, whole[: len(whole) // 2])  # a truncated parquet (pyarrow: ArrowInvalid, a ValueError)
    [outcome] = mil_run.train_mil_units([unit], settings, LOG)
    assert outcome.status == "pending" and store.uri(key) in outcome.error and "delete it" in outcome.error
    store.write_bytes(key, whole)

    run = plan_run(task, HASH, "mean", settings, store)
    store.write_bytes(f"models/mil/{run.name}/run.json", b'{"status": "fini')  # a damaged store JSON
    [outcome] = mil_run.train_mil_units([unit], settings, LOG)
    assert outcome.status == "pending" and "run.json" in outcome.error
    store.delete(f"models/mil/{run.name}/run.json")

    bad = write_task([*read_task(task).rows, TaskRow("absent", "tumor", "absent", "train")], tmp_path / "bad.csv")
    [failed] = mil_run.train_mil_units([{**unit, "task": str(bad)}], settings, LOG)
    assert failed.status == "failed" and "'absent'" in failed.error  # the task's own content: final
    [done] = mil_run.train_mil_units([unit], settings, LOG)
    assert done.status == "ok" and done.columns["auc"].count(" ± ") == 1


def test_mean_std_text_is_the_one_format_of_a_metric_over_seeds() -> None:
    assert mean_std_text(0.91234, 0.0123) == "0.912 ± 0.012"
    assert mean_std_text(0.91234, None, digits=4) == "0.9123 ± 0.0000"
    assert mean_std_text(None, None) == "n/a" and mean_std_text(None, 0.1, missing=None) is None
    assert mil_run.headline_text({"auc": 0.5, "accuracy": None}, {"auc": 0.25})["auc"] == "0.5000 ± 0.2500"


def test_a_finished_run_is_found_from_the_footers_and_named_by_the_slides_inputs(tmp_path, monkeypatch) -> None:
    store = Store(str(tmp_path / "store"))
    rows = build_features(store)
    for row in rows:  # as the features stage writes them: each file records its slide's source identity
        table = mil_run.read_features(store, HASH, row.slide_id)
        inputs = {"source": f"file:{row.slide_id}:size=1:mtime=1", "mpp_override": None}
        write_features(store, HASH, table, {**table.meta, "slide_inputs": inputs, "seconds": 1.0})
    task = write_task(rows, tmp_path / "task.csv")
    settings = settings_for(tmp_path / "store", tmp_path / "work", learning_rates=[5e-3], epochs=1)
    run = plan_run(task, HASH, "mean", settings, store)
    assert train_and_evaluate(run, store, LOG)["status"] == "trained"

    def no_vectors(*args, **kwargs):
        raise AssertionError("a finished run read its vectors")

    real_read = mil_run.read_features
    monkeypatch.setattr(mil_run, "read_features", no_vectors)
    again = plan_run(task, HASH, "mean", settings, store)
    assert again.name == run.name and train_and_evaluate(again, store, LOG)["status"] == "skipped"
    monkeypatch.setattr(mil_run, "read_features", real_read)

    table = real_read(store, HASH, "test_00")  # featured again for the same inputs (only its timing differs)
    write_features(store, HASH, table, {**table.meta, "seconds": 2.5})
    assert plan_run(task, HASH, "mean", settings, store).name == run.name
    planned = plan_run(task, HASH, "mean", settings, store)
    moved = {**table.meta["slide_inputs"], "source": "file:test_00:size=2:mtime=2"}  # its slide changed
    write_features(store, HASH, FeatureTable("test_00", np.zeros((4, DIM)), tissue_boxes(4), np.ones(4)),
                   {**table.meta, "slide_inputs": moved})  # fmt: skip
    assert plan_run(task, HASH, "mean", settings, store).name != run.name
    with pytest.raises(mil_run.FeaturesChanged, match="run it again"):
        planned.load_slides(store)  # featured again between naming and reading: not trained under the old name
