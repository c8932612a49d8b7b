"""The rate limiter: parsing, exactness at window edges, memory bounds, headers, and a real Redis."""

import asyncio
import logging
import math
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from tests.conftest import Clock, error_lines, settle, wait_for
from tests.guard_loader import load_guard

block = load_guard()
COUNTERS_DEGRADED, COUNTERS_PER_WORKER, COUNTERS_REDIS = (
    block.COUNTERS_DEGRADED,
    block.COUNTERS_PER_WORKER,
    block.COUNTERS_REDIS,
)
Limiter, MemoryCounters, RateLimit, RedisCounters, Verdict = (
    block.Limiter,
    block.MemoryCounters,
    block.RateLimit,
    block.RedisCounters,
    block.Verdict,
)

FORM = block.RATE_LIMIT_FORM


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "windows", "policy"),
    [
        pytest.param("", (), "", id="empty-unlimited"),
        pytest.param("   ", (), "", id="blank-unlimited"),
        pytest.param("5/minute", ("5/minute",), '"minute";q=5;w=60', id="one"),
        pytest.param(
            "1000/day,60/minute",
            ("60/minute", "1000/day"),
            '"minute";q=60;w=60, "day";q=1000;w=86400',
            id="two-sorted-by-length",
        ),
        pytest.param(
            " 10 / Second , 5/HOUR ",
            ("10/second", "5/hour"),
            '"second";q=10;w=1, "hour";q=5;w=3600',
            id="spaces-and-case",
        ),
        pytest.param("007/minute", ("7/minute",), '"minute";q=7;w=60', id="leading-zeros"),
        pytest.param(
            "1/second,2/minute,3/hour,4/day",
            ("1/second", "2/minute", "3/hour", "4/day"),
            '"second";q=1;w=1, "minute";q=2;w=60, "hour";q=3;w=3600, "day";q=4;w=86400',
            id="all",
        ),
        pytest.param("5/minute,", ("5/minute",), '"minute";q=5;w=60', id="trailing-comma"),
    ],
)
def test_parse_valid(text, windows, policy):
    parsed = RateLimit.parse(text)
    assert {"windows": tuple(w.text for w in parsed.windows), "policy": parsed.policy} == {
        "windows": windows,
        "policy": policy,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("5", f"{FORM}; got '5'", id="no-unit"),
        pytest.param("0/minute", f"{FORM}; got '0/minute'", id="zero"),
        pytest.param("-1/minute", f"{FORM}; got '-1/minute'", id="negative"),
        pytest.param("1.5/minute", f"{FORM}; got '1.5/minute'", id="fraction"),
        pytest.param("5/minutes", f"{FORM}; got '5/minutes'", id="plural"),
        pytest.param("5/week", f"{FORM}; got '5/week'", id="unknown-unit"),
        pytest.param("5 per minute", f"{FORM}; got '5 per minute'", id="words"),
        pytest.param("5/minute;10/day", f"{FORM}; got '5/minute;10/day'", id="semicolon"),
        pytest.param("٥/minute", f"{FORM}; got '٥/minute'", id="non-ascii-digit"),
        pytest.param("5/minute,10/minute", f"{FORM}, each unit at most once; got 'minute' twice", id="duplicate"),
        pytest.param("5/Day, 6/day", f"{FORM}, each unit at most once; got 'day' twice", id="duplicate-case"),
    ],
)
def test_parse_invalid(text, message):
    with pytest.raises(ValueError) as raised:
        RateLimit.parse(text)
    assert str(raised.value) == message


def test_parse_is_cached():
    assert RateLimit.parse("5/minute") is RateLimit.parse("5/minute")


@pytest.mark.parametrize(
    ("text", "args"),
    [
        pytest.param("2/second,3/minute", "[2,1000000,0,3,60000000,0]", id="logs"),
        pytest.param("60/minute", "[60,60000000,0]", id="log-up-to-60"),
        pytest.param("61/minute", "[61,60000000,1000000]", id="buckets-above-60"),
        pytest.param("100000/day", "[100000,86400000000,1440000000]", id="day-in-24-minute-buckets"),
        pytest.param("1000/second", "[1000,1000000,16666]", id="second-in-integral-microseconds"),
    ],
)
def test_redis_args_are_limit_window_and_bucket_width_in_microseconds(text, args):
    assert RateLimit.parse(text).redis_args == args


# ---------------------------------------------------------------------------
# The algorithm, on an injected clock (no sleeping)
# ---------------------------------------------------------------------------
def replay(text: str, times: list[float]) -> list[str]:
    """'ok' or 'deny <window> <retry>' for each request at the given offsets."""
    clock, limit = Clock(), RateLimit.parse(text)
    counters, start, out = MemoryCounters(clock=clock), clock.now, []
    for offset in times:
        clock.now = start + offset
        v = counters.check("u1", limit)
        out.append("ok" if v.allowed else f"deny {v.window.text} {v.retry_after:.3f}")
    return out


@pytest.mark.parametrize(
    ("text", "times", "expected"),
    [
        pytest.param(
            "2/second",
            [0, 0.5, 0.999, 1.0, 1.2, 1.5],
            ["ok", "ok", "deny 2/second 0.001", "ok", "deny 2/second 0.300", "ok"],
            id="edge-exactly-one-window-later",
        ),
        pytest.param(
            "1/minute",
            [0, 30, 59.999, 60],
            ["ok", "deny 1/minute 30.000", "deny 1/minute 0.001", "ok"],
            id="denied-requests-not-recorded",
        ),
        pytest.param(
            "3/minute",
            [59, 59.5, 59.9, 60.1, 118.99, 119.0],
            ["ok", "ok", "ok", "deny 3/minute 58.900", "deny 3/minute 0.010", "ok"],
            id="no-2n-at-a-minute-boundary",
        ),
        pytest.param(
            "2/second,3/minute",
            [0, 0.1, 0.2, 1.0, 2.0, 60.0],
            ["ok", "ok", "deny 2/second 0.800", "ok", "deny 3/minute 58.000", "ok"],
            id="two-windows",
        ),
        pytest.param(
            "1/second,1/minute",
            [0, 0.5],
            ["ok", "deny 1/minute 59.500"],
            id="reports-the-window-freeing-last",
        ),
    ],
)
def test_sliding_window(text, times, expected):
    assert replay(text, times) == expected


def admitted_times(text: str, step: float, span: float) -> list[float]:
    """The times a limiter in process admitted, one check every `step` s for `span` s of a test clock."""
    clock, limit = Clock(0.0), RateLimit.parse(text)
    counters, times = MemoryCounters(clock=clock), []
    for i in range(int(span / step)):
        clock.now = i * step
        if counters.check("u1", limit).allowed:
            times.append(clock.now)
    return times


@pytest.mark.parametrize(
    ("text", "step", "span"),
    [
        pytest.param("5/second", 0.07, 20.0, id="5-per-second"),
        pytest.param("3/second,7/minute", 0.25, 200.0, id="two-windows"),
    ],
)
def test_never_more_than_n_in_any_window(text, step, span):
    limit, admitted = RateLimit.parse(text), admitted_times(text, step, span)
    worst = {w.text: max(sum(1 for t in admitted if a <= t < a + w.seconds) for a in admitted) for w in limit.windows}
    assert worst == {w.text: w.limit for w in limit.windows}


def test_lowered_limit_waits_for_enough_entries_to_leave():
    clock = Clock(0.0)
    counters = MemoryCounters(clock=clock)
    for t in (0, 10, 20):
        clock.now = t
        counters.check("u1", RateLimit.parse("3/minute"))
    clock.now = 30
    assert counters.check("u1", RateLimit.parse("1/minute")).retry_after == 50  # the entry at 20 must leave


def test_users_are_counted_apart():
    counters = MemoryCounters(clock=Clock())
    limit = RateLimit.parse("1/minute")
    assert [counters.check(u, limit).allowed for u in ("a", "b", "a")] == [True, True, False]


@pytest.mark.parametrize(
    ("times", "remaining", "reset"),
    [
        pytest.param([0], (1, 9), (1.0, 60.0), id="first"),
        pytest.param([0, 0.25], (0, 8), (0.75, 59.75), id="second"),
        pytest.param([0, 0.25, 0.5], (0, 8), (0.5, 59.5), id="denied-keeps-counts"),
    ],
)
def test_remaining_and_reset(times, remaining, reset):
    clock, limit = Clock(0.0), RateLimit.parse("2/second,10/minute")
    counters = MemoryCounters(clock=clock)
    for t in times:
        clock.now = t
        verdict = counters.check("u1", limit)
    assert {"remaining": verdict.remaining, "reset": verdict.reset} == {"remaining": remaining, "reset": reset}


# ---------------------------------------------------------------------------
# Memory bounds and threads
# ---------------------------------------------------------------------------
def test_memory_keeps_at_most_max_users_and_forgets_the_least_recent():
    counters, limit = MemoryCounters(max_users=3, clock=Clock()), RateLimit.parse("1/minute")
    for user in ("a", "b", "c", "a", "d"):  # "a" seen again, so "b" is the least recent when "d" arrives
        counters.check(user, limit)
    assert {"users kept": len(counters), "in order": list(counters._users)} == {
        "users kept": 3,
        "in order": ["c", "a", "d"],
    }


def test_forgotten_user_starts_from_zero():
    counters, limit = MemoryCounters(max_users=1, clock=Clock()), RateLimit.parse("1/minute")
    assert [counters.check(u, limit).allowed for u in ("a", "b", "a")] == [True, True, True]


def test_entries_per_window_never_exceed_its_limit():
    clock, limit = Clock(0.0), RateLimit.parse("3/second,5/minute")
    counters = MemoryCounters(clock=clock)
    for i in range(1000):
        clock.now = i * 0.01
        counters.check("u1", limit)
    assert {s: len(d) for s, d in counters._users["u1"].items()} == {(1, 0): 0, (60, 0): 5}


def most_in_any_window(times: list[float], seconds: float) -> int:
    """The most admissions in any interval (t - seconds, t]; its maximum is at an admission time."""
    return max((sum(t - seconds < u <= t for u in times) for t in times), default=0)


@pytest.mark.parametrize(
    ("text", "step", "span", "seconds", "limit"),
    [
        pytest.param("120/minute", 0.13, 300, 60, 120, id="minute-buckets"),
        pytest.param("61/second", 0.0037, 5, 1, 61, id="second-buckets"),
        pytest.param("100/second,150/minute", 0.0041, 30, 60, 150, id="two-bucketed-windows"),
    ],
)
def test_buckets_never_admit_more_than_n_in_any_window(text, step, span, seconds, limit):
    assert most_in_any_window(admitted_times(text, step, span), seconds) <= limit


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # 120 in the bucket [0, 1); the exact log would admit again at 60.5, buckets at 61 (one width later)
        pytest.param(
            [0.5] * 120 + [60.2, 60.6, 60.99, 61.0],
            ["deny 120/minute 0.800", "deny 120/minute 0.400", "deny 120/minute 0.010", "ok"],
            id="late-by-at-most-one-bucket",
        ),
    ],
)
def test_buckets_refuse_at_most_one_bucket_width_early(times, expected):
    assert replay("120/minute", times)[120:] == expected


def test_bucket_memory_is_bounded_whatever_the_rate():
    clock, limit = Clock(0.0), RateLimit.parse("1000/minute,100000/day")
    counters = MemoryCounters(clock=clock)
    for i in range(200_000):
        clock.now = i * 0.5  # a request every 0.5 s for 28 hours
        counters.check("u1", limit)
    assert {s: len(d) <= block.RATE_BUCKETS + 2 for s, d in counters._users["u1"].items()} == {
        (60, 60): True,
        (86400, 60): True,
    }


def test_threads_admit_exactly_the_limit():
    counters, limit = MemoryCounters(), RateLimit.parse("500/minute")
    allowed = []

    def hammer():
        allowed.extend(counters.check("u1", limit).allowed for _ in range(200))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {"admitted": allowed.count(True), "refused": allowed.count(False)} == {"admitted": 500, "refused": 1100}


# ---------------------------------------------------------------------------
# Headers and the reason text
# ---------------------------------------------------------------------------
MINUTE_DAY = RateLimit.parse("5/minute,1000/day")


@pytest.mark.parametrize(
    ("verdict", "headers"),
    [
        pytest.param(
            Verdict(True, COUNTERS_REDIS, None, 0.0, (4, 999), (60.0, 86400.0)),
            {
                "RateLimit-Policy": '"minute";q=5;w=60, "day";q=1000;w=86400',
                "RateLimit": '"minute";r=4;t=60, "day";r=999;t=86400',
            },
            id="allowed",
        ),
        pytest.param(
            Verdict(False, COUNTERS_PER_WORKER, MINUTE_DAY.windows[0], 11.2, (0, 995), (11.2, 80000.5)),
            {
                "RateLimit-Policy": '"minute";q=5;w=60, "day";q=1000;w=86400',
                "RateLimit": '"minute";r=0;t=12, "day";r=995;t=80001',
                "Retry-After": "12",
            },
            id="denied",
        ),
        pytest.param(
            Verdict(False, COUNTERS_DEGRADED, MINUTE_DAY.windows[0], 0.0004, (0, 995), (0.0004, 3.0000000001)),
            {
                "RateLimit-Policy": '"minute";q=5;w=60, "day";q=1000;w=86400',
                "RateLimit": '"minute";r=0;t=1, "day";r=995;t=3',
                "Retry-After": "1",
            },
            id="never-zero-no-float-fuzz",
        ),
    ],
)
def test_headers(verdict, headers):
    assert block.rate_limit_headers(MINUTE_DAY, verdict) == headers


def test_reason_text():
    verdict = Verdict(False, COUNTERS_REDIS, MINUTE_DAY.windows[0], 11.2, (0, 995), (11.2, 80000.5))
    fields = block.rate_limited_fields(verdict, "user", "api_key_rate_limit_user")
    assert block.REASON_TEXT[block.REASON_RATE_LIMITED].format(**fields) == (
        "API keys of role 'user' are limited to 5 per minute (api_key_rate_limit_user); retry in 12 s"
    )


@pytest.mark.parametrize(
    ("prefix", "base"),
    [
        pytest.param("open-webui", "open-webui:api_key_guard:rl:", id="default"),
        pytest.param("", "api_key_guard:rl:", id="empty-like-core-sessions"),
    ],
)
def test_redis_key_base(prefix, base):
    assert block.redis_key_base(prefix) == base


# ---------------------------------------------------------------------------
# A real Redis on 127.0.0.1, started and stopped here
# ---------------------------------------------------------------------------
def sync_checks(redis_url: str, user: str, text: str, n: int, prefix: str = "t", decode: bool = True) -> list[Verdict]:
    counters = RedisCounters(lambda: redis.Redis.from_url(redis_url, decode_responses=decode), prefix)
    return [counters.check(user, RateLimit.parse(text)) for _ in range(n)]


def async_checks(redis_url: str, user: str, text: str, n: int, prefix: str = "t", decode: bool = True) -> list[Verdict]:
    async def run():
        client = aredis.from_url(redis_url, decode_responses=decode)
        counters = RedisCounters(lambda: client, prefix)
        try:
            return [await counters.check(user, RateLimit.parse(text)) for _ in range(n)]
        finally:
            await client.aclose()

    return asyncio.run(run())


CLIENTS = [
    pytest.param(sync_checks, True, id="sync"),
    pytest.param(sync_checks, False, id="sync-bytes"),
    pytest.param(async_checks, True, id="async"),
    pytest.param(async_checks, False, id="async-bytes"),
]


@pytest.mark.parametrize(("checks", "decode"), CLIENTS)
def test_redis_admits_exactly_n(redis_url, checks, decode):
    verdicts = checks(redis_url, "u1", "5/minute,1000/day", 7, decode=decode)
    assert [(v.allowed, v.remaining, v.counters) for v in verdicts] == [
        (True, (4, 999), "redis"),
        (True, (3, 998), "redis"),
        (True, (2, 997), "redis"),
        (True, (1, 996), "redis"),
        (True, (0, 995), "redis"),
        (False, (0, 995), "redis"),
        (False, (0, 995), "redis"),
    ]


@pytest.mark.parametrize(("checks", "decode"), CLIENTS)
def test_redis_denial_names_window_and_wait(redis_url, checks, decode):
    denied = checks(redis_url, "u1", "2/minute,10/day", 3, decode=decode)[-1]
    assert denied.window.text == "2/minute"
    assert 59 < denied.retry_after <= 60, "retry when the minute's first entry leaves"
    assert 86399 < denied.reset[1] <= 86400, "the day's window resets a day after its first entry"


@pytest.mark.parametrize(("checks", "decode"), CLIENTS)
def test_redis_keys_ttl_and_hash_tag(redis_url, checks, decode):
    checks(redis_url, "user-1", "1/minute,1/hour", 1, prefix="open-webui", decode=decode)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ttls = {key: client.pttl(key) for key in client.keys("*")}
    assert sorted(ttls) == ["open-webui:api_key_guard:rl:{user-1}:3600", "open-webui:api_key_guard:rl:{user-1}:60"]
    outside = {key: ms for key, ms in ttls.items() if not 0 < ms <= int(key.rsplit(":", 1)[1]) * 1000}
    assert outside == {}, "each key expires within its window (ms)"


def test_redis_counts_are_shared_between_clients(redis_url):
    """Two clients stand for two workers or replicas."""
    first = sync_checks(redis_url, "u1", "5/minute", 3)
    second = async_checks(redis_url, "u1", "5/minute", 3)
    assert [v.allowed for v in first + second] == [True, True, True, True, True, False]


def test_redis_window_slides_on_server_time(redis_url):
    verdicts = sync_checks(redis_url, "u1", "2/second", 3)
    started = time.monotonic()
    counters = RedisCounters(lambda: redis.Redis.from_url(redis_url), "t")
    wait_for(lambda: counters.check("u1", RateLimit.parse("2/second")).allowed, "a free slot in 2/second", timeout=3)
    waited = time.monotonic() - started
    assert not verdicts[-1].allowed, "the third request within a second is refused"
    assert waited <= verdicts[-1].retry_after + 0.2, "a slot frees when Retry-After said it would"


def test_redis_lowered_limit_waits_for_enough_entries_to_leave(redis_url):
    sync_checks(redis_url, "u1", "3/minute", 3)
    denied = sync_checks(redis_url, "u1", "1/minute", 1)[0]
    assert {"allowed": denied.allowed, "remaining": denied.remaining} == {"allowed": False, "remaining": (0,)}
    assert 59 < denied.retry_after <= 60, "all three entries must leave, the first of them a minute on"


@pytest.mark.parametrize(("checks", "decode"), CLIENTS)
def test_redis_reloads_a_flushed_script(redis_url, checks, decode):
    checks(redis_url, "u1", "5/minute", 1, decode=decode)
    redis.Redis.from_url(redis_url).script_flush()
    assert [v.allowed for v in checks(redis_url, "u1", "5/minute", 5, decode=decode)] == [True] * 4 + [False]


def test_redis_member_is_unique_per_request(redis_url):
    sync_checks(redis_url, "u1", "60/minute", 50)  # 60: the largest limit that keeps the log
    assert redis.Redis.from_url(redis_url).zcard("t:api_key_guard:rl:{u1}:60") == 50


@pytest.mark.parametrize(("checks", "decode"), CLIENTS)
def test_redis_buckets_admit_exactly_n(redis_url, checks, decode):
    verdicts = checks(redis_url, "u1", "100/minute,1000/day", 102, decode=decode)
    assert [(v.allowed, v.remaining) for v in verdicts[98:]] == [
        (True, (1, 901)),
        (True, (0, 900)),
        (False, (0, 900)),
        (False, (0, 900)),
    ]


def test_redis_buckets_lowered_limit_waits_for_enough_buckets_to_leave(redis_url):
    sync_checks(redis_url, "u1", "100/minute", 100)
    denied = sync_checks(redis_url, "u1", "61/minute", 1)[0]
    assert {"allowed": denied.allowed, "remaining": denied.remaining} == {"allowed": False, "remaining": (0,)}
    assert 55 < denied.retry_after <= 61, "40 of the 100 must leave: a minute after their bucket (1 s) ends"


def test_redis_buckets_start_over_once_every_bucket_left(redis_url):
    full = sync_checks(redis_url, "u1", "61/second", 62)
    client = redis.Redis.from_url(redis_url)

    def server_now() -> float:  # the clock the script reads
        seconds, micros = client.time()
        return seconds + micros / 1e6

    filled = server_now()
    wait_for(lambda: server_now() > filled + 1.05, "the window (1 s) and its last bucket (17 ms) passed on Redis")
    again = sync_checks(redis_url, "u1", "61/second", 1)[0]
    fields = redis.Redis.from_url(redis_url, decode_responses=True).hgetall("t:api_key_guard:rl:{u1}:1:b60v2")
    assert {"full": full[-1].allowed, "again": (again.allowed, again.remaining), "fields": sorted(fields)} == {
        "full": False,
        "again": (True, (60,)),
        "fields": ["c", "hi", "lo", "n"],
    }


@pytest.mark.parametrize(
    ("text", "key", "ahead"),
    [
        pytest.param("3/minute", "t:api_key_guard:rl:{u1}:60", "log", id="log"),
        pytest.param("100/minute", "t:api_key_guard:rl:{u1}:60:b60v2", "buckets", id="buckets"),
    ],
)
def test_redis_counts_from_the_clock_going_back_do_not_lock_out(redis_url, text, key, ahead):
    """A failover to a replica whose clock is an hour behind: what was counted 'in the future' is
    dropped (admitting more), not waited for an hour."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    seconds, micros = client.time()
    later = (seconds + 3600) * 1_000_000 + micros
    if ahead == "log":
        client.zadd(key, {f"m{n}": later + n for n in range(3)})
    else:
        newest = later // 1_000_000
        client.hset(key, mapping={"n": 100, "lo": newest, "hi": newest, "c": 100})
    verdict = sync_checks(redis_url, "u1", text, 1)[0]
    assert {"allowed": verdict.allowed, "remaining": verdict.remaining} == {
        "allowed": True,
        "remaining": (RateLimit.parse(text).windows[0].limit - 1,),
    }


def test_a_mark_years_away_still_parses():
    """Lua writes numbers of 15 digits and more with an exponent; a mark that far is still a verdict."""
    verdict = block.verdict_from_reply(RateLimit.parse("3/minute"), b"3 2e+14")
    assert {"allowed": verdict.allowed, "retry_after": verdict.retry_after} == {
        "allowed": False,
        "retry_after": 2e8 + 60,
    }


def test_redis_buckets_are_hashes_with_bounded_fields_and_ttl(redis_url):
    sync_checks(redis_url, "u1", "1000/minute,100000/day", 20, prefix="open-webui")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(client.keys("*"))
    shapes = {k: (client.type(k), client.hlen(k) <= block.RATE_BUCKETS + 2, 0 < client.pttl(k)) for k in keys}
    assert shapes == {
        "open-webui:api_key_guard:rl:{u1}:60:b60v2": ("hash", True, True),
        "open-webui:api_key_guard:rl:{u1}:86400:b60v2": ("hash", True, True),
    }


SLIDES = 2  # the window slid past full this often: admitted > SLIDES * N
SLIDE_DEADLINE_SECONDS = 30.0  # a bound for a loaded machine; an unloaded one needs about SLIDES seconds


def test_redis_buckets_slide_and_keep_their_sum(redis_url):
    """61/second: buckets of 16.7 ms leave the window while checks keep arriving, until more than twice
    the limit was admitted (the buckets slid); never more than N in any second meanwhile."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    counters, limit = RedisCounters(lambda: client, "t"), RateLimit.parse("61/second")
    started, admitted = time.monotonic(), 0
    while admitted <= SLIDES * 61 and time.monotonic() - started < SLIDE_DEADLINE_SECONDS:
        admitted += counters.check("u1", limit).allowed
        time.sleep(0.002)  # pacing: checks spread over many buckets
    elapsed = time.monotonic() - started
    fields = client.hgetall("t:api_key_guard:rl:{u1}:1:b60v2")
    older = {k: int(v) for k, v in fields.items() if k not in ("n", "lo", "hi", "c")}
    buckets = older | {fields["hi"]: int(fields["c"])}  # the newest bucket's count is c
    assert {
        "slid": admitted > SLIDES * 61,
        "at most N per second": admitted <= 61 * (math.ceil(elapsed) + 1),
        "n is the sum": int(fields["n"]) == sum(buckets.values()),
        "lo is the oldest": int(fields["lo"]) == min(map(int, buckets)),
        "buckets kept": len(buckets) <= block.RATE_BUCKETS + 2,
    } == dict.fromkeys(("slid", "at most N per second", "n is the sum", "lo is the oldest", "buckets kept"), True)


def test_redis_buckets_and_log_windows_share_one_script(redis_url):
    """5/second keeps the log, 100/minute buckets; both in one atomic check."""
    verdicts = sync_checks(redis_url, "u1", "5/second,100/minute", 7)
    assert [v.allowed for v in verdicts] == [True] * 5 + [False, False]


# ---------------------------------------------------------------------------
# Degraded fallback: Redis stops, stalls and comes back
# ---------------------------------------------------------------------------
class Probe:
    """A Limiter over a real Redis with an injected clock for the retry and log timing."""

    def __init__(self, redis_url: str, asynchronous: bool, timeout: float = block.REDIS_TIMEOUT_SECONDS):
        self.asynchronous = asynchronous
        self.clock = Clock()
        self.runner = asyncio.Runner() if asynchronous else None
        # the guard's own client, as openwebui_redis builds it: timeouts in the URL, then bound_waits
        module = aredis if asynchronous else redis
        client = module.Redis.from_url(block.with_timeouts(redis_url, timeout))
        block.bound_waits(client, timeout)
        self.limiter = Limiter(RedisCounters(lambda: client, "t"), clock=self.clock, timeout=timeout)

    def check(self, text: str = "3/minute") -> Verdict:
        result = self.limiter.check("u1", RateLimit.parse(text))
        return self.runner.run(settle(result)) if self.asynchronous else result

    def close(self):
        if self.runner:
            self.runner.close()


def errors(caplog) -> int:
    """How many ERROR lines say the counters are degraded."""
    return sum("degraded" in line for line in error_lines(caplog))


@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_degraded_when_redis_stops_and_back_when_it_returns(redis_server, redis_url, caplog, asynchronous):
    caplog.set_level(logging.INFO, logger="api_key_guard")
    probe = Probe(redis_url, asynchronous)

    def seen(verdicts: list) -> dict:
        return {"verdicts": [v.counters for v in verdicts], "limiter": probe.limiter.counters, "errors": errors(caplog)}

    try:
        steps = {"redis up": seen([probe.check()])}
        redis_server.stop()
        served = [probe.check() for _ in range(4)]
        steps["redis stopped"] = seen(served)
        probe.clock.now += block.REDIS_RETRY_SECONDS
        steps["the retry fails: no second error yet"] = seen([probe.check()])
        probe.clock.now += block.DEGRADED_LOG_SECONDS
        steps["a minute later: one more error"] = seen([probe.check()])
        redis_server.start()
        steps["redis back, within the retry interval"] = seen([probe.check()])
        probe.clock.now += block.REDIS_RETRY_SECONDS
        steps["the next retry"] = seen([probe.check()])
    finally:
        probe.close()
    DOWN = "degraded; cause=unreachable"  # what the counters header says: degraded, and why
    assert steps == {
        "redis up": {"verdicts": ["redis"], "limiter": "redis", "errors": 0},
        "redis stopped": {"verdicts": ["degraded"] * 4, "limiter": DOWN, "errors": 1},
        "the retry fails: no second error yet": {"verdicts": ["degraded"], "limiter": DOWN, "errors": 1},
        "a minute later: one more error": {"verdicts": ["degraded"], "limiter": DOWN, "errors": 2},
        "redis back, within the retry interval": {"verdicts": ["degraded"], "limiter": DOWN, "errors": 2},
        "the next retry": {"verdicts": ["redis"], "limiter": "redis", "errors": 2},
    }
    assert [v.allowed for v in served] == [True, True, True, False], "3/minute holds in this worker meanwhile"


@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_stalled_redis_costs_one_bounded_wait_per_interval(redis_server, redis_url, asynchronous):
    probe = Probe(redis_url, asynchronous, timeout=0.3)
    try:
        probe.check()
        redis_server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        first = probe.check()
        first_wait = time.monotonic() - started
        started = time.monotonic()
        rest = [probe.check() for _ in range(20)]
        rest_wait = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        probe.close()
    assert {"first": first.counters, "rest": {v.counters for v in rest}} == {"first": "degraded", "rest": {"degraded"}}
    assert first_wait < 1.5, "the first check waits out one bounded timeout"
    assert rest_wait < 0.1, "the 20 checks within the retry interval wait for nothing"


# ---------------------------------------------------------------------------
# DirectLine: the scripts on connections of the guard's own, to one server
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "direct"),
    [
        pytest.param(lambda url: redis.Redis.from_url(url), True, id="sync"),
        pytest.param(lambda url: aredis.Redis.from_url(url), True, id="async"),
        pytest.param(lambda url: redis.Redis.from_url(url, protocol=3), True, id="resp3"),
        pytest.param(
            lambda url: redis.Redis.from_url(url, protocol=3, cache_config=redis.cache.CacheConfig()),
            False,
            id="client-side-cache",
        ),
        pytest.param(lambda url: redis.Redis.from_url(url, single_connection_client=True), False, id="one-connection"),
        pytest.param(
            lambda url: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url)), False, id="capped-pool"
        ),
        pytest.param(lambda url: redis.sentinel.Sentinel([("127.0.0.1", 1)]).master_for("m"), False, id="sentinel"),
        pytest.param(
            lambda url: OpenWebUISentinelProxy(redis.sentinel.Sentinel([("127.0.0.1", 1)])),
            False,
            id="open-webui-sentinel-proxy",
        ),
        pytest.param(lambda url: Answering({}), False, id="not-redis-py"),
    ],
)
def test_a_direct_line_only_to_one_server(redis_url, build, direct):
    assert (block.DirectLine.of(build(redis_url)) is not None) == direct


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(("PING",), id="one-word"),
        pytest.param(("EVALSHA", "0" * 40, 2, "rl:{u1}:60", "rl:{u1}:86400", "[5,60000000,0]"), id="a-check"),
        pytest.param(("ECHO", "line\r\n$3\r\nend"), id="protocol-bytes-inside-a-part"),
        pytest.param(("ECHO", "gr\u00fc\u00df \u2603"), id="utf-8"),
        pytest.param(("ECHO", b"\x00\xff", "", -7), id="bytes-empty-negative"),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(parts):
    assert block.resp_command(parts) == b"".join(redis.connection.Connection().pack_command(*parts))


def test_a_cluster_client_keeps_redis_pys_path(redis_cluster):
    assert block.DirectLine.of(redis.cluster.RedisCluster.from_url(redis_cluster.url)) is None


def connections_named(redis_url: str, name: str) -> int:
    """How many connections Redis has open under the client name `name`."""
    return sum(c["name"] == name for c in redis.Redis.from_url(redis_url).client_list())


def line_to(redis_url: str, asynchronous: bool, timeout: float = 0.3):
    client = (aredis if asynchronous else redis).Redis.from_url(block.with_timeouts(redis_url, timeout))
    return block.DirectLine.of(client)


def test_a_reply_never_answers_the_next_call_after_a_timeout(redis_server, redis_url):
    line = line_to(redis_url, asynchronous=False)
    line.call(("PING",))  # connected: the next command is sent at once, its reply is what times out
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(redis.TimeoutError):
            line.call(("ECHO", "first"))
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert (line.call(("ECHO", "second")), len(line.idle)) == (b"second", 1)


def test_a_reply_never_answers_the_next_call_after_a_cancel(redis_server, redis_url):
    line = line_to(redis_url, asynchronous=True)

    async def cancelled_then_next():
        await line.call_async(("PING",))  # connected: the next command is sent as its connection is taken
        redis_server.process.send_signal(signal.SIGSTOP)
        first = asyncio.ensure_future(line.call_async(("ECHO", "first")))
        while line.idle and not first.done():  # until it took the connection and sent: its reply is held
            await asyncio.sleep(0)
        first.cancel()
        redis_server.process.send_signal(signal.SIGCONT)
        with pytest.raises(asyncio.CancelledError):
            await first
        return await line.call_async(("ECHO", "second")), len(line.idle)

    try:
        assert asyncio.run(cancelled_then_next()) == (b"second", 1)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


def busy_connections(line, n: int, runner: asyncio.Runner | None = None) -> list[bytes]:
    """`n` calls at once on `line` (asyncio: on `runner`), each holding its connection ~0.2 s."""
    command = ("BLPOP", "nothing", "0.2")
    if not line.asynchronous:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: line.call(command), range(n)))

    async def at_once():
        return await asyncio.gather(*(line.call_async(command) for _ in range(n)), return_exceptions=True)

    return runner.run(at_once())


@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_connections_idle_across_a_redis_restart_are_replaced_without_degrading(
    redis_server, redis_url, caplog, asynchronous
):
    probe = Probe(redis_url, asynchronous)
    try:
        probe.check()
        line = probe.limiter.redis._line
        busy_connections(line, 3, probe.runner)
        idle = len(line.idle)
        redis_server.stop()
        redis_server.start()
        after = [probe.check().counters for _ in range(4)]
        connected = redis.Redis.from_url(redis_url).info("clients")["connected_clients"] - 1
    finally:
        probe.close()
    # a restart closed every other connection: the one left is the line's
    assert (idle, after, errors(caplog), len(line.idle), connected) == (3, ["redis"] * 4, 0, 1, 1)


class Refusing:
    """A connection that sends and then loses the connection before the reply, counting what it sent."""

    sent = 0

    def __init__(self, **kwargs):
        pass

    def send_packed_command(self, command, check_health=True):
        Refusing.sent += 1

    def read_response(self):
        raise ConnectionError("Connection closed by server.")

    def disconnect(self):
        pass


def test_no_command_is_sent_twice():
    pool = type("ConnectionPool", (), {"connection_class": Refusing, "connection_kwargs": {}, "max_connections": 9})
    line = block.DirectLine(pool, asynchronous=False)
    with pytest.raises(ConnectionError):
        line.call(("EVALSHA", "sha", 0))
    assert (Refusing.sent, line.idle) == (1, [])


def test_an_error_reply_keeps_its_connection(redis_url):
    line = line_to(redis_url, asynchronous=False)
    first = line.call(("CLIENT", "ID"))
    with pytest.raises(redis.exceptions.NoScriptError):
        line.call(("EVALSHA", "0" * 40, 0))
    assert (line.call(("CLIENT", "ID")), len(line.idle)) == (first, 1)


@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_calls_past_the_pools_max_connections_wait_for_one(redis_url, asynchronous):
    name = f"capped-{asynchronous}"
    client = (aredis if asynchronous else redis).Redis.from_url(redis_url, max_connections=3, client_name=name)
    line = block.DirectLine.of(client)
    with asyncio.Runner() as runner:
        started = time.monotonic()
        replies = busy_connections(line, 5, runner)
        waited = time.monotonic() - started
    assert (replies, len(line.idle), connections_named(redis_url, name)) == ([None] * 5, 3, 3)
    assert waited >= 0.4, "two of the five waited for a connection to come back"


def test_a_sync_call_waits_for_a_connection_no_longer_than_for_a_reply(redis_url):
    line = block.DirectLine.of(redis.Redis.from_url(block.with_timeouts(redis_url, 0.3), max_connections=1))
    line.gate.enter(1)  # the one connection, in use by another thread
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="all 1 connections to Redis stayed in use"):
        line.call(("PING",))
    waited = time.monotonic() - started
    line.gate.leave()
    assert (0.3 <= waited < 1.3, line.call(("PING",))) == (True, b"PONG")


def test_idle_connections_are_bounded(redis_url):
    line = block.DirectLine.of(aredis.Redis.from_url(redis_url, client_name="burst"))

    async def burst():
        return set(await asyncio.gather(*(line.call_async(("PING",)) for _ in range(line.IDLE_MAX + 20))))

    assert (asyncio.run(burst()), len(line.idle)) == ({b"PONG"}, line.IDLE_MAX)
    wait_for(lambda: connections_named(redis_url, "burst") == line.IDLE_MAX, "the burst's other connections closed")


def test_connections_never_cross_event_loops(redis_url):
    line = line_to(redis_url, asynchronous=True)
    assert [asyncio.run(line.call_async(("ECHO", str(n)))) for n in range(3)] == [b"0", b"1", b"2"]


# Deadlines: one timer per event loop bounds every await of the counters (asyncio.timeout made one per await)
class Answering:
    """An asyncio client whose script answers user `name` after waits[name] seconds (None: never)."""

    def __init__(self, waits: dict):
        self.waits = waits

    def evalsha(self, sha, numkeys, key, *args):
        wait = self.waits[key.split("{")[1].split("}")[0]]
        return asyncio.sleep(wait, result="0 0") if wait is not None else asyncio.Event().wait()


async def deadline_outcomes(seconds: float, waits: dict, cancel: tuple = (), expire_too: bool = False) -> dict:
    """A check per user at once through one limiter. `cancel`: cancelled from outside as soon as they
    wait, with `expire_too` while their deadline cancels them as well. What each task saw, whether it
    was left cancelling afterwards, and what the deadlines still hold."""
    limiter = Limiter(RedisCounters(lambda: Answering(waits), "t"), timeout=seconds)

    async def one(name: str) -> str:
        seen = (await limiter.check(name, RateLimit.parse("3/minute"))).counters
        await asyncio.sleep(0)  # still usable: not left cancelled
        return f"{seen}, cancelling={asyncio.current_task().cancelling()}"

    tasks = {name: asyncio.ensure_future(one(name)) for name in waits}
    await asyncio.sleep(0)  # every task now waits
    for name in cancel:
        tasks[name].cancel()
    if expire_too:
        limiter._deadlines.expire()  # their timer, firing before the tasks see the cancel
    outcomes = {}
    for name, task in tasks.items():
        try:
            outcomes[name] = await task
        except asyncio.CancelledError:
            outcomes[name] = "cancelled"
    return outcomes | {"left": (len(limiter._deadlines.pending), len(limiter._deadlines.expired))}


@pytest.mark.parametrize(
    ("seconds", "waits", "cancel", "expire_too", "outcomes"),
    [
        pytest.param(0.05, {"a": 0}, (), False, {"a": "redis, cancelling=0"}, id="answered"),
        pytest.param(0.05, {"a": None}, (), False, {"a": "degraded, cancelling=0"}, id="stalled"),
        pytest.param(
            0.05,
            {"a": None, "b": 0, "c": None, "d": 0.01},
            (),
            False,
            {
                "a": "degraded, cancelling=0",
                "b": "redis, cancelling=0",
                "c": "degraded, cancelling=0",
                "d": "redis, cancelling=0",
            },
            id="each-await-its-own",
        ),
        pytest.param(
            30,
            {"a": None, "b": 0},
            ("a",),
            False,
            {"a": "cancelled", "b": "redis, cancelling=0"},
            id="their-cancel-is-theirs",
        ),
        pytest.param(
            0,
            {"a": None, "b": None},
            ("a",),
            True,
            {"a": "cancelled", "b": "degraded, cancelling=0"},
            id="theirs-and-the-deadline-at-once-is-theirs",
        ),
    ],
)
def test_deadlines_bound_each_await_and_leave_other_cancels_alone(seconds, waits, cancel, expire_too, outcomes):
    assert asyncio.run(deadline_outcomes(seconds, waits, cancel, expire_too)) == outcomes | {"left": (0, 0)}


def test_counters_awaited_outside_a_task_count_per_worker(caplog):
    """Nothing could bound such a wait (Open WebUI never does it): degraded, not an error, not a hang."""

    class Never:  # an asyncio client's pending answer, awaitable, never answering
        def evalsha(self, *args):
            return self

        def __await__(self):
            yield

    limiter = Limiter(RedisCounters(Never, "t"), timeout=0.05)
    awaiting = limiter.check("u1", RateLimit.parse("3/minute"))
    with pytest.raises(StopIteration) as done:
        awaiting.send(None)  # driven by hand: no event loop, no task
    assert {"counters": done.value.value.counters, "errors": errors(caplog)} == {"counters": "degraded", "errors": 1}


def test_deadlines_follow_the_event_loop():
    """A limiter awaited from a second event loop (asyncio.run again) is bounded there too."""

    clock = Clock()
    stalled = RedisCounters(lambda: Answering({"u1": None}), "t")
    limiter = Limiter(stalled, MemoryCounters(clock=clock), clock=clock, timeout=0.05)

    def stalled_check() -> str:
        clock.now += block.REDIS_RETRY_SECONDS  # Redis is asked again
        checked = asyncio.wait_for(settle(limiter.check("u1", RateLimit.parse("3/minute"))), 5)
        return asyncio.run(checked).counters

    assert [stalled_check() for _ in range(2)] == ["degraded", "degraded"]


def test_redis_not_configured_counts_per_worker():
    limiter = Limiter(None, MemoryCounters(clock=Clock()))
    verdict = limiter.check("u1", RateLimit.parse("1/minute"))
    assert {"verdict": verdict.counters, "limiter": limiter.counters} == {
        "verdict": "per-worker",
        "limiter": "per-worker",
    }


def test_connect_failure_is_degraded_not_fatal(caplog):
    def refuse():
        raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    limiter = Limiter(RedisCounters(refuse, "t"), MemoryCounters(clock=Clock()), clock=Clock())
    verdict = limiter.check("u1", RateLimit.parse("1/minute"))
    assert {"allowed": verdict.allowed, "counters": verdict.counters, "errors logged": errors(caplog)} == {
        "allowed": True,
        "counters": "degraded",
        "errors logged": 1,
    }


def test_the_guards_own_client_has_bounded_timeouts_core_keeps_its_own(redis_url):
    own = redis.Redis.from_url(block.with_timeouts(redis_url, 0.5))
    shared = redis.Redis.from_url(redis_url, decode_responses=True)
    kwargs = own.connection_pool.connection_kwargs, shared.connection_pool.connection_kwargs
    assert (kwargs[0]["socket_timeout"], kwargs[0]["socket_connect_timeout"], "socket_timeout" in kwargs[1]) == (
        0.5,
        0.5,
        False,
    )


def test_log_line_never_names_the_user(redis_server, redis_url, caplog):
    probe = Probe(redis_url, asynchronous=False)
    redis_server.stop()
    probe.limiter.check("user-secret-id", RateLimit.parse("1/minute"))
    assert [r for r in caplog.records if "user-secret-id" in r.getMessage()] == []


# ---------------------------------------------------------------------------
# Bounded waits and named causes (issue 21): the guard's own client, and why Redis failed
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis://127.0.0.1:6379/0",
            "redis://127.0.0.1:6379/0?socket_timeout=0.5&socket_connect_timeout=0.5",
            id="plain",
        ),
        pytest.param(
            "rediss://u:p%40ss@h:6380/2?ssl_cert_reqs=none",
            "rediss://u:p%40ss@h:6380/2?ssl_cert_reqs=none&socket_timeout=0.5&socket_connect_timeout=0.5",
            id="tls-credentials-query-kept",
        ),
        pytest.param(
            "redis://h/0?socket_timeout=30&socket_connect_timeout=",
            "redis://h/0?socket_timeout=0.5&socket_connect_timeout=0.5",
            id="admins-timeouts-replaced",
        ),
        pytest.param(
            "redis://mymaster:6379/0",
            "redis://mymaster:6379/0?socket_timeout=0.5&socket_connect_timeout=0.5",
            id="sentinel",
        ),
    ],
)
def test_with_timeouts(url, expected):
    assert block.with_timeouts(url, 0.5) == expected


E = redis.exceptions
SCRIPT_READONLY = (
    "ERR Error running script (call to f_x): @user_script:12: -READONLY You can't write against a read only"
)


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        pytest.param(
            E.AuthenticationError("invalid username-password pair or user is disabled."), "auth", id="wrongpass"
        ),
        pytest.param(E.AuthenticationError("Authentication required."), "auth", id="noauth"),
        pytest.param(E.AuthenticationWrongNumberOfArgsError("wrong number"), "auth", id="auth-args"),
        pytest.param(E.ResponseError("WRONGPASS invalid username-password pair"), "auth", id="wrongpass-unmapped"),
        pytest.param(
            E.NoPermissionError("User u has no permissions to run the 'evalsha' command"), "noperm", id="noperm"
        ),
        pytest.param(
            E.ResponseError("NOPERM No permissions to access a key script: 1f0"), "noperm", id="noperm-in-script"
        ),
        pytest.param(E.MovedError("3999 127.0.0.1:6381"), "cluster", id="moved"),
        pytest.param(E.AskError("3999 127.0.0.1:6381"), "cluster", id="ask"),
        pytest.param(E.ClusterDownError("The cluster is down"), "clusterdown", id="clusterdown"),
        pytest.param(redis.sentinel.MasterNotFoundError("No master found for 'mymaster'"), "sentinel", id="no-master"),
        pytest.param(E.ReadOnlyError("You can't write against a read only replica."), "readonly", id="readonly"),
        pytest.param(E.ResponseError(SCRIPT_READONLY), "readonly", id="readonly-in-old-script-error"),
        pytest.param(E.TimeoutError("Timeout reading from socket"), "timeout", id="socket-timeout"),
        pytest.param(TimeoutError(), "timeout", id="asyncio-timeout"),
        pytest.param(
            E.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), "unreachable", id="refused"
        ),
        pytest.param(ConnectionError("Open WebUI returned no Redis client"), "unreachable", id="no-client"),
        pytest.param(E.ResponseError("ERR unknown command 'EVALSHA'"), "error", id="other-error"),
        pytest.param(ValueError("odd reply"), "error", id="not-redis"),
    ],
)
def test_redis_cause(exc, cause):
    assert (block.redis_cause(exc), cause in block.REDIS_CAUSES) == (cause, True)


class OpenWebUISentinelProxy:
    """The shape of Open WebUI's SentinelRedisProxy that bound_waits and DirectLine.of read: its Sentinel
    in `_sentinel`, every other attribute looked up on the master (which asks the sentinels)."""

    def __init__(self, sentinel):
        self._sentinel = sentinel

    def __getattr__(self, item):
        raise AssertionError(f"the guard asked the master for {item!r}")


def sentinel_settings(client) -> dict:
    sentinel = client._sentinel
    lookups = [s.connection_pool.connection_kwargs for s in sentinel.sentinels]
    return {
        "master": (
            sentinel.connection_kwargs.get("socket_timeout"),
            sentinel.connection_kwargs.get("socket_connect_timeout"),
        ),
        "lookups": sorted(
            {(k.get("socket_timeout"), k.get("socket_connect_timeout"), k["retry"].get_retries()) for k in lookups}
        ),
    }


def test_bound_waits_on_sentinel_lookups_and_master_not_on_cores_sentinel():
    """The releases' redis-py default to 3 (7.4) or 10 (8.x) retries with backoff on sentinel lookups."""
    own, cores, fresh = (
        OpenWebUISentinelProxy(redis.sentinel.Sentinel([("127.0.0.2", 1), ("127.0.0.3", 1)])) for _ in "abc"
    )
    changed = block.bound_waits(own, 0.5)
    assert (changed, sentinel_settings(own), sentinel_settings(cores) == sentinel_settings(fresh)) == (
        {"timeouts": 4, "retries": 2},
        {"master": (0.5, 0.5), "lookups": [(0.125, 0.125, 0)]},
        True,
    )


def test_bound_waits_on_a_standalone_client_changes_its_pool_only():
    client = redis.Redis.from_url("redis://127.0.0.1:1/0")
    assert (block.bound_waits(client, 0.5), client.connection_pool.connection_kwargs["socket_timeout"]) == (
        {"timeouts": 1, "retries": 0},
        0.5,
    )


def two_users_on_two_masters(redis_cluster) -> tuple[str, str]:
    """Two user ids whose counters live on different masters."""
    users = [f"user-{n}" for n in range(50)]
    first = users[0]
    master = redis_cluster.master_of(redis_cluster.slot(f"{{{first}}}"))
    return first, next(u for u in users if redis_cluster.master_of(redis_cluster.slot(f"{{{u}}}")) is not master)


def test_bound_waits_on_a_cluster_client_drops_its_retries(redis_cluster):
    client = redis.cluster.RedisCluster.from_url(block.with_timeouts(redis_cluster.url, 0.5))
    try:
        changed = block.bound_waits(client, 0.5)
        nodes = {n.redis_connection.connection_pool.connection_kwargs["socket_timeout"] for n in client.get_nodes()}
        assert (changed["retries"], client.retry.get_retries(), nodes) == (1, 0, {0.5})
    finally:
        client.close()


def test_cluster_counts_two_users_on_two_masters_exactly(redis_cluster):
    client = redis.cluster.RedisCluster.from_url(block.with_timeouts(redis_cluster.url, 0.5))
    counters = RedisCounters(lambda: client, "exact")
    try:
        verdicts = {
            u: [counters.check(u, RateLimit.parse("3/minute")).allowed for _ in range(4)]
            for u in two_users_on_two_masters(redis_cluster)
        }
    finally:
        client.close()
    assert list(verdicts.values()) == [[True, True, True, False]] * 2


@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_a_stalled_cluster_master_degrades_only_its_users(redis_cluster, asynchronous):
    """A master stalled (shorter than the Cluster's node timeout: no failover) degrades the users whose
    counters it keeps; a user on another master keeps counting in Redis, in the same worker."""
    stalled_user, other_user = two_users_on_two_masters(redis_cluster)
    master = redis_cluster.master_of(redis_cluster.slot(f"{{{stalled_user}}}"))
    module = redis.asyncio.cluster if asynchronous else redis.cluster
    runner = asyncio.Runner() if asynchronous else None
    client = module.RedisCluster.from_url(block.with_timeouts(redis_cluster.url, 0.2))
    block.bound_waits(client, 0.2)
    clock = Clock()
    limiter = Limiter(RedisCounters(lambda: client, "shards"), MemoryCounters(clock=clock), clock=clock, timeout=0.2)

    def check(user: str) -> str:
        verdict = limiter.check(user, RateLimit.parse("5/minute"))
        return (runner.run(settle(verdict)) if asynchronous else verdict).counters

    try:
        before = [check(stalled_user), check(other_user)]
        master.stall()
        try:
            during = [check(stalled_user), check(other_user)]
        finally:
            master.resume()
        states = {"stalled user": limiter.counters_for(stalled_user), "other": limiter.counters_for(other_user),
                  "worker": limiter.counters}  # fmt: skip
        clock.now += block.REDIS_RETRY_SECONDS
        after = [check(stalled_user), check(other_user)]
    finally:
        runner.run(client.aclose()) if asynchronous else client.close()
        if runner:
            runner.close()
    assert {"before": before, "during": during, "states": states, "after": after, "worker": limiter.counters} == {
        "before": ["redis", "redis"],
        "during": ["degraded", "redis"],
        "states": {"stalled user": "degraded; cause=timeout", "other": "redis", "worker": "degraded; cause=timeout"},
        "after": ["redis", "redis"],
        "worker": "redis",
    }


def test_a_prefix_with_a_hash_tag_keeps_every_user_on_one_master(redis_cluster):
    """REDIS_KEY_PREFIX={owui} puts every key in one slot: the users' counters fail together, one outage."""
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        tagged, plain = RedisCounters(lambda: client, "{owui}"), RedisCounters(lambda: client, "owui")
        for counters in (tagged, plain):
            counters.check("u1", RateLimit.parse("5/minute"))  # the client, resolved
        users = two_users_on_two_masters(redis_cluster)
        assert [len({c.shard(u) for u in users}) for c in (tagged, plain)] == [1, 2]
    finally:
        client.close()


def degraded_by(client, user: str = "u1", asynchronous: bool = False, text: str = "1/minute") -> tuple[str, bool]:
    """(the counters header value, admitted) for one check through a limiter over `client`."""
    limiter = Limiter(RedisCounters(lambda: client, "open-webui"), MemoryCounters(clock=Clock()), clock=Clock())
    verdict = limiter.check(user, RateLimit.parse(text))
    verdict = asyncio.run(settle(verdict)) if asynchronous else verdict
    return limiter.counters, verdict.allowed


def test_a_standalone_client_at_a_cluster_node_names_the_missing_cluster_setting(redis_cluster):
    """REDIS_URL at a cluster node without REDIS_CLUSTER=true: users on other masters get MOVED."""
    on_first, on_other = two_users_on_two_masters(redis_cluster)
    node = redis_cluster.master_of(redis_cluster.slot(f"{{{on_first}}}"))
    client = redis.Redis.from_url(node.url)
    assert (degraded_by(client, on_first), degraded_by(client, on_other)) == (
        ("redis", True),
        ("degraded; cause=cluster", True),
    )


# docs/topology.md (Permissions) and the noperm fix; pexpire last (the no-pexpire row leaves it out)
ACL_GUARD = ("+evalsha", "+eval", "+time", "+zremrangebyscore", "+zcard", "+zrange", "+zadd", "+zrem", "+get",
             "+incrby", "+expireat", "+hmget", "+hget", "+hdel", "+hexists", "+hset", "+del",
             "+pexpire")  # fmt: skip
TOPOLOGY_DOC = Path(__file__).resolve().parents[1] / "docs" / "topology.md"


def test_the_documented_permissions_are_what_the_scripts_run():
    texts = [v.text for v in vars(block).values() if isinstance(v, block.Script)]
    scripts = {f"+{c.lower()}" for text in texts for c in re.findall(r"redis\.call\('([A-Z]+)'", text)}
    paragraph = TOPOLOGY_DOC.read_text().split("### Permissions\n\n")[1].split("\n\n")[0]
    assert {
        "scripts and EVAL/EVALSHA": scripts | {"+evalsha", "+eval"},
        "docs": set(re.findall(r"\+[a-z]+", paragraph)),
    } == {
        "scripts and EVAL/EVALSHA": set(ACL_GUARD),
        "docs": set(ACL_GUARD),
    }


def test_the_noperm_fix_names_every_documented_permission():
    assert " ".join(ACL_GUARD) in " ".join(block.REDIS_CAUSES["noperm"][1].split())


def test_documented_permissions_cover_quotas_and_leases(redis_server, redis_url):
    redis_server.command("ACL", "SETUSER", "guard", "reset", "on", ">right", "~open-webui:api_key_guard:*", *ACL_GUARD)
    client = redis.Redis.from_url(f"redis://guard:right@127.0.0.1:{redis_server.port}/0")
    limiter = Limiter(RedisCounters(lambda: client, "open-webui"))
    quota, lease = block.TokenQuota.parse("30/day"), block.Lease("u1", "m1")
    now = time.time()
    limiter.charge("u1", quota.windows, 18, now)
    taken = limiter.acquire(lease, 1)
    limiter.renew(lease)
    limiter.release(lease)
    assert (limiter.quota_used("u1", quota, now), taken, limiter.counters) == ([18], 1, "redis")


@pytest.mark.parametrize(
    ("rules", "password", "counters"),
    [
        pytest.param(("~open-webui:api_key_guard:*", *ACL_GUARD), "right", "redis", id="documented-permissions"),
        pytest.param(("~*", "+@all", "-@scripting"), "right", "degraded; cause=noperm", id="no-scripting"),
        pytest.param(("~open-webui:config:*", *ACL_GUARD), "right", "degraded; cause=noperm", id="not-its-keys"),
        pytest.param(
            ("~open-webui:api_key_guard:*", *(c for c in ACL_GUARD if c != "+time")),
            "right",
            "degraded; cause=noperm",
            id="one-command-fewer",
        ),
        pytest.param(("~*", "+@all"), "wrong", "degraded; cause=auth", id="wrong-password"),
    ],
)
@pytest.mark.parametrize(
    "text", [pytest.param("1/minute", id="log"), pytest.param("100/minute,1000/day", id="buckets")]
)
@pytest.mark.parametrize("asynchronous", [pytest.param(False, id="sync"), pytest.param(True, id="async")])
def test_acl_users(redis_server, redis_url, rules, password, counters, text, asynchronous):
    redis_server.command("ACL", "SETUSER", "guard", "reset", "on", ">right", *rules)
    module = aredis if asynchronous else redis
    client = module.Redis.from_url(f"redis://guard:{password}@127.0.0.1:{redis_server.port}/0")
    assert degraded_by(client, asynchronous=asynchronous, text=text) == (counters, True)


def test_one_error_per_cause_and_the_fix_named(caplog):
    failures = iter([E.NoPermissionError("no permissions to run the 'evalsha' command")] * 2 + [E.TimeoutError("x")])

    def fail():
        raise next(failures)

    clock = Clock()
    limiter = Limiter(RedisCounters(fail, "t"), MemoryCounters(clock=clock), clock=clock)
    for _ in range(3):
        limiter.check("u1", RateLimit.parse("5/minute"))
        clock.now += block.REDIS_RETRY_SECONDS
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [(line.split("(cause=")[1].split(")")[0], "Fix: " in line) for line in lines] == [
        ("noperm", True),
        ("timeout", True),
    ]
