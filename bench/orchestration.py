"""Orchestration at scale: does the Prefect server record every task run of a big job, and what does a task run cost?

Run: ``python bench/orchestration.py --stacks [--tasks 2000] [--concurrency 16]`` starts two local stacks
(``deploy/local-stack.sh up``: Prefect on SQLite with in-memory messaging, and ``up --production``: PostgreSQL with
Redis messaging; state under bench/_work/orchestration, free ports), measures both, and stops them. Or measure running
servers: ``--api URL [--api URL ...]``, with ``--label`` naming them in the same order.

For each server: one flow run submits ``--tasks`` task runs of a trivial task (threads, ``--concurrency`` at once,
as the factory's runner submits slide groups), waits for them, then asks the server, until the count stops growing
(at most ``--settle`` seconds), how many task runs of that flow run it has recorded and how many as Completed. The
client reports task-run states to the server as events, which the server's task-run recorder consumes from its
messaging: an in-memory broker that falls behind drops them, and the run's history in the UI is then missing rows.
API time per task run = (the flow run's wall time - the same calls without Prefect) / tasks.

Last, what a 7,300-slide, 1.6 M-pair job makes (PathGen-1.6M's scale) with deploy/production.yaml: task runs per
stage (a task handles a group of slides, never one patch) and flow runs (factory, stage subflows, parts).
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import math
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
from prefect import flow, task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

tasks, concurrency = int(sys.argv[1]), int(sys.argv[2])

def unit(i):
    return i * i

unit_task = task(unit, name="unit", persist_result=False)

@flow(name="orchestration-bench", task_runner=ThreadPoolTaskRunner(max_workers=concurrency), persist_result=False)
def many(n):
    futures = [unit_task.submit(i) for i in range(n)]
    wait(futures)
    return sum(f.result() for f in futures)

started = time.perf_counter()
plain = sum(unit(i) for i in range(tasks))
plain_s = time.perf_counter() - started
started = time.perf_counter()
state = many(tasks, return_state=True)
flow_s = time.perf_counter() - started
assert state.result() == plain
print(json.dumps({"flow_run": str(state.state_details.flow_run_id), "flow_s": flow_s, "plain_s": plain_s}))
"""


def measure(api: str, tasks: int, concurrency: int, settle: float) -> dict:
    import json

    env = dict(
        os.environ, PREFECT_API_URL=api, PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tasks), str(concurrency)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the bench flow failed against {api}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(count_recorded(api, result["flow_run"], tasks, settle))
    result["api_ms_per_task_run"] = 1000 * (result["flow_s"] - result["plain_s"]) / tasks
    return result


def _count(api: str, body: dict) -> int:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{api}/task_runs/count", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(json.loads(response.read()))


def count_recorded(api: str, flow_run: str, expected: int, settle: float) -> dict:
    """Task runs of ``flow_run`` the server has recorded (all, and Completed), asked until the count stops growing."""
    runs = {"flow_runs": {"id": {"any_": [flow_run]}}}
    completed = {**runs, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    started, last, stable_since = time.monotonic(), None, time.monotonic()
    while True:
        counts = (_count(api, runs), _count(api, completed))
        if counts != last:
            last, stable_since = counts, time.monotonic()
        if counts[1] >= expected or time.monotonic() - stable_since > 10 or time.monotonic() - started > settle:
            break
        time.sleep(1)
    return {"recorded": last[0], "completed": last[1], "settle_s": round(time.monotonic() - started, 1)}


def job_shape(slides: int = 7300, pairs: int = 1_600_000, parts: int = 8) -> list[tuple[str, int, int]]:
    """(stage, task runs, flow runs) of one factory run over ``slides`` slides with the production settings."""
    from pathgen.settings import load_settings

    settings = load_settings(str(ROOT / "deploy" / "production.yaml"), environ={})
    extract_tasks = math.ceil(slides / settings.extract.group_size)
    caption_tasks = math.ceil(slides / settings.agents.slides_per_task)
    stage_runs = 1 + parts  # the stage's subflow (the parts' parent) and one child flow run per part
    return [
        ("factory", 0, 1),
        ("extract", extract_tasks, stage_runs),
        ("caption", caption_tasks, stage_runs),
        ("train-clip", 1 + 1 + len(settings.clip.evaluate) + 1, 1),  # export, train, evaluations (+ hold-out)
        ("evaluate", max(1, len(settings.clip.evaluate)), 1),
        (f"(pairs per caption task: {pairs // caption_tasks})", 0, 0),
    ]


STACK_PORTS = ("PREFECT_PORT", "S3_PORT", "WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT", "PG_PORT")


def start_stack(mode: str) -> tuple[dict[str, str], str]:
    """``deploy/local-stack.sh up [--production]`` on free ports, state under bench/_work; (its env, API URL)."""
    from bench.seaweed import free_port_pair

    state = ROOT / "bench" / "_work" / "orchestration" / mode
    if state.exists():
        subprocess.run(["bash", str(ROOT / "deploy/local-stack.sh"), "down"], env=dict(os.environ, STATE=str(state)))
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.parent.chmod(0o755)  # as root, PostgreSQL runs as the postgres user, which must reach its folder
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({name: str(free_port_pair()) for name in STACK_PORTS}, STATE=str(state))
    env["REDIS_PORT"] = str(free_port_pair())
    command = ["bash", str(ROOT / "deploy/local-stack.sh"), "up"] + (["--production"] if mode == "postgres" else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} stack did not start:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    return env, f"http://127.0.0.1:{env['PREFECT_PORT']}/api"


def stop_stack(env: dict[str, str]) -> None:
    subprocess.run(["bash", str(ROOT / "deploy/local-stack.sh"), "down"], env=env, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api", action="append", default=[], help="a Prefect API URL (repeat to compare)")
    parser.add_argument("--stacks", action="store_true", help="start a SQLite and a PostgreSQL + Redis local stack")
    parser.add_argument("--label", action="append", default=[], help="a name for each --api, in order")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the server to record")
    args = parser.parse_args()
    stacks = []
    try:
        if args.stacks:
            for mode, label in (("sqlite", "SQLite, in-memory"), ("postgres", "PostgreSQL + Redis")):
                print(f"starting the {label} stack ...", flush=True)
                env, api = start_stack(mode)
                stacks.append(env)
                args.api.append(api)
                args.label.append(label)
        if not args.api:
            parser.error("give --stacks or at least one --api")
        measure_all(args)
    finally:
        for env in stacks:
            stop_stack(env)
    print_job_shape()


def measure_all(args: argparse.Namespace) -> None:
    labels = args.label + [f"api{i}" for i in range(len(args.label), len(args.api))]
    header = f"{'server':<22} {'tasks':>6} {'recorded':>9} {'completed':>10} {'flow s':>8} {'ms/task run':>12}"
    print(header + f" {'settle s':>9}")
    for label, api in zip(labels, args.api, strict=True):
        r = measure(api, args.tasks, args.concurrency, args.settle)
        print(
            f"{label:<22} {args.tasks:>6} {r['recorded']:>9} {r['completed']:>10} {r['flow_s']:>8.1f} "
            f"{r['api_ms_per_task_run']:>12.1f} {r['settle_s']:>9}",
            flush=True,
        )


def print_job_shape() -> None:
    print("\na 7,300-slide, 1.6 M-pair factory run with deploy/production.yaml and parts=8:")
    total_tasks = total_flows = 0
    for stage, tasks, flows in job_shape():
        print(f"  {stage:<40} {tasks:>6} task runs {flows:>3} flow runs" if flows or tasks else f"  {stage}")
        total_tasks, total_flows = total_tasks + tasks, total_flows + flows
    print(f"  {'in all':<40} {total_tasks:>6} task runs {total_flows:>3} flow runs")


if __name__ == "__main__":
    main()
