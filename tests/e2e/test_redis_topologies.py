"""Shared counters on Redis Cluster and Redis Sentinel, two workers of real Open WebUI (issue 21).

The threats: admins who outgrow one Redis run Sentinel or Cluster, and that is where counters go wrong.
Scripts are not replicated (a promoted replica answers NOSCRIPT), a demoted master answers READONLY, a
cluster node redirects (MOVED), a stalled node hangs a client without timeouts, and a misconfiguration
that half-works looks like a passing hiccup while every worker counts on its own, forever.

Which release gets what, and why:
- Every pinned release's core supports both modes (open_webui/utils/redis.py get_redis_connection:
  Sentinel when REDIS_SENTINEL_HOSTS is set, else Cluster with REDIS_CLUSTER=true; main.py passes both),
  so exact N then 429 runs on Cluster and on Sentinel on all four.
- The token quota and the concurrency cap of issue 20 (the same counters' keys, hash-tagged by user) run
  on both stores on all four too, on the same servers: group tiers set in the valves they start with.
- Failover while keys arrive (planned and kill -9): on all four, both stores: the sync path (0.6.22,
  0.8.12: redis-py RedisCluster and Sentinel, checks in a threadpool) and the asyncio path (0.10.2 with a
  master lookup per command, 0.12.4 with the Sentinel master cached by core's proxy).
- A stalled node through HTTP: 0.10.2 and 0.12.4. On 0.6/0.8 core itself reads every setting from Redis
  on each access with its own client (5 s timeout on 0.6.22, none on 0.8.12), so a stalled node holds
  requests in core before the guard runs. The guard's own client is proven bounded on every release by
  redis_probe.py, run by the release's venv against the same stalled nodes.
- Misconfigurations named by `install.py status`: 0.12.4. 0.6/0.8 answer 500 to every request when core
  cannot use REDIS_URL as configured (their settings live in Redis); 0.10.2 checks every session token's
  revocation in Redis and answers 500 on MOVED before any guard (seen: the harness could not set up).
  Detection itself is unit-tested with sync and asyncio redis-py (tests/test_rate_limit.py)."""

import itertools
import json
import os
import select
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.guard_loader import load_guard

from .backend import CHAT_USAGE, HOLD
from .conftest import start_deployment, wait_for
from .provision import VERSIONS, venv_dir
from .redis_probe import READY
from .routes import CHAT_BODY
from .server import version_tuple
from .services import (
    WORKERS,
    Cluster,
    Redis,
    Sentinels,
    answers,
    held_stream,
    model_calls,
    on_fresh_connection,
    ready_when,
    restart_on,
    start_cluster,
    start_sentinels,
    start_topology,
    until_every_worker,
)
from .test_rate_limits import (
    CORE_READS_SETTINGS_FROM_REDIS_UNTIL,
    ROUTE,
    burst,
    log_lines,
    log_size,
    new_account,
    outcome,
    refused_by_every_worker,
)
from .test_tiers import add_members

GUARD = load_guard()
LIMIT = 10
# Issue 20's counters on the same stores: a token quota and a concurrency cap for the members of two groups
# (each test puts its new users in one), so the request-limit rows above see the role's tier unchanged.
TOKENS = CHAT_USAGE["total_tokens"]  # 18 per chat answer of the counting backend
QUOTA = 30  # tokens per day: admits a first (0 used) and a second answer (18 used), refuses at 36
DAY = 86400
QUOTA_GROUP, SINGLE_GROUP = "topology-quota", "topology-single"
TIERS = {f"group:{QUOTA_GROUP}": {"token_quota": f"{QUOTA}/day"}, f"group:{SINGLE_GROUP}": {"max_concurrent": 1}}
LIMITS = {
    "api_key_roles": "admin,user",
    "api_key_allowed_endpoints_user": ROUTE,
    "api_key_rate_limit_user": f"{LIMIT}/minute",
    "api_key_rate_limit_admin": "",  # status uses the admin's key: never limited here
    "api_key_tiers": json.dumps(TIERS),
}
WINDOW_SECONDS = 60
# Counting is back in Redis within: promotion (node timeout / down-after 1 s plus the election, 2-3 s
# measured), one retry interval of the guard, and slack for a loaded 2-core machine.
RECOVERY_SECONDS = 3.0 + GUARD.REDIS_RETRY_SECONDS + 5.0
FAILOVER_TRAFFIC_SECONDS = 45.0  # bound on a failover row's traffic: well inside the one-minute window
STALL_SECONDS = 4.0
# A key request while a node is stalled: the guard's timeout, plus a generous slack for Open WebUI's own
# work on a loaded 2-core machine. A client without timeouts is held the whole stall.
STALL_BOUND_SECONDS = GUARD.REDIS_TIMEOUT_SECONDS + 2.5
PROBE_STALL_SECONDS = 2.5
PROBE_BOUND_SECONDS = GUARD.REDIS_TIMEOUT_SECONDS + 0.5  # no server in between: only the check is timed
PROBE_READY_SECONDS = 60.0
PROBE_ANSWER_SECONDS = 10.0
PROBE_PAUSE_SECONDS = 0.005  # four probes share two cores with the stores: no busy loop
ASYNC_LOOKUP_FROM = (0, 9, 0)  # the key lookup, and so the guard's limiter, is async from 0.9: asyncio client
GUARD_FILE = Path(__file__).resolve().parents[2] / "filters" / "api_key_guard.py"
PROBE = Path(__file__).resolve().parent / "redis_probe.py"
ACL_USER, ACL_PASSWORD = "guard", "right-password"
DEGRADED = "api_key_guard rate-limit counters degraded (cause="
ACCOUNT_SERIAL = itertools.count()  # one server serves several stages: every account name is new


def prefix(version: str) -> str:
    """REDIS_KEY_PREFIX per release: the releases share the stores, and 0.6/0.8 keep their settings there."""
    return f"owui-{version}"


# ---------------------------------------------------------------------------
# The stores (one Cluster, one Sentinel setup for the whole file) and a server per release on them
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Cluster:
    return start_cluster(tmp_path_factory.mktemp("cluster"), request)


@pytest.fixture(scope="module")
def sentinels(request, tmp_path_factory) -> Sentinels:
    return start_sentinels(tmp_path_factory.mktemp("sentinel"), request)


@pytest.fixture(scope="module")
def one_server(request, tmp_path_factory) -> Redis:
    server = Redis(tmp_path_factory.mktemp("one-server"))
    request.addfinalizer(server.stop)
    return server.start()


@dataclass
class Releases:
    """One server per release, started on the store of its first stage and stopped when the next release
    starts (idle servers of three processes each would share the 2-core machine for nothing); the stages
    are ordered release by release, so each release starts once and restarts once per further store."""

    request: object
    root: Path
    started: dict = field(default_factory=dict)

    def on(self, version: str, store) -> object:
        for other, topology in self.started.items():
            if other != version:
                topology.deployment.server.stop()
        topology = self.started.get(version)
        if topology is None:
            self.started[version] = topology = self.start(version, store)
        elif topology.redis is not store or topology.deployment.server.process.poll() is not None:
            restart_on(topology, store)
            # 0.6/0.8 read their settings from Redis first: on a Redis that never held them they fall back to
            # defaults (seen: user key permission off). Grant it again; arm what the cache setting no longer does.
            topology.deployment.people.grant_key_permission()
            arm_every_worker(topology.deployment)
        return topology

    def start(self, version: str, store):
        root, env = self.root / f"owui-{version}", {"REDIS_KEY_PREFIX": prefix(version)}
        # SQLite: the database is not what this file proves, and PostgreSQL would cost a start per release
        topology = start_topology(
            version, root, self.request, start_deployment, store, postgres=False, valves=LIMITS, **env
        )
        arm_every_worker(topology.deployment)
        return topology


def judged(served) -> bool:
    return "x-api-key-guard" in served.headers


def arm_every_worker(deployment) -> None:
    """Right after install or a restart a worker may not have loaded the guard yet (the kernel picked the
    worker for install's listings): list models with the admin's key, steered to each worker, until every
    worker answered as the guard (a listing loads it where it is missing)."""
    admin, listing = deployment.people.admin.api_key, [("GET", "/api/models", None)]
    served = until_every_worker(deployment.server, admin, listing, lambda answers: any(map(judged, answers)))
    assert len({s.worker for s in served if judged(s)}) >= WORKERS, f"not every worker armed: {len(served)} listings"


@pytest.fixture(scope="module")
def releases(request, tmp_path_factory) -> Releases:
    return Releases(request, tmp_path_factory.mktemp("releases"))


@pytest.fixture(scope="module")
def stage(request, releases, cluster, sentinels, misdirected):
    """`<release>/<store>`: the release's server on that store, the store healthy."""
    version, kind = request.param.split("/")
    store = {"cluster": cluster, "sentinel": sentinels, "misconfigured": misdirected}[kind]
    store.wait_healthy()
    return releases.on(version, store)


# The stages, release by release. Every test lists all of them in this one order, skipping those it does
# not run on (pytest groups tests by a parameter's index, not its value): one server start per release.
STAGES = (
    "0.12.4/misconfigured",
    "0.12.4/sentinel",
    "0.12.4/cluster",
    "0.10.2/sentinel",
    "0.10.2/cluster",
    "0.8.12/sentinel",
    "0.8.12/cluster",
    "0.6.22/sentinel",
    "0.6.22/cluster",
)


def stages(chosen: tuple[str, ...], reason: str) -> list:
    skip = pytest.mark.skip(reason=reason)
    return [pytest.param(s, id=f"owui-{s.replace('/', '-')}", marks=() if s in chosen else skip) for s in STAGES]


def version_of(topology) -> str:
    return topology.deployment.server.version


def counters_key(topology, user_id: str) -> str:
    return f"{prefix(version_of(topology))}:api_key_guard:rl:{{{user_id}}}:{WINDOW_SECONDS}"


def master_of(topology, user_id: str) -> Redis:
    """The node that holds the user's counters."""
    store = topology.redis
    if isinstance(store, Cluster):
        return store.master_of(store.slot(counters_key(topology, user_id)))
    return store.master()


def accounts_on(topology, name: str, count: int, apart: bool) -> list:
    """`count` new key holders; `apart`: each one's counters on a different master (Cluster)."""
    found, masters = [], set()
    for _ in range(count * 8):  # a user id lands on a given one of 3 masters with p = 1/3: 8 tries per user
        account = new_account(topology.deployment, f"{name}-{next(ACCOUNT_SERIAL)}")
        master = master_of(topology, account.id).address
        if not apart or master not in masters:
            found.append(account)
            masters.add(master)
        if len(found) == count:
            return found
    raise AssertionError(f"no {count} users on different masters among {count * 8}")


def counters(served) -> str:
    """Where the worker that answered counted the request: redis, per-worker, or `degraded; cause=...`."""
    return served.headers.get("x-api-key-guard-counters") or ""


def degraded(served) -> bool:
    return counters(served).startswith("degraded")


def headers_of(served: list) -> list:
    return sorted({counters(s) for s in served})


def report(capsys, line: str) -> None:
    """A measured figure, printed in the test output as it happens (overshoot, recovery, bounds)."""
    with capsys.disabled():
        print(f"\n[redis topologies] {line}")


# ---------------------------------------------------------------------------
# Exact limits: N answers then 429, for two users whose counters live on different masters
# ---------------------------------------------------------------------------
EVERY_STORE = stages(
    tuple(s for s in STAGES if not s.endswith("/misconfigured")),
    "a misconfigured Redis: see test_a_misconfiguration_is_named_by_status",
)


@pytest.mark.parametrize("stage", EVERY_STORE, indirect=True)
def test_two_users_each_get_exactly_their_limit_then_429_across_workers(stage):
    store = stage
    users = accounts_on(store, "exact", 2, apart=isinstance(store.redis, Cluster))
    served = [burst(store.deployment, user.api_key) for user in users]
    assert {
        "answers, other statuses": [outcome(s) for s in served],
        "refused by every worker": [refused_by_every_worker(s) for s in served],
        "counters": sorted({h for s in served for h in headers_of(s)}),
        "entries in Redis": [master_of(store, u.id).command("ZCARD", counters_key(store, u.id)) for u in users],
        "masters holding them": len({master_of(store, u.id).address for u in users}),
    } == {
        "answers, other statuses": [(LIMIT, [429])] * 2,
        "refused by every worker": [True, True],
        "counters": ["redis"],
        "entries in Redis": [LIMIT, LIMIT],
        "masters holding them": 2 if isinstance(store.redis, Cluster) else 1,
    }


# ---------------------------------------------------------------------------
# Exact token quotas and concurrency caps (issue 20) on the same stores: across workers, on each master
# ---------------------------------------------------------------------------
GROUP_IDS = {}  # (release, group name) -> id: its database, and so the group, stays across the restarts


def in_group(topology, name: str, accounts: list) -> list:
    """`accounts` made members of the group `name`, created on the first test of the release that needs it."""
    deployment = topology.deployment
    group_id = GROUP_IDS.get((version_of(topology), name))
    if group_id is None:
        body = {"name": name, "description": "issue 21: tiers on Cluster and Sentinel"}
        group = deployment.server.ok("POST", "/api/v1/groups/create", deployment.people.admin.jwt, json=body)
        group_id = GROUP_IDS[(version_of(topology), name)] = group["id"]
    add_members(deployment, group_id, [a.id for a in accounts])
    return accounts


def quota_key(topology, user_id: str, now: float) -> str:
    return f"{prefix(version_of(topology))}:api_key_guard:tq:{{{user_id}}}:day:{int(now // DAY * DAY)}"


def lease_key(topology, user_id: str) -> str:
    return f"{prefix(version_of(topology))}:api_key_guard:cc:{{{user_id}}}"


def charged(topology, account) -> int:
    """Tokens charged today, read on the master that holds them (the hash tag places every key of a user)."""
    return int(master_of(topology, account.id).command("GET", quota_key(topology, account.id, time.time())) or 0)


def spend(topology, account, avoid=()) -> tuple:
    """One chat answer on a worker not avoided, and the tokens charged once its answer ended."""
    before = charged(topology, account)
    served = on_fresh_connection(topology.deployment.server, "POST", ROUTE, account.api_key, CHAT_BODY, avoid=avoid)
    if served.status == 200:  # charged when the answer has ended: after the client read it, so wait
        wait_for(lambda: charged(topology, account) > before, f"tokens of {account.email} charged in Redis")
    return served, charged(topology, account)


def limited(answers: list) -> bool:
    return any(s.status == 429 for s in answers)


@pytest.mark.parametrize("stage", EVERY_STORE, indirect=True)
def test_two_users_each_get_exactly_their_token_quota_then_429_across_workers(stage):
    """30/day, 18 tokens an answer: 18 on one worker, 36 on the other, then 429 from every worker."""
    store = stage
    backend, calls = store.deployment.backend, model_calls(store.deployment.backend)
    users = in_group(store, QUOTA_GROUP, accounts_on(store, "quota", 2, apart=isinstance(store.redis, Cluster)))
    runs = []
    for user in users:
        first, after_first = spend(store, user)
        second, after_second = spend(store, user, avoid={first.worker})  # the other worker
        then = until_every_worker(store.deployment.server, user.api_key, [("POST", ROUTE, CHAT_BODY)], limited)
        runs.append((first, after_first, second, after_second, then))
    assert {
        "admitted, tokens used after each": [(f.status, used_f, s.status, used_s) for f, used_f, s, used_s, _ in runs],
        "admitted by both workers": [f.worker != s.worker for f, _, s, _, _ in runs],
        "then": [sorted({s.status for s in then}) for *_, then in runs],
        "refused by every worker": [refused_by_every_worker(then) for *_, then in runs],
        "refused for the quota": {'"tokens-day";r=0' in s.headers.get("ratelimit", "") for *_, t in runs for s in t},
        "counters": sorted({h for f, _, s, _, t in runs for h in headers_of([f, s, *t])}),
        "model calls": model_calls(backend) - calls,
        "tokens in Redis": [charged(store, u) for u in users],
        "masters holding them": len({master_of(store, u.id).address for u in users}),
    } == {
        "admitted, tokens used after each": [(200, TOKENS, 200, 2 * TOKENS)] * 2,
        "admitted by both workers": [True, True],
        "then": [[429]] * 2,
        "refused by every worker": [True, True],
        "refused for the quota": {True},
        "counters": ["redis"],
        "model calls": 4,
        "tokens in Redis": [2 * TOKENS] * 2,  # the second answer was admitted with 18 of 30 used: 6 over
        "masters holding them": 2 if isinstance(store.redis, Cluster) else 1,
    }


HELD = {**CHAT_BODY, "messages": [{"role": "user", "content": HOLD}], "stream": True}


@pytest.mark.parametrize("stage", EVERY_STORE, indirect=True)
def test_a_concurrency_cap_of_1_refuses_a_second_stream_on_the_other_worker_until_the_first_ends(stage):
    store = stage
    server, backend = store.deployment.server, store.deployment.backend
    user = in_group(store, SINGLE_GROUP, accounts_on(store, "single", 1, apart=False))[0]
    leases = lambda: master_of(store, user.id).command("ZCARD", lease_key(store, user.id))  # noqa: E731
    gate = backend.hold()
    try:
        first = held_stream(server, ROUTE, user.api_key, HELD)
        in_flight, calls = leases(), model_calls(backend)
        second = on_fresh_connection(server, "POST", ROUTE, user.api_key, HELD, avoid={first.worker})
        second_calls = model_calls(backend) - calls
    finally:
        gate.set()
    rest = first.finish()
    given_back = wait_for(lambda: leases() == 0, "the lease given back once the first stream ended")
    again = on_fresh_connection(server, "POST", ROUTE, user.api_key, CHAT_BODY, avoid={first.worker})
    assert {
        "first": (first.response.status, b"data:" in first.first_chunk, b"[DONE]" in rest),
        "leases while it streamed": in_flight,
        "second": (second.status, second.worker != first.worker, second_calls),
        "second refused for the cap": '"concurrent";r=0' in second.headers.get("ratelimit", "").split(", "),
        "counters": headers_of([second, again]),
        "leases after": given_back,
        "then on the other worker": (again.status, again.worker != first.worker),
    } == {
        "first": (200, True, True),
        "leases while it streamed": 1,
        "second": (429, True, 0),
        "second refused for the cap": True,
        "counters": ["redis"],
        "leases after": True,
        "then on the other worker": (200, True),
    }


# ---------------------------------------------------------------------------
# Failover while keys keep arriving
# ---------------------------------------------------------------------------
@dataclass
class Traffic:
    """Waves of key requests, one to each worker (new connections, steered), recorded with the time of
    their answer."""

    deployment: object
    token: str
    started: float = field(default_factory=time.monotonic)
    served: list = field(default_factory=list)  # (seconds since started, Served)

    def wave(self) -> None:
        answers = until_every_worker(self.deployment.server, self.token, [("POST", ROUTE, CHAT_BODY)], bool)
        self.served += [(s.answered - self.started, s) for s in answers]

    def recovered(self, switched: float, settled: float) -> bool:
        """Every worker degraded since the switch answered from Redis since, and every worker refused from
        Redis once the store settled (not before: an old master may refuse from counts it takes with it)."""
        after = [s for t, s in self.served if t >= switched]
        back = {s.worker for s in after if counters(s) == "redis"}
        refused = {s.worker for t, s in self.served if t >= settled and s.status == 429 and counters(s) == "redis"}
        return {s.worker for s in after if degraded(s)} <= back and len(refused) >= WORKERS

    def recovery_seconds(self, since: float) -> float:
        """From `since` until the last worker that answered degraded first answered from Redis after that."""
        answers = [(t, s) for t, s in self.served if t >= since]
        last = {s.worker: t for t, s in answers if degraded(s)}
        back = [
            min(t for t, s in answers if s.worker == w and t > d and counters(s) == "redis") for w, d in last.items()
        ]
        return max(back, default=since) - since


def fault(topology, master: Redis, how: str) -> threading.Thread:
    """Start the fault in the background; the thread ends once the store has a master for the user again."""
    store = topology.redis

    def run():
        if how == "planned":
            store.failover(store.replica_of(master)) if isinstance(store, Cluster) else store.failover()
            return
        replica = store.replica_of(master) if isinstance(store, Cluster) else store.replica()
        master.crash()
        promoted = store.serves if isinstance(store, Cluster) else lambda node: store.master_address() == node.address
        ready_when(lambda: promoted(replica), f"{replica.address} promoted after kill -9 of {master.address}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def heal(topology, master: Redis) -> None:
    """The old master back as a replica, the store healthy for the next test."""
    store = topology.redis
    if isinstance(store, Sentinels):
        store.rejoin(master)
        return
    if not master.running:
        master.start()  # its nodes.conf makes it rejoin as the replica of its promoted one
    store.wait_healthy()


# What a switch may cost, as requests admitted beyond the limit: none for a coordinated Cluster failover;
# otherwise at most one limit per worker (each counts in process while degraded) plus one limit the old
# master took with it (a Sentinel master keeps taking writes until Sentinel turns it into a replica).
OVERSHOOT_BOUND = (WORKERS + 1) * LIMIT


def overshoot_bound(store, how: str) -> int:
    return 0 if (how, isinstance(store, Cluster)) == ("planned", True) else OVERSHOOT_BOUND


def admitted(served) -> bool:
    """The guard let it through (and counted it): answered, or judged and then failed by core (0.6/0.8
    read their settings from Redis after the guard, so a dead node fails them there). The guard itself
    answers no 5xx."""
    return served.status == 200 or (served.status >= 500 and "x-api-key-guard" in served.headers)


def admitted_before_first_refusal(served: list) -> int:
    """Admissions up to the wave of the first 429, that wave included (one wave sends its requests at once)."""
    first = next((i for i, s in enumerate(served) if s.status == 429), len(served))
    return sum(map(admitted, served[: first - first % WORKERS + WORKERS]))


def reads_settings_from_redis(topology) -> bool:
    return topology.deployment.version < CORE_READS_SETTINGS_FROM_REDIS_UNTIL


@pytest.mark.parametrize("stage", EVERY_STORE, indirect=True)
@pytest.mark.parametrize("how", [pytest.param("planned", id="planned"), pytest.param("crash", id="kill-9")])
def test_failover_while_keys_arrive_locks_nobody_out(stage, how, capsys):
    store, version = stage, version_of(stage)
    deployment = store.deployment
    user = accounts_on(store, f"failover-{how}", 1, apart=False)[0]
    master = master_of(store, user.id)
    traffic = Traffic(deployment, user.api_key)
    while sum(s.status == 200 for _, s in traffic.served) < LIMIT // 2:
        traffic.wave()  # counted in Redis before the switch
    switched_at = time.monotonic() - traffic.started
    thread, settled_at = fault(store, master, how), None
    try:
        while settled_at is None or not traffic.recovered(switched_at, settled_at):
            assert time.monotonic() - traffic.started < FAILOVER_TRAFFIC_SECONDS, "not refused from Redis again"
            traffic.wave()
            if settled_at is None and not thread.is_alive():
                settled_at = time.monotonic() - traffic.started
    finally:
        thread.join(timeout=60)
        heal(store, master)
    served = [s for _, s in traffic.served]
    let_through, recovery = sum(map(admitted, served)), traffic.recovery_seconds(switched_at)
    core_errors = [s.status for s in served if s.status >= 500]
    report(
        capsys,
        f"owui-{version} {type(store.redis).__name__} {how}: {let_through} admitted for a limit of {LIMIT} (overshoot "
        f"{let_through - LIMIT}, bound {overshoot_bound(store.redis, how)}), counting in Redis again {recovery:.1f} s "
        f"after the switch, the store settled after {settled_at - switched_at:.1f} s, {len(core_errors)} core 5xx",
    )
    assert {
        "statuses but core's 5xx": sorted({s.status for s in served if s.status < 500}),
        "admitted before the first 429": admitted_before_first_refusal(served) >= LIMIT,
        "back in Redis within the bound": recovery <= RECOVERY_SECONDS,
        "overshoot within its bound": let_through - LIMIT <= overshoot_bound(store.redis, how),
        "core 5xx only where core reads its settings from Redis": not core_errors or reads_settings_from_redis(store),
    } == {
        "statuses but core's 5xx": [200, 429],
        "admitted before the first 429": True,
        "back in Redis within the bound": True,
        "overshoot within its bound": True,
        "core 5xx only where core reads its settings from Redis": True,
    }


# ---------------------------------------------------------------------------
# A stalled node (SIGSTOP) never holds a key request longer than the guard's timeout plus slack
# ---------------------------------------------------------------------------
def timed_waves(deployment, token: str, seconds: float) -> list[tuple[float, object]]:
    """(seconds the server took to answer, Served) for waves of one request to each worker during `seconds`."""
    out, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        wave = until_every_worker(deployment.server, token, [("POST", ROUTE, CHAT_BODY)], bool)
        out += [(s.seconds, s) for s in wave]
    return out


HTTP_STALL = stages(
    ("0.12.4/sentinel", "0.12.4/cluster", "0.10.2/sentinel", "0.10.2/cluster"),
    "0.6/0.8 core reads its settings from Redis with its own client: a stall holds core before the guard "
    "(the guard's own client: test_the_guards_own_client_is_bounded_on_every_release)",
)


# While a master is stalled the guard's client times out; a Cluster whose node timeout passed may answer
# CLUSTERDOWN until the replica is promoted.
STALL_CAUSES = {"degraded; cause=timeout", "degraded; cause=clusterdown"}


def stall_causes(seen: set) -> bool:
    return "degraded; cause=timeout" in seen and seen <= STALL_CAUSES


@pytest.mark.parametrize("stage", HTTP_STALL, indirect=True)
def test_a_stalled_master_never_holds_a_key_request(stage, capsys):
    store, version = stage, version_of(stage)
    deployment = store.deployment
    user = accounts_on(store, "stalled", 1, apart=False)[0]
    master, log_start = master_of(store, user.id), log_size(deployment)
    burst(deployment, user.api_key, count=WORKERS)
    master.stall()
    try:
        timed = timed_waves(deployment, user.api_key, STALL_SECONDS)
    finally:
        master.resume()
        heal(store, master)
    degraded_workers, longest = {s.worker for _, s in timed if degraded(s)}, max(t for t, _ in timed)
    report(
        capsys,
        f"owui-{version} {type(store.redis).__name__} stalled master: longest key request {longest:.2f} s (bound "
        f"{STALL_BOUND_SECONDS:g} s) over {len(timed)} requests, {len(degraded_workers)} workers degraded",
    )
    assert {
        "statuses (429: limited in process while degraded)": sorted({s.status for _, s in timed} | {429}),
        "longest within the bound": longest <= STALL_BOUND_SECONDS,
        "one ERROR per worker and cause": log_lines(deployment, log_start, "ERROR", DEGRADED),
        "timeouts, nothing unexplained": stall_causes({counters(s) for _, s in timed if degraded(s)}),
    } == {
        "statuses (429: limited in process while degraded)": [200, 429],
        "longest within the bound": True,
        "one ERROR per worker and cause": len({(s.worker, counters(s)) for _, s in timed if degraded(s)}),
        "timeouts, nothing unexplained": True,
    }


# ---------------------------------------------------------------------------
# The guard's own client on each release's Redis stack, without a server: a stalled node or sentinel
# ---------------------------------------------------------------------------
class ReleaseClient:
    """redis_probe.py in a release's venv: the guard's limiter over that release's helpers and redis-py."""

    def __init__(self, version: str, store, root: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WEBUI_"))}
        env.update(store.openwebui_env(), DATA_DIR=str(root), REDIS_KEY_PREFIX=prefix(version))
        env.update(WEBUI_SECRET_KEY=f"probe-{version}-secret", OFFLINE_MODE="true", HF_HUB_OFFLINE="1")
        root.mkdir(parents=True, exist_ok=True)
        mode = "async" if version_tuple(version) >= ASYNC_LOOKUP_FROM else "sync"
        argv = [str(venv_dir(version) / "bin" / "python"), str(PROBE), str(GUARD_FILE), mode]
        self.log = root / "probe.log"
        with open(self.log, "ab") as log:
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log, "bufsize": 0}
            self.process = subprocess.Popen(argv, env=env, cwd=root, **pipes)
        self.pending = b""  # read but not yet returned: select() cannot see what a reader buffered

    def wait_ready(self) -> "ReleaseClient":
        deadline = time.monotonic() + PROBE_READY_SECONDS
        while self.line(deadline) != READY:
            pass
        return self

    def line(self, deadline: float) -> str:
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.process.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"the probe did not answer in time; see {self.log}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode().strip()

    def check(self, user_id: str) -> dict:
        self.process.stdin.write(f"check {user_id} 1000/minute\n".encode())
        return json.loads(self.line(time.monotonic() + PROBE_ANSWER_SECONDS))

    def checks_for(self, user_id: str, seconds: float) -> list[dict]:
        until, checks = time.monotonic() + seconds, []
        while time.monotonic() < until:
            checks.append(self.check(user_id))
            time.sleep(PROBE_PAUSE_SECONDS)
        return checks

    def errors(self) -> int:
        return sum(DEGRADED in line for line in self.log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def stalled_node(store, user: str, stalled: str) -> Redis:
    if isinstance(store, Redis):
        return store
    if stalled == "first-sentinel":
        return store.sentinels[0]
    if isinstance(store, Cluster):
        return store.master_of(store.slot(f"{{{user}}}"))  # the hash tag alone places the key
    return store.master()


def probe_outcome(warm: list, checks: list, errors: int) -> dict:
    return {
        "warm": sorted({c["counters"] for c in warm}),
        "direct line": sorted({c["direct line"] for c in warm + checks}),
        "longest within the bound": max(c["seconds"] for c in checks) <= PROBE_BOUND_SECONDS,
        "all admitted": all(c["allowed"] for c in checks),
        "ERROR lines": errors,
    }


CLIENT_FAULTS = [
    pytest.param("one", "master", 1, id="one-server-stalled"),  # the guard's own connections (DirectLine)
    pytest.param("cluster", "master", 1, id="cluster-stalled-master"),
    pytest.param("sentinel", "master", 1, id="sentinel-stalled-master"),
    # a stalled sentinel costs one lookup of a quarter timeout, then redis-py asks the next sentinel first
    pytest.param("sentinel", "first-sentinel", 0, id="sentinel-stalled-sentinel"),
]


@pytest.mark.parametrize(("kind", "stalled", "errors"), CLIENT_FAULTS)
def test_the_guards_own_client_is_bounded_on_every_release(
    kind, stalled, errors, one_server, cluster, sentinels, tmp_path, capsys
):
    """All four releases' stacks at once, each in its own process, against one stalled node. With one
    server the scripts go over the guard's own connections on every release, not through redis-py's path."""
    store = {"one": one_server, "cluster": cluster, "sentinel": sentinels}[kind]
    store.wait_healthy()
    user = f"probe-{kind}-{stalled}"
    clients = {v: ReleaseClient(v, store, tmp_path / v) for v in VERSIONS}
    node = stalled_node(store, user, stalled)
    try:
        warm = {v: [c.check(user) for _ in range(3)] for v, c in clients.items() if c.wait_ready()}
        node.stall()
        try:
            with ThreadPoolExecutor(len(clients)) as pool:
                running = {v: pool.submit(c.checks_for, user, PROBE_STALL_SECONDS) for v, c in clients.items()}
                checks = {v: future.result() for v, future in running.items()}
        finally:
            node.resume()
    finally:
        for client in clients.values():
            client.stop()
        if isinstance(store, Sentinels) and stalled == "master":
            store.rejoin(node)  # it may have been failed over, and would come back as a stale master
        store.wait_healthy()
    longest = {v: round(max(c["seconds"] for c in checks[v]), 3) for v in VERSIONS}
    report(capsys, f"{kind}, {stalled} stalled {PROBE_STALL_SECONDS:g} s: longest check per release {longest}")
    assert {v: probe_outcome(warm[v], checks[v], clients[v].errors()) for v in VERSIONS} == {
        v: {
            "warm": ["redis"],
            "direct line": [kind == "one"],
            "longest within the bound": True,
            "all admitted": True,
            "ERROR lines": errors,
        }
        for v in VERSIONS
    }


# ---------------------------------------------------------------------------
# Misconfigurations: one ERROR naming cause and fix per worker, and install.py status names them
# ---------------------------------------------------------------------------
@dataclass
class Misdirected:
    """REDIS_URL at one Cluster node, REDIS_CLUSTER not set (an admin who forgot the flag), as an ACL user
    of that node whose rules each case sets: the three misconfigurations on one server start."""

    cluster: Cluster
    node: Redis

    def openwebui_env(self) -> dict:
        return {"REDIS_URL": f"redis://{ACL_USER}:{ACL_PASSWORD}@{self.node.address}/0"}

    def set_user(self, *rules: str) -> None:
        self.node.command("ACL", "SETUSER", ACL_USER, "reset", "on", *rules)
        self.node.command("CLIENT", "KILL", "USER", ACL_USER)  # its connections log in again, with these rules

    def wait_healthy(self) -> None:
        self.cluster.wait_healthy()


@pytest.fixture(scope="module")
def misdirected(cluster) -> Misdirected:
    store = Misdirected(cluster, cluster.master_of(0))
    store.set_user(*ACL_RULES["cluster"])
    try:
        yield store
    finally:
        answers(store.node, "ACL", "DELUSER", ACL_USER)  # the node may be down after a failed test


ACL_RULES = {  # the `guard` user's rules per case; Open WebUI keeps connecting with ACL_PASSWORD
    "cluster": (f">{ACL_PASSWORD}", "~*", "&*", "+@all"),  # may do everything: only the Cluster flag is missing
    "noperm": (f">{ACL_PASSWORD}", "~*", "&*", "+@all", "-@scripting"),  # core's own commands still work
    "auth": (">rotated-on-the-server", "~*", "&*", "+@all"),  # a password rotated in Redis, not in REDIS_URL
}


def shows(misdirected: Misdirected, topology, cause: str):
    """Which accounts' checks show `cause`: for MOVED those on another master, for the others those the
    node serves (the client never reaches another node)."""
    on_node = lambda account: master_of_cluster(misdirected.cluster, topology, account) is misdirected.node  # noqa: E731
    return (lambda account: not on_node(account)) if cause == "cluster" else on_node


def master_of_cluster(cluster: Cluster, topology, account) -> Redis:
    return cluster.master_of(cluster.slot(counters_key(topology, account.id)))


def said_by_every_worker(header: str):
    return lambda served: len({s.worker for s in served if counters(s) == header}) >= WORKERS


# A worker that is degraded already (by the case before) tries Redis again one retry interval later:
# only then can it see the new cause. One request a second, over accounts that take turns, stays under
# LIMIT per account even while a worker counts in process.
CAUSE_SECONDS = GUARD.REDIS_RETRY_SECONDS + 8.0
CAUSE_PAUSE_SECONDS = 1.0
CAUSE_ACCOUNTS = 3
assert CAUSE_SECONDS / CAUSE_PAUSE_SECONDS / CAUSE_ACCOUNTS < LIMIT


def until_every_worker_says(deployment, accounts: list, header: str) -> list:
    """Requests steered to each worker until it answered with `header`, the accounts taking turns."""
    return until_every_worker(
        deployment.server,
        "",
        [("POST", ROUTE, CHAT_BODY, account.api_key) for account in accounts],
        lambda answers: any(counters(s) == header for s in answers),
        seconds=CAUSE_SECONDS,
        pause=CAUSE_PAUSE_SECONDS,
    )


MISCONFIGURATIONS = [
    pytest.param("cluster", "set REDIS_CLUSTER=true", id="cluster-without-REDIS_CLUSTER"),
    pytest.param("noperm", "grant the permissions the README lists", id="acl-user-without-scripting"),
    pytest.param("auth", "fix the user name and password in REDIS_URL", id="wrong-password"),
]
MISCONFIGURED = stages(
    ("0.12.4/misconfigured",),
    "0.6/0.8 answer 500 themselves on a misconfigured Redis (their settings live there); 0.10.2 checks every "
    "session token's revocation in Redis (utils/auth.py is_valid_token) and answers 500 on MOVED before any guard",
)


@pytest.mark.parametrize("stage", MISCONFIGURED, indirect=True)
@pytest.mark.parametrize(("cause", "fix"), MISCONFIGURATIONS)
def test_a_misconfiguration_is_named_by_status(stage, misdirected, cause, fix, capsys):
    deployment, log_start, header = stage.deployment, log_size(stage.deployment), f"degraded; cause={cause}"
    misdirected.set_user(*ACL_RULES[cause])
    candidates = (new_account(deployment, f"misconfigured-{next(ACCOUNT_SERIAL)}") for _ in range(8 * CAUSE_ACCOUNTS))
    accounts = list(itertools.islice(filter(shows(misdirected, stage, cause), candidates), CAUSE_ACCOUNTS))
    served = until_every_worker_says(deployment, accounts, header)
    capsys.readouterr()
    deployment.installer("status", "--json", key=deployment.people.admin.api_key)
    facts = json.loads(capsys.readouterr().out)
    assert {
        "statuses": sorted({s.status for s in served}),
        "every worker says so": said_by_every_worker(header)(served),
        "status": (facts["ok"], facts["rate_limit_counters"], facts["rate_limit_cause"], fix in facts["verdict"]),
        "one ERROR per worker, with the fix": log_lines(deployment, log_start, "ERROR", f"{DEGRADED}{cause})", "Fix: "),
    } == {
        "statuses": [200],
        "every worker says so": True,
        "status": (False, "degraded", cause, True),
        "one ERROR per worker, with the fix": WORKERS,
    }
