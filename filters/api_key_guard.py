"""
title: API Key Guard
author: API Key Guard developers
version: 0.1.0
required_open_webui_version: 0.6.0
license: MIT
description: Decide who may use API keys, where and how much: admin-only by default; tiers per role, group and user.
"""

# Paste this whole file into Admin Panel -> Functions, id `api_key_guard`, then
# switch it on and make it global. The README explains every valve.
#
# Threat model in one paragraph: an API key is a bearer credential that lives
# in scripts, CI variables and notebooks, so it leaks far more easily than a
# browser session. Open WebUI lets any holder of a permitted key reach every
# route the owner can reach. This guard narrows that: only the principals the
# admin names may use keys at all, each within its tier (the role's valves, or
# a group's or the user's own in api_key_tiers): endpoints, models, requests,
# tokens, key age and requests in flight. Browser sessions are never judged here.
#
# One API-key request, start to end (grep the names):
#   RouteHooks.asgi            wraps app.middleware_stack; keeps the scope in a context variable
#    RouteGuard.serve          redact_keys_in_url; RequestState into the scope; read_body (bytes only,
#                              never parsed before core accepted the key); usage_report read-outs
#     core: routing, auth      Open WebUI authenticates the credential itself
#      RouteHooks lookup       wraps Users.get_user_by_api_key: runs once core accepted the key
#       RouteGuard.check       judging_copy -> check_here: active_copies, route_kind, read_asked
#        evaluate              facts_for (user_groups, Policy.tier_for, models_behind, key_created)
#                              -> decide (pure) -> counted (token quota, request limit) -> conclude
#                              (the one audit line and Refusal)
#        take_lease            one place among the user's requests in flight, under the smallest cap
#       Refusal -> 403/429     raised as core's HTTPException, before any handler runs
#     RouteGuard.marking       guard headers on the answer; listing_trimmed; UsageMeter reads it
#    finish                    lease back, tokens charged to the quota, record_usage (UsageBook.add;
#                              its thread flushes to the database every few seconds)
# Filter.inlet judges chat requests again through the same evaluate (defence in depth).
#
# Sections, in reading order: Reasons, Policy, The decision, Valves, The one evaluation path, Audit
# lines (what decides); Credentials, Lookups, Reading what a body asks of models, The model that
# answers (the facts); The filter, Route guard, Keys in URLs, Request bodies, Route hooks, explain,
# After the answer (the adapters); Usage accounting, Rate limits, Rate limit headers, Token quotas
# and requests in flight, Open WebUI's Redis, Process-wide state (counting and storage); Arming.

from __future__ import annotations

import asyncio
import atexit
import calendar
import collections
import contextvars
import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import http.cookies
import inspect
import itertools
import json
import logging
import math
import os
import re
import select
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

log = logging.getLogger("api_key_guard")


# ---------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------
# Each decision carries one of these codes; REASON_TEXT turns it into the sentence an admin reads in
# the rejection and in the audit log.
REASON_ALLOWED = "allowed"
REASON_BLOCKED_USER = "blocked_user"
REASON_NOT_ADMITTED = "not_admitted"
REASON_ENDPOINT = "endpoint_not_allowed"
REASON_MODEL = "model_not_allowed"
REASON_MODEL_UNREADABLE = "model_unreadable"
REASON_GUARD_ERROR = "guard_error"
REASON_RATE_LIMITED = "rate_limited"
REASON_MODEL_BEHIND = "model_behind_not_allowed"
REASON_FAN_OUT = "fan_out"
REASON_TOKEN_QUOTA = "token_quota"  # noqa: S105 - a reason code, no secret
REASON_CONCURRENCY = "concurrency"
REASON_KEY_AGE = "key_too_old"
REASON_KEY_AGE_UNKNOWN = "key_age_unknown"
REASON_BACKGROUND = "background_not_counted"

REASON_TEXT = {
    REASON_ALLOWED: "allowed by the API key policy",
    REASON_BLOCKED_USER: "this user may never use API keys (api_key_blocked_users)",
    REASON_NOT_ADMITTED: (
        "API keys are not enabled for role '{role}' (api_key_roles), "
        "nor for this user's groups (api_key_groups) or account (api_key_users)"
    ),
    REASON_ENDPOINT: "API keys of role '{role}' may not call {path} ({valve})",
    REASON_MODEL: "API keys of role '{role}' may not use model '{model}' ({valve})",
    REASON_MODEL_BEHIND: "API keys of role '{role}' may not use model '{model}', {how} ({valve})",
    REASON_FAN_OUT: (
        "API keys of role '{role}' get one model call per request, and this request asks for {count} "
        "(message_ids targets or model mentions; {valve})"
    ),
    REASON_MODEL_UNREADABLE: (
        "API keys of role '{role}' may only use the models in {valve}, and the model of this request "
        "cannot be checked: {problem}"
    ),
    REASON_RATE_LIMITED: "API keys of role '{role}' are limited to {limit} per {unit} ({valve}); retry in {seconds} s",
    REASON_TOKEN_QUOTA: (
        "API keys of role '{role}' may use {limit} tokens per {unit} ({valve}) and {used} are used; "
        "the quota starts again in {seconds} s"
    ),
    REASON_CONCURRENCY: (
        "API keys of role '{role}' may have {limit} request(s) in flight at once ({valve}); "
        "retry once one of them has finished"
    ),
    REASON_BACKGROUND: (
        "API keys of role '{role}' have their tokens or requests in flight counted ({valve}), and this request "
        "makes a model answer after it ends ({how}), where the guard can count neither"
    ),
    REASON_KEY_AGE: (
        "this API key was created on {created} ({days} days ago) and keys of role '{role}' may be at most "
        "{limit} days old ({valve}): generate a new key under Settings > Account"
    ),
    REASON_KEY_AGE_UNKNOWN: (
        "keys of role '{role}' may be at most {limit} days old ({valve}), and this Open WebUI keeps no "
        "creation time for this key"
    ),
    REASON_GUARD_ERROR: (
        "API Key Guard could not evaluate this API key request and denied it; "
        "an administrator must check the server log"
    ),
}

ROLES = ("admin", "user", "pending")
DEFAULT_BLOCK_MESSAGE = "API Key Guard: {reason}"
# Chat, and reading the model list: not creating or changing models (/api/v1/models/create is under it).
DEFAULT_USER_ENDPOINTS = "/api/chat/completions,/api/v1/chat/completions,GET /api/models,GET /api/v1/models"
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
# Policy
# ---------------------------------------------------------------------------
# The valves, parsed and validated once, precomputed for cheap lookups.
def split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class PathList:
    """Path prefixes matched at a `/` boundary, for every method or for one (`GET /api/models`);
    `*` admits every path. A GET entry admits HEAD too: Starlette answers HEAD with the GET route."""

    admits_all: bool
    exact: dict  # method ("" = any) -> frozenset of paths
    under: dict  # method ("" = any) -> tuple of prefixes + "/", for one str.startswith call

    @classmethod
    def parse(cls, text: str) -> PathList:
        items = split_list(text)
        exact: dict[str, set] = {}
        for item in items:
            method, _, path = item.rpartition(" ")
            method = method.strip().upper()
            if item == "*":
                continue
            if method and method not in HTTP_METHODS:
                raise ValueError(f"expected an HTTP method before the path, got {method!r} in {item!r}")
            if not path.startswith("/"):
                raise ValueError(f"expected '*', paths starting with '/' or 'METHOD /path', got {item!r}")
            for each in ("GET", "HEAD") if method == "GET" else (method,):
                exact.setdefault(each, set()).add(path.rstrip("/"))
        return cls(
            "*" in items or "" in exact.get("", ()),
            {m: frozenset(paths) for m, paths in exact.items()},
            {m: tuple(p + "/" for p in sorted(paths)) for m, paths in exact.items()},
        )

    def admits(self, method: str, path: str) -> bool:
        if self.admits_all:
            return True
        return any(path in self.exact.get(m, ()) or path.startswith(self.under.get(m, ())) for m in ("", method))


@dataclass(frozen=True)
class ModelList:
    """Model ids, exact or as shell-style globs (`gpt-4*`); `*` admits all."""

    admits_all: bool
    exact: frozenset
    pattern: re.Pattern | None

    @classmethod
    def parse(cls, text: str) -> ModelList:
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
    roles = frozenset(item.lower() for item in split_list(text))
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"expected roles from {', '.join(ROLES)}, got {unknown[0]!r}")
    return roles


def parse_names(text: str) -> frozenset:
    return frozenset(item.lower() for item in split_list(text))


# Token quotas count calendar windows in UTC (this minute, hour, day, month), not rolling ones: a
# budget is read against the usage table, whose rows are UTC days, and "your quota starts again at
# 00:00 UTC" is a sentence a key's owner can plan with. The price is the boundary: a whole day's
# quota at 23:59 and another at 00:00. Request limits, whose job is pace, stay sliding.
QUOTA_UNITS = ("minute", "hour", "day", "month")
QUOTA_FORM = (
    "expected comma-separated N/minute, N/hour, N/day or N/month tokens with N a positive integer "
    "(e.g. '200000/day,3000000/month'), or empty for no quota"
)


@dataclass(frozen=True)
class QuotaWindow:
    limit: int
    unit: str

    def bounds(self, now: float) -> tuple[int, int]:
        """(start, end) of the calendar window holding `now`, in epoch seconds, UTC."""
        if self.unit == "month":
            day = time.gmtime(now)
            start = calendar.timegm((day.tm_year, day.tm_mon, 1, 0, 0, 0))
            year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
            return start, calendar.timegm((year, month, 1, 0, 0, 0))
        span = {"minute": 60, "hour": 3600, "day": 86400}[self.unit]
        start = int(now // span * span)
        return start, start + span


@dataclass(frozen=True)
class TokenQuota:
    """The windows of one token-quota setting, parsed once; no windows = no quota."""

    windows: tuple[QuotaWindow, ...]

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> TokenQuota:
        windows: dict[str, QuotaWindow] = {}
        for item in split_list(text):
            match = _RATE_ITEM.fullmatch(item)
            unit = match.group(2).lower() if match else ""
            if not match or unit not in QUOTA_UNITS or int(match.group(1)) < 1:
                raise ValueError(f"{QUOTA_FORM}; got {item!r}")
            if unit in windows:
                raise ValueError(f"{QUOTA_FORM}, each unit at most once; got {unit!r} twice")
            windows[unit] = QuotaWindow(int(match.group(1)), unit)
        return cls(tuple(sorted(windows.values(), key=lambda w: QUOTA_UNITS.index(w.unit))))


def parse_count(text: Any, what: str) -> int:
    """A whole number >= 0 written in a valve (0 = no limit)."""
    value = int(text) if isinstance(text, int) and not isinstance(text, bool) else None
    if value is None and isinstance(text, str) and text.strip().isdigit():
        value = int(text.strip())
    if value is None or value < 0:
        raise ValueError(f"{what} must be a whole number, 0 for none; got {text!r}")
    return value


# A tier's fields: the suffix of the role valves (api_key_<field>_admin) and the keys of an
# api_key_tiers entry, each with its parser.
TIER_FIELDS = {
    "allowed_endpoints": lambda text: PathList.parse(text),
    "allowed_models": lambda text: ModelList.parse(text),
    "rate_limit": lambda text: RateLimit.parse(text),
    "token_quota": lambda text: TokenQuota.parse(text),
    "max_key_age_days": lambda text: parse_count(text, "max_key_age_days"),
    "max_concurrent": lambda text: parse_count(text, "max_concurrent"),
}


@dataclass(frozen=True)
class Tier:
    """What the keys of one user may do. `admin` and `user` are the role tiers (their valves end in
    the name); api_key_tiers entries override them field by field. `sources` names, per field, the
    setting it came from, so every refusal names the valve to change."""

    name: str
    allowed_endpoints: PathList
    allowed_models: ModelList
    rate_limit: RateLimit
    token_quota: TokenQuota
    max_key_age_days: int
    max_concurrent: int
    sources: tuple  # (field, setting) per field, in TIER_FIELDS order
    texts: tuple  # (field, value as written) per field

    def valve(self, field: str) -> str:
        return dict(self.sources)[field]

    @property
    def counting(self) -> str | None:
        """The first field whose counters an admitted request of this tier touches, or None."""
        if self.rate_limit.windows:
            return "rate_limit"
        if self.token_quota.windows:
            return "token_quota"
        return "max_concurrent" if self.max_concurrent else None


def role_tier(name: str, texts: dict) -> Tier:
    values = {field: TIER_FIELDS[field](texts[field]) for field in TIER_FIELDS}
    sources = tuple((field, f"api_key_{field}_{name}") for field in TIER_FIELDS)
    return Tier(name, **values, sources=sources, texts=tuple((f, str(texts[f])) for f in TIER_FIELDS))


@dataclass(frozen=True)
class TierEntry:
    """One api_key_tiers entry: `group:<name or id>` or `user:<email or id>` and the fields it sets."""

    label: str  # as written, for messages
    kind: str  # "group" or "user"
    name: str  # casefolded
    values: tuple  # (field, parsed) for the fields it sets
    texts: tuple  # (field, as written)


def parse_tiers(text: str) -> tuple[TierEntry, ...]:
    """api_key_tiers: a JSON object whose keys are `group:<name or id>` or `user:<email or id>` and whose
    values set some of TIER_FIELDS. Listed order is priority among groups. Errors name entry and field."""
    if not str(text).strip():
        return ()
    try:
        pairs = json.loads(text, object_pairs_hook=JSONObject)  # a key listed twice must be seen, not dropped
    except ValueError as exc:
        raise ValueError(f"expected a JSON object like {TIERS_EXAMPLE}; {exc}") from None
    if not isinstance(pairs, JSONObject):
        raise ValueError(f"expected a JSON object like {TIERS_EXAMPLE}")
    entries, seen = [], set()
    for label, fields in pairs:
        kind, sep, name = str(label).partition(":")
        if not sep or kind not in ("group", "user") or not name.strip():
            raise ValueError(f"entry {label!r}: expected a key 'group:<name or id>' or 'user:<email or id>'")
        key = (kind, name.strip().lower())
        if key in seen:
            raise ValueError(f"entry {label!r}: listed twice")
        seen.add(key)
        if not isinstance(fields, JSONObject) or not fields:
            raise ValueError(f"entry {label!r}: expected an object setting some of {', '.join(TIER_FIELDS)}")
        if len({f for f, _ in fields}) < len(fields):
            raise ValueError(f"entry {label!r}: a field is set twice")
        values, texts = [], []
        for field, value in fields:
            if field not in TIER_FIELDS:
                raise ValueError(f"entry {label!r}: unknown field {field!r}; known: {', '.join(TIER_FIELDS)}")
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"entry {label!r}, field {field!r}: expected a string or a number")
            try:
                values.append((field, TIER_FIELDS[field](value)))
            except ValueError as exc:
                raise ValueError(f"entry {label!r}, field {field!r}: {exc}") from None
            texts.append((field, str(value)))
        entries.append(TierEntry(str(label), kind, key[1], tuple(values), tuple(texts)))
    return tuple(entries)


class JSONObject(list):
    """A JSON object as the (key, value) pairs it was written with, duplicates included."""


TIERS_EXAMPLE = '{"group:interns": {"allowed_endpoints": "/api/chat/completions", "token_quota": "20000/day"}}'
MERGED_TIERS_KEPT = 1024


@dataclass(frozen=True)
class Policy:
    enforce: bool
    api_key_roles: frozenset
    api_key_groups: frozenset
    api_key_users: frozenset
    api_key_blocked_users: frozenset
    admin: Tier
    user: Tier
    tiers: tuple = ()  # TierEntry, in listed order
    reads_bodies: bool = False  # some tier has a model list or counters: key requests' bodies are read
    _merged: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def tier_for(self, facts: Facts) -> Tier:
        """The one place a user becomes its tier: the role's (only the exact role "admin" gets the
        admin tier: a missing or odd role is never a privileged one), then, field by field, the
        first api_key_tiers entry that sets the field among: the user's own entry, then the
        entries of the user's groups in the order they are listed."""
        base = self.admin if facts.role == "admin" else self.user
        if not self.tiers:
            return base
        person = {facts.user_id.lower(), facts.email.lower()}
        groups = {g.lower() for g in (*facts.group_ids, *facts.group_names)}
        users = [e for e in self.tiers if e.kind == "user" and e.name in person]
        members = [e for e in self.tiers if e.kind == "group" and e.name in groups]
        matched = tuple(users[:1] + members)
        if not matched:
            return base
        key = (base.name, tuple(id(e) for e in matched))
        tier = self._merged.get(key)
        if tier is None:
            tier = overridden(base, matched)
            if len(self._merged) < MERGED_TIERS_KEPT:
                self._merged[key] = tier
        return tier


def overridden(base: Tier, entries: tuple) -> Tier:
    """`base` with each field taken from the first of `entries` that sets it."""
    values = {f: getattr(base, f) for f in TIER_FIELDS}
    sources, texts = dict(base.sources), dict(base.texts)
    for entry in reversed(entries):
        values.update(entry.values)
        texts.update(entry.texts)
        sources.update((f, f"api_key_tiers {entry.label} {f}") for f, _ in entry.values)
    name = "+".join([base.name, *(e.label for e in entries)])
    return Tier(name, **values, sources=tuple(sources.items()), texts=tuple(texts.items()))


ROLE_TIER_VALVES = tuple(f"api_key_{f}_{role}" for role in ("admin", "user") for f in TIER_FIELDS)


@functools.lru_cache(maxsize=32)
def compile_policy(mode: str, roles: str, groups: str, users: str, blocked: str, tiers: str, *tier_valves) -> Policy:
    if mode not in ("enforce", "monitor"):
        raise ValueError(f"mode must be 'enforce' or 'monitor', got {mode!r}")
    texts = dict(zip(ROLE_TIER_VALVES, tier_valves, strict=True))
    admin = role_tier("admin", {f: texts[f"api_key_{f}_admin"] for f in TIER_FIELDS})
    user = role_tier("user", {f: texts[f"api_key_{f}_user"] for f in TIER_FIELDS})
    entries = parse_tiers(tiers)
    every = (admin, user, *(overridden(user, (e,)) for e in entries))
    return Policy(
        enforce=mode == "enforce",
        api_key_roles=parse_roles(roles),
        api_key_groups=parse_names(groups),
        api_key_users=parse_names(users),
        api_key_blocked_users=parse_names(blocked),
        admin=admin,
        user=user,
        tiers=entries,
        reads_bodies=any(not t.allowed_models.admits_all or t.counting for t in every),
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
        valves.api_key_tiers,
        *(getattr(valves, name) for name in ROLE_TIER_VALVES),
    )


# ---------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------
# A pure function of (request facts, policy).
@dataclass(frozen=True)
class Facts:
    """What the guard knows of one API-key request: who (as core authenticated the key), where (the
    routed path), which models (as core will call them), and the key's age."""

    user_id: str = ""
    email: str = ""
    role: str = ""
    group_ids: frozenset = frozenset()
    group_names: frozenset = frozenset()
    method: str = "GET"
    path: str = ""
    model: str | None = None  # the model the request names; None where the route carries none
    model_problem: str = ""  # why a model-bearing request's model could not be read
    # Models core calls instead of the named one: (model, how), e.g. the base model of a workspace model.
    resolved: tuple = ()
    model_calls: int = 1  # model calls the request asks core for (fan-out over message_ids)
    background: str = ""  # how a model answers after the request ends, if it does
    key_created: int | None = None  # epoch seconds; None where core keeps no creation time (or not read)
    now: float = 0.0  # when the request was judged, epoch seconds


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    message: str


def _decision(allowed: bool, reason: str, **fields: Any) -> Decision:
    return Decision(allowed, reason, REASON_TEXT[reason].format(**fields))


ALLOWED = _decision(True, REASON_ALLOWED)
BLOCKED_USER = _decision(False, REASON_BLOCKED_USER)
GUARD_ERROR = _decision(False, REASON_GUARD_ERROR)


def admitted_by(facts: Facts, policy: Policy) -> str | None:
    """Which rule lets this user use keys at all (as explain prints it), or None."""
    user_id, email = facts.user_id.lower(), facts.email.lower()
    if (facts.role or "").lower() in policy.api_key_roles:
        return f"role '{facts.role}' (api_key_roles)"
    if policy.api_key_users and (user_id in policy.api_key_users or email in policy.api_key_users):
        return "this user (api_key_users)"
    if policy.api_key_groups:
        admitting = [g for g in (*facts.group_names, *facts.group_ids) if g.lower() in policy.api_key_groups]
        if admitting:
            return f"group '{min(admitting)}' (api_key_groups)"
    return None


def is_blocked(facts: Facts, policy: Policy) -> bool:
    blocked = policy.api_key_blocked_users
    return bool(blocked) and (facts.user_id.lower() in blocked or facts.email.lower() in blocked)


def decide(facts: Facts, policy: Policy) -> Decision:
    """The policy's answer for one API-key request; counters (limits, quotas, leases) come after."""
    role = facts.role or ""
    if is_blocked(facts, policy):
        return BLOCKED_USER
    if admitted_by(facts, policy) is None:
        return _decision(False, REASON_NOT_ADMITTED, role=role)
    tier = policy.tier_for(facts)
    if tier.max_key_age_days:
        valve, limit = tier.valve("max_key_age_days"), tier.max_key_age_days
        if facts.key_created is None:
            return _decision(False, REASON_KEY_AGE_UNKNOWN, role=role, limit=limit, valve=valve)
        days = (facts.now - facts.key_created) / 86400
        if days > limit:
            created = time.strftime("%Y-%m-%d", time.gmtime(facts.key_created))
            fields = {"created": created, "days": int(days), "limit": limit, "valve": valve}
            return _decision(False, REASON_KEY_AGE, role=role, **fields)
    if not tier.allowed_endpoints.admits(facts.method, facts.path):
        return _decision(False, REASON_ENDPOINT, role=role, path=facts.path, valve=tier.valve("allowed_endpoints"))
    # Counted work must happen inside the request: a model answering afterwards is neither charged nor held.
    if facts.background and (tier.token_quota.windows or tier.max_concurrent):
        valve = tier.valve("token_quota" if tier.token_quota.windows else "max_concurrent")
        return _decision(False, REASON_BACKGROUND, role=role, how=facts.background, valve=valve)
    models = tier.allowed_models
    # One counted request must not buy several model calls, nor reach models nobody checked.
    if facts.model_calls > 1 and (tier.counting or not models.admits_all):
        valve = tier.valve(tier.counting or "allowed_models")
        return _decision(False, REASON_FAN_OUT, role=role, count=facts.model_calls, valve=valve)
    if models.admits_all:
        return ALLOWED
    valve = tier.valve("allowed_models")
    if facts.model_problem:  # a model list that cannot be checked is not passed
        return _decision(False, REASON_MODEL_UNREADABLE, role=role, valve=valve, problem=facts.model_problem)
    if facts.model is not None and not models.admits(facts.model):
        return _decision(False, REASON_MODEL, role=role, model=facts.model, valve=valve)
    for model, how in facts.resolved:
        if model == ANY_MODEL or not models.admits(model):  # "any model" passes only a list that is *
            return _decision(False, REASON_MODEL_BEHIND, role=role, model=model, how=how, valve=valve)
    return ALLOWED


# ---------------------------------------------------------------------------
# Valves
# ---------------------------------------------------------------------------
# Defaults are the restrictive choice; each can be preset by an environment variable
# API_KEY_GUARD_<NAME>. Saved valves win over it.
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
            "enforce (default): refuse what the policy forbids. monitor: serve it and log what would be refused."
        ),
    )
    priority: int = Field(
        default=env_default("priority", -100),
        title="Priority",
        description=("Filter order, lowest first (default -100): keep it below every other filter."),
    )
    api_key_roles: str = Field(
        default=env_default("api_key_roles", "admin"),
        title="API key roles",
        description=("Roles whose members may use API keys at all: admin, user, pending. Default admin."),
    )
    api_key_groups: str = Field(
        default=env_default("api_key_groups", ""),
        title="API key groups",
        description=("Groups (names or ids) whose members may use API keys whatever their role."),
    )
    api_key_users: str = Field(
        default=env_default("api_key_users", ""),
        title="API key users",
        description="Emails or user ids who may use API keys whatever their role.",
    )
    api_key_blocked_users: str = Field(
        default=env_default("api_key_blocked_users", ""),
        title="Blocked from API keys",
        description=("Emails or user ids who may never use API keys, admins included; wins over every other rule."),
    )
    api_key_allowed_endpoints_admin: str = Field(
        default=env_default("api_key_allowed_endpoints_admin", "*"),
        title="Endpoints for admin keys",
        description=("Paths admin keys may call; each admits what is under it; 'GET /path' only reading it; * = all."),
    )
    api_key_allowed_endpoints_user: str = Field(
        default=env_default("api_key_allowed_endpoints_user", DEFAULT_USER_ENDPOINTS),
        title="Endpoints for other keys",
        description=("Paths other keys may call, written as for admins. Default: chat and reading the model list."),
    )
    api_key_allowed_models_admin: str = Field(
        default=env_default("api_key_allowed_models_admin", "*"),
        title="Models for admin keys",
        description=(
            "Model ids (or globs: gpt-4*) admin keys may use, on every model route; listings show only these."
        ),
    )
    api_key_allowed_models_user: str = Field(
        default=env_default("api_key_allowed_models_user", "*"),
        title="Models for other keys",
        description="Model ids other keys may use, written as for admins.",
    )
    api_key_rate_limit_admin: str = Field(
        default=env_default("api_key_rate_limit_admin", ""),
        title="Rate limit for admin keys",
        description=(
            "Requests per admin: N/second, N/minute, N/hour, N/day (60/minute,1000/day); over it 429. Empty = none."
        ),
    )
    api_key_rate_limit_user: str = Field(
        default=env_default("api_key_rate_limit_user", ""),
        title="Rate limit for other keys",
        description=("Requests per other user, written as for admins."),
    )
    api_key_token_quota_admin: str = Field(
        default=env_default("api_key_token_quota_admin", ""),
        title="Token quota for admin keys",
        description=(
            "Tokens per admin per UTC calendar minute, hour, day or month (200000/day,3000000/month); spent: 429."
        ),
    )
    api_key_token_quota_user: str = Field(
        default=env_default("api_key_token_quota_user", ""),
        title="Token quota for other keys",
        description="Tokens per other user, written as for admins.",
    )
    api_key_max_key_age_days_admin: int = Field(
        default=env_default("api_key_max_key_age_days_admin", 0),
        ge=0,
        le=36500,
        title="Maximum key age for admins (days)",
        description=("Admin keys older than this are refused until regenerated (Open WebUI 0.6.41+). 0 = no limit."),
    )
    api_key_max_key_age_days_user: int = Field(
        default=env_default("api_key_max_key_age_days_user", 0),
        ge=0,
        le=36500,
        title="Maximum key age for others (days)",
        description="The same for other users' keys.",
    )
    api_key_max_concurrent_admin: int = Field(
        default=env_default("api_key_max_concurrent_admin", 0),
        ge=0,
        le=100000,
        title="Requests in flight per admin",
        description=(
            "Key requests of one admin served at once (a stream until it ends); one more gets 429. 0 = no limit."
        ),
    )
    api_key_max_concurrent_user: int = Field(
        default=env_default("api_key_max_concurrent_user", 0),
        ge=0,
        le=100000,
        title="Requests in flight per other user",
        description="The same for other users.",
    )
    api_key_tiers: str = Field(
        default=env_default("api_key_tiers", ""),
        title="Tiers for groups and users",
        description=(
            'JSON {"group:NAME": {...}, "user:EMAIL": {...}} giving a group or a user its own endpoints, models, '
            "rate limit, token quota, key age or concurrency over the role's valves. Per field: the user's entry, "
            "else the first listed group. Admits nobody."
        ),
    )
    route_guard: bool = Field(
        default=env_default("route_guard", True),
        title="Route guard",
        description=(
            "Judge keys on every route, not only chat. Off only to debug: keys then reach /openai and /ollama."
        ),
    )
    block_message: str = Field(
        default=env_default("block_message", DEFAULT_BLOCK_MESSAGE),
        title="Refusal message",
        description=("What a refused client reads; {reason} is the rule that refused it."),
    )
    usage_accounting: bool = Field(
        default=env_default("usage_accounting", True),
        title="Usage accounting",
        description=(
            "Count key requests and tokens per user, model and day in Open WebUI's database (install.py usage)."
        ),
    )
    usage_retention_days: int = Field(
        default=env_default("usage_retention_days", 90),
        ge=1,
        le=3650,
        title="Usage kept (days)",
        description="Days of usage kept.",
    )
    audit_log: Literal["deny", "all", "off"] = Field(
        default=env_default("audit_log", "deny"),
        title="Audit log",
        description="Decisions logged: deny (refusals), all, or off.",
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

    @field_validator("api_key_token_quota_admin", "api_key_token_quota_user")
    @classmethod
    def _token_quota(cls, value: str) -> str:
        TokenQuota.parse(value)
        return value

    @field_validator("api_key_max_key_age_days_admin", "api_key_max_key_age_days_user")
    @classmethod
    def _key_age(cls, value: int) -> int:
        if value and not core_keeps_key_times():
            raise ValueError(KEY_TIMES_MISSING)
        return value

    @field_validator("api_key_tiers", mode="before")
    @classmethod
    def _tiers_as_json(cls, value: Any) -> Any:
        """A valves file (install.py --valves) may write the tiers as a JSON object; they are stored as text."""
        return json.dumps(value) if isinstance(value, dict) else value

    @field_validator("api_key_tiers")
    @classmethod
    def _tiers(cls, value: str) -> str:
        entries = parse_tiers(value)
        if any(dict(e.values).get("max_key_age_days") for e in entries) and not core_keeps_key_times():
            raise ValueError(KEY_TIMES_MISSING)
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
    def _keep_sessions_working(cls, data: Any, handler: Callable) -> Valves:
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
# The one evaluation path
# ---------------------------------------------------------------------------
# Both adapters (the inlet filter and the route guard) hand over what they know and get back None or
# a Refusal; `conclude` is the one place a decision becomes an audit line and a refusal.
@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    reason: str
    headers: tuple = ()  # extra response headers, (name, value) pairs


@dataclass(frozen=True)
class ModelRequest:
    """What a request body asks of models, as one reader per route kind found it."""

    model: str | None = None  # the model it names; None where it names none
    problem: str = ""  # why the models of a model-bearing body could not be read
    targets: tuple = ()  # further models it names: the targets of a fan-out (message_ids)
    calls: int = 1  # model calls it asks core for
    background: str = ""  # how a model answers after this request ends (core's background tasks), if it does


NO_MODEL = ModelRequest()


async def facts_for(
    policy: Policy, user: dict, token: str | None, method: str, path: str, asked: ModelRequest
) -> Facts:
    """Everything decide() needs, read from core's own records: groups, the models core will call for
    this body (fresh, only where the tier has a model list), the key's creation time (only where the
    tier has a maximum age)."""
    user_id, email, role = str(user["id"]), str(user.get("email") or ""), str(user.get("role") or "")
    group_ids, group_names = await user_groups(user_id)
    tier = policy.tier_for(Facts(user_id=user_id, email=email, role=role, group_ids=group_ids, group_names=group_names))
    resolved: list = []
    if not tier.allowed_models.admits_all and not asked.problem:
        named = [m for m in (asked.model, *asked.targets) if m]
        resolved = [(t, "named in message_ids") for t in asked.targets if t != asked.model]
        for model in dict.fromkeys(named):
            resolved += await models_behind(model)
    return Facts(
        user_id=user_id,
        email=email,
        role=role,
        group_ids=group_ids,
        group_names=group_names,
        method=method,
        path=path,
        model=asked.model,
        model_problem=asked.problem,
        resolved=tuple(resolved),
        model_calls=asked.calls,
        background=asked.background,
        key_created=await key_created(user_id, token) if tier.max_key_age_days and token else None,
        now=time.time(),
    )


@dataclass(frozen=True)
class Outcome:
    """One copy's answer for one API-key request."""

    refusal: Refusal | None = None  # None lets it through
    headers: tuple = ()  # RateLimit fields, (name, value) pairs
    tier: Tier | None = None  # the tier it was judged under (None when the guard could not tell)
    facts: Facts | None = None


async def evaluate(
    valves: Any,
    user: dict | None,
    token: str | None,
    method: str,
    path: str | None,
    asked: ModelRequest,
    where: str,
    quiet: bool = False,
    count: bool = False,
) -> Outcome:
    """Judge one API-key request. `quiet` logs only a refusal; `count` applies the request limits and
    token quotas to an admitted request (its concurrency cap is the route guard's: take_lease)."""
    facts, policy, tier, error = Facts(method=method, path=path or ""), None, None, None
    try:
        policy = policy_from_valves(valves)
        if path is None:
            raise ValueError("no request passed to the guard")
        if not isinstance(user, dict):
            raise ValueError("no user passed to the guard")
        facts = await facts_for(policy, user, token, method, path, asked)
        decision = decide(facts, policy)
        tier = policy.tier_for(facts)
    except Exception as exc:  # fail closed: an undecidable key request is denied
        decision, error = GUARD_ERROR, describe(exc)
    enforce = policy.enforce if policy is not None else True
    if not (count and decision.allowed and tier is not None and tier.counting):
        return Outcome(conclude(decision, facts, token, where, enforce, valves, error, quiet), (), tier, facts)
    outcome = await counted(tier, facts, token, where, valves, enforce)
    if outcome.refusal is None:  # admitted by the counters too: now it is an allow
        conclude(decision, facts, token, where, enforce, valves, error, quiet)
    return outcome


async def counted(tier: Tier, facts: Facts, token: str | None, where: str, valves: Any, enforce: bool) -> Outcome:
    """The counters of an admitted request: the token quota (read only: tokens are charged once the
    answer is known), then the request limit (the request recorded). Counters that fail admit: they
    never lock anyone out."""
    user_id, role, now = facts.user_id, facts.role or "-", facts.now
    fields: dict = {}
    try:
        quota = tier.token_quota
        if quota.windows:
            used = await settle(limiter().quota_used(user_id, quota, now))
            fields = merged_fields(fields, quota_fields(quota, used, now))
            over = quota_exceeded(quota, used, now)
            if over is not None:
                window, seconds = over
                text = {"limit": window.limit, "unit": window.unit, "used": used[quota.windows.index(window)]}
                decision = _decision(False, REASON_TOKEN_QUOTA, role=role, valve=tier.valve("token_quota"),
                                     seconds=whole_seconds(seconds), **text)  # fmt: skip
                headers = tuple({**fields, "Retry-After": str(whole_seconds(seconds))}.items())
                refusal = conclude(decision, facts, token, where, enforce, valves, None, False, 429, headers)
                if refusal is not None:
                    return Outcome(refusal, headers, tier, facts)
        limit = tier.rate_limit
        if limit.windows:
            verdict = await settle(limiter().check(user_id, limit))
            fields = merged_fields(fields, rate_limit_headers(limit, verdict))
            if not verdict.allowed:
                text = rate_limited_fields(verdict, role, tier.valve("rate_limit"))
                decision = _decision(False, REASON_RATE_LIMITED, **text)
                headers = tuple(fields.items())
                refusal = conclude(decision, facts, token, where, enforce, valves, None, False, 429, headers)
                return Outcome(refusal, headers, tier, facts)
    except Exception as exc:  # a counter that fails must not lock every key out: admit, and say so
        log.error("api_key_guard limits not applied: %s", describe(exc))
        return Outcome(None, (), tier, facts)
    return Outcome(None, tuple(fields.items()), tier, facts)


async def take_lease(cap: int, judged: Outcome, valves: Any, token: str | None) -> tuple:
    """(Refusal or None, the Lease taken or None, RateLimit fields) for a request its copies admitted,
    under the smallest concurrency cap among them. A failing counter admits without a lease."""
    facts = judged.facts
    lease = Lease(facts.user_id, f"{_MEMBER_NONCE}:{next(_member_serial)}")
    try:
        in_flight = await settle(limiter().acquire(lease, cap))
    except Exception as exc:
        log.error("api_key_guard concurrency limit not applied: %s", describe(exc))
        return None, None, ()
    fields = concurrency_fields(cap, in_flight)
    if in_flight <= cap:
        return None, lease, tuple(fields.items())
    decision = _decision(False, REASON_CONCURRENCY, role=facts.role or "-", limit=cap,
                         valve=judged.tier.valve("max_concurrent"))  # fmt: skip
    # the refusal tells the whole state: the other counters' fields, this one's, when to retry
    headers = tuple(merged_fields(dict(judged.headers), {**fields, "Retry-After": "1"}).items())
    policy = policy_from_valves(valves)
    return conclude(decision, facts, token, "route", policy.enforce, valves, None, False, 429, headers), None, headers


def merged_fields(fields: dict, more: dict) -> dict:
    """RateLimit-Policy and RateLimit are lists: the items of several counters join in one field."""
    joined = dict(fields)
    for name, value in more.items():
        joined[name] = f"{joined[name]}, {value}" if name in joined and name != "Retry-After" else value
    return joined


# ---------------------------------------------------------------------------
# Audit lines
# ---------------------------------------------------------------------------
# Every field but the verdict words comes from a request, so an attacker chooses it: control
# characters are escaped (no forged lines), each field is cut to LOG_FIELD_CHARS, and refusals
# repeat at most once per user and reason every AUDIT_REPEAT_SECONDS, the next line counting what
# was left out.
LOG_FIELD_CHARS = 200
AUDIT_REPEAT_SECONDS = 60.0
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\\\"]")
_NEEDS_QUOTES = re.compile(r"[ =\"]")


def log_field(value: Any, limit: int = LOG_FIELD_CHARS, quote: bool = True) -> str:
    """One bounded, single-line field: control and bidi characters, quotes and backslashes escaped, long
    values cut with '…', and a value with a space or '=' quoted so it cannot pose as more key=value pairs."""
    text = str(value) if value is not None else "-"
    text = text[: limit + 1]
    quoted = quote and _NEEDS_QUOTES.search(text) is not None
    text = _UNPRINTABLE.sub(
        lambda m: "\\" + m[0] if m[0] in '\\"' else m[0].encode("unicode_escape").decode("ascii"), text
    )
    text = text if len(text) <= limit else text[:limit] + "…"
    return f'"{text}"' if quoted else text


class AuditThrottle:
    """At most one line per (user, reason) per `seconds`; a bounded memory of who was logged when."""

    def __init__(self, seconds: float = AUDIT_REPEAT_SECONDS, max_entries: int = CACHE_MAX_ENTRIES):
        self.seconds = seconds
        self.max_entries = max_entries
        self._seen: collections.OrderedDict = collections.OrderedDict()  # key -> [logged at, suppressed]
        self._lock = threading.Lock()

    def admit(self, key: tuple, now: float | None = None) -> int | None:
        """None to leave this line out; else how many like it were left out before it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.seconds:
                entry[1] += 1
                return None
            suppressed = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
            return suppressed


def conclude(
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
    """The one place a decision becomes an audit line (the one the settings ask for) and, when the
    request must be stopped, a Refusal."""
    stop = not decision.allowed and enforce
    audit = valves.audit_log
    if error is not None:
        level = logging.ERROR
    elif decision.allowed:
        level = logging.INFO if audit == "all" and not quiet else None
    else:
        level = logging.WARNING if audit != "off" and (stop or not quiet) else None
    suppressed = 0
    if level is not None and not decision.allowed:
        throttle = process_wide("audit_throttle", AuditThrottle)
        suppressed = throttle.admit((facts.user_id, decision.reason, error, stop))
        level = None if suppressed is None else level
    if level is not None:
        word = "limit" if status == 429 else "deny"
        verdict = "allow" if decision.allowed else (word if stop else f"would-{word}")
        log.log(
            level,
            "api_key_guard %s via=%s reason=%s key=%s user=%s role=%s path=%s model=%s: %s%s%s",
            verdict,
            where,
            decision.reason,
            fingerprint(token),
            log_field(facts.user_id or "-"),
            log_field(facts.role or "-"),
            log_field(facts.path or "-"),
            log_field(facts.model or "-"),
            log_field(decision.message, 2 * LOG_FIELD_CHARS, quote=False),  # the free text after the fields
            f" [{log_field(error, 2 * LOG_FIELD_CHARS, quote=False)}]" if error else "",
            f" ({suppressed} like it left out in the last {AUDIT_REPEAT_SECONDS:.0f} s)" if suppressed else "",
        )
    if not stop:
        return None
    return Refusal(status, block_text(valves.block_message, decision), decision.reason, headers)


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------
# Read in Open WebUI's own order (utils/auth.py get_current_user,
# then the request.state.token fallback filled by its ASGI middleware).
def presented_credential(authorization: str | None, cookie_token: str | None, custom_header: str | None) -> str | None:
    """The token core authenticates the request with, or None."""
    if authorization:
        scheme, _, param = authorization.strip().partition(" ")
        if scheme and param.strip() and scheme.lower() == "bearer":
            return param.strip()
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
# Lookups
# ---------------------------------------------------------------------------
# Through Open WebUI's own models (sync in 0.6, async in 0.12), cached
# so a steady stream of requests causes no database query per request.
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


# Core's group ids are UUIDs. A group *named* like another group's id would otherwise take that group's
# tier or admission (group names can come from an identity provider's claims).
GROUP_ID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


async def user_groups(user_id: str) -> tuple[frozenset, frozenset]:
    """(ids, names) of the groups the user is a direct member of; a name shaped like an id is no name,
    and a name is matched without the spaces around it."""
    cached = _group_cache.get(user_id)
    if cached is None:
        groups = await settle(openwebui_model("groups", "Groups").get_groups_by_member_id(user_id))
        names = {str(g.name or "").strip() for g in groups}
        cached = (frozenset(g.id for g in groups), frozenset(n for n in names if n and not GROUP_ID_SHAPE.fullmatch(n)))
        _group_cache.put(user_id, cached)
    return cached


KEY_TIMES_MISSING = (
    "this Open WebUI keeps no creation time for API keys (the api_key table came in 0.6.41): "
    "a maximum key age cannot be enforced here; leave it 0"
)
_key_times = TTLCache(GROUPS_TTL_SECONDS)


def core_is_async() -> bool:
    """0.9+ looks keys up in the event loop (async); 0.6-0.8 in a threadpool thread (sync)."""
    return inspect.iscoroutinefunction(openwebui_model("users", "Users").get_user_by_api_key)


def core_keeps_key_times() -> bool:
    """Whether core's key table has creation times (0.6.41+); True outside Open WebUI (cannot tell)."""
    users = sys.modules.get("open_webui.models.users")
    return users is None or hasattr(users, "ApiKey")


async def key_created(user_id: str, token: str | None) -> int | None:
    """When core created this user's key (epoch seconds), from its api_key table; None where it keeps
    none, or when the stored key is not `token`. Read by user id: the key itself never goes into a
    query, whose error text (SQLAlchemy prints the parameters) would carry it into a log line."""
    if not core_keeps_key_times():
        return None
    digest = hashlib.sha256(f"{user_id}\0{token}".encode()).hexdigest()  # the cache never holds a key
    cached = _key_times.get(digest)
    if cached is None:
        cached = (await off_loop(lambda: stored_key_time(user_id, token)),)
        _key_times.put(digest, cached)
    return cached[0]


def stored_key_time(user_id: str, token: str | None) -> int | None:
    """created_at of the user's key (of the one equal to `token`, when given)."""
    try:
        with openwebui_engine().connect() as conn:
            rows = conn.execute(
                sql_text("SELECT key, created_at FROM api_key WHERE user_id = :user_id"), {"user_id": user_id}
            ).all()
    except Exception as exc:
        raise LookupError(f"core's api_key table could not be read ({type(exc).__name__})") from None
    for key, created in rows:
        if token is None or hmac.compare_digest(str(key).encode(), token.encode()):
            return int(created) if created is not None else None
    return None


async def off_loop(work: Callable[[], Any]) -> Any:
    """Blocking work (a sync database or Redis call) kept off the event loop: in a thread on async
    Open WebUI; right here on sync Open WebUI, whose lookups already run in a threadpool thread."""
    if core_is_async():
        return await asyncio.to_thread(work)
    return work()


def describe(exc: Exception) -> str:
    """One log-friendly line; validation errors as `valve: problem`."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'valves'}: {e['msg']}" for e in exc.errors())
    text = _SQL_PARAMETERS.sub("[parameters: hidden]", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {KEY_IN_TEXT.sub(lambda m: fingerprint(m[0]), text)}"


# SQLAlchemy's error text ends in the statement's parameters; a parameter may be a credential.
_SQL_PARAMETERS = re.compile(r"\[parameters: .*?\](?= \(|$)|\[parameters: .*")


def block_text(template: str, decision: Decision) -> str:
    try:
        return template.format(reason=decision.message)
    except (KeyError, IndexError, ValueError):
        return decision.message


# ---------------------------------------------------------------------------
# Reading what a body asks of models
# ---------------------------------------------------------------------------
# Runs only after core accepted the key, on a body of at most MAX_MODEL_BODY_BYTES; every reader is
# linear in its input and every id it keeps is at most MAX_MODEL_ID_CHARS long.
MAX_MODEL_ID_CHARS = 256
MAX_FAN_OUT_TARGETS = 64
MODEL_MENTION = "<@M:"
MENTION_ANSWER = "a model mentioned in a channel answers after the post"
MAX_MENTIONS = 1000


def mentioned_models(text: str, most: int = 2) -> tuple[list[str], str]:
    """The model ids of `<@M:id>` / `<@M:id|label>` mentions in `text`, up to `most` distinct ones.

    A superset of what Open WebUI's own regexes find: `<@([A-Z]):([^|>]+)(?:[|][^>]+)?>` on 0.12,
    without the closing `>` on 0.8 and 0.10. Every candidate start is tried (a mention inside another
    never hides) and an id runs to the next `|` or `>`, or to the end. One pass: the next `|` and `>`
    are looked up only once the scan has moved past them."""
    if text.count(MODEL_MENTION) > MAX_MENTIONS:  # counted at C speed; no message needs this many
        return [], f"the message holds more than {MAX_MENTIONS} model mentions"
    found: dict[str, None] = {}
    bar = gt = -2  # next '|' / '>' at or after the cursor; -2 = not looked up yet, -1 = none
    start = text.find(MODEL_MENTION)
    while start != -1 and len(found) < most:
        begin = start + len(MODEL_MENTION)
        if bar != -1 and bar < begin:
            bar = text.find("|", begin)
        if gt != -1 and gt < begin:
            gt = text.find(">", begin)
        end = min((i for i in (bar, gt) if i != -1), default=len(text))
        if end > begin:
            if end - begin > MAX_MODEL_ID_CHARS:
                return [], f"a model mention is longer than {MAX_MODEL_ID_CHARS} characters"
            found.setdefault(text[begin:end])
        start = text.find(MODEL_MENTION, begin)
    return list(found), ""


def mentioned_model(body: Any) -> ModelRequest:
    """A channel message, where a @model mention (or a reply to a model's message) makes that model
    answer; a message that can call no model names none, and that is no problem."""
    if not isinstance(body, dict):
        return ModelRequest(problem="the request body is not a JSON object")
    content = body.get("content")
    mentioned, problem = mentioned_models(content if isinstance(content, str) else str(content or ""))
    # Each mentioned model answers, and so does the model of a message replied to: several calls.
    calls = (MAX_MENTIONS + 1 if problem else len(mentioned)) + bool(body.get("reply_to_id"))
    if body.get("reply_to_id"):
        return ModelRequest(problem="a reply can make the model of the message it answers respond", calls=calls)
    if problem:
        return ModelRequest(problem=problem, calls=calls)
    if len(mentioned) > 1:
        return ModelRequest(problem="the message mentions several models", calls=calls)
    return ModelRequest(model=mentioned[0], background=MENTION_ANSWER) if mentioned else NO_MODEL


def fan_out_targets(message_ids: Any) -> tuple[list[str], str, int]:
    """The models of a chat request's message_ids (0.10+: [{model_id, message_id}] or {model_id: id}),
    why they cannot be checked, and how many model calls they ask for (counted even when unreadable)."""
    if message_ids is None:
        return [], "", 1
    if isinstance(message_ids, dict):
        entries = list(message_ids)
    elif isinstance(message_ids, list):
        entries = [e.get("model_id") if isinstance(e, dict) else None for e in message_ids]
    else:
        return [], "message_ids is neither a list nor an object", 2
    calls = max(len(entries), 1)
    if len(entries) > MAX_FAN_OUT_TARGETS:
        return [], f"message_ids has more than {MAX_FAN_OUT_TARGETS} entries", calls
    if not all(isinstance(m, str) and 0 < len(m) <= MAX_MODEL_ID_CHARS for m in entries):
        return [], "a message_ids entry names no model, or one too long to check", calls
    return entries, "", calls


PROXY_LATER = "the /openai proxy forwards any path, and a provider may answer after it (batches, background)"


def proxied_model(body: Any) -> ModelRequest:
    """The provider proxy: the model may be in the forwarded path, which the guard cannot know, and a
    forwarded job (a batch, a background response) spends tokens after the request has ended."""
    asked = model_of(body)
    return ModelRequest(
        asked.model,
        "the /openai proxy forwards any path, and a provider may take the model from it",
        asked.calls,
        background=PROXY_LATER if isinstance(body, dict) else "",
    )


def stored_model(body: Any) -> ModelRequest:
    """A route whose model comes from stored data: nothing in the request says which."""
    return ModelRequest(
        problem="this route calls the model stored with the chat or automation, which cannot be checked",
        background="a stored chat or automation calls its model",
    )


def automation_model(body: Any) -> ModelRequest:
    """An automation stores `data.model_id`; core calls it later on the owner's behalf."""
    data = body.get("data") if isinstance(body, dict) else None
    model = data.get("model_id") if isinstance(data, dict) else None
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_ID_CHARS:
        return ModelRequest(problem="the automation names no model, or one too long to check")
    return ModelRequest(model=model, background="an automation calls its model when it runs")


def image_edit_model(body: Any) -> ModelRequest:
    """An image edit names its model or takes the one the admin configured (that one is not the key's)."""
    if isinstance(body, dict) and body.get("model") is None:
        return NO_MODEL
    return model_of(body)


def model_of(body: Any) -> ModelRequest:
    """The model a request body names (and any fan-out targets), or why none could be read."""
    if not isinstance(body, dict):
        return ModelRequest(problem="the request body is not a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return ModelRequest(problem="the request names no model")
    if len(model) > MAX_MODEL_ID_CHARS:
        return ModelRequest(problem=f"the model id is longer than {MAX_MODEL_ID_CHARS} characters")
    targets, problem, calls = fan_out_targets(body.get("message_ids"))
    background = answered_later(body)
    if problem:
        return ModelRequest(model=model, problem=problem, calls=calls, background=background)
    return ModelRequest(model=model, targets=tuple(targets), calls=calls, background=background)


def answered_later(body: dict) -> str:
    """How a model body makes a model answer after its request ended (nothing to charge or hold), or ''."""
    # session_id with chat_id, or with parent_id null (0.10+ then makes a new chat): core answers at once
    # with a task id and calls the model in a task of its own.
    if body.get("session_id"):
        return "session_id: core answers at once and calls the model later, in a task"
    if body.get("background") is True:  # a Responses request: the provider answers later (an image edit's is a word)
        return "background: the provider answers after the request"
    if body.get("background_tasks"):  # title, tags, follow-ups: model calls after the answer
        return "background_tasks: core calls a model again after the answer"
    return ""


# ---------------------------------------------------------------------------
# The model that answers
# ---------------------------------------------------------------------------
# A workspace model is a name over a base model: core calls the base (`base_model_id`), so a user
# who may create (or was granted write access to) a model could wrap any model in a name the key's
# list admits. Every workspace model is judged on its own id and on its base, whoever made it. An
# arena model picks among its candidates.
MODEL_TTL_SECONDS = GROUPS_TTL_SECONDS
_model_cache = TTLCache(MODEL_TTL_SECONDS)  # for accounting only (answering_model): never for a decision


async def models_behind(model_id: str) -> list:
    """[(model, how)]: the models core may call when a request names `model_id`, besides it. Read
    fresh for every decision: a base model edited between check and call must not ride on a cache."""
    behind, seen, current = [], {model_id}, model_id
    for _ in range(2):  # core swaps once; a second level is judged too, never followed further
        record = await settle(openwebui_model("models", "Models").get_model_by_id(current))
        base = getattr(record, "base_model_id", None) if record is not None else None
        if not base or base in seen:
            break
        behind.append((str(base), f"the base model of workspace model '{log_field(current, 64)}'"))
        seen.add(base)
        current = base
    arena = arena_candidates(model_id)
    if arena is not None:
        behind += [(m, f"a model the arena '{log_field(model_id, 64)}' may pick") for m in arena]
    return behind


ANY_MODEL = "*"


def arena_candidates(model_id: str) -> list | None:
    """The models an arena model picks from (None when it is no arena model); ['*'] when it may pick any."""
    main = sys.modules.get("open_webui.main")
    models = getattr(getattr(getattr(main, "app", None), "state", None), "MODELS", None)
    # a dict, or (0.8+ with WEBSOCKET_MANAGER=redis) a Redis-backed mapping with the same get()
    model = models.get(model_id) if hasattr(models, "get") else None
    if not isinstance(model, dict) or model.get("owned_by") != "arena":
        return None
    meta = (model.get("info") or {}).get("meta") or {}
    picks = meta.get("model_ids")
    if picks and meta.get("filter_mode") != "exclude" and isinstance(picks, list):
        return [str(m) for m in picks]
    return [ANY_MODEL]


def policy_fingerprint(stored: Any) -> str:
    """Short fingerprint of the stored valves, so an installer can see which policy is in force."""
    text = json.dumps(stored or {}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stored_valves(stored: Any) -> Valves:
    """The Valves for a stored record; an invalid record becomes unusable valves (fail closed)."""
    try:
        return Valves(**(stored or {}))
    except Exception as exc:
        return unusable_valves(exc)


def unusable_valves(exc: Exception) -> Valves:
    """Defaults marked unusable: every API-key request is refused with the guard-error message."""
    marked = Valves()
    marked._invalid = describe(exc)
    return marked


async def answering_model(model_id: str) -> str:
    """The model core calls for `model_id`: a workspace model's base, whoever made it."""
    key = ("answers", model_id)
    cached = _model_cache.get(key)
    if cached is None:
        record = await settle(openwebui_model("models", "Models").get_model_by_id(model_id))
        cached = str(getattr(record, "base_model_id", None) or model_id) if record is not None else model_id
        _model_cache.put(key, cached)
    return cached


# ---------------------------------------------------------------------------
# The filter
# ---------------------------------------------------------------------------
# Adapts Open WebUI's inlet arguments to the evaluation.
class Filter:
    Valves = Valves

    def __init__(self):
        self.valves = self.Valves()

    async def inlet(self, body: dict, __user__: dict | None = None, __request__: Any = None) -> dict:
        token, method, path, judged = None, "POST", None, False
        if __request__ is not None:
            token = request_credential(__request__)
            auth_type = getattr(__request__.state, "auth_type", None)
            if not (auth_type == "api_key" if auth_type is not None else is_api_key(token)):
                return body
            scope = __request__.scope
            method, path = scope.get("method", "POST"), scope["path"]
            judged = getattr(scope.get(STATE_KEY), "judged", False)
        # Defence in depth behind the route guard: when it already judged this request, a second
        # audit line would double-count it, so only a refusal is logged here.
        outcome = await evaluate(
            self.valves, __user__, token, method, path, model_of(body), "inlet", quiet=judged, count=not judged
        )
        if outcome.refusal is not None:
            raise Exception(outcome.refusal.detail)
        return body


# ---------------------------------------------------------------------------
# Route guard
# ---------------------------------------------------------------------------
# An inlet filter only sees the chat pipeline, yet the same key reaches models through /openai/*,
# /ollama/*, task and embedding routes, and the whole REST API. Open WebUI authenticates every API
# key through one call, Users.get_user_by_api_key (0.6 to 0.12), so the guard wraps that call: it
# sees exactly the credential core accepted, from any transport, and the user core resolved, and
# refuses before any route handler runs. A thin ASGI wrapper keeps the request's RequestState in its
# scope: it redacts keys from the URL, reads (never parses) the body of a key request that may name
# a model, marks judged responses and trims model listings. Everything that depends on the request's
# content runs inside the lookup, once core accepted the key. Both hooks are installed once per
# process and delegate to the most recently loaded copy of this file, which judges with the valves
# of every ACTIVE copy: a clone, a trial install or a Tool upload never disarms it.
HOOKS_ATTR = "_api_key_guard_hooks"
GUARD_HEADER = "X-API-Key-Guard"
POLICY_HEADER = "X-API-Key-Guard-Policy"
COUNTERS_HEADER = "X-API-Key-Guard-Counters"
STATE_KEY = "api_key_guard"  # a request's RequestState, in its ASGI scope

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
# Routes that call a model named by stored data, not by the request: tool-call resume (0.12) takes the
# stored message's model, an automation run (0.10+) the stored automation's. Refused where a list applies.
STORED_MODEL_ROUTES = frozenset({"/api/v1/chats/{id}/messages/{message_id}/resolve", "/api/v1/automations/{id}/run"})
# Automations (0.10+) store the model they will call later, with no key in sight: judged when stored.
AUTOMATION_ROUTES = frozenset({"/api/v1/automations/create", "/api/v1/automations/{id}/update"})
# Image edits (0.8+) use the body's model when it names one, else the admin's configured one.
IMAGE_EDIT_ROUTES = frozenset({"/api/v1/images/edit"})
# The provider proxy (always on 0.6-0.8; ENABLE_OPENAI_API_PASSTHROUGH on 0.10+) forwards any path,
# `..` normalised upstream: a provider that takes the model from the path calls what the body hides.
PROXY_ROUTES = frozenset({"/openai/{path:path}"})
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
MAX_VALVES_BODY_BYTES = 2**20
ROUTE_KIND_CACHE_ENTRIES = 1024
MODEL_ROUTE, MENTIONS, LISTING = "model", "mentions", "listing"
STORED, AUTOMATION, IMAGE_EDIT, PROXY = "stored", "automation", "image-edit", "proxy"
MODEL_READERS = {
    PROXY: proxied_model,
    MODEL_ROUTE: model_of,
    MENTIONS: mentioned_model,
    STORED: stored_model,
    AUTOMATION: automation_model,
    IMAGE_EDIT: image_edit_model,
}
# Every template whose body the guard reads, by the kind of reader; the route-table contract test knows these.
READ_ROUTES = {
    **dict.fromkeys(MODEL_ROUTES, MODEL_ROUTE),
    **dict.fromkeys(MENTION_ROUTES, MENTIONS),
    **dict.fromkeys(STORED_MODEL_ROUTES, STORED),
    **dict.fromkeys(AUTOMATION_ROUTES, AUTOMATION),
    **dict.fromkeys(IMAGE_EDIT_ROUTES, IMAGE_EDIT),
    **dict.fromkeys(PROXY_ROUTES, PROXY),
}
FUNCTIONS_PATH = "/api/v1/functions/"


def literal_prefix(template: str) -> str:
    return template.split("{", 1)[0]


# Every path a route template matches starts with the template's text before its first parameter:
# one str.startswith decides, before the key is checked, whether a body may have to be read.
BODY_PREFIXES = tuple(sorted({literal_prefix(t) for t in READ_ROUTES}))
LISTING_PREFIXES = tuple(sorted({literal_prefix(t) for t in MODEL_LISTINGS}))


@dataclass
class RequestState:
    """What the route guard knows of one HTTP request; one per request, in its scope under STATE_KEY."""

    body: bytes | None = None  # read before core, parsed only once core accepted the key; None past the limit
    body_read: bool = False
    body_bytes: int = 0  # how much of the body the guard read (all of it, or a little past the limit)
    judged: bool = False  # the lookup judged (and counted) it; a second lookup of the same request reuses that
    refusal: Refusal | None = None
    marks: tuple = ()  # response headers, (bytes, bytes)
    listing: tuple = ()  # a key's model listing is trimmed to what every one of these ModelLists admits
    usage: tuple | None = None  # (user id, model, route class, decision) to record once the answer is sent
    meter: UsageMeter | None = None  # reads the answer of an admitted model request for its tokens
    started: float = 0.0
    audit_all: bool = False  # a copy's audit_log is "all": the answer's tokens get a line too
    judged_as: tuple | None = None  # (method, path) to judge instead of the scope's (usage read-outs)
    lease: Lease | None = None  # its place among its user's requests in flight (one per request)
    charge: tuple | None = None  # (user id, QuotaWindows): where the answer's tokens are charged
    loop: Any = None  # the event loop serving it: lease renewals run there
    renewer: Any = None  # the task renewing its lease in Redis
    finished: bool = False  # its answer ended: nothing is renewed any more


def scope_credential(scope: dict) -> str | None:
    """The credential core will authenticate, read from the raw ASGI headers in core's order."""
    authorization = custom = None
    cookies = []
    custom_name = CUSTOM_API_KEY_HEADER.lower().encode("latin-1")
    for name, value in scope.get("headers") or ():
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"cookie":
            cookies.append(value.decode("latin-1"))
        elif name == custom_name and custom is None:
            custom = value.decode("latin-1")
    return presented_credential(authorization, cookie_token("; ".join(cookies) or None), custom)


def may_carry_a_key(scope: dict) -> bool:
    """Whether any credential header holds an `sk-` value: the guard's parse and core's may differ
    (spacing, several Cookie headers on old Starlette), so the cheap work is done for either reading."""
    if is_api_key(scope_credential(scope)):
        return True
    custom_name = CUSTOM_API_KEY_HEADER.lower().encode("latin-1")
    return any(
        b"sk-" in value
        for name, value in scope.get("headers") or ()
        if name in (b"authorization", b"cookie", custom_name)
    )


def cookie_token(cookie: str | None) -> str | None:
    """The `token` cookie as Starlette parses it (last one wins, quotes removed)."""
    token = None
    for chunk in (cookie or "").split(";"):
        key, sep, value = chunk.partition("=")
        if sep and key.strip() == "token":
            token = http.cookies._unquote(value.strip())
    return token


# ---------------------------------------------------------------------------
# Keys in URLs
# ---------------------------------------------------------------------------
# Core accepts no key in a URL, but users paste them there, and uvicorn's access line prints the
# path and query string as the scope holds them when the response starts. The scope is rewritten
# before anything runs.
KEY_IN_TEXT = re.compile(r"sk-[A-Za-z0-9_\-]*")
KEY_IN_PATH = re.compile(r"sk-[0-9a-fA-F]{32}")  # exactly Open WebUI's key shape: other path segments stay


def url_fingerprint(key: str) -> str:
    """The fingerprint as a URL shows it: plain ASCII, so the access line reads it as written."""
    return fingerprint(key).replace("…", "...")


def redact_keys_in_url(scope: dict) -> None:
    query = scope.get("query_string") or b""
    if query and (b"sk-" in query or b"%" in query):
        redacted = redacted_query(query.decode("latin-1"))
        if redacted is not None:
            scope["query_string"] = redacted.encode("latin-1")
    path = scope.get("path") or ""
    if "sk-" in path and KEY_IN_PATH.search(path):
        scope["path"] = KEY_IN_PATH.sub(lambda m: url_fingerprint(m[0]), path)
        scope["raw_path"] = urllib.parse.quote(scope["path"]).encode("latin-1")


def redacted_query(query: str) -> str | None:
    """The query string with every key-shaped value shown as its fingerprint; None when it holds none."""
    if "sk-" not in urllib.parse.unquote_plus(query):
        return None
    parts = []
    for part in query.split("&"):
        plain = urllib.parse.unquote_plus(part)
        if "sk-" in plain:
            name, sep, value = plain.partition("=")
            name, value = (KEY_IN_TEXT.sub(lambda m: url_fingerprint(m[0]), v) for v in (name, value))
            part = urllib.parse.quote_plus(name) + sep + urllib.parse.quote_plus(value)
        parts.append(part)
    return "&".join(parts)


# ---------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------
# Read once, bounded, replayed to core byte for byte.
async def buffered(receive: Callable, limit: int) -> tuple[bytes | None, Callable]:
    """Read a request body once, up to `limit` bytes: (the body, or None past the limit; a receive that
    hands it on to the app as ONE message, byte for byte, then the unread rest). One message, because a
    client dripping a byte per packet makes one ASGI message each: replaying them one by one would make
    core pay for every one again."""
    chunks, size, more, other = [], 0, True, None
    while more and size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            other = message  # a disconnect: handed on after the body read so far
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    body = b"".join(chunks)
    pending = [{"type": "http.request", "body": body, "more_body": more or other is not None}]
    if other is not None:
        pending.append(other)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return (body if size <= limit and other is None else None), replay


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


# ---------------------------------------------------------------------------
# Route hooks
# ---------------------------------------------------------------------------
# The ASGI wrapper and the wrapped key lookup, installed once per process; RouteGuard is this
# copy's per-request work.
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


def listing_trimmed(body: bytes, lists: tuple) -> bytes:
    """An OpenAI-style ({"data": [...]}) or Ollama-style ({"models": [...]}) listing, trimmed to the
    models every one of `lists` admits."""

    def admitted(model: str) -> bool:
        return all(models.admits(model) for models in lists)

    listing = json.loads(body)
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        listing["data"] = [m for m in listing["data"] if isinstance(m, dict) and admitted(str(m.get("id")))]
    elif isinstance(listing, dict) and isinstance(listing.get("models"), list):
        listing["models"] = [
            m for m in listing["models"] if isinstance(m, dict) and admitted(str(m.get("model") or m.get("name")))
        ]
    else:
        raise ValueError("unknown model listing shape")
    return json.dumps(listing).encode()


class RouteHooks:
    """Process-wide hooks; intentionally tiny because they are never replaced."""

    def __init__(self, app: Any, users: Any, http_exception: type):
        self.scope_var: contextvars.ContextVar = contextvars.ContextVar("api_key_guard_scope", default=None)
        self.guard: RouteGuard | None = None  # the code of the most recently loaded copy
        self.function_ids: set = set()  # every copy loaded in this process, by function id
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


def function_id_from_module_name(name: str) -> str | None:
    """Open WebUI names a Function's module function_<id> (0.6) or function_<id>_<hex32> (0.12);
    anything else (a Tool's tool_<id>, a test's import) is no installed function."""
    if not name.startswith("function_"):
        return None
    return re.sub(r"_[0-9a-f]{32}$", "", name[len("function_") :])


class FunctionState:
    """Whether one copy is active, its stored valves and their fingerprint, re-read every few seconds."""

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


@dataclass(frozen=True)
class Copy:
    """One active copy of the guard: its function id, valves and their fingerprint."""

    function_id: str
    valves: Valves
    policy_id: str


def needs_body(valves: Valves) -> bool:
    """Whether a key request's body must be read: usage is recorded by model, or some tier has a model
    list or counts requests."""
    try:
        policy = policy_from_valves(valves)
    except Exception:
        return False  # the lookup fails closed with the same error and logs it
    return valves.usage_accounting or policy.reads_bodies


class RouteGuard:
    """This copy of the file as the route hooks use it: per-request work for API-key requests only."""

    def __init__(self, app: Any, hooks: Any, function_id: str = ""):
        self.app = app
        self.hooks = hooks
        self.function_id = function_id
        self._states: dict[str, FunctionState] = {}
        self._kinds: dict = {}
        self._several_logged: tuple = ()

    async def active_copies(self) -> list[Copy]:
        """Every loaded copy that is active with its route guard on, by function id. Several is a
        defined state, not a choice of one: every one judges and the strictest answer wins."""
        copies = []
        for function_id in sorted(self.hooks.function_ids):
            state = self._states.get(function_id)
            if state is None:
                state = self._states[function_id] = FunctionState(function_id)
            try:
                active, valves, policy_id = await state.current()
            except Exception as exc:  # the copy's state cannot be read: fail closed for API-key traffic
                active, valves, policy_id = True, unusable_valves(exc), "-"
            if active and valves.route_guard:
                copies.append(Copy(function_id, valves, policy_id))
        ids = tuple(c.function_id for c in copies)
        if len(ids) > 1 and ids != self._several_logged:
            self._several_logged = ids
            log.error(
                "api_key_guard: %d copies are active (%s): every one judges API keys and the strictest answer "
                "wins; deactivate or delete all but one",
                len(ids),
                ", ".join(log_field(i, 64) for i in ids),
            )
        return copies

    def forget(self) -> None:
        for state in self._states.values():
            state.forget()

    def route_kind(self, scope: dict) -> str | None:
        """The kind of route Starlette dispatches this request to. Cached only where the route has no
        parameters (its path is its template), so what the cache holds is bounded by the route table."""
        key = (scope["method"], scope["path"])
        kind = self._kinds.get(key, "")
        if kind == "":
            template = routed_template(self.app, scope)
            kind = READ_ROUTES.get(template)
            if template in MODEL_LISTINGS and scope["method"] == "GET":
                kind = LISTING
            if template == scope["path"] and len(self._kinds) < ROUTE_KIND_CACHE_ENTRIES:
                self._kinds[key] = kind
        return kind

    async def judging_copy(self) -> RouteGuard:
        """The copy whose code judges: the most recently loaded ACTIVE copy, so an inactive clone or
        trial install (older code, say) never takes over; this one while none is active."""
        try:
            active = {c.function_id for c in await self.active_copies()}
            loaded = [g for g in getattr(self.hooks, "guards", {}).values() if g.function_id in active]
        except Exception:
            return self
        return loaded[-1] if loaded else self

    async def serve(self, scope: dict, receive: Callable, send: Callable, inner: Callable) -> None:
        redact_keys_in_url(scope)
        judge = await self.judging_copy()
        if judge is not self:
            return await judge.serve_here(scope, receive, send, inner)
        return await self.serve_here(scope, receive, send, inner)

    async def serve_here(self, scope: dict, receive: Callable, send: Callable, inner: Callable) -> None:
        state = scope[STATE_KEY] = RequestState(started=time.monotonic(), loop=asyncio.get_running_loop())
        path, method = scope["path"], scope["method"]
        if may_carry_a_key(scope):
            if path.startswith(BODY_PREFIXES):
                receive = await self.read_body(state, receive)
            # an uncompressed answer can be trimmed (listings) and metered (model routes)
            if path.startswith(BODY_PREFIXES) or (method == "GET" and path.startswith(LISTING_PREFIXES)):
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        report = self.usage_report(path, method)
        if report is not None:
            return await self.serve_usage(scope, receive, send, inner, report)
        send = self.marking(state, send)
        if method == "POST" and path.startswith(FUNCTIONS_PATH) and path.endswith("/valves/update"):
            receive, send = await self.explaining_refused_save(receive, send)
        try:
            await inner(scope, receive, send)
        finally:
            # An admin saving any copy's valves or state (UI or API) is in force in this worker at once.
            if method != "GET" and path.startswith(FUNCTIONS_PATH):
                self.forget()
            if state.lease is not None or state.usage is not None or state.charge is not None:
                await finish(state)

    def usage_report(self, path: str, method: str) -> str | None:
        """'usage', 'metrics' or 'drop' for the guard's own read-outs, served under a copy's function path."""
        if not path.startswith(FUNCTIONS_PATH + "id/"):
            return None
        function_id, _, tail = path[len(FUNCTIONS_PATH) + 3 :].partition("/")
        if function_id not in self.hooks.function_ids:
            return None
        reports = {("GET", "usage"): "usage", ("GET", "metrics"): "metrics", ("DELETE", "usage"): "drop"}
        return {**reports, ("GET", "explain"): "explain"}.get((method, tail))

    async def serve_usage(self, scope: dict, receive: Callable, send: Callable, inner: Callable, report: str) -> None:
        """The usage read-outs are core's admin-only valves route in disguise: core's own admin check
        authenticates the request (an admin key or session, nothing else), then its answer is replaced."""
        original = {k: scope.get(k) for k in ("method", "path", "raw_path", "query_string")}
        valves_path = scope["path"].rsplit("/", 1)[0] + "/valves"
        query = urllib.parse.parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        # A key is judged on what it asked for (DELETE .../usage), not on the route that authenticates it.
        scope[STATE_KEY].judged_as = (original["method"], original["path"])
        scope.update(method="GET", path=valves_path, raw_path=valves_path.encode("latin-1"), query_string=b"")
        held: list = []

        async def send_report(message):
            if message["type"] == "http.response.start":
                scope.update(original)  # the access line shows what was asked
                if message["status"] != 200:
                    return await send(message)
                held.append(message)
                return None
            if not held:
                return await send(message)
            if message.get("more_body", False):
                return None
            try:
                if report == "explain":
                    content_type, body = "application/json", json.dumps(await self.explained(scope, query)).encode()
                else:
                    content_type, body = await asyncio.to_thread(usage_answer, report, query)
                status = 200
            except LookupError as exc:  # no such user: the admin's typo, said as such
                content_type, status = "application/json", 404
                body = json.dumps({"detail": f"API Key Guard: {exc.args[0] if exc.args else exc}"}).encode()
            except Exception as exc:
                what = "explain" if report == "explain" else "read usage"
                log.error("api_key_guard could not %s: %s", what, log_field(describe(exc)))
                content_type, status = "application/json", 500
                body = json.dumps({"detail": f"API Key Guard could not {what}"}).encode()
            headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return None

        await inner(scope, receive, send_report)

    async def explained(self, scope: dict, query: dict) -> dict:
        """explain for the copy whose function path was asked: its stored valves, core's user data."""
        function_id = scope["path"][len(FUNCTIONS_PATH) + 3 :].partition("/")[0]
        state = self._states.get(function_id) or FunctionState(function_id)
        _, valves, _ = await state.current()
        ask = {name: (query.get(name) or [""])[0] for name in ("user", "method", "path", "model")}
        if core_is_async():
            return await explain(valves, **ask)
        return await asyncio.to_thread(drive, explain(valves, **ask))  # sync core: its lookups block

    async def read_body(self, state: RequestState, receive: Callable) -> Callable:
        """Read (not parse) the body of a key request that may name a model, when some active copy
        needs it; the bytes go on to core unchanged. Judging it waits until core accepted the key."""
        try:
            copies = await self.active_copies()
        except Exception:
            return receive
        if not any(needs_body(c.valves) for c in copies):
            return receive

        async def counted() -> dict:  # a body past the limit is not kept, yet its input is estimated
            message = await receive()
            state.body_bytes += len(message.get("body", b""))
            return message

        state.body, replay = await buffered(counted, MAX_MODEL_BODY_BYTES)
        state.body_read = True
        return replay

    async def explaining_refused_save(self, receive: Callable, send: Callable) -> tuple[Callable, Callable]:
        """An admin saving invalid valves must learn which valve is wrong: Open WebUI 0.10+ answers
        every refused save with a fixed text, so the 400 it sends is given the guard's own reason."""
        raw, replay = await buffered(receive, MAX_VALVES_BODY_BYTES)
        if raw is None:
            return replay, send
        refused: list = []
        detail = b""

        async def send_explained(message):
            nonlocal detail
            # Parsed only once core refused the save: core checked the admin first, so nobody else
            # can make the guard validate a megabyte of valves.
            if message["type"] == "http.response.start" and message["status"] == 400:
                problem = valves_problem(raw)
                if problem is None:
                    return await send(message)
                detail = json.dumps({"detail": f"API Key Guard refused these valves: {problem}"}).encode()
                refused.append(message)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
                message = {**message, "headers": [*headers, (b"content-length", str(len(detail)).encode())]}
            elif refused and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": detail}
            await send(message)

        return replay, send_explained

    def marking(self, state: RequestState, send: Callable) -> Callable:
        held: list = []

        async def send_marked(message):
            meter = state.meter
            if meter is not None:
                try:
                    if message["type"] == "http.response.start":
                        meter.start(message)
                    elif message["type"] == "http.response.body":
                        meter.feed(message.get("body", b""))
                except Exception as exc:  # metering must never break an answer
                    state.meter = None
                    log.error("api_key_guard could not meter an answer: %s", log_field(describe(exc)))
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *state.marks]
                if state.listing and message["status"] == 200:
                    held.append(message)
                    return
            elif held and message["type"] == "http.response.body":
                held.append(message)
                if message.get("more_body", False):
                    return
                await self.send_trimmed(state.listing, held, send)
                return
            await send(message)

        return send_marked

    async def send_trimmed(self, lists: tuple, held: list, send: Callable) -> None:
        start, *chunks = held
        try:
            body = listing_trimmed(b"".join(m.get("body", b"") for m in chunks), lists)
        except Exception as exc:  # fail closed: an untrimmable listing lists nothing
            log.error("api_key_guard could not trim a model listing: %s", log_field(describe(exc)))
            body = b'{"data": []}'
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def check(self, user: Any, api_key: str, scope: dict | None) -> Refusal | None:
        """Judge a key core just authenticated; None lets the request through."""
        judge = await self.judging_copy()
        return await judge.check_here(user, api_key, scope)

    async def check_here(self, user: Any, api_key: str, scope: dict | None) -> Refusal | None:
        """Core may authenticate one request twice (its audit middleware up to 0.10, and 0.12 after a
        refusal): the second lookup gets the first answer, uncounted and unlogged."""
        state = scope.get(STATE_KEY) if scope is not None else None
        if state is not None and state.judged:
            return state.refusal
        copies = await self.active_copies()
        if not copies:
            return None
        kind = self.route_kind(scope) if scope is not None else None
        asked = read_asked(state, MODEL_READERS[kind]) if kind in MODEL_READERS else NO_MODEL
        person = {"id": user.id, "email": user.email, "role": user.role}
        method, path = (scope["method"], scope["path"]) if scope is not None else ("GET", None)
        if state is not None and state.judged_as is not None:
            method, path = state.judged_as
        refusal, limits, listing, quotas, capped = None, (), [], {}, []
        for copy in copies:
            outcome = await evaluate(copy.valves, person, api_key, method, path, asked, "route", count=True)
            refusal, limits = outcome.refusal, limits or outcome.headers
            if refusal is not None:
                break  # the strictest answer wins; later copies neither judge nor count it
            tier = outcome.tier
            if kind == LISTING and not tier.allowed_models.admits_all:
                listing.append(tier.allowed_models)
            quotas.update((w.unit, w) for w in tier.token_quota.windows)
            if tier.max_concurrent:
                capped.append((tier.max_concurrent, copy.function_id, copy, outcome))
        lease = None
        if refusal is None and capped and state is not None:
            # One place per request whatever the number of copies, under the smallest cap among them.
            cap, _, copy, outcome = min(capped)
            refusal, lease, headers = await take_lease(cap, outcome, copy.valves, api_key)
            limits = tuple(merged_fields(dict(limits), dict(headers)).items())
        if state is not None:
            enforcing = any(c.valves.mode == "enforce" for c in copies)
            failed = refusal is not None and refusal.reason == REASON_GUARD_ERROR
            mode = "fail-closed" if failed else "enforce" if enforcing else "monitor"
            policy_id = ",".join(c.policy_id for c in copies)
            counters = limiter().counters_for(str(user.id))
            marks = [(GUARD_HEADER, mode), (POLICY_HEADER, policy_id), (COUNTERS_HEADER, counters)]
            if refusal is None:  # a refusal carries its own RateLimit headers
                marks += limits
            state.marks = tuple((name.lower().encode(), value.encode("latin-1")) for name, value in marks)
            state.listing = tuple(listing) if refusal is None else ()
            state.judged, state.refusal = True, refusal
            if quotas:
                state.charge = (str(user.id), tuple(quotas.values()))
            if lease is not None:
                state.lease = lease
                state.loop.call_soon_threadsafe(keep_lease, state)
            if any(c.valves.usage_accounting for c in copies) and (refusal is not None or kind in MODEL_READERS):
                await self.start_usage(state, copies, user, path or "", asked, kind, refusal)
            if refusal is None and kind in MODEL_READERS and (state.usage is not None or state.charge is not None):
                state.meter = UsageMeter(state.body_bytes)
        return refusal

    async def start_usage(
        self, state: RequestState, copies: list, user: Any, path: str, asked: ModelRequest, kind: Any, refusal: Any
    ) -> None:
        """What the answer of this request will be recorded under."""
        try:
            model = await answering_model(asked.model) if asked.model else "-"
        except Exception:  # the decision already stands; the record falls back to the named model
            model = asked.model or "-"
        decision = "allow" if refusal is None else "limit" if refusal.status == 429 else "deny"
        # A refused request's model is the attacker's word: every new name would be a new row.
        model = model[:USAGE_MODEL_CHARS] if refusal is None else "-"
        state.usage = (str(user.id), model, route_class(path), decision)
        state.audit_all = any(c.valves.audit_log == "all" for c in copies)
        usage_book().retention_days = copies[0].valves.usage_retention_days


def read_asked(state: RequestState | None, reader: Callable) -> ModelRequest:
    """What a model-bearing body asks for, parsed here, after core accepted the key (linear, bounded)."""
    if state is None or not state.body_read:
        return ModelRequest(problem="the guard could not read the request body")
    if state.body is None:
        return ModelRequest(problem=f"the request body is larger than {MAX_MODEL_BODY_BYTES // 2**20} MiB")
    try:
        body = json.loads(state.body or b"null")
    except (ValueError, RecursionError):
        body = None
    return reader(body)


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------
# What a user's keys may do and why, for the admin, before a policy is enforced.
async def explain(valves: Valves, user: str, method: str = "", path: str = "", model: str = "") -> dict:
    """What `user`'s keys may do under these valves, field by field and where each field came from; with
    a path or a model, the answer decide() gives such a request (the counters are shown, not touched)."""
    policy = policy_from_valves(valves)
    users = openwebui_model("users", "Users")
    record = await settle(users.get_user_by_email(user) if "@" in user else users.get_user_by_id(user))
    if record is None:
        raise LookupError(f"no user {user!r} on this server")
    person = {"id": record.id, "email": record.email, "role": record.role}
    path = path or ("/api/chat/completions" if model else "")
    method = (method or ("POST" if path else "GET")).upper()
    facts = await facts_for(policy, person, None, method, path or "/", ModelRequest(model=model or None))
    created = await off_loop(lambda: stored_key_time(facts.user_id, None)) if core_keeps_key_times() else None
    facts = dataclasses.replace(facts, key_created=created)
    tier = policy.tier_for(facts)
    used = {}
    if tier.token_quota.windows:
        counts = await settle(limiter().quota_used(facts.user_id, tier.token_quota, facts.now))
        used = {w.unit: n for w, n in zip(tier.token_quota.windows, counts, strict=True)}
    decision = decide(facts, policy) if path else None
    return {
        "user": {"id": facts.user_id, "email": facts.email, "role": facts.role},
        "groups": sorted(facts.group_names),
        "blocked": is_blocked(facts, policy),
        "admitted_by": admitted_by(facts, policy),
        "mode": valves.mode,
        "tier": {
            "name": tier.name,
            "fields": {f: {"value": dict(tier.texts)[f], "from": tier.valve(f)} for f in TIER_FIELDS},
        },
        "key": {
            "created_at": created,
            "age_days": round((facts.now - created) / 86400, 1) if created is not None else None,
        },
        "tokens_used": used,
        "counters": limiter().counters_for(facts.user_id),
        "request": {"method": method, "path": path, "model": model or None} if path else None,
        "decision": None
        if decision is None
        else {"allowed": decision.allowed, "reason": decision.reason, "message": decision.message},
    }


# ---------------------------------------------------------------------------
# After the answer
# ---------------------------------------------------------------------------
# Leases given back, tokens charged, usage recorded: once the answer is sent or its client left.
def keep_lease(state: RequestState) -> None:
    """Renew a running request's lease in Redis until it finishes (runs in its event loop)."""
    if state.renewer is None and not state.finished and not state.lease.local:
        state.renewer = asyncio.ensure_future(renew_lease(state.lease))


async def renew_lease(lease: Lease) -> None:
    while True:
        await asyncio.sleep(LEASE_RENEW_SECONDS)
        try:
            await off_loop_counters(lambda: limiter().renew(lease))
        except Exception as exc:  # the lease then expires on its own: never an outage
            log.error("api_key_guard could not renew a concurrency lease: %s", log_field(describe(exc)))


async def off_loop_counters(work: Callable[[], Any]) -> Any:
    """A counter operation from the event loop: memory ones right here, Redis ones awaited with an
    asyncio client (0.9+), in a thread with the sync client of 0.6-0.8."""
    if limiter().redis is None or core_is_async():
        return await settle(work())
    return await asyncio.to_thread(work)


async def finish(state: RequestState) -> None:
    """Once the answer is sent or its client went away: leases back, tokens charged, usage recorded.
    Nothing here may fail a request: each step logs its own error."""
    state.finished = True
    if state.renewer is not None:
        state.renewer.cancel()
    if state.lease is not None:
        try:
            await off_loop_counters(lambda: limiter().release(state.lease))
        except Exception as exc:
            log.error("api_key_guard could not give back a concurrency lease: %s", log_field(describe(exc)))
    usage = None
    try:
        usage = state.meter.result() if state.meter is not None else None
    except Exception as exc:
        log.error("api_key_guard could not meter an answer: %s", log_field(describe(exc)))
    if usage is not None and state.charge is not None and usage.total_tokens > 0:
        user_id, windows = state.charge
        try:
            now = time.time()
            await off_loop_counters(lambda: limiter().charge(user_id, windows, usage.total_tokens, now))
        except Exception as exc:
            log.error("api_key_guard could not charge tokens to a quota: %s", log_field(describe(exc)))
    if state.usage is not None:
        if state.meter is not None and state.meter.status >= 400:  # core refused: the model is the caller's word
            state.usage = (state.usage[0], "-", *state.usage[2:])
        record_usage(state, usage)


def record_usage(state: RequestState, usage: Usage | None) -> None:
    """Add one finished request to this worker's book; with audit_log=all, one line with its tokens."""
    try:
        usage_book().add((today(), *state.usage), usage)
    except Exception as exc:  # recording must never break or refuse a request
        log.error("api_key_guard could not record usage: %s", log_field(describe(exc)))
        return
    if usage is not None and state.audit_all:
        user_id, model, klass, _ = state.usage
        log.info(
            "api_key_guard usage user=%s model=%s route=%s status=%s input=%d output=%d total=%d estimated=%s ms=%d",
            log_field(user_id),
            log_field(model),
            klass,
            state.meter.status,
            usage.input_tokens,
            usage.output_tokens,
            usage.total_tokens,
            "yes" if usage.estimated else "no",
            (time.monotonic() - state.started) * 1000,
        )


# ---------------------------------------------------------------------------
# Usage accounting
# ---------------------------------------------------------------------------
# A key that may call a model spends money; the admin must see who spent what, on every route a key
# reaches, streams and aborted streams included. The response is read as it passes (never held
# back): only the latest usage report is kept. Aggregates per day x user x model x route class x
# decision go to a table of the guard's own in Open WebUI's database, added to from every worker by
# one flush every USAGE_FLUSH_SECONDS, off the request path.
USAGE_TABLE = "api_key_guard_usage"
USAGE_MODEL_CHARS = 255  # the model column's width
USAGE_FLUSH_SECONDS = 5.0
if os.environ.get("API_KEY_GUARD_TEST_CACHE_SECONDS"):
    USAGE_FLUSH_SECONDS = float(os.environ["API_KEY_GUARD_TEST_CACHE_SECONDS"])
USAGE_PRUNE_SECONDS = 3600.0
MAX_USAGE_LINE_BYTES = 2**20  # one SSE/NDJSON line; a longer one is skipped, not kept
MAX_USAGE_JSON_BYTES = 4 * 2**20  # a JSON answer is kept up to this to find its usage
MAX_REPORTED_TOKENS = 10_000_000  # more in one answer is absurd: refused as data
CHARS_PER_TOKEN = 4  # the estimate: 4 bytes of request or answer per token, one token per streamed chunk
# A streamed chunk's framing (id, model, object, choices...): what a chunk carries beyond it is text, so a
# provider sending a few large chunks is charged for their text, not one token each.
STREAM_FRAME_BYTES = 512
ROUTE_CLASSES = (
    ("/api/chat/", "chat"),
    ("/api/v1/chat/", "chat"),
    ("/openai/", "openai"),
    ("/ollama/", "ollama"),
    ("/api/v1/tasks/", "tasks"),
    ("/api/embeddings", "embeddings"),
    ("/api/v1/embeddings", "embeddings"),
    ("/api/message", "messages"),
    ("/api/v1/messages", "messages"),
    ("/api/v1/channels/", "channels"),
)


def route_class(path: str) -> str:
    return next((name for prefix, name in ROUTE_CLASSES if path.startswith(prefix)), "other")


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    total_tokens: int
    estimated: bool


def reported_usage(obj: Any) -> dict | None:
    """{input, output, total} from one answer object (OpenAI chat/Responses/embeddings, Anthropic,
    Ollama), or None when it reports none; numbers that are no sane token count refuse the report."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    for holder in ("response", "message"):  # Responses stream's final event, Anthropic's message_start
        if not isinstance(usage, dict) and isinstance(obj.get(holder), dict):
            usage = obj[holder].get("usage")
    if isinstance(usage, dict):
        fields = {
            "input": usage.get("prompt_tokens", usage.get("input_tokens")),
            "output": usage.get("completion_tokens", usage.get("output_tokens")),
            "total": usage.get("total_tokens"),
        }
    elif "prompt_eval_count" in obj or "eval_count" in obj:
        fields = {"input": obj.get("prompt_eval_count"), "output": obj.get("eval_count"), "total": None}
    else:
        return None
    for value in fields.values():
        sane = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPORTED_TOKENS
        if value is not None and not sane:
            return {"invalid": True}
    return {k: v for k, v in fields.items() if v is not None}


class UsageMeter:
    """Reads one answer as it passes: SSE and NDJSON line by line, keeping only the latest usage;
    a JSON body up to MAX_USAGE_JSON_BYTES. Never raises into the response."""

    def __init__(self, request_bytes: int):
        self.request_bytes = request_bytes
        self.kind = "json"
        self.carry = b""
        self.kept: list = []
        self.kept_bytes = 0
        self.answer_bytes = 0
        self.chunks = 0
        self.found: dict = {}
        self.invalid = False
        self.status = 0

    def start(self, message: dict) -> None:
        self.status = message.get("status", 0)
        for name, value in message.get("headers", ()):
            if name.lower() == b"content-type":
                kind = value.split(b";")[0].strip().lower()
                self.kind = {b"text/event-stream": "sse", b"application/x-ndjson": "ndjson"}.get(kind, "json")

    def feed(self, data: bytes) -> None:
        self.answer_bytes += len(data)
        if self.kind == "json":
            if self.kept_bytes + len(data) <= MAX_USAGE_JSON_BYTES:
                self.kept.append(data)
            self.kept_bytes += len(data)
            return
        if self.carry:
            data, self.carry = self.carry + data, b""
        cut = data.rfind(b"\n") + 1
        whole, self.carry = data[:cut], data[cut:]
        if len(self.carry) > MAX_USAGE_LINE_BYTES:
            self.carry = b""  # an attacker-sized line is skipped, never kept
        self.lines(whole)

    def lines(self, whole: bytes) -> None:
        """Complete lines: counted at C speed; parsed only where one may hold a usage report."""
        if self.kind == "sse":
            self.chunks += whole.count(b"data:") - whole.count(b"[DONE]")
        else:
            self.chunks += whole.count(b"\n") + (not whole.endswith(b"\n") and bool(whole.strip()))
        if b"usage" in whole or b"eval_count" in whole:
            for line in whole.split(b"\n"):
                self.line(line)

    def line(self, line: bytes) -> None:
        line = line.strip()
        if self.kind == "sse":
            if not line.startswith(b"data:"):
                return
            line = line[5:].strip()
        if line and (b"usage" in line or b"eval_count" in line):
            self.take(line)

    def take(self, text: bytes) -> None:
        try:
            report = reported_usage(json.loads(text))
        except (ValueError, RecursionError):
            return
        if report is not None and report.get("invalid"):
            self.invalid = True
        elif report:
            self.found.update(report)  # Anthropic streams input first, output last: latest per field wins

    def result(self) -> Usage:
        if self.carry:
            self.lines(self.carry)
            self.carry = b""
        if self.kind == "json" and self.kept and self.kept_bytes <= MAX_USAGE_JSON_BYTES:
            self.take(b"".join(self.kept))
            self.kept = []
        found = {} if self.invalid else self.found
        if "input" in found or "output" in found:
            inp, out = found.get("input", 0), found.get("output", 0)
            return Usage(inp, out, max(found.get("total", 0), inp + out), False)
        inp = math.ceil(self.request_bytes / CHARS_PER_TOKEN)
        if self.kind == "json":
            out = math.ceil(self.answer_bytes / CHARS_PER_TOKEN)
        else:  # a token a chunk, unless the chunks carry more text than their framing explains
            text_bytes = self.answer_bytes - self.chunks * STREAM_FRAME_BYTES
            out = max(self.chunks, math.ceil(text_bytes / CHARS_PER_TOKEN))
        return Usage(inp, out, inp + out, True)


USAGE_COLUMNS = ("requests", "input_tokens", "output_tokens", "total_tokens", "estimated_requests")
USAGE_KEY = ("day", "user_id", "model", "route_class", "decision")
USAGE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (day VARCHAR(10) NOT NULL, user_id VARCHAR(255) NOT NULL, "
    "model VARCHAR(255) NOT NULL, route_class VARCHAR(32) NOT NULL, decision VARCHAR(16) NOT NULL, "
    + ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in USAGE_COLUMNS)
    + f", PRIMARY KEY ({', '.join(USAGE_KEY)}))"
)
USAGE_UPSERT = (
    f"INSERT INTO {USAGE_TABLE} ({', '.join(USAGE_KEY + USAGE_COLUMNS)}) "  # noqa: S608 - table and column names are constants
    f"VALUES ({', '.join(':' + c for c in USAGE_KEY + USAGE_COLUMNS)}) "
    f"ON CONFLICT ({', '.join(USAGE_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = {USAGE_TABLE}.{c} + excluded.{c}" for c in USAGE_COLUMNS)
)


def openwebui_engine() -> Any:
    db = sys.modules.get("open_webui.internal.db")
    engine = getattr(db, "engine", None)
    if engine is None:
        raise LookupError("open_webui.internal.db.engine is not loaded")
    return engine


class UsageBook:
    """This process's usage since the last flush, and the thread that adds it to the database.

    The request path only adds to a dict under a lock; a crash loses at most the last
    USAGE_FLUSH_SECONDS. A database that fails keeps the rows for the next flush (bounded) and
    logs one ERROR per cause: recording never refuses or slows a request."""

    MAX_PENDING_ROWS = 100_000

    def __init__(self, engine: Callable[[], Any] = openwebui_engine, seconds: float = USAGE_FLUSH_SECONDS):
        self.engine = engine
        self.seconds = seconds
        self.retention_days = 90
        self._rows: dict = {}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._created = False
        self._pruned_at = 0.0
        self._failed: str | None = None

    def add(self, key: tuple, usage: Usage | None) -> None:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                if len(self._rows) >= self.MAX_PENDING_ROWS:
                    return
                row = self._rows[key] = [0, 0, 0, 0, 0]
            row[0] += 1
            if usage is not None:
                row[1] += usage.input_tokens
                row[2] += usage.output_tokens
                row[3] += usage.total_tokens
                row[4] += usage.estimated
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="api-key-guard-usage", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.seconds)
            self.flush()

    def flush(self) -> None:
        with self._flushing:
            with self._lock:
                rows, self._rows = self._rows, {}
            if not rows and self._created and time.monotonic() - self._pruned_at < USAGE_PRUNE_SECONDS:
                return
            try:
                engine = self.engine()
            except LookupError:  # not inside Open WebUI (tests, linters): nowhere to write
                return
            except Exception as exc:
                return self._failed_flush(rows, exc)
            try:
                with engine.begin() as conn:
                    self._ensure_table(conn)
                    if rows:
                        self._upsert(conn, rows)
                    if time.monotonic() - self._pruned_at >= USAGE_PRUNE_SECONDS:
                        self._pruned_at = time.monotonic()
                        conn.execute(
                            sql_text(f"DELETE FROM {USAGE_TABLE} WHERE day < :cutoff"),  # noqa: S608 - table and column names are constants
                            {"cutoff": cutoff_day(self.retention_days)},
                        )
                self._failed = None
            except Exception as exc:
                self._failed_flush(rows, exc)

    def _failed_flush(self, rows: dict, exc: Exception) -> None:
        self._keep(rows)
        cause = describe(exc)
        if cause != self._failed:
            self._failed = cause
            log.error("api_key_guard usage not written to the database (kept for the next flush): %s", log_field(cause))

    def _upsert(self, conn: Any, rows: dict) -> None:
        """All rows in one statement; if the batch fails, row by row, and a row the database refuses is
        dropped (logged), never kept to fail every later flush."""
        params = [usage_params(k, v) for k, v in rows.items()]
        try:
            with conn.begin_nested():
                conn.execute(sql_text(USAGE_UPSERT), params)
            return
        except Exception as exc:
            batch_error = exc
        dropped = 0
        for row in params:
            try:
                with conn.begin_nested():
                    conn.execute(sql_text(USAGE_UPSERT), row)
            except Exception:
                dropped += 1
        if dropped == len(params):
            raise batch_error
        log.error(
            "api_key_guard dropped %d usage row(s) the database refused: %s", dropped, log_field(describe(batch_error))
        )

    def _keep(self, rows: dict) -> None:
        with self._lock:
            for key, values in rows.items():
                row = self._rows.setdefault(key, [0, 0, 0, 0, 0])
                for i, v in enumerate(values):
                    row[i] += v
                if len(self._rows) >= self.MAX_PENDING_ROWS:
                    break

    def _ensure_table(self, conn: Any) -> None:
        if not self._created:
            conn.execute(sql_text(USAGE_DDL))
            self._created = True

    def rows(self, since: str, until: str) -> list[dict]:
        """Aggregated rows between two days (inclusive), with the user's email, this worker's unflushed
        rows first written so the answer is current."""
        self.flush()
        query = (
            f'SELECT u.*, usr.email AS user_email FROM {USAGE_TABLE} u LEFT JOIN "user" usr ON usr.id = u.user_id '  # noqa: S608 - table and column names are constants
            "WHERE u.day >= :since AND u.day <= :until ORDER BY u.day, u.user_id, u.model, u.route_class, u.decision"
        )
        with self.engine().begin() as conn:
            self._ensure_table(conn)
            return [dict(r._mapping) for r in conn.execute(sql_text(query), {"since": since, "until": until})]

    def drop(self) -> None:
        with self.engine().begin() as conn:
            conn.execute(sql_text(f"DROP TABLE IF EXISTS {USAGE_TABLE}"))
        self._created = False


def sql_text(statement: str) -> Any:
    return sys.modules["sqlalchemy"].text(statement)


def usage_params(key: tuple, values: list) -> dict:
    return dict(zip(USAGE_KEY + USAGE_COLUMNS, (*key, *values), strict=True))


def cutoff_day(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - days * 86400))


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def usage_book() -> UsageBook:
    return process_wide("usage_book", UsageBook)


def openmetrics(rows: list[dict]) -> str:
    """Prometheus/OpenMetrics text of the aggregates: counters since the oldest day kept."""

    def label(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    requests: dict = {}
    tokens: dict = {}
    for row in rows:
        who = (row["user_id"], row.get("user_email") or "", row["model"], row["route_class"])
        requests[(*who, row["decision"])] = requests.get((*who, row["decision"]), 0) + row["requests"]
        for kind in ("input", "output"):
            tokens[(*who, kind)] = tokens.get((*who, kind), 0) + row[f"{kind}_tokens"]
    names = ("user_id", "user_email", "model", "route_class")
    lines = [
        "# TYPE api_key_guard_requests counter",
        "# HELP api_key_guard_requests API-key requests the guard judged, by decision.",
    ]
    for key, value in sorted(requests.items()):
        labels = ",".join(f'{n}="{label(v)}"' for n, v in zip((*names, "decision"), key, strict=True))
        lines.append(f"api_key_guard_requests_total{{{labels}}} {value}")
    lines += [
        "# TYPE api_key_guard_tokens counter",
        "# HELP api_key_guard_tokens Tokens of admitted API-key requests, reported or estimated.",
    ]
    for key, value in sorted(tokens.items()):
        labels = ",".join(f'{n}="{label(v)}"' for n, v in zip((*names, "kind"), key, strict=True))
        lines.append(f"api_key_guard_tokens_total{{{labels}}} {value}")
    return "\n".join([*lines, "# EOF", ""])


def usage_answer(report: str, query: dict) -> tuple[str, bytes]:
    """(content type, body) of a usage read-out; runs in a thread (it queries the database)."""
    book = usage_book()
    if report == "drop":
        book.drop()
        log.warning("api_key_guard usage table %s dropped by an administrator (DELETE .../usage)", USAGE_TABLE)
        return "application/json", json.dumps({"dropped": USAGE_TABLE}).encode()
    since = day_param(query, "since", cutoff_day(book.retention_days))
    until = day_param(query, "until", today())
    rows = book.rows(since, until)
    if report == "metrics":
        return "application/openmetrics-text; version=1.0.0; charset=utf-8", openmetrics(rows).encode()
    return "application/json", json.dumps({"since": since, "until": until, "rows": rows}, default=str).encode()


DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def day_param(query: dict, name: str, default: str) -> str:
    value = (query.get(name) or [default])[0]
    if not DAY.fullmatch(value):
        raise ValueError(f"{name} must be a day written YYYY-MM-DD")
    return value


# ---------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------
# A leaked key is also a cost problem: a script looping on
# /openai/chat/completions spends the owner's model budget at machine speed.
# The valves api_key_rate_limit_admin / _user cap admitted API-key requests per
# user, on every route the guard sees, in one or more windows.

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
# Why the counters are degraded: a short code (sent as `degraded; cause=<code>` in the counters
# header, named by `install.py status`), what happened and the fix (in the one ERROR line per cause).
# A misconfiguration never clears by itself: without a name for it the limiter would count per
# worker forever (N x workers x replicas) while looking like a passing Redis hiccup.
REDIS_CAUSES = {
    "cluster": (
        "REDIS_URL points at a Redis Cluster node but REDIS_CLUSTER is not true (Redis answered MOVED/ASK): "
        "only users whose slot lives on that node are counted in Redis",
        "set REDIS_CLUSTER=true for Open WebUI",
    ),
    "noperm": (
        "the Redis ACL user may not run the guard's script or touch its keys (NOPERM)",
        "grant it +evalsha +eval +time +zremrangebyscore +zcard +zrange +zadd +zrem +get +incrby +expireat "
        "+hmget +hget +hdel +hexists +hset +del +pexpire and the keys "
        "~<REDIS_KEY_PREFIX>:api_key_guard:* (README, Redis permissions)",
    ),
    "auth": (
        "Redis refused the credentials (WRONGPASS/NOAUTH)",
        "fix the user name and password in REDIS_URL",
    ),
    "readonly": (
        "Redis answered READONLY: the guard's connection reached a replica (a demoted master)",
        "none after a failover (the guard reconnects); otherwise point REDIS_URL at the master",
    ),
    "clusterdown": (
        "the Redis Cluster answered CLUSTERDOWN (some slots have no master)",
        "bring the failed master or its replica back",
    ),
    "sentinel": (
        "no Sentinel named a master for the service (the host part of REDIS_URL)",
        "check REDIS_SENTINEL_HOSTS, REDIS_SENTINEL_PORT and the service name",
    ),
    "timeout": (
        f"Redis did not answer within {REDIS_TIMEOUT_SECONDS:g} s",
        "look for a stalled or overloaded Redis node",
    ),
    "unreachable": (
        "Redis refused or dropped the connection",
        "check that Redis runs and that REDIS_URL (or REDIS_SENTINEL_HOSTS) reaches it",
    ),
    "error": ("Redis answered an error", "see the error in this line"),
}
# Users whose request times are kept per process; the least recently seen user is
# forgotten first (its counters restart from zero if it comes back).
RATE_MAX_USERS = 10_000


# Memory per user and window is bounded either way (docs/usage.md, "Exact windows"): up to RATE_LOG_MAX a
# window keeps the exact log (at most N times); above it, counts per 1/RATE_BUCKETS of the window (at most
# RATE_BUCKETS + 2 buckets, their sum, the oldest and the newest index), so `100000/day` holds ~60 small
# counters instead of 100 000 entries (12 MB).
RATE_LOG_MAX = 60
RATE_BUCKETS = 60


@dataclass(frozen=True)
class Window:
    limit: int
    unit: str
    seconds: int
    text: str  # "5/minute", as written in the audit log
    policy_item: str  # '"minute";q=5;w=60', one RateLimit-Policy item
    buckets: int = 0  # 0: the exact log; else counts per `width` seconds

    @property
    def width_us(self) -> int:
        """A bucket's width in µs (0 for the log); integral, so Redis and the workers agree on bucket bounds."""
        return self.seconds * 1_000_000 // self.buckets if self.buckets else 0


@dataclass(frozen=True)
class RateLimit:
    """The windows of one rate-limit valve, parsed once; no windows = unlimited."""

    windows: tuple[Window, ...]
    policy: str  # RateLimit-Policy header value
    redis_args: str  # the script's ARGV[1], a JSON array: limit, window and bucket width (0: log) in µs per window
    key_suffixes: tuple[str, ...] = ()  # per window, after the user's hash tag: ":60" (log), ":86400:b60v2" (buckets)
    logs: bool = False  # a window keeps the log (its entries need unique names)

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> RateLimit:
        windows: dict[str, Window] = {}
        for item in split_list(text):
            match = _RATE_ITEM.fullmatch(item)
            unit = match.group(2).lower() if match else ""
            if not match or unit not in RATE_UNITS or int(match.group(1)) < 1:
                raise ValueError(f"{RATE_LIMIT_FORM}; got {item!r}")
            if unit in windows:
                raise ValueError(f"{RATE_LIMIT_FORM}, each unit at most once; got {unit!r} twice")
            limit, seconds = int(match.group(1)), RATE_UNITS[unit]
            buckets = 0 if limit <= RATE_LOG_MAX else RATE_BUCKETS
            policy_item = f'"{unit}";q={limit};w={seconds}'
            windows[unit] = Window(limit, unit, seconds, f"{limit}/{unit}", policy_item, buckets)
        ordered = tuple(sorted(windows.values(), key=lambda w: w.seconds))
        return cls(
            ordered,
            ", ".join(w.policy_item for w in ordered),
            json.dumps([n for w in ordered for n in (w.limit, w.seconds * 1_000_000, w.width_us)]).replace(" ", ""),
            tuple(f":{w.seconds}:b{w.buckets}v2" if w.buckets else f":{w.seconds}" for w in ordered),
            any(not w.buckets for w in ordered),
        )


# ---------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------
# A sliding window. Each window keeps what it admitted; a
# request is admitted only if every window holds fewer than its limit after
# dropping what is older than the window, and only then is it recorded
# (denied requests are not: a client hammering while limited does not extend
# its own ban). No interval of a window's length ever contains more than N
# admitted requests. A fixed window (counter per calendar minute) admits 2N
# around a boundary (N at :59, N at :00); GCRA / token bucket with burst N and
# rate N/w admits the burst and then the refill, up to ~2N in one window.
# - Up to RATE_LOG_MAX: a log of admission times, exact both ways (it never
#   refuses what the limit allows either). Memory: at most N times.
# - Above: counts per bucket of 1/RATE_BUCKETS of the window. A request counts
#   until its whole bucket has left the window, i.e. up to one bucket width
#   longer than its own time would: never more than N in any window, and a
#   refusal comes at most one bucket width (1 s of a minute, 24 min of a day)
#   early. Memory: at most RATE_BUCKETS + 2 buckets.
class Verdict(NamedTuple):  # a tuple: built for every limited request, in a third of a dataclass's time
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
    violated, retry, resets = None, 0.0, []  # plain loops: this runs for every limited request
    for window, count, mark in zip(limit.windows, counts, marks, strict=True):
        reset = window.seconds if mark is None else mark + window.seconds - now
        resets.append(reset)
        if count >= window.limit and (violated is None or reset > retry):
            violated, retry = window, reset
    taken = violated is None
    remaining = tuple([max(w.limit - c - taken, 0) for w, c in zip(limit.windows, counts, strict=True)])
    return Verdict(taken, counters, violated, retry, remaining, tuple(resets))


def log_window(window: Window, entry: collections.deque, now: float) -> tuple[int, float | None]:
    """(count, mark) of a log: admission times. The mark is the time that must leave the window for the
    count to drop below the limit (the oldest, or the (count-limit+1)th oldest after a limit was lowered)."""
    horizon = now - window.seconds
    while entry and entry[0] <= horizon:
        entry.popleft()
    return len(entry), entry[max(len(entry) - window.limit, 0)] if entry else None


def bucket_window(window: Window, entry: collections.deque, now: float) -> tuple[int, float | None]:
    """(count, mark) of counts per bucket ([index, count] pairs, oldest first). A bucket counts while it
    overlaps the window; it leaves when the window's start passes its end, so its mark is its end."""
    width = window.width_us / 1e6
    low = math.floor((now - window.seconds) / width)
    while entry and entry[0][0] < low:
        entry.popleft()
    count = sum(n for _, n in entry)
    need, seen = max(count - window.limit + 1, 1), 0
    for index, n in entry:
        seen += n
        if seen >= need:
            return count, (index + 1) * width
    return count, None


def record(window: Window, entry: collections.deque, now: float) -> None:
    if not window.buckets:
        entry.append(now)
        return
    index = math.floor(now / (window.width_us / 1e6))
    if entry and entry[-1][0] == index:
        entry[-1][1] += 1
    else:
        entry.append([index, 1])


class MemoryCounters:
    """Per-process counters: one deque per user and window, of admitted times (a log) or of
    [bucket index, count] pairs, keyed by (window seconds, buckets) so the two never mix.

    Thread-safe: on Open WebUI 0.6-0.8 the check runs in the threadpool that
    serves sync dependencies, so two requests of one user can race here."""

    def __init__(self, max_users: int = RATE_MAX_USERS, clock: Callable[[], float] = time.monotonic):
        self.max_users = max_users
        self.clock = clock
        self._users: collections.OrderedDict[str, dict[tuple, collections.deque]] = collections.OrderedDict()
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
                entry = logs.get((window.seconds, window.buckets))
                if entry is None:
                    entry = logs[(window.seconds, window.buckets)] = collections.deque()
                entries.append(entry)
            counts, marks = [], []
            for window, entry in zip(limit.windows, entries, strict=True):
                count, mark = (bucket_window if window.buckets else log_window)(window, entry, now)
                counts.append(count)
                marks.append(mark)
            verdict = weigh(limit, now, counts, marks, counters)
            if verdict.allowed:
                for window, entry in zip(limit.windows, entries, strict=True):
                    record(window, entry, now)
            return verdict

    def __len__(self) -> int:
        return len(self._users)


# One round trip, atomic across all windows of a user. Times come from the Redis
# server (TIME), not from the workers: replicas with skewed clocks would otherwise
# expire each other's entries early or late. TIME before writes needs effects
# replication: the default from Redis 5, the only mode from 7; replicate_commands()
# switches it on for 3.2-4 and is a no-op later. Scores are integer µs (< 2^53):
# Redis writes a number argument of redis.call with 17 digits, exactly. The script's
# time is added to every limited request's wait (docs/performance.md): the windows
# come as one JSON array (cjson parses it in C), numbers are not formatted, and the
# reply carries only what the verdict needs.
RATE_LIMIT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]
local spec = cjson.decode(ARGV[1])
local allowed, reply, buckets = 1, {}, {}
for i, key in ipairs(KEYS) do
  local limit, span, width = spec[3 * i - 2], spec[3 * i - 1], spec[3 * i]
  local count, mark = 0, now
  if width == 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
    count = redis.call('ZCARD', key)
    if count > 0 then
      local index = math.max(count - limit, 0)
      mark = tonumber(redis.call('ZRANGE', key, index, index, 'WITHSCORES')[2])
      if mark > now + 1000000 then  -- the clock went back (a failover to a replica behind): waiting for
        -- entries of the future could refuse this user for as long; they are dropped, admitting more instead
        redis.call('ZREMRANGEBYSCORE', key, string.format('(%.0f', now), '+inf')
        count, mark = redis.call('ZCARD', key), now
      end
    end
  else
    -- fields n (the sum), lo (the oldest bucket with counts), hi and c (the newest bucket and its
    -- count), then index -> count for the buckets before hi; none when empty. A hash this small is
    -- a list Redis searches from its head: what every request reads and writes is kept first.
    local low, most, newest = math.floor((now - span) / width), math.ceil(span / width) + 1, math.floor(now / width)
    local meta = redis.call('HMGET', key, 'n', 'lo', 'hi', 'c')
    count = tonumber(meta[1]) or 0
    local lo, hi, c = tonumber(meta[2]), tonumber(meta[3]), tonumber(meta[4]) or 0
    -- empty, every bucket left the window, or the clock went back (as for a log: dropped, not waited for)
    if hi == nil or hi < low or hi > newest + 1 then
      if meta[1] then redis.call('DEL', key) end
      count, lo, hi, c = 0, nil, nil, 0
    elseif (lo or low) < low then  -- older buckets left: each bucket once, so O(1) per request on average
      for index = lo, math.min(low - 1, lo + most) do
        local n = redis.call('HGET', key, index)
        if n then count = count - tonumber(n); redis.call('HDEL', key, index) end
      end
      lo = low
      while lo < hi and redis.call('HEXISTS', key, lo) == 0 do lo = lo + 1 end
      redis.call('HSET', key, 'n', count, 'lo', lo)
    end
    if lo then
      local need, index = count - limit + 1, lo
      while need > 0 and index < hi do  -- past the oldest bucket only after a limit was lowered
        need = need - tonumber(redis.call('HGET', key, index) or 0)
        if need > 0 then index = index + 1 end
      end
      mark = (index + 1) * width
    end
    buckets[i] = {count + 1, newest, hi, c}
  end
  if count >= limit then allowed = 0 end
  reply[2 * i - 1], reply[2 * i] = count, mark - now
end
if allowed == 1 then
  for i, key in ipairs(KEYS) do
    local span, width, write = spec[3 * i - 1], spec[3 * i], buckets[i]
    if width == 0 then
      redis.call('ZADD', key, now, ARGV[2])
      redis.call('PEXPIRE', key, math.ceil(span / 1000))
    else
      local sum, newest, hi, c = write[1], write[2], write[3], write[4]
      if hi and newest <= hi then  -- the newest bucket (or, were the clock set back, the newest there is)
        redis.call('HSET', key, 'n', sum, 'c', c + 1)
      else  -- a new newest bucket: the last one gets a field of its own, the key lives as long as it
        if hi then
          redis.call('HSET', key, 'n', sum, 'hi', newest, 'c', 1, hi, c)
        else
          redis.call('HSET', key, 'n', sum, 'lo', newest, 'hi', newest, 'c', 1)
        end
        redis.call('PEXPIRE', key, math.ceil((span + width) / 1000))
      end
    end
  end
end
-- one bulk string, "count mark count mark ..." per window, the mark in µs from now (0 for none, the count
-- being 0; Lua writes 14 digits, exact below 10^14 µs, three years): cheaper for a client to read than an array
return table.concat(reply, ' ')
"""


@dataclass(frozen=True)
class Script:
    """A Lua script and the SHA1 Redis names it by."""

    text: str

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1


RATE_LIMIT_SCRIPT = Script(RATE_LIMIT_LUA)
# Log entries and leases are named uniquely across workers and replicas: a random process nonce plus a counter.
_MEMBER_NONCE = os.urandom(8).hex()
_member_serial = itertools.count()


def redis_key_base(prefix: str) -> str:
    """Open WebUI's REDIS_KEY_PREFIX namespace; no leading ':' when it is empty (as core's session keys)."""
    return f"{prefix}:api_key_guard:rl:" if prefix else "api_key_guard:rl:"


def is_noscript(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoScriptError"


def run_script(client: Any, script: Script, keys: list, args: tuple) -> Any:
    """EVALSHA, or EVAL where the node has not loaded the script: scripts are not replicated, so a
    promoted replica (and a restarted or flushed node) answers NOSCRIPT. An asyncio client's
    awaitable goes through settle_script for the same."""
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except Exception as exc:
        if not is_noscript(exc):
            raise
        return client.eval(script.text, len(keys), *keys, *args)


async def settle_script(client: Any, script: Script, pending: Awaitable, keys: list, args: tuple) -> Any:
    try:
        return await pending
    except Exception as exc:
        if not is_noscript(exc):
            raise
        return await client.eval(script.text, len(keys), *keys, *args)


def retried_at_once(client: Any, exc: BaseException) -> bool:
    """A Cluster client refreshes its slot map when a node refuses or drops a connection: once a replica
    of a crashed master has been promoted, a second try reaches it (without it, counting came back in
    Redis one retry interval later, 10 s after a kill -9 instead of 5). Refused connections fail in
    microseconds; a timeout is not tried again (that would cost another full wait)."""
    return hasattr(client, "nodes_manager") and redis_cause(exc) == "unreachable"


def verdict_from_reply(limit: RateLimit, reply: bytes | str) -> Verdict:
    fields = reply.split()  # count and mark per window, the mark in µs from the script's now (2e+14 past 10^14)
    return weigh(limit, 0.0, [int(n) for n in fields[::2]], [float(m) / 1e6 for m in fields[1::2]], COUNTERS_REDIS)


class DirectLine:
    """The guard's scripts on connections of its own to one Redis server, so that what a script costs a
    limited request is its round trip and its time in Redis. redis-py's path around each command (a pool
    lock, a poll for stray bytes, retry and metrics wrappers; on asyncio a task per send and a timeout per
    read) cost more than the script's own time in Redis (docs/performance.md).

    Only for a plain client of one server: a Sentinel's or a Cluster's client finds the master and
    follows failovers in redis-py, and keeps its path. Connections are the client's own kind, built from
    its pool's settings as they are when one is opened (address, credentials, TLS, protocol, timeouts,
    health checks), except that on asyncio no socket timeout is set: Deadlines bound every await of the
    counters (Limiter._bounded).

    A reply must answer the command it was read for: a connection is used again only after a whole
    reply (or error reply) was read from it, and only by the process and event loop that opened it; one
    that failed or was cancelled halfway is closed. No command is sent twice (a script could count
    twice): an idle connection whose server closed it (a restart, its `timeout` setting) is found closed
    before use, without a round trip, and replaced. At most the pool's max_connections, and IN_USE_MAX,
    are in use at once: further checks wait for one to come back (a round trip), within the deadline,
    first come first served, rather than fail another user's check or release."""

    IN_USE_MAX = 100  # per process and event loop: redis-py 8's default for a pool
    IDLE_MAX = 64  # kept for the next checks; beyond, a burst's connections are closed after their reply

    def __init__(self, pool: Any, asynchronous: bool):
        self.pool = pool
        self.asynchronous = asynchronous
        self.most = min(getattr(pool, "max_connections", None) or self.IN_USE_MAX, self.IN_USE_MAX)
        self.owner: tuple = ()  # the process and event loop the connections and the gate belong to
        self.idle: list = []
        self.gate: Any = None
        if not asynchronous:
            self.own((os.getpid(), None))  # here, not on the first check: threads would race to set it up

    @classmethod
    def of(cls, client: Any) -> DirectLine | None:
        """The line for `client`, or None where redis-py's path must stay (read without asking a
        Sentinel proxy for attributes it lacks)."""
        attributes = getattr(client, "__dict__", {})
        pool = attributes.get("connection_pool")
        kind = type(pool)
        if (
            kind.__name__ != "ConnectionPool"  # Sentinel's finds the master; a blocking pool makes callers wait
            or not kind.__module__.startswith("redis.")
            or attributes.get("connection") is not None  # a single-connection client (sync)
            or attributes.get("single_connection_client")  # (asyncio: its connection comes with the first command)
            or not isinstance(getattr(pool, "connection_kwargs", None), dict)
            or getattr(pool, "cache", None) is not None  # client-side caching answers some reads itself
        ):
            return None
        return cls(pool, kind.__module__.startswith("redis.asyncio"))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """As redis-py's client: run_script and settle_script call the line as they call a client."""
        return self.command("EVALSHA", sha, numkeys, *keys_and_args)

    def eval(self, text: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.command("EVAL", text, numkeys, *keys_and_args)

    def command(self, *parts: Any) -> Any:
        """The reply, or with an asyncio client an awaitable of it."""
        return self.call_async(parts) if self.asynchronous else self.call(parts)

    def own(self, owner: tuple) -> Any:
        """The gate of `owner`; a forked child or another event loop starts anew (those sockets and that
        gate are not its own; the old idle connections are dropped, not closed: a child shares them)."""
        if owner != self.owner:
            self.owner, self.idle = owner, []
            self.gate = asyncio.Semaphore(self.most) if self.asynchronous else Gate(self.most)
        return self.gate

    def call(self, command: tuple) -> Any:
        owner = (os.getpid(), None)
        gate = self.own(owner)
        # a sync check has no deadline of its own: it waits for a connection as long as for a reply
        if not gate.enter(self.pool.connection_kwargs.get("socket_timeout") or REDIS_TIMEOUT_SECONDS):
            raise TimeoutError(f"all {self.most} connections to Redis stayed in use")
        try:
            connection, closed = self.take()
            for dead in closed:
                dead.disconnect()
            try:
                connection.send_packed_command([resp_command(command)])
                reply = connection.read_response()
            except BaseException as exc:
                if not self.kept(connection, owner, is_error_reply(exc)):
                    connection.disconnect()
                raise
            if not self.kept(connection, owner, True):
                connection.disconnect()
            return reply
        finally:
            gate.leave()

    async def call_async(self, command: tuple) -> Any:
        owner = (os.getpid(), asyncio.get_running_loop())
        gate = self.own(owner)
        await gate.acquire()
        try:
            connection, closed = self.take()
            for dead in closed:
                await dead.disconnect(nowait=True)
            try:
                await connection.send_packed_command([resp_command(command)])
                reply = await connection.read_response()
            except BaseException as exc:
                if not self.kept(connection, owner, is_error_reply(exc)):
                    await connection.disconnect(nowait=True)  # nothing in it waits: also right after a cancel
                raise
            if not self.kept(connection, owner, True):
                await connection.disconnect(nowait=True)
            return reply
        finally:
            gate.release()

    def take(self) -> tuple[Any, list]:
        """(an idle connection its server has not closed, or a new one; the idle ones it closed, to close)"""
        closed = []
        while True:
            try:
                connection = self.idle.pop()
            except IndexError:
                break
            if not closed_by_peer(connection):
                return connection, closed
            closed.append(connection)
        kwargs = dict(self.pool.connection_kwargs)
        if self.asynchronous:
            kwargs["socket_timeout"] = None
        return self.pool.connection_class(**kwargs), closed

    def kept(self, connection: Any, owner: tuple, whole: bool) -> bool:
        """Whether `connection` is kept for the next command: only after a whole reply, by its owner."""
        if whole and owner == self.owner and len(self.idle) < min(self.IDLE_MAX, self.most):
            self.idle.append(connection)
            return True
        return False


def resp_command(parts: tuple) -> bytes:
    """A command as Redis reads it (RESP: an array of length-prefixed strings, nothing in a part can end
    it early), in a third of redis-py's time. The guard's parts are str (UTF-8, as redis-py's default
    encoding), int or bytes."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Gate:
    """At most `free` threads inside; others wait, up to a timeout, first come first served. As a
    threading.Semaphore, in a third of its time where nobody waits (every check passes it)."""

    def __init__(self, free: int):
        self.free = free
        self.lock = threading.Lock()
        self.waiters: collections.deque[threading.Lock] = collections.deque()

    def enter(self, timeout: float) -> bool:
        with self.lock:
            if self.free > 0 and not self.waiters:
                self.free -= 1
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self.waiters.append(waiter)
        if waiter.acquire(timeout=timeout):
            return True  # handed over by leave(): the place is ours
        with self.lock:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
                return False
        return True  # handed over between the timeout and the lock

    def leave(self) -> None:
        with self.lock:
            if self.waiters:
                self.waiters.popleft().release()  # the place goes to the oldest waiter
            else:
                self.free += 1


def is_error_reply(exc: BaseException) -> bool:
    """An error Redis answered (NOSCRIPT, NOPERM, READONLY, ...): read whole, the connection stays in step."""
    return any(cls.__name__ == "ResponseError" for cls in type(exc).__mro__)


def closed_by_peer(connection: Any) -> bool:
    """Whether Redis closed an idle connection (or sent it bytes nobody asked for), seen without a round
    trip: what the event loop read of it (asyncio), then whether its socket is readable."""
    reader, writer = getattr(connection, "_reader", None), getattr(connection, "_writer", None)
    try:
        if reader is not None and writer is not None:  # asyncio
            if reader.at_eof() or reader.exception() is not None:
                return True
            sock = writer.get_extra_info("socket")  # the loop may not have read it yet
        else:
            sock = getattr(connection, "_sock", None)
            if hasattr(sock, "pending"):  # TLS: what makes it readable may be a session ticket; redis-py reads it
                return bool(connection.can_read(timeout=0))
        if sock is None:
            return False  # not connected: it connects when used
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except Exception:
        return True


# Exception class names (redis-py's, matched by name: the guard never imports redis) and reply prefixes
# -> cause. First match wins: redis-py's AuthenticationError is a ConnectionError, MovedError a ResponseError.
_CAUSE_BY_CLASS = (
    ("AuthenticationError", "auth"),
    ("AuthenticationWrongNumberOfArgsError", "auth"),
    ("NoPermissionError", "noperm"),
    ("MovedError", "cluster"),
    ("AskError", "cluster"),
    ("ClusterDownError", "clusterdown"),
    ("MasterNotFoundError", "sentinel"),
    ("ReadOnlyError", "readonly"),
    ("TimeoutError", "timeout"),
    ("ConnectionError", "unreachable"),
)
_CAUSE_BY_REPLY = (("WRONGPASS", "auth"), ("NOAUTH", "auth"), ("NOPERM", "noperm"), ("MOVED", "cluster"),
                   ("ASK", "cluster"), ("CLUSTERDOWN", "clusterdown"), ("READONLY", "readonly"))  # fmt: skip


def redis_cause(exc: BaseException) -> str:
    """The REDIS_CAUSES code for a failure of the counters in Redis."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).lstrip()
    for reply, cause in _CAUSE_BY_REPLY:  # redis-py strips the codes it maps to a class, not the others
        if text.startswith(f"{reply} ") or f"-{reply} " in text:
            return cause
    if "user executing the script can't run" in text:  # an ACL refusal inside a script (Redis 7)
        return "noperm"
    return next((cause for name, cause in _CAUSE_BY_CLASS if name in names), "error")


class RedisCounters:
    """Shared counters in Redis, one key per user and window: a log is a sorted set
    `{prefix}:api_key_guard:rl:{<user id>}:<window seconds>`, counts per bucket a
    hash `...:<window seconds>:b<buckets>v2` (fields in RATE_LIMIT_LUA); other names,
    so a guard of before never reads another type or layout under its own key
    (`...:b<buckets>` kept the newest bucket last, where Redis searched for it
    on every request). The braces are a
    Redis Cluster hash tag: all windows of a user live in one slot, so one
    script can touch them atomically. Works with a sync or an asyncio client;
    with an asyncio client check() returns an awaitable."""

    def __init__(self, connect: Callable[[], Any], prefix: str):
        self.connect = connect  # Open WebUI's client, resolved on first use and again after a failure to build it
        self.base = redis_key_base(prefix)
        self.root = self.base[: -len("rl:")]  # {prefix}:api_key_guard: (tq: token quotas, cc: leases)
        self._client = None
        self._cluster = False  # the client is a Cluster's: a user's counters live on one of its masters
        self._line: DirectLine | None = None  # the client's server, where it is one

    def shard(self, user_id: str) -> str:
        """Where `user_id`'s counters live, to keep one failing part of Redis from degrading the rest:
        the address of the Cluster master serving the user's slot, or "" (one Redis, Sentinel's master,
        a Cluster whose slot map is being rebuilt: every user together). Read from the client's slot
        map, no round trip."""
        if not self._cluster:
            return ""
        try:
            # the slot of a key it writes: REDIS_KEY_PREFIX may hold the hash tag ("{owui}" keeps all in one)
            return self._client.nodes_manager.get_node_from_slot(self._client.keyslot(self.lease_key(user_id))).name
        except Exception:
            return ""

    def shards(self) -> set[str] | None:
        """The Cluster masters serving slots now ("" too), from the client's slot map; None: not a Cluster."""
        if not self._cluster:
            return None
        try:
            return {""} | {nodes[0].name for nodes in self._client.nodes_manager.slots_cache.values() if nodes}
        except Exception:
            return None

    def check(self, user_id: str, limit: RateLimit) -> Verdict | Awaitable[Verdict]:
        keys = [f"{self.base}{{{user_id}}}{suffix}" for suffix in limit.key_suffixes]
        # few arguments, each costs the client to send: a member name only where a log keeps one
        args = (limit.redis_args, f"{_MEMBER_NONCE}:{next(_member_serial)}") if limit.logs else (limit.redis_args,)
        return self.run(RATE_LIMIT_SCRIPT, keys, args, lambda reply: verdict_from_reply(limit, reply))

    def quota_keys(self, user_id: str, windows: tuple, now: float) -> list[str]:
        return [f"{self.root}tq:{{{user_id}}}:{w.unit}:{w.bounds(now)[0]}" for w in windows]

    def quota_used(self, user_id: str, quota: TokenQuota, now: float) -> Any:
        keys = self.quota_keys(user_id, quota.windows, now)
        return self.run(QUOTA_READ_SCRIPT, keys, (), lambda reply: [int(n) for n in reply])

    def charge(self, user_id: str, windows: tuple, tokens: int, now: float) -> Any:
        # kept a minute past the window's end: a charge arriving late still lands in its window
        ends = [str(w.bounds(now)[1] + 60) for w in windows]
        return self.run(CHARGE_SCRIPT, self.quota_keys(user_id, windows, now), (str(tokens), *ends), bool)

    def lease_key(self, user_id: str) -> str:
        return f"{self.root}cc:{{{user_id}}}"

    def acquire(self, lease: Lease, limit: int) -> Any:
        args = (lease.member, str(limit), str(int(LEASE_SECONDS * 1000)))
        return self.run(ACQUIRE_SCRIPT, [self.lease_key(lease.user_id)], args, int)

    def renew(self, lease: Lease) -> Any:
        args = (lease.member, str(int(LEASE_SECONDS * 1000)))
        return self.run(RENEW_SCRIPT, [self.lease_key(lease.user_id)], args, bool)

    def release(self, lease: Lease) -> Any:
        return self.run(RELEASE_SCRIPT, [self.lease_key(lease.user_id)], (lease.member,), bool)

    def run(self, script: Script, keys: list, args: tuple, parse: Callable[[Any], Any]) -> Any:
        """One script, one round trip; with an asyncio client an awaitable of the parsed reply."""
        client = self._client if self._client is not None else self._resolve()
        if self._line is not None:
            client = self._line  # one server: the guard's own connections
        try:
            reply = run_script(client, script, keys, args)
        except Exception as exc:
            if not retried_at_once(client, exc):
                raise
            reply = run_script(client, script, keys, args)
        if inspect.isawaitable(reply):
            return self._settle(client, script, reply, keys, args, parse)
        return parse(reply)

    async def _settle(self, client: Any, script: Script, pending: Awaitable, keys: list, args: tuple, parse) -> Any:
        try:
            reply = await settle_script(client, script, pending, keys, args)
        except Exception as exc:
            if not retried_at_once(client, exc):
                raise
            reply = await settle_script(client, script, run_script(client, script, keys, args), keys, args)
        return parse(reply)

    def _resolve(self) -> Any:
        client = self.connect()
        if client is None:
            raise ConnectionError("Open WebUI returned no Redis client")
        self._client = client
        # Open WebUI's Sentinel proxy asks the sentinels for any attribute it lacks: not asked here
        self._cluster = "_sentinel" not in getattr(client, "__dict__", {}) and hasattr(client, "nodes_manager")
        self._line = DirectLine.of(client)
        return client


class Deadlines:
    """Bounds the awaits of the counters on one event loop: past `seconds`, the awaiting task is
    cancelled (Limiter._bounded counts that as a timeout), whatever redis-py waits for (sockets, a
    Sentinel lookup, a Cluster's slot map).

    As asyncio.timeout does, but it made and cancelled a timer per await, a tenth of a check's cost
    (docs/performance.md). Every await here is as long, so deadlines fall in the order they were
    set: one timer, for the oldest await still pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float):
        self.loop, self.seconds = loop, seconds
        self.pending: dict[asyncio.Task, tuple[float, int]] = {}  # task -> (deadline, its cancels before), oldest first
        self.expired: dict[asyncio.Task, int] = {}  # cancelled here -> its cancels before
        self.timer: asyncio.TimerHandle | None = None

    def watch(self) -> asyncio.Task:
        """The awaiting task, cancelled if it is still watched `seconds` from now."""
        task = asyncio.current_task(self.loop)
        if task is None:
            raise RuntimeError("the counters were awaited outside an asyncio task: nothing bounds the wait")
        deadline = self.loop.time() + self.seconds
        self.pending[task] = (deadline, task.cancelling())
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self.expire)
        return task

    def settle(self, task: asyncio.Task) -> bool:
        """Forget `task`; True when the deadline cancelled it and nothing else did."""
        self.pending.pop(task, None)
        before = self.expired.pop(task, None)
        return before is not None and task.uncancel() <= before

    def expire(self) -> None:
        now, overdue = self.loop.time(), []
        while self.pending:
            task = next(iter(self.pending))
            deadline, before = self.pending[task]
            if deadline > now:
                break
            del self.pending[task]
            self.expired[task] = before
            overdue.append(task)
        # the next timer first: nothing below can leave later awaits without one
        self.timer = self.loop.call_at(deadline, self.expire) if self.pending else None
        for task in overdue:
            task.cancel()


@dataclass
class Outage:
    """A part of Redis this worker stopped asking: until `retry_at`, for `cause`."""

    retry_at: float
    cause: str


class Limiter:
    """Redis when configured; per process when not, or while Redis fails.

    A limiter that can lock everybody out is worse than none: any Redis error
    (refused, timeout, script error) makes this worker count in process and
    report `degraded` for the users whose counters live there: on a Cluster the
    failing master's, elsewhere all. That part of Redis is then skipped entirely
    until REDIS_RETRY_SECONDS have passed; the first request after that probes it
    (the retry time is claimed before the probe, so concurrent requests count in
    process instead of queueing behind a dead Redis; unlocked, so two threads may
    rarely both probe)."""

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
        self.tallies = MemoryTallies()
        self.clock = clock
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.outages: dict[str, Outage] = {}  # RedisCounters.shard -> why it is skipped, until when
        self._logged: dict[str, float] = {}  # cause -> when its ERROR was last written
        self._deadlines: Deadlines | None = None  # those of the event loop that awaited last

    @property
    def counters(self) -> str:
        """This worker's state (the benchmark, the e2e probe): redis, per-worker, or `degraded; cause=<code>`
        while any part of Redis still serving users is skipped."""
        if self.redis is None:
            return COUNTERS_PER_WORKER
        serving = self.redis.shards()
        for shard in list(self.outages):  # a snapshot: on 0.6/0.8 other threads add and drop outages
            if serving is not None and shard not in serving:
                self.outages.pop(shard, None)  # a master that left the Cluster's slot map serves nobody
        outage = next(iter(list(self.outages.values())), None)
        return COUNTERS_REDIS if outage is None else f"{COUNTERS_DEGRADED}; cause={outage.cause}"

    def counters_for(self, user_id: str) -> str:
        """The X-API-Key-Guard-Counters value for a user's request."""
        if self.redis is None:
            return COUNTERS_PER_WORKER
        if not self.outages:
            return COUNTERS_REDIS
        outage = self.outages.get(self.redis.shard(user_id))
        return COUNTERS_REDIS if outage is None else f"{COUNTERS_DEGRADED}; cause={outage.cause}"

    def check(self, user_id: str, limit: RateLimit) -> Verdict | Awaitable[Verdict]:
        return self.shared(
            user_id,
            lambda: self.redis.check(user_id, limit),
            lambda counters: self.memory.check(user_id, limit, counters),
        )

    def quota_used(self, user_id: str, quota: TokenQuota, now: float) -> Any:
        """Tokens used per window of `quota` (an awaitable of them with an asyncio client)."""
        return self.shared(
            user_id,
            lambda: self.redis.quota_used(user_id, quota, now),
            lambda _: self.tallies.quota_used(user_id, quota, now),
        )

    def charge(self, user_id: str, windows: tuple, tokens: int, now: float) -> Any:
        return self.shared(
            user_id,
            lambda: self.redis.charge(user_id, windows, tokens, now),
            lambda _: self.tallies.charge(user_id, windows, tokens, now),
        )

    def acquire(self, lease: Lease, limit: int) -> Any:
        """Requests in flight with this one; more than `limit`: not taken."""
        return self.shared(
            lease.user_id, lambda: self.redis.acquire(lease, limit), lambda _: self.tallies.acquire(lease, limit)
        )

    def renew(self, lease: Lease) -> Any:
        return None if lease.local else self.shared(lease.user_id, lambda: self.redis.renew(lease), lambda _: None)

    def release(self, lease: Lease) -> Any:
        """A lease goes back where it was taken; one taken in Redis while Redis fails expires there."""
        if lease.local:
            return self.tallies.release(lease)
        return self.shared(lease.user_id, lambda: self.redis.release(lease), lambda _: None)

    def shared(self, user_id: str, remote: Callable[[], Any], local: Callable[[str], Any]) -> Any:
        """`remote()` in Redis, or `local(counters)` in this process when there is no Redis or the part
        of it that keeps `user_id`'s counters fails."""
        if self.redis is None:
            return local(COUNTERS_PER_WORKER)
        shard = self.redis.shard(user_id) if self.outages else None  # where it lives matters only then
        outage = self.outages.get(shard) if shard is not None else None
        if outage is not None:
            now = self.clock()
            if now < outage.retry_at:
                return local(COUNTERS_DEGRADED)
            outage.retry_at = now + self.retry_seconds
        try:
            result = remote()
        except Exception as exc:
            return self._fall_back(user_id, shard, exc, local)
        if inspect.isawaitable(result):
            return self._bounded(user_id, shard, result, local)
        return self._recovered(user_id, shard, result)

    async def _bounded(self, user_id: str, shard: str | None, pending: Awaitable, local: Callable) -> Any:
        deadlines = task = None
        try:
            loop, deadlines = asyncio.get_running_loop(), self._deadlines
            if deadlines is None or deadlines.loop is not loop:
                deadlines = self._deadlines = Deadlines(loop, self.timeout)
            task = deadlines.watch()  # raises outside a task: nothing could bound the wait
            result = await pending
        except asyncio.CancelledError:
            if deadlines is None or not deadlines.settle(task):
                raise  # a cancelled request (the client left) propagates
            return self._fall_back(user_id, shard, TimeoutError(f"no answer within {self.timeout:g} s"), local)
        except Exception as exc:
            if inspect.iscoroutine(pending) and task is None:
                pending.close()  # never awaited
            return self._fall_back(user_id, shard, exc, local)
        finally:
            if task is not None:
                deadlines.settle(task)
        return self._recovered(user_id, shard, result)

    def _fall_back(self, user_id: str, shard: str | None, exc: Exception, local: Callable[[str], Any]) -> Any:
        now, cause = self.clock(), redis_cause(exc)
        failed = self.redis.shard(user_id)  # asked again: this very call may have built the client
        if shard == "" and failed != "":
            self.outages.pop("", None)  # filed before the client knew its Cluster: it was this master
        outage = self.outages.setdefault(failed, Outage(now + self.retry_seconds, cause))
        outage.retry_at, outage.cause = now + self.retry_seconds, cause
        # One ERROR per worker and cause (whichever master): again only after a minute.
        logged = self._logged.get(cause)
        if logged is None or now - logged >= DEGRADED_LOG_SECONDS:
            self._logged[cause] = now
            detail = " ".join(str(exc).split())[:200]
            happened, fix = REDIS_CAUSES[cause]
            log.error(
                "api_key_guard rate-limit counters degraded (cause=%s%s): %s (%s); counting per worker, "
                "retrying Redis every %.0f s. Fix: %s",
                cause,
                f", Cluster master {log_field(failed, quote=False)}" if failed else "",
                happened,
                f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__,
                self.retry_seconds,
                fix,
            )
        return local(COUNTERS_DEGRADED)

    def _recovered(self, user_id: str, shard: str | None, result: Any) -> Any:
        if self.outages:
            for answered in {self.redis.shard(user_id), shard}:
                if answered is not None and self.outages.pop(answered, None) is not None:
                    where = f" (Cluster master {log_field(answered, quote=False)})" if answered else ""
                    log.warning("api_key_guard rate-limit counters: Redis answers again%s; counting in Redis", where)
            if not self.outages:
                self._logged.clear()
        return result


# ---------------------------------------------------------------------------
# Rate limit headers
# ---------------------------------------------------------------------------
# What a client is told: Retry-After, the IETF httpapi RateLimit-Policy and
# RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10/11: structured-field
# lists, one item per window named by its unit, q = quota, w = window seconds,
# r = remaining, t = seconds until the quota starts coming back), and where the
# counters live. Chosen over X-RateLimit-*: that trio has no single definition
# and cannot describe two windows at once.
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
# Token quotas and requests in flight
# ---------------------------------------------------------------------------
# A quota is a budget of tokens per calendar window (QuotaWindow): read before a request is let in,
# charged with what the answer cost once it is known, so requests already in flight when it runs out
# finish (the overshoot is at most what they cost: one answer per request in flight). A concurrency
# cap is a lease per request in flight, given back when its answer ends or its client goes away;
# in Redis a lease also expires LEASE_SECONDS after it was last renewed, so a worker that dies
# mid-request frees its places. Both live next to the request limits: in Redis when Open WebUI has
# it, per process otherwise or while Redis fails (`degraded`, like the limits).
LEASE_SECONDS = 60.0
LEASE_RENEW_SECONDS = 20.0
QUOTA_KEYS_KEPT = 4 * RATE_MAX_USERS


@dataclass
class Lease:
    user_id: str
    member: str  # unique across workers: process nonce + serial
    local: bool = False  # taken in this process (no Redis, or Redis failing), given back here


def quota_exceeded(quota: TokenQuota, used: list[int], now: float) -> tuple[QuotaWindow, float] | None:
    """The spent window that starts again last, with the seconds until it does; None while all have room."""
    spent = [(w, w.bounds(now)[1] - now) for w, n in zip(quota.windows, used, strict=True) if n >= w.limit]
    return max(spent, key=lambda item: item[1]) if spent else None


def quota_fields(quota: TokenQuota, used: list[int], now: float) -> dict[str, str]:
    """RateLimit-Policy / RateLimit items for the token windows (`tokens-day`: q tokens per w seconds)."""
    policy, state = [], []
    for window, count in zip(quota.windows, used, strict=True):
        start, end = window.bounds(now)
        name = f'"tokens-{window.unit}"'
        policy.append(f"{name};q={window.limit};w={end - start}")
        state.append(f"{name};r={max(window.limit - count, 0)};t={whole_seconds(end - now)}")
    return {"RateLimit-Policy": ", ".join(policy), "RateLimit": ", ".join(state)}


def concurrency_fields(limit: int, in_flight: int) -> dict[str, str]:
    return {"RateLimit-Policy": f'"concurrent";q={limit}', "RateLimit": f'"concurrent";r={max(limit - in_flight, 0)}'}


class MemoryTallies:
    """Per-process token sums per user and calendar window, and each user's requests in flight."""

    def __init__(self, max_keys: int = QUOTA_KEYS_KEPT):
        self.max_keys = max_keys
        self._tokens: collections.OrderedDict = collections.OrderedDict()  # (user, unit, start) -> tokens
        self._leases: dict[str, set] = {}
        self._lock = threading.Lock()

    def quota_used(self, user_id: str, quota: TokenQuota, now: float) -> list[int]:
        return [self._tokens.get((user_id, w.unit, w.bounds(now)[0]), 0) for w in quota.windows]

    def charge(self, user_id: str, windows: tuple, tokens: int, now: float) -> None:
        with self._lock:
            for window in windows:
                key = (user_id, window.unit, window.bounds(now)[0])
                self._tokens[key] = self._tokens.get(key, 0) + tokens
                self._tokens.move_to_end(key)
            while len(self._tokens) > self.max_keys:
                self._tokens.popitem(last=False)

    def acquire(self, lease: Lease, limit: int) -> int:
        """Requests in flight with this one; more than `limit` means it was not taken."""
        with self._lock:
            held = self._leases.setdefault(lease.user_id, set())
            if len(held) >= limit:
                return len(held) + 1
            held.add(lease.member)
            lease.local = True
            return len(held)

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get(lease.user_id)
            if held is not None:
                held.discard(lease.member)
                if not held:
                    del self._leases[lease.user_id]


# Lease scores are expiry times from the Redis server's clock (µs, as the request limits).
ACQUIRE_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[2]) then return count + 1 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3]) * 1000), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return count + 1
"""
RENEW_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + tonumber(ARGV[2]) * 1000), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
QUOTA_READ_LUA = """
local used = {}
for i, key in ipairs(KEYS) do used[i] = tonumber(redis.call('GET', key) or '0') end
return used
"""
CHARGE_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[1])
  redis.call('EXPIREAT', key, ARGV[i + 1])
end
return 1
"""
RELEASE_LUA = "return redis.call('ZREM', KEYS[1], ARGV[1])"
ACQUIRE_SCRIPT, RENEW_SCRIPT, RELEASE_SCRIPT = Script(ACQUIRE_LUA), Script(RENEW_LUA), Script(RELEASE_LUA)
QUOTA_READ_SCRIPT, CHARGE_SCRIPT = Script(QUOTA_READ_LUA), Script(CHARGE_LUA)


# ---------------------------------------------------------------------------
# Open WebUI's Redis
# ---------------------------------------------------------------------------
# Reached through Open WebUI's own helpers (Sentinel, Cluster, URL,
# credentials as the admin configured them); the guard never imports redis.
def openwebui_env() -> Any:
    env = sys.modules.get("open_webui.env")
    if env is None:
        raise LookupError("open_webui.env is not loaded")
    return env


def redis_configured() -> bool:
    env = openwebui_env()
    return bool(getattr(env, "REDIS_URL", "") or getattr(env, "REDIS_SENTINEL_HOSTS", ""))


def openwebui_redis(asynchronous: bool) -> Any:
    """A client of the guard's own, built by Open WebUI's helper from Open WebUI's settings (Sentinel,
    Cluster, URL, credentials, TLS), asyncio on 0.9+ and sync on 0.6-0.8 (sync lookups in a threadpool).

    Its own, because core's keeps redis-py's timeouts (none on 0.8.12's redis-py 7.4, 5 s later): a
    stalled node would hold every key request that long. The socket timeouts ride in the URL's query,
    which redis-py applies to every connection the client opens, also those a Cluster client opens
    while it is built (0.6/0.8 build a new one per call, before anything could shorten it); the URL
    also makes the helper's cache key differ from core's, so core's client is never touched."""
    env = openwebui_env()
    helpers = sys.modules["open_webui.utils.redis"]
    client = helpers.get_redis_connection(
        redis_url=with_timeouts(env.REDIS_URL, REDIS_TIMEOUT_SECONDS),
        redis_sentinels=helpers.get_sentinels_from_env(env.REDIS_SENTINEL_HOSTS, env.REDIS_SENTINEL_PORT),
        redis_cluster=env.REDIS_CLUSTER,
        async_mode=asynchronous,
        decode_responses=False,
    )
    if client is not None:
        bound_waits(client, REDIS_TIMEOUT_SECONDS)
    return client


def with_timeouts(url: str, seconds: float) -> str:
    """`url` with socket_timeout and socket_connect_timeout set in its query (replacing any given)."""
    parts = urllib.parse.urlsplit(url)
    ours = ("socket_timeout", "socket_connect_timeout")
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    query += [(name, f"{seconds:g}") for name in ours]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def bound_waits(client: Any, seconds: float) -> dict[str, int]:
    """Bound what one command of this (the guard's own) client can wait, where the URL cannot reach.

    - Sentinel: the helper reads only host, port, db and credentials from the URL, so the master's
      connections get `seconds` here. The connections to the sentinels keep redis-py's defaults (no
      timeout on 0.8.12, and 3 to 10 retries with backoff of up to 10 s each on every release): one
      stalled sentinel held a master lookup 8 s, and 0.6-0.10 look the master up for every command.
      They get a quarter of `seconds` and no retry: a lookup then moves on to the next sentinel, and
      redis-py puts the sentinel that answered first for the next lookups.
    - Cluster: redis-py retries a failed command on a fresh slot map, 3 times on 7.x and 10 on 8.x
      with backoff, each try a full socket timeout (one stalled master held a sync check 2 s on 0.8.12
      and the whole 3 s stall on 0.6.22). The guard's own retry is the degraded probe, and the failed
      try has already refreshed the slot map for it: no retry here.
    Each Retry object touched is this client's own (redis-py deep-copies it per client).
    Returns how many connection settings and retry policies were changed."""
    sentinel = vars(client).get("_sentinel")  # Open WebUI's SentinelRedisProxy; its __getattr__ asks the sentinels
    cluster = sentinel is None and hasattr(client, "nodes_manager")
    if sentinel is not None:
        own = [getattr(sentinel, "connection_kwargs", None)]
        lookups = [getattr(s.connection_pool, "connection_kwargs", None) for s in getattr(sentinel, "sentinels", ())]
        retries = [k.get("retry") for k in lookups if isinstance(k, dict)]
        lookups.append(getattr(sentinel, "sentinel_kwargs", None))
    elif cluster:
        own = [getattr(client.nodes_manager, "connection_kwargs", None)]
        own += [n.redis_connection.connection_pool.connection_kwargs for n in client.get_nodes() if n.redis_connection]
        lookups, retries = [], [getattr(client, "retry", None)]
    else:
        own, lookups, retries = [getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)], [], []
    changed = {"timeouts": 0, "retries": 0}
    for kwargs, timeout in [(k, seconds) for k in own] + [(k, seconds / 4) for k in lookups]:
        if isinstance(kwargs, dict):
            kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
            changed["timeouts"] += 1
    for retry in retries:
        if hasattr(retry, "update_retries"):
            retry.update_retries(0)
            changed["retries"] += 1
    return changed


def limiter() -> Limiter:
    """This process's limiter, built on first use: Redis through Open WebUI when it has Redis."""
    return process_wide("limiter", build_limiter)


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
# Process-wide state
# ---------------------------------------------------------------------------
# Open WebUI executes this file anew for every copy and every code update; counters kept in the
# module would start again from zero whenever an admin clones the function. They live on the route
# hooks instead, which exist once per process.
_outside_openwebui: dict = {}


def process_wide(name: str, build: Callable[[], Any]) -> Any:
    """The one `name` object of this process (built on first use), shared by every loaded copy."""
    hooks = getattr(getattr(sys.modules.get("open_webui.main"), "app", None), HOOKS_ATTR, None)
    store = getattr(hooks, "shared", None) if hooks is not None else _outside_openwebui
    if store is None:
        store = hooks.shared = {}
    found = store.get(name)
    if found is None:
        found = store[name] = build()
    return found


# ---------------------------------------------------------------------------
# Arming
# ---------------------------------------------------------------------------
# Loading this file installs the hooks (once per process) and registers this copy.
def arm_route_guard(module_name: str) -> RouteHooks | None:
    """Install the hooks once per process, register this copy and hand the hooks this copy's code."""
    function_id = function_id_from_module_name(module_name)
    main = sys.modules.get("open_webui.main")
    auth = sys.modules.get("open_webui.utils.auth")
    users_module = sys.modules.get("open_webui.models.users")
    app = getattr(main, "app", None)
    if function_id is None or app is None or auth is None or users_module is None:
        return None  # a Tool upload, or not running inside Open WebUI (tests, linters)
    hooks = getattr(app, HOOKS_ATTR, None)
    if hooks is None:
        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()
        hooks = RouteHooks(app, users_module.Users, auth.HTTPException)
        setattr(app, HOOKS_ATTR, hooks)
    if not isinstance(getattr(hooks, "function_ids", None), set):  # hooks an older copy installed
        hooks.function_ids = set()
    if not isinstance(getattr(hooks, "guards", None), dict):
        hooks.guards = {}
    hooks.function_ids.add(function_id)
    guard = RouteGuard(app, hooks, function_id)
    hooks.guards.pop(function_id, None)  # a reload of a copy makes it the most recently loaded
    hooks.guards[function_id] = guard
    hooks.guard = guard
    return hooks


try:
    arm_route_guard(__name__)
except Exception as _exc:  # loading must never fail: Open WebUI would switch the guard off
    log.error("api_key_guard could not arm the route guard: %s: %s", type(_exc).__name__, _exc)
