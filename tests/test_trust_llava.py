"""PathGen-LLaVA's data a team can trust (issue 17): the run hash follows the images' content, paths read from data
stay inside their folder, and the LLaVA export is incremental, so a second ``train-llava`` with nothing new writes
no image and skips its finished stage."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.test_llava import _write_folder
from tests.test_mc import KATHER

AGENTS = "a" * 16


def _jpeg(tile: Path, shade: int = 0) -> bytes:
    picture = Image.open(tile).convert("RGB").resize((48, 48))
    if shade:
        picture = Image.eval(picture, lambda v: max(0, v - shade))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _tiles(count: int, start: int = 0) -> list[Path]:
    return sorted(KATHER.rglob("*.tif"))[start : start + count]


def _pair_shard(
    store: Path, slide: str, commit: str, shade: int = 0, ids: list[str] | None = None, agents: str = AGENTS
) -> list[str]:
    """A pair shard as the caption stage commits it (the columns the export reads), three patches of Kather tiles."""
    ids = ids or [f"{slide.lower()}{i:02d}" for i in range(3)]
    tiles = _tiles(len(ids), start=sum(map(ord, slide)) % 20)
    rows = [
        {"patch_id": pid, "slide_id": slide, "caption": f"An H&E patch {pid}.", "image": _jpeg(tile, shade),
         "random_weights": True}
        for pid, tile in zip(ids, tiles, strict=True)
    ]  # fmt: skip
    meta = {"pathgen.commit_id": commit, "pathgen.provenance": json.dumps({"random_weights": True})}
    folder = store / "pairs" / agents
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata(meta), folder / f"{slide}.parquet")
    return ids


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file's (inode, mtime): a file rewritten or replaced changes one of them."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _export(store: Path, out: Path):
    from tasks.instruct.export import export_llava
    from tasks.store.objects import Store

    return export_llava(Store(str(store)), out)


# -- point 17: the export is incremental -----------------------------------------------------------------------------


def test_a_re_export_writes_only_what_changed_and_nothing_when_nothing_did(tmp_path):
    store, out = tmp_path / "store", tmp_path / "llava"
    a, b = _pair_shard(store, "A", "a1"), _pair_shard(store, "B", "b1")
    first = _export(store, out)
    assert (first.stage1, first.images) == (6, 6)
    before = _stamps(out)

    again = _export(store, out)  # nothing new in the store: no file of the set is written, not even the JSON
    assert _stamps(out) == before
    assert (again.written, again.stage1, again.images, again.random_weights) == (0, 6, 6, True)

    c = _pair_shard(store, "C", "c1")  # a new slide: its images only
    assert _export(store, out).written == 3
    now = _stamps(out)
    assert all(now[f"images/{pid}.jpg"] == before[f"images/{pid}.jpg"] for pid in a + b)
    assert {r["id"] for r in json.loads((out / "stage1.json").read_text())} == set(a + b + c)

    _pair_shard(store, "B", "b2", shade=60)  # B re-captioned from re-extracted patches: B's images again
    assert _export(store, out).written == 3
    after = _stamps(out)
    assert all(after[f"images/{pid}.jpg"] == now[f"images/{pid}.jpg"] for pid in a + c)
    new_b = pq.read_table(store / "pairs" / AGENTS / "B.parquet")["image"][0].as_py()
    assert (out / "images" / f"{b[0]}.jpg").read_bytes() == new_b

    (store / "pairs" / AGENTS / "A.parquet").unlink()  # a slide gone from the store: its images go too
    (out / "images" / "stale.jpg").write_bytes(b"old")
    gone = _export(store, out)
    assert gone.written == 0 and gone.stage1 == 6
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{pid}.jpg" for pid in b + c)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and sorted(manifest["pairs"]) == [f"pairs/{AGENTS}/{s}.parquet" for s in "BC"]


def _instruct_shard(store: Path, instruct_hash: str, source: str, slide: str, commit: str, ids: list[str]) -> None:
    """An instruct shard as the instruct stage commits it (the columns the export reads), written from ``source``."""
    turns = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Tissue."}]
    rows = [
        {"conversation_id": f"{pid}-c0", "patch_id": pid, "slide_id": slide, "kind": "detail",
         "conversation": json.dumps(turns), "random_weights": True}
        for pid in ids
    ]  # fmt: skip
    meta = {"pathgen.commit_id": commit, "pathgen.source_agents_hash": source, "pathgen.provenance": "{}"}
    folder = store / "instruct" / instruct_hash
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata(meta), folder / f"{slide}.parquet")


def test_images_of_instruction_data_from_other_pairs_follow_their_shards_commit(tmp_path):
    """Instruction data written from other pairs (another agents_hash) names patches that stage 1 does not export:
    their images come from that pair shard, and a re-extracted slide (same patch ids, new pixels, new commit) has
    them written again, even when neither the exported pairs nor the instruct shard changed."""
    from tasks.instruct.export import export_llava
    from tasks.store.objects import Store

    store, out, other, instruct = tmp_path / "store", tmp_path / "llava", "b" * 16, "c" * 16
    _pair_shard(store, "A", "a1")
    ids = _pair_shard(store, "Z", "z1", agents=other)  # a slide only the other pairs hold
    _instruct_shard(store, instruct, other, "Z", "i1", ids)
    first = export_llava(Store(str(store)), out, AGENTS, instruct)
    assert (first.stage1, first.stage2, first.missing_images) == (3, 3, 0)
    assert export_llava(Store(str(store)), out, AGENTS, instruct).written == 0  # nothing changed: nothing written

    _pair_shard(store, "Z", "z2", shade=60, agents=other)  # re-extracted: the same patch ids, other pixels
    again = export_llava(Store(str(store)), out, AGENTS, instruct)
    assert again.written == 3 and again.stage2 == 3
    new_z = pq.read_table(store / "pairs" / other / "Z.parquet")["image"][0].as_py()
    assert (out / "images" / f"{ids[0]}.jpg").read_bytes() == new_z
    assert export_llava(Store(str(store)), out, AGENTS, instruct).written == 0


def test_a_second_export_into_the_same_folder_waits_for_the_first(tmp_path, caplog):
    import fcntl
    import threading

    store, out = tmp_path / "store", tmp_path / "llava"
    _pair_shard(store, "A", "a1")
    out.mkdir()
    with open(out / ".lock", "a") as held:  # an export in progress elsewhere holds DIR
        fcntl.flock(held, fcntl.LOCK_EX)
        done = []
        second = threading.Thread(target=lambda: done.append(_export(store, out)))
        second.start()
        deadline = time.monotonic() + 10
        while "another export is writing" not in caplog.text:
            assert time.monotonic() < deadline, "the second export neither waited nor said so"
            time.sleep(0.05)
        time.sleep(0.3)
        assert not done and not (out / "stage1.json").exists()  # it waits and writes nothing meanwhile
    second.join(timeout=30)
    assert done and done[0].stage1 == 3 and (out / "stage1.json").is_file()


def test_the_second_train_llava_run_writes_no_image_and_skips_its_stage(prefect_api, tiny_models, tmp_path):
    from flows.train_llava import train_llava_flow

    store = tmp_path / "store"
    for slide in "AB":
        _pair_shard(store, slide, f"{slide}1")
    overrides = {
        "llava.work_dir": str(tmp_path / "work"),
        "agents.model_cache": str(tiny_models[0]),
        "llava.batch_size": 2,
        "llava.workers": 0,
        "llava.max_steps": 1,
    }
    first = train_llava_flow(store=str(store), overrides=overrides)
    assert [(s["stage"], s["status"]) for s in first["stages"]] == [("stage1", "ok"), ("stage2", "no-data")]
    (export,) = (tmp_path / "work" / "data").iterdir()
    before = _stamps(export)
    started = time.perf_counter()
    second = train_llava_flow(store=str(store), overrides=overrides)
    seconds = time.perf_counter() - started
    print(f"\nsecond train-llava run: {seconds:.1f} s, {len(before)} files of the export untouched")
    assert _stamps(export) == before  # no image (nor anything else of the export) written again
    assert second["run"] == first["run"] and second["stages"][0]["status"] == "skipped"


# -- point 14: paths read from data stay inside their folder ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.jpg", "images/../../outside.jpg", "/etc/passwd", "../../../etc/passwd"])
def test_a_llava_record_naming_an_image_outside_its_folder_is_refused(tmp_path, name):
    from tasks.llava.data import data_digest, read_records

    folder = _write_folder(tmp_path / "data")
    Image.new("RGB", (32, 32), (200, 90, 160)).save(tmp_path / "outside.jpg")  # real, readable, and outside DIR
    records = json.loads((folder / "stage1.json").read_text())
    records.append({"id": "escape", "image": name, "conversations": records[0]["conversations"]})
    (folder / "stage1.json").write_text(json.dumps(records))
    expected = rf"1 bad records in {folder / 'stage1.json'}, e\.g\. escape: image '{name}' lies outside the data folder"
    with pytest.raises(ValueError, match=expected):
        read_records(folder, "stage1")
    with pytest.raises(ValueError, match=expected):  # the run hash, computed first, reads none of it either
        data_digest(folder, ["stage1"])


def test_a_llava_image_linking_out_of_its_folder_is_refused_before_and_at_open(tmp_path):
    from tasks.llava.data import ConversationDataset, data_digest, read_records

    folder = _write_folder(tmp_path / "data")
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (32, 32), (200, 90, 160)).save(outside)
    records = json.loads((folder / "stage1.json").read_text())
    (folder / records[0]["image"]).unlink()
    (folder / records[0]["image"]).symlink_to(outside)
    expected = f"image '{records[0]['image']}' lies outside the data folder (a link to {outside})"
    with pytest.raises(ValueError, match=re.escape(f"{records[0]['id']}: {expected}")):
        read_records(folder, "stage1")
    with pytest.raises(ValueError, match=re.escape(expected)):
        data_digest(folder, ["stage1"])
    data = ConversationDataset(folder, records, _NoTokens())  # a link made after the check: refused at open
    with pytest.raises(ValueError, match=re.escape(expected)):
        data[0]


class _NoTokens:
    def encode(self, messages):
        return [1], [1]


def test_train_llava_on_a_record_outside_its_folder_stops_before_training(prefect_api, tiny_models, tmp_path, capsys):
    from pathgen.cli import main

    folder = _write_folder(tmp_path / "data")
    Image.new("RGB", (32, 32), (200, 90, 160)).save(tmp_path / "outside.jpg")
    records = json.loads((folder / "stage2.json").read_text())
    records[0]["image"] = "../outside.jpg"
    (folder / "stage2.json").write_text(json.dumps(records))
    args = ["train-llava", "--data", str(folder), "--store", str(tmp_path / "store")]
    args += [f"--set=llava.work_dir={tmp_path / 'work'}", f"--set=agents.model_cache={tiny_models[0]}"]
    assert main([*args, "--set=llava.max_steps=1", "--set=llava.workers=0"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'stage2.json'}" in err and f"{records[0]['id']}: image '../outside.jpg' lies outside" in err
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "store" / "models").exists()


def test_the_export_refuses_a_patch_id_that_is_a_path(tmp_path):
    store, out = tmp_path / "store", tmp_path / "llava"
    _pair_shard(store, "A", "a1")
    _pair_shard(store, "EVIL", "e1", ids=["ok01", "../../escaped", "ok02"])
    with pytest.raises(ValueError, match=r"pairs/a{16}/EVIL\.parquet: patch_id '\.\./\.\./escaped' is not a plain"):
        _export(store, out)
    assert not (tmp_path / "escaped.jpg").exists() and not list(tmp_path.rglob("escaped*"))
    assert not (out / "stage1.json").exists()  # no set that silently lacks the shard


# -- point 4: the run hash digests the images' content ---------------------------------------------------------------


def test_the_run_hash_follows_an_image_whose_bytes_change_at_the_same_size(tmp_path, monkeypatch):
    from pathgen.settings import load_settings
    from tasks.llava.data import data_digest
    from tasks.llava.stages import run_name
    from tasks.llava.vision import vision_source

    monkeypatch.setenv("PATHGEN_DIGEST_CACHE", str(tmp_path / "cache" / "digests.json"))
    folder = _write_folder(tmp_path / "data")
    hour_ago = time.time() - 3600
    for image in (folder / "images").iterdir():  # settled files: their digests are remembered
        os.utime(image, (hour_ago, hour_ago))
    settings = load_settings(environ={})
    first = data_digest(folder, ["stage1", "stage2"])
    assert data_digest(folder, ["stage1", "stage2"]) == first  # the second time from the cache: the same

    image = sorted((folder / "images").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other pixels, the same number of bytes
    image.write_bytes(bytes(data))
    changed = data_digest(folder, ["stage1", "stage2"])
    assert changed != first
    vision = vision_source(None)
    assert run_name(settings.llava, changed, vision) != run_name(settings.llava, first, vision)
    (cache,) = (tmp_path / "cache" / "llava-images").iterdir()  # one bounded file: this folder's images only
    remembered = json.loads(cache.read_text())
    assert set(remembered) == {f"images/{p.name}" for p in (folder / "images").iterdir()} - {f"images/{image.name}"}
