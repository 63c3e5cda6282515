"""What a store holds, read from the store alone: slides by status with failures grouped by reason, patches, pairs
per agents_hash, PathGen-CLIP runs and evaluations, and where to look at the pictures. ``pathgen status`` prints it;
the factory flow publishes it as a markdown artifact, with the run's own throughput added.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from tasks.store.objects import Store

PICTURES_LISTED = 12  # slides whose thumbnail and selection picture the report links
READ_THREADS = 16  # slide records are small objects: on S3 their latency, not bandwidth, bounds the read


def failure_reason(error: str | None, slide_id: str = "") -> str:
    """An error message with what differs from slide to slide (its id, numbers) taken out, so alike errors group."""
    text = (error or "unknown error").replace(slide_id, "<slide>") if slide_id else (error or "unknown error")
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:160]


def store_report(store: Store) -> dict[str, Any]:
    """Everything :func:`markdown` and :func:`text` show, as plain data."""
    return {
        "store": store.url,
        "slides": _slides(store),
        "pairs": _pairs(store),
        "instruct": _instruct(store),
        "clip_runs": _clip_runs(store),
        "llava_runs": _llava_runs(store),
        "evaluations": _evaluations(store),
        "contact_sheets": [store.uri(k) for k in store.list("reports", ".png")],
    }


def _slides(store: Store) -> dict[str, Any]:
    keys = store.list("slides", "slide.json")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        records = list(pool.map(store.read_json, keys))
    failures: dict[str, list[str]] = {}
    for record in records:
        if record.get("status") == "failed":
            reason = failure_reason(record.get("error"), record["slide_id"])
            failures.setdefault(reason, []).append(record["slide_id"])
    seconds = [r["seconds"]["total"] for r in records if isinstance(r.get("seconds"), dict) and "total" in r["seconds"]]
    pictures = [
        {
            "slide_id": r["slide_id"],
            "thumbnail": store.uri(r["thumbnail"]) if r.get("thumbnail") else None,
            "selection": store.uri(r["selection_png"]) if r.get("selection_png") else None,
        }
        for r in records
        if r.get("status") == "ok"
    ][:PICTURES_LISTED]
    return {
        "total": len(records),
        "by_status": dict(Counter(r.get("status", "?") for r in records)),
        "patches": sum(int(r.get("counts", {}).get("kept", 0)) for r in records if r.get("status") == "ok"),
        "random_selection": sum(1 for r in records if r.get("random_weights")),
        "failures": failures,
        "median_seconds_per_slide": round(statistics.median(seconds), 2) if seconds else None,
        "pictures": pictures,
    }


def _rows(store: Store, key: str, columns: list[str] | None = None):
    with store.open(key) as handle:
        return pq.read_table(handle, columns=columns)


def _pairs(store: Store) -> list[dict[str, Any]]:
    pair_keys, failed_keys = store.list("pairs", ".parquet"), store.list("failed", ".parquet")
    found = []
    for agents_hash in sorted({k.split("/")[1] for k in pair_keys + failed_keys}):
        pairs = [k for k in pair_keys if k.split("/")[1] == agents_hash]
        failed = [k for k in failed_keys if k.split("/")[1] == agents_hash]
        count, random = 0, False
        for key in pairs:
            table = _rows(store, key, ["random_weights"])
            count += table.num_rows
            random |= any(table["random_weights"].to_pylist())
        reasons: Counter[str] = Counter()
        for key in failed:
            reasons.update(_rows(store, key, ["reason"])["reason"].to_pylist())
        found.append(
            {
                "agents_hash": agents_hash,
                "slides": len(pairs),
                "pairs": count,
                "failed_items": sum(reasons.values()),
                "failures": dict(reasons.most_common()),
                "random_weights": random,
                "prefix": store.uri(f"pairs/{agents_hash}"),
            }
        )
    return found


def _instruct(store: Store) -> list[dict[str, Any]]:
    """Instruction conversations per instruct_hash, and their failed items by stage and reason."""
    shards, failed_keys = store.list("instruct", ".parquet"), store.list("failed-instruct", ".parquet")
    found = []
    for instruct_hash in sorted({k.split("/")[1] for k in shards + failed_keys}):
        mine = [k for k in shards if k.split("/")[1] == instruct_hash]
        reasons: Counter[str] = Counter()
        for key in (k for k in failed_keys if k.split("/")[1] == instruct_hash):
            table = _rows(store, key, ["stage", "reason"])
            stages, why = table["stage"].to_pylist(), table["reason"].to_pylist()
            reasons.update(f"{a}:{b}" for a, b in zip(stages, why, strict=True))
        found.append(
            {
                "instruct_hash": instruct_hash,
                "slides": len(mine),
                "conversations": sum(_rows(store, k, ["patch_id"]).num_rows for k in mine),
                "failures": dict(reasons.most_common()),
                "prefix": store.uri(f"instruct/{instruct_hash}"),
            }
        )
    return found


def _llava_runs(store: Store) -> list[dict[str, Any]]:
    runs = []
    for key in store.list("models/llava", "run.json"):
        record = store.read_json(key)
        stages = [
            {k: s.get(k) for k in ("stage", "status", "steps", "first_loss", "last_loss", "error")}
            for s in record["stages"]
        ]
        runs.append({"run": key.split("/")[2], "stages": stages, "random_weights": bool(record.get("random_weights"))})
    return runs


def _clip_runs(store: Store) -> list[dict[str, Any]]:
    runs = []
    for key in store.list("models/clip", "run.json"):
        record = store.read_json(key)
        stages = record.get("stages", [])
        runs.append(
            {
                "run": key.split("/")[2],
                "stages": [
                    {k: s.get(k) for k in ("stage", "status", "items", "steps", "final_loss", "checkpoint")}
                    for s in stages
                ],
                "random_weights": bool(record.get("random_weights")),
            }
        )
    return runs


def _evaluations(store: Store) -> list[dict[str, Any]]:
    found = []
    for key in store.list("eval", ".json"):
        result = store.read_json(key)
        if not isinstance(result, dict):
            continue
        headline = {}
        probe = (result.get("linear_probe") or {}).get("full")
        for name, metrics in (("zero_shot", result.get("zero_shot")), ("linear_probe", probe)):
            if isinstance(metrics, dict) and "balanced_accuracy" in metrics:
                headline[f"{name}_balanced_accuracy"] = metrics["balanced_accuracy"]
        retrieval = result.get("retrieval")
        if isinstance(retrieval, dict) and "image_to_text" in retrieval:
            headline["image_to_text_R@5"] = retrieval["image_to_text"].get("R@5")
        overall = result.get("overall")  # a multiple-choice report (eval/mc/<run>/<dataset>.json)
        if isinstance(overall, dict) and "accuracy" in overall:
            headline["multiple_choice_accuracy"] = overall["accuracy"]
        run = key.rsplit("/", 2)[1] if key.startswith("eval/mc/") else key.split("/")[1]
        found.append({"eval": run, "dataset": key.rsplit("/", 1)[1].removesuffix(".json"), "headline": headline})
    return found


# -- rendering ---------------------------------------------------------------------------------------------------


def _lines(report: dict[str, Any], link) -> list[str]:
    slides = report["slides"]
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(slides["by_status"].items())) or "none"
    lines = [f"Store: {report['store']}", "", f"Slides: {slides['total']} ({statuses}); {slides['patches']} patches"]
    if slides["median_seconds_per_slide"] is not None:
        lines.append(f"Extraction: median {slides['median_seconds_per_slide']} s per slide")
    if slides["random_selection"]:
        lines.append(f"RANDOM WEIGHTS: {slides['random_selection']} slides selected with random-weight embeddings")
    for reason, ids in slides["failures"].items():
        lines.append(f"  failed x{len(ids)}: {reason} ({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")
    for pairs in report["pairs"]:
        line = f"Pairs {pairs['agents_hash']}: {pairs['pairs']} pairs from {pairs['slides']} slides, "
        line += f"{pairs['failed_items']} failed items; {link(pairs['prefix'], pairs['prefix'])}"
        lines.append(line + (" (RANDOM WEIGHTS: captions are noise)" if pairs["random_weights"] else ""))
        for reason, count in pairs["failures"].items():
            lines.append(f"  failed x{count}: {reason}")
    for found in report.get("instruct", []):
        lines.append(
            f"Instruct {found['instruct_hash']}: {found['conversations']} conversations from {found['slides']} "
            f"slides; {link(found['prefix'], found['prefix'])}"
        )
        for reason, count in found["failures"].items():
            lines.append(f"  failed x{count}: {reason}")
    for run in report.get("llava_runs", []):
        for stage in run["stages"]:
            if stage["status"] == "no-data":
                lines.append(f"PathGen-LLaVA {run['run']} {stage['stage']}: NOT TRAINED, {stage.get('error')}")
                continue
            lines.append(
                f"PathGen-LLaVA {run['run']} {stage['stage']}: {stage['status']}, {stage.get('steps')} steps, loss "
                f"{_number(stage.get('first_loss'))} -> {_number(stage.get('last_loss'))}"
                + (" (RANDOM WEIGHTS)" if run["random_weights"] else "")
            )
    for run in report["clip_runs"]:
        for stage in run["stages"]:
            lines.append(
                f"PathGen-CLIP {run['run']} {stage['stage']}: {stage['status']}, {stage.get('items')} pairs, "
                f"final loss {_number(stage.get('final_loss'))}"
                + (" (RANDOM WEIGHTS start)" if run["random_weights"] else "")
            )
    for evaluation in report["evaluations"]:
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in evaluation["headline"].items() if isinstance(v, int | float))
        lines.append(f"Eval {evaluation['eval']} on {evaluation['dataset']}: {numbers or 'no headline metric'}")
    pictures = slides["pictures"]
    if pictures or report["contact_sheets"]:
        lines.append("Pictures:")
    for picture in pictures:
        found = [link(name, picture[name]) for name in ("thumbnail", "selection") if picture[name]]
        lines.append(f"  {picture['slide_id']}: " + ", ".join(found))
    for sheet in report["contact_sheets"]:
        lines.append(f"  contact sheet: {link(sheet.rsplit('/', 1)[1], sheet)}")
    return lines


def text(report: dict[str, Any]) -> str:
    return "\n".join(_lines(report, lambda name, uri: uri))


def markdown(report: dict[str, Any], title: str = "PathGen Factory report", extra: list[str] | None = None) -> str:
    """The report as markdown for a Prefect artifact; ``extra`` lines (the run's own figures) go first."""
    body = ["- " + line.strip() if line.startswith("  ") else line for line in _lines(report, _md_link)]
    return "\n".join([f"# {title}", "", *(extra or []), "", *[line + "  " for line in body]])


def _md_link(name: str, uri: str) -> str:
    return f"[{name}]({uri})"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)
