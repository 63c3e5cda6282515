"""Review coverage for ``pathgen status`` and the factory report: per agents_hash, how many pairs reviewers looked at,
their verdicts, and the rejection rate by reason (the figure that tells whether a prompt or model change helped); and
one line for an export saying what its reviews did."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from tasks.reviews.store import REVIEWS, load_reviews, reject_reason, reviewed_slides
from tasks.store.objects import Store

SERVE_HINT = "Browse and review the pairs: pathgen serve --store {store} (then open http://127.0.0.1:8765/slides)"


def review_report(store: Store) -> dict[str, Any]:
    """Per agents_hash with reviews: reviewed pairs (latest review each), slides, reviewers, verdicts and rejections by
    reason; files that cannot be read are named in ``problems``."""
    keys = [key.split("/") for key in store.list(REVIEWS, ".parquet")]
    hashes = sorted({parts[1] for parts in keys if len(parts) == 3})
    return {"store": store.url, "by_agents_hash": [_coverage(store, agents_hash) for agents_hash in hashes]}


def _coverage(store: Store, agents_hash: str) -> dict[str, Any]:
    problems: list[str] = []
    try:
        reviews = load_reviews(store, agents_hash, problems)
        slides = len(reviewed_slides(store, agents_hash))
    except ValueError as exc:  # a folder under reviews/ that names no agents_hash: told, never fatal
        reviews, slides, problems = {}, 0, [str(exc)]
    verdicts = Counter(review.verdict for review in reviews.values())
    reasons = Counter(reject_reason(r.reason) for r in reviews.values() if r.verdict == "reject")
    return {
        "agents_hash": agents_hash,
        "reviewed": len(reviews),
        "slides": slides,
        "reviewers": len({review.reviewer for review in reviews.values()}),
        "accepted": verdicts["accept"],
        "rejected": verdicts["reject"],
        "corrected": verdicts["correct"],
        "rejected_by_reason": dict(reasons.most_common()),
        "problems": problems,
    }


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def review_lines(
    reviews: Mapping[str, Any] | None, pairs: Mapping[str, int], link: Callable[[str, str], str]
) -> list[str]:
    """The report's lines: coverage and rejection rates per agents_hash (``pairs``: agents_hash -> pairs in the store),
    then how to review. ``link`` renders a name and a URI (plain text or markdown)."""
    if not reviews:
        return []
    by_hash = {entry["agents_hash"]: entry for entry in reviews["by_agents_hash"]}
    lines = []
    for agents_hash in sorted(set(pairs) | set(by_hash)):
        entry, total = by_hash.get(agents_hash), pairs.get(agents_hash, 0)
        if entry is None:
            lines.append(f"Reviews {agents_hash}: none of {total} pairs reviewed yet")
            continue
        lines.append(
            f"Reviews {agents_hash}: {entry['reviewed']} of {total} pairs reviewed "
            f"({_share(entry['reviewed'], total)}) on {entry['slides']} slides by {entry['reviewers']} reviewer(s): "
            f"{entry['accepted']} accepted, "
            f"{entry['rejected']} rejected ({_share(entry['rejected'], entry['reviewed'])} of reviewed), "
            f"{entry['corrected']} corrected"
        )
        for reason, count in entry["rejected_by_reason"].items():
            lines.append(f"  rejected x{count}, {reason}: {_share(count, entry['reviewed'])} of reviewed")
        for problem in entry["problems"][:3]:
            lines.append(f"  unreadable review: {problem}")
    store = reviews["store"]
    lines.append(SERVE_HINT.format(store=link(store, store)))
    return lines


def review_line(provenance: Mapping[str, Any]) -> str:
    """What the reviews did to an export, from its provenance's ``reviews``."""
    counts = f"{provenance['reviewed']} of {provenance['pairs_read']} pairs reviewed"
    if provenance["mode"] == "ignore":
        return (
            f"reviews ignored (export.reviews=ignore): {counts}; their {provenance['rejected']} rejected pairs "
            f"exported and {provenance['corrected']} corrections not used"
        )
    return (
        f"reviews applied (export.reviews=apply): {counts}; {provenance['rejected']} rejected pairs left out, "
        f"{provenance['corrected']} corrected captions used, {provenance['accepted']} accepted"
    )
