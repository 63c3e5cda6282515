"""Representative selection from patch embeddings: k-means coverage, retrieval picks, near-duplicate filter.

PathGen-1.6M clusters a slide's N candidate patches with k = ceil(sqrt(1.6 * N / 128)), takes about
``max_per_slide / k`` random members of each cluster, adds the patches that best match the attribute prompts and
the report findings, and drops near-duplicates. Here retrieval picks go first (they are the diagnostically telling
ones), then clusters are visited round-robin in a seeded order, so that when the cap bites every cluster still has
its share. A candidate whose cosine similarity to an already kept patch reaches the threshold is dropped, and the
next member of its cluster is tried instead (``duplicate_threshold=None`` turns the filter off).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

ATTRIBUTES = "retrieval:attributes"
FINDINGS = "retrieval:findings"


def cluster_count(n: int, factor: float = 1.6, fixed: int | None = None) -> int:
    """The paper's rule k = ceil(sqrt(factor * n / 128)), or a fixed k; never more than n."""
    if n <= 0:
        return 0
    k = fixed if fixed is not None else math.ceil(math.sqrt(factor * n / 128))
    return max(1, min(k, n))


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; deterministic for a seed. Returns (labels, centres)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", x, x)
    centres = np.empty((k, x.shape[1]), np.float32)
    centres[0] = x[rng.integers(n)]
    closest = np.maximum(sq - 2 * x @ centres[0] + centres[0] @ centres[0], 0)
    for j in range(1, k):
        total = float(closest.sum())
        index = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centres[j] = x[index]
        closest = np.minimum(closest, np.maximum(sq - 2 * x @ centres[j] + centres[j] @ centres[j], 0))
    labels = np.full(n, -1, np.int64)
    for _ in range(iterations):
        distances = sq[:, None] - 2 * (x @ centres.T) + np.einsum("ij,ij->i", centres, centres)[None, :]
        new_labels = distances.argmin(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k).astype(np.float32)
        empty = counts == 0
        if empty.any():  # re-seed an empty cluster with the point farthest from its centre
            far = np.argsort(-distances[np.arange(n), labels])[: int(empty.sum())]
            sums[empty], counts[empty] = x[far], 1
        centres = sums / counts[:, None]
    return labels, centres


@dataclass
class Selection:
    indices: list[int]  # into the candidates, in the order they were kept
    reasons: dict[int, list[str]]
    labels: np.ndarray  # cluster of every candidate
    k: int
    dropped_duplicates: int
    picks: dict[str, int] = field(default_factory=dict)


class _Kept:
    """Kept patches and their embeddings; answers 'is this a near-duplicate of something kept?'."""

    def __init__(self, embeddings: np.ndarray, capacity: int, threshold: float | None) -> None:
        self.embeddings = embeddings
        self.matrix = np.zeros((capacity, embeddings.shape[1]), np.float32)
        self.order: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.threshold = threshold
        self.duplicates = 0

    def full(self) -> bool:
        return len(self.order) >= len(self.matrix)

    def offer(self, index: int, reason: str) -> bool:
        """Keep ``index`` for ``reason`` unless it is a near-duplicate; True when it is (now) kept."""
        if index in self.reasons:
            self.reasons[index].append(reason)
            return True
        if self.full():
            return False
        similar = self.threshold is not None and self.order
        if similar and float((self.matrix[: len(self.order)] @ self.embeddings[index]).max()) >= self.threshold:
            self.duplicates += 1
            return False
        self.matrix[len(self.order)] = self.embeddings[index]
        self.order.append(index)
        self.reasons[index] = [reason]
        return True


def select_representative(
    embeddings: np.ndarray,
    attribute_scores: np.ndarray | None,
    findings_scores: np.ndarray | None,
    *,
    max_per_slide: int,
    top_k: int,
    duplicate_threshold: float | None,
    seed: int,
    clusters: int | None = None,
    cluster_rule_factor: float = 1.6,
) -> Selection:
    n = len(embeddings)
    k = cluster_count(n, cluster_rule_factor, clusters)
    if n == 0:
        return Selection([], {}, np.zeros(0, np.int64), 0, 0)
    labels, _ = kmeans(embeddings, k, seed)
    kept = _Kept(embeddings, max_per_slide, duplicate_threshold)
    _offer_top_scores(kept, ((attribute_scores, ATTRIBUTES), (findings_scores, FINDINGS)), top_k)
    _fill_clusters(kept, labels, k, math.ceil(max_per_slide / k), np.random.default_rng(seed))
    picks = _pick_counts(kept)
    return Selection(kept.order, kept.reasons, labels, k, kept.duplicates, picks)


def _offer_top_scores(kept: _Kept, scored: Iterable[tuple[np.ndarray | None, str]], top_k: int) -> None:
    """The ``top_k`` best-scoring patches of each retrieval score are offered first, under that score's reason."""
    for scores, reason in scored:
        if scores is None or top_k == 0:
            continue
        for index in np.argsort(-scores, kind="stable")[:top_k]:
            kept.offer(int(index), reason)


def _fill_clusters(kept: _Kept, labels: np.ndarray, k: int, quota: int, rng: np.random.Generator) -> None:
    """Each cluster's patches in a seeded order, one pick per cluster per round, up to ``quota`` per cluster.

    Retrieval picks count toward their cluster's share; one pick per cluster per round means a cap that bites
    still covers every cluster."""
    taken = np.bincount(labels[kept.order], minlength=k) if kept.order else np.zeros(k, np.int64)
    queues = [
        [int(i) for i in rng.permutation(np.flatnonzero(labels == c)) if int(i) not in kept.reasons] for c in range(k)
    ]
    heads = [0] * k
    progress = True
    while progress and not kept.full():
        progress = False
        for c in range(k):
            if taken[c] >= quota:
                continue
            while heads[c] < len(queues[c]) and not kept.full():
                heads[c] += 1
                if kept.offer(queues[c][heads[c] - 1], f"cluster:{c}"):
                    taken[c] += 1
                    progress = True
                    break


def _pick_counts(kept: _Kept) -> dict[str, int]:
    """How many kept patches each reason picked (a patch picked for two reasons counts for both)."""
    return {
        "cluster": sum(1 for i in kept.order if any(r.startswith("cluster:") for r in kept.reasons[i])),
        "attributes": sum(1 for i in kept.order if ATTRIBUTES in kept.reasons[i]),
        "findings": sum(1 for i in kept.order if FINDINGS in kept.reasons[i]),
    }
