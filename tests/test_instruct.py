"""PathGen-Instruct: the reply parser and validator, the instruct flow writing conversations per slide exactly once
(a scripted model server, a test double, for the valid path; the tiny random model for the honest noise path), a
killed ``pathgen instruct`` run re-run to the same set, and ``pathgen export llava``.

The scripted server is an OpenAI-compatible HTTP server on 127.0.0.1 that answers the instruct prompt with fixed,
well-formed JSON built from the description in the request (and, for some patches, with replies that must fail);
it stands in for a model so that the valid path can be tested offline. Its output is never model output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.instruct import InstructAgent, Rules, Source, content_stems, instruct_hash, read_reply
from agents.protocol import ChatReply
from pathgen.settings import load_settings
from tasks.instruct.records import INSTRUCT_FAILED_SCHEMA, INSTRUCT_SCHEMA

from .conftest import CMU

DESCRIPTION = (
    "Colonic mucosa with crowded atypical glands forming a cribriform pattern, dirty necrosis and numerous mitoses "
    "in a desmoplastic stroma; moderately differentiated adenocarcinoma."
)
GOOD = [
    {
        "kind": "open",
        "turns": [
            {"question": "What tissue is shown?", "answer": "Colonic mucosa with crowded atypical glands."},
            {"question": "And the diagnosis?", "answer": "A moderately differentiated adenocarcinoma."},
        ],
    },
    {"kind": "yes-no", "turns": [{"question": "Is there dirty necrosis?", "answer": "Yes."}]},
    {
        "kind": "multiple-choice",
        "turns": [
            {
                "question": "Which pattern do the glands form?",
                "options": ["A) papillary", "B) cribriform", "C) solid"],
                "answer": "B",
            }
        ],
    },
]


def _read(payload, finish: str = "stop", rules: Rules | None = None):
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return read_reply("p1", ChatReply(text, None, finish), DESCRIPTION, rules or Rules(), 900)


# -- the parser and validator ---------------------------------------------------------------------------------------


def test_good_replies_of_every_kind_become_llava_turns():
    wrapped = "Here are the conversations:\n```json\n" + json.dumps({"conversations": GOOD}) + "\n```\nDone."
    for reply in (GOOD, wrapped):
        outcome = _read(reply)
        assert outcome.failures == []
        open_, yes_no, choice = outcome.conversations
        assert [c.kind for c in outcome.conversations] == ["open", "yes-no", "multiple-choice"]
        assert [c.index for c in outcome.conversations] == [0, 1, 2] and all(c.support == 1.0 for c in (open_, choice))
        assert [m["from"] for m in open_.messages] == ["human", "gpt", "human", "gpt"]
        assert yes_no.messages[1] == {"from": "gpt", "value": "Yes."}
        assert choice.messages[0]["value"] == "Which pattern do the glands form?\nA. papillary\nB. cribriform\nC. solid"
        assert choice.messages[1]["value"] == "B. cribriform"  # the letter answer, resolved to its option
    # Conversations past the count asked for are not read; the reply still counts.
    assert len(_read(GOOD, rules=Rules(conversations=2)).conversations) == 2


@pytest.mark.parametrize(
    "text, finish, stage, reason",
    [
        ("", "stop", "reply", "empty"),
        ("I'm sorry, I cannot help with that.", "stop", "reply", "refusal"),
        ("tissue glands stroma nuclei", "stop", "parse", "not-json"),
        ('[{"kind": "open", "turns": [{"question": "What', "length", "parse", "cut-off"),
        ('"just a string"', "stop", "parse", "not-a-list"),
        ("[]", "stop", "parse", "no-conversations"),
    ],
)
def test_malformed_replies_fail_whole_with_their_reason(text, finish, stage, reason):
    outcome = _read(text, finish)
    assert outcome.conversations == []
    (failure,) = outcome.failures
    assert (failure.conversation, failure.stage, failure.reason) == (None, stage, reason)


def _turn(question, answer, options=None):
    return {"question": question, "answer": answer, **({"options": options} if options is not None else {})}


@pytest.mark.parametrize(
    "conversation, reason",
    [
        ({"kind": "open", "turns": [_turn("Lymph nodes?", "Metastatic melanoma in two lymph nodes.")]}, "ungrounded"),
        ({"kind": "open", "turns": [_turn("What is it?", "It is what it is.")]}, "no-content"),
        ({"kind": "yes-no", "turns": [_turn("Is there necrosis?", "Probably")]}, "not-yes-no"),
        ({"kind": "yes-no", "turns": [_turn("Is there perineural invasion?", "no")]}, "ungrounded-question"),
        ({"kind": "multiple-choice", "turns": [_turn("Pattern?", "solid", ["cribriform", "papillary"])]},
         "answer-not-in-options"),
        ({"kind": "multiple-choice", "turns": [_turn("Pattern?", "cribriform", ["cribriform", "Cribriform."])]},
         "answer-not-unique"),
        ({"kind": "multiple-choice", "turns": [_turn("Pattern?", "cribriform", ["cribriform", "solid", "solid"])]},
         "duplicate-options"),
        ({"kind": "multiple-choice", "turns": [_turn("Pattern?", "cribriform", ["cribriform"])]}, "bad-options"),
        ({"kind": "multiple-choice", "turns": [_turn("Tumour?", "melanoma", ["melanoma", "cribriform"])]},
         "ungrounded"),
        ({"kind": "essay", "turns": [_turn("What tissue?", "Colonic mucosa.")]}, "bad-kind"),
        ({"kind": "open", "turns": [_turn("What tissue?", " ")]}, "empty-turn"),
        ({"kind": "open", "turns": [_turn("What tissue?", "Colonic mucosa.")] * 4}, "too-many-turns"),
        ({"kind": "open", "turns": [_turn("What does the description say?", "Colonic mucosa.")]}, "mentions-source"),
        ("open: colonic mucosa", "bad-conversation"),
    ],
)  # fmt: skip
def test_a_bad_conversation_is_dropped_with_its_reason_and_the_others_kept(conversation, reason):
    outcome = _read([GOOD[0], conversation])
    assert [c.index for c in outcome.conversations] == [0]
    (failure,) = outcome.failures
    assert (failure.conversation, failure.stage, failure.reason) == (1, "validate", reason), failure.detail


def test_grounding_stems_ignore_stop_words_and_meet_word_forms():
    assert content_stems("The image shows necrotic glands") == content_stems("necrosis; a gland")
    assert content_stems("Is it present in this patch?") == set()


class Scripted:
    """Test double: replies from a function of the request and the seed; drives control flow only."""

    name, model_id, random_weights = "scripted", "scripted", False

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, requests, sampling):
        self.calls.append(len(requests))
        return [self.reply(r, sampling) for r in requests]


def test_the_agent_asks_again_once_then_records_and_the_vlm_prompt_sends_the_image():
    asked: list[str] = []

    def reply(request, sampling):
        key = request.before_image.rsplit("\n", 1)[-1]
        asked.append(key)
        if key == "bad" or (key == "flaky" and asked.count("flaky") == 1):  # valid on the re-ask
            return ChatReply("no json here")
        return ChatReply(json.dumps(GOOD))

    settings = load_settings(environ={})
    backend = Scripted(reply)
    agent = InstructAgent(settings, backend=backend)
    items = {k: Source(f"{DESCRIPTION}\n{k}") for k in ("good", "flaky", "bad")}
    result = agent.run(items)
    assert backend.calls == [3, 2]  # one batch, then the two invalid replies again
    assert {k: len(v) for k, v in result.conversations.items()} == {"good": 3, "flaky": 3, "bad": 0}
    assert [(f.key, f.stage, f.reason) for f in result.failures] == [("bad", "parse", "not-json")]

    image = load_settings(overrides={"instruct.prompt": "instruct-image.v1"}, environ={})
    request = InstructAgent(image, backend=backend).request(Source(DESCRIPTION, b"\xff\xd8jpeg"))
    assert request.image == b"\xff\xd8jpeg" and request.after_image.endswith(DESCRIPTION)
    assert (
        "3 conversations" in request.before_image
        and InstructAgent(settings, backend=backend).request(Source(DESCRIPTION, b"\xff\xd8jpeg")).image is None
    )  # the text prompt never sends it


def test_instruct_hash_covers_what_changes_the_output_and_nothing_else():
    base = load_settings(environ={})
    digest = instruct_hash(base, "model@1", "a" * 12)
    changed = [
        instruct_hash(base, "model@2", "a" * 12),
        instruct_hash(base, "model@1", "b" * 12),
        *(
            instruct_hash(load_settings(overrides={key: value}, environ={}), "model@1", "a" * 12)
            for key, value in [
                ("instruct.prompt", "instruct-image.v1"),
                ("instruct.temperature", 0.7),
                ("instruct.max_new_tokens", 100),
                ("instruct.min_support", 0.5),
                ("instruct.conversations_per_description", 5),
                ("instruct.max_turns", 1),
            ]
        ),
    ]
    assert digest not in changed and len(set(changed)) == len(changed)
    same = load_settings(overrides={"instruct.slides_per_task": 9, "instruct.concurrency": 2}, environ={})
    assert instruct_hash(same, "model@1", "a" * 12) == digest


def test_random_weights_refused_where_not_allowed():
    from tasks.models import RandomWeightsRefused, random_weight_models, require_real_models

    settings = load_settings(overrides={"models.allow_random_weights": False}, environ={})
    with pytest.raises(RandomWeightsRefused, match=r"instruct\.model is unset"):
        require_real_models(settings, ["instruct"])
    named = load_settings(overrides={"instruct.model": "org/real-model"}, environ={})
    assert random_weight_models(named, ["instruct"]) == []


# -- a scripted model server (test double) ------------------------------------------------------------------------

SCRIPTED = "scripted-instruct"


def _words(description: str) -> list[str]:
    return [w for w in dict.fromkeys(re.findall(r"[A-Za-z]{4,}", description)) if content_stems(w)]


def scripted_reply(description: str) -> str:
    """Grounded conversations quoting the description's words; a quarter of the patches get a reply that is not
    JSON (a parse failure, final after the re-ask) and a third an ungrounded second conversation."""
    digest = int(hashlib.sha256(description.encode()).hexdigest()[:8], 16)
    if digest % 4 == 0:
        return "Certainly! The glands look crowded."
    w = _words(description) + ["stroma"] * 6
    second = (
        {"kind": "open", "turns": [_turn("What else?", "Xylophone zeppelin quasar.")]}
        if digest % 3 == 1
        else {"kind": "yes-no", "turns": [_turn(f"Is {w[0]} {w[1]} seen here?", "yes")]}
    )
    return json.dumps(
        [
            {"kind": "open", "turns": [_turn("What is shown?", " ".join(w[:5]) + ".")]},
            second,
            {
                "kind": "multiple-choice",
                "turns": [_turn("Which?", f"{w[2]} {w[3]}", ["zebra quartz", f"{w[2]} {w[3]}"])],
            },
        ]
    )


class ScriptedServer:
    """OpenAI-compatible (GET /v1/models, POST /v1/chat/completions) on 127.0.0.1, answering with scripted_reply
    after ``delay`` seconds (so that a run lasts long enough to be killed in the middle)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": SCRIPTED, "root": "test-double"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = next(m for m in body["messages"] if m["role"] == "user")["content"]
                text = "\n".join(p["text"] for p in user if p["type"] == "text")
                time.sleep(server.delay)
                reply = scripted_reply(text.split("Description:\n", 1)[1])
                self._send({"choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})

            def _send(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a killed client: nobody to answer
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def settings(self) -> dict[str, object]:
        return {
            "instruct.backend": "openai",
            "instruct.model": SCRIPTED,
            "agents.openai_base_url": self.url,
            "agents.openai_concurrency": 2,
            "instruct.slides_per_task": 1,
            "retries.task_retries": 0,
        }


@pytest.fixture(scope="module")
def server():
    s = ScriptedServer(delay=0.15)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


CLONE = "CMU-1-Small-Region-clone"


@pytest.fixture(scope="module")
def source_store(captioned_store, tmp_path_factory):
    """captioned_store plus a second slide: a copy of its pair shard under another slide id and other patch ids."""
    root = tmp_path_factory.mktemp("instruct-source") / "store"
    shutil.copytree(captioned_store, root)
    (folder,) = (root / "pairs").iterdir()
    table = pq.read_table(folder / f"{CMU.stem}.parquet")
    ids = [hashlib.sha256(f"clone:{p}".encode()).hexdigest()[:24] for p in table["patch_id"].to_pylist()]
    for name, values in (("patch_id", ids), ("slide_id", [CLONE] * len(ids))):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(name), pa.array(values, pa.string()))
    meta = dict(table.schema.metadata) | {b"pathgen.commit_id": b"clone", b"pathgen.slide_id": CLONE.encode()}
    pq.write_table(table.replace_schema_metadata(meta), folder / f"{CLONE}.parquet")
    return root


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _contents(root: Path) -> tuple[dict[str, set], dict[str, set]]:
    """{slide: conversation ids}, {slide: (patch, conversation, stage, reason)} of the one instruct_hash."""
    (folder,) = (root / "instruct").iterdir()
    made = {p.stem: set(pq.read_table(p)["conversation_id"].to_pylist()) for p in folder.glob("*.parquet")}
    failed = {}
    for path in (root / "failed-instruct" / folder.name).glob("*.parquet"):
        rows = pq.read_table(path).to_pylist()
        failed[path.stem] = {(r["patch_id"], r["conversation"], r["stage"], r["reason"]) for r in rows}
    return made, failed


@pytest.fixture(scope="module")
def instructed(prefect_api, server, source_store, tmp_path_factory):
    """One uninterrupted instruct flow run over the two slides with the scripted server: the reference."""
    from flows.instruct import instruct_flow

    root = _copy(source_store, tmp_path_factory.mktemp("instructed") / "store")
    summary = instruct_flow(store=str(root), overrides=server.settings())
    return root, summary


# -- the flow ---------------------------------------------------------------------------------------------------------


def test_the_flow_writes_one_shard_and_failed_table_per_slide_then_skips_them(instructed, server):
    from flows.instruct import instruct_flow

    root, summary = instructed
    assert (summary["slides"], summary["ok"], summary["pending"]) == (2, 2, 0) and summary["random_weights"]
    digest = summary["instruct_hash"]
    shards = sorted((root / "instruct" / digest).iterdir())
    assert sorted(p.name for p in shards) == sorted([f"{CMU.stem}.parquet", f"{CLONE}.parquet"])
    pairs = {p.stem: pq.read_table(p).to_pylist() for p in (root / "pairs" / summary["agents_hash"]).glob("*.parquet")}
    total = 0
    for shard in shards:
        table, failed = pq.read_table(shard), pq.read_table(root / "failed-instruct" / digest / shard.name)
        assert table.schema.remove_metadata().equals(INSTRUCT_SCHEMA)
        assert failed.schema.remove_metadata().equals(INSTRUCT_FAILED_SCHEMA)
        meta, failed_meta = table.schema.metadata, failed.schema.metadata
        assert meta[b"pathgen.commit_id"] == failed_meta[b"pathgen.commit_id"]
        rows, by_patch = table.to_pylist(), {p["patch_id"]: p for p in pairs[shard.stem]}
        for row in rows:
            turns = json.loads(row["conversation"])
            assert row["kind"] in ("open", "yes-no", "multiple-choice") and row["turns"] * 2 == len(turns)
            assert row["conversation_id"].startswith(row["patch_id"]) and row["instruct_hash"] == digest
            assert row["instruct_model"] == SCRIPTED and row["random_weights"] is True  # noise captions upstream
            assert (row["x"], row["y"]) == (by_patch[row["patch_id"]]["x"], by_patch[row["patch_id"]]["y"])
            assert row["support"] >= 0.6 and row["source_agents_hash"] == summary["agents_hash"]
        failures = failed.to_pylist()
        assert {(f["stage"], f["reason"]) for f in failures} <= {("parse", "not-json"), ("validate", "ungrounded")}
        # Every pair is accounted for: conversations, or a failure of the whole reply.
        whole = {f["patch_id"] for f in failures if f["conversation"] is None}
        assert {r["patch_id"] for r in rows} | whole == set(by_patch) and not whole & {r["patch_id"] for r in rows}
        total += len(rows)
    assert total == summary["conversations"] > 0 and summary["failed_items"] == sum(summary["failures"].values()) > 0
    assert set(summary["kinds"]) == {"open", "yes-no", "multiple-choice"}

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    again = instruct_flow(store=str(root), overrides=server.settings())
    assert (again["ok"], again["skipped"], again["instruct_hash"]) == (0, 2, digest)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == mtimes  # nothing rewritten


def _llava_overrides(tiny_models, work: Path) -> dict:
    return {
        "llava.work_dir": str(work),
        "agents.model_cache": str(tiny_models[0]),
        "llava.batch_size": 4,
        "llava.workers": 0,
        "llava.max_steps": 2,
    }


def test_the_shared_slides_conversations_train_both_llava_stages(instructed, tiny_models, tmp_path):
    """The paper's loop on the shared slide with tiny models: its pairs (stage 1) and the conversations written from
    them (stage 2, the scripted server standing in for the instruct model) train PathGen-LLaVA end to end."""
    from flows.train_llava import train_llava_flow

    root = _copy(instructed[0], tmp_path / "store")
    summary = train_llava_flow(store=str(root), overrides=_llava_overrides(tiny_models, tmp_path / "work"))
    assert summary["error"] is None and summary["random_weights"]
    trained = [(s["stage"], s["status"], s["steps"]) for s in summary["stages"]]
    assert trained == [("stage1", "ok", 2), ("stage2", "ok", 2)]
    (export,) = (tmp_path / "work" / "data").iterdir()  # the flow exported the store first
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["stage2"]["records"] == instructed[1]["conversations"] > 0
    assert provenance["stage1"]["records"] == 24 and provenance["stage2"]["empty_because"] is None
    run = json.loads((root / "models" / "llava" / summary["run"] / "run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["ok", "ok"]
    for stage in ("stage1", "stage2"):
        assert (root / "models" / "llava" / summary["run"] / stage / "model" / "config.json").is_file()

    # The loop closed: the trained PathGen-LLaVA folder is the describe model of the caption stage.
    from agents.identity import agents_hash, identities
    from tasks.captions.caption import caption_slides

    model = root / "models" / "llava" / summary["run"] / "stage2" / "model"
    overrides = {"store": str(root), "agents.model_cache": str(tiny_models[0]), "agents.describe.model": str(model)}
    settings = load_settings(overrides=overrides, environ={})
    digest = agents_hash(settings.agents, identities(settings.agents, settings.retries))
    (outcome,) = caption_slides([CMU.stem], settings, digest)
    assert outcome.status == "ok" and digest != instructed[1]["agents_hash"]
    rows = pq.read_table(root / "pairs" / digest / f"{CMU.stem}.parquet").to_pylist()
    failed = pq.read_table(root / "failed" / digest / f"{CMU.stem}.parquet").num_rows
    assert len(rows) + failed > 0 and len(rows) == outcome.items
    assert all(r["describe_model"].startswith(str(model)) and r["random_weights"] for r in rows)
    print(f"\ncaptioned by the trained PathGen-LLaVA: {len(rows)} pairs, {failed} failed items")


def test_the_tiny_random_model_runs_and_its_noise_is_recorded_as_failures(
    prefect_api, tiny_models, captioned_store, tmp_path, capsys
):
    """All tiny: the instruct noise is recorded as failures, and train-llava trains stage 1 on the pairs and says
    why stage 2 is not trained (before instruct ran: no instruction data; after: none passed validation)."""
    from agents.identity import model_identity
    from flows.train_llava import train_llava_flow
    from pathgen.cli import main
    from tasks.instruct.generate import instruct_slides

    root = _copy(captioned_store, tmp_path / "store")
    (agents_hash,) = [p.name for p in (root / "pairs").iterdir()]
    assert main(["export", "llava", "--store", str(root), "--out", str(tmp_path / "before")]) == 0
    assert f"stage2.json is empty: no instruction data was written from pairs {agents_hash}: run pathgen instruct" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "before" / "stage2.json").read_text()) == []
    overrides = {"store": str(root), "agents.model_cache": str(tiny_models[0]), "instruct.max_new_tokens": 48}
    settings = load_settings(overrides=overrides, environ={})
    identity = model_identity(settings.instruct, settings.agents, settings.retries, needs_image=False)
    digest = instruct_hash(settings, identity, agents_hash)
    (outcome,) = instruct_slides([CMU.stem], settings, digest, agents_hash)
    assert outcome.status == "ok" and outcome.random_weights
    rows = pq.read_table(root / "instruct" / digest / f"{CMU.stem}.parquet").to_pylist()
    failed = pq.read_table(root / "failed-instruct" / digest / f"{CMU.stem}.parquet").to_pylist()
    pairs = pq.read_table(root / "pairs" / agents_hash / f"{CMU.stem}.parquet", columns=["patch_id"])
    # Noise almost never parses; whatever it gave is data only if it passed validation, and says random weights.
    assert all(r["random_weights"] and r["instruct_model"].endswith("(random weights)") for r in rows)
    whole = {f["patch_id"] for f in failed if f["conversation"] is None}
    assert {r["patch_id"] for r in rows} | whole == set(pairs["patch_id"].to_pylist())
    assert all(f["stage"] in ("reply", "parse", "validate") and f["reason"] and f["detail"] is not None for f in failed)
    reasons = {}
    for f in failed:
        reasons[f"{f['stage']}:{f['reason']}"] = reasons.get(f"{f['stage']}:{f['reason']}", 0) + 1
    print(f"\ntiny random model: {len(rows)} conversations, {len(failed)} failures {reasons}")
    assert outcome.columns["failed"] == len(failed) and outcome.items == len(rows)

    summary = train_llava_flow(store=str(root), overrides=_llava_overrides(tiny_models, tmp_path / "work"))
    stage1, stage2 = summary["stages"]
    assert summary["error"] is None and (stage1["stage"], stage1["status"], stage1["steps"]) == ("stage1", "ok", 2)
    if rows:  # deterministic (seeded): whichever it is, it is checked exactly
        assert (stage2["status"], stage2["steps"]) == ("ok", 2)
    else:
        assert stage2["status"] == "no-data" and f"pathgen instruct ({digest}) wrote no conversation" in stage2["error"]
        run = json.loads((root / "models" / "llava" / summary["run"] / "run.json").read_text())
        assert [s["status"] for s in run["stages"]] == ["ok", "no-data"]
        assert not (root / "models" / "llava" / summary["run"] / "stage2").exists()


def test_a_backend_failure_leaves_slides_pending_and_a_recaptioned_slide_is_done_again(source_store, tmp_path):
    from pathgen.errors import BackendError
    from tasks.instruct.generate import instruct_slides
    from tasks.instruct.plan import plan_instruct
    from tasks.store.objects import Store
    from tasks.work.units import PendingWork

    root = _copy(source_store, tmp_path / "store")
    (agents_hash,) = [p.name for p in (root / "pairs").iterdir()]
    settings = load_settings(overrides={"store": str(root)}, environ={})
    slides = sorted([CMU.stem, CLONE])

    def down(request, sampling):
        raise BackendError("the model server at http://gpu-node:8000/v1 failed: HTTP 503, after 4 attempts")

    def scripted(request, sampling):
        return ChatReply(scripted_reply(request.before_image.split("Description:\n", 1)[1]))

    backend = Scripted(down)
    digest = instruct_hash(settings, f"given:{backend.name}:{backend.model_id}", agents_hash)
    with pytest.raises(PendingWork) as lost:
        instruct_slides(slides, settings, digest, agents_hash, backend=backend)
    assert {o.status for o in lost.value.outcomes} == {"pending"} and "HTTP 503" in lost.value.outcomes[0].error
    assert not (root / "instruct").exists() and not (root / "failed-instruct").exists()  # nothing committed

    backend.reply = scripted
    assert [o.status for o in instruct_slides(slides, settings, digest, agents_hash, backend=backend)] == ["ok"] * 2
    assert [o.status for o in instruct_slides(slides, settings, digest, agents_hash, backend=backend)] == [
        "skipped"
    ] * 2
    # The clone is captioned again (a new pair shard commit): it alone is pending, and done again.
    pairs = root / "pairs" / agents_hash / f"{CLONE}.parquet"
    table = pq.read_table(pairs)
    time.sleep(0.01)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata | {b"pathgen.commit_id": b"again"}), pairs)
    assert plan_instruct(Store(str(root)), agents_hash, digest).pending == [CLONE]
    outcomes = instruct_slides(slides, settings, digest, agents_hash, backend=backend)
    assert {o.unit: o.status for o in outcomes} == {CMU.stem: "skipped", CLONE: "ok"}


# -- a killed pathgen instruct, run again ---------------------------------------------------------------------------


def _pathgen(env, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pathgen", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _written(root: Path) -> list[Path]:
    return [
        p for d in ("instruct", "failed-instruct") if (root / d).exists() for p in (root / d).rglob("*") if p.is_file()
    ]


@pytest.mark.timeout(600)
def test_a_killed_instruct_run_runs_again_to_the_same_set(prefect_api, server, source_store, instructed, tmp_path):
    from flows.instruct import instruct_flow

    reference = _contents(instructed[0])
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    sets = [a for key, value in server.settings().items() for a in ("--set", f"{key}={value}")]
    rng = random.Random(0)
    for trial in range(2):
        root = _copy(source_store, tmp_path / f"store-{trial}")
        run = _pathgen(env, "instruct", "--store", str(root), *sets)
        try:
            deadline = time.monotonic() + 120
            # Trial 0: at the first object written (often a temporary one, mid-commit); then at a random moment.
            while not _written(root) and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0 if trial == 0 else rng.uniform(0, 1.5))
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
        if trial == 0:  # run again through the command, which must report what it did
            again = _pathgen(env, "instruct", "--store", str(root), *sets)
            output, _ = again.communicate(timeout=300)
            assert again.returncode == 0, output[-3000:]
            assert "RANDOM WEIGHTS" in output and re.search(r"instruct: \d+ slides written", output), output
        else:
            assert instruct_flow(store=str(root), overrides=server.settings())["pending"] == 0
        assert _contents(root) == reference, f"trial {trial}"
        leftovers = [p for p in _written(root) if p.name.startswith(".") or p.suffix == ".tmp"]
        assert leftovers == [], f"trial {trial}: temporary objects left"


# -- export ------------------------------------------------------------------------------------------------------------


def test_export_llava_writes_both_stages_with_images_and_replaces_an_earlier_export(instructed, tmp_path, capsys):
    from PIL import Image

    from pathgen.cli import main

    root, summary = instructed
    out = tmp_path / "llava"
    assert main(["export", "llava", "--store", str(root), "--out", str(out)]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    stage1, stage2 = (json.loads((out / f"stage{n}.json").read_text()) for n in (1, 2))
    provenance = json.loads((out / "provenance.json").read_text())
    pairs = sum(pq.read_metadata(p).num_rows for p in (root / "pairs" / summary["agents_hash"]).glob("*.parquet"))
    assert (len(stage1), len(stage2)) == (pairs, summary["conversations"])
    assert provenance["instruct_hash"] == summary["instruct_hash"] and provenance["random_weights"] is True
    assert provenance["stage2"]["records"] == len(stage2) and provenance["images"]["count"] == pairs
    for record in stage1 + stage2:
        assert set(record) == {"id", "image", "conversations"}
        turns = record["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and all(t["value"] for t in turns)
    assert len({r["id"] for r in stage1}) == len(stage1) and len({r["id"] for r in stage2}) == len(stage2)
    for name in {r["image"] for r in stage1 + stage2}:
        with Image.open(io.BytesIO((out / name).read_bytes())) as image:
            image.load()
            assert image.format == "JPEG"

    (out / "images" / "stale.jpg").write_bytes(b"old")  # a re-export replaces the whole set
    assert main(["export", "llava", "--store", str(root), "--out", str(out)]) == 0
    assert not (out / "images" / "stale.jpg").exists() and json.loads((out / "stage2.json").read_text()) == stage2
    assert [p.name for p in tmp_path.iterdir()] == ["llava"]  # no work folder left beside it
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", "llava", "--store", str(root), "--out", str(other)]) == 2  # never overwrites other data
    assert (other / "keep.txt").read_text() == "mine"
