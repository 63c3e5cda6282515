"""Slide-classification metrics: pure functions of the true class indices and the predicted class probabilities.

``labels`` is a length-S sequence of class indices in ``0..C-1``; ``probabilities`` is S x C (each row one slide's
softmax). The prediction is the arg-max class. Conventions (those of scikit-learn, which the tests check by hand):

- balanced accuracy: the mean recall over the classes PRESENT in ``labels`` (a class with no slide has no recall);
- macro-F1: the mean F1 over the classes present in ``labels`` or in the predictions (a class neither true nor
  predicted anywhere says nothing, so it is left out rather than counted as 0 or 1);
- mean and standard deviation over seeds (:func:`mean_std`): the SAMPLE standard deviation (ddof 1), 0 for one
  seed, as every summary of the MIL stage reports it (test.json, the eval JSON, the CLI's mean±std);
- AUC: binary ROC AUC of the positive class (index 1) probability; for more classes the macro mean of the
  one-vs-rest AUCs. It is undefined when some class has no slide (no positives or no negatives to rank), and is then
  ``None`` with the reason, never a crash or a made-up 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_arrays(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        raise ValueError(
            f"metrics need S labels and an S x C probability matrix with C >= 2; got {y.shape[0]} labels and "
            f"probabilities of shape {p.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be class indices in 0..{p.shape[1] - 1}; got {sorted(set(y.tolist()))}")
    return y, p


def predictions(probabilities: Sequence[Sequence[float]]) -> np.ndarray:
    """The arg-max class of each row (ties go to the lower index)."""
    return np.asarray(probabilities, dtype=np.float64).argmax(axis=1)


def confusion_matrix(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> list[list[int]]:
    """C x C counts: row = true class, column = predicted class."""
    y, p = _as_arrays(labels, probabilities)
    matrix = np.zeros((p.shape[1], p.shape[1]), dtype=np.int64)
    np.add.at(matrix, (y, predictions(p)), 1)
    return matrix.tolist()


def accuracy(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> float:
    y, p = _as_arrays(labels, probabilities)
    return float((predictions(p) == y).mean())


def per_class_recall(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> list[float | None]:
    """Recall of each class; ``None`` for a class with no slide in ``labels``."""
    matrix = np.asarray(confusion_matrix(labels, probabilities))
    support = matrix.sum(axis=1)
    return [float(matrix[c, c] / support[c]) if support[c] else None for c in range(matrix.shape[0])]


def balanced_accuracy(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> float:
    recalls = [r for r in per_class_recall(labels, probabilities) if r is not None]
    return float(np.mean(recalls))


def macro_f1(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> float:
    matrix = np.asarray(confusion_matrix(labels, probabilities))
    true_pos = np.diag(matrix)
    denominators = matrix.sum(axis=0) + matrix.sum(axis=1)  # 2TP + FP + FN
    seen = denominators > 0
    return float(np.mean(2 * true_pos[seen] / denominators[seen]))


def auc(labels: Sequence[int], probabilities: Sequence[Sequence[float]]) -> tuple[float | None, str | None]:
    """``(auc, None)``, or ``(None, reason)`` when some class has no slide and the AUC is undefined."""
    from sklearn.metrics import roc_auc_score  # here: pathgen status imports this module for its formats

    y, p = _as_arrays(labels, probabilities)
    n_classes = p.shape[1]
    absent = [c for c in range(n_classes) if not (y == c).any()]
    if absent:
        return None, f"AUC undefined: class(es) {absent} have no slide among the {y.size} evaluated"
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1])), None
    # row-normalised: sklearn's one-vs-rest refuses rows that do not sum to 1 within its tolerance
    scores = p / p.sum(axis=1, keepdims=True)
    return float(roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=list(range(n_classes)))), None


def classification_metrics(
    labels: Sequence[int], probabilities: Sequence[Sequence[float]], class_names: Sequence[str] | None = None
) -> dict:
    """Every metric above in one JSON-ready dict; per-class recall keyed by class name when names are given."""
    y, p = _as_arrays(labels, probabilities)
    names = list(class_names) if class_names is not None else [str(c) for c in range(p.shape[1])]
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} class names for {p.shape[1]} probability columns")
    auc_value, auc_reason = auc(y, p)
    return {
        "n_slides": int(y.size),
        "accuracy": accuracy(y, p),
        "balanced_accuracy": balanced_accuracy(y, p),
        "macro_f1": macro_f1(y, p),
        "auc": auc_value,
        "auc_undefined_reason": auc_reason,
        "per_class_recall": dict(zip(names, per_class_recall(y, p), strict=True)),
        "confusion_matrix": confusion_matrix(y, p),
        "classes": names,
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of per-seed values; ``(None, None)`` when any
    is undefined (an AUC without both classes), so a summary never averages over a subset of the seeds."""
    if not values or any(v is None for v in values):
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


STD_DEFINITION = "sample standard deviation over seeds (ddof 1; 0 for one seed)"


def mean_std_text(mean: object, std: object, digits: int = 3, missing: str | None = "n/a") -> str | None:
    """``"0.912 ± 0.013"`` at ``digits`` decimals, the one way every MIL summary prints a metric over seeds (the CLI,
    the flow's artifact, the report, the factory's table); ``missing`` when the mean is undefined (an AUC without
    both classes in the test split), std 0 when it is absent."""
    if isinstance(mean, bool) or not isinstance(mean, int | float):
        return missing
    spread = std if isinstance(std, int | float) and not isinstance(std, bool) else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"
