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

import contextvars
import fnmatch
import functools
import hashlib
import http.cookies
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
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
        description="enforce: deny what the policy forbids. monitor: only log what would be denied.",
    )
    priority: int = Field(
        default=env_default("priority", -100),
        description="Filter order; lower runs first. Keep it below every other filter.",
    )
    api_key_roles: str = Field(
        default=env_default("api_key_roles", "admin"),
        description="Roles whose members may use API keys at all (comma-separated: admin, user, pending).",
    )
    api_key_groups: str = Field(
        default=env_default("api_key_groups", ""),
        description="Group names or ids whose members may use API keys whatever their role.",
    )
    api_key_users: str = Field(
        default=env_default("api_key_users", ""),
        description="Emails or user ids allowed to use API keys.",
    )
    api_key_blocked_users: str = Field(
        default=env_default("api_key_blocked_users", ""),
        description="Emails or user ids never allowed to use API keys, admins included.",
    )
    api_key_allowed_endpoints_admin: str = Field(
        default=env_default("api_key_allowed_endpoints_admin", "*"),
        description="Path prefixes admin keys may call ('*' = all, empty = none).",
    )
    api_key_allowed_endpoints_user: str = Field(
        default=env_default(
            "api_key_allowed_endpoints_user",
            "/api/chat/completions,/api/v1/chat/completions,/api/models,/api/v1/models",
        ),
        description="Path prefixes every other admitted key may call ('*' = all, empty = none).",
    )
    api_key_allowed_models_admin: str = Field(
        default=env_default("api_key_allowed_models_admin", "*"),
        description="Model ids or globs admin keys may use in chat ('*' = all).",
    )
    api_key_allowed_models_user: str = Field(
        default=env_default("api_key_allowed_models_user", "*"),
        description="Model ids or globs other admitted keys may use in chat ('*' = all).",
    )
    route_guard: bool = Field(
        default=env_default("route_guard", True),
        description="Also enforce roles and endpoint lists on every route that accepts an API key.",
    )
    block_message: str = Field(
        default=env_default("block_message", DEFAULT_BLOCK_MESSAGE),
        description="Text returned on a deny; {reason} is replaced by the reason.",
    )
    audit_log: Literal["deny", "all", "off"] = Field(
        default=env_default("audit_log", "deny"),
        description="Which decisions are logged: deny, all, or off.",
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
) -> Refusal | None:
    """Judge one API-key request; None lets it through. `quiet` logs only a refusal."""
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
    return _reject(decision, facts, token, where, enforce, valves, error, quiet)


def _reject(
    decision: Decision,
    facts: Facts,
    token: str | None,
    where: str,
    enforce: bool,
    valves: Any,
    error: str | None,
    quiet: bool,
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
        verdict = "allow" if decision.allowed else ("deny" if stop else "would-deny")
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
    return Refusal(403, block_text(valves.block_message, decision), decision.reason)


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
        refusal = await evaluate(self.valves, __user__, token, path, model, problem, "inlet", quiet=judged)
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
GUARD_HEADER = b"x-api-key-guard"
POLICY_HEADER = b"x-api-key-guard-policy"
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
        *(
            f"/api/v1/tasks/{task}/completions"
            for task in ("title", "follow_up", "tags", "image_prompt", "queries", "auto", "emoji", "moa")
        ),
    }
)
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
MODEL_ROUTE, LISTING = "model", "listing"


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
            kind = MODEL_ROUTE if template in MODEL_ROUTES else None
            if template in MODEL_LISTINGS and scope["method"] == "GET":
                kind = LISTING
            if len(self._kinds) < ROUTE_KIND_CACHE_ENTRIES:
                self._kinds[key] = kind
        return kind

    async def serve(self, scope: dict, receive: Callable, send: Callable, inner: Callable) -> None:
        if is_api_key(scope_credential(scope)):
            kind = self.route_kind(scope)
            if kind == MODEL_ROUTE:
                receive = await self.read_model(scope, receive)
            elif kind == LISTING:  # an uncompressed answer, so it can be trimmed
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        try:
            await inner(scope, receive, self.marking(scope, send))
        finally:
            # An admin saving this function's valves (UI or API) is in force in this worker at once.
            if scope["method"] != "GET" and scope["path"].startswith(self.own_path):
                self.state.forget()

    async def read_model(self, scope: dict, receive: Callable) -> Callable:
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
        messages, size, more = [], 0, True
        while more and size <= MAX_MODEL_BODY_BYTES:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        if size > MAX_MODEL_BODY_BYTES:
            scope[SCOPE_MODEL] = (None, f"the request body is larger than {MAX_MODEL_BODY_BYTES // 2**20} MiB")
        else:
            try:
                body = json.loads(b"".join(m.get("body", b"") for m in messages) or b"null")
            except ValueError:
                body = None
            scope[SCOPE_MODEL] = model_of(body)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return replay

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
            if kind == MODEL_ROUTE:
                model, problem = scope.get(SCOPE_MODEL, (None, "the guard could not read the request body"))
        person = {"id": user.id, "email": user.email, "role": user.role}
        path = scope["path"] if scope is not None else None
        refusal = await evaluate(valves, person, api_key, path, model, problem, "route")
        if scope is not None:
            mode = "fail-closed" if refusal is not None and refusal.reason == REASON_GUARD_ERROR else valves.mode
            scope[SCOPE_MARKS] = ((GUARD_HEADER, mode.encode()), (POLICY_HEADER, policy_id.encode()))
            if kind == LISTING and refusal is None:
                models = models_for(policy_from_valves(valves), person["role"])
                scope[SCOPE_LISTING] = None if models.admits_all else models
        return refusal


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
