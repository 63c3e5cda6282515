"""The linear probes of tasks/clip/probe.py: the paper's nn.Linear + AdamW probe and the logistic one, on synthetic
features (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pathgen.settings import EvalSettings
from tasks.clip.probe import run_probe

CLASSES = ["tumor", "stroma", "necrosis"]


def clusters(n_per_class: int, seed: int, dim: int = 16, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated clusters around orthogonal directions, scaled unevenly (the probe normalises)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    centres = np.eye(dim)[: len(CLASSES)] * 5.0
    x = centres[y] + spread * rng.normal(size=(y.size, dim))
    return x * rng.uniform(0.5, 50.0, size=(y.size, 1)), y


def paper_cfg(**overrides) -> EvalSettings:
    return EvalSettings(probe="paper", **{"probe_shots": 20, "seeds": 2, **overrides})


def test_paper_probe_learns_a_separable_problem():
    train_x, train_y = clusters(40, seed=0)
    test_x, test_y = clusters(30, seed=1)
    result = run_probe(train_x, train_y, test_x, test_y, CLASSES, paper_cfg())
    assert result["method"] == "paper"
    assert result["shots"] == 20 and result["seeds"] == 2 and len(result["runs"]) == 2
    assert result["train_per_class"] == {name: 20 for name in CLASSES}
    assert (result["lr"], result["epochs"], result["batch_size"]) == (1e-2, 20, 32)
    assert result["headline"]["n"] == test_y.size
    assert result["headline"]["balanced_accuracy"] > 0.95
    accuracies = [run["accuracy"] for run in result["runs"]]
    assert result["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert result["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert result["headline"]["weighted_f1"] == pytest.approx(np.mean([r["weighted_f1"] for r in result["runs"]]))


def test_paper_probe_is_near_chance_on_shuffled_labels():
    # features that carry no class: a probe that scored well here would be reading the test labels
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(150, 16)), rng.normal(size=(150, 16))
    train_y, test_y = rng.permutation(np.repeat(np.arange(3), 50)), rng.permutation(np.repeat(np.arange(3), 50))
    result = run_probe(train_x, train_y, test_x, test_y, CLASSES, paper_cfg(probe_shots=50, seeds=2))
    assert 0.2 < result["balanced_accuracy_mean"] < 0.47  # chance is 1/3
    train_x, train_y = clusters(40, seed=0)
    separable = run_probe(train_x, train_y, *clusters(30, seed=1), CLASSES, paper_cfg(probe_shots=50, seeds=2))
    assert separable["balanced_accuracy_mean"] > 0.95  # the same settings learn when there is something to learn


def test_paper_probe_is_deterministic_per_seed_and_keeps_the_callers_rng():
    train_x, train_y = clusters(40, seed=0, spread=2.0)  # overlapping: the sample and init change the scores
    test_x, test_y = clusters(40, seed=1, spread=2.0)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = run_probe(train_x, train_y, test_x, test_y, CLASSES, paper_cfg(probe_shots=8, seeds=3))
    assert torch.equal(torch.rand(1), expected_next)  # seeded inside, the global stream is untouched
    again = run_probe(train_x, train_y, test_x, test_y, CLASSES, paper_cfg(probe_shots=8, seeds=3))
    assert first["runs"] == again["runs"]
    confusions = {str(run["confusion"]) for run in first["runs"]}
    assert len(confusions) > 1, "different seeds must sample and initialise differently"


def test_paper_probe_takes_all_of_a_class_with_fewer_than_k():
    train_x, train_y = clusters(30, seed=0)
    keep = (train_y != 2) | (np.arange(train_y.size) % 30 < 3)  # necrosis keeps only 3 training samples
    test_x, test_y = clusters(20, seed=1)
    result = run_probe(train_x[keep], train_y[keep], test_x, test_y, CLASSES, paper_cfg(probe_shots=10, seeds=1))
    assert result["train_per_class"] == {"tumor": 10, "stroma": 10, "necrosis": 3}
    assert result["accuracy_std"] == 0.0  # one seed: no spread
    assert result["runs"][0]["per_class_recall"]["necrosis"] > 0.9


def test_logistic_probe_has_method_and_headline():
    train_x, train_y = clusters(20, seed=0)
    test_x, test_y = clusters(20, seed=1)
    result = run_probe(train_x, train_y, test_x, test_y, CLASSES, EvalSettings(shots=[2], seeds=2))
    assert result["method"] == "logistic"
    assert set(result) >= {"full", "shots", "headline"} and "2" in result["shots"]
    assert result["headline"] == {k: result["full"][k] for k in ("n", "accuracy", "balanced_accuracy", "weighted_f1")}
    assert result["headline"]["accuracy"] > 0.95


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "train_y": a["train_y"][:-1]}, "train_x has 30 rows but train_y has 29"),
        (lambda a: {**a, "test_x": a["test_x"][:, :8]}, "feature dimensions"),
        (lambda a: {**a, "train_x": a["train_x"][:, 0]}, r"train_x must be a non-empty \[N, D\]"),
        (lambda a: {**a, "test_x": np.full_like(a["test_x"], np.nan)}, "NaN"),
        (lambda a: {**a, "train_y": np.zeros_like(a["train_y"])}, "at least two classes in the training set"),
        (lambda a: {**a, "test_y": a["test_y"] + 1}, "test_y has labels outside 0..2"),
        (lambda a: {**a, "classes": ["tumor"]}, "at least two classes"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    train_x, train_y = clusters(10, seed=0)
    test_x, test_y = clusters(10, seed=1)
    args = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": CLASSES}
    for cfg in (paper_cfg(seeds=1), EvalSettings()):
        with pytest.raises(ValueError, match=message):
            run_probe(**change(args), cfg=cfg)


def test_probe_settings_are_bounded():
    assert EvalSettings().probe == "logistic"
    paper = EvalSettings(probe="paper")
    assert (paper.probe_shots, paper.probe_lr, paper.probe_epochs, paper.probe_batch_size) == (256, 1e-2, 20, 32)
    for bad in ({"probe": "svm"}, {"probe_shots": 0}, {"probe_lr": 0.0}, {"probe_epochs": 0}):
        with pytest.raises(ValidationError):
            EvalSettings(**bad)


def test_paper_probe_on_the_drawn_rows_alone_equals_the_probe_on_every_row():
    """A caller may embed only the union of the seeds' draws (PCam's 262,144 train patches): same numbers."""
    from tasks.clip.probe import paper_draws

    train_x, train_y = clusters(40, seed=0, spread=2.0)
    test_x, test_y = clusters(20, seed=1, spread=2.0)
    cfg = paper_cfg(probe_shots=6, seeds=3)
    whole = run_probe(train_x, train_y, test_x, test_y, CLASSES, cfg)
    draws = paper_draws(train_y, cfg)
    union = np.unique(np.concatenate(draws))
    assert union.size < train_y.size
    mapped = [np.searchsorted(union, d) for d in draws]
    part = run_probe(train_x[union], train_y[union], test_x, test_y, CLASSES, cfg, draws=mapped)
    assert part["runs"] == whole["runs"] and part["train_per_class"] == whole["train_per_class"]
    with pytest.raises(ValueError, match="one per seed"):
        run_probe(train_x, train_y, test_x, test_y, CLASSES, cfg, draws=draws[:1])


@pytest.mark.parametrize("probe", ["paper", "logistic"])
def test_a_class_absent_from_the_training_side_is_named(probe):
    train_x, train_y = clusters(20, seed=0)
    test_x, test_y = clusters(10, seed=1)
    keep = train_y != 2
    cfg = paper_cfg(probe_shots=5, seeds=1) if probe == "paper" else EvalSettings(shots=[], seeds=1)
    result = run_probe(train_x[keep], train_y[keep], test_x, test_y, CLASSES, cfg)
    assert result["untrained_classes"] == ["necrosis"]
    assert run_probe(train_x, train_y, test_x, test_y, CLASSES, cfg)["untrained_classes"] == []
