"""Settings every stage shares: retries, S3 timeouts, temporary-file cleanup, parts runs and random weights."""

from __future__ import annotations

from pydantic import Field

from pathgen.settings.base import (
    Section,
)


class RetrySettings(Section):
    """The one retry policy for storage and model backends. Only infrastructure errors are retried; bad input
    and content failures are recorded at once."""

    io_retries: int = Field(3, ge=0, le=20, description="retries of one storage or backend call, with backoff")
    backoff_seconds: float = Field(1.0, ge=0.0, le=600.0, description="first backoff; doubles with each retry")
    task_retries: int = Field(2, ge=0, le=10, description="Prefect retries of a task that failed on infrastructure")
    task_retry_delay_seconds: float = Field(
        30.0, ge=0.0, le=86400.0, description="delay before a task's first retry; x4 for each further one"
    )


class S3Settings(Section):
    # Endpoint and keys come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from here.
    # Two retry loops are stacked: botocore's (max_attempts) inside s3fs's (s3fs_retries), so one S3 call that gets
    # no answer ends after about (connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds.
    connect_timeout: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="seconds to open a connection; one unanswered call ends after about "
        "(connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds",
    )
    read_timeout: float = Field(
        60.0,
        gt=0.0,
        le=3600.0,
        description="seconds to wait for each read of a reply; worst case of one call: "
        "(connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="botocore attempts per request, the first included (multiplies the worst case of a call)",
    )
    s3fs_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="s3fs's own retries of a failed call, each with max_attempts botocore attempts; worst case of "
        "one call: (connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds",
    )
    block_size: int = Field(
        4 * 2**20,
        ge=2**16,
        le=2**30,
        description="bytes per ranged read of a remote slide (kept in an LRU block cache)",
    )


class CleanupSettings(Section):
    stale_temp_grace_seconds: float = Field(
        3600.0,
        ge=0.0,
        le=365 * 86400.0,
        description="local temporary files and staged files untouched this long are removed; those of a dead "
        "process on this host are removed at once (S3 writes leave no temporary objects)",
    )


class PartsSettings(Section):
    """A ``parts=N`` run as a deployment: the parent starts N child runs on the pool's workers and waits for them."""

    timeout_seconds: float = Field(
        2 * 86400.0,
        gt=0.0,
        le=30 * 86400.0,
        description="the most the parent waits for its child runs (default 2 days: above the longest part of a "
        "production job); then children that never started are cancelled and reported with Prefect's reason (no "
        "worker, pool or queue paused, concurrency slots taken), running ones are reported unfinished, and the "
        "slides of both stay pending for the next run. Why a child has not started is logged within a minute",
    )


class ModelsSettings(Section):
    allow_random_weights: bool = Field(
        True,
        description="let a run use random-weight models (tiny defaults, unloaded weights); false in production: "
        "such a run fails before any work, naming the setting of the missing model",
    )
