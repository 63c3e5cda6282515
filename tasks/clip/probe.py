"""Linear probes on frozen image features: the project's logistic regression and the PathGen-CLIP paper's probe.

``eval.probe`` picks one:

- ``logistic``: :func:`tasks.clip.metrics.linear_probe` (scikit-learn logistic regression on the full training
  split, then ``eval.shots`` k-shot fits over ``eval.seeds`` samplings).
- ``paper``: the linear probe of PathGen-1.6M (ICLR 2025, arXiv 2407.00203): a single linear layer (torch
  ``nn.Linear``) on the frozen image features, trained with AdamW (``eval.probe_lr``, 1e-2) in batches of
  ``eval.probe_batch_size`` (32) for ``eval.probe_epochs`` (20) epochs on ``eval.probe_shots`` (256) training
  samples per class, repeated for seeds ``0..eval.seeds-1`` and reported as mean and standard deviation. The paper
  does not state a weight decay, so AdamW keeps torch's default (0.01); the result records it.

Both probes L2-normalise the features first: CLIP models compare features by cosine, so a feature's norm carries
no class information, and it differs by orders of magnitude between models; without the normalisation one learning
rate would suit one model and not the next, and the paper probe and the logistic probe would not see the same
inputs. The paper probe runs on the CPU (it is tiny: features x classes weights) with every random choice -- the
per-class sample, the layer's initial weights and the batch order -- drawn from the seed, so a seed gives the same
numbers on every run.

Both return ``{"method", "headline": {"n", "accuracy", "balanced_accuracy", "weighted_f1"}, "untrained_classes",
...}``: the headline is what tables show (logistic: the full-train-set fit; paper: the means over the seeds), and
``untrained_classes`` names the classes of the scored side that the training side lacks (a derived split can put
all of a class on one side): the probe cannot predict them, so its numbers are low for that reason alone.

The paper probe's samples are fixed by the labels and seeds alone (:func:`paper_draws`), so a caller can draw them
first and embed only those images (PCam trains on 256 of 262,144 patches per class) and pass ``draws``: the result
is the same as with the features of every training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pathgen.settings import EvalSettings
from tasks.clip.metrics import _k_shot_indices, _l2_normalise, _labels, classification_metrics, linear_probe

# torch.optim.AdamW's default; the paper names AdamW and its learning rate but no weight decay
PAPER_WEIGHT_DECAY = 0.01
_HEADLINE_KEYS = ("n", "accuracy", "balanced_accuracy", "weighted_f1")
_AVERAGED = ("accuracy", "balanced_accuracy", "weighted_f1")


def _features(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] array of image features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values; re-embed the images (a broken model or image?)")
    return x


def _checked_inputs(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any, classes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least two classes, got {classes!r}")
    tx, vx = _features(train_x, "train_x"), _features(test_x, "test_x")
    ty, vy = _labels(train_y, len(classes), "train_y"), _labels(test_y, len(classes), "test_y")
    if tx.shape[1] != vx.shape[1]:
        raise ValueError(f"train_x has {tx.shape[1]} feature dimensions but test_x has {vx.shape[1]}; embed both alike")
    for x, y, what in ((tx, ty, "train"), (vx, vy, "test")):
        if x.shape[0] != y.size:
            raise ValueError(f"{what}_x has {x.shape[0]} rows but {what}_y has {y.size} labels; they must pair up")
    if np.unique(ty).size < 2:
        raise ValueError("a linear probe needs at least two classes in the training set; add images of another class")
    return tx, ty, vx, vy


def _headline(metrics: dict) -> dict:
    return {key: metrics[key] for key in _HEADLINE_KEYS}


def train_linear(
    x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, lr: float, epochs: int, batch_size: int
) -> nn.Linear:
    """An ``nn.Linear`` fitted by AdamW with cross-entropy; initial weights and batch order come from ``seed``."""
    inputs = torch.as_tensor(x, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.int64)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        layer = nn.Linear(inputs.shape[1], n_classes)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=PAPER_WEIGHT_DECAY)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=order).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(layer(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return layer


def _predict(layer: nn.Linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return layer(torch.as_tensor(x, dtype=torch.float32)).argmax(dim=1).numpy().astype(np.int64)


def _mean_std(runs: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in _AVERAGED:
        values = np.array([run[key] for run in runs])
        out[f"{key}_mean"] = float(values.mean())
        # sample std over the seeds, as papers report it; one seed has no spread
        out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return out


def paper_draws(train_y: np.ndarray | Sequence[int], cfg: EvalSettings) -> list[np.ndarray]:
    """Per seed ``0..eval.seeds-1``, the sorted training rows the paper probe fits on: ``eval.probe_shots`` per
    class (all of a class that has fewer), drawn with that seed."""
    y = np.asarray(train_y, dtype=np.int64).ravel()
    return [_k_shot_indices(y, cfg.probe_shots, np.random.default_rng(seed)) for seed in range(cfg.seeds)]


def paper_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: list[str],
    cfg: EvalSettings,
    draws: list[np.ndarray] | None = None,
) -> dict:
    """The paper's probe on checked, L2-normalised features; see the module docstring. ``draws``: each seed's rows
    of ``train_x`` (:func:`paper_draws` of the full training labels, mapped to the rows given), else drawn here."""
    draws = paper_draws(train_y, cfg) if draws is None else draws
    if len(draws) != cfg.seeds:
        raise ValueError(f"{len(draws)} draws for eval.seeds={cfg.seeds}; give one per seed (paper_draws)")
    runs = []
    for seed, idx in enumerate(draws):
        layer = train_linear(
            train_x[idx], train_y[idx], len(classes), seed, cfg.probe_lr, cfg.probe_epochs, cfg.probe_batch_size
        )
        runs.append({"seed": seed, **classification_metrics(test_y, _predict(layer, test_x), classes)})
    summary = _mean_std(runs)
    counts = np.bincount(train_y, minlength=len(classes))
    return {
        "method": "paper",
        "headline": {"n": int(test_y.size), **{key: summary[f"{key}_mean"] for key in _AVERAGED}},
        "shots": cfg.probe_shots,
        # what each seed trained on: probe_shots per class, or all of a class that has fewer
        "train_per_class": {name: int(min(counts[i], cfg.probe_shots)) for i, name in enumerate(classes)},
        "seeds": cfg.seeds,
        "lr": cfg.probe_lr,
        "epochs": cfg.probe_epochs,
        "batch_size": cfg.probe_batch_size,
        "weight_decay": PAPER_WEIGHT_DECAY,
        **summary,
        "runs": runs,
    }


def run_probe(
    train_x: np.ndarray,
    train_y: np.ndarray | Sequence[int],
    test_x: np.ndarray,
    test_y: np.ndarray | Sequence[int],
    classes: list[str],
    cfg: EvalSettings,
    draws: list[np.ndarray] | None = None,
) -> dict:
    """The linear probe ``cfg.probe`` names, trained on (train_x, train_y) and scored on (test_x, test_y);
    ``draws`` (paper probe only): each seed's rows of ``train_x``, drawn before embedding (see the module
    docstring)."""
    tx, ty, vx, vy = _checked_inputs(train_x, train_y, test_x, test_y, classes)
    tx, vx = _l2_normalise(tx), _l2_normalise(vx)
    untrained = {"untrained_classes": untrained_classes(ty, vy, classes)}
    if cfg.probe == "paper":
        return paper_probe(tx, ty, vx, vy, classes, cfg, draws) | untrained
    if draws is not None:
        raise ValueError("draws are the paper probe's samples; the logistic probe fits on every training row")
    result = linear_probe(tx, ty, vx, vy, classes, cfg.probe_c, cfg.shots, cfg.seeds)
    return {"method": "logistic", "headline": _headline(result["full"]), **result} | untrained


def untrained_classes(train_y: np.ndarray, test_y: np.ndarray, classes: list[str]) -> list[str]:
    """The classes the scored side holds and the training side does not: a probe never predicts them."""
    return [classes[i] for i in sorted(set(test_y.tolist()) - set(train_y.tolist()))]
