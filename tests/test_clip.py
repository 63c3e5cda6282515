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
from tasks.clip.webdataset import export_pairs, is_holdout
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
    assert set(held) == {p for p in pair_ids if is_holdout(p, 0.3)} and held and train
    assert (summary.pairs, summary.holdout_pairs, summary.written) == (len(train), len(held), 1)
    assert summary.random_weights is True
    assert json.loads((out / "sizes.json").read_text()) == {f"{CMU.stem}.tar": len(train)}
    again = export_pairs(Store(str(captioned_store)), agents_hash, out, holdout_fraction=0.3)
    assert again.written == 0 and again.pairs == len(train)  # the shard's commit id is unchanged: nothing rewritten

    import open_clip
    from open_clip_train.data import get_wds_dataset

    from tasks.selection.embedding import _register_configs

    _register_configs()
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


def test_model_specs_name_their_weights():
    assert parse_model_spec("ViT-B-16:openai") == ModelSpec("ViT-B-16", "openai")
    assert parse_model_spec("ViT-B-16").random_weights and parse_model_spec("tiny-random").random_weights
    assert not parse_model_spec("ViT-B-16:/runs/a/epoch_2.pt").random_weights
    assert not parse_model_spec("local-dir:/models/x").random_weights
    with pytest.raises(ValueError, match="NAME:/nowhere/epoch_1.pt"):
        parse_model_spec("/nowhere/epoch_1.pt")


def _pathgen(env, *args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pathgen", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.mark.prefect
def test_a_killed_training_run_resumes_from_its_last_checkpoint(prefect_api, captioned_store, tmp_path):
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_LOGGING_LEVEL="INFO")
    work = tmp_path / "work"
    sets = ["--set", f"clip.work_dir={work}", "--set", "clip.batch_size=4", "--set", "clip.workers=0"]
    sets += ["--set", "clip.stage1.epochs=20", "--set", "clip.holdout_fraction=0"]
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
