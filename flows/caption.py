"""Selected patches to image-text pairs: plan caption shards, run describe -> revise -> summarize per shard.

Each shard is one Prefect task (tagged gpu, retried on infrastructure errors only). Shards already committed
under this agents_hash are skipped; a new model or prompt is a new agents_hash and leaves earlier pairs intact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from agents.pipeline import agents_hash as agents_hash_of
from agents.pipeline import provenance
from flows.extract import build_settings
from tasks.captions.shard import ShardOutcome, caption_shard_task, pairs_prefix, plan_caption_shards
from tasks.store.objects import Store


@flow(name="caption", description="Selected patches to pair shards (pairs/<agents_hash>/ in the store).")
def caption_flow(store: str | None = None, config: str | None = None, overrides: dict[str, Any] | None = None):
    logger = get_run_logger()
    settings = build_settings(store, config, overrides)
    target = Store(settings.store, settings.s3)
    target.check()
    # Named from the settings alone: the models are loaded by the shard tasks, on the worker that runs them.
    agents_hash = agents_hash_of(settings.agents)
    random_weights = provenance(settings.agents)["random_weights"]
    shards, done = plan_caption_shards(target, agents_hash, settings.agents.shard_size)
    pending = sum(len(s.items) for s in shards)
    logger.info("agents %s: %d patches already done, %d pending in %d shards", agents_hash, done, pending, len(shards))
    progress = create_progress_artifact(0.0 if shards else 100.0, key="caption-progress", description="shards done")
    outcomes: list[ShardOutcome] = []
    with ThreadPoolTaskRunner(max_workers=settings.agents.concurrency) as runner:
        futures = {runner.submit(caption_shard_task, {"shard": s, "settings": settings}): s for s in shards}
        for future in as_completed(list(futures)):
            try:
                outcomes.append(future.result())
            except Exception as exc:  # noqa: BLE001 - a lost shard is reported; the other shards go on
                shard = futures[future]
                logger.error("shard %s failed: %s: %s", shard.shard_id, type(exc).__name__, exc)
                outcomes.append(ShardOutcome(shard.shard_id, "failed", 0, error=f"{type(exc).__name__}: {exc}"))
            update_progress_artifact(progress, 100.0 * len(outcomes) / len(shards))
    outcomes.sort(key=lambda o: o.shard_id)
    failures: dict[str, int] = {}
    for outcome in outcomes:
        for reason, count in outcome.failures.items():
            failures[reason] = failures.get(reason, 0) + count
    pairs = sum(o.pairs for o in outcomes)
    create_table_artifact(
        [
            {
                "shard": o.shard_id,
                "status": o.status,
                "pairs": o.pairs,
                "failed": sum(o.failures.values()),
                "failures": ", ".join(f"{k}: {v}" for k, v in sorted(o.failures.items())),
                "mean_tokens": o.tokens_mean,
                "max_tokens": o.tokens_max,
                "changed_by_revise": o.changed_share,
                "trimmed": o.trimmed,
                "seconds": ", ".join(f"{k} {v}" for k, v in o.seconds.items()),
                "random_weights": random_weights,
                "error": o.error or "",
            }
            for o in outcomes
        ],
        key="caption-shards",
        description=f"Captioning into {target.uri(pairs_prefix(agents_hash))}",
    )
    lost = [o for o in outcomes if o.status == "failed"]
    if lost and len(lost) == len(outcomes):
        raise RuntimeError(f"every caption shard failed ({len(lost)}); first error: {lost[0].error}")
    summary = {
        "store": target.url,
        "failed_shards": [{"shard": o.shard_id, "error": o.error} for o in lost],
        "agents_hash": agents_hash,
        "pairs_prefix": target.uri(pairs_prefix(agents_hash)),
        "shards": len(outcomes),
        "pairs": pairs,
        "failed": sum(failures.values()),
        "failures": failures,
        "already_done": done,
        "max_tokens": max((o.tokens_max for o in outcomes), default=0),
        "random_weights": random_weights,
    }
    if random_weights:
        logger.warning("captions come from tiny RANDOM-WEIGHT models: they are noise, not descriptions")
    logger.info("%d pairs, %d failed (%s) in %s", pairs, summary["failed"], failures, summary["pairs_prefix"])
    return summary
