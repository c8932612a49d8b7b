"""
title: API Key Guard
author: API Key Guard developers
version: 0.1.0
required_open_webui_version: 0.6.0
license: MIT
description: Decide who may use API keys, and where: admin-only by default; roles, groups, users, endpoints per role.
"""

# Paste this whole file into Admin Panel -> Functions, id `api_key_guard`, then
# switch it on and make it global. The README explains every valve.
#
# Threat model in one paragraph: an API key is a bearer credential that lives
# in scripts, CI variables and notebooks, so it leaks far more easily than a
# browser session. Open WebUI lets any holder of a permitted key reach every
# route the owner can reach. This guard narrows that: only the principals the
# admin names may use keys at all, and each only on the endpoints and models
# listed for its role. Browser sessions are never judged here.

import asyncio
import collections
import contextvars
import fnmatch
import functools
import hashlib
import http.cookies
import inspect
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

log = logging.getLogger("api_key_guard")

# ---------------------------------------------------------------------------
# Reasons. Each decision carries one of these codes; REASON_TEXT turns it into
# the sentence an admin reads in the rejection and in the audit log.
# ---------------------------------------------------------------------------
REASON_SESSION = "session"
REASON_ALLOWED = "allowed"
REASON_BLOCKED_USER = "blocked_user"
REASON_NOT_ADMITTED = "not_admitted"
REASON_ENDPOINT = "endpoint_not_allowed"
REASON_MODEL = "model_not_allowed"
REASON_MODEL_UNREADABLE = "model_unreadable"
REASON_GUARD_ERROR = "guard_error"
REASON_RATE_LIMITED = "rate_limited"

REASON_TEXT = {
    REASON_SESSION: "browser session, not judged by API Key Guard",
    REASON_ALLOWED: "allowed by the API key policy",
    REASON_BLOCKED_USER: "this user may never use API keys (api_key_blocked_users)",
    REASON_NOT_ADMITTED: (
        "API keys are not enabled for role '{role}' (api_key_roles), "
        "nor for this user's groups (api_key_groups) or account (api_key_users)"
    ),
    REASON_ENDPOINT: "API keys of role '{role}' may not call {path} ({valve})",
    REASON_MODEL: "API keys of role '{role}' may not use model '{model}' ({valve})",
    REASON_MODEL_UNREADABLE: (
        "API keys of role '{role}' may only use the models in {valve}, and the model of this request "
        "cannot be checked: {problem}"
    ),
    REASON_RATE_LIMITED: "API keys of role '{role}' are limited to {limit} per {unit} ({valve}); retry in {seconds} s",
    REASON_GUARD_ERROR: (
        "API Key Guard could not evaluate this API key request and denied it; "
        "an administrator must check the server log"
    ),
}

ROLES = ("admin", "user", "pending")
DEFAULT_BLOCK_MESSAGE = "API Key Guard: {reason}"
ENV_PREFIX = "API_KEY_GUARD_"
# The names used in the original feature request; accepted as env defaults.
LEGACY_ENV = {
    "api_key_allowed_endpoints_admin": "API_KEY_ALLOWED_ENDPOINTS_ADMIN",
    "api_key_allowed_endpoints_user": "API_KEY_ALLOWED_ENDPOINTS_USER",
}
# How long a user's group membership and the stored valves are trusted before
# they are read again. A user removed from an admitted group loses key access
# at most this many seconds later.
GROUPS_TTL_SECONDS = 10.0
FUNCTION_STATE_TTL_SECONDS = 2.0
# Test harnesses only: one short lifetime for both caches, so a suite waits
# for a change in fractions of a second instead of sleeping out the TTLs.
if os.environ.get("API_KEY_GUARD_TEST_CACHE_SECONDS"):
    GROUPS_TTL_SECONDS = FUNCTION_STATE_TTL_SECONDS = float(os.environ["API_KEY_GUARD_TEST_CACHE_SECONDS"])
CACHE_MAX_ENTRIES = 4096


# ---------------------------------------------------------------------------
# Rate limits. A leaked key is also a cost problem: a script looping on
# /openai/chat/completions spends the owner's model budget at machine speed.
# The valves api_key_rate_limit_admin / _user cap admitted API-key requests per
# user, on every route the guard sees, in one or more windows.
# ---------------------------------------------------------------------------

RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
RATE_LIMIT_FORM = (
    "expected comma-separated N/second, N/minute, N/hour or N/day with N a positive integer "
    "(e.g. '60/minute,1000/day'), or empty for no limit"
)
_RATE_ITEM = re.compile(r"([0-9]+)\s*/\s*([A-Za-z]+)")

# Where the counters live; sent as X-API-Key-Guard-Counters and shown by `install.py status`.
COUNTERS_REDIS = "redis"  # shared by every worker and replica
COUNTERS_PER_WORKER = "per-worker"  # no Redis configured: each process counts alone
COUNTERS_DEGRADED = "degraded"  # Redis configured but failing: per process until it answers again

# Longest the guard waits for Redis before counting in process instead. A stalled
# Redis must not turn the limiter into an outage for admitted keys.
REDIS_TIMEOUT_SECONDS = 0.5
# After a failure, Redis is tried again at most this often (one probing request per
# worker); every other request meanwhile counts in process at memory speed.
REDIS_RETRY_SECONDS = 5.0
DEGRADED_LOG_SECONDS = 60.0
# Users whose request times are kept per process; the least recently seen user is
# forgotten first (its counters restart from zero if it comes back).
RATE_MAX_USERS = 10_000


@dataclass(frozen=True)
class Window:
    limit: int
    unit: str
    seconds: int
    text: str  # "5/minute", as written in the audit log
    policy_item: str  # '"minute";q=5;w=60', one RateLimit-Policy item


@dataclass(frozen=True)
class RateLimit:
    """The windows of one rate-limit valve, parsed once; no windows = unlimited."""

    windows: tuple[Window, ...]
    policy: str  # RateLimit-Policy header value
    redis_args: tuple[str, ...]  # (limit, window in µs) per window, the Lua script's ARGV

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> "RateLimit":
        windows: dict[str, Window] = {}
        for item in split_list(text):
            match = _RATE_ITEM.fullmatch(item)
            unit = match.group(2).lower() if match else ""
            if not match or unit not in RATE_UNITS or int(match.group(1)) < 1:
                raise ValueError(f"{RATE_LIMIT_FORM}; got {item!r}")
            if unit in windows:
                raise ValueError(f"{RATE_LIMIT_FORM}, each unit at most once; got {unit!r} twice")
            limit, seconds = int(match.group(1)), RATE_UNITS[unit]
            windows[unit] = Window(limit, unit, seconds, f"{limit}/{unit}", f'"{unit}";q={limit};w={seconds}')
        ordered = tuple(sorted(windows.values(), key=lambda w: w.seconds))
        return cls(
            ordered,
            ", ".join(w.policy_item for w in ordered),
            tuple(str(n) for w in ordered for n in (w.limit, w.seconds * 1_000_000)),
        )


# ---------------------------------------------------------------------------
# The algorithm: a sliding-window log. Each window keeps the times of the
# requests it admitted; a request is admitted only if every window holds fewer
# than its limit after dropping entries older than the window, and only then is
# it recorded (denied requests are not: a client hammering while limited does
# not extend its own ban). This is exact: no interval of a window's length ever
# contains more than N admitted requests. A fixed window (counter per calendar
# minute) admits 2N around a boundary (N at :59, N at :00); GCRA / token bucket
# with burst N and rate N/w admits the burst and then the refill, up to ~2N in
# one window. Memory is at most N entries per window and user.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    allowed: bool
    counters: str  # COUNTERS_*
    window: Window | None = None  # denied: the violated window that frees up last
    retry_after: float = 0.0  # denied: seconds until this request would be admitted
    remaining: tuple[int, ...] = ()  # per window, after this request
    reset: tuple[float, ...] = ()  # per window, seconds until its next counted request leaves


def weigh(limit: RateLimit, now: float, counts: list[int], marks: list[float | None], counters: str) -> Verdict:
    """The verdict from each window's count before this request and the time of
    its entry that must leave first for the count to drop below the limit
    (the oldest, or the (count-limit+1)th oldest after a limit was lowered)."""
    violated, retry = None, 0.0
    for window, count, mark in zip(limit.windows, counts, marks, strict=True):
        if count >= window.limit and (violated is None or mark + window.seconds - now > retry):
            violated, retry = window, mark + window.seconds - now
    allowed = violated is None
    return Verdict(
        allowed,
        counters,
        violated,
        retry,
        tuple(max(w.limit - c - allowed, 0) for w, c in zip(limit.windows, counts, strict=True)),
        tuple(w.seconds if m is None else m + w.seconds - now for w, m in zip(limit.windows, marks, strict=True)),
    )


class MemoryCounters:
    """Per-process logs: one deque of admitted times per user and window.

    Thread-safe: on Open WebUI 0.6-0.8 the check runs in the threadpool that
    serves sync dependencies, so two requests of one user can race here."""

    def __init__(self, max_users: int = RATE_MAX_USERS, clock: Callable[[], float] = time.monotonic):
        self.max_users = max_users
        self.clock = clock
        self._users: collections.OrderedDict[str, dict[int, collections.deque]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, user_id: str, limit: RateLimit, counters: str = COUNTERS_PER_WORKER) -> Verdict:
        with self._lock:
            now = self.clock()
            logs = self._users.get(user_id)
            if logs is None:
                while len(self._users) >= self.max_users:
                    self._users.popitem(last=False)
                logs = self._users[user_id] = {}
            else:
                self._users.move_to_end(user_id)
            entries = []
            for window in limit.windows:
                entry = logs.get(window.seconds)
                if entry is None:
                    entry = logs[window.seconds] = collections.deque()
                entries.append(entry)
            counts, marks = [], []
            for window, entry in zip(limit.windows, entries, strict=True):
                horizon = now - window.seconds
                while entry and entry[0] <= horizon:
                    entry.popleft()
                counts.append(len(entry))
                marks.append(entry[max(len(entry) - window.limit, 0)] if entry else None)
            verdict = weigh(limit, now, counts, marks, counters)
            if verdict.allowed:
                for entry in entries:
                    entry.append(now)
            return verdict

    def __len__(self) -> int:
        return len(self._users)


# One round trip, atomic across all windows of a user. Times come from the Redis
# server (TIME), not from the workers: replicas with skewed clocks would otherwise
# expire each other's entries early or late. TIME before writes needs effects
# replication: the default from Redis 5, the only mode from 7; replicate_commands()
# switches it on for 3.2-4 and is a no-op later. Scores are integer µs (< 2^53).
RATE_LIMIT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local reply = {1, now}
for i, key in ipairs(KEYS) do
  local limit, span = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now - span))
  local count = redis.call('ZCARD', key)
  local mark = -1
  if count > 0 then
    local index = math.max(count - limit, 0)
    mark = tonumber(redis.call('ZRANGE', key, index, index, 'WITHSCORES')[2])
  end
  if count >= limit then reply[1] = 0 end
  reply[2 * i + 1], reply[2 * i + 2] = count, mark
end
if reply[1] == 1 then
  local score = string.format('%.0f', now)
  for i, key in ipairs(KEYS) do
    redis.call('ZADD', key, score, ARGV[1])
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 * i + 1]) / 1000))
  end
end
return reply
"""
RATE_LIMIT_SHA = hashlib.sha1(RATE_LIMIT_LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1
# A member must be unique across workers and replicas: a random process nonce plus a counter.
_MEMBER_NONCE = os.urandom(8).hex()
_member_serial = itertools.count()


def redis_key_base(prefix: str) -> str:
    """Open WebUI's REDIS_KEY_PREFIX namespace; no leading ':' when it is empty (as core's session keys)."""
    return f"{prefix}:api_key_guard:rl:" if prefix else "api_key_guard:rl:"


def is_noscript(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoScriptError"


def verdict_from_reply(limit: RateLimit, reply: list) -> Verdict:
    now = int(reply[1]) / 1e6
    counts = [int(c) for c in reply[2::2]]
    marks = [None if int(m) < 0 else int(m) / 1e6 for m in reply[3::2]]
    return weigh(limit, now, counts, marks, COUNTERS_REDIS)


class RedisCounters:
    """Shared logs in Redis, one sorted set per user and window:
    `{prefix}:api_key_guard:rl:{<user id>}:<window seconds>`. The braces are a
    Redis Cluster hash tag: all windows of a user live in one slot, so one
    script can touch them atomically. Works with a sync or an asyncio client;
    with an asyncio client check() returns an awaitable."""

    def __init__(self, connect: Callable[[], Any], prefix: str):
        self.connect = connect  # Open WebUI's client, resolved on first use and again after a failure to build it
        self.base = redis_key_base(prefix)
        self._client = None

    def check(self, user_id: str, limit: RateLimit) -> Verdict | Awaitable[Verdict]:
        client = self._client if self._client is not None else self._resolve()
        keys = [f"{self.base}{{{user_id}}}:{w.seconds}" for w in limit.windows]
        args = (f"{_MEMBER_NONCE}:{next(_member_serial)}", *limit.redis_args)
        try:
            reply = client.evalsha(RATE_LIMIT_SHA, len(keys), *keys, *args)
        except Exception as exc:
            if not is_noscript(exc):
                raise
            reply = client.eval(RATE_LIMIT_LUA, len(keys), *keys, *args)
        if inspect.isawaitable(reply):
            return self._settle(client, reply, limit, keys, args)
        return verdict_from_reply(limit, reply)

    async def _settle(self, client: Any, reply: Awaitable, limit: RateLimit, keys: list, args: tuple) -> Verdict:
        try:
            reply = await reply
        except Exception as exc:
            if not is_noscript(exc):
                raise
            reply = await client.eval(RATE_LIMIT_LUA, len(keys), *keys, *args)
        return verdict_from_reply(limit, reply)

    def _resolve(self) -> Any:
        client = self.connect()
        if client is None:
            raise ConnectionError("Open WebUI returned no Redis client")
        self._client = client
        return client


class Limiter:
    """Redis when configured; per process when not, or while Redis fails.

    A limiter that can lock everybody out is worse than none: any Redis error
    (refused, timeout, script error) makes this worker count in process and
    report `degraded`. Redis is then skipped entirely until REDIS_RETRY_SECONDS
    have passed; the first request after that probes it (the retry time is
    claimed before the probe, so concurrent requests count in process instead
    of queueing behind a dead Redis; unlocked, so two threads may rarely both probe)."""

    def __init__(
        self,
        redis: RedisCounters | None,
        memory: MemoryCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = REDIS_TIMEOUT_SECONDS,
        retry_seconds: float = REDIS_RETRY_SECONDS,
    ):
        self.redis = redis
        self.memory = memory or MemoryCounters()
        self.clock = clock
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self._retry_at: float | None = None  # set while degraded
        self._logged_at: float | None = None

    @property
    def counters(self) -> str:
        if self.redis is None:
            return COUNTERS_PER_WORKER
        return COUNTERS_REDIS if self._retry_at is None else COUNTERS_DEGRADED

    def check(self, user_id: str, limit: RateLimit) -> Verdict | Awaitable[Verdict]:
        if self.redis is None:
            return self.memory.check(user_id, limit)
        if self._retry_at is not None:
            now = self.clock()
            if now < self._retry_at:
                return self.memory.check(user_id, limit, COUNTERS_DEGRADED)
            self._retry_at = now + self.retry_seconds
        try:
            verdict = self.redis.check(user_id, limit)
        except Exception as exc:
            return self._fall_back(exc, user_id, limit)
        if inspect.isawaitable(verdict):
            return self._bounded(verdict, user_id, limit)
        return self._recovered(verdict)

    async def _bounded(self, pending: Awaitable[Verdict], user_id: str, limit: RateLimit) -> Verdict:
        try:
            async with asyncio.timeout(self.timeout):
                verdict = await pending
        except Exception as exc:  # TimeoutError included; a cancelled request (BaseException) propagates
            return self._fall_back(exc, user_id, limit)
        return self._recovered(verdict)

    def _fall_back(self, exc: Exception, user_id: str, limit: RateLimit) -> Verdict:
        now = self.clock()
        self._retry_at = now + self.retry_seconds
        if self._logged_at is None or now - self._logged_at >= DEGRADED_LOG_SECONDS:
            self._logged_at = now
            detail = " ".join(str(exc).split())[:200]
            log.error(
                "api_key_guard rate-limit counters degraded: Redis failed (%s); counting per worker, "
                "retrying Redis every %.0f s",
                f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__,
                self.retry_seconds,
            )
        return self.memory.check(user_id, limit, COUNTERS_DEGRADED)

    def _recovered(self, verdict: Verdict) -> Verdict:
        if self._retry_at is not None:
            self._retry_at, self._logged_at = None, None
            log.warning("api_key_guard rate-limit counters: Redis answers again; counting in Redis")
        return verdict


# ---------------------------------------------------------------------------
# Open WebUI's Redis, reached through its own helpers (Sentinel, Cluster, URL,
# credentials as the admin configured them); the guard never imports redis.
# ---------------------------------------------------------------------------
def openwebui_env() -> Any:
    env = sys.modules.get("open_webui.env")
    if env is None:
        raise LookupError("open_webui.env is not loaded")
    return env


def redis_configured() -> bool:
    env = openwebui_env()
    return bool(getattr(env, "REDIS_URL", "") or getattr(env, "REDIS_SENTINEL_HOSTS", ""))


def openwebui_redis(asynchronous: bool) -> Any:
    """The asyncio client core itself uses (app.state.redis), or for sync
    Open WebUI (0.6-0.8) a sync client of the guard's own (decode_responses=False
    makes it a separate cached instance), with short socket timeouts."""
    env = openwebui_env()
    helpers = sys.modules["open_webui.utils.redis"]
    client = helpers.get_redis_connection(
        redis_url=env.REDIS_URL,
        redis_sentinels=helpers.get_sentinels_from_env(env.REDIS_SENTINEL_HOSTS, env.REDIS_SENTINEL_PORT),
        redis_cluster=env.REDIS_CLUSTER,
        async_mode=asynchronous,
        decode_responses=asynchronous,
    )
    if client is not None and not asynchronous:
        shorten_timeouts(client, REDIS_TIMEOUT_SECONDS)
    return client


def shorten_timeouts(client: Any, seconds: float) -> int:
    """Lower the socket timeouts of connections this sync client opens from now on;
    redis-py 7.x (Open WebUI 0.8) waits forever on a stalled Redis by default.
    Returns how many connection settings were changed (standalone, Sentinel, Cluster)."""
    pools = [
        getattr(getattr(client, "connection_pool", None), "connection_kwargs", None),
        getattr(getattr(client, "_sentinel", None), "connection_kwargs", None),
        getattr(getattr(client, "nodes_manager", None), "connection_kwargs", None),
    ]
    nodes = client.get_nodes() if hasattr(client, "nodes_manager") else []
    pools += [node.redis_connection.connection_pool.connection_kwargs for node in nodes if node.redis_connection]
    changed = [kwargs for kwargs in pools if isinstance(kwargs, dict)]
    for kwargs in changed:
        kwargs.update(socket_timeout=seconds, socket_connect_timeout=seconds)
    return len(changed)


_limiter: Limiter | None = None


def limiter() -> Limiter:
    """This process's limiter, built on first use: Redis through Open WebUI when it has Redis."""
    global _limiter
    if _limiter is None:
        _limiter = build_limiter()
    return _limiter


def build_limiter() -> Limiter:
    try:
        if not redis_configured():
            return Limiter(None)
        # Sync Open WebUI (0.6-0.8) judges keys in a threadpool without an event loop: sync client there.
        asynchronous = inspect.iscoroutinefunction(openwebui_model("users", "Users").get_user_by_api_key)
        prefix = str(getattr(openwebui_env(), "REDIS_KEY_PREFIX", "open-webui"))
        return Limiter(RedisCounters(lambda: openwebui_redis(asynchronous), prefix))
    except LookupError:  # not inside Open WebUI (tests, linters)
        return Limiter(None)


# ---------------------------------------------------------------------------
# What a client is told: Retry-After, the IETF httpapi RateLimit-Policy and
# RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10/11: structured-field
# lists, one item per window named by its unit, q = quota, w = window seconds,
# r = remaining, t = seconds until the quota starts coming back), and where the
# counters live. Chosen over X-RateLimit-*: that trio has no single definition
# and cannot describe two windows at once.
# ---------------------------------------------------------------------------
def whole_seconds(seconds: float) -> int:
    """Round up to the next second (never 0): retrying earlier is denied again."""
    return max(1, math.ceil(round(seconds, 6)))


def ratelimit_value(limit: RateLimit, verdict: Verdict) -> str:
    return ", ".join(
        f'"{w.unit}";r={r};t={whole_seconds(t)}'
        for w, r, t in zip(limit.windows, verdict.remaining, verdict.reset, strict=True)
    )


def rate_limit_headers(limit: RateLimit, verdict: Verdict) -> dict[str, str]:
    headers = {"RateLimit-Policy": limit.policy, "RateLimit": ratelimit_value(limit, verdict)}
    if not verdict.allowed:
        headers["Retry-After"] = str(whole_seconds(verdict.retry_after))
    return headers


def rate_limited_fields(verdict: Verdict, role: str, valve: str) -> dict[str, Any]:
    """The fields of the rate_limited reason text for a denied verdict."""
    window = verdict.window
    return {
        "role": role,
        "limit": window.limit,
        "unit": window.unit,
        "valve": valve,
        "seconds": whole_seconds(verdict.retry_after),
    }


# ---------------------------------------------------------------------------
# Policy: the valves, parsed and validated once, precomputed for cheap lookups.
# ---------------------------------------------------------------------------
def split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


@dataclass(frozen=True)
class PathList:
    """Path prefixes matched at a `/` boundary; `*` admits every path."""

    admits_all: bool
    exact: frozenset
    under: tuple[str, ...]  # each prefix + "/", for one str.startswith call

    @classmethod
    def parse(cls, text: str) -> "PathList":
        items = split_list(text)
        bad = [item for item in items if item != "*" and not item.startswith("/")]
        if bad:
            raise ValueError(f"expected '*' or paths starting with '/', got {bad[0]!r}")
        prefixes = sorted({item.rstrip("/") for item in items if item != "*"})
        return cls("*" in items or "" in prefixes, frozenset(prefixes), tuple(p + "/" for p in prefixes))

    def admits(self, path: str) -> bool:
        return self.admits_all or path in self.exact or path.startswith(self.under)


@dataclass(frozen=True)
class ModelList:
    """Model ids, exact or as shell-style globs (`gpt-4*`); `*` admits all."""

    admits_all: bool
    exact: frozenset
    pattern: re.Pattern | None

    @classmethod
    def parse(cls, text: str) -> "ModelList":
        items = split_list(text)
        globs = [item for item in items if any(c in item for c in "*?[")]
        pattern = None
        if globs:
            pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))
        return cls("*" in items, frozenset(items), pattern)

    def admits(self, model: str) -> bool:
        if self.admits_all or model in self.exact:
            return True
        return self.pattern is not None and self.pattern.match(model) is not None


def parse_roles(text: str) -> frozenset:
    roles = frozenset(item.casefold() for item in split_list(text))
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"expected roles from {', '.join(ROLES)}, got {unknown[0]!r}")
    return roles


def parse_names(text: str) -> frozenset:
    return frozenset(item.casefold() for item in split_list(text))


@dataclass(frozen=True)
class Policy:
    enforce: bool
    api_key_roles: frozenset
    api_key_groups: frozenset
    api_key_users: frozenset
    api_key_blocked_users: frozenset
    allowed_endpoints_admin: PathList
    allowed_endpoints_user: PathList
    allowed_models_admin: ModelList
    allowed_models_user: ModelList
    rate_limit_admin: RateLimit
    rate_limit_user: RateLimit


@functools.lru_cache(maxsize=32)
def compile_policy(
    mode: str,
    roles: str,
    groups: str,
    users: str,
    blocked: str,
    endpoints_admin: str,
    endpoints_user: str,
    models_admin: str,
    models_user: str,
    rate_admin: str,
    rate_user: str,
) -> Policy:
    if mode not in ("enforce", "monitor"):
        raise ValueError(f"mode must be 'enforce' or 'monitor', got {mode!r}")
    return Policy(
        enforce=mode == "enforce",
        api_key_roles=parse_roles(roles),
        api_key_groups=parse_names(groups),
        api_key_users=parse_names(users),
        api_key_blocked_users=parse_names(blocked),
        allowed_endpoints_admin=PathList.parse(endpoints_admin),
        allowed_endpoints_user=PathList.parse(endpoints_user),
        allowed_models_admin=ModelList.parse(models_admin),
        allowed_models_user=ModelList.parse(models_user),
        rate_limit_admin=RateLimit.parse(rate_admin),
        rate_limit_user=RateLimit.parse(rate_user),
    )


def policy_from_valves(valves: Any) -> Policy:
    if getattr(valves, "_invalid", None):
        raise ValueError(f"stored valves are unusable: {valves._invalid}")
    return compile_policy(
        valves.mode,
        valves.api_key_roles,
        valves.api_key_groups,
        valves.api_key_users,
        valves.api_key_blocked_users,
        valves.api_key_allowed_endpoints_admin,
        valves.api_key_allowed_endpoints_user,
        valves.api_key_allowed_models_admin,
        valves.api_key_allowed_models_user,
        valves.api_key_rate_limit_admin,
        valves.api_key_rate_limit_user,
    )


# ---------------------------------------------------------------------------
# The decision: a pure function of (request facts, policy).
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Facts:
    is_api_key: bool
    user_id: str = ""
    email: str = ""
    role: str = ""
    group_ids: frozenset = frozenset()
    group_names: frozenset = frozenset()
    path: str = ""
    model: str | None = None  # None where the route carries no model, or it could not be read
    model_problem: str = ""  # why a model-bearing request's model could not be read


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    message: str


def _decision(allowed: bool, reason: str, **fields: str) -> Decision:
    return Decision(allowed, reason, REASON_TEXT[reason].format(**fields))


SESSION = _decision(True, REASON_SESSION)
ALLOWED = _decision(True, REASON_ALLOWED)
BLOCKED_USER = _decision(False, REASON_BLOCKED_USER)
GUARD_ERROR = _decision(False, REASON_GUARD_ERROR)


def decide(facts: Facts, policy: Policy) -> Decision:
    if not facts.is_api_key:
        return SESSION
    role = facts.role or ""
    user_id, email = facts.user_id.casefold(), facts.email.casefold()
    blocked = policy.api_key_blocked_users
    if blocked and (user_id in blocked or email in blocked):
        return BLOCKED_USER
    users, groups = policy.api_key_users, policy.api_key_groups
    admitted = (
        role.casefold() in policy.api_key_roles
        or (users and (user_id in users or email in users))
        or (groups and any(g.casefold() in groups for g in (*facts.group_ids, *facts.group_names)))
    )
    if not admitted:
        return _decision(False, REASON_NOT_ADMITTED, role=role)
    # Only the exact role "admin" gets the admin lists: a missing or odd role
    # is never mistaken for a privileged one.
    kind = "admin" if role == "admin" else "user"
    endpoints = policy.allowed_endpoints_admin if kind == "admin" else policy.allowed_endpoints_user
    if not endpoints.admits(facts.path):
        return _decision(False, REASON_ENDPOINT, role=role, path=facts.path, valve=f"api_key_allowed_endpoints_{kind}")
    models = policy.allowed_models_admin if kind == "admin" else policy.allowed_models_user
    if models.admits_all:
        return ALLOWED
    valve = f"api_key_allowed_models_{kind}"
    if facts.model_problem:  # a model list that cannot be checked is not passed
        return _decision(False, REASON_MODEL_UNREADABLE, role=role, valve=valve, problem=facts.model_problem)
    if facts.model is not None and not models.admits(facts.model):
        return _decision(False, REASON_MODEL, role=role, model=facts.model, valve=valve)
    return ALLOWED


# ---------------------------------------------------------------------------
# Credentials, read in Open WebUI's own order (utils/auth.py get_current_user,
# then the request.state.token fallback filled by its ASGI middleware).
# ---------------------------------------------------------------------------
def presented_credential(authorization: str | None, cookie_token: str | None, custom_header: str | None) -> str | None:
    """The token core authenticates the request with, or None."""
    if authorization:
        scheme, _, param = authorization.partition(" ")
        if scheme and param and scheme.lower() == "bearer":
            return param
    if cookie_token is not None:
        return cookie_token
    if authorization:
        parts = authorization.split(" ")
        if len(parts) == 2:
            return parts[1]
    return custom_header or None


def is_api_key(token: str | None) -> bool:
    return bool(token) and token.startswith("sk-")


def fingerprint(token: str | None) -> str:
    """What the logs may show of a credential: never the secret itself."""
    if not token:
        return "-"
    if is_api_key(token):
        return "sk-…" + token[-4:] if len(token) >= 11 else "sk-…"
    return "session"


CUSTOM_API_KEY_HEADER = os.environ.get("CUSTOM_API_KEY_HEADER", "x-api-key")


def request_credential(request: Any) -> str | None:
    headers = request.headers
    return presented_credential(
        headers.get("authorization"), request.cookies.get("token"), headers.get(CUSTOM_API_KEY_HEADER)
    )


# ---------------------------------------------------------------------------
# Lookups through Open WebUI's own models (sync in 0.6, async in 0.12), cached
# so a steady stream of requests causes no database query per request.
# ---------------------------------------------------------------------------
async def settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def drive(coro: Any) -> Any:
    """Run a coroutine that never suspends (sync Open WebUI) to completion."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("guard lookup suspended inside a synchronous Open WebUI call")


class TTLCache:
    """Bounded map whose entries expire; at most `max_entries` are kept."""

    def __init__(self, ttl: float, max_entries: int = CACHE_MAX_ENTRIES):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = time.monotonic()
                self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
                while len(self._entries) >= self.max_entries:
                    self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (time.monotonic() + self.ttl, value)

    def clear(self) -> None:
        with self._lock:
            self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)


def openwebui_model(module: str, name: str) -> Any:
    found = sys.modules.get(f"open_webui.models.{module}")
    if found is None:
        raise LookupError(f"open_webui.models.{module} is not loaded")
    return getattr(found, name)


_group_cache = TTLCache(GROUPS_TTL_SECONDS)


async def user_groups(user_id: str) -> tuple[frozenset, frozenset]:
    """(ids, names) of the groups the user is a direct member of."""
    cached = _group_cache.get(user_id)
    if cached is None:
        groups = await settle(openwebui_model("groups", "Groups").get_groups_by_member_id(user_id))
        cached = (frozenset(g.id for g in groups), frozenset(g.name for g in groups))
        _group_cache.put(user_id, cached)
    return cached


def describe(exc: Exception) -> str:
    """One log-friendly line; validation errors as `valve: problem`."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'valves'}: {e['msg']}" for e in exc.errors())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def block_text(template: str, decision: Decision) -> str:
    try:
        return template.format(reason=decision.message)
    except (KeyError, IndexError, ValueError):
        return decision.message


# ---------------------------------------------------------------------------
# Valves. Defaults are the restrictive choice; each can be preset by an
# environment variable API_KEY_GUARD_<NAME>. Saved valves win over it.
# ---------------------------------------------------------------------------
def env_default(name: str, default: Any) -> Any:
    raw = os.environ.get(ENV_PREFIX + name.upper())
    if raw is None and name in LEGACY_ENV:
        raw = os.environ.get(LEGACY_ENV[name])
    if raw is None:
        return default
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        # Anything but an explicit "off" keeps the restrictive default.
        return lowered not in ("0", "false", "no", "off") if default else lowered in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            return default
    return raw


class Valves(BaseModel):
    mode: Literal["enforce", "monitor"] = Field(
        default=env_default("mode", "enforce"),
        title="Mode",
        description=(
            "enforce (default): refuse the API-key requests the policy forbids. monitor: let them through and "
            "only log what would be refused, to try a policy safely."
        ),
    )
    priority: int = Field(
        default=env_default("priority", -100),
        title="Priority",
        description=(
            "Filter order, lowest first (default -100). Keep it below every other filter so API keys are judged "
            "before anything else runs."
        ),
    )
    api_key_roles: str = Field(
        default=env_default("api_key_roles", "admin"),
        title="API key roles",
        description=(
            "Roles whose members may use API keys at all: admin, user, pending, comma-separated. Default admin: "
            "only admins' keys work."
        ),
    )
    api_key_groups: str = Field(
        default=env_default("api_key_groups", ""),
        title="API key groups",
        description=(
            "Group names or ids, comma-separated, whose members may use API keys whatever their role. Default: none."
        ),
    )
    api_key_users: str = Field(
        default=env_default("api_key_users", ""),
        title="API key users",
        description="Emails or user ids, comma-separated, who may use API keys whatever their role. Default: none.",
    )
    api_key_blocked_users: str = Field(
        default=env_default("api_key_blocked_users", ""),
        title="Blocked from API keys",
        description=(
            "Emails or user ids, comma-separated, who may never use API keys, admins included; wins over every "
            "other rule. Default: none."
        ),
    )
    api_key_allowed_endpoints_admin: str = Field(
        default=env_default("api_key_allowed_endpoints_admin", "*"),
        title="Endpoints for admin keys",
        description=(
            "Paths admin keys may call, comma-separated; each admits itself and everything under it (/api/models "
            "admits /api/models/x). * = every path, empty = none. Default *."
        ),
    )
    api_key_allowed_endpoints_user: str = Field(
        default=env_default(
            "api_key_allowed_endpoints_user",
            "/api/chat/completions,/api/v1/chat/completions,/api/models,/api/v1/models",
        ),
        title="Endpoints for other keys",
        description=(
            "Paths that keys of non-admins may call, once the rules above admit them; written as for admin keys. "
            "Default: chat completions and the model list (/api/chat/completions, /api/v1/chat/completions, "
            "/api/models, /api/v1/models)."
        ),
    )
    api_key_allowed_models_admin: str = Field(
        default=env_default("api_key_allowed_models_admin", "*"),
        title="Models for admin keys",
        description=(
            "Model ids admin keys may use, comma-separated; globs like gpt-4* work. Checked on every route that "
            "reaches a model; model lists fetched with these keys show only these. * = all (default)."
        ),
    )
    api_key_allowed_models_user: str = Field(
        default=env_default("api_key_allowed_models_user", "*"),
        title="Models for other keys",
        description=("Model ids that keys of non-admins may use, written as for admin keys. * = all (default)."),
    )
    api_key_rate_limit_admin: str = Field(
        default=env_default("api_key_rate_limit_admin", ""),
        title="Rate limit for admin keys",
        description=(
            "Most requests each admin's key may make: N/second, N/minute, N/hour or N/day, comma-separated "
            "(60/minute,1000/day). Over it: HTTP 429. Empty = unlimited (default)."
        ),
    )
    api_key_rate_limit_user: str = Field(
        default=env_default("api_key_rate_limit_user", ""),
        title="Rate limit for other keys",
        description=(
            "Most requests each non-admin's key may make, written as for admin keys. Empty = unlimited (default)."
        ),
    )
    route_guard: bool = Field(
        default=env_default("route_guard", True),
        title="Route guard",
        description=(
            "Judge API keys on every route (OpenAI, Ollama, tasks, embeddings, the REST API), not only in chat. "
            "Off: keys reach models directly on /openai and /ollama routes. Default on; switch it off only to "
            "debug."
        ),
    )
    block_message: str = Field(
        default=env_default("block_message", DEFAULT_BLOCK_MESSAGE),
        title="Refusal message",
        description=(
            "Text an API client gets when refused; {reason} becomes the rule that refused it. Default: API Key "
            "Guard: {reason}"
        ),
    )
    audit_log: Literal["deny", "all", "off"] = Field(
        default=env_default("audit_log", "deny"),
        title="Audit log",
        description="Which decisions go to the server log: deny (refusals only, default), all, or off.",
    )

    @field_validator("api_key_roles")
    @classmethod
    def _roles(cls, value: str) -> str:
        parse_roles(value)
        return value

    @field_validator("api_key_allowed_endpoints_admin", "api_key_allowed_endpoints_user")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        PathList.parse(value)
        return value

    @field_validator("api_key_rate_limit_admin", "api_key_rate_limit_user")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        RateLimit.parse(value)
        return value

    @field_validator("block_message")
    @classmethod
    def _message(cls, value: str) -> str:
        try:
            value.format(reason="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholder {{reason}} is allowed ({exc!r})") from None
        return value

    # Open WebUI rebuilds the valves from the database for every chat; if stored
    # values are invalid (written behind the API, or by an older guard), raising
    # here would break chat for everyone. Outside the valves save route, invalid
    # stored valves become the defaults marked invalid: sessions keep working and
    # every API-key request fails closed. Saving still refuses invalid values.
    _invalid: str | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_sessions_working(cls, data: Any, handler: Callable) -> "Valves":
        try:
            return handler(data)
        except ValidationError as exc:
            path = current_request_path()
            if path is None or path.endswith("/valves/update"):
                raise
            marked = handler({})
            marked._invalid = describe(exc)
            return marked


# ---------------------------------------------------------------------------
# The one evaluation path. Both adapters (the inlet filter and the route guard)
# hand over what they know and get back None or a Refusal; `_reject` is the one
# place a decision becomes an audit line and a refusal.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    reason: str
    headers: tuple = ()  # extra response headers, (name, value) pairs


async def facts_for(user: dict, path: str, model: str | None, model_problem: str) -> Facts:
    user_id = str(user["id"])
    group_ids, group_names = await user_groups(user_id)
    return Facts(
        is_api_key=True,
        user_id=user_id,
        email=str(user.get("email") or ""),
        role=str(user.get("role") or ""),
        group_ids=group_ids,
        group_names=group_names,
        path=path,
        model=model,
        model_problem=model_problem,
    )


async def evaluate(
    valves: Any,
    user: dict | None,
    token: str | None,
    path: str | None,
    model: str | None,
    model_problem: str,
    where: str,
    quiet: bool = False,
    count: bool = False,
) -> tuple[Refusal | None, tuple]:
    """Judge one API-key request: (None to let it through, or the Refusal; response headers).

    `quiet` logs only a refusal; `count` applies the rate limits to an admitted request."""
    facts, policy, error = Facts(is_api_key=True, path=path or ""), None, None
    try:
        policy = policy_from_valves(valves)
        if path is None:
            raise ValueError("no request passed to the guard")
        if not isinstance(user, dict):
            raise ValueError("no user passed to the guard")
        facts = await facts_for(user, path, model, model_problem)
        decision = decide(facts, policy)
    except Exception as exc:  # fail closed: an undecidable key request is denied
        decision, error = GUARD_ERROR, describe(exc)
    enforce = policy.enforce if policy is not None else True
    refusal = _reject(decision, facts, token, where, enforce, valves, error, quiet)
    if refusal is not None or not decision.allowed or not count or policy is None:
        return refusal, ()
    return await rate_limited(policy, facts, token, where, valves)


async def rate_limited(policy: Policy, facts: Facts, token: str | None, where: str, valves: Any) -> tuple:
    """(Refusal or None, RateLimit headers) for a request the policy admitted."""
    kind = "admin" if facts.role == "admin" else "user"
    limit = policy.rate_limit_admin if kind == "admin" else policy.rate_limit_user
    if not limit.windows:
        return None, ()
    try:
        verdict = await settle(limiter().check(facts.user_id, limit))
    except Exception as exc:  # a limiter that fails must not lock every key out: admit, and say so
        log.error("api_key_guard rate limit not applied: %s", describe(exc))
        return None, ()
    headers = tuple(rate_limit_headers(limit, verdict).items())
    if verdict.allowed:
        return None, headers
    fields = rate_limited_fields(verdict, facts.role or "-", f"api_key_rate_limit_{kind}")
    decision = _decision(False, REASON_RATE_LIMITED, **fields)
    return _reject(decision, facts, token, where, policy.enforce, valves, None, False, 429, headers), headers


def _reject(
    decision: Decision,
    facts: Facts,
    token: str | None,
    where: str,
    enforce: bool,
    valves: Any,
    error: str | None,
    quiet: bool,
    status: int = 403,
    headers: tuple = (),
) -> Refusal | None:
    """Write the one audit line the settings ask for; a Refusal when the request must be stopped."""
    stop = not decision.allowed and enforce
    audit = valves.audit_log
    if error is not None:
        level = logging.ERROR
    elif decision.allowed:
        level = logging.INFO if audit == "all" and not quiet else None
    else:
        level = logging.WARNING if audit != "off" and (stop or not quiet) else None
    if level is not None:
        word = "limit" if decision.reason == REASON_RATE_LIMITED else "deny"
        verdict = "allow" if decision.allowed else (word if stop else f"would-{word}")
        log.log(
            level,
            "api_key_guard %s via=%s reason=%s key=%s user=%s role=%s path=%s model=%s: %s%s",
            verdict,
            where,
            decision.reason,
            fingerprint(token),
            facts.user_id or "-",
            facts.role or "-",
            facts.path or "-",
            facts.model or "-",
            decision.message,
            f" [{error}]" if error else "",
        )
    if not stop:
        return None
    return Refusal(status, block_text(valves.block_message, decision), decision.reason, headers)


# How Open WebUI writes a model mention in a channel message: <@M:model-id|label>.
MODEL_MENTION = re.compile(r"<@M:([^|>]+)(?:\|[^>]+)?>")


def mentioned_model(body: Any) -> tuple[str | None, str]:
    """(model, problem) for a channel message, where a @model mention (or a reply to a model's message)
    makes that model answer; a message that can call no model names none, and that is no problem."""
    if not isinstance(body, dict):
        return None, "the request body is not a JSON object"
    if body.get("reply_to_id"):
        return None, "a reply can make the model of the message it answers respond"
    mentioned = sorted(set(MODEL_MENTION.findall(str(body.get("content") or ""))))
    if len(mentioned) > 1:
        return None, "the message mentions several models"
    return (mentioned[0], "") if mentioned else (None, "")


def model_of(body: Any) -> tuple[str | None, str]:
    """(model, problem): the model a request body names, or why none could be read."""
    if not isinstance(body, dict):
        return None, "the request body is not a JSON object"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, "the request names no model"
    return model, ""


def policy_fingerprint(stored: Any) -> str:
    """Short fingerprint of the stored valves, so an installer can see which policy is in force."""
    text = json.dumps(stored or {}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stored_valves(stored: Any) -> "Valves":
    """The Valves for a stored record; an invalid record becomes unusable valves (fail closed)."""
    try:
        return Valves(**(stored or {}))
    except Exception as exc:
        return unusable_valves(exc)


def unusable_valves(exc: Exception) -> "Valves":
    """Defaults marked unusable: every API-key request is refused with the guard-error message."""
    marked = Valves()
    marked._invalid = describe(exc)
    return marked


# ---------------------------------------------------------------------------
# The filter: adapts Open WebUI's inlet arguments to the evaluation.
# ---------------------------------------------------------------------------
class Filter:
    Valves = Valves

    def __init__(self):
        self.valves = self.Valves()

    async def inlet(self, body: dict, __user__: dict | None = None, __request__: Any = None) -> dict:
        token, path, judged = None, None, False
        if __request__ is not None:
            token = request_credential(__request__)
            auth_type = getattr(__request__.state, "auth_type", None)
            if not (auth_type == "api_key" if auth_type is not None else is_api_key(token)):
                return body
            path, judged = __request__.scope["path"], SCOPE_MARKS in __request__.scope
        model, problem = model_of(body)
        # Defence in depth behind the route guard: when it already judged this request, a second
        # audit line would double-count it, so only a refusal is logged here.
        refusal, _ = await evaluate(
            self.valves, __user__, token, path, model, problem, "inlet", quiet=judged, count=not judged
        )
        if refusal is not None:
            raise Exception(refusal.detail)
        return body


# ---------------------------------------------------------------------------
# Route guard. An inlet filter only sees the chat pipeline, yet the same key
# reaches models through /openai/*, /ollama/*, task and embedding routes, and
# the whole REST API. Open WebUI authenticates every API key through one call,
# Users.get_user_by_api_key (0.6 to 0.12), so the guard wraps that call: it
# sees exactly the credential core accepted, from any transport, and the user
# core resolved, and refuses before any route handler runs. A thin ASGI
# wrapper remembers the request (scope) the lookup belongs to, reads the model
# of model-bearing key requests before core does, marks judged responses and
# trims model listings. Both hooks are installed once per process and delegate
# to the most recently loaded copy of this file, so reloads never stack.
# ---------------------------------------------------------------------------
HOOKS_ATTR = "_api_key_guard_hooks"
GUARD_HEADER = "X-API-Key-Guard"
POLICY_HEADER = "X-API-Key-Guard-Policy"
COUNTERS_HEADER = "X-API-Key-Guard-Counters"
SCOPE_MARKS = "api_key_guard.marks"  # response headers of a request the route guard judged
SCOPE_MODEL = "api_key_guard.model"  # (model, problem) read from a model-bearing key request
SCOPE_LISTING = "api_key_guard.listing"  # the ModelList a key's model listing is trimmed to

# Routes whose request body names the model it reaches (route templates, every pinned release).
# The route-table contract test fails when a release adds a model-bearing route missing here.
MODEL_ROUTES = frozenset(
    {
        "/api/chat/completions",
        "/api/v1/chat/completions",
        "/api/chat/completed",
        "/api/chat/actions/{action_id}",
        "/api/v1/chats/{id}/compact",
        "/api/embeddings",
        "/api/v1/embeddings",
        "/api/message",
        "/api/v1/messages",
        "/api/message/count_tokens",
        "/api/v1/messages/count_tokens",
        "/openai/chat/completions",
        "/openai/responses",
        "/openai/audio/speech",
        "/openai/{path:path}",
        "/ollama/api/generate",
        "/ollama/api/generate/{url_idx}",
        "/ollama/api/chat",
        "/ollama/api/chat/{url_idx}",
        "/ollama/api/embed",
        "/ollama/api/embed/{url_idx}",
        "/ollama/api/embeddings",
        "/ollama/api/embeddings/{url_idx}",
        "/ollama/v1/completions",
        "/ollama/v1/completions/{url_idx}",
        "/ollama/v1/embeddings",
        "/ollama/v1/embeddings/{url_idx}",
        "/ollama/v1/chat/completions",
        "/ollama/v1/chat/completions/{url_idx}",
        "/ollama/v1/messages",
        "/ollama/v1/messages/{url_idx}",
        "/ollama/v1/responses",
        "/ollama/v1/responses/{url_idx}",
        *(
            f"/api/v1/tasks/{task}/completions"
            for task in ("title", "follow_up", "tags", "image_prompt", "queries", "auto", "emoji", "moa")
        ),
    }
)
# Routes where a message can make a model answer by mentioning it (channels, 0.8+).
MENTION_ROUTES = frozenset({"/api/v1/channels/{id}/messages/post"})
# GET routes that list models; for a key limited to some models they list only those.
MODEL_LISTINGS = frozenset(
    {
        "/api/models",
        "/api/v1/models",
        "/openai/models",
        "/openai/models/{url_idx}",
        "/ollama/api/tags",
        "/ollama/api/tags/{url_idx}",
        "/ollama/v1/models",
        "/ollama/v1/models/{url_idx}",
    }
)
# A model-bearing body is read only up to this size; a larger one cannot be checked and is
# refused where a model list applies (chat bodies with images stay far below it).
MAX_MODEL_BODY_BYTES = 8 * 2**20
ROUTE_KIND_CACHE_ENTRIES = 4096
MAX_VALVES_BODY_BYTES = 2**20
MODEL_ROUTE, MENTIONS, LISTING = "model", "mentions", "listing"
MODEL_READERS = {MODEL_ROUTE: model_of, MENTIONS: mentioned_model}


def scope_credential(scope: dict) -> str | None:
    """The credential core will authenticate, read from the raw ASGI headers in core's order."""
    authorization = cookie = custom = None
    custom_name = CUSTOM_API_KEY_HEADER.lower().encode("latin-1")
    for name, value in scope.get("headers") or ():
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"cookie":
            cookie = value.decode("latin-1") if cookie is None else f"{cookie}; {value.decode('latin-1')}"
        elif name == custom_name and custom is None:
            custom = value.decode("latin-1")
    return presented_credential(authorization, cookie_token(cookie), custom)


def cookie_token(cookie: str | None) -> str | None:
    """The `token` cookie as Starlette parses it (last one wins, quotes removed)."""
    token = None
    for chunk in (cookie or "").split(";"):
        key, sep, value = chunk.partition("=")
        if sep and key.strip() == "token":
            token = http.cookies._unquote(value.strip())
    return token


def routed_template(app: Any, scope: dict) -> str | None:
    """The path template of the route Starlette's router will dispatch this request to."""
    routing = sys.modules.get("starlette.routing")
    router = getattr(app, "router", None)
    if routing is None or router is None:
        return None
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is routing.Match.FULL:
            return getattr(route, "path", None)
    return None


def listing_trimmed(body: bytes, models: ModelList) -> bytes:
    """An OpenAI-style ({"data": [...]}) or Ollama-style ({"models": [...]}) listing, trimmed to `models`."""
    listing = json.loads(body)
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        listing["data"] = [m for m in listing["data"] if isinstance(m, dict) and models.admits(str(m.get("id")))]
    elif isinstance(listing, dict) and isinstance(listing.get("models"), list):
        listing["models"] = [
            m for m in listing["models"] if isinstance(m, dict) and models.admits(str(m.get("model") or m.get("name")))
        ]
    else:
        raise ValueError("unknown model listing shape")
    return json.dumps(listing).encode()


class RouteHooks:
    """Process-wide hooks; intentionally tiny because they are never replaced."""

    def __init__(self, app: Any, users: Any, http_exception: type):
        self.scope_var: contextvars.ContextVar = contextvars.ContextVar("api_key_guard_scope", default=None)
        self.guard: RouteGuard | None = None  # the most recently loaded copy
        self.http_exception = http_exception
        inner = app.middleware_stack
        original_lookup = users.get_user_by_api_key
        hooks = self

        async def asgi(scope, receive, send):
            reset = hooks.scope_var.set(scope)
            try:
                guard = hooks.guard
                if guard is None or scope["type"] != "http":
                    return await inner(scope, receive, send)
                await guard.serve(scope, receive, send, inner)
            finally:
                hooks.scope_var.reset(reset)

        if inspect.iscoroutinefunction(original_lookup):

            async def lookup(api_key, *args, **kwargs):
                user = await original_lookup(api_key, *args, **kwargs)
                if user is not None and hooks.guard is not None:
                    hooks.stop_if_refused(await hooks.guard.check(user, api_key, hooks.scope_var.get()))
                return user

        else:

            def lookup(api_key, *args, **kwargs):
                user = original_lookup(api_key, *args, **kwargs)
                if user is not None and hooks.guard is not None:
                    hooks.stop_if_refused(drive(hooks.guard.check(user, api_key, hooks.scope_var.get())))
                return user

        app.middleware_stack = asgi
        users.get_user_by_api_key = lookup

    def stop_if_refused(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            raise self.http_exception(
                status_code=refusal.status, detail=refusal.detail, headers=dict(refusal.headers) or None
            )


def current_request_path() -> str | None:
    """The routed path of the request being served in this context, when the hooks know it."""
    hooks = getattr(getattr(sys.modules.get("open_webui.main"), "app", None), HOOKS_ATTR, None)
    scope = hooks.scope_var.get() if hooks is not None else None
    return scope.get("path") if scope else None


def function_id_from_module_name(name: str) -> str:
    """Open WebUI names the module function_<id> (0.6) or function_<id>_<hex32> (0.12)."""
    stem = name[len("function_") :] if name.startswith("function_") else name
    return re.sub(r"_[0-9a-f]{32}$", "", stem)


class FunctionState:
    """Whether this function is active, its stored valves and their fingerprint, re-read every few seconds."""

    def __init__(self, function_id: str):
        self.function_id = function_id
        self._cache = TTLCache(FUNCTION_STATE_TTL_SECONDS, max_entries=1)

    async def current(self) -> tuple[bool, Valves, str]:
        state = self._cache.get(self.function_id)
        if state is None:
            functions = openwebui_model("functions", "Functions")
            function = await settle(functions.get_function_by_id(self.function_id))
            active = bool(function is not None and function.is_active)
            stored = await settle(functions.get_function_valves_by_id(self.function_id)) if active else None
            state = (active, stored_valves(stored), policy_fingerprint(stored))
            self._cache.put(self.function_id, state)
        return state

    def forget(self) -> None:
        self._cache.clear()


class RouteGuard:
    """This copy of the file as the route hooks use it: per-request work for API-key requests only."""

    def __init__(self, app: Any, function_id: str):
        self.app = app
        self.state = FunctionState(function_id)
        self.own_path = f"/api/v1/functions/id/{function_id}/"
        self._kinds: dict = {}

    def route_kind(self, scope: dict) -> str | None:
        key = (scope["method"], scope["path"])
        kind = self._kinds.get(key, "")
        if kind == "":
            template = routed_template(self.app, scope)
            kind = MODEL_ROUTE if template in MODEL_ROUTES else MENTIONS if template in MENTION_ROUTES else None
            if template in MODEL_LISTINGS and scope["method"] == "GET":
                kind = LISTING
            if len(self._kinds) < ROUTE_KIND_CACHE_ENTRIES:
                self._kinds[key] = kind
        return kind

    async def serve(self, scope: dict, receive: Callable, send: Callable, inner: Callable) -> None:
        if is_api_key(scope_credential(scope)):
            kind = self.route_kind(scope)
            if kind in MODEL_READERS:
                receive = await self.read_model(scope, receive, MODEL_READERS[kind])
            elif kind == LISTING:  # an uncompressed answer, so it can be trimmed
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        send = self.marking(scope, send)
        if scope["method"] == "POST" and scope["path"] == self.own_path + "valves/update":
            receive, send = await self.explaining_refused_save(receive, send)
        try:
            await inner(scope, receive, send)
        finally:
            # An admin saving this function's valves (UI or API) is in force in this worker at once.
            if scope["method"] != "GET" and scope["path"].startswith(self.own_path):
                self.state.forget()

    async def read_model(self, scope: dict, receive: Callable, reader: Callable) -> Callable:
        """Read the body of a model-bearing key request once, note its model, hand it on byte for byte."""
        try:
            active, valves, _ = await self.state.current()
            policy = policy_from_valves(valves)
        except Exception:
            return receive  # the lookup fails closed with the same error and logs it
        if not (active and valves.route_guard) or (
            policy.allowed_models_admin.admits_all and policy.allowed_models_user.admits_all
        ):
            return receive
        raw, replay = await buffered(receive, MAX_MODEL_BODY_BYTES)
        if raw is None:
            scope[SCOPE_MODEL] = (None, f"the request body is larger than {MAX_MODEL_BODY_BYTES // 2**20} MiB")
        else:
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            scope[SCOPE_MODEL] = reader(body)
        return replay

    async def explaining_refused_save(self, receive: Callable, send: Callable) -> tuple[Callable, Callable]:
        """An admin saving invalid valves must learn which valve is wrong: Open WebUI 0.10+ answers
        every refused save with a fixed text, so the 400 it sends is given the guard's own reason."""
        raw, replay = await buffered(receive, MAX_VALVES_BODY_BYTES)
        problem = valves_problem(raw) if raw is not None else None
        if problem is None:
            return replay, send
        detail = json.dumps({"detail": f"API Key Guard refused these valves: {problem}"}).encode()
        refused: list = []

        async def send_explained(message):
            if message["type"] == "http.response.start" and message["status"] == 400:
                refused.append(message)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
                message = {**message, "headers": [*headers, (b"content-length", str(len(detail)).encode())]}
            elif refused and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": detail}
            await send(message)

        return replay, send_explained

    def marking(self, scope: dict, send: Callable) -> Callable:
        held: list = []

        async def send_marked(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *scope.get(SCOPE_MARKS, ())]
                if scope.get(SCOPE_LISTING) is not None and message["status"] == 200:
                    held.append(message)
                    return
            elif held and message["type"] == "http.response.body":
                held.append(message)
                if message.get("more_body", False):
                    return
                await self.send_trimmed(scope[SCOPE_LISTING], held, send)
                return
            await send(message)

        return send_marked

    async def send_trimmed(self, models: ModelList, held: list, send: Callable) -> None:
        start, *chunks = held
        try:
            body = listing_trimmed(b"".join(m.get("body", b"") for m in chunks), models)
        except Exception as exc:  # fail closed: an untrimmable listing lists nothing
            log.error("api_key_guard could not trim a model listing: %s", describe(exc))
            body = b'{"data": []}'
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def check(self, user: Any, api_key: str, scope: dict | None) -> Refusal | None:
        """Judge a key core just authenticated; None lets the request through."""
        try:
            active, valves, policy_id = await self.state.current()
        except Exception as exc:  # the function's state cannot be read: fail closed for API-key traffic
            active, valves, policy_id = True, unusable_valves(exc), "-"
        if not active or not valves.route_guard:
            return None
        model, problem, kind = None, "", None
        if scope is not None:
            kind = self.route_kind(scope)
            if kind in MODEL_READERS:
                model, problem = scope.get(SCOPE_MODEL, (None, "the guard could not read the request body"))
        person = {"id": user.id, "email": user.email, "role": user.role}
        path = scope["path"] if scope is not None else None
        refusal, headers = await evaluate(valves, person, api_key, path, model, problem, "route", count=True)
        if scope is not None:
            mode = "fail-closed" if refusal is not None and refusal.reason == REASON_GUARD_ERROR else valves.mode
            marks = [(GUARD_HEADER, mode), (POLICY_HEADER, policy_id), (COUNTERS_HEADER, limiter().counters)]
            if refusal is None:  # a refusal carries its own RateLimit headers
                marks += headers
            scope[SCOPE_MARKS] = tuple((name.lower().encode(), value.encode("latin-1")) for name, value in marks)
            if kind == LISTING and refusal is None:
                models = models_for(policy_from_valves(valves), person["role"])
                scope[SCOPE_LISTING] = None if models.admits_all else models
        return refusal


async def buffered(receive: Callable, limit: int) -> tuple[bytes | None, Callable]:
    """Read a request body once, up to `limit` bytes: (the body, or None past the limit; a receive
    that hands every message on to the app byte for byte, the unread rest included)."""
    messages, size, more = [], 0, True
    while more and size <= limit:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)

    async def replay():
        return messages.pop(0) if messages else await receive()

    return (b"".join(m.get("body", b"") for m in messages) if size <= limit else None), replay


def valves_problem(body: bytes) -> str | None:
    """Why Open WebUI will refuse to save this valves form (None when it is valid), valve by valve."""
    try:
        form = json.loads(body or b"{}")
        Valves(**{k: v for k, v in form.items() if v is not None})
    except ValidationError as exc:
        return describe(exc).replace("Value error, ", "")
    except Exception:  # not a form the guard can judge: Open WebUI answers it as it likes
        return None
    return None


def models_for(policy: Policy, role: str) -> ModelList:
    return policy.allowed_models_admin if role == "admin" else policy.allowed_models_user


def arm_route_guard(module_name: str) -> RouteHooks | None:
    """Install the hooks once per process and point them at this copy."""
    main = sys.modules.get("open_webui.main")
    auth = sys.modules.get("open_webui.utils.auth")
    users_module = sys.modules.get("open_webui.models.users")
    app = getattr(main, "app", None)
    if app is None or auth is None or users_module is None:
        return None  # not running inside Open WebUI (tests, linters)
    hooks = getattr(app, HOOKS_ATTR, None)
    if hooks is None:
        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()
        hooks = RouteHooks(app, users_module.Users, auth.HTTPException)
        setattr(app, HOOKS_ATTR, hooks)
    hooks.guard = RouteGuard(app, function_id_from_module_name(module_name))
    return hooks


try:
    arm_route_guard(__name__)
except Exception as _exc:  # loading must never fail: Open WebUI would switch the guard off
    log.error("api_key_guard could not arm the route guard: %s: %s", type(_exc).__name__, _exc)
