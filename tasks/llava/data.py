"""Training data in LLaVA's own JSON format: a folder with ``stage1.json`` (caption pairs as single-turn
conversations) and ``stage2.json`` (instruction conversations), each a list of ``{"id", "image": "images/x.jpg"
(relative to the folder), "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``,
and the images beside. Any folder in this format trains, LLaVA's released data included.

A conversation becomes token ids through the processor's own chat template, so training sees exactly the text that
generation is prompted with. The loss counts only the assistant's tokens: everything else, image tokens included,
is labelled -100.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.digest import cache_dir, save_json_cache
from tasks.paths import escapes_folder

IGNORE = -100
STAGE_FILES = {"stage1": "stage1.json", "stage2": "stage2.json"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_records(folder: Path, stage: str) -> list[dict[str, Any]]:
    """One stage's records, checked: known roles, an assistant turn, and every named image present."""
    path = Path(folder) / STAGE_FILES[stage]
    if not path.is_file():
        raise ValueError(f"{path} does not exist: a LLaVA data folder holds stage1.json and stage2.json")
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of conversations")
    problems = [f"{r.get('id', i) if isinstance(r, dict) else i}: {p}" for i, r in enumerate(records)
                if (p := record_problem(folder, r))]  # fmt: skip
    if problems:
        raise ValueError(f"{len(problems)} bad records in {path}, e.g. {'; '.join(problems[:3])}")
    if not records:
        raise ValueError(empty_stage(folder, stage))
    return records


def empty_stage(folder: Path, stage: str) -> str | None:
    """Why a stage of the folder has nothing to train on, or None. Random-weight instruct models never write a
    conversation that passes validation, so an all-tiny factory run has an empty stage2.json: that stage is not
    trained (and says why) rather than failing the run."""
    path = Path(folder) / STAGE_FILES[stage]
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the training unit reports a missing or malformed file with its reason
    if isinstance(records, list) and not records:
        return f"{path} holds no conversations: {_export_says(Path(folder), stage)}"
    return None


def _export_says(folder: Path, stage: str) -> str:
    """The reason an export's provenance.json gives for an empty stage file, or a general one."""
    try:
        reason = json.loads((folder / "provenance.json").read_text())[stage]["empty_because"]
    except (OSError, ValueError, KeyError, TypeError):
        reason = None
    if isinstance(reason, str) and reason:
        return reason
    source = "pathgen instruct" if stage == "stage2" else "pathgen caption"
    return f"{source} wrote none that passed validation (random-weight models never write valid ones)"


def record_problem(folder: Path, record: Any) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "not an object with a conversations list"
    turns = record["conversations"]
    if any(not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str) for t in turns):
        return f"turns need from (one of {', '.join(ROLES)}) and a string value"
    roles = [ROLES[t["from"]] for t in turns]
    if "assistant" not in roles:
        return "no gpt turn to learn from"
    if "user" not in roles[: roles.index("assistant")]:
        return "a gpt turn before any human turn"
    if record.get("image") and (problem := image_problem(record["image"], folder)):
        return problem
    if record.get("image") and not (Path(folder) / record["image"]).is_file():
        return f"image {record['image']} is missing"
    if not record.get("image") and any("<image>" in t["value"] for t in turns):
        return "an <image> placeholder without an image"
    return None


def image_problem(name: Any, folder: Path) -> str | None:
    """Why a record's ``image`` does not name a file inside the data folder, or None: an absolute path, a ``..``
    part or a link out of the folder would let a record read any file of the machine into training."""
    if not isinstance(name, str):
        return f"image must be a path relative to the data folder, got {json.dumps(name)[:80]}"
    if reason := escapes_folder(folder, name):
        return (
            f"image {name!r} lies outside the data folder ({reason}); name images relative to the folder, "
            "e.g. images/x.jpg"
        )
    return None


def unsafe_images(path: Path, records: list[Any]) -> str | None:
    """One error naming the stage file and its records whose image lies outside the folder, or None."""
    bad = [f"{r.get('id', i)}: {p}" for i, r in enumerate(records)
           if isinstance(r, dict) and r.get("image") and (p := image_problem(r["image"], path.parent))]  # fmt: skip
    return f"{len(bad)} bad records in {path}, e.g. {'; '.join(bad[:3])}" if bad else None


def data_digest(folder: Path, stages: list[str]) -> str:
    """What the data holds, not where it lies: the stage files' bytes and the bytes of each named image."""
    digest = hashlib.sha256()
    for stage in stages:
        path = Path(folder) / STAGE_FILES[stage]
        raw = path.read_bytes()
        digest.update(f"{stage}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
        records = json.loads(raw)
        records = records if isinstance(records, list) else []  # the training unit reports a malformed file
        if problem := unsafe_images(path, records):  # before any of them is read
            raise ValueError(problem)
        names = sorted({r["image"] for r in records if isinstance(r, dict) and r.get("image")})
        for name, content in image_digests(Path(folder), names).items():
            digest.update(f"{name}\0{content}\n".encode())  # a missing image: the training unit reports it
    return digest.hexdigest()


# A cached image digest is trusted only for a file this much older than the moment it was hashed: the file system's
# clock is coarse, so a file rewritten within the same tick as its hashing could keep its (size, mtime) stamp.
SETTLED_NS = 2 * 10**9


def _digest_cache(folder: Path) -> Path:
    """Per data folder, beside pathgen/digest.py's cache; holds only that folder's current images (bounded)."""
    name = hashlib.sha256(str(folder.absolute()).encode()).hexdigest()[:16]
    return cache_dir() / "llava-images" / f"{name}.json"


def image_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """{name: sha256 of the image's bytes} ("missing" for an absent file). A digest is remembered per data folder
    under the file's (size, mtime): a second run over an unchanged folder reads no image."""
    cache_file = _digest_cache(folder)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, kept = {}, {}
    for name in names:
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            digests[name] = "missing"
            continue
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(name)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            digests[name] = entry[2]
        else:
            hashed_at = time.time_ns()
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            if stat.st_mtime_ns > hashed_at - SETTLED_NS:
                continue  # too fresh to trust its stamp: hashed again next time
        kept[name] = [*stamp, digests[name]]
    save_json_cache(cache_file, kept)
    return digests


def messages_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """LLaVA turns -> chat messages; an image with no placeholder gets one before the first question (as LLaVA)."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    if record.get("image") and not any("<image>" in m["content"] for m in messages):
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = "<image>\n" + first["content"]
    return messages


@dataclass
class Encoder:
    """Turns a conversation into (input_ids, labels) with the processor's template and image token count."""

    processor: Any
    image_tokens: int
    max_length: int

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant) pieces: each assistant piece is what the full
        rendering adds after the prompt that asks for that answer, so the template decides every boundary."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation=True)
            full = self._render(messages[: i + 1], generation=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("the chat template does not render a conversation as a growing prefix")
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        rest = self._render(messages, generation=False)[len(done) :]
        return pieces + ([(rest, False)] if rest else [])

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        tokenizer = self.processor.tokenizer
        image = self.processor.image_token
        ids: list[int] = []
        labels: list[int] = []
        for text, target in self.segments(messages):
            text = text.replace(image, image * self.image_tokens)  # as the processor expands it at inference
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
        image_id = self.processor.image_token_id
        labels = [IGNORE if t == image_id else label for t, label in zip(ids, labels, strict=True)]
        return self._truncate(ids, labels)

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if len(ids) <= self.max_length:
            return ids, labels
        if self.processor.image_token_id in ids[self.max_length :]:  # the image's features would have no place
            raise ValueError(f"llava.max_length {self.max_length} cuts off image tokens; raise it")
        return ids[: self.max_length], labels[: self.max_length]


class ConversationDataset:
    """Records of one stage as model inputs; images are read and preprocessed per item (in loader workers)."""

    def __init__(self, folder: Path, records: list[dict[str, Any]], encoder: Encoder) -> None:
        self.folder, self.records, self.encoder = Path(folder), records, encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        record = self.records[index]
        ids, labels = self.encoder.encode(messages_of(record))
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "pixel_values": None}
        if record.get("image"):
            if problem := image_problem(record["image"], self.folder):  # judged again as it is opened
                raise ValueError(f"record {record.get('id', index)}: {problem}")
            with Image.open(self.folder / record["image"]) as picture:
                rgb = picture.convert("RGB")
            pixels = self.encoder.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
            item["pixel_values"] = pixels[0]
        return item


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded ids, labels and mask; the pixels of the items that have an image, in order (LLaVA fills the
    image tokens of the batch with the images' features in that order)."""
    import torch

    width = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [i["pixel_values"] for i in items if i["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch
