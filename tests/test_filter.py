"""The guard as Open WebUI runs it: loaded by exec, inlet driven with realistic objects,
route hooks installed on a stand-in app object (the e2e suite does it on real servers)."""

import asyncio
import logging
from types import SimpleNamespace

import pytest

from tests.conftest import GUARD_ERROR, NOT_ADMITTED, Clock, Groups, Models, error_lines
from tests.guard_loader import GUARD_FILE, load_guard

ADMIN = {"id": "u-admin", "email": "admin@example.com", "name": "Admin", "role": "admin"}
ALICE = {"id": "u-alice", "email": "alice@example.com", "name": "Alice", "role": "user"}
GINA = {"id": "u-gina", "email": "gina@example.com", "name": "Gina", "role": "user"}
ADMIN_KEY, ALICE_KEY, GINA_KEY = "sk-admin0000000000aaaa", "sk-alice000000000bbbb", "sk-gina00000000000cccc"
SESSION = "eyJhbGciOiJIUzI1NiJ9.eyJpZCI6InUtYWxpY2UifQ.c2lnbmF0dXJl"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


class Headers(dict):
    """Case-insensitive header lookup, like Starlette's."""

    def __init__(self, items):
        super().__init__({k.lower(): v for k, v in items.items()})

    def get(self, key, default=None):
        return super().get(key.lower(), default)


def make_request(headers=None, cookies=None, path="/api/chat/completions", auth_type=None):
    state = SimpleNamespace() if auth_type is None else SimpleNamespace(auth_type=auth_type)
    return SimpleNamespace(headers=Headers(headers or {}), cookies=cookies or {}, state=state, scope={"path": path})


@pytest.fixture
def groups(open_webui):
    """Installs a stand-in Groups model (Gina in `automation` unless told otherwise), and no workspace models."""

    def install(membership=None, **kwargs):
        model = Groups(membership or {"u-gina": ["automation"]}, **kwargs)
        open_webui(Groups=model, Models=Models())
        return model

    return install


def run_inlet(module, request, user, body=BODY, **valves):
    flt = module.Filter()
    flt.valves = module.Valves(**valves)
    return asyncio.run(flt.inlet(body=dict(body), __user__=user, __request__=request))


def test_loads_like_open_webui_without_forbidden_features():
    text = GUARD_FILE.read_text()
    for forbidden in ("from utils", "from apps", "from main", "from config", "requirements:", "toggle"):
        assert forbidden not in text
    module = load_guard()
    assert not hasattr(module.Filter(), "toggle")
    assert not hasattr(module.Filter, "UserValves")
    header = text.split('"""')[1]
    for key in ("title:", "author:", "version:", "required_open_webui_version:", "license:", "description:"):
        assert f"\n{key}" in header


ALLOWED = [
    pytest.param(make_request(cookies={"token": SESSION}), ALICE, {}, id="session-cookie"),
    pytest.param(make_request({"Authorization": f"Bearer {SESSION}"}), ALICE, {}, id="session-bearer"),
    pytest.param(make_request({"Authorization": f"Bearer {ADMIN_KEY}"}), ADMIN, {}, id="admin-key"),
    pytest.param(make_request({"Authorization": f"bearer {ADMIN_KEY}"}), ADMIN, {}, id="admin-key-lower-scheme"),
    pytest.param(make_request(cookies={"token": ADMIN_KEY}), ADMIN, {}, id="admin-key-cookie"),
    pytest.param(make_request({"x-api-key": GINA_KEY}), GINA, {"api_key_groups": "automation"}, id="group-key-header"),
    pytest.param(
        make_request({"Authorization": f"Bearer {ALICE_KEY}"}, auth_type="jwt"), ALICE, {}, id="core-says-session"
    ),
    pytest.param(make_request({"Authorization": f"Bearer {ALICE_KEY}"}), ALICE, {"mode": "monitor"}, id="monitor"),
]


@pytest.mark.parametrize(("request_", "user", "valves"), ALLOWED)
def test_inlet_passes_body_unchanged(groups, request_, user, valves):
    groups()
    assert run_inlet(load_guard(), request_, user, **valves) == BODY


DENIED = [
    pytest.param(make_request({"Authorization": f"Bearer {ALICE_KEY}"}), ALICE, {}, NOT_ADMITTED, id="user-key-bearer"),
    pytest.param(
        make_request({"x-api-key": ALICE_KEY}, auth_type="api_key"),
        ALICE,
        {"block_message": "Denied ({reason}). Ask IT."},
        "Denied (API keys are not enabled for role 'user' (api_key_roles), nor for this user's groups "
        "(api_key_groups) or account (api_key_users)). Ask IT.",
        id="user-key-custom-header-custom-message",
    ),
    pytest.param(
        make_request(cookies={"token": ADMIN_KEY}, path="/api/v1/chat/completions"),
        ADMIN,
        {"api_key_allowed_models_admin": "other-*"},
        "API Key Guard: API keys of role 'admin' may not use model 'test-model' (api_key_allowed_models_admin)",
        id="admin-model",
    ),
    pytest.param(
        make_request({"Authorization": f"Bearer {ADMIN_KEY}"}),
        {"id": "u-admin", "email": "admin@example.com"},
        {"api_key_users": "u-admin", "api_key_allowed_endpoints_user": "/api/models"},
        "API Key Guard: API keys of role '' may not call /api/chat/completions (api_key_allowed_endpoints_user)",
        id="missing-role-never-admin",
    ),
]


@pytest.mark.parametrize(("request_", "user", "valves", "message"), DENIED)
def test_inlet_denies_with_the_reason(groups, request_, user, valves, message):
    groups()
    with pytest.raises(Exception) as denied:
        run_inlet(load_guard(), request_, user, **valves)
    assert str(denied.value) == message


KEY_REQUEST = make_request({"Authorization": f"Bearer {ADMIN_KEY}"})

FAIL_CLOSED = [
    pytest.param(None, ADMIN, {}, "ValueError: no request passed to the guard", id="no-request"),
    pytest.param(KEY_REQUEST, None, {}, "ValueError: no user passed to the guard", id="no-user"),
    pytest.param(KEY_REQUEST, ADMIN, {"fail": True}, "RuntimeError: database is locked", id="groups-lookup-fails"),
    pytest.param(KEY_REQUEST, {"email": "x@example.com", "role": "admin"}, {}, "KeyError: 'id'", id="user-without-id"),
]


@pytest.mark.parametrize(("request_", "user", "group_kwargs", "error"), FAIL_CLOSED)
def test_undecidable_key_request_is_denied_with_one_error(groups, caplog, request_, user, group_kwargs, error):
    groups(**group_kwargs)
    with caplog.at_level(logging.INFO, logger="api_key_guard"), pytest.raises(Exception) as denied:
        run_inlet(load_guard(), request_, user)
    assert str(denied.value) == GUARD_ERROR
    errors = error_lines(caplog)
    assert len(errors) == 1, errors
    assert errors[0].endswith(f"[{error}]")


def test_sessions_never_touch_the_lookups(groups):
    model = groups(fail=True)
    assert run_inlet(load_guard(), make_request(cookies={"token": SESSION}), ALICE) == BODY
    assert model.calls == 0


def test_invalid_env_policy_denies_keys_but_not_sessions(groups, monkeypatch):
    groups()
    monkeypatch.setenv("API_KEY_GUARD_API_KEY_ALLOWED_ENDPOINTS_ADMIN", "api/without/slash")
    module = load_guard()
    assert run_inlet(module, make_request(cookies={"token": SESSION}), ALICE) == BODY
    with pytest.raises(Exception, match="could not evaluate"):
        run_inlet(module, KEY_REQUEST, ADMIN)


@pytest.mark.parametrize("is_async", [pytest.param(False, id="sync-0.6"), pytest.param(True, id="async-0.12")])
def test_groups_are_looked_up_once_per_ttl(groups, is_async):
    model = groups(is_async=is_async)
    module = load_guard()
    request = make_request({"Authorization": f"Bearer {GINA_KEY}"})
    for _ in range(5):
        assert run_inlet(module, request, GINA, api_key_groups="automation") == BODY
    assert model.calls == 1


def test_audit_line_has_fingerprint_never_the_key(groups, caplog):
    groups()
    with caplog.at_level(logging.INFO, logger="api_key_guard"):
        run_inlet(load_guard(), KEY_REQUEST, ADMIN, audit_log="all")
        with pytest.raises(Exception, match="not enabled"):
            run_inlet(load_guard(), make_request(cookies={"token": ALICE_KEY}), ALICE)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "api_key_guard allow via=inlet reason=allowed key=sk-…aaaa user=u-admin role=admin "
        "path=/api/chat/completions model=test-model: allowed by the API key policy",
        "api_key_guard deny via=inlet reason=not_admitted key=sk-…bbbb user=u-alice role=user "
        "path=/api/chat/completions model=test-model: API keys are not enabled for role 'user' (api_key_roles), "
        "nor for this user's groups (api_key_groups) or account (api_key_users)",
    ]
    assert [key for key in (ADMIN_KEY, ALICE_KEY) if key in caplog.text] == []


def test_bounded_cache_never_exceeds_its_size():
    cache = load_guard().TTLCache(ttl=60, max_entries=3)
    for i in range(10):
        cache.put(i, i)
    assert {"entries": len(cache), "newest": cache.get(9), "oldest": cache.get(0)} == {
        "entries": 3,
        "newest": 9,
        "oldest": None,
    }


def test_cache_entry_expires_after_its_ttl(monkeypatch):
    """A removed group member must lose access once the TTL is over: the entry is gone at ttl, not later."""
    module, clock = load_guard(), Clock()
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=clock))
    cache = module.TTLCache(ttl=10)
    cache.put("u-gina", "groups")
    clock.now += 9.999
    assert cache.get("u-gina") == "groups"
    clock.now += 0.001
    assert cache.get("u-gina") is None


def test_monitor_mode_serves_and_logs_would_deny(groups, caplog):
    """Monitor mode is a dry run: the request goes through, and the audit line says what enforce would do."""
    groups()
    with caplog.at_level(logging.INFO, logger="api_key_guard"):
        body = run_inlet(load_guard(), make_request({"Authorization": f"Bearer {ALICE_KEY}"}), ALICE, mode="monitor")
    assert body == BODY
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "api_key_guard would-deny via=inlet reason=not_admitted key=sk-…bbbb user=u-alice role=user "
        "path=/api/chat/completions model=test-model"
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING"]


AUDIT = [
    pytest.param("deny", 0, 1, id="deny-logs-denials-only"),
    pytest.param("all", 1, 1, id="all-logs-everything"),
    pytest.param("off", 0, 0, id="off-logs-nothing"),
]


@pytest.mark.parametrize(("audit_log", "allow_lines", "deny_lines"), AUDIT)
def test_audit_log_valve(groups, caplog, audit_log, allow_lines, deny_lines):
    groups()
    module = load_guard()
    with caplog.at_level(logging.INFO, logger="api_key_guard"):
        run_inlet(module, KEY_REQUEST, ADMIN, audit_log=audit_log)
        allowed = len(caplog.records)
        with pytest.raises(Exception, match="not enabled"):
            run_inlet(module, make_request({"Authorization": f"Bearer {ALICE_KEY}"}), ALICE, audit_log=audit_log)
    assert {"allow lines": allowed, "deny lines": len(caplog.records) - allowed} == {
        "allow lines": allow_lines,
        "deny lines": deny_lines,
    }
