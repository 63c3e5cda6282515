"""Seconds per MIL training epoch at CAMELYON16's size: ABMIL and ACMIL on frozen patch features.

Run: ``python bench/mil.py [--slides 400] [--patches 10000] [--dim 512] [--device auto|cpu|cuda] [--timed N]``.

One epoch is the paper's recipe for one pass over the training slides: batch size 1 (one slide per step), forward,
:func:`tasks.mil.models.mil_loss` (ACMIL: slide and branch cross-entropy plus the diversity term, with stochastic
top-K masking on, M=5, K=10, p=0.6), backward and an Adam step with weight decay 1e-4, the models at their default
widths (512 -> 256 projection, 128-wide gated attention).

Features: synthetic float32 bags, ``--patches x --dim`` each. All 400 of CAMELYON16's would take 8 GB, too much for
a shared machine, so a POOL of 8 bags is generated once (seeded) before the clock starts and step i trains on bag
i mod 8 with its own label. Reading features from disk is not timed: the printed epoch time is the model's
forward + loss + backward + optimizer step only. Two warm-up steps per model are not timed. With ``--timed N``
(N < --slides) only N steps are timed and the epoch time is EXTRAPOLATED as median step x --slides; the output says
so.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.mil.models import build_mil_model, mil_loss  # noqa: E402

POOL_BAGS = 8
WARMUP_STEPS = 2
LEARNING_RATE = 2e-4  # the middle of the paper's grid; speed does not depend on it
WEIGHT_DECAY = 1e-4
N_CLASSES = 2


def feature_pool(
    patches: int, dim: int, device: torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``POOL_BAGS`` seeded (bag, label) pairs on ``device``; the positive bags carry a shifted block of patches so
    the loss has something to learn (its value is not the point, the time is)."""
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for index in range(POOL_BAGS):
        bag = torch.randn(patches, dim, generator=generator)
        label = index % N_CLASSES
        if label:
            bag[: max(1, patches // 20)] += 0.5
        pool.append((bag.to(device), torch.tensor(label, device=device)))
    return pool


def step_seconds(model_name: str, pool: list, steps: int, device: torch.device) -> list[float]:
    """Wall seconds of each of ``steps`` training steps (after the warm-up), one slide per step."""
    torch.manual_seed(0)
    in_dim = pool[0][0].shape[1]
    model = build_mil_model(model_name, in_dim, N_CLASSES).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    seconds = []
    for step in range(WARMUP_STEPS + steps):
        bag, label = pool[step % len(pool)]
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = mil_loss(model(bag), label)
        loss.backward()
        optimizer.step()
        _sync(device)
        if step >= WARMUP_STEPS:
            seconds.append(time.perf_counter() - started)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here; use --device cpu")
    return torch.device(name)


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (fp32)"
    return f"CPU, {torch.get_num_threads()} torch threads (fp32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=400, help="training slides per epoch (CAMELYON16: 400)")
    parser.add_argument("--patches", type=int, default=10_000, help="patches per slide")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (CLIP ViT-B: 512)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--timed", type=int, metavar="N", help="time only N steps and extrapolate to --slides")
    args = parser.parse_args()
    if min(args.slides, args.patches, args.dim) < 1 or (args.timed is not None and args.timed < 1):
        raise SystemExit("--slides, --patches, --dim and --timed must be at least 1")
    timed = min(args.timed or args.slides, args.slides)
    device = _device(args.device)

    started = time.perf_counter()
    pool = feature_pool(args.patches, args.dim, device)
    pool_s = time.perf_counter() - started
    pool_gb = POOL_BAGS * args.patches * args.dim * 4 / 1e9
    print(f"MIL epoch bench on {_where(device)}: {args.slides} slides x {args.patches} patches x {args.dim} dims")
    print(
        f"  features: synthetic, a pool of {POOL_BAGS} bags ({pool_gb:.2f} GB) reused, built in {pool_s:.1f} s, untimed"
    )
    print(f"  step: forward + mil_loss + backward + Adam (wd {WEIGHT_DECAY}), batch 1; {WARMUP_STEPS} warm-up steps")
    extrapolated = timed < args.slides
    if extrapolated:
        print(f"  EXTRAPOLATED: {timed} of {args.slides} steps timed; epoch = median step x {args.slides}")
    epochs = {}
    for name in ("abmil", "acmil"):
        seconds = step_seconds(name, pool, timed, device)
        median = statistics.median(seconds)
        epochs[name] = median * args.slides if extrapolated else sum(seconds)
        # On a shared machine a few steps wait for the CPU: the median-based figure shows what contention added.
        kind = (
            "extrapolated" if extrapolated else f"measured; median step x {args.slides}: {median * args.slides:.3g} s"
        )
        print(
            f"  {name}: median step {median * 1000:.1f} ms (min {min(seconds) * 1000:.1f}, "
            f"max {max(seconds) * 1000:.1f}) over {len(seconds)} steps; epoch {epochs[name]:.3g} s ({kind})",
            flush=True,
        )
    print(f"  acmil / abmil epoch time: {epochs['acmil'] / epochs['abmil']:.2f}")
    print(f"abmil_epoch_s={epochs['abmil']:.3g} acmil_epoch_s={epochs['acmil']:.3g}")


if __name__ == "__main__":
    main()
