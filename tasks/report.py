"""What a store holds, read from the store alone: slides by status with failures grouped by reason, patches, pairs
per agents_hash with their caption statistics (``tasks.captions.stats``), PathGen-CLIP runs and evaluations, the
whole-slide tasks (one table per task: every encoder and MIL model evaluated on it side by side, and the slide
features per encoder), and where to look at the pictures.
``pathgen status`` prints it; the factory flow publishes it as a markdown artifact, with the run's own throughput
added.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from tasks.benchmark.summary import BENCHMARKS, newest_benchmark, report_lines
from tasks.captions.stats import read_pairs, stats_lines
from tasks.mil.metrics import mean_std_text
from tasks.reviews.report import review_lines, review_report
from tasks.slides.shard import read_shard
from tasks.store.objects import Store
from tasks.tables import md_table, text_table

MIL_EVAL = "eval/mil"  # eval/mil/<run>/<task>.json: one whole-slide task's results of one MIL run
PICTURES_LISTED = 12  # slides whose thumbnail and selection picture the report links
READ_THREADS = 16  # slide records are small objects: on S3 their latency, not bandwidth, bounds the read


REASON_CODE_CHARS = 80
_PATH = re.compile(r"\S*(?:://|/)\S*")  # a path or URL: differs from slide to slide
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")  # a number on its own, not a digit inside a name


def reason_code(error: str | None, slide_id: str = "") -> str:
    """The kind of failure a message tells, as the key that groups alike ones: its first clause (up to ``:``,
    ``;`` or ``(``) with the slide's id, paths, URLs and numbers on their own taken out. A key only: the report
    shows each group's first message whole, never this."""
    text = error or "unknown error"
    if slide_id:
        text = text.replace(slide_id, "<slide>")
    head = re.split(r"[:;(]", _PATH.sub("<path>", text), maxsplit=1)[0].strip() or "unknown error"
    head = _NUMBER.sub("N", head)
    return head if len(head) <= REASON_CODE_CHARS else head[: REASON_CODE_CHARS - 3] + "..."


def store_report(store: Store) -> dict[str, Any]:
    """Everything :func:`markdown` and :func:`text` show, as plain data."""
    records = _slide_records(store)
    return {
        "store": store.url,
        "slides": _slides(store, records),
        "pairs": _pairs(store, {r["slide_id"]: r.get("project") for r in records if "slide_id" in r}),
        "instruct": _instruct(store),
        "clip_runs": _clip_runs(store),
        "llava_runs": _llava_runs(store),
        "evaluations": _evaluations(store),
        "mil": mil_report(store),
        "benchmark": newest_benchmark(store),
        "contact_sheets": [store.uri(k) for k in store.list("reports", ".png")],
        "reviews": review_report(store),
    }


def _slide_records(store: Store) -> list[dict[str, Any]]:
    keys = store.list("slides", "slide.json")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(store.read_json, keys))


def _slides(store: Store, records: list[dict[str, Any]]) -> dict[str, Any]:
    failures: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r["slide_id"]):
        if record.get("status") == "failed":
            code = reason_code(record.get("error"), record["slide_id"])
            group = failures.setdefault(code, {"slides": [], "example": record.get("error") or "unknown error"})
            group["slides"].append(record["slide_id"])
    seconds = [_total_seconds(r) for r in records if r.get("status") == "ok" and _total_seconds(r) is not None]
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


def _total_seconds(record: dict[str, Any]) -> float | None:
    seconds = record.get("seconds")
    return seconds.get("total") if isinstance(seconds, dict) else None


def _rows(store: Store, key: str, columns: list[str]):
    """The shard's ``columns`` that it has (an older shard may lack one)."""
    with store.open(key) as handle:
        names = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.names
        return read_shard(handle, [c for c in columns if c in names])


def _footer(store: Store, key: str) -> pq.FileMetaData:
    """A shard's Parquet footer alone (row counts, column statistics): the rows are never read."""
    with store.open(key) as handle:
        return pq.ParquetFile(handle, pre_buffer=False).metadata


def _item_failures(store: Store, keys: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Failed items by reason code (``stage:reason`` where the shard has stages), each with the first one's
    detail whole: what the reply or the check said; and each failed table's row count."""
    groups: dict[str, dict[str, Any]] = {}
    rows: dict[str, int] = {}
    for key in keys:
        table = _rows(store, key, ["stage", "reason", "detail"])
        rows[key] = table.num_rows
        for row in table.to_pylist():
            code = f"{row['stage']}:{row['reason']}" if "stage" in row else row["reason"]
            group = groups.setdefault(code, {"count": 0, "example": row.get("detail")})
            group["count"] += 1
    return dict(sorted(groups.items(), key=lambda item: -item[1]["count"])), rows


def _pairs(store: Store, projects: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per agents_hash: pairs and slides, failed items by reason, and the caption statistics, each pair shard and
    failed table read once; ``projects`` (slide id -> project of its slide record) places failures of slides
    without pairs."""
    pair_keys, failed_keys = store.list("pairs", ".parquet"), store.list("failed", ".parquet")
    found = []
    for agents_hash in sorted({k.split("/")[1] for k in pair_keys + failed_keys}):
        pairs = [k for k in pair_keys if k.split("/")[1] == agents_hash]
        failed = [k for k in failed_keys if k.split("/")[1] == agents_hash]
        failures, failed_rows = _item_failures(store, failed)
        read = read_pairs(store, pairs, failed_rows, projects)
        found.append(
            {
                "agents_hash": agents_hash,
                "slides": len(pairs),
                "pairs": read.pairs,
                "failed_items": sum(group["count"] for group in failures.values()),
                "failures": failures,
                "random_weights": read.random_weights,
                "prefix": store.uri(f"pairs/{agents_hash}"),
                "captions": read.captions,
            }
        )
    return found


def _instruct(store: Store) -> list[dict[str, Any]]:
    """Instruction conversations per instruct_hash, and their failed items by stage and reason."""
    shards, failed_keys = store.list("instruct", ".parquet"), store.list("failed-instruct", ".parquet")
    found = []
    for instruct_hash in sorted({k.split("/")[1] for k in shards + failed_keys}):
        mine = [k for k in shards if k.split("/")[1] == instruct_hash]
        failed = [k for k in failed_keys if k.split("/")[1] == instruct_hash]
        found.append(
            {
                "instruct_hash": instruct_hash,
                "slides": len(mine),
                "conversations": sum(_footer(store, k).num_rows for k in mine),
                "failures": _item_failures(store, failed)[0],
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
        if key.startswith((f"{MIL_EVAL}/", f"{BENCHMARKS}/")):
            continue  # whole-slide results and benchmark summaries: their own tables (mil_report, newest_benchmark)
        result = store.read_json(key)
        if not isinstance(result, dict):
            continue
        headline = {}
        probe = result.get("linear_probe") or {}
        probe = probe.get("headline") or probe.get("full")  # "full": how results were written before the headline
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
    """The report as text, section by section; ``link(text, key)`` renders a store key (plain, or a hyperlink)."""
    return [
        *_slide_lines(report),
        *_pair_lines(report, link),
        *_instruct_lines(report, link),
        *_model_lines(report),
        *_picture_lines(report["slides"]["pictures"], report["contact_sheets"], link),
    ]


def _slide_lines(report: dict[str, Any]) -> list[str]:
    slides = report["slides"]
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(slides["by_status"].items())) or "none"
    lines = [f"Store: {report['store']}", "", f"Slides: {slides['total']} ({statuses}); {slides['patches']} patches"]
    if slides["median_seconds_per_slide"] is not None:
        lines.append(
            f"Extraction: median {slides['median_seconds_per_slide']} s per extracted slide (failed ones left out)"
        )
    if slides["random_selection"]:
        lines.append(f"RANDOM WEIGHTS: {slides['random_selection']} slides selected with random-weight embeddings")
    for code, group in slides["failures"].items():
        ids = group["slides"]
        lines.append(f"  failed x{len(ids)}, {code}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
        lines.append(f"    for example {ids[0]}: {group['example']}")
    return lines


def _pair_lines(report: dict[str, Any], link) -> list[str]:
    lines = []
    for pairs in report["pairs"]:
        line = f"Pairs {pairs['agents_hash']}: {pairs['pairs']} pairs from {pairs['slides']} slides, "
        line += f"{pairs['failed_items']} failed items; {link(pairs['prefix'], pairs['prefix'])}"
        lines.append(line + (" (RANDOM WEIGHTS: captions are noise)" if pairs["random_weights"] else ""))
        lines += stats_lines(pairs.get("captions") or {})
        lines += _item_failure_lines(pairs["failures"])
    lines += review_lines(report.get("reviews"), {p["agents_hash"]: p["pairs"] for p in report["pairs"]}, link)
    return lines


def _instruct_lines(report: dict[str, Any], link) -> list[str]:
    lines = []
    for found in report.get("instruct", []):
        lines.append(
            f"Instruct {found['instruct_hash']}: {found['conversations']} conversations from {found['slides']} "
            f"slides; {link(found['prefix'], found['prefix'])}"
        )
        lines += _item_failure_lines(found["failures"])
    return lines


def _model_lines(report: dict[str, Any]) -> list[str]:
    """PathGen-LLaVA and PathGen-CLIP stages, then evaluations' headline metrics."""
    lines = []
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
    return lines


def _picture_lines(pictures: list[dict[str, Any]], contact_sheets: list[str], link) -> list[str]:
    lines = ["Pictures:"] if pictures or contact_sheets else []
    for picture in pictures:
        found = [link(name, picture[name]) for name in ("thumbnail", "selection") if picture[name]]
        lines.append(f"  {picture['slide_id']}: " + ", ".join(found))
    for sheet in contact_sheets:
        lines.append(f"  contact sheet: {link(sheet.rsplit('/', 1)[1], sheet)}")
    return lines


def _item_failure_lines(failures: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for code, group in failures.items():
        lines.append(f"  failed x{group['count']}, {code}")
        if group["example"]:
            lines.append(f"    for example: {' '.join(str(group['example']).split())}")
    return lines


def text(report: dict[str, Any]) -> str:
    tables = _mil_lines(report.get("mil"), _text_table, str) + report_lines(report.get("benchmark"), _text_table, str)
    return "\n".join(_lines(report, lambda name, uri: uri) + tables)


def markdown(report: dict[str, Any], title: str = "PathGen Factory report", extra: list[str] | None = None) -> str:
    """The report as markdown for a Prefect artifact; ``extra`` lines (the run's own figures) go first."""
    body = [_md_item(line) + "  " for line in _lines(report, _md_link)]
    tables = _mil_lines(report.get("mil"), md_table, _md_heading)
    tables += report_lines(report.get("benchmark"), md_table, lambda line: f"## {line.removesuffix(':')}")
    return "\n".join([f"# {title}", "", *(extra or []), "", *body, *([""] + tables if tables else [])])


def _md_item(line: str) -> str:
    """Indented lines as list items: two spaces a failure group, four its example."""
    if line.startswith("    "):
        return "  - " + line.strip()
    return "- " + line.strip() if line.startswith("  ") else line


def _md_link(name: str, uri: str) -> str:
    return f"[{name}]({uri})"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)


# -- whole-slide tasks -------------------------------------------------------------------------------------------

MIL_METRICS = (("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"),
               ("accuracy", "accuracy"))  # fmt: skip
MIL_COLUMNS = ("encoder", "model", *(title for _, title in MIL_METRICS), "run", "lr")


def mil_report(store: Store) -> dict[str, Any]:
    """The whole-slide tasks: ``tasks``, one per task file (name and content), each with one row per evaluated
    (encoder, MIL model) run; ``features``, each features hash with its encoder and slide counts."""
    keys = [k for k in store.list(MIL_EVAL, ".json") if k.count("/") == 3]  # eval/mil/<run>/<task>.json
    with ThreadPoolExecutor(READ_THREADS) as pool:
        results = list(pool.map(store.read_json, keys))
    tasks: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, dict) and "mean" in result:
            name = result.get("task") or key.rsplit("/", 1)[1].removesuffix(".json")
            tasks.setdefault((name, result.get("task_sha256") or ""), []).append(_mil_row(key, result))
    return {
        "tasks": [
            {"task": name, "task_sha256": sha, "rows": sorted(rows, key=lambda r: (r["encoder"], r["model"]))}
            for (name, sha), rows in sorted(tasks.items())
        ],
        "features": _features(store),
    }


def _mil_row(key: str, result: dict[str, Any]) -> dict[str, Any]:
    features = result.get("features") or {}
    encoder = features.get("encoder")
    if isinstance(encoder, dict):
        label = encoder.get("spec") or encoder.get("name") or "?"
    else:  # an h5 folder made elsewhere: its encoder is what its files say, if anything
        label = encoder or f"h5 {features.get('source')}"
    mean, std = result.get("mean") or {}, result.get("std") or {}
    return {
        "encoder": str(label),
        "random_weights": bool(result.get("random_weights") or features.get("random_weights")),
        "model": str(result.get("model")),
        "metrics": {name: (mean.get(name), std.get(name)) for name, _ in MIL_METRICS},
        "run": result.get("run") or key.split("/")[2],
        "chosen_lr": result.get("chosen_lr"),
        "features": features.get("source"),
        "eval": key,
    }


def _features(store: Store) -> list[dict[str, Any]]:
    from tasks.features.store import featured_slides, features_hashes, manifest_key

    found = []
    for features_hash in features_hashes(store):
        manifest = store.read_json(manifest_key(features_hash))
        encoder = manifest.get("encoder") or {}
        failed = store.list(f"features/{features_hash}/failed", ".json")
        found.append(
            {
                "features_hash": features_hash,
                "encoder": encoder.get("spec") or encoder.get("name") or "?",
                "random_weights": bool(encoder.get("random_weights")),
                "slides": len(featured_slides(store, features_hash)),
                "failed": len(failed),
                "prefix": store.uri(f"features/{features_hash}"),
            }
        )
    return found


def _mil_lines(mil: dict[str, Any] | None, table, heading) -> list[str]:
    """The "Whole-slide tasks" section: one table per task, then the features hashes; ``table(header, rows)``
    renders a table as lines and ``heading(text)`` a heading (plain text or markdown)."""
    if not mil or not (mil["tasks"] or mil["features"]):
        return []
    lines = [heading("Whole-slide tasks (mean ± std over seeds, test split):")]
    for task in mil["tasks"]:
        sha = f", task file sha256 {task['task_sha256'][:12]}" if task["task_sha256"] else ""
        rows = [_mil_cells(row) for row in task["rows"]]
        lines += ["", heading(f"Task {task['task']}{sha}:"), *table(MIL_COLUMNS, rows)]
    if mil["features"]:
        header = ("features hash", "encoder", "slides", "failed", "where")
        rows = [
            [f["features_hash"], _encoder_cell(f["encoder"], f["random_weights"]), str(f["slides"]),
             str(f["failed"]), f["prefix"]]
            for f in mil["features"]
        ]  # fmt: skip
        lines += ["", heading("Slide features:"), *table(header, rows)]
    return lines


def _mil_cells(row: dict[str, Any]) -> list[str]:
    metrics = [mean_std_text(*row["metrics"][name]) for name, _ in MIL_METRICS]
    lr = f"{row['chosen_lr']:g}" if isinstance(row["chosen_lr"], int | float) else "n/a"
    return [_encoder_cell(row["encoder"], row["random_weights"]), row["model"], *metrics, str(row["run"]), lr]


def _encoder_cell(label: str, random_weights: bool) -> str:
    return f"{label} (RANDOM WEIGHTS)" if random_weights else label


def _text_table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return text_table(header, rows, indent="  ")  # indented under its heading


def _md_heading(line: str) -> str:
    return f"{'##' if line.startswith('Whole-slide') else '###'} {line.removesuffix(':')}"
