"""Tiers (role, group and user), token quotas, key age and requests in flight: parsing, precedence,
the decision, the counters in memory and in a real Redis."""

import asyncio
import calendar
import json
import time

import pytest
import redis
import redis.asyncio as aredis
from pydantic import ValidationError

from tests.conftest import Groups, Models, Users, settle, wait_for
from tests.guard_loader import load_guard

g = load_guard()

ALICE = {"user_id": "u-alice", "email": "alice@example.com", "role": "user"}
ROOT = {"user_id": "u-root", "email": "root@example.com", "role": "admin"}
DAY = 86400
NOW = calendar.timegm((2026, 12, 4, 21, 30, 0))
# Redis expires a quota key at its window's end by its own clock: the rows against a real Redis
# charge at 21:30 UTC tomorrow, whatever day CI runs on.
LIVE_NOW = (int(time.time()) // DAY + 1) * DAY + 77400


def facts(who: dict = ALICE, groups: tuple = (), path: str = "/api/chat/completions", **more):
    return g.Facts(path=path, model="test-model", group_names=frozenset(groups), now=NOW, **who, **more)


def policy(tiers: dict | None = None, **valves):
    return g.policy_from_valves(g.Valves(api_key_roles="admin,user", api_key_tiers=json.dumps(tiers or {}), **valves))


TIERS = {
    "user:alice@example.com": {"rate_limit": "1/minute"},
    "group:automation": {"allowed_endpoints": "*", "allowed_models": "gpt-4o-mini", "token_quota": "200000/day"},
    "group:interns": {"allowed_endpoints": "/api/chat/completions", "token_quota": "2000/day", "max_concurrent": 1},
}


# ---------------------------------------------------------------------------
# Precedence: the user's own entry, then groups in listed order, then the role
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("who", "groups", "field", "value", "source"),
    [
        pytest.param(ROOT, (), "allowed_endpoints", "*", "api_key_allowed_endpoints_admin", id="admin-role"),
        pytest.param(
            {**ALICE, "user_id": "u-bob", "email": "bob@example.com"},
            (),
            "token_quota",
            "",
            "api_key_token_quota_user",
            id="user-role-no-entry",
        ),
        pytest.param(ALICE, (), "rate_limit", "1/minute", "api_key_tiers user:alice@example.com rate_limit", id="user"),
        pytest.param(
            ALICE, ("interns",), "token_quota", "2000/day", "api_key_tiers group:interns token_quota", id="group"
        ),
        pytest.param(
            ALICE,
            ("interns", "automation"),
            "token_quota",
            "200000/day",
            "api_key_tiers group:automation token_quota",
            id="first-listed-group-wins-whatever-the-membership-order",
        ),
        pytest.param(
            ALICE,
            ("interns", "automation"),
            "max_concurrent",
            "1",
            "api_key_tiers group:interns max_concurrent",
            id="a-field-the-first-group-leaves-comes-from-the-next",
        ),
        pytest.param(
            ALICE,
            ("automation",),
            "rate_limit",
            "1/minute",
            "api_key_tiers user:alice@example.com rate_limit",
            id="user-entry-over-group",
        ),
        pytest.param(
            ALICE,
            ("Automation",),
            "allowed_models",
            "gpt-4o-mini",
            "api_key_tiers group:automation allowed_models",
            id="group-name-any-case",
        ),
        pytest.param(
            ROOT,
            ("interns",),
            "allowed_endpoints",
            "/api/chat/completions",
            "api_key_tiers group:interns allowed_endpoints",
            id="a-group-tier-narrows-an-admin-too",
        ),
        pytest.param(
            ALICE, ("interns",), "allowed_models", "*", "api_key_allowed_models_user", id="unset-field-from-role"
        ),
    ],
)
def test_precedence(who, groups, field, value, source):
    tier = policy(TIERS).tier_for(facts(who, groups))
    assert (dict(tier.texts)[field], tier.valve(field)) == (value, source)


def test_group_by_id_and_merged_tier_is_reused():
    p = policy({"group:g-42": {"max_concurrent": 3}})
    first, second = (p.tier_for(g.Facts(**ALICE, group_ids=frozenset({"g-42"}))) for _ in range(2))
    assert (first.max_concurrent, first is second, first.name) == (3, True, "user+group:g-42")


def test_no_entry_is_the_role_tier_itself():
    p = policy(TIERS)
    assert p.tier_for(facts(ROOT)) is p.admin


# ---------------------------------------------------------------------------
# api_key_tiers refused on save, naming the entry and the field
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("[1]", "expected a JSON object", id="not-an-object"),
        pytest.param("{nope", "expected a JSON object", id="not-json"),
        pytest.param('{"interns": {"rate_limit": "1/day"}}', "entry 'interns': expected a key 'group:", id="no-kind"),
        pytest.param('{"role:user": {"rate_limit": "1/day"}}', "entry 'role:user'", id="unknown-kind"),
        pytest.param('{"group:": {"rate_limit": "1/day"}}', "entry 'group:'", id="no-name"),
        pytest.param('{"group:a": {}}', "entry 'group:a': expected an object setting", id="empty-entry"),
        pytest.param('{"group:a": {"models": "*"}}', "unknown field 'models'", id="unknown-field"),
        pytest.param(
            '{"group:a": {"rate_limit": "5/fortnight"}}', "entry 'group:a', field 'rate_limit'", id="bad-rate"
        ),
        pytest.param(
            '{"group:a": {"token_quota": "5/second"}}', "entry 'group:a', field 'token_quota'", id="quota-unit"
        ),
        pytest.param('{"group:a": {"max_concurrent": -1}}', "entry 'group:a', field 'max_concurrent'", id="negative"),
        pytest.param('{"group:a": {"max_concurrent": true}}', "expected a string or a number", id="boolean"),
        pytest.param('{"group:a": {"allowed_endpoints": "api"}}', "field 'allowed_endpoints'", id="bad-path"),
        pytest.param(
            '{"group:A": {"rate_limit": "1/day"}, "group:a": {"rate_limit": "2/day"}}', "listed twice", id="twice"
        ),
        pytest.param('{"user:x": {"rate_limit": "1/day"}, "user:x": {}}', "listed twice", id="exactly-twice"),
        pytest.param('{"user:x": {"rate_limit": "1/day", "rate_limit": ""}}', "a field is set twice", id="field-twice"),
        pytest.param('{"group:a": {"rate_limit": {"x": 1}}}', "expected a string or a number", id="nested"),
    ],
)
def test_invalid_tiers_are_refused(text, message):
    with pytest.raises(ValidationError, match="api_key_tiers") as error:
        g.Valves(api_key_tiers=text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("valves", "message"),
    [
        pytest.param({"api_key_token_quota_user": "10/week"}, "N/minute, N/hour, N/day or N/month", id="quota-unit"),
        pytest.param({"api_key_token_quota_user": "1/day,2/day"}, "each unit at most once", id="quota-twice"),
        pytest.param({"api_key_max_concurrent_user": -1}, "greater than or equal to 0", id="concurrency"),
        pytest.param({"api_key_max_key_age_days_user": -1}, "greater than or equal to 0", id="age"),
    ],
)
def test_invalid_role_tier_valves_are_refused(valves, message):
    with pytest.raises(ValidationError, match=message):
        g.Valves(**valves)


@pytest.mark.parametrize(
    "valves",
    [
        pytest.param({"api_key_max_key_age_days_user": 90}, id="role-valve"),
        pytest.param({"api_key_tiers": '{"group:a": {"max_key_age_days": 30}}'}, id="tier-entry"),
    ],
)
def test_key_age_is_refused_where_core_keeps_no_key_times(open_webui, valves):
    open_webui(Users=Users({}))  # a users module without ApiKey: 0.6.0-0.6.40
    with pytest.raises(ValidationError, match="keeps no creation time for API keys"):
        g.Valves(**valves)


# ---------------------------------------------------------------------------
# The decision: key age, fan-out under a quota
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("created", "limit", "reason"),
    [
        pytest.param(NOW - 89 * DAY, 90, g.REASON_ALLOWED, id="younger"),
        pytest.param(NOW - 90 * DAY, 90, g.REASON_ALLOWED, id="exactly-the-limit"),
        pytest.param(NOW - 90 * DAY - 1, 90, g.REASON_KEY_AGE, id="a-second-older"),
        pytest.param(None, 90, g.REASON_KEY_AGE_UNKNOWN, id="no-creation-time-fails-closed"),
        pytest.param(None, 0, g.REASON_ALLOWED, id="no-limit-no-time-needed"),
    ],
)
def test_key_age(created, limit, reason):
    decision = g.decide(facts(key_created=created), policy(api_key_max_key_age_days_user=limit))
    assert decision.reason == reason


def test_key_age_refusal_tells_the_owner_what_to_do():
    message = g.decide(facts(key_created=NOW - 120 * DAY), policy(api_key_max_key_age_days_user=90)).message
    assert message == (
        "this API key was created on 2026-08-06 (120 days ago) and keys of role 'user' may be at most 90 days old "
        "(api_key_max_key_age_days_user): generate a new key under Settings > Account"
    )


@pytest.mark.parametrize(
    ("valves", "valve"),
    [
        pytest.param({"api_key_token_quota_user": "100/day"}, "api_key_token_quota_user", id="quota"),
        pytest.param({"api_key_max_concurrent_user": 2}, "api_key_max_concurrent_user", id="concurrency"),
        pytest.param({"api_key_tiers": '{"group:x": {"rate_limit": "9/day"}}'}, "group:x rate_limit", id="tier"),
    ],
)
def test_one_request_buys_one_model_call_under_any_counter(valves, valve):
    decision = g.decide(
        facts(groups=("x",), model_calls=3), g.policy_from_valves(g.Valves(api_key_roles="user", **valves))
    )
    assert (decision.reason, valve in decision.message) == (g.REASON_FAN_OUT, True)


def test_a_tier_does_not_admit():
    decision = g.decide(facts(groups=("interns",)), g.policy_from_valves(g.Valves(api_key_tiers=json.dumps(TIERS))))
    assert decision.reason == g.REASON_NOT_ADMITTED


# ---------------------------------------------------------------------------
# Token quotas: calendar windows, fields
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("unit", "now", "bounds"),
    [
        pytest.param("minute", NOW + 59, (NOW, NOW + 60), id="minute"),
        pytest.param("hour", NOW, (NOW - 1800, NOW + 1800), id="hour"),
        pytest.param("day", NOW, (NOW - 77400, NOW + 9000), id="day-utc"),
        pytest.param(
            "month",
            NOW,
            (calendar.timegm((2026, 12, 1, 0, 0, 0)), calendar.timegm((2027, 1, 1, 0, 0, 0))),
            id="december-into-january",
        ),
        pytest.param(
            "month",
            calendar.timegm((2028, 2, 29, 23, 59, 59)),
            (calendar.timegm((2028, 2, 1, 0, 0, 0)), calendar.timegm((2028, 3, 1, 0, 0, 0))),
            id="leap-february",
        ),
    ],
)
def test_quota_windows_are_calendar_windows(unit, now, bounds):
    assert g.QuotaWindow(1, unit).bounds(now) == bounds


def test_quota_fields_and_the_window_that_starts_again_last():
    quota = g.TokenQuota.parse("3000/month,30/day")
    used = [36, 36]
    window, seconds = g.quota_exceeded(quota, used, NOW)
    assert (window.unit, seconds, g.quota_fields(quota, used, NOW)) == (
        "day",
        9000,
        {
            "RateLimit-Policy": '"tokens-day";q=30;w=86400, "tokens-month";q=3000;w=2678400',
            "RateLimit": '"tokens-day";r=0;t=9000, "tokens-month";r=2964;t=2341800',
        },
    )


def test_quota_with_room_is_not_exceeded():
    assert g.quota_exceeded(g.TokenQuota.parse("30/day"), [29], NOW) is None


def test_memory_tallies_charge_per_window_and_user():
    tallies, quota = g.MemoryTallies(), g.TokenQuota.parse("30/day,100/month")
    tallies.charge("u1", quota.windows, 18, NOW)
    tallies.charge("u1", quota.windows, 18, NOW + DAY)  # the next day, the same month
    assert (tallies.quota_used("u1", quota, NOW + DAY), tallies.quota_used("u2", quota, NOW)) == ([18, 36], [0, 0])


def test_memory_tallies_keep_a_bounded_number_of_windows():
    tallies, quota = g.MemoryTallies(max_keys=2), g.TokenQuota.parse("30/day")
    for user in ("u1", "u2", "u3"):
        tallies.charge(user, quota.windows, 5, NOW)
    assert [tallies.quota_used(u, quota, NOW) for u in ("u1", "u2", "u3")] == [[0], [5], [5]]


def test_memory_leases_admit_the_cap_and_free_a_place_on_release():
    tallies = g.MemoryTallies()
    leases = [g.Lease("u1", f"m{i}") for i in range(3)]
    counts = [tallies.acquire(lease, 2) for lease in leases]
    tallies.release(leases[0])
    assert (counts, tallies.acquire(leases[2], 2), tallies.acquire(g.Lease("u2", "x"), 2)) == ([1, 2, 3], 2, 1)


# ---------------------------------------------------------------------------
# Through evaluate(): the order of the counters, the fields, monitor mode
# ---------------------------------------------------------------------------
@pytest.fixture
def judged(open_webui, monkeypatch):
    """evaluate() for alice with a limiter of its own (per worker)."""
    open_webui(Groups=Groups({"u-alice": ["interns"]}), Models=Models(), Users=Users({}))
    own = g.Limiter(None)
    monkeypatch.setattr(g, "limiter", lambda: own)
    monkeypatch.setattr(g.time, "time", lambda: NOW)  # one day throughout, whatever the clock says

    def judge(valves: dict):
        v = g.Valves(api_key_roles="user", **valves)
        person = {"id": "u-alice", "email": "alice@example.com", "role": "user"}
        return asyncio.run(g.evaluate(v, person, "sk-" + "a" * 32, "POST", "/api/chat/completions", g.NO_MODEL,
                                      "route", count=True))  # fmt: skip

    def lease(valves: dict):
        """(refusal, lease) of the route guard's one lease for a request these valves admitted."""
        outcome = judge(valves)
        v = g.Valves(api_key_roles="user", **valves)
        refusal, taken, _ = asyncio.run(g.take_lease(outcome.tier.max_concurrent, outcome, v, None))
        return refusal, taken

    judge.lease = lease

    judge.limiter = own
    return judge


def test_quota_refusal_names_the_quota_and_carries_the_fields(judged):
    first = judged({"api_key_token_quota_user": "30/day"})
    judged.limiter.charge("u-alice", g.TokenQuota.parse("30/day").windows, 36, NOW)
    second = judged({"api_key_token_quota_user": "30/day"})
    headers = dict(second.refusal.headers)
    assert (first.refusal, second.refusal.status, second.refusal.reason, sorted(headers)) == (
        None,
        429,
        g.REASON_TOKEN_QUOTA,
        ["RateLimit", "RateLimit-Policy", "Retry-After"],
    )
    assert "may use 30 tokens per day (api_key_token_quota_user) and 36 are used" in second.refusal.detail


def test_concurrency_takes_a_lease_and_refuses_the_next(judged):
    valves = {"api_key_tiers": '{"group:interns": {"max_concurrent": 1}}'}
    (_, first), (second, none) = judged.lease(valves), judged.lease(valves)
    judged.limiter.release(first)
    third, _ = judged.lease(valves)
    headers = dict(second.headers)
    assert (first is not None, none, second.reason, headers["Retry-After"], third) == (
        True,
        None,
        g.REASON_CONCURRENCY,
        "1",
        None,
    )
    assert (headers["RateLimit-Policy"], "group:interns max_concurrent" in second.detail) == ('"concurrent";q=1', True)


def test_headers_of_several_counters_join_in_one_field(judged):
    outcome = judged({"api_key_rate_limit_user": "5/minute", "api_key_token_quota_user": "30/day"})
    headers = dict(outcome.headers)
    assert headers["RateLimit-Policy"] == '"tokens-day";q=30;w=86400, "minute";q=5;w=60'


def test_monitor_mode_serves_what_it_would_limit(judged, caplog):
    caplog.set_level("WARNING", "api_key_guard")
    valves = {"mode": "monitor", "api_key_max_concurrent_user": 1}
    (first, held), (second, none) = judged.lease(valves), judged.lease(valves)
    assert (first, held is not None, second, none) == (None, True, None, None)
    assert [r.getMessage().split(" ")[1] for r in caplog.records] == ["would-limit"]


# ---------------------------------------------------------------------------
# A real Redis: quotas and leases shared, one script per operation
# ---------------------------------------------------------------------------
def run_sync(redis_url, work):
    return work(g.RedisCounters(lambda: redis.Redis.from_url(redis_url), "open-webui"))


def run_async(redis_url, work):
    async def run():
        client = aredis.from_url(redis_url)
        try:
            counters = g.RedisCounters(lambda: client, "open-webui")
            return await settle_all(work(counters))
        finally:
            await client.aclose()

    return asyncio.run(run())


async def settle_all(values):
    return [await settle(v) for v in values] if isinstance(values, list) else await settle(values)


CLIENTS = [pytest.param(run_sync, id="sync"), pytest.param(run_async, id="async")]
QUOTA = g.TokenQuota.parse("30/day,1000/month")


@pytest.mark.parametrize("run", CLIENTS)
def test_redis_quota_charged_and_read(redis_url, run):
    used = run(redis_url, lambda c: [c.charge("u1", QUOTA.windows, 18, LIVE_NOW),
                                     c.charge("u1", QUOTA.windows, 18, LIVE_NOW),
                                     c.quota_used("u1", QUOTA, LIVE_NOW),
                                     c.quota_used("u2", QUOTA, LIVE_NOW)])  # fmt: skip
    assert used[2:] == [[36, 36], [0, 0]]


def test_redis_quota_keys_hash_tag_and_expiry(redis_url, redis_server):
    run_sync(redis_url, lambda c: c.charge("u1", QUOTA.windows, 5, LIVE_NOW))
    day_key = f"open-webui:api_key_guard:tq:{{u1}}:day:{LIVE_NOW - 77400}"
    ttl = int(redis_server.command("TTL", day_key))
    keys = redis_server.command("KEYS", "*")
    assert (len(keys), day_key in keys, 0 < ttl) == (2, True, True)


@pytest.mark.parametrize("run", CLIENTS)
def test_redis_leases_cap_release_and_expire(redis_url, run):
    leases = [g.Lease("u1", f"m{i}") for i in range(3)]
    counts = run(redis_url, lambda c: [c.acquire(leases[0], 2), c.acquire(leases[1], 2), c.acquire(leases[2], 2),
                                 c.release(leases[0]), c.acquire(leases[2], 2), c.renew(leases[2])])  # fmt: skip
    assert counts[:3] + counts[4:5] == [1, 2, 3, 2]


def test_redis_lease_of_a_dead_worker_expires(redis_url, monkeypatch):
    monkeypatch.setattr(g, "LEASE_SECONDS", 0.05)
    run_sync(redis_url, lambda c: c.acquire(g.Lease("u1", "dead"), 1))  # never given back
    wait_for(lambda: run_sync(redis_url, lambda c: c.acquire(g.Lease("u1", "alive"), 1)) == 1, "the lease expires")


def test_cluster_quota_and_leases_for_users_on_two_masters(redis_cluster):
    client = redis.cluster.RedisCluster.from_url(g.with_timeouts(redis_cluster.url, 0.5))
    counters = g.RedisCounters(lambda: client, "tiers")
    users = [u for u in (f"user-{i}" for i in range(50))]
    first = users[0]
    master = redis_cluster.master_of
    other = next(u for u in users if master(redis_cluster.slot(f"{{{u}}}")) is not master(
        redis_cluster.slot(f"{{{first}}}")))  # fmt: skip
    try:
        for user in (first, other):
            counters.charge(user, QUOTA.windows, 18, LIVE_NOW)
        result = {u: (counters.quota_used(u, QUOTA, LIVE_NOW), [counters.acquire(g.Lease(u, f"{u}-{i}"), 1)
                                                           for i in range(2)]) for u in (first, other)}  # fmt: skip
    finally:
        client.close()
    assert list(result.values()) == [([18, 18], [1, 2])] * 2


# ---------------------------------------------------------------------------
# Found by the attacker review of issue 20
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("background", "valves", "reason"),
    [
        pytest.param("chat task", {"api_key_token_quota_user": "30/day"}, g.REASON_BACKGROUND, id="quota"),
        pytest.param("chat task", {"api_key_max_concurrent_user": 1}, g.REASON_BACKGROUND, id="concurrency"),
        pytest.param("chat task", {"api_key_rate_limit_user": "5/minute"}, g.REASON_ALLOWED, id="requests-only"),
        pytest.param("", {"api_key_token_quota_user": "30/day"}, g.REASON_ALLOWED, id="answered-in-the-request"),
    ],
)
def test_a_model_answering_after_the_request_is_refused_where_tokens_or_places_are_counted(background, valves, reason):
    assert g.decide(facts(background=background), policy(**valves)).reason == reason


@pytest.mark.parametrize(
    ("body", "background"),
    [
        pytest.param({"model": "m", "session_id": "s", "chat_id": "c"}, True, id="async-chat"),
        pytest.param({"model": "m", "session_id": "s", "parent_id": None}, True, id="async-new-chat"),
        pytest.param({"model": "m", "session_id": "s"}, True, id="session-only-refused-as-a-precaution"),
        pytest.param({"model": "m", "chat_id": "c", "session_id": ""}, False, id="empty-session"),
        pytest.param({"model": "m", "background": True}, True, id="provider-background-response"),
        pytest.param({"model": "m", "background": "transparent"}, False, id="image-edit-background-colour"),
        pytest.param({"model": "m", "background_tasks": {"title_generation": True}}, True, id="title-after-answer"),
        pytest.param({"model": "m", "background_tasks": {}}, False, id="no-background-tasks"),
        pytest.param({"model": "m", "stream": True}, False, id="plain-stream"),
    ],
)
def test_a_model_answering_after_the_request_is_seen_in_the_body(body, background):
    assert bool(g.model_of(body).background) is background


@pytest.mark.parametrize(
    ("body", "background"),
    [
        pytest.param({"input_file_id": "f", "endpoint": "/v1/chat/completions"}, True, id="batch"),
        pytest.param({"model": "m"}, True, id="any-json-object"),
        pytest.param(None, False, id="no-body"),
    ],
)
def test_a_json_body_through_the_proxy_may_answer_after_the_request(body, background):
    assert bool(g.proxied_model(body).background) is background


@pytest.mark.parametrize(
    ("names", "tier"),
    [
        pytest.param(["automation"], "api_key_tiers group:automation allowed_endpoints", id="by-name"),
        pytest.param([" automation "], "api_key_tiers group:automation allowed_endpoints", id="name-with-spaces"),
        pytest.param(["9b2f6c1e-1d2a-4c3b-8e7f-0a1b2c3d4e5f"], "api_key_allowed_endpoints_user", id="named-like-an-id"),
    ],
)
def test_a_group_named_like_another_groups_id_never_takes_its_tier(open_webui, names, tier):
    open_webui(Groups=Groups({"u-alice": names}))
    g._group_cache.clear()
    _, found = asyncio.run(g.user_groups("u-alice"))
    tiers = {"group:automation": {"allowed_endpoints": "*"}, "group:9b2f6c1e-1d2a-4c3b-8e7f-0a1b2c3d4e5f": {
        "allowed_endpoints": "*"}}  # fmt: skip
    chosen = policy(tiers).tier_for(facts(groups=found))
    assert chosen.valve("allowed_endpoints") == tier


def test_mentions_and_automations_answer_in_the_background():
    mention, automation = g.mentioned_model({"content": "<@M:m> hi"}), g.automation_model({"data": {"model_id": "m"}})
    assert (bool(mention.background), bool(automation.background), g.mentioned_model({"content": "hi"}).background) == (
        True,
        True,
        "",
    )


def test_a_database_error_reading_the_key_time_names_no_key(monkeypatch):
    class Broken:
        def connect(self):
            raise RuntimeError(
                "(sqlite3.OperationalError) no such table [SQL: SELECT ...] [parameters: ('sk-" + "a" * 32 + "',)]"
            )

    monkeypatch.setattr(g, "openwebui_engine", Broken)
    with pytest.raises(LookupError) as error:
        g.stored_key_time("u1", "sk-" + "a" * 32)
    assert "sk-" not in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("bad [SQL: SELECT 1] [parameters: ('sk-0123456789abcdef0123',)]", id="sqlalchemy-parameters"),
        pytest.param("token sk-0123456789abcdef0123 refused", id="a-key-in-any-text"),
    ],
)
def test_describe_never_carries_a_key(text):
    assert "0123456789abcdef" not in g.describe(RuntimeError(text))


def test_a_casefold_twin_email_is_another_user():
    """Core tells emails apart by lower(): U+017F (long s) lowers to itself, so it is not an 's'."""
    twin = {**ALICE, "email": "ci-bot\u017f@example.com"}
    tier = policy({"user:ci-bots@example.com": {"rate_limit": "1/day"}}).tier_for(facts(twin))
    assert tier.valve("rate_limit") == "api_key_rate_limit_user"
