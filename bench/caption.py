"""Caption throughput: the whole caption task against calling the model's ``generate`` directly.

Run: ``python bench/caption.py`` (tiny random-weight models on the CPU; their captions are noise, the timing is
what is measured).

- factory: ``caption_slides`` on one slide of N patches of CMU-1-Small-Region: read the patches from the store,
  describe, revise, summarize (with validation, re-asks and the CLIP budget), commit the slide's failed table and
  pair shard.
- direct: the same batches the factory sent to the models (recorded as it ran), replayed with the processor and
  ``model.generate`` called directly, nothing else: the floor for the same generation work.
- rounds: factory and direct alternate, each round the factory then the direct replay of that round's batches, so
  that both see the same load on a shared machine; the committed objects are removed between rounds so the factory
  captions the slide again. caption_efficiency is the median over rounds of (factory throughput / direct
  throughput), i.e. direct seconds / factory seconds.
- batching: the describe requests generated as batches of ``agents.batch_size`` versus one by one.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import io
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"
CMU = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


class Recorder:
    """Wraps a backend and records every batch it is sent, to replay the same batches directly."""

    def __init__(self, backend, log):
        self.backend, self.log = backend, log
        self.name, self.model_id, self.random_weights = backend.name, backend.model_id, backend.random_weights

    def generate(self, requests, sampling):
        self.log.append((self.backend, list(requests), sampling))
        return self.backend.generate(requests, sampling)


def direct_generate(backend, requests, sampling, batch_size) -> float:
    """Processor + model.generate + decode, nothing else; returns seconds."""
    import torch
    from PIL import Image

    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        conversations = []
        for r in chunk:
            parts = [{"type": "text", "text": r.before_image}]
            if r.image is not None:
                parts.append({"type": "image", "image": Image.open(io.BytesIO(r.image)).convert("RGB")})
            parts.append({"type": "text", "text": r.after_image})
            if not backend.vision:
                parts = "\n".join(p["text"] for p in parts if p["type"] == "text")
            conversations.append([{"role": "system", "content": r.system}, {"role": "user", "content": parts}])
        kwargs = {"processor_kwargs": {"padding": True}} if backend.vision else {"padding": True}
        inputs = backend.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
        )
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = backend.model.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                pad_token_id=backend.tokenizer.pad_token_id,
            )
        backend.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - start


@dataclass
class CaptionBench:
    """One slide extracted into a fresh store, ready to caption: what every round captions again."""

    settings: Any
    store: Any
    agents_hash: str
    units: list
    items: int  # patches the units hold

    def uncommit(self) -> None:
        """Remove the committed pair shards and failed tables, so the next run captions the slides again."""
        from tasks.captions.records import failed_prefix, pairs_prefix

        for prefix in (pairs_prefix(self.agents_hash), failed_prefix(self.agents_hash)):
            shutil.rmtree(self.store.path(prefix), ignore_errors=True)


@dataclass
class Round:
    factory_s: float
    direct_s: float
    outcomes: list
    calls: int  # model calls the factory made


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="factory/direct rounds (the median ratio is reported)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _prepare(tmp: str, patches: int) -> CaptionBench:
    """CMU-1-Small-Region extracted into a store under ``tmp`` (``patches`` random patches), captions planned."""
    import pyarrow.parquet as pq

    from agents import pipeline
    from pathgen.settings import load_settings
    from tasks.captions.plan import plan_captions
    from tasks.captions.records import patches_key
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    overrides = {
        "store": f"{tmp}/store",
        "patch.patch_px": 224,
        "selection.method": "random",
        "selection.max_per_slide": patches,
        "agents.model_cache": str(WORK / "models"),
    }
    settings = load_settings(overrides=overrides)
    store = Store(settings.store)
    extract_slide(resolve_sources([str(CMU)], settings)[0], settings, store)
    agents_hash = pipeline.CaptionAgents(settings.agents, settings.retries).agents_hash()
    units = plan_captions(store, agents_hash).pending
    items = 0
    for unit in units:
        with store.open(patches_key(unit)) as handle:
            items += pq.ParquetFile(handle, pre_buffer=False).metadata.num_rows
    return CaptionBench(settings, store, agents_hash, units, items)


def _factory_round(bench: CaptionBench, index: int) -> tuple[Round, list]:
    """The factory captions the slide again with every backend recorded, then the direct replay of its batches."""
    from agents import pipeline
    from tasks.captions.caption import caption_slides

    bench.uncommit()
    log: list = []
    real_backend_for = pipeline.backend_for
    pipeline.backend_for = lambda *a, **k: Recorder(real_backend_for(*a, **k), log)
    try:
        start = time.perf_counter()
        outcomes = caption_slides(bench.units, bench.settings, bench.agents_hash)
        factory_s = time.perf_counter() - start
    finally:
        pipeline.backend_for = real_backend_for
    if any(o.status != "ok" for o in outcomes):
        raise SystemExit(f"round {index + 1}: the factory did not commit every slide: {outcomes}")
    batch = bench.settings.agents.batch_size
    direct_s = sum(direct_generate(b, reqs, s, batch) for b, reqs, s in log)
    return Round(factory_s, direct_s, outcomes, len(log)), log


def _report(bench: CaptionBench, rounds: list[Round], batched_s: float, single_s: float) -> None:
    items, outcomes = bench.items, rounds[0].outcomes
    pairs = sum(o.items for o in outcomes)
    failures = ", ".join(o.columns.get("failures", "") for o in outcomes if o.columns.get("failures"))
    print(
        f"{len(bench.units)} slide(s), {items} patches; {pairs} pairs, failures {failures or 'none'}; "
        f"{rounds[0].calls} model calls per run (tiny RANDOM-WEIGHT models on CPU: the captions are noise)"
    )
    print("round  factory s  patches/s   direct s  patches/s  efficiency")
    ratios = [r.direct_s / r.factory_s for r in rounds]
    for index, (r, ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        print(
            f"{index:>5}  {r.factory_s:9.2f}  {items / r.factory_s:9.1f}  {r.direct_s:9.2f}  {items / r.direct_s:9.1f}"
            f"  {ratio:10.2f}"
        )
    print(
        "factory: caption_slides (read + 3 roles + validation + commit); direct: model.generate on the same "
        f"batches; median efficiency over {len(ratios)} rounds: {statistics.median(ratios):.2f}"
    )
    print(f"describe, batches of {bench.settings.agents.batch_size}: {batched_s:.2f} s; one by one: {single_s:.2f} s")
    print(f"caption_efficiency={statistics.median(ratios):.2f} batch_speedup={single_s / batched_s:.2f}")


def main() -> None:
    args = _arguments()
    from tasks.captions.caption import caption_slides

    with tempfile.TemporaryDirectory(prefix="pathgen-bench-caption-") as tmp:
        bench = _prepare(tmp, args.patches)
        caption_slides(bench.units, bench.settings, bench.agents_hash)  # warm-up: models loaded, first-call costs paid
        rounds, logs = [], []
        for index in range(args.rounds):
            result, log = _factory_round(bench, index)
            rounds.append(result)
            logs.append(log)
        describe_backend, describe_requests, describe_sampling = next(log for log in logs if log)[0]
        batch = bench.settings.agents.batch_size
        batched_s = direct_generate(describe_backend, describe_requests, describe_sampling, batch)
        single_s = direct_generate(describe_backend, describe_requests, describe_sampling, 1)
    _report(bench, rounds, batched_s, single_s)


if __name__ == "__main__":
    main()
