"""Adversarial and fault suite (issues #7, #10), on every pinned Open WebUI release.

Each case is a named row with its exact expected outcome (see `attacks.py` for the outcome words)
and whether the model backend may be called. Attack tables and allowed tables are kept apart:
in an attack row the key is one the policy denies, so the invariant is no 2xx and no backend
call; a row that breaks it is recorded as a bypass for the summary line printed at the end of
the run (`adversarial: N cases run, N passed, bypasses found = 0`).

Default valves (admin-only keys) unless a row says otherwise; alice is an ordinary user, gina a
member of the `automation` group. A row whose outcome differs by release maps the first release
where each outcome starts to that outcome: {"0.6": "core-401", "0.9": "guard"} (`attacks.on_release`).
"""

import json
import re
import subprocess
import threading
import time

import pytest

from .attacks import (
    BACKEND_SETTLE_SECONDS,
    add_account,
    bearer,
    database,
    fill_headers,
    guard_error_lines,
    log_text,
    on_release,
    send,
    set_role,
    verdict,
)
from .conftest import DEFAULT_VALVES, FUNCTION_ID, GUARD, leaked, wait_for
from .provision import venv_dir
from .routes import CHAT_BODY

PROVIDER = "/openai/chat/completions"  # a model route that never runs filters
USERS_ON_CHAT = {"api_key_roles": "admin,user"}  # alice admitted, on the default user endpoint list
K, J, A, AJ = "{alice_key}", "{alice_jwt}", "{admin_key}", "{admin_jwt}"
JUNK = "sk-" + "0" * 32  # a throwaway key no account has
# Outcomes that start at some release ({first release: outcome from it on}; see attacks.on_release).
# From 0.8 (FastAPI 0.135+) core takes any two-part Authorization value and strips stray blanks;
# 0.6.22 (FastAPI 0.115) refuses them. From 0.9 core reads x-api-key on every route; 0.8 only on
# the Anthropic-style message routes, 0.6 nowhere.
GUARD_FROM_0_8 = {"0.6": "core-401", "0.8": "guard"}
OK_FROM_0_8 = {"0.6": "core-401", "0.8": "ok"}
GUARD_FROM_0_9 = {"0.6": "core-401", "0.9": "guard"}
OK_FROM_0_9 = {"0.6": "core-401", "0.9": "ok"}


def named(case_id: str):
    """A single case, so its test id reads like the table rows: test_x[owui-0.12.4-policy:demoted-admin]."""
    return pytest.mark.parametrize("case", [pytest.param(case_id, id=case_id)])


# =============================================================================================
# Credential transport and parsing. Target: POST /openai/chat/completions, default valves.
# Core's credential order (0.8 on): Authorization with scheme Bearer (any case), the `token`
# cookie, then any two-part Authorization value (`Basic sk-…`), then x-api-key (0.9 on; 0.8 on
# the message routes only). 0.6.22 reads only the first two. The guard judges the credential
# core authenticated, whatever carried it.
# =============================================================================================
TRANSPORT_ATTACKS = [
    pytest.param([("Authorization", f"Bearer {K}")], "guard", id="transport:bearer"),
    pytest.param([("authorization", f"bearer {K}")], "guard", id="transport:lower-case-header-and-scheme"),
    pytest.param([("Authorization", f"BEARER {K}")], "guard", id="transport:upper-case-scheme"),
    pytest.param([("Authorization", f"BeArEr {K}")], "guard", id="transport:mixed-case-scheme"),
    # FastAPI 0.135+ (Open WebUI 0.8.12 on) strips the credential; 0.115 (0.6.22) keeps " sk-…", which no key matches.
    pytest.param([("Authorization", f"Bearer  {K}")], GUARD_FROM_0_8, id="transport:bearer-two-spaces"),
    pytest.param([("Authorization", f"Bearer\t{K}")], "core-401", id="transport:bearer-tab"),
    pytest.param([("Authorization", f"Bearer {K} ")], GUARD_FROM_0_8, id="transport:trailing-space"),
    pytest.param([("Authorization", f"Bearer {K} x")], "core-401", id="transport:bearer-three-parts"),
    pytest.param([("Authorization", f"Basic {K}")], GUARD_FROM_0_8, id="transport:basic-scheme"),
    pytest.param([("Authorization", f"Token {K}")], GUARD_FROM_0_8, id="transport:token-scheme"),
    pytest.param([("Authorization", K)], "core-401", id="transport:no-scheme"),
    pytest.param(
        [("Authorization", f"Bearer {K}"), ("Authorization", f"Bearer {A}")],
        "guard",
        id="transport:two-authorization-headers-user-first",
    ),
    pytest.param([("Cookie", f"token={K}")], "guard", id="transport:cookie-only"),
    pytest.param([("Cookie", f"a=1; token={K}; b=2")], "guard", id="transport:cookie-among-others"),
    pytest.param([("Cookie", f'token="{K}"')], "guard", id="transport:cookie-quoted"),
    pytest.param([("Cookie", f"token={JUNK}; token={K}")], "guard", id="transport:two-token-cookies-last-wins"),
    pytest.param([("x-api-key", K)], GUARD_FROM_0_9, id="transport:custom-header-only"),
    pytest.param([("X-API-KEY", K)], GUARD_FROM_0_9, id="transport:custom-header-upper-case"),
    pytest.param([("x-api-key", f"Bearer {K}")], "core-401", id="transport:custom-header-with-scheme"),
    pytest.param(
        [("Authorization", f"Bearer {K}"), ("Cookie", f"token={J}")], "guard", id="order:key-bearer-jwt-cookie"
    ),
    pytest.param([("Authorization", f"Bearer {K}"), ("x-api-key", A)], "guard", id="order:key-bearer-admin-key-header"),
    pytest.param([("Cookie", f"token={K}"), ("x-api-key", A)], "guard", id="order:key-cookie-admin-key-header"),
    pytest.param([("Authorization", f"Basic {K}"), ("x-api-key", J)], GUARD_FROM_0_8, id="order:key-basic-jwt-header"),
    pytest.param(
        [("Authorization", f"Basic {A}"), ("Cookie", f"token={K}")], "guard", id="order:key-cookie-beats-admin-basic"
    ),
    pytest.param([("Authorization", f"Bearer {JUNK}")], "core-401", id="transport:junk-key"),
    pytest.param([("Authorization", "Bearer sk-")], "core-401", id="transport:bare-prefix"),
    pytest.param([("Authorization", f"Bearer {K}x")], "core-401", id="transport:key-with-suffix"),
    pytest.param([("Authorization", "Bearer SK-{alice_key_tail}")], "core-401", id="transport:upper-case-prefix"),
    pytest.param([("Authorization", "Bearer sk-" + "A" * 60000)], "core-401", id="transport:huge-key"),
    pytest.param([("Authorization", "Bearer sk-\xe9\xe8\xff".encode("latin-1"))], "core-401", id="transport:non-ascii"),
    pytest.param([("Authorization", "Bearer ")], "core-401", id="transport:empty-bearer"),
]

# The winning credential is a session or an admitted key: core's order decides, and it is served.
TRANSPORT_ALLOWED = [
    pytest.param([("Authorization", f"Bearer {A}")], "ok", id="transport-allowed:admin-key-bearer"),
    pytest.param([("Cookie", f"token={A}")], "ok", id="transport-allowed:admin-key-cookie"),
    pytest.param([("x-api-key", A)], OK_FROM_0_9, id="transport-allowed:admin-key-custom-header"),
    pytest.param(
        [("Authorization", f"Bearer {A}"), ("Authorization", f"Bearer {K}")],
        "ok",
        id="order-allowed:admin-key-first-of-two-headers",
    ),
    pytest.param([("Authorization", f"Bearer {J}"), ("Cookie", f"token={K}")], "ok", id="order-allowed:jwt-bearer"),
    pytest.param([("Cookie", f"token={J}"), ("x-api-key", K)], "ok", id="order-allowed:jwt-cookie-key-header"),
    pytest.param([("Cookie", f"token={J}"), ("Authorization", f"Basic {K}")], "ok", id="order-allowed:jwt-cookie"),
    pytest.param([("Authorization", f"Basic {J}"), ("x-api-key", K)], OK_FROM_0_8, id="order-allowed:jwt-basic"),
]


def headers_for(deployment, headers: list) -> list:
    tail = deployment.people.alice.api_key[3:]
    return [(n, v.replace("{alice_key_tail}", tail) if isinstance(v, str) else v) for n, v in headers]


@pytest.mark.parametrize(("headers", "expected"), TRANSPORT_ATTACKS)
def test_transport_attack(request, deployment, headers, expected):
    deployment.configure()
    answer = send(deployment, "POST", PROVIDER, fill_headers(deployment, headers_for(deployment, headers)), CHAT_BODY)
    verdict(request, answer, on_release(deployment, expected), attack=True)


# 0.8 reads x-api-key on the Anthropic-style message route only; there the guard judges it like any key.
MESSAGES = "/api/v1/messages"
MESSAGES_BODY = {**CHAT_BODY, "max_tokens": 16}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [pytest.param([("x-api-key", K)], {"0.6": "core-405", "0.8": "guard"}, id="transport:custom-header-on-messages")],
)
def test_transport_attack_on_the_messages_route(request, deployment, headers, expected):
    deployment.configure()
    answer = send(deployment, "POST", MESSAGES, fill_headers(deployment, headers), MESSAGES_BODY)
    verdict(request, answer, on_release(deployment, expected), attack=True)


@pytest.mark.parametrize(("headers", "expected"), TRANSPORT_ALLOWED)
def test_transport_allowed(request, deployment, headers, expected):
    deployment.configure()
    answer = send(deployment, "POST", PROVIDER, fill_headers(deployment, headers), CHAT_BODY)
    expected = on_release(deployment, expected)
    verdict(request, answer, expected, attack=False, backend=expected == "ok")


# Keys where core never looks. Throwaway values: Open WebUI's access log prints query strings.
ELSEWHERE = [
    pytest.param(f"{PROVIDER}?token={JUNK}&api_key={JUNK}", None, id="transport:key-in-query-string"),
    pytest.param(PROVIDER, {**CHAT_BODY, "api_key": JUNK, "token": JUNK}, id="transport:key-in-json-body"),
]


@pytest.mark.parametrize(("target", "body"), ELSEWHERE)
def test_transport_key_where_core_never_looks(request, deployment, target, body):
    deployment.configure()
    verdict(request, send(deployment, "POST", target, [], body or CHAT_BODY), "core-401", attack=True)


# =============================================================================================
# Path forms, sent raw. Scenario: alice admitted on the default user endpoint list (chat and
# model lists); each target is dressed up as an allowed path but routes elsewhere, or nowhere.
# =============================================================================================
PATH_ATTACKS = [
    pytest.param("POST", "/openai/chat/completions", "guard", id="path:provider-route-baseline"),
    pytest.param("POST", "/api/v1/tasks/title/completions", "guard", id="path:task-route"),
    pytest.param("POST", "/openai/chat/completions/", "guard", id="path:trailing-slash"),
    pytest.param("POST", "//openai/chat/completions", "core-405", id="path:double-leading-slash"),
    pytest.param("POST", "/openai//chat/completions", "guard", id="path:double-inner-slash"),
    pytest.param("POST", "/api/chat/completions/../../../openai/chat/completions", "core-405", id="path:dot-dot"),
    pytest.param("POST", "/api/models/../../openai/chat/completions", "core-405", id="path:dot-dot-from-model-list"),
    pytest.param(
        "POST", "/api/chat/completions/%2e%2e/%2e%2e/%2e%2e/openai/chat/completions", "core-405", id="path:encoded-dots"
    ),
    pytest.param("POST", "/./openai/chat/completions", "core-405", id="path:dot-segment"),
    pytest.param("POST", "/openai%2Fchat%2Fcompletions", "guard", id="path:encoded-slashes"),
    pytest.param("POST", "/openai/chat%2Fcompletions", "guard", id="path:encoded-slash-inside-provider"),
    pytest.param("POST", "/openai/chat/completions;/api/chat/completions", "guard", id="path:semicolon-parameter"),
    pytest.param("POST", "/api/chat/completions;x=1", "core-405", id="path:semicolon-on-allowed-path"),
    pytest.param("POST", "/openai/chat/completions%00", "guard", id="path:nul-byte"),
    pytest.param("POST", "/openai/chat/completions%0a", "guard", id="path:newline"),
    pytest.param("POST", "/api/chat/completions%00", "core-405", id="path:nul-after-allowed"),
    pytest.param("POST", "/OPENAI/chat/completions", "core-405", id="path:upper-case-provider"),
    pytest.param("POST", "/API/CHAT/COMPLETIONS", "core-405", id="path:upper-case-allowed-look"),
    pytest.param("POST", "/api/chat/compl%D0%B5tions", "core-405", id="path:cyrillic-look-alike"),
    pytest.param("POST", "/api/chat/completions%E2%80%8B", "core-405", id="path:zero-width-space"),
    pytest.param("GET", "/api/modelsX", "page", id="path:prefix-boundary"),
    pytest.param("POST", "/api/chat/completionsX", "core-405", id="path:prefix-boundary-chat"),
    pytest.param("GET", "/api/v1/modelsX/../chats/", "page", id="path:prefix-boundary-dot-dot"),
    pytest.param("GET", "/api/models/../v1/chats/", "page", id="path:dot-dot-to-rest"),
    pytest.param(
        "POST", "/api/v1/tasks/title/completions?p=/api/chat/completions", "guard", id="path:allowed-in-query"
    ),
    pytest.param("POST", "/openai/chat/completions#/api/chat/completions", "guard", id="path:fragment"),
    pytest.param("POST", "http://127.0.0.1/openai/chat/completions", "guard", id="path:absolute-form-target"),
    pytest.param("POST", "/api/embeddings", "guard", id="path:embeddings"),
    pytest.param("GET", "/api/v1/chats/", "guard", id="path:rest-api"),
]

# Not attacks: the router dispatches on the decoded path, so these ARE allowed routes.
PATH_ALLOWED = [
    pytest.param("POST", "/api/chat/completions", "ok", True, id="path-allowed:chat"),
    pytest.param("POST", "/api/chat%2Fcompletions", "ok", True, id="path-allowed:encoded-slash-routes-to-chat"),
    pytest.param("POST", "/api/%63hat/completions", "ok", True, id="path-allowed:encoded-letter"),
    pytest.param("GET", "/api/models", "ok", None, id="path-allowed:model-list"),
    # The router does not strip the slash: the web app's catch-all answers with its HTML shell, no data.
    pytest.param("GET", "/api/models/", "page", False, id="path-allowed:trailing-slash-on-model-list"),
    pytest.param("GET", "/api/models?x=/openai/chat/completions", "ok", None, id="path-allowed:other-path-in-query"),
    # The default user entry is `GET /api/v1/models`: reading models, not the model management under it.
    pytest.param("POST", "/api/v1/models/create", "guard", False, id="path-denied:default-reads-models-only"),
]


MODEL_FORM = {"id": "alice-model", "name": "alice-model", "base_model_id": "test-model", "meta": {}, "params": {}}


def path_body(method: str, target: str = ""):
    if target.startswith("/api/v1/models/create"):
        return MODEL_FORM
    return CHAT_BODY if method == "POST" else None


@pytest.mark.parametrize(("method", "target", "expected"), PATH_ATTACKS)
def test_path_attack(request, deployment, method, target, expected):
    deployment.configure(**USERS_ON_CHAT)
    answer = send(deployment, method, target, bearer(deployment.people.alice.api_key), path_body(method))
    verdict(request, answer, on_release(deployment, expected), attack=True)


@pytest.mark.parametrize(("method", "target", "expected", "backend"), PATH_ALLOWED)
def test_path_allowed(request, deployment, method, target, expected, backend):
    deployment.configure(**USERS_ON_CHAT)
    answer = send(deployment, method, target, bearer(deployment.people.alice.api_key), path_body(method, target))
    verdict(request, answer, expected, attack=False, backend=backend)


# =============================================================================================
# Header spoofing: none of these changes the routed path, so none changes a decision.
# Same scenario (alice admitted on the chat endpoints), aiming at the provider route.
# =============================================================================================
SPOOFS = [
    pytest.param([("Host", "127.0.0.1/api/chat/completions")], id="spoof:host-with-slash"),
    pytest.param([("Host", "127.0.0.1?/api/chat/completions")], id="spoof:host-with-question-mark"),
    pytest.param([("Host", "127.0.0.1#/api/chat/completions")], id="spoof:host-with-hash"),
    pytest.param([("Host", "")], id="spoof:empty-host"),
    pytest.param([("Host", "127.0.0.1"), ("Host", "evil/api/chat/completions")], id="spoof:two-hosts"),
    pytest.param([("X-Original-URL", "/api/chat/completions")], id="spoof:x-original-url"),
    pytest.param([("X-Rewrite-URL", "/api/chat/completions")], id="spoof:x-rewrite-url"),
    pytest.param([("X-Forwarded-Prefix", "/api/chat/completions")], id="spoof:x-forwarded-prefix"),
    pytest.param([("X-Forwarded-Path", "/api/chat/completions")], id="spoof:x-forwarded-path"),
    pytest.param([("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.1")], id="spoof:x-forwarded-for"),
    pytest.param([("X-Forwarded-Host", "a/api/chat/completions"), ("Forwarded", "host=a")], id="spoof:forwarded-host"),
    pytest.param([("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "443")], id="spoof:forwarded-proto"),
    pytest.param([("X-HTTP-Method-Override", "GET"), ("X-Method-Override", "GET")], id="spoof:method-override"),
    pytest.param([("X-Api-Key-Guard", "monitor")], id="spoof:guard-header-itself"),
]


@pytest.mark.parametrize("extra", SPOOFS)
def test_header_spoofing(request, deployment, extra):
    deployment.configure(**USERS_ON_CHAT)
    answer = send(deployment, "POST", PROVIDER, [*bearer(deployment.people.alice.api_key), *extra], CHAT_BODY)
    verdict(request, answer, "guard", attack=True)
    assert "may not call /openai/chat/completions" in answer.detail, answer.detail


@pytest.mark.parametrize("extra", [pytest.param([("X-Original-URL", PROVIDER)], id="spoof-allowed:x-original-url")])
def test_header_spoofing_does_not_turn_an_allow_into_a_deny(request, deployment, extra):
    deployment.configure(**USERS_ON_CHAT)
    answer = send(deployment, "GET", "/api/models", [*bearer(deployment.people.alice.api_key), *extra])
    verdict(request, answer, "ok", attack=False, backend=None)


# =============================================================================================
# Methods. Default valves: alice's key is denied everywhere.
# =============================================================================================
METHODS = [
    pytest.param("HEAD", "/api/models", [], "page", id="method:head-on-get-route"),
    pytest.param("HEAD", "/api/v1/chats/", [], "page", id="method:head-on-rest-route"),
    pytest.param("OPTIONS", PROVIDER, [], "core-405", id="method:options"),
    pytest.param("GET", PROVIDER, [], "guard", id="method:get-on-post-route"),
    pytest.param("PUT", PROVIDER, [], "guard", id="method:put-on-provider-catch-all"),
    pytest.param("post", PROVIDER, [], "core-400", id="method:lower-case-method"),
    pytest.param("PROPFIND", PROVIDER, [], "core-405", id="method:unknown-method"),
]


@pytest.mark.parametrize(("method", "target", "extra", "expected"), METHODS)
def test_methods(request, deployment, method, target, extra, expected):
    deployment.configure()
    headers = [*bearer(deployment.people.alice.api_key), *extra]
    answer = send(deployment, method, target, headers, CHAT_BODY if method in ("POST", "PUT", "post") else None)
    verdict(request, answer, on_release(deployment, expected), attack=True)


@named("method-allowed:cors-preflight")
def test_method_cors_preflight_is_answered_without_authentication(case, deployment):
    """method-allowed:cors-preflight. Browsers send no credential on a preflight; Open WebUI's CORS
    middleware answers it before any authentication: no body, no backend call."""
    deployment.configure()
    headers = [*bearer(deployment.people.alice.api_key)]
    headers += [("Origin", "http://evil.example"), ("Access-Control-Request-Method", "POST")]
    answer = send(deployment, "OPTIONS", PROVIDER, headers)
    assert (answer.status, answer.backend_calls, "pong" in answer.text) == (200, 0, False), str(answer)


# =============================================================================================
# Policy edges.
# =============================================================================================
def key_answer(deployment, account, target="/api/models", transport="bearer"):
    """A model listing with the account's key; when served, Open WebUI asks the model backend for its list."""
    headers = {"bearer": bearer(account.api_key), "cookie": [("Cookie", f"token={account.api_key}")]}[transport]
    return send(deployment, "GET", target, headers)


@named("policy:blocked-admin")
def test_policy_blocked_admin_key_denied(case, request, deployment):
    """policy:blocked-admin (by e-mail, other case) — the admin's key is denied on every transport."""
    deployment.configure(api_key_blocked_users="ADMIN@Example.com")
    admin = deployment.people.admin
    verdict(request, key_answer(deployment, admin), "guard", attack=True)
    verdict(request, key_answer(deployment, admin, transport="cookie"), "guard", attack=True)
    assert "api_key_blocked_users" in key_answer(deployment, admin).detail


@named("policy-allowed:blocked-admin-session")
def test_policy_blocked_admin_session_still_works(case, request, deployment):
    """policy-allowed:blocked-admin-session — blocking concerns keys; the admin's session is untouched."""
    deployment.configure(api_key_blocked_users="admin@example.com")
    verdict(
        request,
        send(deployment, "GET", "/api/models", bearer(deployment.people.admin.jwt)),
        "ok",
        attack=False,
        backend=None,
    )


@named("policy:blocked-admin-by-id")
def test_policy_blocked_by_user_id(case, request, deployment):
    """policy:blocked-admin-by-id — the blocked list accepts user ids too."""
    admin = deployment.people.admin
    deployment.configure(api_key_blocked_users=admin.id)
    verdict(request, key_answer(deployment, admin), "guard", attack=True)


@named("policy:demoted-admin")
def test_policy_demoted_admin_denied_at_once(case, request, deployment):
    """policy:demoted-admin — the route guard reads the role core just loaded: no cache, no delay."""
    deployment.configure()
    dora = add_account(deployment, "dora", role="admin")
    verdict(request, key_answer(deployment, dora), "ok", attack=False, backend=None)
    set_role(deployment, dora, "user")
    verdict(request, key_answer(deployment, dora), "guard", attack=True)


@named("policy-allowed:promoted-user")
def test_policy_promoted_user_allowed_at_once(case, request, deployment):
    """policy-allowed:promoted-user — and the other way round."""
    deployment.configure()
    paul = add_account(deployment, "paul")
    verdict(request, key_answer(deployment, paul), "guard", attack=True)
    set_role(deployment, paul, "admin")
    verdict(request, key_answer(deployment, paul), "ok", attack=False, backend=None)


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        pytest.param("admin", "guard", id="policy:pending-user-default-valves"),
        pytest.param("admin,user", "guard", id="policy:pending-user-users-admitted"),
        # Admitted by the guard, refused by core: a pending account may not use the API at all.
        pytest.param("admin,user,pending", "core-401", id="policy:pending-user-admitted-core-refuses"),
    ],
)
def test_policy_pending_user(request, deployment, roles, expected):
    deployment.configure(api_key_roles=roles)
    pat = add_account(deployment, "pat", role="pending")
    verdict(request, key_answer(deployment, pat), expected, attack=True)


@named("policy:deleted-user")
def test_policy_deleted_users_key_refused_by_core(case, request, deployment):
    """policy:deleted-user — core no longer finds the key (its own 401); the guard is never asked."""
    deployment.configure(**USERS_ON_CHAT)
    dan = add_account(deployment, "dan")
    verdict(request, key_answer(deployment, dan), "ok", attack=False, backend=None)
    deployment.server.ok("DELETE", f"/api/v1/users/{dan.id}", deployment.people.admin.jwt)
    verdict(request, key_answer(deployment, dan), "core-401", attack=True)


@named("policy-allowed:admitted-by-email")
def test_policy_admitted_by_account(case, request, deployment):
    """policy-allowed:admitted-by-email — api_key_users admits alice, on the user endpoint list only."""
    deployment.configure(api_key_users="Alice@example.com")
    alice = deployment.people.alice
    verdict(request, key_answer(deployment, alice), "ok", attack=False, backend=None)
    verdict(request, send(deployment, "POST", PROVIDER, bearer(alice.api_key), CHAT_BODY), "guard", attack=True)


def outcome_becomes(deployment, account, outcome: str):
    """Poll the account's key until it gets `outcome` (a group change is seen once the group cache expires)."""
    return wait_for(
        lambda: (answer := key_answer(deployment, account)).outcome == outcome and answer,
        f"{account.name}'s key answered {outcome}",
    )


@named("policy-allowed:monitor-mode-logs-would-deny")
def test_policy_monitor_mode_serves_and_logs_would_deny(case, request, deployment):
    """policy-allowed:monitor-mode-logs-would-deny — a dry run: alice's key is served, and the audit line
    says the guard would have denied it, so an operator can review a policy before enforcing it."""
    deployment.configure(mode="monitor")
    alice, before = deployment.people.alice, len(log_text(deployment))
    answer = send(deployment, "POST", PROVIDER, bearer(alice.api_key), CHAT_BODY)
    verdict(request, answer, "ok", attack=False, backend=True)
    assert answer.guard_header == "monitor"
    wanted = f"api_key_guard would-deny via=route reason=not_admitted key=sk-…{alice.api_key[-4:]} user={alice.id}"
    wait_for(lambda: wanted in log_text(deployment)[before:], f"'{wanted}' in {deployment.server.log_path}")


@named("policy:removed-from-group")
def test_policy_removed_from_group_denied_after_the_cache_ttl(case, request, deployment):
    """policy:removed-from-group — allowed while the group cache lasts (10 s in production), denied after it."""
    deployment.configure(api_key_groups="automation")
    people = deployment.people
    verdict(request, key_answer(deployment, people.gina), "ok", attack=False, backend=None)
    people.remove_group_member(people.gina.id)
    try:
        verdict(request, outcome_becomes(deployment, people.gina, "guard"), "guard", attack=True)
    finally:
        people.add_group_member(people.gina.id)
        outcome_becomes(deployment, people.gina, "ok")


# =============================================================================================
# Route-table contract: every (method, route) of the running app answers alice's key (denied
# by default) with the guard's 403, unless it is listed here with the reason it is exempt.
# Exempt routes are never sent anything. A route a new release adds fails until reviewed.
# =============================================================================================
NOT_EXEMPT = None  # in an exemption map: from this release on the route is guarded, or not served
EXEMPT = {
    "/openapi.json": "FastAPI schema, public",
    "/docs": "FastAPI docs page, public",
    "/docs/oauth2-redirect": "FastAPI docs helper, public",
    "/health": "health probe, no authentication",
    "/health/db": "health probe, no authentication",
    "/ready": {"0.6": NOT_EXEMPT, "0.8": "readiness probe, no authentication"},
    "/api/config": "public client configuration (optional session, never a key)",
    "/api/version": "public",
    "/api/changelog": "public",
    "/manifest.json": "web app manifest, public",
    "/opensearch.xml": "public",
    "/ollama/": "Ollama status probe, no authentication",
    "/ollama/api/version": {"0.6": "Ollama version, no authentication", "0.12": NOT_EXEMPT},
    "/ollama/api/version/{url_idx}": {"0.6": "Ollama version, no authentication", "0.12": NOT_EXEMPT},
    "/api/v1/retrieval/": {"0.6": "retrieval settings, no authentication", "0.10": NOT_EXEMPT},
    "/api/v1/retrieval/ef/{text}": {
        "0.6": "ENV=dev only: embeds text with NO authentication, a call to the embedding backend (README)",
        "0.12": NOT_EXEMPT,
    },
    "/api/v1/memories/ef": {"0.6": "embedding self-test, no authentication", "0.8": NOT_EXEMPT},
    "/api/v1/auths/signin": "password sign-in: state-changing, authenticates no key",
    "/api/v1/auths/signup": "sign-up: state-changing, authenticates no key",
    "/api/v1/auths/ldap": "LDAP sign-in",
    "/api/v1/auths/signout": "clears cookies",
    "/api/v1/auths/oauth/{provider}/token/exchange": {"0.6": NOT_EXEMPT, "0.8": "OAuth token exchange, no key"},
    **{
        f"/api/v1/auths/mfa/{step}": {"0.6": NOT_EXEMPT, "0.12": "MFA step of a password sign-in"}
        for step in ("challenge", "enroll/start", "enroll/confirm", "verify", "recover")
    },
    "/api/v1/channels/webhooks/{webhook_id}/{token}": {
        "0.6": NOT_EXEMPT,
        "0.8": "webhook authenticated by its own token",
    },
    "/api/v1/chats/share/{share_id}": {
        "0.6": NOT_EXEMPT,
        "0.12": "optional sign-in: a denied key is treated as anonymous",
    },
    "/oauth/{provider}/login": "OAuth redirect",
    "/oauth/{provider}/callback": "OAuth redirect",
    "/oauth/{provider}/login/callback": {"0.6": NOT_EXEMPT, "0.8": "OAuth redirect"},
    "/oauth/clients/{client_id}/callback": {"0.6": NOT_EXEMPT, "0.8": "OAuth redirect"},
    "/oauth/backchannel-logout": {"0.6": NOT_EXEMPT, "0.10": "OAuth logout notification"},
}
# Mounts (static files, socket.io, the web app) and websocket routes: socket.io and the two 0.12
# websockets (/api/v1/audio/realtime, terminals) authenticate a session JWT in the first message
# (get_verified_user_by_token), never an API key, and have no HTTP methods to probe.

LIST_ROUTES = (
    "import json, open_webui.main as m\n"
    "print('ROUTES=' + json.dumps([[r.path, sorted(getattr(r, 'methods', None) or [])] for r in m.app.routes]))"
)


ROUTE_TABLES: dict[str, list] = {}  # per release: reading one imports the whole app (seconds)


def read_routes(server) -> list:
    """(path, methods) of this release's app, imported in its own venv with the server's settings."""
    result = subprocess.run(
        [str(venv_dir(server.version) / "bin" / "python"), "-c", LIST_ROUTES],
        env={**server.env(), "FROM_INIT_PY": "true"},
        cwd=server.data_dir,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("ROUTES="))
    return json.loads(line.removeprefix("ROUTES="))


def app_routes(deployment) -> list:
    server = deployment.server
    if server.version not in ROUTE_TABLES:
        ROUTE_TABLES[server.version] = read_routes(server)
    return ROUTE_TABLES[server.version]


def exempt_here(deployment) -> dict:
    """The exemptions that apply to this release: path -> reason."""
    here = {path: on_release(deployment, reason) for path, reason in EXEMPT.items()}
    return {path: reason for path, reason in here.items() if reason is not NOT_EXEMPT}


@named("routes:every-route-guarded-or-exempt")
def test_route_table_contract(case, request, deployment):
    """routes:every-route-guarded-or-exempt"""
    deployment.configure()
    routes = app_routes(deployment)
    exempt = exempt_here(deployment)
    headers = bearer(deployment.people.alice.api_key)
    before, probed, unguarded = deployment.backend.calls, 0, {}
    for path, methods in routes:
        if not methods or path in exempt:
            continue
        target = re.sub(r"\{[^}]+\}", "x", path)
        for method in methods:
            if method == "HEAD":
                continue  # HEAD shares the GET route; method:head-* rows cover it
            body = {} if method in ("POST", "PUT", "PATCH") else None
            answer = send(deployment, method, target, headers, body, settle=0)
            probed += 1
            if answer.outcome != "guard":
                unguarded[f"{method} {path}"] = f"{answer.status} {answer.text[:80]}"
    time.sleep(BACKEND_SETTLE_SECONDS)
    assert probed > 250, "the route table was read"
    assert unguarded == {}, "routes neither guarded nor exempt (review, then guard or list in EXEMPT)"
    assert deployment.backend.calls == before


@named("routes:exempt-list-has-no-stale-entries")
def test_route_table_exempt_list_is_current(case, deployment):
    """routes:exempt-list-has-no-stale-entries — every exemption names a route this release serves."""
    paths = {path for path, _ in app_routes(deployment)}
    assert sorted(set(exempt_here(deployment)) - paths) == []


# A path that looks like it carries a model: the guard applies model lists to the routes in its
# MODEL_ROUTES and trims the listings in MODEL_LISTINGS; every other such route of the running app
# must be reviewed here, with the reason it names no model a key could be refused. A model route a
# new release adds fails until it is added to the guard or reviewed.
MODEL_LOOKING = re.compile(
    r"completions|/chat(/|$)|embed|generate|responses|messages?(/|$)|tasks|compact|^/openai/|^/ollama/"
)
NOT_MODEL_ROUTES = {
    "/api/tasks": "lists the caller's running tasks",
    "/api/tasks/stop/{task_id}": "stops a task",
    "/api/tasks/chat/{chat_id}": "lists a chat's tasks",
    "/api/tasks/chat/{chat_id:path}": "lists a chat's tasks",
    "/api/tasks/chat/{chat_id:path}/stop": "stops a chat's tasks",
    "/api/v1/tasks/config": "task settings (admin)",
    "/api/v1/tasks/config/update": "task settings (admin)",
    "/api/v1/tasks/active/chats": "which chats have running tasks",
    "/api/v1/analytics/messages": "usage statistics (admin)",
    "/api/v1/retrieval/embedding": "embedding settings (admin)",
    "/api/v1/retrieval/embedding/update": "embedding settings (admin)",
    "/api/v1/chats/{id}/messages/{message_id}": "edits a stored message",
    "/api/v1/chats/{id}/messages/{message_id}/event": "stores a message event",
    "/api/v1/channels/{id}/messages": "reads channel messages",
    "/api/v1/channels/{id}/messages/pinned": "reads channel messages",
    "/api/v1/channels/{id}/messages/{message_id}": "reads a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/data": "reads a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/thread": "reads a thread",
    "/api/v1/channels/{id}/messages/{message_id}/delete": "deletes a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/pin": "pins a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/reactions/add": "reacts to a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/reactions/remove": "reacts to a channel message",
    "/api/v1/channels/{id}/messages/{message_id}/update": "edits a channel message",
    "/api/v1/notes/{id}/chat": "links a note to a chat",
    "/ollama/": "Ollama status probe",
    "/ollama/config": "Ollama settings (admin)",
    "/ollama/config/update": "Ollama settings (admin)",
    "/ollama/verify": "checks an Ollama connection (admin)",
    "/ollama/api/version": "Ollama version",
    "/ollama/api/version/{url_idx}": "Ollama version",
    "/ollama/api/ps": "lists loaded models",
    "/ollama/api/show": "describes a model, no inference",
    "/ollama/api/unload": "model management (admin)",
    **{
        f"/ollama/api/{verb}{idx}": "model management (admin)"
        for verb in ("pull", "push", "create", "copy", "delete")
        for idx in ("", "/{url_idx}")
    },
    **{
        f"/ollama/models/{verb}{idx}": "model files (admin)"
        for verb in ("download", "upload")
        for idx in ("", "/{url_idx}")
    },
    "/openai/config": "OpenAI settings (admin)",
    "/openai/config/update": "OpenAI settings (admin)",
    "/openai/verify": "checks an OpenAI connection (admin)",
    **{
        f"/openai/models/{{url_idx}}/{verb}": "model management on a connection (admin)"
        for verb in ("catalog", "download", "download/status/{job_id}", "load", "sse", "unload")
    },
}


def unreviewed_model_routes(paths: set) -> list[str]:
    known = set(GUARD.READ_ROUTES) | GUARD.MODEL_LISTINGS | set(NOT_MODEL_ROUTES)
    return sorted(path for path in paths if MODEL_LOOKING.search(path) and path not in known)


@named("routes:every-model-route-known")
def test_every_model_looking_route_is_a_guard_model_route_or_reviewed(case, deployment):
    """routes:every-model-route-known — a new release's model route fails until the guard or a reviewer knows it."""
    assert [path for path in NOT_MODEL_ROUTES if not MODEL_LOOKING.search(path)] == [], "reviewed for nothing"
    assert sorted(set(NOT_MODEL_ROUTES) & (set(GUARD.READ_ROUTES) | GUARD.MODEL_LISTINGS)) == [], (
        "the guard knows it now"
    )
    assert unreviewed_model_routes({path for path, methods in app_routes(deployment) if methods}) == []


# =============================================================================================
# Faults.
# =============================================================================================
def store_valves(deployment, valves: dict) -> None:
    """Write valves behind Open WebUI's back (no API call, so no worker drops its cache): seen within the TTL."""
    with database(deployment) as db:
        db.execute("UPDATE function SET valves = ? WHERE id = ?", (json.dumps(valves), FUNCTION_ID))
    deployment.valves = ""  # the harness must rewrite them next time
    deployment.wait_for_policy()


def new_error_lines(deployment, before: int, count: int) -> list[str]:
    """The guard's ERROR lines written since `before`, once there are at least `count` of them."""

    def enough():
        lines = guard_error_lines(deployment)[before:]
        return lines if len(lines) >= count else None

    return wait_for(enough, f"{count} guard_error line(s) in {deployment.server.log_path}")


@named("fault:invalid-stored-valves")
def test_fault_invalid_stored_valves(case, request, deployment):
    """fault:invalid-stored-valves — keys (the admin's too) fail closed, one ERROR line for the cause; sessions chat."""
    deployment.configure()
    people = deployment.people
    before = len(guard_error_lines(deployment))
    store_valves(deployment, DEFAULT_VALVES | {"api_key_roles": "admins"})
    try:
        denied = [
            key_answer(deployment, people.admin),
            send(deployment, "POST", "/api/chat/completions", bearer(people.admin.api_key), CHAT_BODY),
            send(deployment, "POST", PROVIDER, bearer(people.alice.api_key), CHAT_BODY),
        ]
        for answer in denied:
            verdict(request, answer, "guard-error", attack=True)
            assert answer.guard_header == "fail-closed"
        chat = send(deployment, "POST", "/api/chat/completions", bearer(people.alice.jwt), CHAT_BODY)
        verdict(request, chat, "ok", attack=False, backend=True)
        new = new_error_lines(deployment, before, 1)
        # One ERROR per cause (a minute): every key request fails closed, the log says why once.
        assert len(new) == 1 and "api_key_roles" in new[0], new
    finally:
        store_valves(deployment, DEFAULT_VALVES)
    verdict(request, key_answer(deployment, people.admin), "ok", attack=False, backend=None)


@named("fault:group-lookup-fails")
def test_fault_group_lookup_failing(case, request, deployment):
    """fault:group-lookup-fails — the membership table is gone: keys fail closed with one ERROR line each,
    sessions keep working on routes that do not need groups."""
    deployment.configure()
    fay = add_account(deployment, "fay", role="admin")  # a fresh user: no cached groups
    table = deployment.server.members_table
    before = len(guard_error_lines(deployment))
    with database(deployment) as db:
        db.execute(f"ALTER TABLE {table} RENAME TO broken_for_test")
    try:
        denied = key_answer(deployment, fay)
        verdict(request, denied, "guard-error", attack=True)
        session = send(deployment, "GET", "/api/v1/chats/", bearer(fay.jwt))
        verdict(request, session, "ok", attack=False)
        new = new_error_lines(deployment, before, 1)
        assert len(new) == 1 and "OperationalError" in new[0], new
    finally:
        with database(deployment) as db:
            db.execute(f"ALTER TABLE broken_for_test RENAME TO {table}")
    verdict(request, key_answer(deployment, fay), "ok", attack=False, backend=None)


@named("fault:function-fails-to-load")
def test_fault_function_fails_to_load(case, request, deployment, capsys):
    """fault:function-fails-to-load — Open WebUI switches it off; `install.py status` says so and exits 1."""
    deployment.configure()
    with database(deployment) as db:
        (content,) = db.execute("SELECT content FROM function WHERE id = ?", (FUNCTION_ID,)).fetchone()
        db.execute("UPDATE function SET content = ? WHERE id = ?", (content + "\nthis is not python(\n", FUNCTION_ID))
    try:
        deployment.server.call("GET", "/api/models", deployment.people.admin.jwt)  # Open WebUI tries to load it
        capsys.readouterr()
        assert deployment.installer("status") == 1
        out = capsys.readouterr().out
        assert "verdict: NOT OK - function is not active" in out, out
    finally:
        deployment.valves = ""
        deployment.configure()  # install.py rewrites the content and switches it back on
    capsys.readouterr()
    assert deployment.installer("status") == 0
    alice = deployment.people.alice
    verdict(request, send(deployment, "POST", PROVIDER, bearer(alice.api_key), CHAT_BODY), "guard", attack=True)


def grant_user_api_keys(deployment) -> None:
    """What Bootstrap does on 0.9+; ENABLE_PERSISTENT_CONFIG=false drops it on every restart."""
    server, admin = deployment.server, deployment.people.admin
    perms = server.ok("GET", "/api/v1/users/default/permissions", admin.jwt)
    perms.setdefault("features", {})["api_keys"] = True
    server.ok("POST", "/api/v1/users/default/permissions", admin.jwt, json=perms)


@named("fault:restart")
def test_fault_restart_mid_suite(case, request, deployment, capsys):
    """fault:restart — after a restart the guard is armed by the documented model listing, and stays right."""
    deployment.configure()
    deployment.server.restart()
    capsys.readouterr()
    assert deployment.installer("status", key=deployment.people.admin.api_key) == 1
    assert "route guard: NOT armed" in capsys.readouterr().out
    deployment.server.ok("GET", "/api/models", deployment.people.admin.jwt)  # the documented arming
    if deployment.server.key_permission:  # the harness runs without persistent config: grant users keys again
        grant_user_api_keys(deployment)
    alice = deployment.people.alice
    verdict(request, send(deployment, "POST", PROVIDER, bearer(alice.api_key), CHAT_BODY), "guard", attack=True)
    verdict(
        request,
        send(deployment, "POST", PROVIDER, bearer(deployment.people.admin.api_key), CHAT_BODY),
        "ok",
        attack=False,
        backend=True,
    )


# Two complete policies that both deny alice on /api/models, for different reasons; a valve set
# made of half of each (roles of P2, endpoints of P1) would ALLOW her there.
P1 = {"api_key_roles": "admin"}
P2 = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "/api/v1/models"}
NOT_ADMITTED = "API keys are not enabled for role 'user'"
NOT_THIS_PATH = "may not call /api/models"
DISCRIMINATES = "alice /api/v1/models"  # the probe whose answer tells the two policies apart


def classify(probe: str, answer) -> set:
    """Which of the two policies an answer is consistent with."""
    if probe == "alice /api/models":
        return ({"P1"} if NOT_ADMITTED in answer.detail else set()) | (
            {"P2"} if NOT_THIS_PATH in answer.detail else set()
        )
    if probe == "alice /api/v1/models":
        return {"P1"} if NOT_ADMITTED in answer.detail else ({"P2"} if answer.outcome == "ok" else set())
    return {"P1", "P2"} if answer.outcome == "ok" else set()  # admin: allowed by both


@named("fault:valve-flips-under-traffic")
def test_fault_valve_changes_under_concurrent_traffic(case, deployment):
    """fault:valve-flips-under-traffic — every answer matches one complete policy; no 5xx."""
    deployment.configure()
    people, folder = deployment.people, deployment.server.data_dir.parent
    files = {}
    for name, policy in (("P1", P1), ("P2", P2)):
        files[name] = folder / f"valves-{name}.json"
        files[name].write_text(json.dumps(DEFAULT_VALVES | policy))
    probes = [
        ("alice /api/models", people.alice, "/api/models"),
        ("alice /api/v1/models", people.alice, "/api/v1/models"),
        ("admin /api/v1/models", people.admin, "/api/v1/models"),
    ]
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def traffic(name, account, target):
        while not stop.is_set():
            answer = send(deployment, "GET", target, bearer(account.api_key), settle=0)
            with lock:
                answers.append((name, answer))

    threads = [threading.Thread(target=traffic, args=probe) for probe in probes for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for name in ("P2", "P1", "P2", "P1"):
            assert deployment.installer("install", "--valves", str(files[name])) == 0
            mark = len(answers)
            wait_for(
                lambda name=name, mark=mark: any(
                    classify(probe, answer) == {name} for probe, answer in answers[mark:] if probe == DISCRIMINATES
                ),
                f"{name} observed under traffic",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        deployment.valves = ""
        deployment.configure()
    wrong = [f"{name}: {answer}" for name, answer in answers if not classify(name, answer)]
    assert wrong == [], wrong[:5]
    assert all(answer.status < 500 for _, answer in answers)
    seen = {policy for name, answer in answers if name == "alice /api/v1/models" for policy in classify(name, answer)}
    assert seen == {"P1", "P2"}, f"both policies observed in {len(answers)} answers"


# =============================================================================================
# Leaks: runs last in this module for each server; the harness scans the whole log again when
# the server stops (conftest.start_deployment), so nothing written later escapes either.
# =============================================================================================
@named("leaks:no-secret-in-server-log")
def test_leaks_no_credential_in_the_server_log(case, deployment):
    """leaks:no-secret-in-server-log — the secret part of every key and session token used: zero hits."""
    assert log_text(deployment), "the server log exists and is not empty"
    assert leaked(deployment) == []


@named("leaks:fingerprint-only")
def test_leaks_alice_key_tail_only_as_fingerprint(case, deployment):
    """leaks:fingerprint-only — denials were logged with `sk-…` + the last 4, never more of the key."""
    key = deployment.people.alice.api_key
    text = log_text(deployment)
    assert f"key=sk-…{key[-4:]}" in text
    assert key[3:11] not in text
