"""Settings of evaluation: linear probes, retrieval and the benchmark suite."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pathgen.settings.base import (
    Section,
)


class EvalSettings(Section):
    batch_size: int = Field(64, ge=1, le=4096)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    shots: list[int] = Field(default_factory=list, description="k-shot linear probes (besides the full one)")
    seeds: int = Field(3, ge=1, le=100, description="samplings per k-shot probe, and seeds of the paper probe")
    probe_c: float = Field(1.0, gt=0.0, le=1e6, description="inverse L2 strength of the logistic regression")
    probe: Literal["logistic", "paper"] = Field(
        "logistic",
        description="linear probe: logistic (scikit-learn, full train set + eval.shots) or paper (PathGen-CLIP's "
        "nn.Linear with AdamW on eval.probe_shots per class, eval.seeds seeds)",
    )
    probe_shots: int = Field(256, ge=1, le=1_000_000, description="paper probe: training samples per class, at most")
    probe_lr: float = Field(1e-2, gt=0.0, le=10.0, description="paper probe: AdamW learning rate")
    probe_epochs: int = Field(20, ge=1, le=10_000, description="paper probe: epochs over the sampled training set")
    probe_batch_size: int = Field(32, ge=1, le=65_536, description="paper probe: samples per AdamW step")
    retrieval_pairs: int = Field(5000, ge=2, le=100_000, description="held-out pairs scored for retrieval, at most")
    suite: Literal["paper", "all"] | None = Field(
        None,
        description="the factory's evaluate stage runs this benchmark suite (pathgen benchmark) on the datasets under "
        "eval.root; unset: it evaluates clip.evaluate",
    )
    root: str | None = Field(
        None, description="benchmark root: a folder holding the downloaded datasets, one folder each, any names"
    )
    baselines: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="models benchmarked before the newest PathGen-CLIP (as pathgen evaluate --model takes them, e.g. "
        "ViT-B-16:openai), so each difference column is trained minus baseline",
    )
