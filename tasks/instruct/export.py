"""``pathgen export llava``: both stages of PathGen-LLaVA's training data in LLaVA's conversation JSON, with the
patch images written beside it::

    DIR/stage1.json     every caption pair as one turn: {"id", "image": "images/<patch_id>.jpg", "conversations":
                        [{"from": "human", "value": "<image>\\n<a request for a short description>"},
                         {"from": "gpt", "value": <caption>}]}
    DIR/stage2.json     the instruction conversations, "<image>\\n" opening the first human turn
    DIR/images/<patch_id>.jpg   the patch JPEG bytes from the pair shards
    DIR/provenance.json store, hashes, counts, models, random_weights, and what the reviews did (``reviews``)
    DIR/manifest.json   which shard (by commit id) each image and conversation came from
    DIR/.lock           held (flock) by the export writing DIR: a second export into DIR waits for it

The export is incremental, as the WebDataset export is: a pair shard whose commit id the manifest records, and whose
images are all there, is not read for images again, so a re-export of an unchanged store writes nothing (it reads
shard footers only) and one new slide writes that slide's images. An image that only instruction data names (written
from other pairs) follows the commit id of the pair shard it came from in the same way. Every file is written under
a temporary name and
renamed; the images a JSON file names are in place before it is replaced, and images no record names any more are
removed after. A DIR that holds anything but an earlier llava export is refused, never overwritten.

Reviews (``export.reviews``, ``tasks.reviews.store``) are applied by default: a rejected pair is left out of stage 1,
and so are the conversations about its patch from stage 2; a corrected caption replaces the generated one in stage 1.
A change of the reviews makes the export run again, as a new shard does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from tasks.captions.export import agents_hashes
from tasks.captions.records import pair_key, pairs_prefix, slide_of
from tasks.instruct.commit import metadata
from tasks.instruct.records import instruct_prefix
from tasks.reviews.store import ExportReviews
from tasks.slides.shard import read_shard
from tasks.store.objects import Store, pid_alive

FORMAT = "llava"
IMAGE_TOKEN = "<image>"
# Stage 1 (feature alignment) asks for a short description in varied words, as LLaVA's own pretraining data does;
# the pick is a stable function of the patch id, so a re-export writes the same file.
STAGE1_INSTRUCTIONS = (
    "Describe this H&E image briefly.",
    "Give a short description of this histopathology image.",
    "Summarize what this pathology patch shows.",
    "Write a concise caption for this H&E patch.",
    "What does this H&E image show? Answer in one or two sentences.",
    "Briefly describe the tissue and the key findings in this image.",
    "Provide a brief pathology description of this image.",
    "Caption this histology image concisely.",
)
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGE_FILES = ("stage1.json", "stage2.json")
# A patch id becomes a file name: a plain one only, never a path ('/', a leading '.', '..').
PATCH_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}")
_PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)\.part$")


@dataclass
class LlavaExport:
    out: Path
    agents_hash: str
    instruct_hash: str | None  # None: no instruction data was written from these pairs (stage 1 only)
    stage1: int = 0
    stage2: int = 0
    images: int = 0  # JPEGs in the set
    written: int = 0  # images this export (re)wrote: none when the store holds nothing new
    missing_images: int = 0  # conversations left out: no pair shard held their patch's image
    kinds: dict[str, int] = field(default_factory=dict)
    random_weight_records: dict[str, int] = field(default_factory=lambda: {"stage1": 0, "stage2": 0})
    reviews: dict[str, Any] = field(default_factory=dict)  # the provenance's: mode, counts, conversations left out

    @property
    def random_weights(self) -> bool:
        return any(self.random_weight_records.values())


def instruct_hashes(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("instruct", ".parquet")})


def _source_of(store: Store, instruct_hash: str) -> str:
    first = store.list(instruct_prefix(instruct_hash), ".parquet")[0]
    return metadata(store, first).get("pathgen.source_agents_hash", "")


def choose_hashes(store: Store, agents_hash: str | None, instruct_hash: str | None) -> tuple[str, str | None]:
    """(agents_hash for stage 1, instruct_hash for stage 2). Unset, the instruct_hash is the only one written from
    the chosen pairs (None when there is none: stage 1 only), and the agents_hash the one the chosen instruct data
    was written from, or the only one."""
    pairs, made = agents_hashes(store), instruct_hashes(store)
    if agents_hash is not None and agents_hash not in pairs:
        raise ValueError(f"no pairs under agents_hash {agents_hash!r} (found: {', '.join(pairs) or 'none'})")
    if instruct_hash is not None and instruct_hash not in made:
        raise ValueError(f"no conversations under instruct_hash {instruct_hash!r} (found: {', '.join(made) or 'none'})")
    if agents_hash is None:
        if instruct_hash is not None:
            agents_hash = _source_of(store, instruct_hash)
        elif len(pairs) == 1:
            agents_hash = pairs[0]
        else:
            raise ValueError(f"choose the pairs with --agents-hash (found: {', '.join(pairs) or 'none'})")
    if instruct_hash is None:
        mine = [h for h in made if _source_of(store, h) == agents_hash]
        if len(mine) > 1:
            raise ValueError(f"instruction data written from pairs {agents_hash}: {', '.join(mine)}; choose one "
                             "with --instruct-hash")  # fmt: skip
        instruct_hash = mine[0] if mine else None  # none: stage 1 only, stage2.json empty and saying why
    return agents_hash, instruct_hash


class _JsonList:
    """A JSON list written one record at a time (an export of 1.6M pairs is never held in memory), under a temporary
    name until ``close`` renames it onto the file."""

    def __init__(self, path: Path) -> None:
        self.path, self.partial = path, path.with_name(f".{path.name}.{os.getpid()}.part")
        self.handle = open(self.partial, "w")  # noqa: SIM115 - closed in close() or discard()
        self.count = 0
        self.handle.write("[")

    def add(self, record: dict[str, Any]) -> None:
        self.handle.write(("\n" if not self.count else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]\n")
        self.handle.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)


def stage1_instruction(patch_id: str) -> str:
    return STAGE1_INSTRUCTIONS[int(hashlib.sha256(patch_id.encode()).hexdigest()[:8], 16) % len(STAGE1_INSTRUCTIONS)]


def with_image_token(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA's convention: the image token opens the first human turn (and appears nowhere else)."""
    first = next(i for i, m in enumerate(messages) if m["from"] == "human")
    turns = [dict(m) for m in messages]
    turns[first]["value"] = f"{IMAGE_TOKEN}\n{turns[first]['value'].replace(IMAGE_TOKEN, '').strip()}"
    return turns


def image_file(key: str, patch_id: Any) -> str:
    """The file name of a patch's image under images/; a patch_id that is no plain file name is an error naming the
    shard and the record, never a path to write to."""
    if not isinstance(patch_id, str) or not PATCH_FILE.fullmatch(patch_id):
        raise ValueError(
            f"{key}: patch_id {patch_id!r} is not a plain file name (letters, digits, '.', '_', '-', no '/' and no "
            "leading '.'), so its image cannot be exported; fix or remove that shard"
        )
    return f"{patch_id}.jpg"


def _read(store: Store, key: str, columns: list[str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    with store.open(key) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        raw = shard.schema_arrow.metadata or {}
        names = shard.schema_arrow.names
        rows = read_shard(handle, columns=[c for c in columns if c in names]).to_pylist()
    return rows, {k.decode(): v.decode() for k, v in raw.items()}


@dataclass
class _Images:
    """The images/ folder of the set being exported: the files there, the ones written, and the ones this export
    vouches for (written now, or written earlier from a shard whose commit id has not changed since)."""

    folder: Path
    present: set[str]
    written: int = 0
    fresh: set[str] = field(default_factory=set)

    def write(self, key: str, patch_id: str, jpeg: bytes) -> None:
        name = image_file(key, patch_id)
        partial = self.folder / f".{name}.{os.getpid()}.part"
        partial.write_bytes(jpeg)
        os.replace(partial, self.folder / name)  # a reader never meets half an image
        self.present.add(name)
        self.fresh.add(name)
        self.written += 1

    def remove_unnamed(self, named: set[str]) -> None:
        """Images of pairs no longer in the set, and the temporary files of exports that were killed."""
        for name in self.present - named:
            match = _PARTIAL.match(name)
            path = self.folder / name
            if not (match and pid_alive(int(match["pid"]))) and not path.is_dir():
                path.unlink(missing_ok=True)
        self.present &= named


def _stage1(
    store: Store, commits: dict[str, str], kept: dict, images: _Images, result: LlavaExport, reviewed: ExportReviews
) -> tuple:
    """Every pair of the agents_hash the reviews keep as a one-turn conversation, images written for the shards the
    manifest does not vouch for; returns the manifest's entries of the shards and the captioning's provenance."""
    out = _JsonList(result.out / "stage1.json")
    entries: dict[str, dict[str, Any]] = {}
    provenance: dict[str, Any] = {}
    try:
        for key in commits:
            rows, meta = _read(store, key, ["patch_id", "caption", "random_weights"])
            rows = reviewed.apply(slide_of(key), rows)
            names = [image_file(key, row["patch_id"]) for row in rows]
            commit = meta.get("pathgen.commit_id", "")
            # New or changed: all its images; else those a changed review let back in.
            changed = not commit or kept.get(key, {}).get("commit_id") != commit
            wanted = {
                row["patch_id"] for row in rows if changed or image_file(key, row["patch_id"]) not in images.present
            }
            if wanted:
                for row in _read(store, key, ["patch_id", "image"])[0]:
                    if row["patch_id"] in wanted:
                        images.write(key, row["patch_id"], row["image"])
            provenance = provenance or json.loads(meta.get("pathgen.provenance", "{}"))
            entries[key] = {"commit_id": commit, "images": names}
            images.fresh.update(entries[key]["images"])
            for row in rows:
                human = f"{IMAGE_TOKEN}\n{stage1_instruction(row['patch_id'])}"
                turns = [{"from": "human", "value": human}, {"from": "gpt", "value": row["caption"]}]
                out.add({"id": row["patch_id"], "image": f"images/{row['patch_id']}.jpg", "conversations": turns})
                result.random_weight_records["stage1"] += bool(row.get("random_weights"))
    except BaseException:
        out.discard()
        raise
    out.close()
    result.stage1 = out.count
    return entries, provenance


def _source_images(store: Store, key: str, rows: list[dict], meta: dict, earlier: dict, images: _Images) -> dict | None:
    """The images of an instruct shard's patches that stage 1 did not vouch for (instruct data written from other
    pairs), from the slide's pair shard it was written from. Vouched as stage 1's are, by that shard's commit id: an
    image an earlier export wrote from the same commit is kept, any other is written again (a re-extracted slide
    keeps its patch ids, not its pixels). Returns the manifest's record of the source, or None."""
    needed = {image_file(key, row["patch_id"]) for row in rows} - images.fresh
    source = pair_key(meta.get("pathgen.source_agents_hash", ""), rows[0]["slide_id"]) if rows else ""
    if not needed or not store.exists(source):
        return None
    before = earlier.get("source") if isinstance(earlier.get("source"), dict) else {}
    commit = metadata(store, source).get("pathgen.commit_id", "")
    if commit and before.get("key") == source and before.get("commit_id") == commit:
        vouched = needed & set(before.get("images", [])) & images.present
        if vouched == needed:
            images.fresh |= vouched
            return {"key": source, "commit_id": commit, "images": sorted(vouched)}
    source_rows, source_meta = _read(store, source, ["patch_id", "image"])
    written = []
    for row in source_rows:
        if image_file(source, row["patch_id"]) in needed:
            images.write(source, row["patch_id"], row["image"])
            written.append(image_file(source, row["patch_id"]))
    return {"key": source, "commit_id": source_meta.get("pathgen.commit_id", ""), "images": sorted(written)}


def _stage2(
    store: Store, commits: dict[str, str], earlier: dict, images: _Images, result: LlavaExport, reviewed: ExportReviews
) -> tuple:
    """Every conversation of the instruct_hash (none without one) whose image this export vouches for and whose pair
    ``reviewed`` (the reviews of the pairs it was written from) does not reject; returns the manifest's entries of its
    shards (``earlier``: the last export's) and the instruct run's provenance."""
    out = _JsonList(result.out / "stage2.json")
    entries: dict[str, dict[str, Any]] = {}
    provenance: dict[str, Any] = {}
    columns = ["conversation_id", "patch_id", "slide_id", "kind", "conversation", "random_weights"]
    try:
        for key in commits:
            rows, meta = _read(store, key, columns)
            rejected = reviewed.rejected(slide_of(key))
            result.reviews["conversations_left_out"] += sum(row["patch_id"] in rejected for row in rows)
            rows = [row for row in rows if row["patch_id"] not in rejected]
            provenance = provenance or json.loads(meta.get("pathgen.provenance", "{}"))
            source = _source_images(store, key, rows, meta, earlier.get(key) or {}, images)
            kept = [row for row in rows if image_file(key, row["patch_id"]) in images.fresh]
            result.missing_images += len(rows) - len(kept)
            entries[key] = {"commit_id": meta.get("pathgen.commit_id", ""), "images": []}
            if source:
                entries[key]["source"] = source
            for row in kept:
                entries[key]["images"].append(image_file(key, row["patch_id"]))
                turns = with_image_token(json.loads(row["conversation"]))
                out.add(
                    {"id": row["conversation_id"], "image": f"images/{row['patch_id']}.jpg", "conversations": turns}
                )
                result.kinds[row["kind"]] = result.kinds.get(row["kind"], 0) + 1
                result.random_weight_records["stage2"] += bool(row.get("random_weights"))
    except BaseException:
        out.discard()
        raise
    out.close()
    result.stage2 = out.count
    return entries, provenance


def _check_out(out: Path) -> None:
    """DIR may be new, empty, or an earlier llava export (updated); anything else is refused, never deleted."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ValueError(f"folder {out.parent} does not exist; create it or choose another --out")
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; the llava export writes a folder")
    earlier = any(_json(out / name).get("format") == FORMAT for name in (MANIFEST, "provenance.json"))
    if any(path.name != LOCK for path in out.iterdir()) and not earlier:
        raise ValueError(f"--out {out} holds files that are not a llava export; choose a new or empty folder")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)


def _shard_commits(store: Store, prefix: str | None) -> dict[str, str]:
    """{shard key: commit id}, from the footers alone."""
    if prefix is None:
        return {}
    return {key: metadata(store, key).get("pathgen.commit_id", "") for key in store.list(prefix, ".parquet")}


def _manifest(out: Path, agents_hash: str) -> dict[str, Any]:
    """The last export's manifest, or an empty one when there is none or it exported other pairs."""
    manifest = _json(out / MANIFEST)
    parts = [manifest.get(part) for part in ("pairs", "instruct")]
    entries_ok = all(isinstance(p, dict) and all(isinstance(e, dict) for e in p.values()) for p in parts)
    if manifest.get("format") != FORMAT or manifest.get("agents_hash") != agents_hash or not entries_ok:
        return {"format": FORMAT, "agents_hash": agents_hash, "instruct_hash": None, "pairs": {}, "instruct": {}}
    return manifest


def _commits(entries: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {key: entry.get("commit_id", "") for key, entry in entries.items()}


def _named(*parts: dict[str, dict[str, Any]]) -> set[str]:
    return {name for entries in parts for entry in entries.values() for name in entry.get("images", [])}


def _unchanged(out: Path, manifest: dict, instruct_hash: str | None, shards: dict, present: set[str]) -> bool:
    """Whether DIR already is the export of these shards: the same commits, exactly its images, every file there.
    A shard without a commit id cannot be told unchanged."""
    return (
        manifest.get("complete") is True
        and manifest.get("instruct_hash") == instruct_hash
        and {part: _commits(manifest[part]) for part in shards} == shards
        and "" not in (*shards["pairs"].values(), *shards["instruct"].values())
        and _named(manifest["pairs"], manifest["instruct"]) == present
        and all((out / name).is_file() for name in (*STAGE_FILES, "provenance.json"))
    )


def _sources_unchanged(store: Store, instruct: dict[str, dict[str, Any]]) -> bool:
    """The pair shards that images of the instruction data only came from still hold the commits they were read at."""
    for entry in instruct.values():
        source = entry.get("source")
        if isinstance(source, dict):
            key = source.get("key", "")
            if not source.get("commit_id") or not store.exists(key):
                return False
            if metadata(store, key).get("pathgen.commit_id", "") != source["commit_id"]:
                return False
    return True


@contextlib.contextmanager
def _export_lock(out: Path, logger: logging.Logger) -> Iterator[None]:
    """DIR for one export at a time: two (two train-llava runs on one store) would interleave their images, JSON and
    manifest. ``flock`` on DIR/.lock, released by the kernel when the process dies, SIGKILL included; the file itself
    is never written, so an export that changes nothing leaves every file of DIR as it was."""
    out.mkdir(exist_ok=True)
    with open(out / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another export is writing %s (it holds %s); waiting for it to finish", out, out / LOCK)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def export_llava(
    store: Store,
    out: str | Path,
    agents_hash: str | None = None,
    instruct_hash: str | None = None,
    logger: logging.Logger | None = None,
    reviews: Literal["apply", "ignore"] = "apply",
) -> LlavaExport:
    """Write or update DIR/stage1.json, stage2.json, images/, provenance.json and manifest.json (see the module's
    docstring), the reviews applied or ignored (``reviews``: ``export.reviews``); a store with nothing new writes
    nothing. An export already writing DIR is waited for."""
    agents_hash, instruct_hash = choose_hashes(store, agents_hash, instruct_hash)
    out = Path(out).expanduser().absolute()
    _check_out(out)
    with _export_lock(out, logger or logging.getLogger("pathgen.export")):
        return _update(store, LlavaExport(out, agents_hash, instruct_hash), reviews)


def _update(store: Store, result: LlavaExport, mode: Literal["apply", "ignore"]) -> LlavaExport:
    out, agents_hash, instruct_hash = result.out, result.agents_hash, result.instruct_hash
    shards = {
        "pairs": _shard_commits(store, pairs_prefix(agents_hash)),
        "instruct": _shard_commits(store, instruct_prefix(instruct_hash) if instruct_hash else None),
    }
    reviewed, source_reviewed = _export_reviews(store, agents_hash, instruct_hash, mode)
    digest = reviewed.digest(map(slide_of, shards["pairs"])) + source_reviewed.digest(map(slide_of, shards["instruct"]))
    manifest = _manifest(out, agents_hash)
    images = _Images(out / "images", _present(out / "images"))
    unchanged = _unchanged(out, manifest, instruct_hash, shards, images.present) and manifest.get("reviews") == digest
    if unchanged and _sources_unchanged(store, manifest["instruct"]):
        try:
            return _as_exported(result)
        except (KeyError, TypeError):  # a damaged provenance.json: export again
            pass
    # Written before any image changes: the manifest vouches only for shards whose images are there and stay so.
    kept = {key: entry for key, entry in manifest["pairs"].items()
            if entry.get("commit_id") and set(entry.get("images", [])) <= images.present}  # fmt: skip
    images.folder.mkdir(parents=True, exist_ok=True)
    _remove_partials(out)
    _write_json(out / MANIFEST, {**manifest, "complete": False, "pairs": kept, "instruct": {}})
    result.reviews = {"conversations_left_out": 0}
    pairs, captions = _stage1(store, shards["pairs"], kept, images, result, reviewed)
    conversations, instructions = _stage2(
        store, shards["instruct"], manifest["instruct"], images, result, source_reviewed
    )
    result.reviews = reviewed.provenance() | result.reviews
    named = _named(pairs, conversations)
    images.remove_unnamed(named)
    result.images, result.written = len(named), images.written
    _write_json(out / "provenance.json", _provenance(store, result, captions, instructions))
    manifest = {"format": FORMAT, "agents_hash": agents_hash, "instruct_hash": instruct_hash, "complete": True}
    manifest["reviews"] = digest
    _write_json(out / MANIFEST, manifest | {"pairs": pairs, "instruct": conversations})
    return result


def _remove_partials(out: Path) -> None:
    """The temporary JSON files of exports to DIR that were killed (their process is gone)."""
    for path in out.glob(".*.part"):
        match = _PARTIAL.match(path.name)
        if match and not pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def _present(folder: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(folder)}
    except FileNotFoundError:
        return set()


def _as_exported(result: LlavaExport) -> LlavaExport:
    """The counts of the set already in DIR, from its provenance.json."""
    provenance = _json(result.out / "provenance.json")
    result.stage1 = provenance["stage1"]["records"]
    result.stage2 = provenance["stage2"]["records"]
    result.kinds = provenance["stage2"]["kinds"]
    result.missing_images = provenance["stage2"]["missing_images"]
    result.images = provenance["images"]["count"]
    result.random_weight_records = {s: provenance[s]["random_weight_records"] for s in ("stage1", "stage2")}
    result.reviews = provenance["reviews"]
    return result


def _export_reviews(store: Store, agents_hash: str, instruct_hash: str | None, mode: str) -> tuple:
    """The reviews of the stage 1 pairs, and those of the pairs the instruction data was written from (the same
    unless that data came from other pairs)."""
    reviewed = ExportReviews.of(store, agents_hash, mode)
    source = _source_of(store, instruct_hash) if instruct_hash else agents_hash
    return reviewed, (reviewed if source in (agents_hash, "") else ExportReviews.of(store, source, mode))


def _provenance(store: Store, result: LlavaExport, captions: dict, instructions: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "store": store.url,
        "agents_hash": result.agents_hash,
        "instruct_hash": result.instruct_hash,
        "instruct_source_agents_hash": instructions.get("source_agents_hash"),
        "stage1": {
            "file": "stage1.json",
            "records": result.stage1,
            "random_weight_records": result.random_weight_records["stage1"],
        },
        "stage2": {
            "file": "stage2.json",
            "records": result.stage2,
            "random_weight_records": result.random_weight_records["stage2"],
            "kinds": result.kinds,
            "missing_images": result.missing_images,
            "empty_because": empty_because(result),
        },
        "images": {"folder": "images", "count": result.images},
        "image_token": IMAGE_TOKEN,
        "reviews": result.reviews,
        # A set with no records still says what made it: the provenance of the shards it read.
        "random_weights": result.random_weights or any(bool(p.get("random_weights")) for p in (captions, instructions)),
        "caption_provenance": captions,
        "instruct_provenance": instructions,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def empty_because(result: LlavaExport) -> str | None:
    """Why stage2.json holds nothing, in words a trainer can repeat."""
    if result.stage2:
        return None
    if result.instruct_hash is None:
        return f"no instruction data was written from pairs {result.agents_hash}: run pathgen instruct first"
    return (
        f"pathgen instruct ({result.instruct_hash}) wrote no conversation that passed validation (random-weight "
        "models never write valid ones; the reasons are in the store's failed-instruct tables)"
    )
