"""One PathGen-LLaVA training stage: a small loop of our own on plain torch, with accelerate for devices, mixed
precision and data parallelism (in this process for one device, under ``torchrun --nproc-per-node N`` for N).

Stage 1 trains the projector only; stage 2 the projector and the language model, fully or with LoRA (merged into the
saved model). The data order is a seeded permutation per epoch, so a resumed run takes up exactly the micro-batches
its checkpoint had not seen. Every ``save_steps`` optimizer steps the trainable weights, the optimizer and the
scheduler go to ``checkpoints/step_N/`` here and in the store (``state.json`` last: a checkpoint without it is not
one); at the end the whole model goes to ``model/`` as a Hugging Face folder, then ``stage.json`` marks the stage done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.llava.data import IGNORE, ConversationDataset, Encoder, collate, read_records
from tasks.store.objects import Store

RUNS = "models/llava"
STEP_DIR = re.compile(r"step_(\d+)$")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # the LM's attention, not the vision tower's
MAX_GRAD_NORM = 1.0  # LLaVA-1.5's


@dataclass
class TrainPlan:
    """Everything one stage needs, JSON-serialisable so torchrun's processes read the same plan."""

    run: str
    stage: str  # stage1 | stage2
    data: str  # the LLaVA data folder
    start: str  # the Hugging Face folder this stage starts from
    out: str  # local stage folder: checkpoints/, model/, metrics.jsonl
    store: str
    s3: dict[str, Any]
    mode: str  # projector | full | lora
    lr: float
    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    max_length: int
    warmup_ratio: float
    weight_decay: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    precision: str  # bf16 | fp16 | fp32
    gradient_checkpointing: bool
    devices: int
    workers: int
    save_steps: int
    seed: int
    random_weights: bool

    @property
    def prefix(self) -> str:
        return f"{RUNS}/{self.run}/{self.stage}"

    @property
    def stage_dir(self) -> Path:
        return Path(self.out)

    def open_store(self) -> Store:
        from pathgen.settings import S3Settings

        return Store(self.store, S3Settings(**self.s3))


def micro_batches(n: int, batch_size: int, epochs: int, seed: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """This rank's micro-batches over all epochs. With several ranks only whole global batches are used, so every
    rank takes the same number of steps (a rank left waiting would hang the others)."""
    import torch

    batches = []
    span = batch_size * world
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        usable = len(order) if world == 1 else len(order) // span * span
        batches += [order[s : s + span][rank * batch_size : (rank + 1) * batch_size] for s in range(0, usable, span)]
    if not batches:
        raise ValueError(f"{n} conversations make no batch of {batch_size} x {world} devices")
    return batches


def total_steps(micro: int, grad_accum: int, max_steps: int | None) -> int:
    steps = math.ceil(micro / grad_accum)
    return min(steps, max_steps) if max_steps else steps


def set_trainable(model, mode: str):
    """Freeze what the stage does not train; LoRA wraps the model (peft) and trains its adapters and the projector."""
    model.requires_grad_(False)
    if mode == "lora":
        return model  # peft marks its own trainable parameters (lora_model)
    model.model.multi_modal_projector.requires_grad_(True)
    if mode == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return model


def lora_model(model, plan: TrainPlan):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"],  # LLaVA-1.5's LoRA recipe trains the projector in full
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_model(plan: TrainPlan):
    """(model, processor) from the stage's start folder, with exactly the stage's parameters trainable."""
    from tasks.llava.model import load_llava

    model, processor = load_llava(plan.start)
    model = set_trainable(model, plan.mode)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.mode == "lora":
        model = lora_model(model, plan)
    return model, processor


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def cosine_schedule(optimizer, warmup: int, total: int):
    """Linear warmup, then cosine decay to zero (LLaVA-1.5's schedule)."""
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- checkpoints --------------------------------------------------------------------------------------------------


def local_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in (folder / "checkpoints").glob("step_*") if STEP_DIR.search(p.name)]
    found = [p for p in found if (p / "state.json").is_file()]  # state.json is written last
    return sorted(found, key=lambda p: int(STEP_DIR.search(p.name).group(1)))


def store_checkpoints(store: Store, prefix: str) -> list[str]:
    """Committed checkpoint folders of a stage in the store (keys of their state.json, the last file uploaded)."""
    keys = [k for k in store.list(f"{prefix}/checkpoints", "/state.json") if STEP_DIR.search(k.rsplit("/", 2)[-2])]
    return sorted(keys, key=lambda k: int(STEP_DIR.search(k.rsplit("/", 2)[-2]).group(1)))


def step_of(path: str | Path) -> int:
    match = STEP_DIR.search(str(path).rstrip("/").removesuffix("/state.json"))
    return int(match.group(1)) if match else 0


def save_checkpoint(plan: TrainPlan, store: Store, model, optimizer, scheduler, step: int, rows: list[dict]) -> Path:
    """Write step_N here (a partial folder renamed), upload it with state.json last, then drop older ones."""
    import torch
    from safetensors.torch import save_file

    root = plan.stage_dir / "checkpoints"
    target = root / f"step_{step:07d}"
    partial = root / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(trainable_state(model), str(partial / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
    write_rows(partial / "metrics.jsonl", rows)
    (partial / "state.json").write_text(json.dumps({"step": step, "stage": plan.stage, "run": plan.run}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    key = f"{plan.prefix}/checkpoints/{target.name}"
    for name in ("trainable.safetensors", "optimizer.pt", "metrics.jsonl", "state.json"):
        store.put_file(target / name, f"{key}/{name}")
    store.put_file(target / "metrics.jsonl", f"{plan.prefix}/metrics.jsonl")  # progress, visible while it trains
    _drop_older(plan, store, step)
    return target


def _drop_older(plan: TrainPlan, store: Store, step: int) -> None:
    """Only checkpoints from ``step`` on are kept: a full fine-tune's optimizer state is several times the model."""
    for path in local_checkpoints(plan.stage_dir):
        if step_of(path) < step:
            shutil.rmtree(path, ignore_errors=True)
    for key in store_checkpoints(store, plan.prefix):
        if step_of(key) < step:
            store.delete(key)  # state.json first: what is left is no longer a checkpoint
            store.fs.rm(store.path(key.rsplit("/", 1)[0]), recursive=True)


def fetch_newest(plan: TrainPlan, store: Store) -> Path | None:
    """The newest checkpoint, here or (brought here) from the store, whichever is further."""
    local = local_checkpoints(plan.stage_dir)
    remote = store_checkpoints(store, plan.prefix)
    if not remote or (local and step_of(local[-1]) >= step_of(remote[-1])):
        return local[-1] if local else None
    folder = remote[-1].rsplit("/", 1)[0]
    target = plan.stage_dir / "checkpoints" / folder.rsplit("/", 1)[-1]
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "metrics.jsonl", "state.json"):
        store.fs.get(store.path(f"{folder}/{name}"), str(partial / name))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / "trainable.safetensors"))
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise RuntimeError(f"{folder} does not hold this stage's trainable weights (another mode or model?)")
    model.load_state_dict(state, strict=False)
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    step = json.loads((folder / "state.json").read_text())["step"]
    return step, [r for r in read_rows(folder / "metrics.jsonl") if r["step"] <= step]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What the steps share: the accelerator, the (prepared) model and optimizer, the schedule."""

    plan: TrainPlan
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]


def train_step(loop: Loop, micro: list[dict[str, Any]]) -> float:
    """One optimizer step over its micro-batches; gradients are synchronised across devices on the last one only."""
    import torch

    accelerator, model = loop.accelerator, loop.model
    losses = []
    for i, batch in enumerate(micro):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
        with sync:
            out = model(**batch)
            loss = out.loss
            if not (batch["labels"][:, 1:] != IGNORE).any():  # truncation left nothing to learn: a zero gradient
                loss = out.logits.sum() * 0.0
            accelerator.backward(loss / len(micro))
        losses.append(loss.detach().float())
    accelerator.clip_grad_norm_(loop.params, MAX_GRAD_NORM)
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def setup(plan: TrainPlan, logger: logging.Logger):
    """Accelerator, model, data and optimizer of a stage; returns (loop, processor, dataset, micro-batches, total)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    records = read_records(Path(plan.data), plan.stage)
    # A batch of text-only conversations leaves the projector without a gradient, which DDP must be told to expect.
    text_only = any(not r.get("image") for r in records)
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(plan.precision, "no")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=text_only)]
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    set_seed(plan.seed)
    model, processor = prepare_model(plan)
    image_tokens = int(model.config.image_seq_length)
    dataset = ConversationDataset(Path(plan.data), records, Encoder(processor, image_tokens, plan.max_length))
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = micro_batches(len(records), plan.batch_size, plan.epochs, plan.seed, world, rank)
    total = total_steps(len(batches), plan.grad_accum, plan.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    scheduler = cosine_schedule(optimizer, round(plan.warmup_ratio * total), total)
    model, optimizer = accelerator.prepare(model, optimizer)
    logger.info("%s %s: %d conversations, %d steps on %d device(s), %d trainable parameters",
                plan.run, plan.stage, len(records), total, world, sum(p.numel() for p in params))  # fmt: skip
    return Loop(plan, accelerator, model, optimizer, scheduler, params), processor, dataset, batches, total


def run_training(plan: TrainPlan, logger: logging.Logger | None = None) -> dict[str, Any] | None:
    """Train the stage to its last step, resuming from the newest checkpoint; rank 0 returns the stage record."""
    import torch

    logger = logger or logging.getLogger("pathgen.llava")
    loop, processor, dataset, batches, total = setup(plan, logger)
    store, main = plan.open_store(), loop.accelerator.is_main_process
    if main:
        fetch_newest(plan, store)
    loop.accelerator.wait_for_everyone()
    newest = local_checkpoints(plan.stage_dir)
    unwrapped = loop.accelerator.unwrap_model(loop.model)
    step, rows = load_checkpoint(newest[-1], unwrapped, loop.optimizer, loop.scheduler) if newest else (0, [])
    if step:
        logger.info("%s %s: resuming from step %d of %d", plan.run, plan.stage, step, total)
    sampler = batches[step * plan.grad_accum : total * plan.grad_accum]
    pad = functools.partial(collate, pad_id=processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=plan.workers, collate_fn=pad)
    loop.model.train()
    micro = iter(loader)
    while step < total:
        started = time.perf_counter()
        group = [next(micro) for _ in range(min(plan.grad_accum, len(batches) - step * plan.grad_accum))]
        loss = train_step(loop, group)
        step += 1
        samples = sum(len(b["input_ids"]) for b in group) * loop.accelerator.num_processes
        rows.append({"stage": plan.stage, "step": step, "epoch": round(step * plan.grad_accum / len(batches)
                     * plan.epochs, 4), "loss": loss, "lr": loop.scheduler.get_last_lr()[0],
                     "samples_per_s": round(samples / (time.perf_counter() - started), 2)})  # fmt: skip
        if main and step % plan.save_steps == 0 and step < total:
            save_checkpoint(plan, store, loop.accelerator.unwrap_model(loop.model), loop.optimizer,
                            loop.scheduler, step, rows)  # fmt: skip
        if step % 10 == 0 or step == total:
            logger.info("%s %s step %d/%d loss %.4f", plan.run, plan.stage, step, total, loss)
    loop.accelerator.wait_for_everyone()
    return finish(plan, store, loop, processor, rows) if main else None


def finish(plan: TrainPlan, store: Store, loop: Loop, processor, rows: list[dict]) -> dict[str, Any]:
    """Save the trained model as a Hugging Face folder (LoRA merged), upload it, then stage.json: done."""
    from tasks.llava.model import save_llava

    model = loop.accelerator.unwrap_model(loop.model)
    if plan.mode == "lora":
        model = model.merge_and_unload()  # a plain LlavaForConditionalGeneration again, adapters folded in
    folder = save_llava(model, processor, plan.stage_dir / "model")
    write_rows(plan.stage_dir / "metrics.jsonl", rows)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(file, f"{plan.prefix}/model/{file.relative_to(folder).as_posix()}")
    store.put_file(plan.stage_dir / "metrics.jsonl", f"{plan.prefix}/metrics.jsonl")
    record = stage_record(plan, store, rows)
    store.write_json(f"{plan.prefix}/stage.json", record)  # last: marks the stage done
    (plan.stage_dir / "stage.json").write_text(json.dumps(record, indent=2))
    _drop_older(plan, store, record["steps"] + 1)  # a finished stage resumes from nothing
    return record


def stage_record(plan: TrainPlan, store: Store, rows: list[dict]) -> dict[str, Any]:
    return {
        "run": plan.run,
        "stage": plan.stage,
        "mode": plan.mode,
        "steps": rows[-1]["step"] if rows else 0,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "model": store.uri(f"{plan.prefix}/model"),
        "random_weights": plan.random_weights,
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("s3", "store", "out")},
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
