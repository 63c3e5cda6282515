"""What a command costs before its first slide: a private Prefect API server per command against the shared one.

Run: ``python bench/startup.py [--rounds R]`` (default 3; everything goes under bench/_work/startup).

Each sample runs ``pathgen extract CMU-1-Small-Region.svs --store <fresh> --set selection.method=all --threads`` in
a new process, no ``PREFECT_API_URL`` set, and reads its output as it comes: *before first slide* is the time from
starting the process to the flow's plan line ("1 slides in 1 groups"), after which the slide's own work begins;
*total* is the whole command. Three ways, alternating within each round:

- private (the baseline, the old behaviour): ``PATHGEN_LOCAL_API_IDLE_S=0``, a temporary server per command;
- shared, cold: no shared server runs (the previous one has stopped), so this command starts it;
- shared, warm: the next command, which reuses it.

All use one Prefect home under bench/_work, whose database is created by an untimed first command. The figures
printed are medians over the rounds; the ratio is private / warm.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathgen import local_api  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
WORK = ROOT / "bench" / "_work" / "startup"
PLAN_LINE = " slides in "
IDLE_S = 10  # the shared server stops 10 s after a round's warm command, so the next cold one starts it again


def command_environment(home: Path, idle: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PATHGEN_LOCAL_API_IDLE_S=str(idle),
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def run_command(home: Path, idle: float, store: Path) -> tuple[float, float]:
    """(seconds before the first slide, seconds in all) of one ``pathgen extract``."""
    env = command_environment(home, idle)
    command = [sys.executable, "-m", "pathgen", "extract", str(SLIDE), "--store", str(store), "--threads"]
    command += ["--set", "selection.method=all", "--set", "patch.patch_px=224"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before_first_slide = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if before_first_slide is None and PLAN_LINE in line:
            before_first_slide = time.perf_counter() - started
    code = process.wait()
    total = time.perf_counter() - started
    if code != 0 or before_first_slide is None:
        raise SystemExit(f"pathgen extract failed (exit {code}):\n{''.join(lines[-30:])}")
    return before_first_slide, total


def wait_until_no_shared_server(home: Path, timeout: float = 60) -> None:
    code = "from pathgen import local_api; print(local_api.state_directory())"
    env = command_environment(home, IDLE_S)
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    directory = Path(found.stdout.strip())
    deadline = time.monotonic() + timeout
    while (record := local_api.read_record(directory)) and local_api.process_alive(record["pid"], record["pid_start"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"the shared server in {directory} did not stop within {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    home = WORK / "prefect-home"
    stores = (WORK / f"store-{n}" for n in range(10_000))
    print("creating the Prefect database (untimed) ...", flush=True)
    run_command(home, 0, next(stores))
    samples: dict[str, list[tuple[float, float]]] = {"private": [], "shared cold": [], "shared warm": []}
    print(f"{'round':>5}  {'way':<12} {'before first slide s':>21} {'total s':>8}")
    for round_ in range(1, args.rounds + 1):
        ways = ["private", "shared"] if round_ % 2 else ["shared", "private"]
        for way in ways:
            if way == "private":
                runs = [("private", run_command(home, 0, next(stores)))]
            else:
                wait_until_no_shared_server(home)
                runs = [("shared cold", run_command(home, IDLE_S, next(stores)))]
                runs.append(("shared warm", run_command(home, IDLE_S, next(stores))))
            for name, (first, total) in runs:
                samples[name].append((first, total))
                print(f"{round_:>5}  {name:<12} {first:>21.2f} {total:>8.2f}", flush=True)
    medians = {
        name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
        for name, runs in samples.items()
    }
    for name, (first, total) in medians.items():
        print(f"{'median':>5}  {name:<12} {first:>21.2f} {total:>8.2f}")
    wait_until_no_shared_server(home)
    ratio = medians["private"][0] / medians["shared warm"][0]
    print(
        f"startup_before_first_slide_s private={medians['private'][0]:.2f} shared_cold={medians['shared cold'][0]:.2f} "
        f"shared_warm={medians['shared warm'][0]:.2f} private_over_warm={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
