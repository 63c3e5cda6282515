"""Caption statistics per agents_hash in `pathgen status` and the factory report: CLIP-token lengths, the share
trimmed, what the revise agent changed, pairs and failures per TCGA project; read by column, never the images."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.captions.stats import histogram, read_pairs
from tasks.report import markdown, store_report, text
from tasks.store.objects import Store

BREAST = "TCGA-BH-A0AU-01Z-00-DX1"
GLIOMA = "TCGA-DU-7015-01Z-00-DX1"  # failed items only: placed by its barcode


def _pairs(root, slide_id, project, tokens, trimmed, changed, change):
    folder = root / "pairs" / "h1"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(tokens)
    table = {
        "patch_id": [f"{slide_id}-{i}" for i in range(n)],
        "project": pa.array([project] * n, pa.string()),
        "caption_tokens": pa.array(tokens, pa.int16()),
        "caption_trimmed": trimmed,
        "revise_changed": changed,
        "revise_change": pa.array(change, pa.float32()),
        "image": [b"\xff" * 5000] * n,
        "random_weights": [True] * n,
    }
    pq.write_table(pa.table(table), folder / f"{slide_id}.parquet")


def _failed(root, slide_id, count):
    folder = root / "failed" / "h1"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"stage": ["revise"] * count, "reason": ["empty"] * count, "detail": ["no reply"] * count}
    pq.write_table(pa.table(rows), folder / f"{slide_id}.parquet")


def _store(tmp_path):
    root = tmp_path / "store"
    _pairs(root, BREAST, "TCGA-BRCA", [10, 20, 40, 77], [False, False, False, True], [True, False, True, False],
           [0.5, 0.0, 0.25, 0.0])  # fmt: skip
    _pairs(root, "slide-x", None, [30, 30], [False, False], [False, False], [0.0, 0.0])
    old = root / "pairs" / "h1" / "old-1.parquet"  # an older shard: none of the statistics' columns
    pq.write_table(pa.table({"patch_id": ["a", "b", "c"], "random_weights": [True] * 3}), old)
    _failed(root, BREAST, 1)
    _failed(root, GLIOMA, 2)
    _failed(root, "other", 1)
    store = Store(str(root))
    store.write_json("slides/slide-x/slide.json", {"slide_id": "slide-x", "status": "ok", "project": "TCGA-LUAD"})
    return store


def test_statistics_match_the_shards_rows(tmp_path):
    store = _store(tmp_path)
    report = store_report(store)
    stats = report["pairs"][0]["captions"]
    tokens = np.array([10, 20, 40, 77, 30, 30])
    expected = {p: int(np.percentile(tokens, q, method="inverted_cdf")) for p, q in (("p50", 50), ("p90", 90))}
    assert stats["tokens"] | {"histogram": None} == {
        "min": 10, "max": 77, **expected, "histogram": None,
    }  # fmt: skip
    assert [b["count"] for b in stats["tokens"]["histogram"]] == [1, 3, 1, 0, 1]
    assert stats["pairs"] == 9 == report["pairs"][0]["pairs"]
    assert stats["trimmed"] == round(1 / 6, 4)  # of the pairs whose shards record it
    assert stats["revise"] == {"changed": round(2 / 6, 4), "mean_change_of_changed": 0.375,
                               "mean_change_of_all": 0.125}  # fmt: skip
    per = {r["project"]: (r["pairs"], r["failed"]) for r in stats["projects"]}
    # slide-x's pairs name no project: its slide record does; the glioma slide's barcode places its failures
    assert per == {"TCGA-BRCA": (4, 1), "TCGA-LUAD": (2, 0), "TCGA-LGG": (0, 2), "unknown": (3, 1)}
    assert sum(f for _, f in per.values()) == report["pairs"][0]["failed_items"]

    shown = text(report)
    assert "caption CLIP tokens: min 10, p50 30, p90 77, max 77; histogram 1-16: 1, 17-32: 3, 33-48: 1" in shown
    assert "trimmed to fit 16.7%; changed by revise 33.3% (mean word-level change 0.375 of those changed" in shown
    assert (
        "per project: TCGA-BRCA 4 pairs / 1 failed, unknown 3 pairs / 1 failed, TCGA-LUAD 2 pairs / 0 failed, "
        "TCGA-LGG 0 pairs / 2 failed"
    ) in shown  # most pairs first
    assert "- per project: TCGA-BRCA" in markdown(report)


def test_images_are_not_read(tmp_path, monkeypatch):
    """Column projection: asking for the statistics' columns never asks for ``image``."""
    store = _store(tmp_path)
    asked = []
    real = pq.ParquetFile.read

    def spy(self, columns=None, **kwargs):
        asked.append(columns)
        return real(self, columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    read = read_pairs(store, store.list("pairs/h1", ".parquet"), {})
    assert asked and all(columns and "image" not in columns for columns in asked)
    assert (read.pairs, read.random_weights) == (9, True)


def test_status_opens_each_pair_shard_and_failed_table_once(tmp_path, monkeypatch):
    """Row counts, the random-weights flag, the statistics and the failures' reasons come from one read each."""
    store = _store(tmp_path)
    opened = []
    real = Store.open

    def spy(self, key, *args, **kwargs):
        opened.append(key)
        return real(self, key, *args, **kwargs)

    monkeypatch.setattr(Store, "open", spy)
    report = store_report(store)
    shards = [k for k in opened if k.startswith(("pairs/", "failed/"))]
    assert len(shards) == 6 and sorted(shards) == sorted(set(shards))  # three pair shards, three failed tables
    assert (report["pairs"][0]["pairs"], report["pairs"][0]["failed_items"]) == (9, 4)


def test_empty_and_over_long_tallies():
    from collections import Counter

    from tasks.captions.stats import token_summary

    assert token_summary(Counter()) is None
    assert histogram(Counter({78: 2}))[-1] == {"tokens": ">77", "count": 2}
    assert [b["tokens"] for b in histogram(Counter())] == ["1-16", "17-32", "33-48", "49-64", "65-77"]
