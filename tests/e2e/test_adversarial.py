"""Adversarial and fault suite (issue #7), version `attacks.SUITE_VERSION`, on both pinned releases.

Each case is a named row with its exact expected outcome (see `attacks.py` for the outcome words)
and whether the model backend may be called. Attack tables and allowed tables are kept apart:
in an attack row the key is one the policy denies, so the invariant is no 2xx and no backend
call; a row that breaks it is recorded as a bypass for the summary line printed at the end of
the run (`adversarial: N cases run, N passed, bypasses found = 0`).

Default valves (admin-only keys) unless a row says otherwise; alice is an ordinary user, gina a
member of the `automation` group. Rows whose outcome differs by release give a pair
(0.9+ outcome, 0.6 outcome).
"""

import json
import re
import subprocess
import threading
import time

import pytest

from .attacks import (
    FUNCTION_ID,
    add_account,
    bearer,
    database,
    fill_headers,
    for_version,
    guard_error_lines,
    log_text,
    send,
    set_role,
    verdict,
)
from .conftest import DEFAULT_VALVES, VALVES_SETTLE_SECONDS, leaked
from .provision import venv_dir
from .routes import CHAT_BODY

GROUPS_TTL_SECONDS = 10.0  # the guard's GROUPS_TTL_SECONDS
PROVIDER = "/openai/chat/completions"  # a model route that never runs filters
USERS_ON_CHAT = {"api_key_roles": "admin,user"}  # alice admitted, on the default user endpoint list
K, J, A, AJ = "{alice_key}", "{alice_jwt}", "{admin_key}", "{admin_jwt}"
JUNK = "sk-" + "0" * 32  # a throwaway key no account has


# =============================================================================================
# Credential transport and parsing. Target: POST /openai/chat/completions, default valves.
# Core's credential order (0.12): Authorization with scheme Bearer (any case), the `token`
# cookie, then any two-part Authorization value (`Basic sk-…`), then x-api-key. 0.6 reads only
# the first two. The guard judges the credential core authenticated, whatever carried it.
# =============================================================================================
TRANSPORT_ATTACKS = [
    pytest.param([("Authorization", f"Bearer {K}")], "guard", id="transport:bearer"),
    pytest.param([("authorization", f"bearer {K}")], "guard", id="transport:lower-case-header-and-scheme"),
    pytest.param([("Authorization", f"BEARER {K}")], "guard", id="transport:upper-case-scheme"),
    pytest.param([("Authorization", f"BeArEr {K}")], "guard", id="transport:mixed-case-scheme"),
    # FastAPI 0.136 (Open WebUI 0.12) strips the credential; 0.115 (0.6) keeps " sk-…", which no key matches.
    pytest.param([("Authorization", f"Bearer  {K}")], ("guard", "core-401"), id="transport:bearer-two-spaces"),
    pytest.param([("Authorization", f"Bearer\t{K}")], "core-401", id="transport:bearer-tab"),
    pytest.param([("Authorization", f"Bearer {K} ")], ("guard", "core-401"), id="transport:trailing-space"),
    pytest.param([("Authorization", f"Bearer {K} x")], "core-401", id="transport:bearer-three-parts"),
    pytest.param([("Authorization", f"Basic {K}")], ("guard", "core-401"), id="transport:basic-scheme"),
    pytest.param([("Authorization", f"Token {K}")], ("guard", "core-401"), id="transport:token-scheme"),
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
    pytest.param([("x-api-key", K)], ("guard", "core-401"), id="transport:custom-header-only"),
    pytest.param([("X-API-KEY", K)], ("guard", "core-401"), id="transport:custom-header-upper-case"),
    pytest.param([("x-api-key", f"Bearer {K}")], "core-401", id="transport:custom-header-with-scheme"),
    pytest.param(
        [("Authorization", f"Bearer {K}"), ("Cookie", f"token={J}")], "guard", id="order:key-bearer-jwt-cookie"
    ),
    pytest.param([("Authorization", f"Bearer {K}"), ("x-api-key", A)], "guard", id="order:key-bearer-admin-key-header"),
    pytest.param([("Cookie", f"token={K}"), ("x-api-key", A)], "guard", id="order:key-cookie-admin-key-header"),
    pytest.param(
        [("Authorization", f"Basic {K}"), ("x-api-key", J)], ("guard", "core-401"), id="order:key-basic-jwt-header"
    ),
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
    pytest.param([("x-api-key", A)], ("ok", "core-401"), id="transport-allowed:admin-key-custom-header"),
    pytest.param(
        [("Authorization", f"Bearer {A}"), ("Authorization", f"Bearer {K}")],
        "ok",
        id="order-allowed:admin-key-first-of-two-headers",
    ),
    pytest.param([("Authorization", f"Bearer {J}"), ("Cookie", f"token={K}")], "ok", id="order-allowed:jwt-bearer"),
    pytest.param([("Cookie", f"token={J}"), ("x-api-key", K)], "ok", id="order-allowed:jwt-cookie-key-header"),
    pytest.param([("Cookie", f"token={J}"), ("Authorization", f"Basic {K}")], "ok", id="order-allowed:jwt-cookie"),
    pytest.param([("Authorization", f"Basic {J}"), ("x-api-key", K)], ("ok", "core-401"), id="order-allowed:jwt-basic"),
]


def headers_for(deployment, headers: list) -> list:
    tail = deployment.people.alice.api_key[3:]
    return [(n, v.replace("{alice_key_tail}", tail) if isinstance(v, str) else v) for n, v in headers]


@pytest.mark.parametrize(("headers", "expected"), TRANSPORT_ATTACKS)
def test_transport_attack(request, deployment, headers, expected):
    deployment.configure()
    answer = send(deployment, "POST", PROVIDER, fill_headers(deployment, headers_for(deployment, headers)), CHAT_BODY)
    verdict(request, answer, for_version(deployment, expected), attack=True)


@pytest.mark.parametrize(("headers", "expected"), TRANSPORT_ALLOWED)
def test_transport_allowed(request, deployment, headers, expected):
    deployment.configure()
    answer = send(deployment, "POST", PROVIDER, fill_headers(deployment, headers), CHAT_BODY)
    expected = for_version(deployment, expected)
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
    pytest.param("GET", "/api/models?x=/openai/chat/completions", "ok", None, id="path-allowed:other-path-in-query"),
    # Prefixes admit the whole subtree: the default user entry /api/v1/models also admits the model
    # management API under it; only core's own permission check (workspace.models) refuses alice.
    pytest.param("POST", "/api/v1/models/create", "core-401", False, id="path-allowed:prefix-admits-model-management"),
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
    verdict(request, answer, for_version(deployment, expected), attack=True)


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
    verdict(request, answer, for_version(deployment, expected), attack=True)


def test_method_cors_preflight_is_answered_without_authentication(deployment):
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


def test_policy_blocked_admin_key_denied(request, deployment):
    """policy:blocked-admin (by e-mail, other case) — the admin's key is denied on every transport."""
    deployment.configure(api_key_blocked_users="ADMIN@Example.com")
    admin = deployment.people.admin
    verdict(request, key_answer(deployment, admin), "guard", attack=True)
    verdict(request, key_answer(deployment, admin, transport="cookie"), "guard", attack=True)
    assert "api_key_blocked_users" in key_answer(deployment, admin).detail


def test_policy_blocked_admin_session_still_works(request, deployment):
    """policy-allowed:blocked-admin-session — blocking concerns keys; the admin's session is untouched."""
    deployment.configure(api_key_blocked_users="admin@example.com")
    verdict(
        request,
        send(deployment, "GET", "/api/models", bearer(deployment.people.admin.jwt)),
        "ok",
        attack=False,
        backend=None,
    )


def test_policy_blocked_by_user_id(request, deployment):
    """policy:blocked-admin-by-id — the blocked list accepts user ids too."""
    admin = deployment.people.admin
    deployment.configure(api_key_blocked_users=admin.id)
    verdict(request, key_answer(deployment, admin), "guard", attack=True)


def test_policy_demoted_admin_denied_at_once(request, deployment):
    """policy:demoted-admin — the route guard reads the role core just loaded: no cache, no delay."""
    deployment.configure()
    dora = add_account(deployment, "dora", role="admin")
    verdict(request, key_answer(deployment, dora), "ok", attack=False, backend=None)
    set_role(deployment, dora, "user")
    verdict(request, key_answer(deployment, dora), "guard", attack=True)


def test_policy_promoted_user_allowed_at_once(request, deployment):
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


def test_policy_deleted_users_key_refused_by_core(request, deployment):
    """policy:deleted-user — core no longer finds the key (its own 401); the guard is never asked."""
    deployment.configure(**USERS_ON_CHAT)
    dan = add_account(deployment, "dan")
    verdict(request, key_answer(deployment, dan), "ok", attack=False, backend=None)
    deployment.server.ok("DELETE", f"/api/v1/users/{dan.id}", deployment.people.admin.jwt)
    verdict(request, key_answer(deployment, dan), "core-401", attack=True)


def test_policy_admitted_by_account(request, deployment):
    """policy-allowed:admitted-by-email — api_key_users admits alice, on the user endpoint list only."""
    deployment.configure(api_key_users="Alice@example.com")
    alice = deployment.people.alice
    verdict(request, key_answer(deployment, alice), "ok", attack=False, backend=None)
    verdict(request, send(deployment, "POST", PROVIDER, bearer(alice.api_key), CHAT_BODY), "guard", attack=True)


def test_policy_removed_from_group_denied_after_the_cache_ttl(request, deployment):
    """policy:removed-from-group — allowed while the 10 s group cache lasts, denied after it."""
    deployment.configure(api_key_groups="automation")
    people = deployment.people
    verdict(request, key_answer(deployment, people.gina), "ok", attack=False, backend=None)
    people.remove_group_member(people.gina.id)
    try:
        assert key_answer(deployment, people.gina).outcome in ("ok", "guard")  # within the TTL: either is fine
        time.sleep(GROUPS_TTL_SECONDS + 1)
        verdict(request, key_answer(deployment, people.gina), "guard", attack=True)
    finally:
        people.add_group_member(people.gina.id)


# =============================================================================================
# Route-table contract: every (method, route) of the running app answers alice's key (denied
# by default) with the guard's 403, unless it is listed here with the reason it is exempt.
# Exempt routes are never sent anything. A route a new release adds fails until reviewed.
# =============================================================================================
BOTH, V6, V12 = "both", "0.6", "0.12"
EXEMPT = {
    "/openapi.json": (BOTH, "FastAPI schema, public"),
    "/docs": (BOTH, "FastAPI docs page, public"),
    "/docs/oauth2-redirect": (BOTH, "FastAPI docs helper, public"),
    "/health": (BOTH, "health probe, no authentication"),
    "/health/db": (BOTH, "health probe, no authentication"),
    "/ready": (V12, "readiness probe, no authentication"),
    "/api/config": (BOTH, "public client configuration (optional session, never a key)"),
    "/api/version": (BOTH, "public"),
    "/api/changelog": (BOTH, "public"),
    "/manifest.json": (BOTH, "web app manifest, public"),
    "/opensearch.xml": (BOTH, "public"),
    "/ollama/": (BOTH, "Ollama status probe, no authentication"),
    "/ollama/api/version": (V6, "Ollama version, no authentication"),
    "/ollama/api/version/{url_idx}": (V6, "Ollama version, no authentication"),
    "/api/v1/retrieval/": (V6, "retrieval status, no authentication"),
    "/api/v1/retrieval/ef/{text}": (V6, "embeds text with NO authentication (core's own hole; README known limits)"),
    "/api/v1/memories/ef": (V6, "embedding self-test, no authentication"),
    "/api/v1/auths/signin": (BOTH, "password sign-in: state-changing, authenticates no key"),
    "/api/v1/auths/signup": (BOTH, "sign-up: state-changing, authenticates no key"),
    "/api/v1/auths/ldap": (BOTH, "LDAP sign-in"),
    "/api/v1/auths/signout": (BOTH, "clears cookies"),
    "/api/v1/auths/oauth/{provider}/token/exchange": (V12, "OAuth token exchange, no key"),
    "/api/v1/auths/mfa/challenge": (V12, "MFA step of a password sign-in"),
    "/api/v1/auths/mfa/enroll/start": (V12, "MFA step of a password sign-in"),
    "/api/v1/auths/mfa/enroll/confirm": (V12, "MFA step of a password sign-in"),
    "/api/v1/auths/mfa/verify": (V12, "MFA step of a password sign-in"),
    "/api/v1/auths/mfa/recover": (V12, "MFA step of a password sign-in"),
    "/api/v1/channels/webhooks/{webhook_id}/{token}": (V12, "webhook authenticated by its own token"),
    "/api/v1/chats/share/{share_id}": (V12, "optional sign-in: a denied key is treated as anonymous"),
    "/oauth/{provider}/login": (BOTH, "OAuth redirect"),
    "/oauth/{provider}/callback": (BOTH, "OAuth redirect"),
    "/oauth/{provider}/login/callback": (V12, "OAuth redirect"),
    "/oauth/clients/{client_id}/callback": (V12, "OAuth redirect"),
    "/oauth/backchannel-logout": (V12, "OAuth logout notification"),
}
# Mounts (static files, socket.io, the web app) and websocket routes: socket.io and the two 0.12
# websockets (/api/v1/audio/realtime, terminals) authenticate a session JWT in the first message
# (get_verified_user_by_token), never an API key, and have no HTTP methods to probe.

LIST_ROUTES = (
    "import json, open_webui.main as m\n"
    "print('ROUTES=' + json.dumps([[r.path, sorted(getattr(r, 'methods', None) or [])] for r in m.app.routes]))"
)


def app_routes(deployment) -> list:
    """(path, methods) of this release's app, imported in its own venv with the server's settings."""
    server = deployment.server
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


def exempt_here(deployment) -> dict:
    line = V12 if deployment.server.modern else V6
    return {path: reason for path, (where, reason) in EXEMPT.items() if where in (BOTH, line)}


def test_route_table_contract(request, deployment):
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
    time.sleep(0.5)
    assert probed > 300 if deployment.server.modern else probed > 250
    assert unguarded == {}, "routes neither guarded nor exempt (review, then guard or list in EXEMPT)"
    assert deployment.backend.calls == before


def test_route_table_exempt_list_is_current(deployment):
    """routes:exempt-list-has-no-stale-entries — every exemption names a route this release serves."""
    paths = {path for path, _ in app_routes(deployment)}
    assert sorted(set(exempt_here(deployment)) - paths) == []


# =============================================================================================
# Faults.
# =============================================================================================
def store_valves(deployment, valves: dict) -> None:
    with database(deployment) as db:
        db.execute("UPDATE function SET valves = ? WHERE id = ?", (json.dumps(valves), FUNCTION_ID))
    deployment.valves = ""  # the harness must rewrite them next time
    time.sleep(VALVES_SETTLE_SECONDS)


def test_fault_invalid_stored_valves(request, deployment):
    """fault:invalid-stored-valves — keys (the admin's too) fail closed, one ERROR line each; sessions chat."""
    deployment.configure()
    people = deployment.people
    store_valves(deployment, DEFAULT_VALVES | {"api_key_roles": "admins"})
    try:
        before = len(guard_error_lines(deployment))
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
        time.sleep(0.5)
        new = guard_error_lines(deployment)[before:]
        assert len(new) == len(denied), new
        assert all("api_key_roles" in line for line in new), new
    finally:
        store_valves(deployment, DEFAULT_VALVES)
    verdict(request, key_answer(deployment, people.admin), "ok", attack=False, backend=None)


def test_fault_group_lookup_failing(request, deployment):
    """fault:group-lookup-fails — the membership table is gone: keys fail closed with one ERROR line each,
    sessions keep working on routes that do not need groups."""
    deployment.configure()
    fay = add_account(deployment, "fay", role="admin")  # a fresh user: no cached groups
    table = "group_member" if deployment.server.modern else '"group"'
    before = len(guard_error_lines(deployment))
    with database(deployment) as db:
        db.execute(f"ALTER TABLE {table} RENAME TO broken_for_test")
    try:
        denied = key_answer(deployment, fay)
        verdict(request, denied, "guard-error", attack=True)
        session = send(deployment, "GET", "/api/v1/chats/", bearer(fay.jwt))
        verdict(request, session, "ok", attack=False)
        time.sleep(0.5)
        new = guard_error_lines(deployment)[before:]
        assert len(new) == 1 and "OperationalError" in new[0], new
    finally:
        with database(deployment) as db:
            db.execute(f"ALTER TABLE broken_for_test RENAME TO {table}")
    verdict(request, key_answer(deployment, fay), "ok", attack=False, backend=None)


def test_fault_function_fails_to_load(request, deployment, capsys):
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


def test_fault_restart_mid_suite(request, deployment, capsys):
    """fault:restart — after a restart the guard is armed by the documented model listing, and stays right."""
    deployment.configure()
    deployment.server.restart()
    capsys.readouterr()
    assert deployment.installer("status", key=deployment.people.admin.api_key) == 1
    assert "route guard: NOT armed" in capsys.readouterr().out
    deployment.server.ok("GET", "/api/models", deployment.people.admin.jwt)  # the documented arming
    if deployment.server.modern:  # the harness runs without persistent config: grant users keys again
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


def classify(probe: str, answer) -> set:
    """Which of the two policies an answer is consistent with."""
    if probe == "alice /api/models":
        return ({"P1"} if NOT_ADMITTED in answer.detail else set()) | (
            {"P2"} if NOT_THIS_PATH in answer.detail else set()
        )
    if probe == "alice /api/v1/models":
        return {"P1"} if NOT_ADMITTED in answer.detail else ({"P2"} if answer.outcome == "ok" else set())
    return {"P1", "P2"} if answer.outcome == "ok" else set()  # admin: allowed by both


def test_fault_valve_changes_under_concurrent_traffic(deployment):
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
            time.sleep(1.5)
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
def test_leaks_no_credential_in_the_server_log(deployment):
    """leaks:no-secret-in-server-log — the secret part of every key and session token used: zero hits."""
    assert log_text(deployment), "the server log exists and is not empty"
    assert leaked(deployment) == []


def test_leaks_alice_key_tail_only_as_fingerprint(deployment):
    """leaks:fingerprint-only — denials were logged with `sk-…` + the last 4, never more of the key."""
    key = deployment.people.alice.api_key
    text = log_text(deployment)
    assert f"key=sk-…{key[-4:]}" in text
    assert key[3:11] not in text
