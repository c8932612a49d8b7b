"""Real PostgreSQL and Redis servers on 127.0.0.1 for the production-topology scenarios.

Each runs from the distribution's binaries with its own data directory under the pytest tmp
tree, on a free port, and is stopped by the harness (pytest finalizers), also on failure.
PostgreSQL refuses to run as root: its programs are executed as the `postgres` user.
"""

import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .processes import POLL_SECONDS, READY_TIMEOUT, end, free_port, spawn, wait_until

PG_USER = "postgres"
PG_DATABASE = "openwebui"
AS_POSTGRES = {"user": PG_USER, "group": PG_USER, "extra_groups": []}
# Throwaway clusters: durability costs seconds per server and buys nothing here.
PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


def postgres_bin(name: str) -> str:
    """A program of the PostgreSQL installation whose `postgres` is on PATH (/usr/local/bin here) or in
    Debian's versioned directory; resolved there, since Debian's /usr/bin wrappers need client packages."""
    candidates = [shutil.which("postgres"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)]
    server = next((candidate for candidate in candidates if candidate), None)
    if server is None:
        raise RuntimeError("PostgreSQL not found; run .ci/system-deps")
    return str(Path(server).resolve().parent / name)


def open_path_to(path: Path, user: str) -> None:
    """Let `user` traverse (not list) the root-only pytest tmp tree down to `path`, and own `path`."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            parent.chmod(parent.stat().st_mode | 0o001)
    shutil.chown(path, user, user)


@dataclass
class Postgres:
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def start(self) -> "Postgres":
        data, sockets = self.root / "data", self.root / "sockets"
        if not data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            open_path_to(self.root, PG_USER)
            sockets.mkdir()
            shutil.chown(sockets, PG_USER, PG_USER)
            initdb = [postgres_bin("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "--no-sync", "-E", "UTF8"]
            with open(self.log_path, "ab") as log:
                subprocess.run(initdb, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, check=True, **AS_POSTGRES)
        settings = [arg for s in PG_SETTINGS for arg in ("-c", s)]
        argv = [postgres_bin("postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sockets)]
        argv += ["-c", "listen_addresses=127.0.0.1", *settings]
        self.process = spawn(argv, self.log_path, self.root, **AS_POSTGRES)
        wait_until(self.accepts_connections, self.process, "PostgreSQL", self.log_path)
        self.client("createdb", PG_DATABASE, allow_existing=True)
        return self

    def accepts_connections(self) -> bool:
        probe = [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER]
        return subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode == 0

    def client(self, program: str, *args: str, allow_existing: bool = False) -> None:
        """Run one of PostgreSQL's client programs against this server."""
        argv = [postgres_bin(program), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0 and not (allow_existing and "already exists" in result.stderr):
            raise RuntimeError(f"{program} {' '.join(args)} failed: {result.stderr.strip()}")

    def stop(self) -> None:
        end(self.process, signal.SIGINT)  # SIGINT = PostgreSQL's "fast" shutdown


@dataclass
class Redis:
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> "Redis":
        """Start (or start again, on the same port, with empty memory: nothing is persisted)."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        self.process = spawn(argv, self.log_path, self.root)
        wait_until(lambda: self.ping() == "PONG", self.process, "Redis", self.log_path)
        return self

    def ping(self) -> str | None:
        try:
            return self.command("PING")
        except OSError:
            return None

    def command(self, *args: str):
        """One Redis command over RESP; returns a simple string, integer, bulk string or list of them."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return read_reply(sock.makefile("rb"))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        end(self.process, signal.SIGTERM)


def read_reply(stream):
    line = stream.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:].decode()
    if kind == b"+":
        return rest
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if rest == "-1" else stream.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return [read_reply(stream) for _ in range(max(int(rest), 0))]
    raise RuntimeError(f"Redis error: {rest}")


def start_postgres(root: Path, request) -> Postgres:
    server = Postgres(root)
    request.addfinalizer(server.stop)
    return server.start()


def start_redis(root: Path, request) -> Redis:
    server = Redis(root)
    request.addfinalizer(server.stop)
    return server.start()


# ---------------------------------------------------------------------------
# Open WebUI in production shape: PostgreSQL + Redis + two uvicorn workers.
# ---------------------------------------------------------------------------
WORKERS = 2
# Bound on sending until every worker has shown what a test needs (until_every_worker).
EVERY_WORKER_SECONDS = 60.0
# How long the workers a connection must avoid stay stopped while another accepts it: far below the 5 s
# after which uvicorn's supervisor takes an unanswered ping for a hung worker.
STEER_SECONDS = 1.0
# Function-state and group cache lifetime on these servers (API_KEY_GUARD_TEST_CACHE_SECONDS).
STATE_TTL_SECONDS = 0.5
# SQLAlchemy driver per release: what the release's own wheel brings (no extras installed).
DATABASE_DRIVERS = {
    "0.12.4": "postgresql+psycopg",  # psycopg 3 is a core dependency; psycopg2 only in the [postgres] extra
    "0.10.2": "postgresql+psycopg",
    "0.8.12": None,  # the wheel ships no PostgreSQL driver at all (psycopg2 only in [postgres]): SQLite
    "0.6.22": "postgresql",  # psycopg2-binary is a core dependency
}


@dataclass
class Topology:
    deployment: object  # conftest.Deployment
    redis: Redis
    postgres: Postgres | None


def start_topology(version: str, root: Path, request, start_deployment) -> Topology:
    """Redis, PostgreSQL where the release can reach it, then Open WebUI with two workers on them.

    Persistent config is on, as in production: the base models cache setting the installer turns on
    must survive a restart (with it off, 0.10+ keeps saved settings per worker and per process life)."""
    redis = start_redis(root / "redis", request)
    env = {
        "REDIS_URL": redis.url,
        "UVICORN_WORKERS": str(WORKERS),
        "ENABLE_PERSISTENT_CONFIG": "true",
        "API_KEY_GUARD_TEST_CACHE_SECONDS": str(STATE_TTL_SECONDS),
    }
    postgres = None
    if DATABASE_DRIVERS[version]:
        postgres = start_postgres(root / "postgres", request)
        env["DATABASE_URL"] = postgres.url.replace("postgresql", DATABASE_DRIVERS[version], 1)
    deployment = start_deployment(version, root, request, install_guard=False, **env)
    wait_until_every_worker_answers(deployment.server)  # install then speaks to workers that all serve
    deployment.configure()
    return Topology(deployment, redis, postgres)


def wait_until_every_worker_answers(server) -> None:
    """/health answers once the first worker is up; until every worker has served a connection, a worker
    may still be in its startup and would miss whatever reaches the others (install's model listings)."""
    served = until_every_worker(server, "", [("GET", "/health", None)], bool, READY_TIMEOUT)
    answered = per_worker(served)
    if server.process.poll() is not None:
        raise RuntimeError(f"Open WebUI {server.version} exited during startup; see {server.log_path}")
    if len(answered.keys() & uvicorn_workers(server.process.pid)) < server.workers:
        raise RuntimeError(
            f"not every worker of Open WebUI {server.version} answered within {READY_TIMEOUT:g} s "
            f"(answers per worker: {answered}); see {server.log_path}"
        )


@dataclass(frozen=True)
class Served:
    status: int
    headers: dict  # lower-case names
    body: bytes
    worker: int | None  # pid of the worker process that held the connection
    answered: float  # time.monotonic() once the answer was read

    def json(self):
        return json.loads(self.body or b"null")


def on_fresh_connection(
    server, method: str, path: str, token: str, body: dict | None = None, avoid: Collection[int] = ()
) -> Served:
    """One request on a new TCP connection (so the kernel hands it to any worker), and who served it.

    Workers in `avoid` are stopped (SIGSTOP) from before the connection is made until another worker has
    accepted it, STEER_SECONDS at most, and continued before the request is sent: the kernel can then only
    hand the connection to a worker not avoided, as long as one is accepting."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        with stopped(avoid):
            connection.connect()
            client_port = connection.sock.getsockname()[1]
            worker = accepting_worker(server, client_port, STEER_SECONDS) if avoid else None
        worker = worker or accepting_worker(server, client_port)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Served(response.status, headers, data, worker, time.monotonic())
    finally:
        connection.close()


def until_every_worker(
    server,
    token: str,
    requests: list[tuple],
    done: Callable[[list[Served]], bool],
    seconds: float = EVERY_WORKER_SECONDS,
    pause: float = 0.0,
) -> list[Served]:
    """Cycle through `requests` ((method, path, body)), each on a new connection, until `done(answers)`
    holds for the answers of each of the server's workers, or `seconds` have passed (the caller's
    assertion then shows what each worker answered).

    Which worker accepts a connection is the kernel's choice, and it tends to hand them all to the worker
    that answered last (or to the only one listening while another still starts). So each connection is
    steered: the workers already done are stopped while it is accepted, and a worker still to be done
    takes it. No count of requests is assumed: each worker gets as many as its `done` needs."""
    served: list[Served] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.process.poll() is None:
        workers = uvicorn_workers(server.process.pid)
        answers = per_worker(served)
        finished = {worker for worker in workers if done(answers.get(worker, []))}
        if len(workers) >= server.workers and finished == workers:
            break
        method, path, body = requests[len(served) % len(requests)]
        served.append(on_fresh_connection(server, method, path, token, body, avoid=finished))
        time.sleep(pause)
    return served


def per_worker(served: list[Served]) -> dict[int, list[Served]]:
    """The answers by worker (pid), in the order they came; answers of no known worker are left out."""
    answers: dict[int, list[Served]] = {}
    for s in served:
        if s.worker is not None:
            answers.setdefault(s.worker, []).append(s)
    return answers


def seconds_to_first(served: list[Served], condition: Callable[[Served], bool], since: float) -> dict[int, float]:
    """Per worker, how long after `since` its first answer came for which `condition` held."""
    firsts = {w: [s.answered for s in answers if condition(s)] for w, answers in per_worker(served).items()}
    return {w: round(min(times) - since, 2) for w, times in firsts.items() if times}


@contextmanager
def stopped(pids: Collection[int]):
    """The processes `pids` stopped (SIGSTOP, then seen stopped in every thread) for the block, and
    continued (SIGCONT) after it, also on failure. Kept short: uvicorn's supervisor restarts a worker that
    does not answer its ping within 5 s."""
    paused = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            paused.append(pid)
        deadline = time.monotonic() + STEER_SECONDS
        while not all(map(is_stopped, paused)) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 10)
        yield
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def is_stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (or the process gone): none of them can accept a connection."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*/stat"))
        return all(stat.read_text().rsplit(")", 1)[1].split()[0] in "TtZX" for stat in tasks)
    except OSError:
        return True


def model_calls(backend) -> int:
    """Backend calls that gave a model to a caller (POSTs; model listings, as at startup, are not)."""
    with backend.lock:
        return sum(n for call, n in backend.by_path.items() if call.startswith("POST "))


def accepting_worker(server, client_port: int, timeout: float = READY_TIMEOUT) -> int | None:
    """The worker that accepted our connection; asked before the request is sent, because a server may
    close the connection right after its answer (e.g. when it answers before reading the body)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = connection_owner(server.process.pid, server.port, client_port)
        if owner is not None:
            return owner
        time.sleep(POLL_SECONDS / 10)
    return None


def connection_owner(group: int, server_port: int, client_port: int) -> int | None:
    """The process of session `group` holding the server end of 127.0.0.1:client_port -> server_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if (local, remote) == (server_port, client_port) and fields[9] != "0":
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in group_members(group):
        try:
            if any(os.readlink(fd) == target for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:  # the process ended meanwhile
            continue
    return None


def group_members(group: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # after "pid (comm)": state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


def uvicorn_workers(group: int) -> set[int]:
    """The worker processes of a multi-worker uvicorn (children started by multiprocessing's spawn)."""
    workers = set()
    for pid in group_members(group):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in command:
            workers.add(pid)
    return workers
