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
import inspect
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
        raise ValueError(f"stored valves are invalid: {valves._invalid}")
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
    model: str | None = None  # None where the route carries no model


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
    if facts.model is not None and not models.admits(facts.model):
        return _decision(False, REASON_MODEL, role=role, model=facts.model, valve=f"api_key_allowed_models_{kind}")
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


async def facts_for(user: Any, path: str, model: str | None) -> Facts:
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
    )


# ---------------------------------------------------------------------------
# The one place a decision becomes an outcome: the audit line, and whether the
# request must be stopped.
# ---------------------------------------------------------------------------
def judge(
    decision: Decision,
    facts: Facts,
    token: str | None,
    where: str,
    enforce: bool,
    audit: str,
    error: str | None = None,
) -> bool:
    """Write the one audit line the settings ask for; True when the request must be stopped."""
    stop = not decision.allowed and enforce
    if error is not None:
        level = logging.ERROR
    elif decision.allowed:
        level = logging.INFO if audit == "all" else None
    else:
        level = logging.WARNING if audit != "off" else None
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
    return stop


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
# The filter: adapts Open WebUI's inlet arguments to the decision.
# ---------------------------------------------------------------------------
class Filter:
    Valves = Valves

    def __init__(self):
        self.valves = self.Valves()

    async def inlet(self, body: dict, __user__: dict | None = None, __request__: Any = None) -> dict:
        token, facts, policy, error = None, Facts(is_api_key=True), None, None
        try:
            if __request__ is None:
                raise ValueError("no request passed to the filter")
            token = request_credential(__request__)
            auth_type = getattr(__request__.state, "auth_type", None)
            if not (auth_type == "api_key" if auth_type is not None else is_api_key(token)):
                return body
            policy = policy_from_valves(self.valves)
            if not isinstance(__user__, dict):
                raise ValueError("no user passed to the filter")
            model = body.get("model")
            facts = await facts_for(__user__, __request__.scope["path"], str(model or ""))
            decision = decide(facts, policy)
        except Exception as exc:  # fail closed: an undecidable key request is denied
            decision, error = GUARD_ERROR, describe(exc)
        enforce = policy.enforce if policy is not None else True
        if judge(decision, facts, token, "inlet", enforce, self.valves.audit_log, error):
            raise Exception(block_text(self.valves.block_message, decision))
        return body


# ---------------------------------------------------------------------------
# Route guard. An inlet filter only sees the chat pipeline, yet the same key
# reaches models through /openai/*, task and embedding routes, and the whole
# REST API. Open WebUI authenticates every API key through one call,
# Users.get_user_by_api_key (both 0.6 and 0.12), so the guard wraps that call:
# it sees exactly the credential core accepted, from any transport, and the
# user core resolved, and raises 403 before any route handler runs. A thin
# ASGI wrapper only remembers which routed path (scope["path"]) the current
# request is for. Both hooks are installed once per process and delegate to the
# most recently loaded copy of this file, so edits and reloads never stack.
# ---------------------------------------------------------------------------
HOOKS_ATTR = "_api_key_guard_hooks"
GUARD_HEADER = b"x-api-key-guard"


class RouteHooks:
    """Process-wide hooks; intentionally tiny because they are never replaced."""

    def __init__(self, app: Any, users: Any, http_exception: type):
        self.scope_var: contextvars.ContextVar = contextvars.ContextVar("api_key_guard_scope", default=None)
        self.check: Callable | None = None  # async (user, token, scope) -> Optional[str]
        self.http_exception = http_exception
        inner = app.middleware_stack
        original_lookup = users.get_user_by_api_key
        hooks = self

        async def asgi(scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return await inner(scope, receive, send)

            async def send_marked(message):
                if message["type"] == "http.response.start" and HOOKS_ATTR in scope:
                    message["headers"] = [*message.get("headers", []), (GUARD_HEADER, scope[HOOKS_ATTR].encode())]
                await send(message)

            reset = hooks.scope_var.set(scope)
            try:
                await inner(scope, receive, send_marked)
            finally:
                hooks.scope_var.reset(reset)

        if inspect.iscoroutinefunction(original_lookup):

            async def lookup(api_key, *args, **kwargs):
                user = await original_lookup(api_key, *args, **kwargs)
                if user is not None and hooks.check is not None:
                    hooks.stop_if_denied(await hooks.check(user, api_key, hooks.scope_var.get()))
                return user

        else:

            def lookup(api_key, *args, **kwargs):
                user = original_lookup(api_key, *args, **kwargs)
                if user is not None and hooks.check is not None:
                    hooks.stop_if_denied(drive(hooks.check(user, api_key, hooks.scope_var.get())))
                return user

        app.middleware_stack = asgi
        users.get_user_by_api_key = lookup

    def stop_if_denied(self, message: str | None) -> None:
        if message is not None:
            raise self.http_exception(status_code=403, detail=message)


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
    """Whether this function is active and its stored valves, re-read every few seconds."""

    def __init__(self, function_id: str):
        self.function_id = function_id
        self._cache = TTLCache(FUNCTION_STATE_TTL_SECONDS, max_entries=1)

    async def current(self) -> tuple[bool, Any]:
        """(active, valves or the exception that makes them unusable)."""
        state = self._cache.get(self.function_id)
        if state is None:
            functions = openwebui_model("functions", "Functions")
            function = await settle(functions.get_function_by_id(self.function_id))
            active = bool(function is not None and function.is_active)
            try:
                stored = await settle(functions.get_function_valves_by_id(self.function_id)) if active else None
                valves = Valves(**(stored or {}))
                policy_from_valves(valves)
            except Exception as exc:
                valves = exc
            state = (active, valves)
            self._cache.put(self.function_id, state)
        return state


def make_route_check(function_state: FunctionState) -> Callable:
    async def route_check(user: Any, api_key: str, scope: dict | None) -> str | None:
        """None to let the request through, else the 403 detail."""
        facts, error = Facts(is_api_key=True), None
        enforce, audit, template = True, "deny", DEFAULT_BLOCK_MESSAGE
        try:
            active, valves = await function_state.current()
            if not active:
                return None
            if isinstance(valves, Exception):
                raise valves
            if not valves.route_guard:
                return None
            template, audit = valves.block_message, valves.audit_log
            if scope is None:
                raise ValueError("API key looked up outside an HTTP request")
            scope[HOOKS_ATTR] = valves.mode
            policy = policy_from_valves(valves)
            enforce = policy.enforce
            facts = await facts_for({"id": user.id, "email": user.email, "role": user.role}, scope["path"], None)
            decision = decide(facts, policy)
        except Exception as exc:  # fail closed for API-key traffic
            decision, error = GUARD_ERROR, describe(exc)
            if scope is not None:
                scope[HOOKS_ATTR] = "fail-closed"
        if judge(decision, facts, api_key, "route", enforce, audit, error):
            return block_text(template, decision)
        return None

    return route_check


def arm_route_guard(module_name: str) -> RouteHooks | None:
    """Install the hooks once per process and point them at this copy's check."""
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
    hooks.check = make_route_check(FunctionState(function_id_from_module_name(module_name)))
    return hooks


try:
    arm_route_guard(__name__)
except Exception as _exc:  # loading must never fail: Open WebUI would switch the guard off
    log.error("api_key_guard could not arm the route guard: %s: %s", type(_exc).__name__, _exc)
