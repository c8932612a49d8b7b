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

# A cluster forms, a sentinel set agrees, a failover settles: redis-py's own suite allows 20-30 s.
TOPOLOGY_TIMEOUT = 30.0

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


LOOPBACK = "127.0.0.1"


@dataclass
class Redis:
    root: Path
    port: int = field(default_factory=free_port)
    host: str = LOOPBACK
    options: tuple[str, ...] = ()  # more redis-server arguments (cluster mode, replicaof, sentinel)
    config: str = ""  # a config file (a sentinel rewrites its own): written once, kept across restarts
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> "Redis":
        """Start (or start again, on the same port, with empty memory: nothing is persisted)."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server"]
        if self.config:
            conf = self.root / "redis.conf"
            if not conf.exists():
                conf.write_text(self.config)
            argv.append(str(conf))
        argv += [
            "--bind", self.host, "--port", str(self.port), "--dir", str(self.root),
            "--save", "", "--appendonly", "no", "--daemonize", "no", *self.options,
        ]  # fmt: skip
        self.process = spawn(argv, self.log_path, self.root)
        wait_until(lambda: self.ping() == "PONG", self.process, f"Redis {self.address}", self.log_path)
        return self

    def ping(self) -> str | None:
        try:
            return self.command("PING")
        except OSError:
            return None

    def command(self, *args: str, timeout: float = 5):
        """One Redis command over RESP; returns a simple string, integer, bulk string or list of them."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(payload.encode())
            return read_reply(sock.makefile("rb"))

    def info(self, section: str) -> dict[str, str]:
        """INFO <section> as a dict (`role`, `master_link_status`, ...)."""
        return fields(self.command("INFO", section))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stall(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)

    def crash(self) -> None:
        """kill -9: no goodbye to clients or to the other nodes."""
        self.resume()
        end(self.process, signal.SIGKILL)

    def stop(self) -> None:
        self.resume()  # a stopped process would sit on its SIGTERM until the harness gives up
        end(self.process, signal.SIGTERM)

    def openwebui_env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url}

    def wait_healthy(self) -> None:
        ready_when(lambda: self.ping() == "PONG", f"Redis {self.address} answering")


def fields(text: str) -> dict[str, str]:
    """`key:value` lines (INFO, CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def answers(node: Redis, *args: str):
    """A node's reply, or None when it is down or stalled (asked with a short timeout)."""
    try:
        return node.command(*args, timeout=1)
    except (OSError, RuntimeError):
        return None


def ready_when(condition: Callable[[], bool], what: str, timeout: float = TOPOLOGY_TIMEOUT) -> None:
    """Poll `condition` (a topology of several processes: no single one to watch for an early exit)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not reached within {timeout:g} s")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------
# Redis Cluster: 3 masters and 3 replicas on 127.0.0.1. Each node has its own directory and an
# explicit bus port (the default, port + 10000, is refused above 55535, which a free port can be).
# ---------------------------------------------------------------------------
CLUSTER_MASTERS = 3
CLUSTER_NODE_TIMEOUT_MS = 1000  # a master silent this long is failed over (seconds, not the 15 s default)


@dataclass
class Cluster:
    root: Path
    nodes: list[Redis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def openwebui_env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_CLUSTER": "true"}

    def start(self) -> "Cluster":
        taken: set[int] = set()
        for index in range(2 * CLUSTER_MASTERS):
            port = free_port(avoid=taken)
            bus = free_port(avoid=taken | {port})
            taken |= {port, bus}
            options = (
                "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS), "--repl-diskless-sync-delay", "0",
                "--enable-debug-command", "local",
            )  # fmt: skip
            self.nodes.append(Redis(self.root / f"node{index}", port, options=options).start())
        create = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
        create += ["--cluster-replicas", "1", "--cluster-yes"]
        with open(self.root / "create.log", "ab") as log:
            subprocess.run(create, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)
        self.wait_healthy()
        return self

    def healthy(self) -> bool:
        """Every node up and `cluster_state:ok`, 3 masters with a replica each, every replica in sync."""
        if not all(n.running and (fields(answers(n, "CLUSTER", "INFO") or "").get("cluster_state") == "ok")
                   for n in self.nodes):  # fmt: skip
            return False
        roles = [answers(n, "INFO", "replication") for n in self.nodes]
        infos = [fields(r) if r else {} for r in roles]
        masters = [i for i in infos if i.get("role") == "master" and i.get("connected_slaves") == "1"]
        replicas = [i for i in infos if i.get("role") == "slave" and i.get("master_link_status") == "up"]
        return (len(masters), len(replicas)) == (CLUSTER_MASTERS, CLUSTER_MASTERS)

    def wait_healthy(self) -> None:
        ready_when(self.healthy, f"Redis Cluster in {self.root} healthy (3 masters, 3 replicas in sync)")

    def node(self, address: str) -> Redis:
        return next(n for n in self.nodes if n.address == address)

    def topology(self) -> dict[str, list[tuple[int, int]] | str]:
        """From a live node's CLUSTER NODES: master address -> its slot ranges, replica address -> its master's."""
        text = next(filter(None, (answers(n, "CLUSTER", "NODES") for n in self.nodes)))
        rows = [line.split() for line in text.splitlines()]
        ids = {row[0]: row[1].split("@")[0] for row in rows}
        seen: dict[str, list[tuple[int, int]] | str] = {}
        for row in rows:
            address, flags = ids[row[0]], row[2].split(",")
            if "fail" in flags:
                continue
            if "master" in flags:
                ranges = [tuple(int(x) for x in (part.split("-") * 2)[:2]) for part in row[8:] if "[" not in part]
                seen[address] = ranges
            elif row[3] in ids:
                seen[address] = ids[row[3]]
        return seen

    def master_of(self, slot: int) -> Redis:
        for address, ranges in self.topology().items():
            if isinstance(ranges, list) and any(low <= slot <= high for low, high in ranges):
                return self.node(address)
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: Redis) -> Redis:
        return next(self.node(a) for a, m in self.topology().items() if m == master.address)

    def failover(self, replica: Redis, *how: str) -> None:
        """CLUSTER FAILOVER on `replica` (planned: it waits for its master to hand over; FORCE does not)."""
        assert replica.command("CLUSTER", "FAILOVER", *how) == "OK"
        promoted = f"{replica.address} promoted by CLUSTER FAILOVER {' '.join(how)}"
        ready_when(lambda: self.serves(replica) and self.healthy(), promoted)

    def serves(self, node: Redis) -> bool:
        """Whether the live nodes' view has `node` as a master with slots."""
        ranges = self.topology().get(node.address)
        return isinstance(ranges, list) and bool(ranges)

    def slot(self, key: str) -> int:
        return next(filter(lambda r: r is not None, (answers(n, "CLUSTER", "KEYSLOT", key) for n in self.nodes)))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(root: Path, request) -> Cluster:
    cluster = Cluster(root)
    request.addfinalizer(cluster.stop)
    return cluster.start()


# ---------------------------------------------------------------------------
# Redis Sentinel: a master and a replica on 127.0.0.1, three sentinels on 127.0.0.2-.4 sharing one
# port (Open WebUI has one REDIS_SENTINEL_PORT for all hosts). Each sentinel announces its own
# address; without that all three would announce 127.0.0.1 and take each other for themselves.
# ---------------------------------------------------------------------------
SENTINEL_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SENTINEL_SERVICE = "mymaster"  # lower case: up to 0.10.2 Open WebUI lower-cases the name it reads
SENTINEL_QUORUM = 2
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_CONFIG = """port {port}
bind {host}
sentinel announce-ip {host}
sentinel monitor {service} 127.0.0.1 {master} {quorum}
sentinel down-after-milliseconds {service} {down_after}
sentinel failover-timeout {service} 5000
sentinel parallel-syncs {service} 1
"""
REPLICA_OPTIONS = ("--repl-diskless-sync-delay", "0")  # the 5 s default left a new replica empty for seconds


@dataclass
class Sentinels:
    root: Path
    data: list[Redis] = field(default_factory=list)  # the master first, then the replica (until a failover)
    sentinels: list[Redis] = field(default_factory=list)

    def openwebui_env(self) -> dict[str, str]:
        return {
            "REDIS_URL": f"redis://{SENTINEL_SERVICE}:6379/0",
            "REDIS_SENTINEL_HOSTS": ",".join(SENTINEL_HOSTS),
            "REDIS_SENTINEL_PORT": str(self.sentinels[0].port),
        }

    def start(self) -> "Sentinels":
        master = Redis(self.root / "data0", options=REPLICA_OPTIONS).start()
        replica_options = (*REPLICA_OPTIONS, "--replicaof", LOOPBACK, str(master.port))
        self.data = [master, Redis(self.root / "data1", free_port(avoid={master.port}), options=replica_options)]
        self.data[1].start()
        port = free_port(*SENTINEL_HOSTS, avoid=frozenset(n.port for n in self.data))
        for index, host in enumerate(SENTINEL_HOSTS):
            config = SENTINEL_CONFIG.format(
                port=port, host=host, service=SENTINEL_SERVICE, master=master.port, quorum=SENTINEL_QUORUM,
                down_after=SENTINEL_DOWN_AFTER_MS,
            )  # fmt: skip
            sentinel = Redis(self.root / f"sentinel{index}", port, host, ("--sentinel",), config)
            self.sentinels.append(sentinel.start())
        self.wait_healthy()
        return self

    def master_address(self) -> str | None:
        """The master as the first answering sentinel names it."""
        return next(filter(None, map(named_master, self.sentinels)), None)

    def master(self) -> Redis:
        """The node the sentinels name as master; waited for while none is named (a sentinel that does not
        answer within its 1 s timeout on a loaded machine, a switch in progress)."""
        named: list[Redis] = []
        ready_when(lambda: named.extend(self.named_node(self.master_address())) or named, "a master named")
        return named[0]

    def named_node(self, address: str | None) -> list[Redis]:
        return [n for n in self.data if n.address == address]

    def replica(self) -> Redis:
        master = self.master()
        return next(n for n in self.data if n is not master)

    def healthy(self) -> bool:
        """All sentinels agree on a master that has its replica in sync, and each sees the quorum."""
        named = set(map(named_master, self.sentinels))
        if len(named) != 1 or None in named or not all(n.running for n in self.data):
            return False
        masters = self.named_node(named.pop())  # asked once: a second question may get another answer
        if not masters:
            return False
        master, replica = masters[0], next(n for n in self.data if n is not masters[0])
        quorum = [answers(s, "SENTINEL", "CKQUORUM", SENTINEL_SERVICE) or "" for s in self.sentinels]
        replicas = [answers(s, "SENTINEL", "REPLICAS", SENTINEL_SERVICE) or [] for s in self.sentinels]
        in_sync = [sum("s_down" not in dict(zip(r[::2], r[1::2], strict=True)).get("flags", "") for r in rs)
                   for rs in replicas]  # fmt: skip
        return (
            (fields(answers(master, "INFO", "replication") or "").get("role"), replica_link(replica))
            == ("master", "up")
            and all(q.startswith("OK 3 usable") for q in quorum)
            and in_sync == [1] * len(self.sentinels)
        )

    def failover(self) -> None:
        """SENTINEL FAILOVER (planned): the replica is promoted without waiting for agreement."""
        before = self.master_address()
        assert self.sentinels[0].command("SENTINEL", "FAILOVER", SENTINEL_SERVICE) == "OK"
        ready_when(lambda: self.master_address() not in (before, None) and self.healthy(), "SENTINEL FAILOVER done")

    def rejoin(self, node: Redis) -> None:
        """Bring a crashed or stale old master back as the master's replica, as Sentinel itself would about
        8 s after it notices (its +convert-to-slave waits for 4 publish periods), then wait until healthy."""
        master = self.master()
        node.options = (*REPLICA_OPTIONS, "--replicaof", master.host, str(master.port))
        if node.running:
            assert node.command("REPLICAOF", master.host, str(master.port)).startswith("OK")  # or "OK Already ..."
        else:
            node.start()
        self.wait_healthy()

    def wait_healthy(self) -> None:
        ready_when(self.healthy, f"Redis Sentinel in {self.root} healthy (one master, its replica, 3 sentinels)")

    def stop(self) -> None:
        for node in self.sentinels + self.data:
            node.stop()


def named_master(sentinel: Redis) -> str | None:
    reply = answers(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE)
    return f"{reply[0]}:{reply[1]}" if reply else None


def replica_link(node: Redis) -> str | None:
    info = fields(answers(node, "INFO", "replication") or "")
    return info.get("master_link_status") if info.get("role") == "slave" else None


def start_sentinels(root: Path, request) -> Sentinels:
    sentinels = Sentinels(root)
    request.addfinalizer(sentinels.stop)
    return sentinels.start()


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


# Open WebUI's Redis settings; a restart onto another Redis setup replaces all of them.
REDIS_SETTINGS = ("REDIS_URL", "REDIS_CLUSTER", "REDIS_SENTINEL_HOSTS", "REDIS_SENTINEL_PORT")


@dataclass
class Topology:
    deployment: object  # conftest.Deployment
    redis: "Redis | Cluster | Sentinels"  # anything with openwebui_env()
    postgres: Postgres | None


def start_topology(
    version: str,
    root: Path,
    request,
    start_deployment,
    store=None,
    postgres: bool = True,
    valves: dict | None = None,
    **extra_env,
) -> Topology:
    """Redis (or `store`: a Cluster, Sentinels), PostgreSQL where the release can reach it (unless not
    `postgres`: SQLite), then Open WebUI with two workers on them, the guard installed with `valves`.

    Persistent config is on, as in production: the base models cache setting the installer turns on
    must survive a restart (with it off, 0.10+ keeps saved settings per worker and per process life)."""
    redis = store or start_redis(root / "redis", request)
    env = {
        **redis.openwebui_env(),
        "UVICORN_WORKERS": str(WORKERS),
        "ENABLE_PERSISTENT_CONFIG": "true",
        "API_KEY_GUARD_TEST_CACHE_SECONDS": str(STATE_TTL_SECONDS),
        **extra_env,
    }
    database = None
    if postgres and DATABASE_DRIVERS[version]:
        database = start_postgres(root / "postgres", request)
        env["DATABASE_URL"] = database.url.replace("postgresql", DATABASE_DRIVERS[version], 1)
    deployment = start_deployment(version, root, request, install_guard=False, **env)
    wait_until_every_worker_answers(deployment.server)  # install then speaks to workers that all serve
    deployment.configure(**(valves or {}))
    return Topology(deployment, redis, database)


def restart_on(topology: Topology, store) -> None:
    """Restart Open WebUI on another Redis setup; its database (users, keys, valves, settings) stays."""
    server = topology.deployment.server
    for name in REDIS_SETTINGS:
        server.extra_env.pop(name, None)
    server.extra_env.update(store.openwebui_env())
    server.restart()
    wait_until_every_worker_answers(server)
    topology.redis = store


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
    sent: float = 0.0  # time.monotonic() when the request was sent (after the connection was accepted)

    @property
    def seconds(self) -> float:
        """How long the server took to answer, from the request sent to the answer read."""
        return self.answered - self.sent

    def json(self):
        return json.loads(self.body or b"null")


def steered_connection(server, avoid: Collection[int] = ()) -> tuple[http.client.HTTPConnection, int | None]:
    """A new connection to `server` accepted by a worker not in `avoid` (as on_fresh_connection explains),
    and that worker."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        with stopped(avoid):
            connection.connect()
            client_port = connection.sock.getsockname()[1]
            worker = accepting_worker(server, client_port, STEER_SECONDS) if avoid else None
        return connection, worker or accepting_worker(server, client_port)
    except BaseException:
        connection.close()
        raise


def on_fresh_connection(
    server, method: str, path: str, token: str, body: dict | None = None, avoid: Collection[int] = ()
) -> Served:
    """One request on a new TCP connection (so the kernel hands it to any worker), and who served it.

    Workers in `avoid` are stopped (SIGSTOP) from before the connection is made until another worker has
    accepted it, STEER_SECONDS at most, and continued before the request is sent: the kernel can then only
    hand the connection to a worker not avoided, as long as one is accepting."""
    connection, worker = steered_connection(server, avoid)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        sent = time.monotonic()
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Served(response.status, headers, data, worker, time.monotonic(), sent)
    finally:
        connection.close()


@dataclass
class HeldStream:
    """A stream the backend holds after its first chunk (backend.HOLD): a request in flight on `worker`."""

    connection: http.client.HTTPConnection
    response: http.client.HTTPResponse
    worker: int | None
    first_chunk: bytes

    def finish(self) -> bytes:
        """The rest of the answer, once the test opened the backend's gate."""
        try:
            return self.response.read()
        finally:
            self.connection.close()


def held_stream(server, path: str, token: str, body: dict, avoid: Collection[int] = ()) -> HeldStream:
    """POST a HOLD stream `body` on a new connection, steered away from `avoid` (as on_fresh_connection), and
    read its first chunk: the backend holds the rest until the test opens the gate."""
    connection, worker = steered_connection(server, avoid)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection.request("POST", path, body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    return HeldStream(connection, response, worker, response.read1(65536))


def until_every_worker(
    server,
    token: str,
    requests: list[tuple],
    done: Callable[[list[Served]], bool],
    seconds: float = EVERY_WORKER_SECONDS,
    pause: float = 0.0,
) -> list[Served]:
    """Cycle through `requests` ((method, path, body), or (method, path, body, token) to send one with
    another token than `token`), each on a new connection, until `done(answers)`
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
        method, path, body, *other = requests[len(served) % len(requests)]
        served.append(on_fresh_connection(server, method, path, other[0] if other else token, body, avoid=finished))
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
