"""The benchmark summary: ``eval/benchmark/<run>/summary.json`` and ``summary.md``, one row per task and one column
per model, and the newest summary for the report.

A cell is a model's zero-shot balanced accuracy and support-weighted F1 on a task's test split, or the reason it
has none. A model's mean is over the tasks it has a number for; its difference to the first model is the mean of
the per-task differences over the tasks both have a number for (so a task one of them failed never shifts it), and
equals the difference of the means when both have every task. With ``eval.baselines`` first and the trained
PathGen-CLIP last, the difference is "trained minus baseline".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tasks.benchmark.run import BenchmarkPlan
from tasks.store.objects import Store
from tasks.tables import md_table

BENCHMARKS = "eval/benchmark"
METRICS = ("balanced_accuracy", "weighted_f1")
METRICS_TEXT = "zero-shot balanced accuracy / weighted F1 on each task's test split"


@dataclass
class ModelResults:
    model: str  # as given: ViT-B-16:openai, tiny-random, a checkpoint
    eval_run: str  # its per-task results: eval/<eval_run>/<task>.json
    random_weights: bool
    cells: dict[str, dict[str, Any]]  # task -> cell (tasks.benchmark.run.cell_of)
    rows: dict[str, dict[str, Any]]  # task -> what the row says about its dataset (tasks.benchmark.run.row_of)
    random_why: str | None = None  # why it is RANDOM WEIGHTS (tasks.clip.evaluate.random_weights_why)


def aligned(models: list[ModelResults]) -> list[ModelResults]:
    """The models with their cells under the same task names. A model whose whole task crashed has its cells
    under each unit's name, the dataset's format ("lc25000"), while the others have them under the tasks the
    dataset holds ("lc25000-lung", "lc25000-colon"): such a cell stands for each of those tasks."""
    tasks_of: dict[str, set[str]] = {}
    for column in models:
        for task, row in column.rows.items():
            if row.get("format") and row["format"] != task:
                tasks_of.setdefault(row["format"], set()).add(task)
    out = []
    for column in models:
        cells, rows = dict(column.cells), dict(column.rows)
        for name in [n for n in cells if n in tasks_of]:
            cell, row = cells.pop(name), rows.pop(name, {})
            for task in sorted(tasks_of[name]):
                cells.setdefault(task, dict(cell))
                rows.setdefault(task, {**row, "task": task, "format": name})
        out.append(replace(column, cells=cells, rows=rows))
    return out


def build_summary(plan: BenchmarkPlan, run: str, created: str, models: list[ModelResults]) -> dict[str, Any]:
    models = aligned(models)
    order = {fmt.name: i for i, (fmt, _) in enumerate(plan.found)}
    rows: dict[str, dict[str, Any]] = {}
    for column in models:
        for task, row in column.rows.items():
            known = rows.setdefault(task, dict(row))
            known.update({k: v for k, v in row.items() if v is not None and known.get(k) is None})
    tasks = sorted(rows, key=lambda t: (order.get(rows[t].get("format"), len(order)), t))
    first = models[0] if models else None
    for column in models[1:]:
        for task in tasks:
            cell, base = column.cells.get(task), first.cells.get(task)
            if _ok(cell) and _ok(base):
                cell["difference"] = {m: cell[m] - base[m] for m in METRICS}
    summary_rows = []
    for task in tasks:
        cells = {c.model: c.cells.get(task) or {"status": "failed", "error": "not evaluated"} for c in models}
        summary_rows.append({**rows[task], "cells": cells})
    return {
        "run": run,
        "suite": plan.suite,
        "root": str(plan.root),
        "created": created,
        "metrics": METRICS_TEXT,
        "models": [_model_entry(c, tasks, first) for c in models],
        "rows": summary_rows,
        "missing": [{"format": f.name, "title": f.title, "source": f.source, "layout": f.layout} for f in plan.missing],
        "ignored": [{"format": f.name, "folder": str(folder)} for f, folder in plan.ignored],
        "random_weights": any(c.random_weights for c in models),
        "failed": sum(not _ok(cell) for row in summary_rows for cell in row["cells"].values()),
    }


def _ok(cell: dict[str, Any] | None) -> bool:
    return bool(cell) and cell.get("status") == "ok"


def _model_entry(column: ModelResults, tasks: list[str], first: ModelResults) -> dict[str, Any]:
    done = [column.cells[t] for t in tasks if _ok(column.cells.get(t))]
    mean = {m: sum(c[m] for c in done) / len(done) if done else None for m in METRICS}
    entry: dict[str, Any] = {
        "model": column.model,
        "eval_run": column.eval_run,
        "random_weights": column.random_weights,
        "random_why": column.random_why,
        "mean": {**mean, "tasks": len(done)},
    }
    if column is not first:
        paired = [column.cells[t]["difference"] for t in tasks if "difference" in (column.cells.get(t) or {})]
        diff = {m: sum(d[m] for d in paired) / len(paired) if paired else None for m in METRICS}
        entry["difference"] = {"to": first.model, **diff, "tasks": len(paired)}
    return entry


# -- rendering ---------------------------------------------------------------------------------------------------


def _pair(values: dict[str, Any]) -> str:
    return " / ".join(f"{values[m]:.3f}" if isinstance(values.get(m), int | float) else "n/a" for m in METRICS)


def _signed(values: dict[str, Any]) -> str:
    return " / ".join(f"{values[m]:+.3f}" if isinstance(values.get(m), int | float) else "n/a" for m in METRICS)


def short_name(entry: dict[str, Any]) -> str:
    """A checkpoint by its run and stage (``eval_run``), a named model by its name."""
    return entry["eval_run"] if "/" in entry["model"] else entry["model"]


def random_text(entry: dict[str, Any]) -> str:
    """Why a model column is RANDOM WEIGHTS: no weights loaded (noise), or trained from random initialisation."""
    return entry.get("random_why") or "no pretrained weights"


def column_name(entry: dict[str, Any]) -> str:
    return short_name(entry) + (" (RANDOM WEIGHTS)" if entry["random_weights"] else "")


def _over(count: int) -> str:
    return f"({count} task{'' if count == 1 else 's'})"


def _cell_text(cell: dict[str, Any]) -> str:
    if cell.get("status") != "ok":
        return f"{cell.get('status')} (reason below)"
    text = _pair(cell)
    return f"{text} ({_signed(cell['difference'])})" if "difference" in cell else text


def _probe_text(probe: dict[str, Any] | None) -> str:
    if not probe:
        return "n/a"
    if probe.get("error"):
        return "failed (reason below)"
    unseen = len(probe.get("untrained_classes") or ())
    return _pair(probe) + (f" ({unseen} class{'' if unseen == 1 else 'es'} unseen in training)" if unseen else "")


def table(summary: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """The zero-shot table: a row per task, a column per model, then the mean and the difference to the first."""
    models = summary["models"]
    header = ("dataset", *(column_name(m) for m in models))
    rows = [[row["task"], *(_cell_text(row["cells"][m["model"]]) for m in models)] for row in summary["rows"]]
    rows.append(["mean", *(f"{_pair(m['mean'])} {_over(m['mean']['tasks'])}" for m in models)])
    if len(models) > 1:
        differences = [f"{_signed(m['difference'])} {_over(m['difference']['tasks'])}" for m in models[1:]]
        rows.append([f"difference to {short_name(models[0])}", "", *differences])
    return header, rows


def probe_table(summary: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]] | None:
    """The linear probe's headline (balanced accuracy / weighted F1) where a task has a train split."""
    models = summary["models"]
    rows = []
    for row in summary["rows"]:
        probes = [row["cells"][m["model"]].get("probe") for m in models]
        if any(probes):
            rows.append([row["task"], *(_probe_text(p) for p in probes)])
    if not rows:
        return None
    return ("dataset", *(column_name(m) for m in models)), rows


def failures(summary: dict[str, Any]) -> list[str]:
    """Every cell without numbers, and every probe that could not be fitted, with its reason whole."""
    lines = []
    for row in summary["rows"]:
        for entry in summary["models"]:
            cell = row["cells"][entry["model"]]
            if cell.get("status") != "ok":
                lines.append(f"{row['task']}, {column_name(entry)}: {cell.get('status')}: {cell.get('error')}")
            elif (cell.get("probe") or {}).get("error"):
                lines.append(f"{row['task']}, {column_name(entry)}: linear probe failed: {cell['probe']['error']}")
    return lines


def unseen_classes(summary: dict[str, Any]) -> list[str]:
    """Each task whose probe is scored on classes its training side lacks (a derived split put all of a class on
    one side): the probe cannot predict them, so its numbers are low for that reason alone."""
    lines = []
    for row in summary["rows"]:
        unseen = {
            tuple((cell.get("probe") or {}).get("untrained_classes") or ())
            for cell in row["cells"].values()
            if cell.get("status") == "ok"
        } - {()}
        for classes in sorted(unseen):
            lines.append(f"{row['task']}: not in the probe's training side: {', '.join(classes)}")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    models = summary["models"]
    compared = f"; in brackets, the difference to {short_name(models[0])}" if len(models) > 1 else ""
    lines = [
        f"# Benchmark {summary['run']}",
        "",
        f"Suite `{summary['suite']}`, datasets under `{summary['root']}`, {summary['created']}.",
        f"Cells: {summary['metrics']}{compared}. Means over the tasks a model has numbers for.",
        "",
        *md_table(*table(summary)),
        "",
        "## Models",
        "",
    ]
    for entry in models:
        said = f"- {column_name(entry)}: {entry['model']}, results in eval/{entry['eval_run']}/."
        lines.append(said + (f" RANDOM WEIGHTS: {random_text(entry)}." if entry["random_weights"] else ""))
    probe = probe_table(summary)
    if probe:
        lines += ["", "## Linear probe (balanced accuracy / weighted F1)", "", *md_table(*probe)]
        unseen = unseen_classes(summary)
        lines += ["", *(f"- {line}" for line in unseen)] if unseen else []
    lines += ["", "## Datasets", ""]
    for row in summary["rows"]:
        lines.append(f"- {row['task']} ({row['format']}, {row['folder']}): {row.get('split') or 'not read'}")
    problems = failures(summary)
    if problems:
        lines += ["", "## Failed", "", *(f"- {line}" for line in problems)]
    if summary["missing"]:
        lines += ["", f"## Missing datasets (not under {summary['root']})", ""]
        for found in summary["missing"]:
            where = f"download {found['source']}; recognised by {found['layout']}"
            lines.append(f"- {found['format']}, {found['title']}: {where}")
    if summary["ignored"]:
        lines += ["", "## Not evaluated (a second folder of a format already evaluated)", ""]
        lines += [f"- {i['format']}: {i['folder']}" for i in summary["ignored"]]
    return "\n".join(lines) + "\n"


# -- the store ---------------------------------------------------------------------------------------------------


def summary_key(run: str, name: str = "summary.json") -> str:
    return f"{BENCHMARKS}/{run}/{name}"


def result_copy_key(run: str, eval_run: str, task: str) -> str:
    """The run's own copy of a per-task result: ``eval/<eval_run>/<task>.json`` is the newest evaluation of that
    model, rewritten by a later run, while a summary's link must keep pointing at the numbers it shows."""
    return summary_key(run, f"{eval_run}/{task}.json")


def publish_summary(store: Store, summary: dict[str, Any]) -> dict[str, str]:
    """``summary.json`` and ``summary.md``, each written whole; their URIs."""
    run = summary["run"]
    store.write_bytes(summary_key(run), (json.dumps(summary, indent=1) + "\n").encode())
    store.write_bytes(summary_key(run, "summary.md"), markdown(summary).encode())
    return {"json": store.uri(summary_key(run)), "markdown": store.uri(summary_key(run, "summary.md"))}


def newest_benchmark(store: Store) -> dict[str, Any] | None:
    """The most recently created summary under ``eval/benchmark/``, with its ``uri``; None when there is none."""
    found = []
    for key in store.list(BENCHMARKS, "/summary.json"):
        summary = store.read_json(key)
        if isinstance(summary, dict) and "rows" in summary and "models" in summary:
            found.append((str(summary.get("created", "")), key, summary))
    if not found:
        return None
    _, key, summary = max(found, key=lambda item: item[:2])
    return summary | {"uri": store.uri(key)}


def report_lines(summary: dict[str, Any] | None, render: Callable, heading: Callable[[str], str]) -> list[str]:
    """The report's "Benchmark" section: the newest summary's table; ``render(header, rows)`` draws a table as
    lines and ``heading(text)`` a heading (plain text or markdown)."""
    if not summary:
        return []
    title = f"Benchmark {summary['run']} (suite {summary['suite']}, {summary['metrics']}; {summary['uri']}):"
    lines = ["", heading(title), *render(*table(summary))]
    if summary["missing"]:
        lines.append(f"Missing datasets: {', '.join(m['format'] for m in summary['missing'])}")
    return lines
