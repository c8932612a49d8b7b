"""Route hooks on stand-ins for Open WebUI's app, Users, Functions and auth modules.

The real thing is proven in tests/e2e; these pin the mechanics: one set of hooks
per process whatever the reloads, current valves read, every failure denies."""

import asyncio
import logging
import sys
from types import SimpleNamespace

import pytest

from install import GUARD_FILE, guard_module
from tests.conftest import (
    GUARD_ERROR,
    NOT_ADMITTED,
    App,
    Functions,
    Groups,
    HTTPException,
    Models,
    Users,
    error_lines,
    receiver,
    settle,
)
from tests.guard_loader import load_guard

USERS = {
    "sk-admin0000000000aaaa": SimpleNamespace(id="u-admin", email="admin@example.com", role="admin"),
    "sk-alice000000000bbbb": SimpleNamespace(id="u-alice", email="alice@example.com", role="user"),
}
ADMIN_KEY, ALICE_KEY = USERS


@pytest.fixture(params=[pytest.param(True, id="async-0.12"), pytest.param(False, id="sync-0.6")])
def server(request, open_webui):
    app, functions, users = App(), Functions(), Users(USERS, is_async=request.param)
    open_webui(
        app=app, HTTPException=HTTPException, Users=users, Functions=functions, Groups=Groups({}), Models=Models()
    )
    return SimpleNamespace(app=app, functions=functions, users=users)


def call(app, key, path, body=b""):
    """One HTTP request through the app; returns (status, guard header) or the 403 detail."""
    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", b"Bearer " + key.encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "key": key}
    receive = receiver([{"type": "http.request", "body": body, "more_body": False}])
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
    assert server.app.middleware_stack is stack, "the ASGI hook was wrapped again"
    assert server.users.get_user_by_api_key is lookup, "the key lookup was wrapped again"
    assert call(server.app, ADMIN_KEY, "/api/models") == (200, b"enforce")
    assert server.app.served == [("/api/models", "u-admin")]


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
    assert hooks.guard is guard, "a tool module must not take over judging"
    assert hooks.function_ids == {"api_key_guard"}
    assert call(server.app, ALICE_KEY, "/openai/chat/completions") == (403, NOT_ADMITTED)


def test_two_active_copies_both_judge_the_strictest_wins_and_one_error_says_so(server, caplog):
    load_guard()
    load_guard("api_key_guard_copy")
    server.functions.valves = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"}
    server.functions.copies = {"api_key_guard_copy": {}}  # the copy keeps the default: admins only
    answers = [call(server.app, ALICE_KEY, "/openai/chat/completions") for _ in range(3)]
    assert answers == [(403, NOT_ADMITTED)] * 3
    assert error_lines(caplog) == [
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


def test_a_request_authenticated_twice_is_judged_and_counted_once(server, open_webui, caplog):
    app = TwiceAuthenticatingApp()
    open_webui(app=app)
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


def judge_held(module, server, key: str, path: str = "/api/models"):
    """Judge one request the way the lookup does and keep it in flight: (refusal, its state)."""

    async def run():
        state = module.RequestState(loop=asyncio.get_running_loop())
        scope = {"method": "POST", "path": path, module.STATE_KEY: state}
        hooks = getattr(server.app, module.HOOKS_ATTR)
        return await hooks.guard.check(USERS[key], key, scope), state

    return asyncio.run(run())


def test_two_active_copies_take_one_place_per_request_under_the_smaller_cap(server):
    module = load_guard()
    load_guard("api_key_guard_copy")
    server.functions.valves = {"api_key_max_concurrent_admin": 2}
    server.functions.copies = {"api_key_guard_copy": {"api_key_max_concurrent_admin": 1}}
    (first, held), (second, _) = judge_held(module, server, ADMIN_KEY), judge_held(module, server, ADMIN_KEY)
    asyncio.run(module.finish(held))
    third, _ = judge_held(module, server, ADMIN_KEY)
    assert (first, second.reason, "api_key_max_concurrent_admin" in second.detail, third) == (
        None,
        module.REASON_CONCURRENCY,
        True,
        None,
    )


def test_a_quota_is_charged_with_usage_accounting_off(server, monkeypatch):
    module = load_guard()
    server.functions.valves = {"usage_accounting": False, "api_key_token_quota_admin": "30/day"}
    monkeypatch.setattr(module, "MODEL_READERS", {**module.MODEL_READERS, None: module.model_of})
    refusal, state = judge_held(module, server, ADMIN_KEY, "/openai/chat/completions")
    assert (refusal, state.usage, state.meter is not None, state.charge[1][0].unit) == (None, None, True, "day")
