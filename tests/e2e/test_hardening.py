"""Hardening (issue 18), on every pinned Open WebUI release: one class of attack per block.

    dos        a crafted body never stalls the worker: answered in bounded time while /health answers
    workspace  a workspace model is judged by the model core calls (its base), whoever made it: a
               model an admin made can be edited by a group granted write access
    fanout     one counted request buys one model call: message_ids targets are refused, or judged
    lifecycle  a second copy of the guard (inactive, deleted, active and permissive) or a Tool upload
               never disarms it: the strictest active copy wins
    urlkey     a real key pasted into a URL reaches the log only as its fingerprint
    audit      request fields cannot forge log lines; repeated refusals are logged once per minute
    indirect   automations, tool-call resume and image edits: the model they will call is judged, or
               refused where it comes from stored data and a model list applies
    defaults   the default user endpoint list reads models and chats, and changes no model

Each case is a named row or a named test, pinning the exact outcome (see `attacks.py`), the guard's
detail where it refuses, and the exact models the counting backend was asked for. A refusal that
was served, or a forbidden model the backend was asked for, is recorded as a bypass for the summary
line (conftest.py). The allowed glob is `other-*` (the backend serves other-model); the forbidden
model is test-model. Accounts that a rate limit counts are fresh ones (attacks.add_account).
"""

import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import requests

from .attacks import BACKEND_SETTLE_SECONDS as SETTLE
from .attacks import BYPASSES, Answer, add_account, bearer, log_text, on_release, send
from .conftest import DEFAULT_VALVES, FUNCTION_ID, GUARD, start_deployment, wait_for
from .provision import VERSIONS
from .routes import CHAT_BODY

ALLOWED, FORBIDDEN = "other-model", "test-model"
CHAT = "/api/chat/completions"
PROVIDER = "/openai/chat/completions"  # a model route that runs no filters
CHANNEL_POST = "/api/v1/channels/x/messages/post"
PREFIX = "API Key Guard: API keys of role 'user' "
BASE = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"}
LISTED = BASE | {"api_key_allowed_models_user": "other-*"}
COUNTED = LISTED | {"api_key_rate_limit_user": "5/minute"}  # a model list and a limit: both at stake
USERS_ON_DEFAULTS = {"api_key_roles": "admin,user"}  # alice admitted on the default user endpoint list
JUNK = "sk-anything"
BODY = {**CHAT_BODY, "model": ALLOWED}


def endpoint_denied(path: str) -> str:
    return f"{PREFIX}may not call {path} (api_key_allowed_endpoints_user)"


def model_denied(model: str) -> str:
    return f"{PREFIX}may not use model '{model}' (api_key_allowed_models_user)"


def behind_denied(model: str, how: str) -> str:
    return f"{PREFIX}may not use model '{model}', {how} (api_key_allowed_models_user)"


def base_of(wrapper: str) -> str:
    return f"the base model of workspace model '{wrapper}'"


def fan_out_denied(count: int) -> str:
    return (
        f"{PREFIX}get one model call per request, and this request asks for {count} "
        "(message_ids targets or model mentions; api_key_rate_limit_user)"
    )


def unreadable(problem: str) -> str:
    return (
        f"{PREFIX}may only use the models in api_key_allowed_models_user, and the model of this request "
        f"cannot be checked: {problem}"
    )


# --- one exchange, pinned -------------------------------------------------------------------
@dataclass(frozen=True)
class Exchange:
    answer: Answer
    models: list  # the model of every POST the backend served meanwhile
    seconds: float


def ask(deployment, method: str, target: str, headers: list | None = None, body=None, settle=SETTLE) -> Exchange:
    mark, start = deployment.backend.posts, time.monotonic()
    answer = send(deployment, method, target, headers, body, settle=settle)
    seconds = time.monotonic() - start
    return Exchange(answer, deployment.backend.models_since(mark), seconds)


def pin(request, exchange: Exchange, expected: str, served: list | tuple = (), detail: str | None = None) -> None:
    """The exact outcome, the guard's detail (when given) and the exact models the backend served.

    Expecting a refusal and getting data or a backend call, or the backend serving the forbidden
    model where the row does not name it, is a bypass."""
    answer, served = exchange.answer, list(served)
    refused = expected != "ok"
    if (refused and answer.breaks_invariant) or (FORBIDDEN in exchange.models and FORBIDDEN not in served):
        BYPASSES.append(request.node.name)
    got = (answer.outcome, answer.detail if detail is not None else None, exchange.models)
    assert got == (expected, detail, served), str(answer)


def named(case_id: str):
    return pytest.mark.parametrize("case", [pytest.param(case_id, id=case_id)])


def cache_seconds(deployment) -> float:
    """How long the guard in this server trusts what it read of a model, a group or its own state."""
    test_value = deployment.server.env().get("API_KEY_GUARD_TEST_CACHE_SECONDS")
    return float(test_value) if test_value else GUARD.MODEL_TTL_SECONDS


def outlive_caches(deployment, since: float) -> None:
    """A model row written at `since` is what the guard reads once its cache lifetime has passed."""
    until = since + cache_seconds(deployment)
    wait_for(
        lambda: time.monotonic() >= until, "the guard's model cache lifetime", timeout=until - time.monotonic() + 5
    )


# =============================================================================================
# dos: the body of a key request is read before core checks the key, but parsed only after core
# accepted it, linearly and within MAX_MODEL_BODY_BYTES. Before the fix a 48 KB run of `<@M:`
# under a junk key froze the worker 10+ s. Each attack runs in a thread while /health is polled;
# the bounds are generous (the machine is shared), never tight timings.
# =============================================================================================
HEALTH_SECONDS = 5.0
ATTACK_SECONDS = 30.0
MIB = 2**20


def mentions(size: int) -> dict:
    return {"content": "<@M:" * (size // 4)}


def nested_json(size: int) -> bytes:
    return b"[" * (size // 2) + b"]" * (size // 2)


def big_chat(size: int) -> dict:
    return {**BODY, "messages": [{"role": "user", "content": "<@M:" * (size // 4)}]}


def under_load(deployment, attack: Callable[[], Exchange]) -> tuple[Exchange, float]:
    """(the attack's exchange, the slowest /health answer while it was in flight, at least one probe)."""
    done: dict = {}

    def run():
        try:
            done["exchange"] = attack()
        except Exception as exc:  # reported below, in the test's thread
            done["error"] = exc

    thread = threading.Thread(target=run, name="hardening-attack", daemon=True)
    deadline = time.monotonic() + ATTACK_SECONDS
    thread.start()
    slowest, probes = 0.0, 0
    while (thread.is_alive() or probes == 0) and time.monotonic() < deadline:
        start = time.monotonic()
        try:
            status = requests.get(deployment.server.url + "/health", timeout=HEALTH_SECONDS).status_code
        except requests.Timeout as exc:
            raise AssertionError(f"/health did not answer within {HEALTH_SECONDS:g} s during the attack") from exc
        assert status == 200, f"/health answered {status} during the attack"
        slowest, probes = max(slowest, time.monotonic() - start), probes + 1
        time.sleep(0.05)  # a poll interval, not a wait for state
    thread.join(max(deadline - time.monotonic(), 0))
    assert not thread.is_alive(), f"the attack was not answered within {ATTACK_SECONDS:g} s"
    if "error" in done:
        raise done["error"]
    return done["exchange"], slowest


def bounded(request, deployment, exchange_and_health, expected, served=(), detail=None) -> None:
    exchange, slowest = exchange_and_health
    pin(request, exchange, expected, served, detail)
    assert exchange.seconds < ATTACK_SECONDS and slowest < HEALTH_SECONDS, (exchange.seconds, slowest)


# A junk key: core finds no such key and refuses before any handler; the guard never judges it.
DOS_UNAUTHENTICATED = [
    pytest.param(CHANNEL_POST, mentions(48 * 1024), "core-401", id="dos:junk-key-mentions-48k"),
    pytest.param(CHANNEL_POST, mentions(8 * MIB), "core-401", id="dos:junk-key-mentions-8mib"),
    pytest.param(CHAT, big_chat(8 * MIB), "core-401", id="dos:junk-key-chat-8mib"),
]


@pytest.mark.parametrize(("target", "body", "expected"), DOS_UNAUTHENTICATED)
def test_dos_junk_key_crafted_body(request, deployment, target, body, expected):
    deployment.configure(**COUNTED)  # a model list applies: the guard reads key requests' bodies
    attack = lambda: ask(deployment, "POST", target, bearer(JUNK), body)  # noqa: E731
    bounded(request, deployment, under_load(deployment, attack), on_release(deployment, expected))


# An admitted user key under a model list: the body is judged, in bounded time, or served.
TOO_MANY_MENTIONS = fan_out_denied(GUARD.MAX_MENTIONS + 1)  # each mention is a model call: counted first
DOS_AUTHENTICATED = [
    # No message needs more than 1000 model mentions: counted at C speed, refused where a list applies.
    pytest.param(CHANNEL_POST, mentions(6 * MIB), "guard", (), TOO_MANY_MENTIONS, id="dos:key-mentions-6mib"),
    pytest.param(
        CHANNEL_POST,
        {"content": "<@M:test-model|" * (6 * MIB // 15) + ">"},
        "guard",
        (),
        TOO_MANY_MENTIONS,
        id="dos:key-mention-maze-6mib",
    ),
    # A few mentions in 6 MiB of text: the one mentioned model is judged.
    pytest.param(
        CHANNEL_POST,
        {"content": "x" * (6 * MIB) + "<@M:test-model|T>"},
        "guard",
        (),
        model_denied(FORBIDDEN),
        id="dos:key-mention-after-6mib",
    ),
    # FastAPI parses a route's JSON body before its dependencies: core refuses it before any key lookup.
    pytest.param(CHAT, nested_json(4 * MIB), "core-400", (), None, id="dos:key-nested-json-4mib"),
    pytest.param(
        CHAT,
        big_chat(9 * MIB),
        "guard",
        (),
        unreadable("the request body is larger than 8 MiB"),
        id="dos:key-chat-over-the-limit-9mib",
    ),
    pytest.param(CHAT, big_chat(6 * MIB), "ok", [ALLOWED], None, id="dos-allowed:key-chat-6mib-served"),
]


@pytest.mark.parametrize(("target", "body", "expected", "served", "detail"), DOS_AUTHENTICATED)
def test_dos_admitted_key_crafted_body(request, deployment, target, body, expected, served, detail):
    deployment.configure(**COUNTED)
    key = add_account(deployment, "dos").api_key
    attack = lambda: ask(deployment, "POST", target, bearer(key), body)  # noqa: E731
    bounded(request, deployment, under_load(deployment, attack), on_release(deployment, expected), served, detail)


# =============================================================================================
# workspace: a workspace model is a name over a base model, and core calls the base. Every one is
# judged by its base too, whoever made it (else any name the list admits could wrap any model, and
# an admin's model can be rewritten by a group granted write access to it).
# =============================================================================================
def default_permissions(deployment) -> dict:
    return deployment.server.ok("GET", "/api/v1/users/default/permissions", deployment.people.admin.jwt)


@contextmanager
def users_may_create_models(deployment) -> Iterator[None]:
    """workspace.models for every user (core's own permission; admins always have it), restored after."""
    server, admin = deployment.server, deployment.people.admin
    perms = default_permissions(deployment)
    before = (perms.get("workspace") or {}).get("models", False)
    perms.setdefault("workspace", {})["models"] = True
    server.ok("POST", "/api/v1/users/default/permissions", admin.jwt, json=perms)
    try:
        yield
    finally:
        perms = default_permissions(deployment)
        perms.setdefault("workspace", {})["models"] = before
        server.ok("POST", "/api/v1/users/default/permissions", admin.jwt, json=perms)


def create_model(deployment, owner, model_id: str, base: str) -> Answer:
    """POST /api/v1/models/create with the owner's session: the same form on every release."""
    form = {"id": model_id, "name": model_id, "base_model_id": base, "meta": {}, "params": {}}
    return send(deployment, "POST", "/api/v1/models/create", bearer(owner.jwt), form, settle=0)


def delete_model(deployment, model_id: str) -> None:
    """0.6: DELETE ?id=; 0.8 on: POST {id}. A row core refused to create is simply not there."""
    admin = deployment.people.admin
    if deployment.server.at_least("0.8.0"):
        deployment.server.call("POST", "/api/v1/models/model/delete", admin.jwt, json={"id": model_id})
    else:
        deployment.server.call("DELETE", f"/api/v1/models/model/delete?id={model_id}", admin.jwt)


def refresh_models(deployment) -> None:
    """Core's MODELS is rebuilt when something lists models; the chat pipeline reads it."""
    deployment.server.ok("GET", "/api/models", deployment.people.admin.jwt)


@contextmanager
def workspace_models(deployment, owner_name: str, chain: list) -> Iterator[list]:
    """Create (id, base) rows in order as `owner_name`; yield core's answers; delete them all after."""
    owner = getattr(deployment.people, owner_name)
    answers = []
    with users_may_create_models(deployment):
        try:
            for model_id, base in chain:
                answers.append(create_model(deployment, owner, model_id, base))
            refresh_models(deployment)
            outlive_caches(deployment, time.monotonic())
            yield answers
        finally:
            for model_id, _ in reversed(chain):
                delete_model(deployment, model_id)
            refresh_models(deployment)
            outlive_caches(deployment, time.monotonic())


WORKSPACE = [
    pytest.param(
        "alice",
        [("other-wrap-u1", FORBIDDEN)],
        CHAT,
        "other-wrap-u1",
        "guard",
        (),
        behind_denied(FORBIDDEN, base_of("other-wrap-u1")),
        id="workspace:user-wrapper-chat",
    ),
    pytest.param(
        "alice",
        [("other-wrap-u2", FORBIDDEN)],
        PROVIDER,
        "other-wrap-u2",
        "guard",
        (),
        behind_denied(FORBIDDEN, base_of("other-wrap-u2")),
        id="workspace:user-wrapper-provider",
    ),
    pytest.param(
        "alice",
        [("other-wrap-u3", FORBIDDEN), ("other-wrap-u4", "other-wrap-u3")],
        CHAT,
        "other-wrap-u4",
        "guard",
        (),
        behind_denied(FORBIDDEN, base_of("other-wrap-u3")),
        id="workspace:user-wrapper-of-a-wrapper",
    ),
    pytest.param(
        "alice",
        [("other-wrap-u5", ALLOWED)],
        CHAT,
        "other-wrap-u5",
        "ok",
        [ALLOWED],
        None,
        id="workspace-allowed:user-wrapper-of-a-listed-model",
    ),
    pytest.param(
        "admin",
        [("other-wrap-a1", FORBIDDEN)],
        CHAT,
        "other-wrap-a1",
        "guard",
        (),
        behind_denied(FORBIDDEN, base_of("other-wrap-a1")),
        id="workspace:admin-wrapper-chat",
    ),
    pytest.param(
        "admin",
        [("other-wrap-a2", FORBIDDEN)],
        PROVIDER,
        "other-wrap-a2",
        "guard",
        (),
        behind_denied(FORBIDDEN, base_of("other-wrap-a2")),
        id="workspace:admin-wrapper-provider",
    ),
]


@pytest.mark.parametrize(("owner", "chain", "target", "model", "expected", "served", "detail"), WORKSPACE)
def test_workspace_model_judged_by_the_model_core_calls(
    request, deployment, owner, chain, target, model, expected, served, detail
):
    deployment.configure(**LISTED)
    with workspace_models(deployment, owner, chain) as created:
        assert [a.outcome for a in created] == ["ok"] * len(chain), [str(a) for a in created]
        answer = ask(deployment, "POST", target, bearer(deployment.people.alice.api_key), {**BODY, "model": model})
        pin(request, answer, expected, served, detail)


# A user's workspace model whose id IS a provider model id: core lists the provider model, and its
# routers swap in the row's base. 0.6-0.10 let a user create it; 0.12 refuses non-admins.
SHADOW_CREATED = {"0.6": "ok", "0.12": "core-401"}
SHADOW = [
    pytest.param(
        CHAT,
        {"0.6": "guard", "0.12": "ok"},
        {"0.6": (), "0.12": [ALLOWED]},
        {"0.6": behind_denied(FORBIDDEN, base_of(ALLOWED)), "0.12": None},
        id="workspace:user-shadow-of-a-provider-model-chat",
    ),
    pytest.param(
        PROVIDER,
        {"0.6": "guard", "0.12": "ok"},
        {"0.6": (), "0.12": [ALLOWED]},
        {"0.6": behind_denied(FORBIDDEN, base_of(ALLOWED)), "0.12": None},
        id="workspace:user-shadow-of-a-provider-model-provider",
    ),
]


@pytest.mark.parametrize(("target", "expected", "served", "detail"), SHADOW)
def test_workspace_shadow_of_a_provider_model(request, deployment, target, expected, served, detail):
    deployment.configure(**LISTED)
    with workspace_models(deployment, "alice", [(ALLOWED, FORBIDDEN)]) as (created,):
        assert created.outcome == on_release(deployment, SHADOW_CREATED), str(created)
        answer = ask(deployment, "POST", target, bearer(deployment.people.alice.api_key), BODY)
        pin(
            request,
            answer,
            on_release(deployment, expected),
            on_release(deployment, served),
            on_release(deployment, detail),
        )


# =============================================================================================
# fanout: with chat_id and session_id, 0.10+ runs one model call per message_ids entry, from one
# request that passed the checks once. The guard refuses more than one target wherever a limit or a
# model list is at stake, on every release, and judges the one target it admits.
# =============================================================================================
def fan_out(entries) -> dict:
    return {**BODY, "chat_id": "local:hardening", "session_id": "hardening-session", "id": "m0", "message_ids": entries}


def targets(*models: str) -> list:
    return [{"model_id": m, "message_id": f"m{i + 1}"} for i, m in enumerate(models)]


FANOUT = [
    pytest.param(fan_out(targets(*[ALLOWED] * 12)), "guard", fan_out_denied(12), id="fanout:twelve-entries"),
    pytest.param(
        fan_out({f"other-{i}": f"m{i + 1}" for i in range(12)}), "guard", fan_out_denied(12), id="fanout:legacy-dict"
    ),
    pytest.param(fan_out(targets(ALLOWED, ALLOWED)), "guard", fan_out_denied(2), id="fanout:two-entries"),
    pytest.param(
        fan_out(targets(FORBIDDEN)),
        "guard",
        behind_denied(FORBIDDEN, "named in message_ids"),
        id="fanout:one-entry-names-the-forbidden-model",
    ),
    pytest.param(
        fan_out(targets(*[ALLOWED] * 65)),
        "guard",
        fan_out_denied(65),
        id="fanout:too-many-to-read",
    ),
    pytest.param(
        fan_out([{"message_id": "m1"}]),
        "guard",
        unreadable("a message_ids entry names no model, or one too long to check"),
        id="fanout:entry-without-a-model",
    ),
]


@pytest.mark.parametrize(("body", "expected", "detail"), FANOUT)
def test_fanout_refused_before_any_model_call(request, deployment, body, expected, detail):
    deployment.configure(**COUNTED)
    key = add_account(deployment, "fan").api_key
    pin(request, ask(deployment, "POST", CHAT, bearer(key), body), expected, (), detail)


# Core's audit middleware (AUDIT_LOG_LEVEL other than NONE) authenticates every request a second time
# up to 0.10, and on 0.12 after a refusal: each request must still count once against the limit.
@pytest.fixture(scope="module", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def audited(request, tmp_path_factory):
    version = request.param
    root = tmp_path_factory.mktemp(f"audited-{version}")
    return start_deployment(version, root, request, AUDIT_LOG_LEVEL="METADATA")


def test_fanout_one_request_counts_once_when_core_authenticates_it_twice(request, audited):
    audited.configure(**BASE, api_key_rate_limit_user="5/minute")
    key = add_account(audited, "audited").api_key
    answers = [ask(audited, "POST", PROVIDER, bearer(key), BODY) for _ in range(6)]
    outcomes = [(a.answer.status, len(a.models)) for a in answers]
    if any(status == 200 for status, _ in outcomes[5:]):
        BYPASSES.append(request.node.name)
    assert outcomes == [(200, 1)] * 5 + [(429, 0)], outcomes


# 0.6 wants a non-admin's chat_id stored (local: is no exception there) and answers 400; 0.8 runs
# the one call in place, 0.10+ answer at once and make the call in a task.
ONE_TARGET = {"0.6": "core-400", "0.8": "ok"}


@named("fanout-allowed:one-listed-entry-one-call")
def test_fanout_one_listed_target_is_one_call(case, request, deployment):
    """fanout-allowed:one-listed-entry-one-call — one entry naming the listed model: one call, to it."""
    deployment.configure(**COUNTED)
    key = add_account(deployment, "fan").api_key
    expected, mark = on_release(deployment, ONE_TARGET), deployment.backend.posts
    answer = send(deployment, "POST", CHAT, bearer(key), fan_out(targets(ALLOWED)))
    if answer.outcome == "ok":
        wait_for(lambda: deployment.backend.posts > mark, "the fan-out's model call")
        time.sleep(0.5)  # a second call cannot be waited for (a negative): a generous settle
    served = [ALLOWED] if expected == "ok" else []
    pin(request, Exchange(answer, deployment.backend.models_since(mark), 0.0), expected, served)


# =============================================================================================
# lifecycle: the hooks are installed once per process; every active copy judges with its own
# valves and the strictest answer wins, so a clone, a trial install or a Tool never disarms.
# =============================================================================================
COPY_ID, TOOL_ID = f"{FUNCTION_ID}_copy", f"{FUNCTION_ID}_tool"
LIFECYCLE = {
    "api_key_roles": "admin,user",
    "api_key_allowed_endpoints_user": f"{CHAT},{PROVIDER},GET /api/models",
    "api_key_allowed_models_user": "other-*",
}
PERMISSIVE = DEFAULT_VALVES | BASE | {"api_key_allowed_models_user": "*"}
SEVERAL_ACTIVE = "copies are active"


def stored_guard(deployment) -> dict:
    return deployment.server.ok("GET", f"/api/v1/functions/id/{FUNCTION_ID}", deployment.people.admin.jwt)


def create_copy(deployment, kind: str = "functions", copy_id: str = COPY_ID) -> Answer:
    """The installed guard's own content under another id, as a Function or a Tool (admin session)."""
    stored = stored_guard(deployment)
    meta = {"description": stored["meta"].get("description") or "copy", "manifest": {}}
    form = {"id": copy_id, "name": copy_id, "content": stored["content"], "meta": meta}
    return send(deployment, "POST", f"/api/v1/{kind}/create", bearer(deployment.people.admin.jwt), form, settle=0)


def delete_copy(deployment, kind: str = "functions", copy_id: str = COPY_ID) -> None:
    deployment.server.call("DELETE", f"/api/v1/{kind}/id/{copy_id}/delete", deployment.people.admin.jwt)


@contextmanager
def guard_copy(deployment, kind: str = "functions", copy_id: str = COPY_ID) -> Iterator[Answer]:
    try:
        yield create_copy(deployment, kind, copy_id)
    finally:
        delete_copy(deployment, kind, copy_id)
        deployment.wait_for_policy()  # one copy judges again


def still_judged(request, deployment) -> None:
    """Alice's key under LIFECYCLE: refused off its endpoints and on the forbidden model, served on a listed one."""
    key = bearer(deployment.people.alice.api_key)
    pin(request, ask(deployment, "GET", "/api/v1/chats/", key), "guard", (), endpoint_denied("/api/v1/chats/"))
    pin(request, ask(deployment, "POST", PROVIDER, key, CHAT_BODY), "guard", (), model_denied(FORBIDDEN))
    pin(request, ask(deployment, "POST", PROVIDER, key, BODY), "ok", [ALLOWED])


def several_active_lines(deployment) -> list[str]:
    return [line for line in log_text(deployment).splitlines() if "ERROR" in line and SEVERAL_ACTIVE in line]


@named("lifecycle:inactive-copy")
def test_lifecycle_inactive_copy_changes_nothing(case, request, deployment):
    """lifecycle:inactive-copy — loading a second copy (created inactive) hands the hooks its code, not its say."""
    deployment.configure(**LIFECYCLE)
    with guard_copy(deployment) as created:
        assert created.outcome == "ok", str(created)
        still_judged(request, deployment)


@named("lifecycle:deleted-copy")
def test_lifecycle_deleted_copy_changes_nothing(case, request, deployment):
    """lifecycle:deleted-copy — the copy whose code the hooks run is deleted: the installed guard still judges."""
    deployment.configure(**LIFECYCLE)
    with guard_copy(deployment) as created:
        assert created.outcome == "ok", str(created)
        delete_copy(deployment)
        deployment.wait_for_policy()
        still_judged(request, deployment)


@named("lifecycle:active-permissive-copy")
def test_lifecycle_active_permissive_copy_strictest_wins(case, request, deployment):
    """lifecycle:active-permissive-copy — an active copy that admits everything: the installed guard's refusal
    still wins, and the server log says once, as an ERROR, that several copies are active."""
    deployment.configure(**LIFECYCLE)
    admin = deployment.people.admin
    with guard_copy(deployment) as created:
        assert created.outcome == "ok", str(created)
        deployment.server.ok("POST", f"/api/v1/functions/id/{COPY_ID}/valves/update", admin.jwt, json=PERMISSIVE)
        before = len(several_active_lines(deployment))
        deployment.server.ok("POST", f"/api/v1/functions/id/{COPY_ID}/toggle", admin.jwt)
        wait_for(lambda: "," in (deployment.policy_in_force() or ""), "both copies judging")
        still_judged(request, deployment)
        still_judged(request, deployment)
        lines = wait_for(lambda: several_active_lines(deployment)[before:], "the several-copies ERROR line")
        assert len(lines) == 1 and f"{FUNCTION_ID}, {COPY_ID}" in lines[0], lines


# Open WebUI loads a Tool's module to find its Tools class; the guard's module code runs and arms
# nothing (a Tool is no installed function), and the file defines no Tools, so core refuses it.
TOOL_CREATED = "core-400"


@named("lifecycle:uploaded-as-tool")
def test_lifecycle_tool_upload_changes_nothing(case, request, deployment):
    """lifecycle:uploaded-as-tool — the same file uploaded as a Tool: core refuses it; the guard still judges."""
    deployment.configure(**LIFECYCLE)
    with guard_copy(deployment, "tools", TOOL_ID) as created:
        assert created.outcome == on_release(deployment, TOOL_CREATED), str(created)
        still_judged(request, deployment)


@named("lifecycle:rate-limit-survives-a-copy-loading")
def test_lifecycle_rate_limit_survives_a_copy_loading(case, request, deployment):
    """lifecycle:rate-limit-survives-a-copy-loading — a key at its limit stays limited when an admin loads a
    second copy: the counters belong to the process, not to the copy whose code runs."""
    deployment.configure(**LIFECYCLE, api_key_rate_limit_user="5/minute")
    key = bearer(add_account(deployment, "rat").api_key)
    for _ in range(5):
        pin(request, ask(deployment, "POST", PROVIDER, key, BODY), "ok", [ALLOWED])
    pin(request, ask(deployment, "POST", PROVIDER, key, BODY), "core-429", ())
    with guard_copy(deployment) as created:
        assert created.outcome == "ok", str(created)
        pin(request, ask(deployment, "POST", PROVIDER, key, BODY), "core-429", ())


# =============================================================================================
# urlkey: core takes no key from a URL, but people paste them there and uvicorn's access line
# prints the path and query string. The guard rewrites them to the fingerprint before anything
# runs; uvicorn then percent-encodes the path, so the line is read decoded.
# =============================================================================================
URLKEY = [
    pytest.param("POST", f"{CHAT}?api_key={{key}}", False, BODY, "core-401", id="urlkey:query-api-key"),
    pytest.param("GET", "/api/models?token={key}", False, None, "core-401", id="urlkey:query-token"),
    pytest.param("GET", "/api/v1/files/{key}", False, None, "core-401", id="urlkey:path-segment"),
    pytest.param("GET", "/api/models?a=1&k=%73k-{tail}&b=2", False, None, "core-401", id="urlkey:percent-encoded"),
    pytest.param("GET", "/api/models?api_key={key}", True, None, "ok", id="urlkey-allowed:query-and-bearer"),
]


def access_lines(text: str, path: str) -> list[str]:
    return [line for line in text.splitlines() if "HTTP/1.1" in line and path in line]


@pytest.mark.parametrize(("method", "target", "with_bearer", "body", "expected"), URLKEY)
def test_urlkey_real_key_in_the_url_is_logged_as_its_fingerprint(
    request, deployment, method, target, with_bearer, body, expected
):
    deployment.configure(**USERS_ON_DEFAULTS)
    key = deployment.people.alice.api_key
    shown = f"sk-...{key[-4:]}"  # as a URL shows it: plain ASCII (the guard's url_fingerprint)
    target = target.replace("{key}", key).replace("{tail}", key[3:])
    start = len(log_text(deployment))
    answer = ask(deployment, method, target, bearer(key) if with_bearer else [], body)
    pin(request, answer, expected, [ALLOWED] if expected == "ok" and body else ())
    path = urllib.parse.urlsplit(target).path.split("sk-")[0]
    lines = wait_for(lambda: access_lines(log_text(deployment)[start:], path), f"the access line of {path}")
    assert any(shown in line for line in lines), lines
    assert key[3:] not in log_text(deployment), "the key's secret part is in the server log"


# =============================================================================================
# audit: every field of a deny line but the verdict words comes from the request. Control
# characters are escaped, so no field forges a line; a refusal repeats at most once per user and
# reason per minute. Fresh accounts: earlier refusals of alice are still throttled.
# =============================================================================================
def deny_lines(deployment, account, reason: str) -> list[str]:
    wanted = f"reason={reason} key=sk-…{account.api_key[-4:]} user={account.id} "
    return [line for line in log_text(deployment).splitlines() if "api_key_guard deny" in line and wanted in line]


@named("audit:newline-in-path-escaped")
def test_audit_newline_in_the_path_cannot_forge_a_line(case, request, deployment):
    """audit:newline-in-path-escaped — /api/v1/chats/%0aFORGED: the deny line shows \\n; no line starts FORGED."""
    deployment.configure(**USERS_ON_DEFAULTS)
    eve = add_account(deployment, "eve")
    exchange = ask(deployment, "GET", "/api/v1/chats/%0aFORGED", bearer(eve.api_key))
    pin(request, exchange, "guard", (), endpoint_denied("/api/v1/chats/\nFORGED"))
    (line,) = wait_for(lambda: deny_lines(deployment, eve, GUARD.REASON_ENDPOINT), "eve's deny line")
    assert "path=/api/v1/chats/\\nFORGED model=-" in line, line
    assert [text for text in log_text(deployment).splitlines() if text.startswith("FORGED")] == []


@named("audit:forty-denials-one-line")
def test_audit_repeated_denials_are_logged_once(case, request, deployment):
    """audit:forty-denials-one-line — 40 identical refusals of one user and reason: one deny line; a refusal
    for another reason is a line of its own."""
    deployment.configure(**USERS_ON_DEFAULTS)
    rex = add_account(deployment, "rex")
    for _ in range(40):
        exchange = ask(deployment, "GET", "/api/v1/chats/", bearer(rex.api_key), settle=0)
        pin(request, exchange, "guard", (), endpoint_denied("/api/v1/chats/"))
    wait_for(lambda: deny_lines(deployment, rex, GUARD.REASON_ENDPOINT), "rex's deny line")
    deployment.configure(**USERS_ON_DEFAULTS, api_key_allowed_models_user="other-*")
    other = ask(deployment, "POST", CHAT, bearer(rex.api_key), CHAT_BODY)
    pin(request, other, "guard", (), model_denied(FORBIDDEN))
    wait_for(lambda: deny_lines(deployment, rex, GUARD.REASON_MODEL), "rex's model deny line")
    assert len(deny_lines(deployment, rex, GUARD.REASON_ENDPOINT)) == 1
    assert len(deny_lines(deployment, rex, GUARD.REASON_MODEL)) == 1


# =============================================================================================
# indirect: routes that reach a model core finds elsewhere than in the body's `model`: an
# automation stores the model it calls later with no key in sight, a tool-call resume and an
# automation run call a stored model, an image edit names its own.
# =============================================================================================
STORED = "this route calls the model stored with the chat or automation, which cannot be checked"
AUTOMATION = {"name": "nightly", "data": {"prompt": "ping", "model_id": FORBIDDEN, "rrule": "FREQ=DAILY"}}
INDIRECT = [
    pytest.param(
        "/api/v1/automations/create", AUTOMATION, (0, 10, 0), model_denied(FORBIDDEN), id="indirect:automation"
    ),
    pytest.param(
        "/api/v1/automations/a1/update",
        AUTOMATION,
        (0, 10, 0),
        model_denied(FORBIDDEN),
        id="indirect:automation-update",
    ),
    pytest.param("/api/v1/automations/a1/run", {}, (0, 10, 0), unreadable(STORED), id="indirect:automation-run"),
    pytest.param("/api/v1/chats/c1/messages/m1/resolve", {}, (0, 12, 0), unreadable(STORED), id="indirect:tool-resume"),
    pytest.param(
        "/api/v1/images/edit",
        {"model": FORBIDDEN, "prompt": "x", "image": "x"},
        (0, 8, 0),
        model_denied(FORBIDDEN),
        id="indirect:image-edit",
    ),
]


@pytest.mark.parametrize(("target", "body", "since", "detail"), INDIRECT)
def test_indirect_model_refused_where_a_list_applies(request, deployment, target, body, since, detail):
    if deployment.version < since:
        pytest.skip(f"{target} does not exist on Open WebUI {deployment.server.version}")
    deployment.configure(**LISTED)
    pin(request, ask(deployment, "POST", target, bearer(deployment.people.alice.api_key), body), "guard", (), detail)


# =============================================================================================
# defaults: the default user endpoint list is chat and reading the model list (GET), so an
# admitted user key creates or changes no model, whatever core's permissions say.
# =============================================================================================
DEFAULTS = [
    pytest.param(
        "POST",
        "/api/v1/models/create",
        {"id": "other-key-made", "name": "x", "base_model_id": FORBIDDEN, "meta": {}, "params": {}},
        "guard",
        endpoint_denied("/api/v1/models/create"),
        id="defaults:create-model",
    ),
    pytest.param(
        "POST",
        "/api/v1/models/model/update?id=other-key-made",
        {"id": "other-key-made", "name": "x", "base_model_id": FORBIDDEN, "meta": {}, "params": {}},
        "guard",
        endpoint_denied("/api/v1/models/model/update"),
        id="defaults:update-model",
    ),
    pytest.param("GET", "/api/v1/models", None, "ok", None, id="defaults-allowed:list-workspace-models"),
    pytest.param("GET", "/api/models", None, "ok", None, id="defaults-allowed:list-models"),
    pytest.param("POST", CHAT, BODY, "ok", None, id="defaults-allowed:chat"),
]


@pytest.mark.parametrize(("method", "target", "body", "expected", "detail"), DEFAULTS)
def test_defaults_user_list_reads_and_chats_only(request, deployment, method, target, body, expected, detail):
    deployment.configure(**USERS_ON_DEFAULTS)
    with users_may_create_models(deployment):
        exchange = ask(deployment, method, target, bearer(deployment.people.alice.api_key), body)
    pin(request, exchange, expected, [ALLOWED] if method == "POST" and expected == "ok" else (), detail)
