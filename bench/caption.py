"""Caption throughput: the whole caption task against calling the model's ``generate`` directly.

Run: ``python bench/caption.py`` (tiny random-weight models on the CPU; their captions are noise, the timing is
what is measured).

- factory: ``caption_shard`` on one shard of N patches of CMU-1-Small-Region: read the patches from the store,
  describe, revise, summarize (with validation, re-asks and the CLIP budget), write the pair and failed tables.
- direct: the same batches the factory sent to the models (recorded as it ran), replayed with the processor and
  ``model.generate`` called directly, nothing else: the floor for the same generation work.
- batching: the describe requests generated as batches of ``agents.batch_size`` versus one by one.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=64)
    args = parser.parse_args()

    from agents import pipeline
    from pathgen.settings import load_settings
    from tasks.captions.shard import caption_shard, plan_caption_shards
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    with tempfile.TemporaryDirectory(prefix="pathgen-bench-caption-") as tmp:
        overrides = {
            "store": f"{tmp}/store",
            "patch.patch_px": 224,
            "selection.method": "random",
            "selection.max_per_slide": args.patches,
            "agents.model_cache": str(WORK / "models"),
            "agents.shard_size": args.patches,
        }
        settings = load_settings(overrides=overrides)
        store = Store(settings.store)
        extract_slide(resolve_sources([str(CMU)], settings)[0], settings, store)
        agents = pipeline.CaptionAgents(settings.agents)
        (shard,), _ = plan_caption_shards(store, agents.agents_hash(), settings.agents.shard_size)

        caption_shard(shard, settings)  # warm-up: models loaded, first-call costs paid
        shutil.rmtree(f"{tmp}/store/pairs")  # so the timed run captions the shard again
        log: list = []
        real_backend_for = pipeline.backend_for
        pipeline.backend_for = lambda *a, **k: Recorder(real_backend_for(*a, **k), log)
        try:
            start = time.perf_counter()
            outcome = caption_shard(shard, settings)
            factory_s = time.perf_counter() - start
        finally:
            pipeline.backend_for = real_backend_for
        batch = settings.agents.batch_size
        direct_s = sum(direct_generate(b, reqs, s, batch) for b, reqs, s in log)
        describe_backend, describe_requests, describe_sampling = log[0]
        batched_s = direct_generate(describe_backend, describe_requests, describe_sampling, batch)
        single_s = direct_generate(describe_backend, describe_requests, describe_sampling, 1)

    items = len(shard.items)
    print(
        f"shard of {items} patches; {outcome.pairs} pairs, failures {outcome.failures or 'none'}; "
        f"{len(log)} model calls (tiny RANDOM-WEIGHT models on CPU: the captions are noise)"
    )
    print(
        f"factory (caption_shard, read + 3 roles + validation + write): {factory_s:6.2f} s  "
        f"{items / factory_s:6.1f} patches/s"
    )
    print(
        f"direct model.generate on the same batches:                      {direct_s:6.2f} s  "
        f"{items / direct_s:6.1f} patches/s"
    )
    print(f"describe, batches of {batch}: {batched_s:.2f} s; one by one: {single_s:.2f} s")
    print(f"caption_efficiency={direct_s / factory_s:.2f} batch_speedup={single_s / batched_s:.2f}")


if __name__ == "__main__":
    main()
