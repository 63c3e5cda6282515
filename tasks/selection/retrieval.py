"""Prompt-based retrieval scores, as in PathGen-1.6M: attribute prompts per TCGA project and report findings.

A patch's attribute score is its highest cosine similarity to any attribute prompt of its slide's project (the
maximum: a patch need show one finding). Its findings score is the sum of its similarities to the slide's report
sentences (the sum: a patch that matches several findings is the better illustration of the report).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

PROMPTS_FILE = Path(__file__).parent / "data" / "tcga_prompts.yaml"
GENERIC = "generic"

log = logging.getLogger("pathgen.retrieval")


@dataclass(frozen=True)
class SlidePrompts:
    project: str  # the project whose prompts are used, or "generic"
    attributes: tuple[str, ...]
    findings: tuple[str, ...]


def _read_prompt_file(path: Path) -> dict[str, list[str]]:
    from pathgen.settings import SettingsError, load_yaml

    try:  # without alias expansion: a hostile prompts file cannot blow up memory before any work
        data = load_yaml(path.read_text(), f"prompts file {path}") or {}
    except (OSError, SettingsError) as exc:
        raise ValueError(f"prompts file {path} cannot be read ({exc}); fix or unset selection.prompts_file") from None
    projects = dict(data.get("projects") or {})
    if data.get(GENERIC):
        projects[GENERIC] = data[GENERIC]
    for name, prompts in projects.items():
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts file {path}: project {name!r} must map to a list of non-empty sentences")
    return projects


def _stamp(path: str | None) -> tuple[int, int] | None:
    """Part of the cache keys below: an edited file is read again, not served from the cache."""
    try:
        stat = Path(path).stat() if path else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None


def load_prompts(extra_file: str | None = None) -> dict[str, tuple[str, ...]]:
    """The shipped prompts, with a user's file adding projects or replacing them project by project."""
    return _load_prompts(extra_file, _stamp(str(PROMPTS_FILE)), _stamp(extra_file))


@lru_cache(maxsize=8)
def _load_prompts(extra_file: str | None, *_stamps) -> dict[str, tuple[str, ...]]:
    prompts = _read_prompt_file(PROMPTS_FILE)
    if extra_file:
        prompts.update(_read_prompt_file(Path(extra_file)))
    return {name: tuple(values) for name, values in prompts.items()}


def load_findings(path: str | None) -> dict[str, tuple[str, ...]]:
    return _load_findings(path, _stamp(path))


@lru_cache(maxsize=8)
def _load_findings(path: str | None, _stamp) -> dict[str, tuple[str, ...]]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"findings file {path} cannot be read ({exc}); fix or unset selection.findings_file") from None
    if not isinstance(data, dict):
        raise ValueError(f"findings file {path} must be a JSON object mapping slide_id to a list of sentences")
    return {str(k): tuple([v] if isinstance(v, str) else v) for k, v in data.items()}


def prompts_for(
    slide_id: str,
    project: str | None,
    prompts_file: str | None = None,
    findings_file: str | None = None,
    logger: logging.Logger | bool | None = None,
) -> SlidePrompts:
    """The prompts for one slide; an unknown or missing project falls back to the generic prompts, with a warning
    (``logger=False``: silently, as when only hashing them)."""
    logger = log if logger is None else logger
    prompts = load_prompts(prompts_file)
    key = (project or "").upper()
    if key and not key.startswith("TCGA-") and f"TCGA-{key}" in prompts:
        key = f"TCGA-{key}"
    if key not in prompts:
        if logger:
            logger.warning(
                "%s: %s; using the generic attribute prompts (set slides.project or slides.projects.%s)",
                slide_id,
                f"no attribute prompts for project {project!r}" if project else "no TCGA project known",
                slide_id,
            )
        key = GENERIC
    return SlidePrompts(key, prompts[key], load_findings(findings_file).get(slide_id, ()))


def retrieval_scores(
    embeddings: np.ndarray, attribute_texts: np.ndarray, finding_texts: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """(max similarity over attribute prompts, sum of similarities over findings or None) per patch."""
    attributes = (embeddings @ attribute_texts.T).max(axis=1) if len(attribute_texts) else np.zeros(len(embeddings))
    findings = (embeddings @ finding_texts.T).sum(axis=1) if len(finding_texts) else None
    return attributes.astype(np.float32), None if findings is None else findings.astype(np.float32)
