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


def limiter_figures(g, redis_url: str) -> dict:
    """Each check admits (limits far above the request count), the common case; users rotate over 100."""
    limit = g.RateLimit.parse("1000000/minute,10000000/day")
    users = [f"user-{i}" for i in range(100)]
    turn = iter(range(10**12))

    def user() -> str:
        return users[next(turn) % 100]

    per_worker = g.Limiter(None)
    figures = {
        "ratelimit_parse_cached": per_call_us(lambda: g.RateLimit.parse("1000000/minute,10000000/day"), 2000),
        "ratelimit_per_worker": per_call_us(lambda: per_worker.check(user(), limit), 2000),
    }
    import redis  # a test dependency (requirements-dev.txt); the guard itself gets Open WebUI's client
    import redis.asyncio as aredis

    sync = g.Limiter(g.RedisCounters(lambda: redis.Redis.from_url(redis_url, decode_responses=True), "bench"))
    figures["ratelimit_redis_sync"] = per_call_us(lambda: sync.check(user(), limit), 50)

    loop = asyncio.new_event_loop()
    client = aredis.from_url(redis_url, decode_responses=True)
    asynchronous = g.Limiter(g.RedisCounters(lambda: client, "bench"))

    async def many(n: int):
        for _ in range(n):
            await asynchronous.check(user(), limit)

    try:
        loop.run_until_complete(many(100))  # warm the connection and the script cache
        figures["ratelimit_redis_async"] = per_call_us(lambda: loop.run_until_complete(many(50)), 1)
        figures["ratelimit_redis_async"] = {k: v / 50 for k, v in figures["ratelimit_redis_async"].items()}
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()
    assert sync.counters == asynchronous.counters == "redis", "Redis failed during the benchmark"
    return figures


def run() -> dict:
    g = load_guard()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        redis_server = Redis(Path(folder)).start()
        try:
            limiter = limiter_figures(g, redis_server.url)
        finally:
            redis_server.stop()
    return decision_figures(g) | inlet_figures(g) | limiter
