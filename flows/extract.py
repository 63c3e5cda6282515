"""Slides to patch shards: resolve sources, fan out over slide groups with bounded concurrency, report.

A run in which some slides fail ends Completed and lists them; it fails only when no slide succeeded or the
settings are wrong.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pathgen.settings import Settings, load_settings
from tasks.slides.extract import SlideOutcome, extract_slides_task, record_failures
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store


class NoSlideSucceeded(RuntimeError):
    pass


def build_settings(
    store: str | None = None, config: str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    merged = dict(overrides or {})
    if store:
        merged["store"] = store
    return load_settings(config, merged)


def _groups(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _summary(settings: Settings, store_url: str, outcomes: list[SlideOutcome]) -> dict[str, Any]:
    by_status = {s: [o for o in outcomes if o.status == s] for s in ("ok", "skipped", "failed")}
    return {
        "store": store_url,
        "slides": len(outcomes),
        "ok": len(by_status["ok"]),
        "skipped": len(by_status["skipped"]),
        "failed": len(by_status["failed"]),
        "patches": sum(o.patches for o in outcomes if o.status != "failed"),
        "failed_slides": [{"slide_id": o.slide_id, "error": o.error} for o in by_status["failed"]],
        "selection": settings.selection.method,
        "random_weights": any(o.record.get("random_weights") for o in outcomes),
    }


@flow(name="extract", description="Whole-slide images to patch shards (slides/, patches/ in the store).")
def extract_flow(
    sources: list[str],
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    processes: bool = True,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = build_settings(store, config, overrides)
    target = Store(settings.store, settings.s3)
    target.check()
    refs = resolve_sources(list(sources) or settings.sources, settings)
    if not refs:
        raise NoSlideSucceeded(f"no slides found in {list(sources) or settings.sources}; check the source paths")
    groups = _groups(refs, settings.extract.group_size)
    workers = min(settings.extract.concurrency, len(groups))
    logger.info("%d slides in %d groups, %d at a time, into %s", len(refs), len(groups), workers, target.url)
    progress_id = create_progress_artifact(0.0, key="extract-progress", description="slides done")

    outcomes: list[SlideOutcome] = []
    runner = ProcessPoolTaskRunner(max_workers=workers) if processes and workers > 1 else ThreadPoolTaskRunner(1)
    with runner, _progress_bar(len(refs)) as (bar, bar_task):
        # Representative selection embeds patches: tagged gpu, so a tag concurrency limit can match the GPUs.
        gpu = settings.selection.method == "representative"
        task = extract_slides_task.with_options(tags=["extract", "gpu"]) if gpu else extract_slides_task
        futures = {runner.submit(task, {"refs": g, "settings": settings}): g for g in groups}
        for future in as_completed(list(futures)):
            group = futures[future]
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its group, not the run
                error = f"the worker running this slide failed ({type(exc).__name__}: {exc}); run again to retry it"
                done = record_failures(group, settings, error)
            outcomes.extend(done)
            bar.update(bar_task, advance=len(group))
            update_progress_artifact(progress_id, 100.0 * len(outcomes) / len(refs))

    outcomes.sort(key=lambda o: o.slide_id)
    create_table_artifact(
        [
            {
                "slide": o.slide_id,
                "status": o.status,
                "patches": o.patches,
                "seconds": o.seconds,
                "error": o.error or "",
                "random_weights": bool(o.record.get("random_weights")),
            }
            for o in outcomes
        ],
        key="extract-slides",
        description=f"Extraction into {target.url}",
    )
    summary = _summary(settings, target.url, outcomes)
    for failed in summary["failed_slides"]:
        logger.warning("failed: %s: %s", failed["slide_id"], failed["error"])
    logger.info(
        "%d ok, %d already done, %d failed; %d patches in %s",
        summary["ok"],
        summary["skipped"],
        summary["failed"],
        summary["patches"],
        summary["store"],
    )
    if summary["random_weights"]:
        logger.warning("selection used random-weight embeddings (tiny-random): the picks are noise, not a selection")
    if summary["ok"] + summary["skipped"] == 0:
        raise NoSlideSucceeded(f"no slide succeeded ({summary['failed']} failed); see the errors above")
    return summary


class _progress_bar:
    """A terminal bar on stderr while slides finish; silent when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("extract"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not sys.stderr.isatty(),
            transient=False,
        )
        self.total = total

    def __enter__(self):
        self.progress.start()
        return self.progress, self.progress.add_task("slides", total=self.total)

    def __exit__(self, *exc) -> None:
        self.progress.stop()
