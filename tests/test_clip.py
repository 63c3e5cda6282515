"""PathGen-CLIP with the tiny model on CPU: WebDataset export read back by open_clip_train's own pipeline, a killed
training run resuming, the whole chain on the shared slide, a trained checkpoint driving selection, and
learnability on the shared Kather tiles."""

import json
import os
import signal
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest

from tasks.clip.spec import ModelSpec, parse_model_spec
from tasks.clip.webdataset import export_pairs, holdout_group, is_holdout
from tasks.slides.shard import read_shard
from tasks.store.objects import Store

from . import kather
from .conftest import CMU

KATHER_CLASSES = str(kather.CLASSES)


def _pair_ids(store: Path) -> tuple[str, set[str]]:
    (shard,) = list((store / "pairs").glob("*/*.parquet"))
    return shard.parent.name, set(read_shard(shard)["patch_id"].to_pylist())


def _tar_keys(folder: Path) -> list[str]:
    import tarfile

    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as handle:
            names = handle.getnames()
        assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
        keys += sorted({n.split(".")[0] for n in names})
    return keys


def test_export_puts_every_pair_in_exactly_one_tar_and_open_clip_train_reads_them(captioned_store, tmp_path):
    agents_hash, pair_ids = _pair_ids(captioned_store)
    out = tmp_path / "wds"
    summary = export_pairs(Store(str(captioned_store)), agents_hash, out, holdout_fraction=0.3)
    train, held = _tar_keys(out), _tar_keys(out / "holdout")
    assert sorted(train + held) == sorted(pair_ids) and not set(train) & set(held)
    # One slide is held out whole or not at all (CMU-1-Small-Region's hash keeps it for training at 0.3).
    assert not is_holdout(holdout_group(CMU.stem), 0.3) and not held and train
    assert (summary.pairs, summary.holdout_pairs, summary.written) == (len(train), len(held), 1)
    assert summary.random_weights is True
    assert json.loads((out / "sizes.json").read_text()) == {f"{CMU.stem}.tar": len(train)}
    again = export_pairs(Store(str(captioned_store)), agents_hash, out, holdout_fraction=0.3)
    assert again.written == 0 and again.pairs == len(train)  # the shard's commit id is unchanged: nothing rewritten

    import open_clip
    from open_clip_train.data import get_wds_dataset

    from tasks.clip.spec import register_model_configs

    register_model_configs()
    _, preprocess, _ = open_clip.create_model_and_transforms("tiny-random")
    args = types.SimpleNamespace(
        train_data=str(out / f"{CMU.stem}.tar"), train_num_samples=None, dataset_resampled=False, seed=0,
        train_data_upsampling_factors=None, batch_size=1, workers=0, world_size=1,
    )  # fmt: skip
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("tiny-random"))
    batches = list(data.dataloader)
    assert data.dataloader.num_samples == len(train) == len(batches)  # sizes.json gave the count
    images, texts = batches[0]
    assert tuple(images.shape) == (1, 3, 64, 64) and tuple(texts.shape) == (1, 77)

    (captioned_store / "pairs" / agents_hash / f"{CMU.stem}.parquet").rename(tmp_path / "moved.parquet")
    gone = export_pairs(Store(str(captioned_store)), agents_hash, out, holdout_fraction=0.3)
    (tmp_path / "moved.parquet").rename(captioned_store / "pairs" / agents_hash / f"{CMU.stem}.parquet")
    assert gone.pairs == 0 and not list(out.glob("*.tar")) and not list((out / "holdout").glob("*.tar"))


def test_tars_come_from_webdatasets_writer_byte_for_byte_reproducible_and_read_back_by_its_reader(tmp_path):
    import tarfile

    import webdataset as wds

    from tasks.clip.webdataset import Sample, write_tar

    samples = [Sample(f"p{i}", b"image %d" % i, "jpg", f"caption {i}", {"patch_id": f"p{i}", "x": i}) for i in range(3)]
    assert write_tar(tmp_path / "a.tar", samples) == 3
    assert write_tar(tmp_path / "b.tar", iter(samples)) == 3
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()  # no time, owner or order in them
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) for m in members} == {(0, "", "", 0, 0, 0o644)}
    assert len(members) == 9 and not any(m.pax_headers for m in members)  # plain ustar members, none extended
    read = [(r["__key__"], r["jpg"], r["txt"].decode(), json.loads(r["json"]))
            for r in wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False)]  # fmt: skip
    assert read == [(s.key, s.image, s.caption, s.meta) for s in samples]

    def failing():
        yield samples[0]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_tar(tmp_path / "c.tar", failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # nothing half there


def test_model_specs_name_their_weights():
    assert parse_model_spec("ViT-B-16:laion2b_s34b_b88k") == ModelSpec("ViT-B-16", "laion2b_s34b_b88k")
    assert parse_model_spec("ViT-B-16").random_weights and parse_model_spec("tiny-random").random_weights
    assert not parse_model_spec("ViT-B-16:/runs/a/epoch_2.pt").random_weights
    assert not parse_model_spec("local-dir:/models/x").random_weights
    with pytest.raises(ValueError, match="NAME:/nowhere/epoch_1.pt"):
        parse_model_spec("/nowhere/epoch_1.pt")


def test_a_quickgelu_trained_tag_is_detected_and_names_the_quickgelu_twin(monkeypatch, caplog):
    """OpenAI's weights were trained with QuickGELU; open_clip's plain ViT-B-16 is GELU and only warns."""
    import logging

    from tasks.clip import spec

    assert spec.needs_quick_gelu("ViT-B-16", "openai") and spec.needs_quick_gelu("ViT-L-14-336", "openai")
    for name, tag in (
        ("ViT-B-16-quickgelu", "openai"),
        ("ViT-B-16", "laion2b_s34b_b88k"),
        ("tiny-random", None),
        ("tiny-random", "openai"),
        ("ViT-B-16", None),
        ("ViT-B-16", "/runs/a/epoch_2.pt"),
    ):
        assert not spec.needs_quick_gelu(name, tag), (name, tag)
        assert spec.quick_gelu_name(name, tag) == name
    monkeypatch.setattr(spec, "_switched", set())
    with caplog.at_level(logging.INFO, logger="pathgen.clip"):
        assert parse_model_spec("ViT-B-16:openai") == ModelSpec("ViT-B-16-quickgelu", "openai")
        assert parse_model_spec("ViT-B-16:OpenAI").name == "ViT-B-16-quickgelu"  # open_clip's tags ignore case
        assert parse_model_spec("ViT-B-16:openai").label == "ViT-B-16-quickgelu:openai"
    assert [r.getMessage() for r in caplog.records if "QuickGELU" in r.getMessage()] == [
        "ViT-B-16:openai builds ViT-B-16-quickgelu: the openai weights were trained with QuickGELU, ViT-B-16 has GELU",
        "ViT-B-16:OpenAI builds ViT-B-16-quickgelu: the OpenAI weights were trained with QuickGELU, ViT-B-16 has GELU",
    ]  # once per pair
    assert parse_model_spec("ViT-B-16-quickgelu:openai") == ModelSpec("ViT-B-16-quickgelu", "openai")
    assert parse_model_spec("ViT-B-16:/runs/a/epoch_2.pt") == ModelSpec("ViT-B-16", "/runs/a/epoch_2.pt")


def test_openai_specs_train_select_and_tower_with_quickgelu_and_our_forced_runs_load_so(tmp_path):
    import logging

    from pathgen.settings import ClipSettings, EmbeddingSettings, load_settings
    from tasks.clip.stages import stage_plan, start_spec
    from tasks.clip.train import trainer_args
    from tasks.llava.vision import vision_source
    from tasks.selection.embedding import embedding_spec

    assert start_spec(ClipSettings(pretrained="openai")) == ModelSpec("ViT-B-16-quickgelu", "openai")
    assert start_spec(ClipSettings(model="ViT-B-16", pretrained="laion2b_s34b_b88k")).name == "ViT-B-16"
    assert start_spec(ClipSettings(pretrained="/runs/a/epoch_2.pt")).name == "ViT-B-16"
    assert start_spec(ClipSettings()) == ModelSpec("tiny-random")
    settings = load_settings(overrides={"clip.model": "ViT-B-16", "clip.pretrained": "openai",
                                        "clip.work_dir": str(tmp_path)}, environ={})  # fmt: skip
    export = tmp_path / "export"
    export.mkdir()
    (export / "sizes.json").write_text(json.dumps({"000000.tar": 1000}))
    plan = stage_plan(settings, "run", "stage1", export, start_spec(settings.clip), logging.getLogger("test"))
    args = trainer_args(plan)
    assert args[args.index("--model") + 1] == "ViT-B-16-quickgelu" and "--force-quick-gelu" not in args

    assert embedding_spec(EmbeddingSettings(model="ViT-L-14-336", pretrained="openai")).name == "ViT-L-14-336-quickgelu"
    assert embedding_spec(EmbeddingSettings()) == ModelSpec("tiny-random")
    assert vision_source("ViT-L-14-336:openai").text == "ViT-L-14-336-quickgelu:openai"
    assert vision_source("tiny-random").text == "tiny-random"

    stage = tmp_path / "clip-run" / "stage1"
    (stage / "checkpoints").mkdir(parents=True)
    checkpoint = stage / "checkpoints" / "epoch_1.pt"
    checkpoint.write_bytes(b"weights")
    (stage / "params.txt").write_text("model: ViT-B-16\npretrained: openai\n")
    assert parse_model_spec(str(checkpoint)).name == "ViT-B-16"
    (stage / "params.txt").write_text("force_quick_gelu: True\nmodel: ViT-B-16\npretrained: openai\n")
    assert parse_model_spec(str(checkpoint)) == ModelSpec("ViT-B-16-quickgelu", str(checkpoint))
    (stage / "params.txt").write_text("force_quick_gelu: True\nmodel: tiny-random\n")
    with pytest.raises(ValueError, match="no tiny-random-quickgelu"):
        parse_model_spec(str(checkpoint))


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _pathgen(env, *args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pathgen", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.mark.prefect
def test_a_killed_training_run_under_torchrun_resumes_from_its_last_checkpoint(prefect_api, captioned_store, tmp_path):
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_LOGGING_LEVEL="INFO")
    work = tmp_path / "work"
    sets = ["--set", f"clip.work_dir={work}", "--set", "clip.batch_size=4", "--set", "clip.workers=0"]
    sets += ["--set", "clip.stage1.epochs=20", "--set", "clip.holdout_fraction=0"]
    # Under torchrun (one process on CPU): the launch N GPUs get, in a fresh interpreter that registers the model.
    sets += ["--set", "clip.launcher=torchrun"]
    command = [sys.executable, "-m", "pathgen", "train-clip", "--store", str(captioned_store), *sets]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(work.glob("runs/*/stage1/checkpoints/epoch_3.pt")) and time.monotonic() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (stage_dir,) = list(work.glob("runs/*/stage1"))
    # torchrun starts its workers in sessions of their own: the trainer outlives the kill by up to the half second
    # its parent watchdog takes (and may save one more epoch meanwhile). Wait for it to be gone.
    deadline = time.monotonic() + 10
    while _processes_naming(str(stage_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(str(stage_dir)), "the trainer outlived its torchrun"
    # Killed as soon as epoch_3.pt appeared, so often while it was being written: a truncated checkpoint must be
    # set aside, and the run resume from the newest complete one.
    saved = {int(p.stem.split("_")[1]): zipfile.is_zipfile(p) for p in (stage_dir / "checkpoints").glob("epoch_*.pt")}
    killed_at = max(epoch for epoch, complete in saved.items() if complete)
    truncated = [epoch for epoch, complete in saved.items() if not complete]
    assert 2 <= killed_at < 20 and truncated in ([], [killed_at + 1])

    second = _pathgen(env, "train-clip", "--store", str(captioned_store), *sets, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from epoch_{killed_at}.pt" in second.stdout + second.stderr
    out_log = (stage_dir / "out.log").read_text()
    assert f"resuming checkpoint '{stage_dir}/checkpoints/epoch_{killed_at}.pt' (epoch {killed_at})" in out_log
    assert "Start epoch 19" in out_log
    assert all((stage_dir / "checkpoints" / f"epoch_{epoch}.pt.incomplete").exists() for epoch in truncated)
    run = stage_dir.parent.name
    remote = captioned_store / "models" / "clip" / run / "stage1"
    assert (remote / "checkpoints" / "epoch_20.pt").exists() and (remote / "params.txt").exists()
    rows = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s"} <= set(rows[0]) and rows[-1]["epoch"] == 19
    assert all(b["step"] > a["step"] for a, b in zip(rows, rows[1:], strict=False))  # re-trained steps replaced
    assert rows[-1]["step"] == 20 * 3  # 12 pairs in batches of 4

    # Done: a third run finds the finished stage in the store and trains nothing.
    third = _pathgen(env, "train-clip", "--store", str(captioned_store), *sets, cwd=tmp_path)
    assert third.returncode == 0 and "stage1: skipped" in third.stdout, third.stdout[-2000:]


def _eval_json(store: Path, run: str, dataset: str) -> dict:
    return json.loads((store / "eval" / run / f"{dataset}.json").read_text())


@pytest.mark.prefect
def test_pathgen_clip_learns_the_visible_class_from_kather_pairs(prefect_api, tmp_path):
    """Captions naming the class on augmented views of two tiles per class; zero-shot on the held-out third tile."""
    from flows.evaluate import evaluate_flow
    from flows.train_clip import train_clip_flow

    data = kather.build(tmp_path / "kather", views_per_tile=40)
    store = tmp_path / "store"
    overrides = {
        "clip.work_dir": str(tmp_path / "work"),
        "clip.stage1.folder": str(data["folder"]),
        "clip.stage1.captions": str(data["captions"]),
        "clip.stage1.epochs": 15,
        "clip.lr": 1e-3,  # from scratch: the tiny model needs far more than fine-tuning's 3e-5
        "clip.batch_size": 32,
        "clip.warmup": 20,
        "clip.workers": 0,
        "clip.evaluate": [{"dataset": str(data["test"]), "classes": KATHER_CLASSES}],
    }
    summary = train_clip_flow(store=str(store), overrides=overrides)
    assert summary["error"] is None, summary
    (stage,) = summary["stages"]
    assert stage["status"] == "ok" and stage["steps"] == -(-stage["items"] // 32) * 15 >= 250, stage
    run = summary["run"]
    trained = _eval_json(store, f"{run}-stage1", "kather2016-heldout")
    baseline = evaluate_flow([{"dataset": str(data["test"]), "classes": KATHER_CLASSES}], model="tiny-random",
                             store=str(store))  # fmt: skip
    untrained = _eval_json(store, baseline["eval_run"], "kather2016-heldout")
    record = json.loads((store / "models" / "clip" / run / "run.json").read_text())
    assert untrained["random_weights"] is True  # the trained one started from random weights, and says so as run.json:
    assert trained["random_weights"] is record["random_weights"] is True
    chance, margin = 1 / 8, 0.25
    accuracy, before = trained["zero_shot"]["accuracy"], untrained["zero_shot"]["accuracy"]
    print(f"\nlearnability: zero-shot accuracy {accuracy:.3f} trained ({stage['steps']} steps, final loss "
          f"{stage['final_loss']}), {before:.3f} untrained, chance {chance:.3f}; balanced "
          f"{trained['zero_shot']['balanced_accuracy']:.3f}; retrieval {trained['retrieval']}")  # fmt: skip
    assert accuracy >= chance + margin > before
    assert (
        trained["retrieval"]["n"] >= 2
        and (store / "eval" / f"{run}-stage1" / "kather2016-heldout-confusion.png").exists()
    )


@pytest.mark.prefect
def test_the_chain_runs_on_the_shared_slide_and_its_checkpoint_drives_selection(prefect_api, tiny_models, tmp_path):
    import open_clip
    import torch

    from flows.caption import caption_flow
    from flows.extract import extract_flow
    from flows.train_clip import train_clip_flow

    store = tmp_path / "store"
    small = {"patch.patch_px": 224, "selection.max_per_slide": 16}
    extracted = extract_flow(sources=[str(CMU)], store=str(store), overrides=small, processes=False)
    assert extracted["ok"] == 1
    captioned = caption_flow(store=str(store), overrides={"agents.model_cache": str(tiny_models[0])})
    assert captioned["ok"] == 1 and captioned["pairs"] >= 8
    second_set = kather.build(tmp_path / "kather", views_per_tile=2)
    shared_kather = str(kather.KATHER.resolve())
    overrides = {
        "clip.work_dir": str(tmp_path / "work"),
        "clip.batch_size": 8,
        "clip.workers": 0,
        "clip.holdout_fraction": 0.25,
        "clip.stage1.epochs": 2,
        "clip.stage2.folder": str(second_set["folder"]),
        "clip.stage2.captions": str(second_set["captions"]),
        "clip.evaluate": [{"dataset": shared_kather, "classes": KATHER_CLASSES}],
    }
    summary = train_clip_flow(store=str(store), overrides=overrides)
    assert summary["error"] is None and [s["status"] for s in summary["stages"]] == ["ok", "ok"], summary
    run = summary["run"]
    run_dir = store / "models" / "clip" / run
    stage1_final = tmp_path / "work" / "runs" / run / "stage1" / "checkpoints" / "epoch_2.pt"
    assert f"pretrained: {stage1_final}" in (run_dir / "stage2" / "params.txt").read_text()  # stage 2 goes on
    assert json.loads((run_dir / "run.json").read_text())["random_weights"] is True
    for stage in ("stage1", "stage2"):
        result = _eval_json(store, f"{run}-{stage}", "kather2016-samples")
        assert result["zero_shot"]["n"] == 24 and len(result["zero_shot"]["confusion"]) == 8
        assert (store / "eval" / f"{run}-{stage}" / "kather2016-samples-confusion.png").exists()
    # Stage 1's one slide cannot be split without leaking (held out whole or not at all); stage 2's external
    # pairs carry no slide, so they are held out pair by pair.
    assert "retrieval" not in _eval_json(store, f"{run}-stage1", "kather2016-samples")
    assert _eval_json(store, f"{run}-stage2", "kather2016-samples")["retrieval"]["n"] >= 2

    # The checkpoint is an open_clip checkpoint, loaded with weights_only=True.
    checkpoint = run_dir / "stage2" / "checkpoints" / "epoch_1.pt"
    assert "state_dict" in torch.load(checkpoint, map_location="cpu", weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms("tiny-random", pretrained=str(checkpoint))
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["text_projection"], trained["text_projection"])

    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    evaluated = _pathgen(env, "evaluate", "--dataset", shared_kather, "--classes", KATHER_CLASSES,
                         "--store", str(store), cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"{run}-stage2" in evaluated.stdout and "accuracy=" in evaluated.stdout  # the newest checkpoint
    assert "RANDOM WEIGHTS" in evaluated.stdout  # the run was trained from tiny-random's random initialisation

    again = _pathgen(env, "extract", str(CMU), "--store", str(tmp_path / "next"), "--set", "patch.patch_px=224",
                     "--set", "selection.max_per_slide=8", "--set", f"embedding.pretrained={checkpoint}",
                     cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    record = json.loads((tmp_path / "next" / "slides" / CMU.stem / "slide.json").read_text())
    embedding = record["selection"]["embedding"]
    # The checkpoint descends from tiny-random's random initialisation: selection says so, as evaluate does.
    assert (embedding["model"], embedding["pretrained"], embedding["random_weights"]) == (
        "tiny-random",
        str(checkpoint),
        True,
    )
    assert record["random_weights"] is True and "RANDOM WEIGHTS" in again.stdout


def test_the_run_name_changes_exactly_when_the_trained_model_would(tmp_path):
    from pathgen.settings import load_settings
    from tasks.clip.stages import data_digest, export_set, run_name

    data = kather.build(tmp_path / "kather", views_per_tile=1)
    base = {"clip.work_dir": str(tmp_path / "work"), "clip.stage1.folder": str(data["folder"])}
    base["clip.stage1.captions"] = str(data["captions"])

    def name(**changes):
        settings = load_settings(overrides=base | changes, environ={})
        summary = export_set(Store(str(tmp_path / "store")), settings.clip.stage1, settings)
        return run_name(settings.clip, [data_digest(Path(summary.out))])

    first = name()
    assert name() == first  # same inputs: the same run, which resumes
    assert name(**{"clip.evaluate": [{"dataset": "x", "classes": "y"}], "clip.grad_checkpointing": True}) == first
    assert name(**{"clip.workers": 2}) != first  # loader workers split the tars: another sample order
    assert name(**{"clip.lr": 1e-4}) != first and name(**{"clip.stage1.epochs": 2}) != first
    checkpoint = tmp_path / "start.pt"
    checkpoint.write_bytes(b"weights one")
    started = name(**{"clip.pretrained": str(checkpoint)})
    assert started != first
    checkpoint.write_bytes(b"weights two")
    assert name(**{"clip.pretrained": str(checkpoint)}) != started  # the checkpoint by content, not by path
    rows = [json.loads(line) for line in data["captions"].read_text().splitlines()]
    rows[0]["caption"] += " (revised)"
    data["captions"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert name() != first  # one caption changed


def test_a_global_batch_on_several_devices_is_another_run_than_the_per_device_batch_it_replaced(tmp_path):
    """clip.batch_size was per device before it became the global batch: an older run on two devices trained another
    model under the same settings and must not be resumed as this one; on one device the two are the same run."""
    import hashlib

    from pathgen.settings import load_settings
    from tasks.clip.stages import run_name

    def names(devices: int) -> tuple[str, str]:
        overrides = {"clip.devices": devices, "clip.batch_size": 384, "clip.precision": "fp32"}
        overrides |= {"clip.work_dir": str(tmp_path), "clip.stage1.folder": str(tmp_path)}
        cfg = load_settings(overrides=overrides, environ={}).clip
        fields = {"lr", "weight_decay", "batch_size", "warmup", "seed", "devices", "workers"}
        per_device = {  # how runs were named while clip.batch_size was per device
            "model": "tiny-random",
            "weights": None,
            "train": cfg.model_dump(include=fields) | {"precision": "fp32"},
            "epochs": [cfg.stage1.epochs],
            "data": ["digest"],
            "holdout_fraction": cfg.holdout_fraction,
        }
        before = "clip-" + hashlib.sha256(json.dumps(per_device, sort_keys=True).encode()).hexdigest()[:12]
        return run_name(cfg, ["digest"]), before

    now, before = names(1)
    assert now == before  # a single-device run keeps its name and resumes
    now, before = names(2)
    assert now != before and now != names(1)[0]


@pytest.mark.s3
@pytest.mark.prefect
def test_train_and_evaluate_on_an_s3_store(prefect_api, captioned_store, bucket, tmp_path):
    """Pairs in S3 (SeaweedFS): the run's checkpoints land there, and evaluate finds and fetches the newest one."""
    import fsspec

    from flows.evaluate import evaluate_flow
    from flows.train_clip import train_clip_flow
    from tasks.store.objects import storage_options

    fs, root = fsspec.core.url_to_fs(bucket, **storage_options(bucket))
    fs.put(str(captioned_store / "pairs"), f"{root}/pairs", recursive=True)
    overrides = {"clip.work_dir": str(tmp_path / "work"), "clip.batch_size": 4, "clip.workers": 0}
    summary = train_clip_flow(store=bucket, overrides=overrides | {"clip.holdout_fraction": 0.3})
    assert summary["error"] is None and summary["stages"][0]["status"] == "ok", summary
    run = summary["run"]
    assert fs.exists(f"{root}/models/clip/{run}/stage1/checkpoints/epoch_1.pt")
    # One slide: held out whole or not at all (kept here), so no retrieval on it.
    assert not fs.exists(f"{root}/eval/{run}-stage1/holdout.json")
    shared_kather = str(kather.KATHER.resolve())
    result = evaluate_flow([{"dataset": shared_kather, "classes": KATHER_CLASSES}], store=bucket,
                           overrides={"clip.work_dir": str(tmp_path / "elsewhere")})  # fmt: skip
    assert result["ok"] == 1 and result["eval_run"] == f"{run}-stage1", result
    assert result["model"].startswith(f"tiny-random:{bucket}/models/clip/{run}/stage1/checkpoints/epoch_1.pt")
    assert fs.exists(f"{root}/eval/{run}-stage1/kather2016-samples.json")


def test_a_folder_with_splits_gets_a_linear_probe_and_k_shot(tmp_path):
    """train/ and test/ (two Kather tiles per class to train on, the third to test): zero-shot on test/ and a
    logistic-regression probe on frozen features of the tiny model."""
    import shutil

    from pathgen.settings import EvalSettings
    from tasks.clip.evaluate import evaluate
    from tasks.selection.embedding import load_clip_model

    dataset = tmp_path / "kather-splits"
    for folder in sorted(p for p in kather.KATHER.iterdir() if p.is_dir()):
        tiles = sorted(folder.glob("*.tif"))
        for split, chosen in (("train", tiles[:-1]), ("test", tiles[-1:])):
            (dataset / split / folder.name).mkdir(parents=True)
            for tile in chosen:
                shutil.copy(tile, dataset / split / folder.name / tile.name)
    model = load_clip_model(ModelSpec("tiny-random"), "cpu")
    result = evaluate(model, dataset, kather.CLASSES, EvalSettings(shots=[1], seeds=2))
    assert result["zero_shot"]["n"] == 8 and result["random_weights"] is True
    probe = result["linear_probe"]
    assert probe["full"]["n"] == 8 and len(probe["full"]["confusion"]) == 8
    assert probe["shots"]["1"]["seeds"] == 2 and 0.0 <= probe["shots"]["1"]["accuracy_mean"] <= 1.0


def _plan(tmp_path: Path, run: str = "r1"):
    from tasks.clip.train import StagePlan

    return StagePlan(run=run, name="stage1", folder=tmp_path / "runs" / run, spec=ModelSpec("tiny-random"), tars=[],
                     samples=4, epochs=3, batch_size=2, workers=0, lr=1e-3, weight_decay=0.1, warmup=0,
                     precision="fp32", grad_checkpointing=False, devices=1, seed=0)  # fmt: skip


def _record_steps(stage_dir: Path, steps: range) -> None:
    """Scalar records as open_clip_train writes them through ``scalars.ScalarLog``, appended."""
    from tasks.clip.scalars import SCALARS

    (stage_dir / SCALARS).parent.mkdir(parents=True, exist_ok=True)
    with (stage_dir / SCALARS).open("a") as handle:
        for step in steps:
            handle.write(json.dumps({"step": step, "tag": "train/loss", "value": 1.0}) + "\n")


def test_the_mirror_copies_only_checkpoints_this_trainer_finished(tmp_path):
    """An earlier run's records of epoch 1 prove nothing about the epoch_1.pt being rewritten now; a truncated
    file is never copied, even at the end."""
    import torch

    from tasks.clip.train import CheckpointMirror

    plan = _plan(tmp_path)
    assert plan.steps_per_epoch == 2
    folder = plan.stage_dir / "checkpoints"
    folder.mkdir(parents=True)
    log = plan.stage_dir / "out.log"
    log.write_text("Start epoch 0\nStart epoch 1\n")
    _record_steps(plan.stage_dir, range(4))  # epochs 0 and 1: a run that was cut short while saving epoch_2.pt
    store = Store(str(tmp_path / "store"))
    store.check()
    remote = tmp_path / "store" / "models" / "clip" / "r1" / "stage1" / "checkpoints"
    with CheckpointMirror(plan, store, interval=3600) as mirror:
        (folder / "epoch_1.pt").write_bytes(b"half a checkpoint")  # being written again by this run
        mirror.sync(final=False)
        assert not remote.exists()
        torch.save({"epoch": 1, "state_dict": {}}, folder / "epoch_1.pt")
        mirror.sync(final=False)
        assert not remote.exists()  # complete, but this trainer has not moved past it yet
        _record_steps(plan.stage_dir, range(2, 3))  # the first step of epoch 1: epoch_1.pt is done
        (folder / "epoch_2.pt").write_bytes(b"half")  # killed while saving: never copied
        mirror.sync(final=False)
        assert sorted(p.name for p in remote.iterdir()) == ["epoch_1.pt"]
    assert sorted(p.name for p in remote.iterdir()) == ["epoch_1.pt"]
    assert (remote.parent / "out.log").read_text() == log.read_text()


def test_evaluate_defaults_to_the_last_epoch_of_the_newest_stage(tmp_path):
    from flows.evaluate import eval_run_name, newest_checkpoint

    store = Store(str(tmp_path / "store"))
    store.check()
    for run, epochs in (("old", [1]), ("new", [2, 9, 10])):
        for epoch in epochs:
            store.write_bytes(f"models/clip/{run}/stage1/checkpoints/epoch_{epoch}.pt", b"x")
            time.sleep(0.01)
    newest = newest_checkpoint(store)
    assert newest.endswith("models/clip/new/stage1/checkpoints/epoch_10.pt")
    assert eval_run_name(newest) == "new-stage1"
    assert eval_run_name(newest.replace("epoch_10", "epoch_9")) == "new-stage1-epoch9"
    assert eval_run_name("ViT-B-16:openai") == "ViT-B-16-openai"


def test_export_leaves_tars_it_did_not_write(captioned_store, tmp_path):
    agents_hash, _ = _pair_ids(captioned_store)
    out = tmp_path / "wds"
    out.mkdir()
    (out / "someone-elses.tar").write_bytes(b"not ours")
    summary = export_pairs(Store(str(captioned_store)), agents_hash, out, holdout_fraction=0.0)
    assert (out / "someone-elses.tar").read_bytes() == b"not ours"
    assert json.loads((out / "sizes.json").read_text()) == {f"{CMU.stem}.tar": summary.pairs}
