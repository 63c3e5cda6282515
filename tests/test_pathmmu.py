"""``pathgen mc-dataset pathmmu``: the released PathMMU files (data.json + images/, the layout of the official
repository's eval/utils/data_utils.py) converted into evaluate-mc JSON Lines that load, with every question left out
reported with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pathgen import cli
from tasks.mc.dataset import load_questions
from tasks.mc.pathmmu import Unconvertible, _answer, convert_release


def _question(no: int, img: str, answer: str = "B) Granuloma", **extra) -> dict:
    options = ["A) Adenocarcinoma", "B) Granuloma", "C) Lymphoma", "D) Normal tissue"]
    question = {"No": no, "img": img, "question": f"What does image {no} show?", "options": options}
    return question | {"answer": answer, "explanation": f"Because of {no}.", **extra}


def release(root: Path) -> Path:
    """A PathMMU release folder: data.json of subset -> split -> questions, the images of images.zip in images/,
    PathCLS's source image under the root (as construct_pathcls.py reads it) and SocialPath's image absent (it
    comes from Twitter)."""
    data = {
        "PubMed": {
            "test": [_question(1, "pm1.jpg"), _question(2, "pm2.png", answer="D) Normal tissue")],
            "test_tiny": [_question(1, "pm1.jpg")],
            "val": [_question(9, "pm1.jpg", answer="A) Adenocarcinoma")],
        },
        "SocialPath": {"test": [_question(1, "0a1b2c.jpg", tw_id="1045452664673316865", img_position=2)]},
        "EduContent": {"test": [_question(1, "edu1.jpg"), _question(2, "edu1.jpg", answer="C) Granuloma")]},
        "PathCLS": {"test": [_question(1, "cls1.jpg", source_img="CRC100K/NCT-CRC-HE-100K/ADI/ADI-AAAWMSFI.tif")]},
    }
    images = ["images/pm1.jpg", "images/pm2.png", "images/edu1.jpg", "CRC100K/NCT-CRC-HE-100K/ADI/ADI-AAAWMSFI.tif"]
    for i, name in enumerate(images):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 90, 160)).save(root / name)
    (root / "data.json").write_text(json.dumps(data))
    return root


def test_release_converts_and_loads_with_reasons_for_the_rest(tmp_path, capsys):
    root = release(tmp_path / "PathMMU")
    out = root / "pathmmu-test.jsonl"
    assert cli.main(["mc-dataset", "pathmmu", "--root", str(root), "--out", str(out)]) == 1  # some left out
    questions = load_questions(out)
    assert [q.id for q in questions] == ["PubMed-test-1", "PubMed-test-2", "EduContent-test-1", "PathCLS-test-1"]
    assert [q.subset for q in questions] == ["PubMed", "PubMed", "EduContent", "PathCLS"]
    assert [q.answer for q in questions] == ["B", "D", "B", "B"]
    assert questions[0].options == (
        ("A", "Adenocarcinoma"),
        ("B", "Granuloma"),
        ("C", "Lymphoma"),
        ("D", "Normal tissue"),
    )
    assert questions[0].image == root / "images" / "pm1.jpg"
    assert questions[3].image == root / "CRC100K/NCT-CRC-HE-100K/ADI/ADI-AAAWMSFI.tif"  # found by source_img
    first = json.loads(out.read_text().splitlines()[0])
    assert (first["split"], first["no"], first["explanation"]) == ("test", 1, "Because of 1.")
    printed = capsys.readouterr().out
    assert "4 of 6 questions converted" in printed
    assert "not converted, image not in the download: 1" in printed and "SocialPath-test-1" in printed
    assert "Twitter" in printed  # where SocialPath's images come from
    assert "not converted, answer disagrees with its option: 1" in printed and "EduContent-test-2" in printed


def test_split_and_subset_choice(tmp_path):
    root = release(tmp_path / "PathMMU")
    out = root / "val.jsonl"
    assert cli.main(["mc-dataset", "pathmmu", "--root", str(root), "--out", str(out), "--split", "val"]) == 0
    assert [(q.id, q.answer) for q in load_questions(out)] == [("PubMed-val-9", "A")]
    out = root / "pubmed.jsonl"
    args = ["mc-dataset", "pathmmu", "--root", str(root), "--out", str(out), "--subset", "PubMed"]
    assert cli.main(args) == 0  # every PubMed test question converts
    assert {q.subset for q in load_questions(out)} == {"PubMed"}
    assert cli.main([*args[:-1], "Nope"]) == 2


def test_output_above_the_root_names_images_through_it(tmp_path):
    root = release(tmp_path / "downloads" / "PathMMU")
    out = tmp_path / "downloads" / "pathmmu.jsonl"
    conversion = convert_release(root, out, subsets=["PubMed"])
    assert conversion.records[0]["image"] == "PathMMU/images/pm1.jpg"
    out.write_text("".join(json.dumps(r) + "\n" for r in conversion.records))
    assert load_questions(out)[0].image == root / "images" / "pm1.jpg"


def test_output_elsewhere_is_refused_unless_images_are_copied(tmp_path, capsys):
    root = release(tmp_path / "PathMMU")
    out = tmp_path / "elsewhere" / "pathmmu.jsonl"
    out.parent.mkdir()
    args = ["mc-dataset", "pathmmu", "--root", str(root), "--out", str(out), "--subset", "PubMed"]
    assert cli.main(args) == 2
    assert "--copy-images" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args, "--copy-images"]) == 0
    questions = load_questions(out)
    assert questions[0].image == out.parent / "pathmmu-images" / "images" / "pm1.jpg"
    assert not questions[0].image.is_symlink()
    assert questions[0].image.read_bytes() == (root / "images" / "pm1.jpg").read_bytes()
    assert cli.main([*args, "--copy-images"]) == 0  # a rerun replaces its copies


def test_not_a_release_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["mc-dataset", "pathmmu", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "empty" / "x.jsonl")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "data.json" in err and "jamessyx/PathMMU" in err
    (tmp_path / "empty" / "data.json").write_text('{"PubMed": [1, 2]}')
    assert cli.main(args) == 2
    assert "expected {subset: {split: [questions]}}" in capsys.readouterr().err


def test_bad_questions_are_reported_not_fatal(tmp_path, capsys):
    root = release(tmp_path / "PathMMU")
    data = json.loads((root / "data.json").read_text())
    data["PubMed"]["test"] += [
        "not an object",
        _question(3, "pm1.jpg") | {"options": ["A) only one"]},
        _question(1, "pm1.jpg"),  # No 1 again
        _question(4, "../outside.jpg"),
    ]
    (root / "data.json").write_text(json.dumps(data))
    out = root / "pubmed.jsonl"
    assert cli.main(["mc-dataset", "pathmmu", "--root", str(root), "--out", str(out), "--subset", "PubMed"]) == 1
    assert [q.id for q in load_questions(out)] == ["PubMed-test-1", "PubMed-test-2"]
    printed = capsys.readouterr().out
    for reason in ("bad record", "rejected by the evaluate-mc format", "duplicate No", "image outside the release"):
        assert f"not converted, {reason}: 1" in printed
    assert "PubMed-test-4: 'images/../outside.jpg' has a '..' part" in printed


def test_answer_labels():
    options = ["A) Adenocarcinoma", "B) Granuloma"]
    assert _answer("B) Granuloma", options) == "B"
    assert _answer("(A) adenocarcinoma.", options) == "A"
    assert _answer("B", options) == "B"  # a bare letter is left to the format's parser
    assert _answer("Granuloma", options) == "Granuloma"
    with pytest.raises(Unconvertible, match="option A is"):
        _answer("A) Granuloma", options)
