"""Convert the released PathMMU benchmark into the ``evaluate-mc`` JSON Lines format of :mod:`tasks.mc.dataset`.

Layout built against (the official release, read 2026-12 in the PathMMU repository
github.com/PathMMU-Benchmark/PathMMU: README.md, ``eval/utils/data_utils.py`` ``get_pathmmu_data``,
``data/instructions.md``, ``data/construct_pathcls.py``; the HF dataset jamessyx/PathMMU holds ``data.json`` and
``images.zip``; kaiko-ai/eva's ``path_mmu_atlas.py`` / ``path_mmu_educontent.py`` read the same files)::

    ROOT/data.json      {"PubMed": {"test": [...], "test_tiny": [...], "val": [...]}, "SocialPath": {...},
                         "EduContent": {...}, "Atlas": {...}, "PathCLS": {...}}
    ROOT/images/<img>   every question's image, by its ``img`` field

A question is ``{"No": 1, "img": "<name>.jpg", "question": "...", "options": ["A) ...", "B) ..."],
"answer": "A) ...", "explanation": "..."}``; the official evaluation takes the answer's letter from its first
character. Only the PubMed and EduContent images ship in ``images.zip``: SocialPath's come from Twitter by ``tw_id``,
PathCLS's from the nine classification sets (``construct_pathcls.py`` copies them to ``images/<img>`` from
``source_img``), Atlas's from the ARCH book set (``source_img``). So an image is looked for at ``ROOT/images/<img>``,
then at ``ROOT/<source_img>`` (sources unpacked under ROOT); a question whose image is in neither place is not
converted and is reported with that reason and where its images come from.

The output keeps the subset (``subset``), the split (``split``), the official number (``no``) and the explanation;
its ``id`` is ``<subset>-<split>-<No>``. Images must resolve inside the output file's folder (the format refuses
``..`` and links out of it), so the converted file either lies in ROOT or a folder above it and names the images in
place (nothing copied), or, with ``copy_images``, gets them beside it in ``<out stem>-images/`` (hard links where
the file system allows, copies otherwise). Any other placement is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.files import write_atomic
from tasks.mc.dataset import DatasetError, normalize, parse_line
from tasks.paths import outside_folder

DATA_FILE = "data.json"
IMAGES = "images"
SPLITS = ("test", "test_tiny", "val")
RELEASE = "https://huggingface.co/datasets/jamessyx/PathMMU"
INSTRUCTIONS = "https://github.com/PathMMU-Benchmark/PathMMU/blob/main/data/instructions.md"
# where a subset's images come from when they are not in images.zip
IMAGE_SOURCES = {
    "SocialPath": f"SocialPath images are downloaded from Twitter by tw_id ({INSTRUCTIONS})",
    "PathCLS": f"PathCLS images come from the nine classification sets: run construct_pathcls.py ({INSTRUCTIONS})",
    "Atlas": "Atlas images come from the ARCH book set: unpack it under the root so that <root>/<source_img> exists",
}
_ANSWER_LABEL = re.compile(r"\(?([A-Z])[).:]\s*(.*)", re.S)  # "B) text", "(B) text", "B. text"


class PathmmuError(ValueError):
    """The release folder or the requested conversion is unusable as a whole."""


class Unconvertible(Exception):
    """One question cannot be converted; ``kind`` groups the report, ``detail`` says what exactly."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Skipped:
    id: str
    subset: str
    kind: str
    detail: str


@dataclass
class Conversion:
    subsets: list[str] = field(default_factory=list)  # converted or not, in data.json's order
    records: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # name in the output -> source file (for copying)

    def converted_by_subset(self) -> dict[str, int]:
        return dict(Counter(record["subset"] for record in self.records))


def read_release(root: Path) -> dict[str, dict[str, list]]:
    """``ROOT/data.json``, checked to be an object of subset -> split -> list of questions."""
    path = Path(root) / DATA_FILE
    if not path.is_file():
        raise PathmmuError(
            f"{path} not found: --root must be the PathMMU release folder holding data.json and images/ "
            f"(download it from {RELEASE} and unzip images.zip there)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PathmmuError(f"{path} is not valid JSON ({exc}); download data.json again from {RELEASE}") from None
    if not isinstance(data, dict) or not all(
        isinstance(splits, dict) and all(isinstance(items, list) for items in splits.values())
        for splits in data.values()
    ):
        raise PathmmuError(f"{path} is not PathMMU's data.json: expected {{subset: {{split: [questions]}}}}")
    return data


def chosen_subsets(data: dict[str, dict[str, list]], wanted: list[str] | None) -> list[str]:
    """The subsets to convert, in data.json's order; an unknown name is an error listing those present."""
    if not wanted:
        return list(data)
    unknown = [name for name in wanted if name not in data]
    if unknown:
        raise PathmmuError(f"subset(s) {', '.join(unknown)} not in data.json; it has: {', '.join(data)}")
    return [name for name in data if name in wanted]


def image_prefix(root: Path, out: Path, copy_images: bool) -> str:
    """What goes before an image's path under ROOT in the output: ROOT relative to the output's folder, or the
    copies' folder; refuses a placement from which the images cannot be named inside the output's folder."""
    if copy_images:
        return f"{out.stem}-images/"
    folder, root = out.absolute().parent.resolve(), Path(root).resolve()
    if not root.is_relative_to(folder):
        raise PathmmuError(
            f"the images under {root} cannot be named from {folder} (the evaluate-mc format only reads images in "
            f"the file's folder or below): put --out in the root or a folder above it, e.g. "
            f"{root / 'pathmmu-test.jsonl'}, or pass --copy-images to place them beside the output"
        )
    relative = root.relative_to(folder).as_posix()
    return "" if relative == "." else f"{relative}/"


def _find_image(item: dict, subset: str, root: Path) -> str:
    """The image's path relative to ROOT: images/<img>, else <source_img>."""
    img, source = item.get("img"), item.get("source_img")
    if not isinstance(img, str) or not img.strip():
        raise Unconvertible("bad record", f"img must be the image's file name, got {json.dumps(img)[:80]}")
    candidates = [f"{IMAGES}/{img.strip()}"] + ([source.strip()] if isinstance(source, str) and source.strip() else [])
    for name in candidates:
        if reason := outside_folder(name):  # judged by its text, before the file system is asked about it
            raise Unconvertible("image outside the release", f"{name!r} has {reason}; images must lie under {root}")
        if (root / name).is_file():
            return name
    hint = IMAGE_SOURCES.get(subset, f"PubMed and EduContent images are in images.zip ({RELEASE})")
    raise Unconvertible("image not in the download", f"looked for {', '.join(candidates)} under {root}; {hint}")


def _answer(answer: Any, options: Any) -> Any:
    """PathMMU's "B) text" answer as the letter B, checked against option B's text; anything else as it is."""
    if not isinstance(answer, str) or not isinstance(options, list):
        return answer
    match = _ANSWER_LABEL.fullmatch(answer.strip())
    if not match:
        return answer
    letter, text = match.group(1), match.group(2)
    index = ord(letter) - ord("A")
    if text and 0 <= index < len(options) and isinstance(options[index], str):
        option = _ANSWER_LABEL.fullmatch(options[index].strip())
        option_text = option.group(2) if option and option.group(1) == letter else options[index]
        if normalize(option_text) != normalize(text):
            raise Unconvertible(
                "answer disagrees with its option", f"answer {answer!r} but option {letter} is {options[index]!r}"
            )
    return letter


def convert_question(item: Any, subset: str, split: str, root: Path, number: int) -> dict:
    """One data.json question as an evaluate-mc record whose image is named relative to ROOT; checked by the
    format's own parser (image opened), so the written file loads."""
    if not isinstance(item, dict):
        raise Unconvertible("bad record", f"expected a JSON object, got {type(item).__name__}")
    no = item.get("No")
    if isinstance(no, bool) or not isinstance(no, int | str) or not str(no).strip():
        raise Unconvertible("bad record", f"No must be the question's number, got {json.dumps(no)[:80]}")
    record = {
        "id": f"{subset}-{split}-{str(no).strip()}",
        "image": _find_image(item, subset, root),
        "question": item.get("question"),
        "options": item.get("options"),
        "answer": _answer(item.get("answer"), item.get("options")),
        "subset": subset,
    }
    try:
        question = parse_line(json.dumps(record), number, root)
    except DatasetError as exc:
        raise Unconvertible("rejected by the evaluate-mc format", str(exc)) from None
    # options as letter -> text: written labels are already stripped, so they are not stripped twice on reading
    record |= {"options": dict(question.options), "answer": question.answer, "split": split, "no": no}
    if isinstance(item.get("explanation"), str):
        record["explanation"] = item["explanation"]
    return record


def convert_release(
    root: Path, out: Path, split: str = "test", subsets: list[str] | None = None, copy_images: bool = False
) -> Conversion:
    """Every question of ``split`` in ``subsets`` (default: all in data.json) as records for ``out``; questions that
    cannot be converted are in ``skipped`` with their reason. Writes nothing."""
    if split not in SPLITS:
        raise PathmmuError(f"split {split!r} is not one of PathMMU's: {', '.join(SPLITS)}")
    root = Path(root)
    data = read_release(root)
    prefix = image_prefix(root, out, copy_images)
    result = Conversion(subsets=chosen_subsets(data, subsets))
    seen: set[str] = set()
    for subset in result.subsets:
        for number, item in enumerate(data[subset].get(split, []), 1):
            fallback_id = f"{subset}-{split}-#{number}"
            try:
                record = convert_question(item, subset, split, root, number)
                if record["id"] in seen:
                    raise Unconvertible("duplicate No", f"{record['id']} appears more than once in {subset}/{split}")
            except Unconvertible as exc:
                qid = f"{subset}-{split}-{item.get('No')}" if isinstance(item, dict) else fallback_id
                result.skipped.append(Skipped(qid, subset, exc.kind, exc.detail))
                continue
            seen.add(record["id"])
            result.images[prefix + record["image"]] = root / record["image"]
            result.records.append(record | {"image": prefix + record["image"]})
    return result


def _link_or_copy(source: Path, tmp: Path) -> None:
    tmp.unlink()
    try:
        os.link(source, tmp)  # a hard link is the file itself, not a link out of the folder, and costs no space
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, tmp)


def write_conversion(conversion: Conversion, out: Path, copy_images: bool = False) -> None:
    """The images (with ``copy_images``) and then the JSON Lines file, each written whole."""
    if copy_images:
        for name, source in conversion.images.items():
            write_atomic(out.parent / name, lambda tmp, source=source: _link_or_copy(source, tmp))
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in conversion.records)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
