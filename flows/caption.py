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

from agents.pipeline import CaptionAgents
from flows.extract import build_settings
from tasks.caption_shard import ShardOutcome, caption_shard_task, pairs_prefix, plan_caption_shards
from tasks.store import Store


@flow(name="caption", description="Selected patches to pair shards (pairs/<agents_hash>/ in the store).")
def caption_flow(store: str | None = None, config: str | None = None, overrides: dict[str, Any] | None = None):
    logger = get_run_logger()
    settings = build_settings(store, config, overrides)
    target = Store(settings.store, settings.s3)
    target.check()
    agents = CaptionAgents(settings.agents, logger)  # loads the models here once, and fails early if misnamed
    agents_hash = agents.agents_hash()
    shards, done = plan_caption_shards(target, agents_hash, settings.agents.shard_size)
    pending = sum(len(s.items) for s in shards)
    logger.info("agents %s: %d patches already done, %d pending in %d shards", agents_hash, done, pending, len(shards))
    progress = create_progress_artifact(0.0 if shards else 100.0, key="caption-progress", description="shards done")
    outcomes: list[ShardOutcome] = []
    with ThreadPoolTaskRunner(max_workers=settings.agents.concurrency) as runner:
        futures = [runner.submit(caption_shard_task, {"shard": s, "settings": settings}) for s in shards]
        for future in as_completed(futures):
            outcomes.append(future.result())
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
                "pairs": o.pairs,
                "failed": sum(o.failures.values()),
                "failures": ", ".join(f"{k}: {v}" for k, v in sorted(o.failures.items())),
                "mean_tokens": o.tokens_mean,
                "max_tokens": o.tokens_max,
                "changed_by_revise": o.changed_share,
                "trimmed": o.trimmed,
                "seconds": ", ".join(f"{k} {v}" for k, v in o.seconds.items()),
                "random_weights": agents.random_weights,
            }
            for o in outcomes
        ],
        key="caption-shards",
        description=f"Captioning into {target.uri(pairs_prefix(agents_hash))}",
    )
    summary = {
        "store": target.url,
        "agents_hash": agents_hash,
        "pairs_prefix": target.uri(pairs_prefix(agents_hash)),
        "shards": len(outcomes),
        "pairs": pairs,
        "failed": sum(failures.values()),
        "failures": failures,
        "already_done": done,
        "max_tokens": max((o.tokens_max for o in outcomes), default=0),
        "random_weights": agents.random_weights,
    }
    if agents.random_weights:
        logger.warning("captions come from tiny RANDOM-WEIGHT models: they are noise, not descriptions")
    logger.info("%d pairs, %d failed (%s) in %s", pairs, summary["failed"], failures, summary["pairs_prefix"])
    return summary
