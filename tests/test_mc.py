"""The multiple-choice harness: exact scores from a scripted backend, dataset validation naming file and line, the
reply parser on many shapes, and the tiny random VLM end to end on Kather 2016 patches."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from agents.protocol import ChatReply, ChatRequest, Sampling
from pathgen import cli
from tasks.mc import answers
from tasks.mc.answers import load_mc_prompt, parse_reply
from tasks.mc.dataset import DatasetError, load_questions
from tasks.mc.evaluate import answer_questions, build_report, mc_sampling, summarize

KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "patches" / "kather2016-samples"
CLASSES = Path(__file__).resolve().parents[1] / "tasks" / "clip" / "data" / "kather2016-classes.json"
OPTIONS = ["Adenocarcinoma", "Squamous cell carcinoma", "Lymphoma", "Normal tissue"]
PAIRS = tuple(zip("ABCD", OPTIONS, strict=True))


class Scripted:
    """A ChatBackend test double: a fixed reply per question (found by the question's text in the prompt)."""

    name = "scripted"
    model_id = "scripted-test"
    random_weights = False

    def __init__(self, replies: dict[str, ChatReply]):
        self.replies = replies
        self.calls: list[tuple[list[ChatRequest], Sampling]] = []

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        self.calls.append((requests, sampling))
        return [next(r for q, r in self.replies.items() if q in req.after_image) for req in requests]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (seed * 40 % 256, 80, 120)).save(path)


def _write(folder: Path, rows: list[dict | str], name: str = "mc.jsonl") -> Path:
    """The rows as JSONL (a string row is written as is), with a small image for each, except under absent/."""
    for row in rows:
        image = row.get("image") if isinstance(row, dict) else None
        if isinstance(image, str) and not image.startswith("absent/") and not (folder / image).exists():
            _png(folder / image, len(image))
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(qid: str, answer: str = "B", subset: str | None = "PubMed", **extra) -> dict:
    row = {"id": qid, "image": f"images/{qid}.png", "question": f"What is shown in {qid}?", "options": OPTIONS}
    row |= {"answer": answer, **({"subset": subset} if subset else {})}
    return row | extra


FIVE = [  # (row, reply): 3 right, 1 wrong, 1 unparseable
    (_row("q1", "B"), "B"),
    (_row("q2", "C"), "Answer: (C)"),
    (_row("q3", "D"), "A"),
    (_row("q4", "Normal tissue", subset="Atlas"), "normal tissue."),
    (_row("q5", "A", subset="Atlas"), "I cannot tell from this image"),
]


def _scripted(tmp_path: Path, cases=FIVE) -> tuple[list, Scripted]:
    questions = load_questions(_write(tmp_path, [row for row, _ in cases]))
    replies = {f"What is shown in {row['id']}?": ChatReply(text, None, "stop") for row, text in cases}
    return questions, Scripted(replies)


# -- scoring ---------------------------------------------------------------------------------------------------


def test_scripted_backend_is_scored_exactly(tmp_path):
    questions, backend = _scripted(tmp_path)
    predictions = answer_questions(backend, questions, load_mc_prompt(), mc_sampling(), chunk=2)
    summary = summarize(predictions)
    assert summary["overall"] == {"n": 5, "correct": 3, "accuracy": 0.6, "unparsed": 1}
    assert summary["by_subset"]["PubMed"] == {"n": 3, "correct": 2, "accuracy": 2 / 3, "unparsed": 0}
    assert summary["by_subset"]["Atlas"] == {"n": 2, "correct": 1, "accuracy": 0.5, "unparsed": 1}
    assert summary["unparsed"] == {answers.NO_OPTION: ["q5"]}
    assert [p.predicted for p in predictions] == ["B", "C", "A", "D", None]
    assert [len(requests) for requests, _ in backend.calls] == [2, 2, 1]  # batched through generate
    assert all(s.temperature == 0 for _, s in backend.calls)


def test_requests_carry_jpeg_image_lettered_options_and_instruction(tmp_path):
    questions, backend = _scripted(tmp_path)
    answer_questions(backend, questions[:1], load_mc_prompt(), mc_sampling())
    request = backend.calls[0][0][0]
    assert request.image.startswith(b"\xff\xd8\xff")  # PNG on disk, JPEG to the backend, as the protocol says
    assert "A. Adenocarcinoma\nB. Squamous cell carcinoma\nC. Lymphoma\nD. Normal tissue" in request.after_image
    assert request.after_image.endswith("Answer with the option's letter from the given choices directly.")


def test_backend_error_reply_is_wrong_with_its_reason(tmp_path):
    cases = [(_row("q1", "B"), "B"), (_row("q2", "A", subset=None), "A")]
    questions, backend = _scripted(tmp_path, cases)
    backend.replies["What is shown in q2?"] = ChatReply(None, "HTTP 400: image too large")
    predictions = answer_questions(backend, questions, load_mc_prompt(), mc_sampling())
    summary = summarize(predictions)
    assert summary["overall"] == {"n": 2, "correct": 1, "accuracy": 0.5, "unparsed": 1}
    assert summary["unparsed"] == {answers.NO_REPLY: ["q2"]}
    assert list(summary["by_subset"]) == ["PubMed"]  # a question without a subset counts in overall only
    assert predictions[1].error == "HTTP 400: image too large"


def test_report_names_model_prompt_and_predictions(tmp_path):
    questions, backend = _scripted(tmp_path)
    predictions = answer_questions(backend, questions, load_mc_prompt(), mc_sampling())
    model = {"backend": "scripted", "model_id": "scripted-test", "random_weights": False}
    report = build_report(tmp_path / "mc.jsonl", "mc", predictions, model, load_mc_prompt(), mc_sampling(), None)
    assert report["random_weights"] is False and report["prompt"].startswith("mc.v1@")
    assert report["predictions"][4] | {"reply": None} == {
        "id": "q5",
        "subset": "Atlas",
        "answer": "A",
        "predicted": None,
        "correct": False,
        "reply": None,
        "reason": answers.NO_OPTION,
        "finish_reason": "stop",
        "error": None,
    }
    json.dumps(report)  # JSON-ready


def test_cli_publishes_to_the_store_and_prints_figures(tmp_path, monkeypatch, capsys):
    questions, backend = _scripted(tmp_path)
    model = {"backend": "scripted", "model_id": "scripted-test", "identity": "x", "random_weights": False}
    monkeypatch.setattr("tasks.mc.backend.load_backend", lambda *a, **k: (backend, model))
    store = tmp_path / "store"
    argv = ["evaluate-mc", "--dataset", str(tmp_path / "mc.jsonl"), "--store", str(store), "--limit", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((store / "eval" / "mc" / "scripted-test" / "mc-first4.json").read_text())
    assert report["overall"] == {"n": 4, "correct": 3, "accuracy": 0.75, "unparsed": 0} and report["limit"] == 4
    assert "accuracy 0.750 (3/4 correct)" in out and "RANDOM WEIGHTS" not in out


# -- dataset validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_row("x", image="absent/x.png"), "image 'absent/x.png' not found"),
        (_row("x", answer="E"), "answer 'E' is neither an option letter (A-D) nor the text of one option"),
        (_row("x", answer="Melanoma"), "answer 'Melanoma' is neither"),
        (_row("x", options=[]), "options is empty"),
        (_row("x", options={}), "options is empty"),
        (_row("x", options=["Adenocarcinoma", ""]), "option B must be a non-empty string"),
        (_row("x", options=["Only one"], answer="A"), "at least 2 choices"),
        (_row("x", options=["Same", "same"], answer="A"), "options A and B are the same text"),
        (_row("x", options={"A": "One", "BB": "Two"}, answer="A"), "option key 'BB' is not a letter"),
        (_row("x", options="A, B"), "options must be a list of strings or an object"),
        (_row("x", question=""), "question must be a non-empty string"),
        ({k: v for k, v in _row("x").items() if k != "id"}, "id must be a non-empty string or an integer"),
        ('{"id": "x", "image": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_validation_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [_row("ok1"), bad])
    with pytest.raises(DatasetError) as caught:
        load_questions(path)
    assert f"{path} line 2: " in str(caught.value) and message in str(caught.value)


def test_duplicate_ids_and_all_problems_at_once(tmp_path):
    path = _write(tmp_path, [_row("a"), _row("b"), "", _row("a"), _row("c", answer="Z")])
    with pytest.raises(DatasetError) as caught:
        load_questions(path)
    text = str(caught.value)
    assert text.startswith(f"2 problem(s) in {path}")
    assert f"{path} line 4: duplicate id 'a' (first on line 1)" in text and f"{path} line 5: answer 'Z'" in text


def test_unreadable_image_missing_file_and_empty_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_text("not an image")
    with pytest.raises(DatasetError, match="cannot be read as an image"):
        load_questions(_write(tmp_path, [_row("x")]))
    with pytest.raises(DatasetError, match="does not exist"):
        load_questions(tmp_path / "nowhere.jsonl")
    with pytest.raises(DatasetError, match="holds no questions"):
        load_questions(_write(tmp_path, ["", "  "], name="empty.jsonl"))


def test_accepted_shapes_of_options_and_answers(tmp_path):
    rows = [
        _row("labelled", options=["A. One", "B. Two", "C. Three"], answer="(b)"),
        _row("keyed", options={"b": "Two", "a": "One"}, answer="two"),
        _row("partly", options=["A. One", "Two"], answer="A. One"),  # not every option labelled: text kept
        _row(7, subset=None),  # integer id, no subset
    ]
    first, second, third, fourth = load_questions(_write(tmp_path, rows))
    assert first.options == (("A", "One"), ("B", "Two"), ("C", "Three")) and first.answer == "B"
    assert second.options == (("A", "One"), ("B", "Two")) and second.answer == "B"
    assert third.options == (("A", "A. One"), ("B", "Two")) and third.answer == "A"
    assert fourth.id == "7" and fourth.subset is None


def test_an_image_outside_the_dataset_folder_is_refused_naming_file_and_line(tmp_path):
    """A real image outside the folder, by '..' or by absolute path, is one error per line; nothing is read."""
    folder = tmp_path / "dataset"
    outside = tmp_path / "outside.png"
    rows = [_row("ok"), _row("up", image="../outside.png"), _row("abs", image=str(outside))]
    rows.append(_row("deep", image="images/../../outside.png"))
    path = _write(folder, rows)
    assert outside.is_file()  # the file is there and is an image: only its place is wrong
    with pytest.raises(DatasetError) as caught:
        load_questions(path)
    text = str(caught.value)
    assert text.startswith(f"3 problem(s) in {path}")
    for line, name in ((2, "../outside.png"), (3, str(outside)), (4, "images/../../outside.png")):
        assert f"{path} line {line}: image {name!r} lies outside the dataset's folder" in text


def test_an_image_linking_out_of_the_dataset_folder_is_refused(tmp_path):
    """A plain name inside the folder that is a symlink to a file elsewhere: judged by what it opens."""
    folder = tmp_path / "dataset"
    outside = tmp_path / "outside.png"
    _png(outside, 3)
    path = _write(folder, [_row("ok"), _row("link", image="images/link.png")])
    (folder / "images" / "link.png").unlink()
    (folder / "images" / "link.png").symlink_to(outside)
    (folder / "images" / "alias.png").symlink_to(folder / "images" / "ok.png")  # a link that stays inside: fine
    with pytest.raises(DatasetError) as caught:
        load_questions(path)
    text = str(caught.value)
    assert text.startswith(f"1 problem(s) in {path}")
    assert f"{path} line 2: image 'images/link.png' lies outside the dataset's folder (a link to {outside})" in text
    (folder / "images" / "link.png").unlink()
    (folder / "images" / "link.png").symlink_to(folder / "images" / "alias.png")
    assert len(load_questions(path)) == 2


def test_evaluate_mc_defaults_the_store_like_every_command(tmp_path, monkeypatch, capsys):
    """No --store and no --out: the report goes to settings.store (file://./store here), as for every command."""
    questions, backend = _scripted(tmp_path)
    model = {"backend": "scripted", "model_id": "scripted-test", "identity": "x", "random_weights": False}
    monkeypatch.setattr("tasks.mc.backend.load_backend", lambda *a, **k: (backend, model))
    monkeypatch.delenv("PATHGEN_STORE", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["evaluate-mc", "--dataset", str(tmp_path / "mc.jsonl")]) == 0
    report = json.loads((work / "store" / "eval" / "mc" / "scripted-test" / "mc.json").read_text())
    assert report["overall"]["n"] == 5 and "report: " in capsys.readouterr().out
    other = tmp_path / "other"
    assert cli.main(["evaluate-mc", "--dataset", str(tmp_path / "mc.jsonl"), "--set", f"store={other}"]) == 0
    assert (other / "eval" / "mc" / "scripted-test" / "mc.json").is_file()


def test_cli_dataset_and_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default store (./store) lands here, not in the checkout
    path = _write(tmp_path, [_row("a", answer="Z")])
    assert cli.main(["evaluate-mc", "--dataset", str(path), "--out", str(tmp_path / "r.json")]) == 2
    assert f"{path} line 1: answer 'Z'" in capsys.readouterr().err
    ok = _write(tmp_path, [_row("b")], name="ok.jsonl")
    refused = ["evaluate-mc", "--dataset", str(ok), "--out", str(tmp_path / "r.json")]
    assert cli.main([*refused, "--set", "models.allow_random_weights=false"]) == 2
    assert "tiny random-weight VLM" in capsys.readouterr().err


# -- the reply parser ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("[D]", "D"),
        ("**C**", "C"),
        ("  C\n", "C"),
        ("Answer: B", "B"),
        ("answer: (c)", "C"),
        ("The answer is (b).", "B"),
        ("The correct answer is C. Lymphoma", "C"),
        ("Option D", "D"),
        ("The answer is B because A is wrong", "B"),
        ("B. Squamous cell carcinoma", "B"),
        ("(A) Adenocarcinoma, given the glands", "A"),
        ("C) Lymphoma", "C"),
        ("D: normal", "D"),
        ("B - squamous", "B"),
        ("B Squamous cell carcinoma", "B"),
        ("Squamous cell carcinoma", "B"),
        ("lymphoma.", "C"),
        ("Answer: Normal tissue", "D"),
        ("I think (C) fits best", "C"),
    ],
)
def test_parser_reads_one_option(reply, letter):
    assert parse_reply(reply, PAIRS) == answers.Parsed(letter, None)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", answers.EMPTY),
        (None, answers.EMPTY),
        ("   ", answers.EMPTY),
        ("A tumor is present", answers.NO_OPTION),  # the article "A" is no answer
        ("the answer is a tumour", answers.NO_OPTION),
        ("I don't know", answers.NO_OPTION),
        ("Adenocarcinoma or lymphoma", answers.NO_OPTION),
        ("not adenocarcinoma", answers.NO_OPTION),  # containment is not equality
        ("A, B", answers.NO_OPTION),
        ("(A) or (B)", answers.SEVERAL),
        ("Option A is wrong; the answer is B", answers.SEVERAL),
        ("Answer: A. Answer: C.", answers.SEVERAL),
        ("E", answers.NOT_AN_OPTION),
        ("The answer is (F)", answers.NOT_AN_OPTION),
    ],
)
def test_parser_never_guesses(reply, reason):
    assert parse_reply(reply, PAIRS) == answers.Parsed(None, reason)


# -- the tiny random VLM end to end ----------------------------------------------------------------------------


def _kather_dataset(folder: Path) -> Path:
    """Eight questions, one per Kather class: which tissue is shown, four shuffled class names as options."""
    names = json.loads(CLASSES.read_text())
    classes = sorted(names)
    rng = random.Random(0)
    rows = []
    for index, name in enumerate(classes):
        tile = sorted((KATHER / name).glob("*.tif"))[0]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, folder / "images" / tile.name)
        options = [names[c][0] for c in [name, *rng.sample([c for c in classes if c != name], 3)]]
        rng.shuffle(options)
        subset = ("PathCLS", "Atlas")[index % 2]
        question = "Which tissue does this H&E patch show?"
        row = {"id": name, "image": f"images/{tile.name}", "question": question, "options": options}
        rows.append(row | {"answer": names[name][0], "subset": subset})
    path = folder / "kather-mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_random_vlm_end_to_end(tmp_path, tiny_models, capsys):
    cache, _ = tiny_models
    dataset = _kather_dataset(tmp_path / "kather")
    store, out = tmp_path / "store", tmp_path / "report.json"
    argv = ["evaluate-mc", "--dataset", str(dataset), "--store", str(store), "--out", str(out)]
    assert cli.main([*argv, "--set", f"agents.model_cache={cache}", "--set", "agents.device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed
    report = json.loads(out.read_text())
    assert report == json.loads((store / "eval" / "mc" / "tiny-random-vlm" / "kather-mc.json").read_text())
    assert report["random_weights"] is True and report["model"]["random_reason"]
    assert report["overall"]["n"] == 8 and 0.0 <= report["overall"]["accuracy"] <= 1.0
    assert set(report["by_subset"]) == {"PathCLS", "Atlas"}
    assert sum(len(ids) for ids in report["unparsed"].values()) == report["overall"]["unparsed"]
    assert all(p["reply"] is not None for p in report["predictions"])  # the model's own replies, whatever they say


def test_a_llava_folder_by_path_is_its_own_run_and_still_declared_random(tmp_path, tiny_models, capsys):
    # A PathGen-LLaVA export is a LLaVA folder like the tiny one; a copy of the tiny one under another name keeps
    # its random-weights marker, so its scores are still declared noise.
    cache, paths = tiny_models
    folder = shutil.copytree(paths["tiny-random-vlm"], tmp_path / "pathgen-llava-copy")
    dataset = _kather_dataset(tmp_path / "kather")
    argv = ["evaluate-mc", "--dataset", str(dataset), "--model", str(folder), "--store", str(tmp_path / "store")]
    assert cli.main([*argv, "--limit", "3", "--set", "agents.device=cpu"]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    report = json.loads((tmp_path / "store/eval/mc/pathgen-llava-copy/kather-mc-first3.json").read_text())
    assert report["random_weights"] is True and report["model"]["identity"].startswith("folder:pathgen-llava-copy@")
    assert report["overall"]["n"] == 3


def test_openai_backend_end_to_end(tmp_path, tiny_models, monkeypatch, capsys):
    from tests.test_openai_backend import TinyModelServer

    monkeypatch.chdir(tmp_path)  # the default store (./store) lands here, not in the checkout

    server = TinyModelServer(tiny_models[1])
    try:
        dataset = _kather_dataset(tmp_path / "kather")
        argv = ["evaluate-mc", "--dataset", str(dataset), "--backend", "openai", "--model", "tiny-vlm"]
        argv += ["--out", str(tmp_path / "r.json"), "--set", f"agents.openai_base_url={server.url}"]
        assert cli.main(argv) == 0
    finally:
        server.stop()
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["model"]["backend"] == "openai"
        and report["model"]["identity"] == "served:tiny-vlm root=/models/tiny-vlm"
    )
    assert report["overall"]["n"] == 8 and 0.0 <= report["overall"]["accuracy"] <= 1.0
    assert server.requests == 8 and "accuracy" in capsys.readouterr().out
