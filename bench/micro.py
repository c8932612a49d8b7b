"""In-process figures: the policy decision alone, the inlet as Open WebUI calls it, and the rate limiter's
cost per admitted request, per process and against a real local Redis (sync and asyncio clients)."""

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from tests.e2e.services import Redis
from tests.guard_loader import load_guard

BATCHES = 200


def per_call_us(fn, batch: int) -> dict:
    """Median and p95 of the per-call time over BATCHES batches of `batch` calls."""
    samples = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    samples.sort()
    return {"median_us": statistics.median(samples), "p95_us": samples[int(len(samples) * 0.95) - 1]}


def decision_figures(g) -> dict:
    typical = g.policy_from_valves(g.Valves(api_key_groups="automation"))
    typical_facts = g.Facts(
        user_id="u-1",
        email="a@example.com",
        role="user",
        group_names=frozenset({"automation"}),
        path="/api/chat/completions",
        model="test-model",
    )
    # Admitted only through the last of 100 groups, on the last of 201 prefixes, by the last of 101 globs.
    worst = g.policy_from_valves(
        g.Valves(
            api_key_roles="admin",
            api_key_groups=",".join(f"group-{i}" for i in range(200)) + ",team-99",
            api_key_users=",".join(f"user{i}@example.com" for i in range(500)),
            api_key_blocked_users=",".join(f"blocked{i}@example.com" for i in range(500)),
            api_key_allowed_endpoints_user=",".join(f"/api/v1/route{i}" for i in range(200)) + ",/api/chat/completions",
            api_key_allowed_models_user=",".join(f"family{i}-*" for i in range(100)) + ",test-*",
        )
    )
    worst_facts = g.Facts(
        user_id="u-2",
        email="z@example.com",
        role="user",
        group_ids=frozenset(f"gid-{i}" for i in range(100)),
        group_names=frozenset(f"team-{i}" for i in range(100)),
        path="/api/chat/completions/x",
        model="test-model",
    )
    tiered, tiered_facts = ten_tiers(g)
    assert g.decide(typical_facts, typical).allowed and g.decide(worst_facts, worst).allowed
    assert g.decide(tiered_facts, tiered).allowed and g.policy_from_valves is not None
    return {
        "decision_typical": per_call_us(lambda: g.decide(typical_facts, typical), 2000),
        "decision_worst_case": per_call_us(lambda: g.decide(worst_facts, worst), 500),
        "decision_ten_tiers": per_call_us(lambda: g.decide(tiered_facts, tiered), 2000),
    }


TEN_TIERS = {
    f"group:team-{i}": {"allowed_models": f"model-{i}-*,test-model", "token_quota": f"{1000 * (i + 1)}/day",
                        "rate_limit": f"{10 + i}/minute", "max_concurrent": 2}
    for i in range(10)
}  # fmt: skip


def ten_tiers(g):
    """Ten group tiers; the user is in three groups, the first of them listed last (the longest search)."""
    valves = g.Valves(api_key_groups="team-9", api_key_tiers=json.dumps(TEN_TIERS))
    facts = g.Facts(
        user_id="u-3",
        email="t@example.com",
        role="user",
        group_names=frozenset({"team-9", "team-8", "staff"}),
        path="/api/chat/completions",
        model="test-model",
    )
    return g.policy_from_valves(valves), facts


def inlet_figures(g) -> dict:
    class Headers(dict):
        def get(self, key, default=None):
            return super().get(key.lower(), default)

    groups = [SimpleNamespace(id="g-1", name="automation")]
    sys.modules["open_webui.models.groups"] = SimpleNamespace(
        Groups=SimpleNamespace(get_groups_by_member_id=lambda uid: groups)
    )
    sys.modules["open_webui.models.models"] = SimpleNamespace(  # no workspace models: every id is a provider's
        Models=SimpleNamespace(get_model_by_id=lambda model_id: None)
    )
    flt = g.Filter()
    flt.valves = g.Valves(api_key_groups="automation")
    request = SimpleNamespace(
        headers=Headers({"authorization": "Bearer sk-0123456789abcdef0123456789abcdef"}),
        cookies={},
        state=SimpleNamespace(auth_type="api_key"),
        scope={"path": "/api/chat/completions"},
    )
    user = {"id": "u-1", "email": "a@example.com", "name": "A", "role": "user"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    loop = asyncio.new_event_loop()

    async def many(n):
        for _ in range(n):
            await flt.inlet(body=body, __user__=user, __request__=request)

    try:
        loop.run_until_complete(many(100))  # warm the group cache
        figures = {"inlet_warm": per_call_us(lambda: loop.run_until_complete(many(1)), 200)}
        # The same with ten group tiers (the user's group has one, with a quota: its counters are read)
        tiers = {**TEN_TIERS, "group:automation": {"allowed_models": "test-model", "token_quota": "100000000/day"}}
        flt.valves = g.Valves(api_key_groups="automation", api_key_tiers=json.dumps(tiers))
        loop.run_until_complete(many(100))
        figures["inlet_ten_tiers"] = per_call_us(lambda: loop.run_until_complete(many(1)), 200)
        return figures
    finally:
        loop.close()


SCALE_LIMIT = "1000/minute,100000/day"  # the example: buckets in both windows
SCALE_USERS = 10_000
ROTATING_USERS = 100


def limiter_figures(g, redis_url: str) -> dict:
    """The limiter per admitted request (limits far above the request count, users rotating over 100):
    per worker, and against a real local Redis with the guard's own clients as it builds them (URL
    timeouts, bound_waits), each next to a bare PING round trip of the same client."""
    limit = g.RateLimit.parse(SCALE_LIMIT)
    turn = iter(range(10**12))

    def user() -> str:
        return f"user-{next(turn) % ROTATING_USERS}"

    per_worker = g.Limiter(None)
    figures = {
        "ratelimit_parse_cached": per_call_us(lambda: g.RateLimit.parse(SCALE_LIMIT), 2000),
        "ratelimit_per_worker": per_call_us(lambda: per_worker.check(user(), limit), 2000),
    }
    sync_client, async_client, loop = guard_clients(g, redis_url)
    try:
        figures |= round_trip_figures(g, "", sync_client, async_client, loop, limit, user)
        figures |= memory_figures(g, sync_client, limit)
        figures |= populate(g, sync_client, limit, SCALE_USERS)
        crowd = iter(range(10**12))
        figures |= round_trip_figures(
            g, "_10k_users", sync_client, async_client, loop, limit, lambda: f"crowd-{next(crowd) * 7919 % SCALE_USERS}"
        )
        loop.run_until_complete(async_client.aclose())
    finally:
        loop.close()
    return figures


def guard_clients(g, redis_url: str):
    import redis  # a test dependency (requirements-dev.txt); the guard itself gets Open WebUI's helper
    import redis.asyncio as aredis

    url = g.with_timeouts(redis_url, g.REDIS_TIMEOUT_SECONDS)
    sync_client, async_client = redis.Redis.from_url(url), aredis.Redis.from_url(url)
    for client in (sync_client, async_client):
        g.bound_waits(client, g.REDIS_TIMEOUT_SECONDS)
    return sync_client, async_client, asyncio.new_event_loop()


def round_trip_figures(g, suffix: str, sync_client, async_client, loop, limit, user) -> dict:
    """us per check and per bare PING of the same client, sync and asyncio, measured in alternating
    batches (loopback latency here moves with the machine's load by 4x: figures taken apart mislead),
    and the median of the per-batch ratios. Where the difference goes: the same script on the guard's
    own connections without the guard's Python, a PING on those connections too (the round trip without
    redis-py's command path, which the check skips and the goal's PING does not), and the script's own
    time inside Redis."""
    sync = g.Limiter(g.RedisCounters(lambda: sync_client, "bench"))
    asynchronous = g.Limiter(g.RedisCounters(lambda: async_client, "bench"))
    lines = {"sync": g.DirectLine.of(sync_client), "async": g.DirectLine.of(async_client)}
    assert None not in lines.values(), "the guard goes through redis-py's command path for these clients"
    base = g.redis_key_base("bench")

    def script_command() -> tuple:
        keys = [f"{base}{{{user()}}}{key_suffix}" for key_suffix in limit.key_suffixes]
        return ("EVALSHA", g.RATE_LIMIT_SCRIPT.sha, len(keys), *keys, limit.redis_args)

    def sync_batch(fn):
        return lambda n: [fn() for _ in range(n)]

    def async_batch(fn):
        async def batch(n: int):
            for _ in range(n):
                await fn()

        return lambda n: loop.run_until_complete(batch(n))

    arms = {
        "sync": (
            sync_batch(lambda: sync.check(user(), limit)),
            sync_batch(sync_client.ping),
            sync_batch(lambda: lines["sync"].call(script_command())),
            sync_batch(lambda: lines["sync"].call(("PING",))),
        ),
        "async": (
            async_batch(lambda: asynchronous.check(user(), limit)),
            async_batch(async_client.ping),
            async_batch(lambda: lines["async"].call_async(script_command())),
            async_batch(lambda: lines["async"].call_async(("PING",))),
        ),
    }
    figures = {}
    sync_client.script_load(g.RATE_LIMIT_LUA)
    for mode, batches_of in arms.items():
        for batch in batches_of:
            batch(100)  # warm the connections and the script cache
        sync_client.config_resetstat()
        batches = [[timed_us(batch, 50) for batch in batches_of] for _ in range(BATCHES)]
        figures[f"ratelimit_redis_{mode}{suffix}"] = spread([c for c, _, _, _ in batches])
        figures[f"redis_ping_{mode}{suffix}"] = spread([p for _, p, _, _ in batches])
        figures[f"ratelimit_ratio_{mode}{suffix}"] = statistics.median(c / p for c, p, _, _ in batches)
        figures[f"script_ratio_{mode}{suffix}"] = statistics.median(s / p for _, p, s, _ in batches)
        figures[f"line_ping_ratio_{mode}{suffix}"] = statistics.median(b / p for _, p, _, b in batches)
        figures[f"script_in_redis_us_{mode}{suffix}"] = sync_client.info("commandstats")["cmdstat_evalsha"][
            "usec_per_call"
        ]
    assert sync.counters == asynchronous.counters == "redis", "Redis failed during the benchmark"
    return figures


def timed_us(batch, n: int) -> float:
    start = time.perf_counter()
    batch(n)
    return (time.perf_counter() - start) / n * 1e6


def spread(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"median_us": statistics.median(samples), "p95_us": samples[int(len(samples) * 0.95) - 1]}


def server_now_us(client) -> int:
    seconds, micros = client.time()
    return seconds * 1_000_000 + micros


def full_windows(g, writer, limit, user: str, now: int) -> list[str]:
    """Write a user's counters as a day of steady traffic leaves them: every bucket of both windows holds
    counts adding up to the limit (the most fields the script keeps), laid out as the script lays them
    out (n, lo, hi and c first, then the older buckets). `writer` may be a pipeline."""
    keys = []
    for window, key_suffix in zip(limit.windows, limit.key_suffixes, strict=True):
        key = f"{g.redis_key_base('bench')}{{{user}}}{key_suffix}"
        low, high = (now - window.seconds * 1_000_000) // window.width_us, now // window.width_us
        per_bucket = max(window.limit // (high - low + 1), 1)
        front = {"n": per_bucket * (high - low + 1), "lo": low, "hi": high, "c": per_bucket}
        writer.hset(key, mapping=front | {str(index): per_bucket for index in range(low, high)})
        writer.pexpire(key, window.seconds * 1000 + window.width_us // 1000)
        keys.append(key)
    return keys


def memory_figures(g, client, limit) -> dict:
    """Redis memory for one active user at full windows (MEMORY USAGE of its keys), and what the sliding
    log of before held for the same limit (one sorted-set entry per admitted request in each window)."""
    keys = full_windows(g, client, limit, "memory-user", server_now_us(client))
    buckets = sum(client.memory_usage(key, samples=0) for key in keys)
    log_bytes = 0
    for window in limit.windows:
        key = f"bench-log:{window.seconds}"
        for start in range(0, window.limit, 10_000):  # members as the guard wrote them: nonce:serial
            batch = range(start, min(start + 10_000, window.limit))
            client.zadd(key, {f"{'ab' * 8}:{n}": 1_700_000_000_000_000 + n for n in batch})
        log_bytes += client.memory_usage(key, samples=0)
        client.delete(key)
    return {"bytes_per_user_buckets": buckets, "bytes_per_user_log_before": log_bytes}


def populate(g, client, limit, users: int) -> dict:
    """`users` users' counters at full windows, pipelined; Redis's own memory growth per user."""
    before, now = client.info("memory")["used_memory"], server_now_us(client)
    for start in range(0, users, 500):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + 500, users)):
            full_windows(g, pipe, limit, f"crowd-{n}", now)
        pipe.execute()
    return {"used_memory_per_user_10k": (client.info("memory")["used_memory"] - before) / users}


def run() -> dict:
    g = load_guard()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        redis_server = Redis(Path(folder)).start()
        try:
            limiter = limiter_figures(g, redis_server.url)
        finally:
            redis_server.stop()
    return decision_figures(g) | inlet_figures(g) | limiter
