"""The policy decision: a pure function of (request facts, policy), tested as tables."""

import pytest
from pydantic import ValidationError

from tests.guard_loader import load_guard

g = load_guard()

ADMIN = {"user_id": "u-admin", "email": "root@example.com", "role": "admin"}
ALICE = {"user_id": "u-alice", "email": "Alice@Example.com", "role": "user"}
GINA = {"user_id": "u-gina", "email": "gina@example.com", "role": "user", "group_names": frozenset({"Automation"})}
GINA_BY_ID = {"user_id": "u-gina", "email": "gina@example.com", "role": "user", "group_ids": frozenset({"g-42"})}
PENDING = {"user_id": "u-pen", "email": "pen@example.com", "role": "pending"}
NO_ROLE = {"user_id": "u-nobody", "email": "nobody@example.com", "role": ""}
CHAT = "/api/chat/completions"


def facts(who: dict, path: str = CHAT, model: str | None = "test-model"):
    return g.Facts(path=path, model=model, **who)


def policy(**valves):
    return g.policy_from_valves(g.Valves(**valves))


ALLOWED = [
    pytest.param(facts(ADMIN), {}, g.REASON_ALLOWED, id="admin-key-default-chat"),
    pytest.param(facts(ADMIN, "/api/v1/functions/", None), {}, g.REASON_ALLOWED, id="admin-key-default-any-route"),
    pytest.param(facts(ALICE), {"api_key_roles": "admin, User"}, g.REASON_ALLOWED, id="user-role-admitted-chat"),
    pytest.param(
        facts(ALICE, "/api/models/test-model", None),
        {"api_key_roles": "admin,user"},
        g.REASON_ALLOWED,
        id="user-prefix-at-slash-boundary",
    ),
    pytest.param(facts(GINA), {"api_key_groups": "automation"}, g.REASON_ALLOWED, id="group-name-any-case"),
    pytest.param(facts(GINA_BY_ID), {"api_key_groups": "g-42"}, g.REASON_ALLOWED, id="group-id"),
    pytest.param(facts(ALICE), {"api_key_users": " alice@example.com "}, g.REASON_ALLOWED, id="user-email-any-case"),
    pytest.param(facts(ALICE), {"api_key_users": "u-alice"}, g.REASON_ALLOWED, id="user-id"),
    pytest.param(
        facts(ALICE, "/openai/chat/completions", None),
        {"api_key_users": "u-alice", "api_key_allowed_endpoints_user": "*"},
        g.REASON_ALLOWED,
        id="user-endpoints-star",
    ),
    pytest.param(
        facts(ALICE, model="gpt-4o-mini"),
        {"api_key_users": "u-alice", "api_key_allowed_models_user": "llama3, gpt-4*"},
        g.REASON_ALLOWED,
        id="user-model-glob",
    ),
    pytest.param(
        facts(ADMIN, "/api/v1/functions/", None),
        {"mode": "monitor", "api_key_allowed_endpoints_admin": ""},
        g.REASON_ENDPOINT,
        id="monitor-still-reports-the-deny-reason",
    ),
]


@pytest.mark.parametrize(("request_facts", "valves", "reason"), ALLOWED)
def test_allowed(request_facts, valves, reason):
    decision = g.decide(request_facts, policy(**valves))
    # monitor mode serves what enforce would refuse, and still names the rule
    assert {"allowed": decision.allowed, "reason": decision.reason} == {
        "allowed": reason != g.REASON_ENDPOINT,
        "reason": reason,
    }


DENIED = [
    pytest.param(facts(ALICE), {}, g.REASON_NOT_ADMITTED, id="user-key-default-admin-only"),
    pytest.param(facts(GINA), {}, g.REASON_NOT_ADMITTED, id="group-not-listed"),
    pytest.param(facts(PENDING), {"api_key_roles": "admin,user"}, g.REASON_NOT_ADMITTED, id="pending-role"),
    pytest.param(facts(NO_ROLE), {"api_key_roles": "admin,user"}, g.REASON_NOT_ADMITTED, id="missing-role-not-admin"),
    pytest.param(
        facts(NO_ROLE, "/api/v1/functions/", None),
        {"api_key_users": "u-nobody"},
        g.REASON_ENDPOINT,
        id="missing-role-gets-user-endpoints",
    ),
    pytest.param(
        facts(ADMIN), {"api_key_blocked_users": "root@example.com"}, g.REASON_BLOCKED_USER, id="blocked-admin"
    ),
    pytest.param(
        facts(ALICE),
        {"api_key_users": "u-alice", "api_key_blocked_users": "U-ALICE"},
        g.REASON_BLOCKED_USER,
        id="blocked-wins-over-admitted",
    ),
    pytest.param(
        facts(ALICE, "/openai/chat/completions", None),
        {"api_key_roles": "admin,user"},
        g.REASON_ENDPOINT,
        id="user-direct-provider-route",
    ),
    pytest.param(
        facts(ALICE, "/api/modelsX", None),
        {"api_key_roles": "admin,user"},
        g.REASON_ENDPOINT,
        id="prefix-without-slash",
    ),
    pytest.param(
        facts(ALICE, "/api/v1/tasks/title/completions", None),
        {"api_key_roles": "admin,user"},
        g.REASON_ENDPOINT,
        id="user-task-route",
    ),
    pytest.param(
        facts(ALICE, "/API/CHAT/COMPLETIONS", None), {"api_key_roles": "admin,user"}, g.REASON_ENDPOINT, id="path-case"
    ),
    pytest.param(
        facts(ADMIN, "/api/v1/functions/", None),
        {"api_key_allowed_endpoints_admin": ""},
        g.REASON_ENDPOINT,
        id="admin-empty-endpoint-list",
    ),
    pytest.param(
        facts(ALICE, model="gpt-4o"),
        {"api_key_users": "u-alice", "api_key_allowed_models_user": "llama3"},
        g.REASON_MODEL,
        id="user-model-not-listed",
    ),
    pytest.param(
        facts(ADMIN, model="secret-model"),
        {"api_key_allowed_models_admin": "test-*"},
        g.REASON_MODEL,
        id="admin-model-not-listed",
    ),
    pytest.param(
        facts(ALICE, model=""),
        {"api_key_users": "u-alice", "api_key_allowed_models_user": "llama3"},
        g.REASON_MODEL,
        id="empty-model",
    ),
]


@pytest.mark.parametrize(("request_facts", "valves", "reason"), DENIED)
def test_denied(request_facts, valves, reason):
    decision = g.decide(request_facts, policy(**valves))
    assert {"allowed": decision.allowed, "reason": decision.reason} == {"allowed": False, "reason": reason}


MESSAGES = [
    pytest.param(
        facts(ADMIN), {"api_key_blocked_users": "u-admin"}, g.REASON_TEXT[g.REASON_BLOCKED_USER], id="blocked"
    ),
    pytest.param(
        facts(ALICE),
        {},
        "API keys are not enabled for role 'user' (api_key_roles), nor for this user's groups (api_key_groups) "
        "or account (api_key_users)",
        id="not-admitted",
    ),
    pytest.param(
        facts(ALICE, "/api/v1/files/", None),
        {"api_key_roles": "user"},
        "API keys of role 'user' may not call /api/v1/files/ (api_key_allowed_endpoints_user)",
        id="endpoint",
    ),
    pytest.param(
        facts(ADMIN, model="m"),
        {"api_key_allowed_models_admin": "x"},
        "API keys of role 'admin' may not use model 'm' (api_key_allowed_models_admin)",
        id="model",
    ),
]


@pytest.mark.parametrize(("request_facts", "valves", "message"), MESSAGES)
def test_deny_messages_name_the_rule(request_facts, valves, message):
    assert g.decide(request_facts, policy(**valves)).message == message


# Credential order as Open WebUI core reads it: bearer (any case), token cookie,
# any two-part Authorization value, the custom API key header.
CREDENTIALS = [
    pytest.param("Bearer sk-a", None, None, "sk-a", id="bearer"),
    pytest.param("bearer sk-a", None, None, "sk-a", id="bearer-lower-case"),
    pytest.param("BEARER sk-a", None, None, "sk-a", id="bearer-upper-case"),
    pytest.param("Bearer  sk-a", None, None, "sk-a", id="double-space-stripped-as-fastapi-0.135-reads-it"),
    pytest.param("Basic sk-a", None, None, "sk-a", id="basic-scheme-read-by-fallback"),
    pytest.param("Bearer\tsk-a", None, None, None, id="tab-is-not-a-separator"),
    pytest.param("sk-a", None, None, None, id="no-scheme"),
    pytest.param(None, "sk-c", None, "sk-c", id="cookie"),
    pytest.param(None, None, "sk-x", "sk-x", id="custom-header"),
    pytest.param("Bearer jwt.a.b", "sk-c", "sk-x", "jwt.a.b", id="bearer-wins"),
    pytest.param("Basic sk-a", "jwt.c", None, "jwt.c", id="cookie-before-fallback"),
    pytest.param(None, "", "sk-x", "", id="empty-cookie-still-wins"),
    pytest.param("Bearer", None, "sk-x", "sk-x", id="bearer-without-token"),
    pytest.param(None, None, None, None, id="nothing"),
]


@pytest.mark.parametrize(("authorization", "cookie", "custom", "expected"), CREDENTIALS)
def test_presented_credential(authorization, cookie, custom, expected):
    assert g.presented_credential(authorization, cookie, custom) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param("sk-0123456789abcdef", "sk-…cdef", id="key"),
        pytest.param("sk-abc", "sk-…", id="short-key-shows-nothing"),
        pytest.param("eyJhbGciOi.payload.sig", "session", id="jwt"),
        pytest.param(None, "-", id="none"),
    ],
)
def test_fingerprint(token, expected):
    assert g.fingerprint(token) == expected


INVALID_VALVES = [
    pytest.param("mode", "block", "Input should be 'enforce' or 'monitor'", id="mode"),
    pytest.param("audit_log", "some", "Input should be 'deny', 'all' or 'off'", id="audit-log"),
    pytest.param("priority", "first", "Input should be a valid integer", id="priority"),
    pytest.param("api_key_roles", "admins", "expected roles from admin, user, pending, got 'admins'", id="role-typo"),
    pytest.param(
        "api_key_allowed_endpoints_user",
        "api/chat/completions",
        "expected '*', paths starting with '/' or 'METHOD /path', got 'api/chat/completions'",
        id="endpoint-without-slash",
    ),
    pytest.param("api_key_allowed_endpoints_admin", "/api, https://x/api", "got 'https://x/api'", id="endpoint-url"),
    pytest.param(
        "block_message", "Denied: {who}", "only the placeholder {reason} is allowed", id="message-placeholder"
    ),
    pytest.param("route_guard", "maybe", "Input should be a valid boolean", id="route-guard"),
]


@pytest.mark.parametrize(("name", "value", "expected"), INVALID_VALVES)
def test_invalid_valves_are_refused_with_the_valve_name(name, value, expected):
    with pytest.raises(ValidationError) as error:
        g.Valves(**{name: value})
    text = str(error.value)
    assert name in text
    assert expected in text


def test_defaults_are_the_restrictive_choice():
    """Every valve's built-in default: only admins' keys, refused (not merely logged), on every route, with
    non-admins limited to chat and reading the model list; nobody blocked, every model, no rate limit, no
    quota, no key age or concurrency limit, no tiers."""
    assert g.Valves().model_dump() == {
        "mode": "enforce",
        "priority": -100,
        "api_key_roles": "admin",
        "api_key_groups": "",
        "api_key_users": "",
        "api_key_blocked_users": "",
        "api_key_allowed_endpoints_admin": "*",
        "api_key_allowed_endpoints_user": (
            "/api/chat/completions,/api/v1/chat/completions,GET /api/models,GET /api/v1/models"
        ),
        "api_key_allowed_models_admin": "*",
        "api_key_allowed_models_user": "*",
        "api_key_rate_limit_admin": "",
        "api_key_rate_limit_user": "",
        "api_key_token_quota_admin": "",
        "api_key_token_quota_user": "",
        "api_key_max_key_age_days_admin": 0,
        "api_key_max_key_age_days_user": 0,
        "api_key_max_concurrent_admin": 0,
        "api_key_max_concurrent_user": 0,
        "api_key_tiers": "",
        "route_guard": True,
        "block_message": "API Key Guard: {reason}",
        "usage_accounting": True,
        "usage_retention_days": 90,
        "audit_log": "deny",
    }


DEFAULTS = g.Valves().model_dump()
# For every valve, an API_KEY_GUARD_<NAME> value other than its default, and the value it must preset.
# A valve added to the Valves model without a row here fails test_every_valve_has_an_environment_preset.
PRESETS = {
    "mode": ("monitor", "monitor"),
    "priority": ("-5", -5),
    "api_key_roles": ("admin,user", "admin,user"),
    "api_key_groups": ("automation, g-42", "automation, g-42"),
    "api_key_users": ("alice@example.com", "alice@example.com"),
    "api_key_blocked_users": ("u-mallory", "u-mallory"),
    "api_key_allowed_endpoints_admin": ("/api", "/api"),
    "api_key_allowed_endpoints_user": ("/api/models", "/api/models"),
    "api_key_allowed_models_admin": ("gpt-4*", "gpt-4*"),
    "api_key_allowed_models_user": ("llama3, gpt-4o-mini", "llama3, gpt-4o-mini"),
    "api_key_rate_limit_admin": ("600/minute", "600/minute"),
    "api_key_rate_limit_user": ("5/minute,100/day", "5/minute,100/day"),
    "api_key_token_quota_admin": ("1000000/month", "1000000/month"),
    "api_key_token_quota_user": ("20000/day", "20000/day"),
    "api_key_max_key_age_days_admin": ("365", 365),
    "api_key_max_key_age_days_user": ("90", 90),
    "api_key_max_concurrent_admin": ("8", 8),
    "api_key_max_concurrent_user": ("2", 2),
    "api_key_tiers": ('{"group:interns": {"token_quota": "2000/day"}}',) * 2,
    "route_guard": ("false", False),
    "block_message": ("Refused: {reason}. Ask IT.", "Refused: {reason}. Ask IT."),
    "usage_accounting": ("off", False),
    "usage_retention_days": ("30", 30),
    "audit_log": ("all", "all"),
}
BOOLEANS = [name for name, field in g.Valves.model_fields.items() if field.annotation is bool]
INTEGERS = [name for name, field in g.Valves.model_fields.items() if field.annotation is int]


def guard_with_env(monkeypatch, env: dict):
    """The guard loaded with `env` set: its Valves model is built at import, so that is when presets are read."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module = load_guard()
    module.policy_from_valves(module.Valves())  # the preset makes a usable policy
    return module


def test_every_preset_row_names_a_valve():
    assert sorted(PRESETS) == sorted(g.Valves.model_fields)


@pytest.mark.parametrize("name", list(g.Valves.model_fields))
def test_every_valve_has_an_environment_preset(monkeypatch, name):
    variable = g.ENV_PREFIX + name.upper()
    assert name in PRESETS, f"add a PRESETS row for the valve {name}: {variable} is untested"
    text, expected = PRESETS[name]
    assert expected != DEFAULTS[name], "a preset equal to the default proves nothing"
    module = guard_with_env(monkeypatch, {variable: text})
    assert module.Valves().model_dump() == DEFAULTS | {name: expected}, f"{variable}={text!r}"
    saved = module.Valves(**{name: DEFAULTS[name]})
    assert getattr(saved, name) == DEFAULTS[name], "saved valves win over the environment"


ENV_DEFAULTS = [
    *[
        pytest.param({legacy: PRESETS[name][0]}, name, PRESETS[name][1], id=f"legacy-{legacy}")
        for name, legacy in g.LEGACY_ENV.items()
    ],
    pytest.param(
        {"API_KEY_GUARD_API_KEY_ALLOWED_ENDPOINTS_USER": "/a", "API_KEY_ALLOWED_ENDPOINTS_USER": "/b"},
        "api_key_allowed_endpoints_user",
        "/a",
        id="prefixed-wins-over-legacy-user",
    ),
    pytest.param(
        {"API_KEY_GUARD_API_KEY_ALLOWED_ENDPOINTS_ADMIN": "/a", "API_KEY_ALLOWED_ENDPOINTS_ADMIN": "/b"},
        "api_key_allowed_endpoints_admin",
        "/a",
        id="prefixed-wins-over-legacy-admin",
    ),
    *[
        pytest.param({g.ENV_PREFIX + name.upper(): "first"}, name, DEFAULTS[name], id=f"bad-int-keeps-default-{name}")
        for name in INTEGERS
    ],
    *[
        pytest.param({g.ENV_PREFIX + name.upper(): "nope"}, name, DEFAULTS[name], id=f"unclear-bool-stays-{name}")
        for name in BOOLEANS
    ],
]


@pytest.mark.parametrize(("env", "name", "expected"), ENV_DEFAULTS)
def test_environment_presets_defaults(monkeypatch, env, name, expected):
    assert guard_with_env(monkeypatch, env).Valves().model_dump() == DEFAULTS | {name: expected}


def test_the_legacy_names_are_the_two_endpoint_lists():
    assert g.LEGACY_ENV == {
        "api_key_allowed_endpoints_admin": "API_KEY_ALLOWED_ENDPOINTS_ADMIN",
        "api_key_allowed_endpoints_user": "API_KEY_ALLOWED_ENDPOINTS_USER",
    }


def test_invalid_env_default_fails_closed_not_at_load(monkeypatch):
    monkeypatch.setenv("API_KEY_GUARD_API_KEY_ROLES", "admins")
    module = load_guard()  # loading never fails: Open WebUI would switch the guard off
    with pytest.raises(ValueError, match="admins"):
        module.policy_from_valves(module.Valves())
