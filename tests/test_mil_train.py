"""The MIL training core: metrics against hand-computed values, learnability of synthetic witness-instance bags
(and chance with shuffled labels), the lr choice recorded, resume after a kill identical to an uninterrupted run,
the skip of finished runs, and clear errors for missing features or splits."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tasks.mil.metrics import (
    accuracy,
    auc,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    per_class_recall,
)
from tasks.mil.tasks import Task, TaskError, TaskRow, read_task, write_task
from tasks.mil.train import MilRecipe, lr_key, train_mil
from tests.conftest import one_torch_thread

DIM = 8
SPLIT_SIZES = {"train": 40, "val": 16, "test": 40}
SHORT = MilRecipe(epochs=4, learning_rates=(1e-3, 5e-3), hidden_dim=32, acmil_top_k=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Bags of a few dozen 8-dim instances: thread hand-offs cost more than they save on a shared 2-core runner."""
    with one_torch_thread():
        yield


# ------------------------------------------------------------------------------------------------ metrics


BINARY_LABELS = [0, 0, 1, 1, 1]
BINARY_PROBS = [[1 - p, p] for p in (0.1, 0.6, 0.4, 0.8, 0.9)]  # predictions 0, 1, 0, 1, 1

THREE_LABELS = [0, 1, 2, 2]
THREE_PROBS = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]  # predictions 0, 1, 1, 2


def test_binary_metrics_match_hand_computed_values() -> None:
    assert confusion_matrix(BINARY_LABELS, BINARY_PROBS) == [[1, 1], [1, 2]]
    assert accuracy(BINARY_LABELS, BINARY_PROBS) == pytest.approx(3 / 5)
    assert per_class_recall(BINARY_LABELS, BINARY_PROBS) == pytest.approx([1 / 2, 2 / 3])
    assert balanced_accuracy(BINARY_LABELS, BINARY_PROBS) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert macro_f1(BINARY_LABELS, BINARY_PROBS) == pytest.approx((2 / 4 + 4 / 6) / 2)  # 2TP / (2TP + FP + FN)
    # 6 positive/negative pairs; only (0.4 vs 0.6) is ranked wrong
    assert auc(BINARY_LABELS, BINARY_PROBS) == (pytest.approx(5 / 6), None)


def test_three_class_metrics_and_macro_one_vs_rest_auc() -> None:
    assert confusion_matrix(THREE_LABELS, THREE_PROBS) == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert balanced_accuracy(THREE_LABELS, THREE_PROBS) == pytest.approx((1 + 1 + 0.5) / 3)
    assert macro_f1(THREE_LABELS, THREE_PROBS) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # one-vs-rest: class 0 perfectly ranked, class 1 2 of 3 pairs, class 2 3.5 of 4 pairs (one tie)
    value, reason = auc(THREE_LABELS, THREE_PROBS)
    assert reason is None and value == pytest.approx((1 + 2 / 3 + 3.5 / 4) / 3)


def test_auc_undefined_without_a_class_is_none_with_reason_and_the_rest_still_computed() -> None:
    metrics = classification_metrics([1, 1], [[0.3, 0.7], [0.6, 0.4]], class_names=["normal", "tumor"])
    assert metrics["auc"] is None and "class(es) [0]" in metrics["auc_undefined_reason"]
    assert metrics["per_class_recall"] == {"normal": None, "tumor": 0.5}
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)  # mean over the classes present
    # a class neither true nor predicted is left out of macro-F1 rather than counted as 0
    assert macro_f1([0, 1], [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ synthetic data


def _bag(positive: bool, generator: torch.Generator) -> torch.Tensor:
    """A bag of background instances; a positive one holds 3 witness instances shifted on half the dimensions."""
    n = int(torch.randint(16, 33, (1,), generator=generator))
    bag = torch.randn(n, DIM, generator=generator)
    if positive:
        bag[:3, : DIM // 2] += 3.0
    return bag


def _synthetic(tmp_path: Path, data_seed: int = 0, shuffle_labels: bool = False) -> tuple[Task, dict]:
    generator = torch.Generator().manual_seed(data_seed)
    rows, features = [], {}
    for split, size in SPLIT_SIZES.items():
        for i in range(size):
            slide_id, positive = f"{split}_{i:03d}", i % 2 == 1
            features[slide_id] = _bag(positive, generator)
            rows.append(TaskRow(slide_id, "tumor" if positive else "normal", slide_id, split))
    if shuffle_labels:  # within each split, so val still holds both labels
        rng = random.Random(data_seed)
        for split in SPLIT_SIZES:
            labels = [row.label for row in rows if row.split == split]
            rng.shuffle(labels)
            shuffled = iter(labels)
            rows = [replace(row, label=next(shuffled)) if row.split == split else row for row in rows]
    path = write_task(rows, tmp_path / f"task_{data_seed}_{shuffle_labels}.csv")
    return read_task(path), features


def _metrics_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("model_name", ["abmil", "acmil"])
def test_mil_learns_witness_bags_and_records_the_lr_choice(tmp_path: Path, model_name: str) -> None:
    task, features = _synthetic(tmp_path)
    result = train_mil(task, features, model_name, SHORT, tmp_path / "run")
    assert result.classes == ["normal", "tumor"]
    assert result.test["per_seed"]["0"]["auc"] >= 0.9
    assert result.test["mean"]["auc"] == result.test["per_seed"]["0"]["auc"] and result.test["std"]["auc"] == 0.0

    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["classes"] == ["normal", "tumor"] and selection["chosen_lr"] == result.chosen_lr
    for lr in SHORT.learning_rates:  # each grid entry is the best val AUC of that run's epoch lines
        lines = _metrics_lines(tmp_path / "run" / lr_key(lr) / "0" / "metrics.jsonl")
        assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
        assert lines[0]["lr"] == lr and lines[-1]["lr"] < lr  # cosine decay, stepped per epoch
        assert selection["grid"][lr_key(lr)]["mean"] == max(line["val_auc"] for line in lines)
    best = max(SHORT.learning_rates, key=lambda lr: selection["grid"][lr_key(lr)]["mean"])
    assert result.chosen_lr == best
    assert json.loads((tmp_path / "run" / "test.json").read_text())["lr"] == best


def test_shuffled_labels_stay_near_chance(tmp_path: Path) -> None:
    recipe = replace(SHORT, learning_rates=(5e-3,), epochs=3)
    aucs = []
    for data_seed in (1, 2, 3):
        task, features = _synthetic(tmp_path, data_seed, shuffle_labels=True)
        aucs.append(train_mil(task, features, "abmil", recipe, tmp_path / f"run{data_seed}").test["mean"]["auc"])
    assert 0.25 <= sum(aucs) / len(aucs) <= 0.75, aucs


class _Killed(RuntimeError):
    pass


def _kill_after(epoch: int):
    def on_epoch(lr: float, seed: int, record: dict) -> None:
        if record["epoch"] == epoch:
            raise _Killed(f"killed after epoch {epoch}")

    return on_epoch


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_a_run_killed_mid_way_resumes_to_the_same_weights_and_metrics(tmp_path: Path) -> None:
    # ACMIL: its stochastic masking draws from the global RNG, so the saved RNG state must be restored exactly
    task, features = _synthetic(tmp_path)
    recipe = replace(SHORT, learning_rates=(5e-3,), seeds=(0, 1))
    whole = train_mil(task, features, "acmil", recipe, tmp_path / "whole")

    with pytest.raises(_Killed):
        train_mil(task, features, "acmil", recipe, tmp_path / "killed", on_epoch=_kill_after(2))
    folder = tmp_path / "killed" / lr_key(5e-3) / "0"
    assert not (folder / "done.json").exists() and len(_metrics_lines(folder / "metrics.jsonl")) == 2
    with (folder / "metrics.jsonl").open("a") as stream:  # as if killed after an epoch's line, before its state
        stream.write(json.dumps({"epoch": 3, "lr": 0.0, "train_loss": 0.0, "val_loss": 0.0, "val_auc": 0.0}) + "\n")
    resumed_epochs = []
    resumed = train_mil(
        task, features, "acmil", recipe, tmp_path / "killed", on_epoch=lambda lr, s, r: resumed_epochs.append(r)
    )
    assert [r["epoch"] for r in resumed_epochs[:2]] == [3, 4]  # seed 0 picks up after epoch 2, not from scratch

    for seed in ("0", "1"):
        a, b = tmp_path / "whole" / lr_key(5e-3) / seed, tmp_path / "killed" / lr_key(5e-3) / seed
        assert _metrics_lines(a / "metrics.jsonl") == _metrics_lines(b / "metrics.jsonl")
        for name in ("best.pt", "state.pt"):
            wa, wb = _weights(a / name), _weights(b / name)
            assert all(torch.equal(wa[key], wb[key]) for key in wa)
    assert resumed.test == whole.test and resumed.grid == whole.grid


def test_a_finished_run_is_skipped(tmp_path: Path) -> None:
    task, features = _synthetic(tmp_path)
    recipe = replace(SHORT, learning_rates=(5e-3,), epochs=2)
    first = train_mil(task, features, "mean", recipe, tmp_path / "run")
    folder = tmp_path / "run" / lr_key(5e-3) / "0"
    lines = (folder / "metrics.jsonl").read_text()
    (folder / "state.pt").unlink()  # only the completion marker may stop the run from training afresh

    def must_not_train(lr: float, seed: int, record: dict) -> None:
        raise AssertionError("a finished run was trained again")

    again = train_mil(task, features, "mean", recipe, tmp_path / "run", on_epoch=must_not_train)
    assert again.skipped_runs == [f"{lr_key(5e-3)}/0"] and first.skipped_runs == []
    assert again.test == first.test
    assert (folder / "metrics.jsonl").read_text() == lines


# ------------------------------------------------------------------------------------------------ errors


def test_a_slide_without_features_names_the_task_file_and_row(tmp_path: Path) -> None:
    task, features = _synthetic(tmp_path)
    missing = task.split("val")[3]
    del features[missing.slide_id]
    with pytest.raises(TaskError) as error:
        train_mil(task, features, "abmil", SHORT, tmp_path / "run")
    assert str(task.path) in str(error.value) and f"line {missing.line}: {missing.slide_id!r}" in str(error.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_task_without_train_or_val_says_so(tmp_path: Path, split: str) -> None:
    task, features = _synthetic(tmp_path)
    kept = [row for row in task.rows if row.split != split]
    path = write_task(kept, tmp_path / "partial.csv")
    with pytest.raises(TaskError, match=f"no slide has split '{split}'") as error:
        train_mil(read_task(path), features, "abmil", SHORT, tmp_path / "run")
    assert str(path) in str(error.value)


def test_val_without_a_class_refuses_auc_selection(tmp_path: Path) -> None:
    task, features = _synthetic(tmp_path)
    rows = [row for row in task.rows if not (row.split == "val" and row.label == "tumor")]
    path = write_task(rows, tmp_path / "one_class_val.csv")
    with pytest.raises(TaskError, match="val split has no slide labelled tumor"):
        train_mil(read_task(path), features, "abmil", SHORT, tmp_path / "run")


def test_a_tie_on_the_selection_metric_goes_to_the_lower_validation_loss(tmp_path: Path) -> None:
    """Witness bags reach val AUC 1.0 within a few epochs: among the tied epochs the best is the least-loss one,
    not the first (a barely trained checkpoint that happens to rank the few val slides right)."""
    recipe = replace(SHORT, learning_rates=(5e-3,), epochs=6)
    task, features = _synthetic(tmp_path)
    train_mil(task, features, "abmil", recipe, tmp_path / "run")
    folder = tmp_path / "run" / lr_key(5e-3) / "0"
    lines = _metrics_lines(folder / "metrics.jsonl")
    top = max(line["val_auc"] for line in lines)
    tied = [line for line in lines if line["val_auc"] == top]
    assert len(tied) >= 2, lines  # the case under test: several epochs share the best AUC
    expected = min(tied, key=lambda line: (line["val_loss"], line["epoch"]))["epoch"]
    assert expected != tied[0]["epoch"], lines  # the loss decides: the first tied epoch is not the least-loss one
    assert json.loads((folder / "done.json").read_text())["best_epoch"] == expected
