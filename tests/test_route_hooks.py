"""Route hooks on stand-ins for Open WebUI's app, Users, Functions and auth modules.

The real thing is proven in tests/e2e; these pin the mechanics: one set of hooks
per process whatever the reloads, current valves read, every failure denies."""

import asyncio
import logging
import sys
from types import SimpleNamespace

import pytest

from install import GUARD_FILE, guard_module
from tests.guard_loader import load_guard

USERS = {
    "sk-admin0000000000aaaa": SimpleNamespace(id="u-admin", email="admin@example.com", role="admin"),
    "sk-alice000000000bbbb": SimpleNamespace(id="u-alice", email="alice@example.com", role="user"),
}
ADMIN_KEY, ALICE_KEY = USERS


class HTTPException(Exception):
    def __init__(self, status_code, detail, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class App:
    def __init__(self):
        self.middleware_stack = None
        self.served = []

    def build_middleware_stack(self):
        async def routed(scope, receive, send):
            # what a route does: authenticate through core, then answer
            user = await settle(sys.modules["open_webui.models.users"].Users.get_user_by_api_key(scope["key"]))
            self.served.append((scope["path"], user.id))
            await send({"type": "http.response.start", "status": 200, "headers": []})

        return routed


async def settle(value):
    return await value if asyncio.iscoroutine(value) else value


class AsyncUsers:
    async def get_user_by_api_key(self, api_key):
        return USERS.get(api_key)


class SyncUsers:
    def get_user_by_api_key(self, api_key):
        return USERS.get(api_key)


class Functions:
    """The installed guard `api_key_guard`, and `copies`: other active functions by id, with their valves."""

    def __init__(self):
        self.active, self.valves, self.reads, self.copies = True, {}, 0, {}

    def get_function_by_id(self, function_id):
        self.reads += function_id == "api_key_guard"
        if function_id in self.copies:
            return SimpleNamespace(is_active=True)
        return SimpleNamespace(is_active=self.active) if function_id == "api_key_guard" else None

    def get_function_valves_by_id(self, function_id):
        return self.copies.get(function_id, self.valves)


@pytest.fixture(params=[pytest.param(AsyncUsers, id="async-0.12"), pytest.param(SyncUsers, id="sync-0.6")])
def server(request, monkeypatch):
    app, functions = App(), Functions()
    fakes = {
        "open_webui.main": SimpleNamespace(app=app),
        "open_webui.utils.auth": SimpleNamespace(HTTPException=HTTPException),
        "open_webui.models.users": SimpleNamespace(Users=request.param()),
        "open_webui.models.functions": SimpleNamespace(Functions=functions),
        "open_webui.models.groups": SimpleNamespace(Groups=SimpleNamespace(get_groups_by_member_id=lambda uid: [])),
        "open_webui.models.models": SimpleNamespace(Models=SimpleNamespace(get_model_by_id=lambda model_id: None)),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    return SimpleNamespace(app=app, functions=functions, users=fakes["open_webui.models.users"].Users)


def call(app, key, path, body=b""):
    """One HTTP request through the app; returns (status, guard header) or the 403 detail."""
    sent, chunks = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def send(message):
        sent.append(message)

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    headers = [(b"authorization", b"Bearer " + key.encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "key": key}
    try:
        asyncio.run(app.middleware_stack(scope, receive, send))
    except HTTPException as denied:
        return denied.status_code, denied.detail
    except AttributeError:  # core's own answer to a key it does not know: the route had no user
        return 500, None
    return sent[0]["status"], dict(sent[0]["headers"]).get(b"x-api-key-guard")


def test_reloads_never_stack_hooks(server):
    first = load_guard()
    hooks = getattr(server.app, first.HOOKS_ATTR)
    stack, lookup = server.app.middleware_stack, server.users.get_user_by_api_key
    for _ in range(3):
        load_guard()
    assert getattr(server.app, first.HOOKS_ATTR) is hooks
    assert (server.app.middleware_stack, server.users.get_user_by_api_key) == (stack, lookup)
    assert call(server.app, ADMIN_KEY, "/api/models") == (200, b"enforce")
    assert server.app.served == [("/api/models", "u-admin")]


NOT_ADMITTED = (
    "API Key Guard: API keys are not enabled for role 'user' (api_key_roles), nor for this user's groups "
    "(api_key_groups) or account (api_key_users)"
)
GUARD_ERROR = (
    "API Key Guard: API Key Guard could not evaluate this API key request and denied it; "
    "an administrator must check the server log"
)

CASES = [
    pytest.param({}, True, ALICE_KEY, "/openai/chat/completions", (403, NOT_ADMITTED), id="user-key-denied"),
    pytest.param({}, True, ADMIN_KEY, "/openai/chat/completions", (200, b"enforce"), id="admin-key-served"),
    pytest.param({"mode": "monitor"}, True, ALICE_KEY, "/openai/responses", (200, b"monitor"), id="monitor-serves"),
    pytest.param({}, False, ALICE_KEY, "/openai/chat/completions", (200, None), id="inactive-function-is-inert"),
    pytest.param({"route_guard": False}, True, ALICE_KEY, "/api/embeddings", (200, None), id="route-guard-off"),
    pytest.param(
        {"api_key_roles": "user", "api_key_allowed_endpoints_user": "/api/models"},
        True,
        ALICE_KEY,
        "/api/v1/tasks/title/completions",
        (
            403,
            "API Key Guard: API keys of role 'user' may not call /api/v1/tasks/title/completions "
            "(api_key_allowed_endpoints_user)",
        ),
        id="endpoint-list-applies-to-every-route",
    ),
    pytest.param({"api_key_roles": "admins"}, True, ADMIN_KEY, "/api/models", (403, GUARD_ERROR), id="invalid-valves"),
    pytest.param({"priority": "first"}, True, ADMIN_KEY, "/api/models", (403, GUARD_ERROR), id="invalid-stored-type"),
]


@pytest.mark.parametrize(("valves", "active", "key", "path", "expected"), CASES)
def test_route_check_reads_the_stored_state(server, valves, active, key, path, expected):
    load_guard()
    server.functions.valves, server.functions.active = valves, active
    assert call(server.app, key, path) == expected


def test_state_is_read_at_most_once_per_ttl(server):
    load_guard()
    for _ in range(20):
        call(server.app, ADMIN_KEY, "/api/models")
    assert server.functions.reads == 1


def test_lookup_outside_a_request_is_denied(server):
    load_guard()
    with pytest.raises(HTTPException) as denied:
        asyncio.run(settle(server.users.get_user_by_api_key(ADMIN_KEY)))
    assert denied.value.detail == GUARD_ERROR


STORED_VALVES = [
    pytest.param("/api/chat/completions", True, id="chat-pipeline-keeps-serving"),
    pytest.param("/api/v1/functions/id/api_key_guard/valves/update", False, id="save-route-refuses"),
]


@pytest.mark.parametrize(("path", "lenient"), STORED_VALVES)
def test_invalid_stored_valves_never_break_the_chat_pipeline(server, path, lenient):
    """Open WebUI rebuilds Valves from the database for every chat; a raise there breaks chat for everyone."""
    module = load_guard()
    hooks = getattr(server.app, module.HOOKS_ATTR)
    reset = hooks.scope_var.set({"type": "http", "path": path})
    try:
        if not lenient:
            with pytest.raises(module.ValidationError, match="api_key_roles"):
                module.Valves(api_key_roles="admins")
            return
        valves = module.Valves(api_key_roles="admins", priority=-7)
    finally:
        hooks.scope_var.reset(reset)
    assert valves.priority == -100, "defaults stand in for the whole invalid record"
    with pytest.raises(ValueError, match="stored valves are unusable: api_key_roles: Value error, expected roles"):
        module.policy_from_valves(valves)


LIMITED = (
    "API Key Guard: API keys of role 'admin' are limited to 2 per minute (api_key_rate_limit_admin); retry in 60 s"
)
RATE_LIMITS = [
    pytest.param({}, [200, 200, (429, LIMITED)], "limit", id="enforce"),
    pytest.param({"mode": "monitor"}, [200, 200, 200], "would-limit", id="monitor-serves"),
]


@pytest.mark.parametrize(("valves", "answers", "verdict"), RATE_LIMITS)
def test_rate_limit_counts_admitted_keys(server, caplog, valves, answers, verdict):
    load_guard()
    server.functions.valves = {"api_key_roles": "admin,user", "api_key_rate_limit_admin": "2/minute", **valves}
    statuses = [call(server.app, ADMIN_KEY, "/api/models") for _ in range(3)]
    assert [s[0] if s[0] == 200 else s for s in statuses] == answers
    assert call(server.app, ALICE_KEY, "/api/chat/completions")[0] == 200, "users follow their own (empty) valve"
    assert [r.getMessage().split(" via=")[0] for r in caplog.records] == [f"api_key_guard {verdict}"]


def test_429_carries_retry_after_and_ratelimit_headers(server):
    module = load_guard()
    server.functions.valves = {"api_key_rate_limit_admin": "1/minute"}
    call(server.app, ADMIN_KEY, "/api/models")
    hooks = getattr(server.app, module.HOOKS_ATTR)
    limited = asyncio.run(hooks.guard.check(USERS[ADMIN_KEY], ADMIN_KEY, {"method": "GET", "path": "/api/models"}))
    assert limited.status == 429
    assert dict(limited.headers) == {
        "Retry-After": "60",
        "RateLimit-Policy": '"minute";q=1;w=60',
        "RateLimit": '"minute";r=0;t=60',
    }


def test_an_inactive_copy_loaded_later_never_disarms(server):
    load_guard()
    load_guard("api_key_guard_trial")  # a clone or trial install: loaded, not active
    assert call(server.app, ALICE_KEY, "/openai/chat/completions") == (403, NOT_ADMITTED)


def test_the_same_file_uploaded_as_a_tool_never_displaces_the_guard(server):
    module = load_guard()
    hooks = getattr(server.app, module.HOOKS_ATTR)
    guard = hooks.guard
    guard_module(GUARD_FILE.read_text(encoding="utf-8"), GUARD_FILE, "tool_api_key_guard")
    assert (hooks.guard, hooks.function_ids) == (guard, {"api_key_guard"})
    assert call(server.app, ALICE_KEY, "/openai/chat/completions") == (403, NOT_ADMITTED)


def test_two_active_copies_both_judge_the_strictest_wins_and_one_error_says_so(server, caplog):
    load_guard()
    load_guard("api_key_guard_copy")
    server.functions.valves = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"}
    server.functions.copies = {"api_key_guard_copy": {}}  # the copy keeps the default: admins only
    answers = [call(server.app, ALICE_KEY, "/openai/chat/completions") for _ in range(3)]
    assert answers == [(403, NOT_ADMITTED)] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "api_key_guard: 2 copies are active (api_key_guard, api_key_guard_copy): every one judges API keys and "
        "the strictest answer wins; deactivate or delete all but one"
    ]


class TwiceAuthenticatingApp(App):
    """Open WebUI up to 0.10 with audit logging on: its audit middleware authenticates each request again."""

    def build_middleware_stack(self):
        routed = super().build_middleware_stack()

        async def audited(scope, receive, send):
            await settle(sys.modules["open_webui.models.users"].Users.get_user_by_api_key(scope["key"]))
            await routed(scope, receive, send)

        return audited


def test_a_request_authenticated_twice_is_judged_and_counted_once(server, monkeypatch, caplog):
    app = TwiceAuthenticatingApp()
    monkeypatch.setitem(sys.modules, "open_webui.main", SimpleNamespace(app=app))
    caplog.set_level(logging.INFO, "api_key_guard")
    load_guard()
    server.functions.valves = {"api_key_rate_limit_admin": "2/minute", "audit_log": "all"}
    assert [call(app, ADMIN_KEY, "/api/models")[0] for _ in range(3)] == [200, 200, 429]
    assert [r.getMessage().split(" via=")[0] for r in caplog.records].count("api_key_guard allow") == 2


def test_a_body_is_parsed_only_once_core_accepted_the_key(server, monkeypatch):
    module = load_guard()
    server.functions.valves = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"} | {
        "api_key_allowed_models_user": "cheap*"
    }
    monkeypatch.setattr(module, "routed_template", lambda app, scope: "/openai/chat/completions")
    parsed = []
    reader = module.MODEL_READERS[module.MODEL_ROUTE]
    monkeypatch.setitem(module.MODEL_READERS, module.MODEL_ROUTE, lambda body: parsed.append(body) or reader(body))
    body = b'{"model": "premium"}'
    assert call(server.app, "sk-unknown000000zzzz", "/openai/chat/completions", body)[0] == 500
    assert parsed == [], "nothing is parsed for a key core refused"
    denied = call(server.app, ALICE_KEY, "/openai/chat/completions", body)
    assert (denied, parsed) == (
        (403, "API Key Guard: API keys of role 'user' may not use model 'premium' (api_key_allowed_models_user)"),
        [{"model": "premium"}],
    )


def test_counters_are_the_processs_not_the_copys(server):
    """A clone or trial install executes the file anew: its loading must not hand a key a fresh limit."""
    load_guard()
    server.functions.valves = {"api_key_rate_limit_admin": "2/minute"}
    assert [call(server.app, ADMIN_KEY, "/api/models")[0] for _ in range(2)] == [200, 200]
    load_guard("api_key_guard_trial")
    assert call(server.app, ADMIN_KEY, "/api/models")[0] == 429


def test_the_newest_active_copy_judges_not_the_newest_loaded(server):
    module = load_guard()
    load_guard("api_key_guard_trial")  # loaded later, inactive: its code must not take over
    hooks = getattr(server.app, module.HOOKS_ATTR)
    assert asyncio.run(hooks.guard.judging_copy()).function_id == "api_key_guard"
