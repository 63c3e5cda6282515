"""``pathgen export llava``: both stages of PathGen-LLaVA's training data in LLaVA's conversation JSON, with the
patch images written beside it::

    DIR/stage1.json     every caption pair as one turn: {"id", "image": "images/<patch_id>.jpg", "conversations":
                        [{"from": "human", "value": "<image>\\n<a request for a short description>"},
                         {"from": "gpt", "value": <caption>}]}
    DIR/stage2.json     the instruction conversations, "<image>\\n" opening the first human turn
    DIR/images/<patch_id>.jpg   the patch JPEG bytes from the pair shards
    DIR/provenance.json store, hashes, counts, models, random_weights

The set is built in a hidden folder beside DIR and moved onto DIR when complete; a folder DIR of an earlier llava
export is moved aside first and removed after, so a reader finds the old complete set or the new one (or, for the
instant between two renames, none), never a mixture. A DIR that holds anything else is refused, never overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasks.captions.export import agents_hashes
from tasks.captions.records import pair_key, pairs_prefix
from tasks.instruct.commit import metadata
from tasks.instruct.records import instruct_prefix
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
_WORK_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)~[0-9a-f]{12}\.(partial|old)$")


@dataclass
class LlavaExport:
    out: Path
    agents_hash: str
    instruct_hash: str | None  # None: no instruction data was written from these pairs (stage 1 only)
    stage1: int = 0
    stage2: int = 0
    images: int = 0
    missing_images: int = 0  # conversations left out: no pair shard held their patch's image
    kinds: dict[str, int] = field(default_factory=dict)
    random_weight_records: dict[str, int] = field(default_factory=lambda: {"stage1": 0, "stage2": 0})

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
    """A JSON list written one record at a time: an export of 1.6M pairs is never held in memory."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w")  # noqa: SIM115 - closed in close()
        self.count = 0
        self.handle.write("[")

    def add(self, record: dict[str, Any]) -> None:
        self.handle.write(("\n" if not self.count else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]\n")
        self.handle.close()


def stage1_instruction(patch_id: str) -> str:
    return STAGE1_INSTRUCTIONS[int(hashlib.sha256(patch_id.encode()).hexdigest()[:8], 16) % len(STAGE1_INSTRUCTIONS)]


def with_image_token(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA's convention: the image token opens the first human turn (and appears nowhere else)."""
    first = next(i for i, m in enumerate(messages) if m["from"] == "human")
    turns = [dict(m) for m in messages]
    turns[first]["value"] = f"{IMAGE_TOKEN}\n{turns[first]['value'].replace(IMAGE_TOKEN, '').strip()}"
    return turns


def _read(store: Store, key: str, columns: list[str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    with store.open(key) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        raw = shard.schema_arrow.metadata or {}
        names = shard.schema_arrow.names
        rows = read_shard(handle, columns=[c for c in columns if c in names]).to_pylist()
    return rows, {k.decode(): v.decode() for k, v in raw.items()}


def _write_image(folder: Path, patch_id: str, jpeg: bytes) -> bool:
    path = folder / f"{patch_id}.jpg"
    if path.exists():
        return False
    path.write_bytes(jpeg)
    return True


def _stage1(store: Store, agents_hash: str, folder: Path, result: LlavaExport) -> dict[str, Any]:
    """Every pair of the agents_hash as a one-turn conversation; returns the captioning's provenance."""
    out = _JsonList(folder / "stage1.json")
    provenance: dict[str, Any] = {}
    columns = ["patch_id", "caption", "image", "random_weights"]
    for key in store.list(pairs_prefix(agents_hash), ".parquet"):
        rows, meta = _read(store, key, columns)
        provenance = provenance or json.loads(meta.get("pathgen.provenance", "{}"))
        for row in rows:
            result.images += _write_image(folder / "images", row["patch_id"], row["image"])
            human = f"{IMAGE_TOKEN}\n{stage1_instruction(row['patch_id'])}"
            conversations = [{"from": "human", "value": human}, {"from": "gpt", "value": row["caption"]}]
            out.add({"id": row["patch_id"], "image": f"images/{row['patch_id']}.jpg", "conversations": conversations})
            result.random_weight_records["stage1"] += bool(row.get("random_weights"))
    out.close()
    result.stage1 = out.count
    return provenance


def _images_of_slide(store: Store, source_hash: str, slide_id: str, folder: Path, result: LlavaExport) -> None:
    """The images of a slide's patches that stage 1 did not write (instruct data from other pairs)."""
    key = pair_key(source_hash, slide_id)
    if store.exists(key):
        rows, _ = _read(store, key, ["patch_id", "image"])
        for row in rows:
            result.images += _write_image(folder / "images", row["patch_id"], row["image"])


def _stage2(store: Store, instruct_hash: str | None, folder: Path, result: LlavaExport) -> dict[str, Any]:
    """Every conversation of the instruct_hash (none without one); returns the instruct run's provenance."""
    out = _JsonList(folder / "stage2.json")
    provenance: dict[str, Any] = {}
    if instruct_hash is None:
        out.close()
        return provenance
    columns = ["conversation_id", "patch_id", "slide_id", "kind", "conversation", "random_weights"]
    for key in store.list(instruct_prefix(instruct_hash), ".parquet"):
        rows, meta = _read(store, key, columns)
        provenance = provenance or json.loads(meta.get("pathgen.provenance", "{}"))
        if any(not (folder / "images" / f"{r['patch_id']}.jpg").exists() for r in rows):
            _images_of_slide(store, meta.get("pathgen.source_agents_hash", ""), rows[0]["slide_id"], folder, result)
        for row in rows:
            if not (folder / "images" / f"{row['patch_id']}.jpg").exists():
                result.missing_images += 1
                continue
            turns = with_image_token(json.loads(row["conversation"]))
            out.add({"id": row["conversation_id"], "image": f"images/{row['patch_id']}.jpg", "conversations": turns})
            result.kinds[row["kind"]] = result.kinds.get(row["kind"], 0) + 1
            result.random_weight_records["stage2"] += bool(row.get("random_weights"))
    out.close()
    result.stage2 = out.count
    return provenance


def _check_out(out: Path) -> None:
    """DIR may be new, empty, or an earlier llava export (replaced); anything else is refused, never deleted."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ValueError(f"folder {out.parent} does not exist; create it or choose another --out")
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; the llava export writes a folder")
    marker = out / "provenance.json"
    try:
        earlier = json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        earlier = False
    if any(out.iterdir()) and not earlier:
        raise ValueError(f"--out {out} holds files that are not a llava export; choose a new or empty folder")


def _remove_leftovers(out: Path) -> None:
    """Work folders of exports to the same DIR whose process is gone (killed mid-export)."""
    for entry in out.parent.glob(f".{out.name}.*"):
        match = _WORK_DIR.match(entry.name)
        if match and match["name"] == out.name and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _swap_in(work: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}~{uuid.uuid4().hex[:12]}.old"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


def export_llava(
    store: Store, out: str | Path, agents_hash: str | None = None, instruct_hash: str | None = None
) -> LlavaExport:
    """Write DIR/stage1.json, stage2.json, images/ and provenance.json (see the module's docstring)."""
    agents_hash, instruct_hash = choose_hashes(store, agents_hash, instruct_hash)
    out = Path(out).expanduser().absolute()
    _check_out(out)
    _remove_leftovers(out)
    work = out.parent / f".{out.name}.{os.getpid()}~{uuid.uuid4().hex[:12]}.partial"
    result = LlavaExport(out, agents_hash, instruct_hash)
    try:
        (work / "images").mkdir(parents=True)
        captions = _stage1(store, agents_hash, work, result)
        instructions = _stage2(store, instruct_hash, work, result)
        provenance = _provenance(store, result, captions, instructions)
        (work / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
        _swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


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
