"""PathGen-CLIP training on a GPU: open_clip's own trainer through our StagePlan, mixed precision against fp32.

Run: ``python bench/clip_precision.py [--model ViT-B-16] [--pairs 2048] [--batch-size 128] [--data DIR]`` on a
machine with a GPU (on CPU it runs with ``--model tiny-random`` and small numbers, as a smoke run).

Pairs: the Kather 2016 tiles of ``DIR`` (default ../shared/data/patches/kather2016-samples, one folder per class),
cycled to ``--pairs`` pairs whose caption names the class, exported to WebDataset tars by ``export_external``. The
model starts from random weights (no hub here) and trains one epoch twice, with the precision our ``auto`` picks on
a GPU (``amp``) and with ``fp32``, each from the same seed. Printed: steps, first and last loss, samples/s of each,
and the ratio amp / fp32 (the baseline, measured in the same run); two rounds in swapped order, the second
compared (the first run of a process also pays for CUDA's start).
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import csv
import logging
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathgen.settings import PairSetSettings  # noqa: E402
from tasks.clip.spec import ModelSpec  # noqa: E402
from tasks.clip.train import StagePlan, run_trainer, write_metrics  # noqa: E402
from tasks.clip.webdataset import export_external, training_tars  # noqa: E402

WORK = ROOT / "bench" / "_work" / "clip_precision"


def build_pairs(data: Path, pairs: int) -> Path:
    """``pairs`` images (the tiles, cycled) with a caption CSV, in a fresh folder."""
    folder = WORK / "pairs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tiles = sorted(
        (tile, tile.parent.name) for tile in data.glob("*/*") if tile.suffix.lower() in (".tif", ".png", ".jpg")
    )
    if not tiles:
        raise SystemExit(f"no tiles under {data}/<class>/")
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(pairs):
            tile, label = tiles[i % len(tiles)]
            name = f"{i:06d}{tile.suffix.lower()}"
            shutil.copyfile(tile, folder / name)
            writer.writerow([name, f"an H&E image of {label.replace('_', ' ').lower()} tissue"])
    return folder


def train(tars: list[Path], samples: int, args: argparse.Namespace, precision: str) -> dict:
    plan = StagePlan(
        run=f"bench-{precision}",
        name="stage1",
        folder=WORK / "runs" / precision,
        spec=ModelSpec(args.model),
        tars=tars,
        samples=samples,
        epochs=1,
        batch_size=args.batch_size,
        workers=args.workers,
        lr=5e-4,
        weight_decay=0.1,
        warmup=10,
        precision=precision,
        grad_checkpointing=False,
        devices=1,
        seed=0,
        random_start=True,
    )
    shutil.rmtree(plan.folder, ignore_errors=True)
    started = time.perf_counter()
    run_trainer(plan, logging.getLogger("bench"))
    seconds = time.perf_counter() - started
    rows = write_metrics(plan)
    return {"seconds": seconds, "steps": len(rows), "first": rows[0]["loss"], "last": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "patches" / "kather2016-samples")
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    folder = build_pairs(args.data, args.pairs)
    out = WORK / "tars"
    shutil.rmtree(out, ignore_errors=True)
    pair_set = PairSetSettings(folder=str(folder), captions=str(folder / "captions.csv"))
    summary = export_external(pair_set, out, pairs_per_tar=256, holdout_fraction=0.0)
    tars = training_tars(out)
    print(f"{args.model} on {device}: {summary.pairs} pairs in {len(tars)} tars, batch {args.batch_size}", flush=True)
    results = {}
    # Two rounds, the order swapped: the first trainer run in a process also pays CUDA's and the loader's start.
    for round_, order in enumerate((("fp32", "amp"), ("amp", "fp32")), start=1):
        for precision in order:
            r = train(tars, summary.pairs, args, precision)
            results[precision] = r  # the last round's figures are the ones compared
            rate = summary.pairs / r["seconds"]
            loss = f"loss {r['first']:.4f} -> {r['last']:.4f}"
            print(f"round {round_} {precision:>5}: {r['steps']} logged steps, {loss}, {rate:.0f} samples/s "
                  f"(whole trainer run, {r['seconds']:.1f} s)", flush=True)  # fmt: skip
    print(f"amp_over_fp32_speed={results['fp32']['seconds'] / results['amp']['seconds']:.2f}")


if __name__ == "__main__":
    main()
