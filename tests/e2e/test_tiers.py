"""Tiers, token quotas, key age and concurrency on real servers (issue 20), and the explain read-out.

One server per release for the whole module: two uvicorn workers sharing a real Redis (the quota and
the concurrency cap must hold across workers), SQLite (the key-age test ages a key in it). The
people, groups and one set of valves are made once; each test has users of its own, so no counter
of one test is seen by another. The counting backend reports 18 tokens per chat answer."""

import json
import time
from dataclasses import dataclass

import pytest

from tests.guard_loader import load_guard

from .attacks import add_account, database
from .backend import CHAT_USAGE, HOLD
from .conftest import FUNCTION_ID, start_deployment, wait_for
from .provision import VERSIONS
from .services import (
    STATE_TTL_SECONDS,
    WORKERS,
    HeldStream,
    Redis,
    Served,
    held_stream,
    model_calls,
    on_fresh_connection,
    per_worker,
    start_redis,
    until_every_worker,
    wait_until_every_worker_answers,
)

GUARD = load_guard()
EXPLAIN_PATH = f"/api/v1/functions/id/{FUNCTION_ID}/explain"
VALVES_PATH = f"/api/v1/functions/id/{FUNCTION_ID}/valves"
PREFIX = "API Key Guard: "
DIRECT = "/openai/chat/completions"  # a model route that runs no filters: the route guard alone judges it
PIPELINE = "/api/chat/completions"
LISTING = "/api/models"
TOKENS = CHAT_USAGE["total_tokens"]  # 18 per chat answer
QUOTA = 30  # tokens per day: admits a first (0 used) and a second answer (18 used), refuses at 36
DAY = 86400
OLD_KEY_DAYS = 40
MAX_KEY_AGE_DAYS = 30
KEY_TIMES_SINCE = (0, 6, 41)  # core's api_key table, with created_at

# The role tier of every non-admin key: what a group tier overrides.
ROLE = {
    "api_key_roles": "admin",  # users are admitted one by one (api_key_users): a tier admits nobody
    "api_key_allowed_endpoints_user": PIPELINE,
    "api_key_allowed_models_user": "*",
    "api_key_rate_limit_user": "",
    "api_key_token_quota_user": "1000/day",
    "api_key_max_concurrent_user": 0,
    "api_key_max_key_age_days_user": 0,
}
GROUPS = ("automation", "alpha", "beta", "quota", "single", "aged")
# who: (groups, admitted through api_key_users)
PEOPLE = {
    "member": (("automation",), True),
    "nonmember": ((), True),
    "duo": (("alpha", "beta"), True),
    "spender": (("quota",), True),
    "monitored": (("quota",), True),
    "overshooter": (("quota",), True),
    "unrecorded": (("quota",), True),
    "streamer": (("single",), True),
    "veteran": (("aged",), True),
    "rookie": (("aged",), True),
    "tina": (("automation",), True),
    "rolf": ((), True),
    "outsider": (("automation",), False),
}


def tiers(people: dict, version: tuple) -> dict:
    """api_key_tiers, in this order: beta is listed before alpha, duo's own entry last."""
    entries = {
        "group:automation": {"allowed_endpoints": DIRECT, "allowed_models": "other-model", "rate_limit": "2/minute"},
        "group:beta": {
            "allowed_endpoints": f"{DIRECT},GET /api/models",
            "max_concurrent": 2,
            "rate_limit": "1/minute",
        },
        "group:alpha": {"allowed_endpoints": DIRECT, "allowed_models": "test-model", "max_concurrent": 5},
        "group:quota": {"allowed_endpoints": DIRECT, "token_quota": f"{QUOTA}/day"},
        "group:single": {"allowed_endpoints": DIRECT, "max_concurrent": 1},
        f"user:{people['duo'].email}": {"rate_limit": "100/minute"},
    }
    if version >= KEY_TIMES_SINCE:
        entries["group:aged"] = {"allowed_endpoints": DIRECT, "max_key_age_days": MAX_KEY_AGE_DAYS}
    return entries


@dataclass
class Tiered:
    deployment: object  # conftest.Deployment
    redis: Redis
    people: dict  # name -> Account
    valves: dict

    @property
    def server(self):
        return self.deployment.server

    @property
    def version(self) -> tuple:
        return self.deployment.version


def add_members(deployment, group_id: str, user_ids: list[str]) -> None:
    server, admin = deployment.server, deployment.people.admin
    path = f"/api/v1/groups/id/{group_id}"
    if server.at_least("0.8.0"):
        server.ok("POST", f"{path}/users/add", admin.jwt, json={"user_ids": user_ids})
        return
    group = server.ok("GET", path, admin.jwt)  # 0.6.22: the whole member list is replaced
    members = sorted(set(group.get("user_ids") or []) | set(user_ids))
    body = {"name": group["name"], "description": group["description"], "user_ids": members}
    server.ok("POST", f"{path}/update", admin.jwt, json=body)


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def tiered(request, tmp_path_factory) -> Tiered:
    version = request.param
    root = tmp_path_factory.mktemp(f"tiers-{version}")
    redis = start_redis(root / "redis", request)
    env = {
        **redis.openwebui_env(),
        "UVICORN_WORKERS": str(WORKERS),
        "ENABLE_PERSISTENT_CONFIG": "true",
        "API_KEY_GUARD_TEST_CACHE_SECONDS": str(STATE_TTL_SECONDS),
    }
    deployment = start_deployment(version, root, request, install_guard=False, **env)
    wait_until_every_worker_answers(deployment.server)
    people = {name: add_account(deployment, name) for name in PEOPLE}
    admin = deployment.people.admin
    group_ids = {"automation": deployment.people.group_id}
    for name in GROUPS[1:]:
        body = {"name": name, "description": "issue 20 tiers"}
        group_ids[name] = deployment.server.ok("POST", "/api/v1/groups/create", admin.jwt, json=body)["id"]
    for group, group_id in group_ids.items():
        members = [people[name].id for name, (groups, _) in PEOPLE.items() if group in groups]
        add_members(deployment, group_id, members)
    admitted = ",".join(people[name].email for name, (_, listed) in PEOPLE.items() if listed)
    valves = {**ROLE, "api_key_users": admitted, "api_key_tiers": json.dumps(tiers(people, deployment.version))}
    deployment.configure(**valves)
    # Every worker has loaded the guard (a model listing arms a worker) before a test speaks for both.
    armed = until_every_worker(
        deployment.server,
        admin.api_key,
        [("GET", "/api/models", None)],
        lambda answers: any("x-api-key-guard" in s.headers for s in answers),
    )
    assert len(per_worker(armed)) == WORKERS, f"armed workers: {sorted(per_worker(armed))}"
    return Tiered(deployment, redis, people, valves)


def chat(model: str = "test-model", **more) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": False, **more}


def key_call(tiered: Tiered, who: str, method: str, path: str, body: dict | None = None, avoid=()) -> Served:
    token = tiered.people[who].api_key if who != "admin" else tiered.deployment.people.admin.api_key
    return on_fresh_connection(tiered.server, method, path, token, body, avoid=avoid)


def detail(served: Served) -> str:
    try:
        text = served.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


def explain(tiered: Tiered, who: str, method: str = "", path: str = "", model: str = "") -> dict:
    email = tiered.deployment.people.admin.email if who == "admin" else tiered.people[who].email
    params = {"user": email, "method": method, "path": path, "model": model}
    return tiered.server.ok("GET", EXPLAIN_PATH, tiered.deployment.people.admin.api_key, params=params)


def policy_items(served: Served) -> set[str]:
    return {item.strip() for item in served.headers.get("ratelimit-policy", "").split(",") if item.strip()}


def log_lines(tiered: Tiered, start: int, *words: str) -> list[str]:
    with open(tiered.server.log_path, "rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines() if all(word in line for word in words)]


# --- 1. a group tier overrides the role tier for its members, and only for them ---------------------
TIER = "api_key_tiers group:automation"
MEMBER_MODEL = f"API keys of role 'user' may not use model 'test-model' ({TIER} allowed_models)"
MEMBER_ROUTE = f"API keys of role 'user' may not call {PIPELINE} ({TIER} allowed_endpoints)"
NONMEMBER_ROUTE = f"API keys of role 'user' may not call {DIRECT} (api_key_allowed_endpoints_user)"
LIMITED = f"API keys of role 'user' are limited to 2 per minute ({TIER} rate_limit); retry in "
# probe, method, path, model; then (status, the tier's 2/minute announced, refusal) for each person, in order
OVERRIDES = [
    ("tier's route, tier's model", DIRECT, "other-model", (200, True, ""), (403, False, NONMEMBER_ROUTE)),
    ("tier's route, other model", DIRECT, "test-model", (403, False, MEMBER_MODEL), (403, False, NONMEMBER_ROUTE)),
    ("role's route", PIPELINE, "test-model", (403, False, MEMBER_ROUTE), (200, False, "")),
    ("tier's route, tier's model, 2nd", DIRECT, "other-model", (200, True, ""), (403, False, NONMEMBER_ROUTE)),
    ("tier's route, tier's model, 3rd", DIRECT, "other-model", (429, True, LIMITED), (403, False, NONMEMBER_ROUTE)),
    ("role's route, 2nd", PIPELINE, "test-model", (403, False, MEMBER_ROUTE), (200, False, "")),
    ("role's route, 3rd", PIPELINE, "test-model", (403, False, MEMBER_ROUTE), (200, False, "")),
]


def test_a_group_tier_overrides_the_roles_endpoints_models_and_limits_for_its_members_only(tiered):
    """member is in automation, nonmember is not; both are users admitted the same way."""
    seen, expected = {}, {}
    for label, path, model, member, nonmember in OVERRIDES:
        for who, wanted in (("member", member), ("nonmember", nonmember)):
            served = key_call(tiered, who, "POST", path, chat(model))
            said = detail(served).removeprefix(PREFIX)
            said = LIMITED if said.startswith(LIMITED) else said  # ends in the seconds to wait
            seen[(who, label)] = (served.status, '"minute";q=2;w=60' in policy_items(served), said)
            expected[(who, label)] = wanted
    assert seen == expected


# --- 2. a user in two groups: the documented precedence, field by field --------------------------
# The rule (README, api_key_tiers): per field the user's own entry wins, then the first LISTED group
# the user is in, then the role's valve. duo is in alpha and beta; beta is listed first; duo's own
# entry is listed last.
PRECEDENCE = [
    # field, value, where from, why
    pytest.param(
        "allowed_endpoints",
        f"{DIRECT},GET /api/models",
        "api_key_tiers group:beta allowed_endpoints",
        id="both-groups-set-it:first-listed-wins",
    ),
    pytest.param(
        "allowed_models", "test-model", "api_key_tiers group:alpha allowed_models", id="one-group-sets-it:that-group"
    ),
    pytest.param(
        "rate_limit", "100/minute", "api_key_tiers user:{duo} rate_limit", id="user-and-group-set-it:the-user-wins"
    ),
    pytest.param("token_quota", "1000/day", "api_key_token_quota_user", id="no-tier-sets-it:the-role-valve"),
    pytest.param(
        "max_concurrent", "2", "api_key_tiers group:beta max_concurrent", id="both-groups-set-it:first-listed-wins"
    ),
]
# What the server does with each of duo's fields, seen from outside.
SEEN_AS = {
    "allowed_endpoints": ("GET", LISTING, None, lambda s: s.status == 200),  # beta's list admits it, alpha's would not
    "allowed_models": ("POST", DIRECT, chat("other-model"), lambda s: "(api_key_tiers group:alpha" in detail(s)),
    "rate_limit": ("POST", DIRECT, chat(), lambda s: '"minute";q=100;w=60' in policy_items(s)),
    "token_quota": ("POST", DIRECT, chat(), lambda s: f'"tokens-day";q=1000;w={DAY}' in policy_items(s)),
    "max_concurrent": ("POST", DIRECT, chat(), lambda s: '"concurrent";q=2' in policy_items(s)),
}


@pytest.mark.parametrize(("field", "value", "source"), PRECEDENCE)
def test_a_user_in_two_groups_gets_each_field_by_the_documented_precedence(tiered, field, value, source):
    source = source.format(duo=tiered.people["duo"].email)
    told = explain(tiered, "duo")["tier"]["fields"][field]
    method, path, body, holds = SEEN_AS[field]
    served = key_call(tiered, "duo", method, path, body)
    assert (told, holds(served)) == ({"value": value, "from": source}, True), (
        served.status,
        served.headers,
        detail(served),
    )


# --- 3. a 30/day token quota across two workers sharing Redis ------------------------------------
def quota_key(tiered: Tiered, who: str, now: float) -> str:
    day = int(now // DAY * DAY)
    return f"open-webui:api_key_guard:tq:{{{tiered.people[who].id}}}:day:{day}"


def charged(tiered: Tiered, key: str) -> int:
    return int(tiered.redis.command("GET", key) or 0)


MIDNIGHT_MARGIN = 180.0  # seconds: longer than any test here, steering included


@pytest.fixture(autouse=True)
def clear_of_midnight():
    """A day quota's counter starts again at 00:00 UTC: a test that began before it and ended after it
    would see two days. Close to it, a test waits until the new day has begun."""
    if DAY - time.time() % DAY < MIDNIGHT_MARGIN:
        wait_for(lambda: time.time() % DAY < DAY / 2, "00:00 UTC to pass", timeout=MIDNIGHT_MARGIN + 10)


def spend(tiered: Tiered, who: str, workers_to_avoid=()) -> tuple[Served, int]:
    """One admitted chat answer on a worker not avoided, and the tokens charged once its answer ended."""
    key = quota_key(tiered, who, time.time())
    before = charged(tiered, key)
    served = key_call(tiered, who, "POST", DIRECT, chat(), avoid=workers_to_avoid)
    if served.status == 200:  # charged when the answer has ended: after the client read it, so wait
        wait_for(lambda: charged(tiered, key) > before, f"tokens of {who} charged in Redis")
    return served, charged(tiered, key)


def test_a_30_a_day_token_quota_admits_until_the_reported_tokens_reach_it_then_429_on_every_worker(tiered):
    backend = tiered.deployment.backend
    calls = model_calls(backend)
    first, after_first = spend(tiered, "spender")
    second, after_second = spend(tiered, "spender", workers_to_avoid={first.worker})  # the other worker
    asked = time.time()  # steering to every worker may take a while: Retry-After is judged against both ends
    refused = until_every_worker(
        tiered.server,
        tiered.people["spender"].api_key,
        [("POST", DIRECT, chat())],
        lambda answers: any(s.status == 429 for s in answers),
    )
    now = time.time()
    shape = refused[0]
    retry = int(shape.headers.get("retry-after", "0"))
    assert {
        "admitted": [(first.status, after_first), (second.status, after_second)],
        "admitted by both workers": first.worker != second.worker,
        "remaining told on the admitted": [
            next(i for i in s.headers["ratelimit"].split(", ") if i.startswith('"tokens-day"')).split(";")[1]
            for s in (first, second)
        ],
        "then": sorted({s.status for s in refused}),
        "refused by every worker": len(per_worker(refused)),
        "model calls": model_calls(backend) - calls,
        "tokens charged in Redis": charged(tiered, quota_key(tiered, "spender", now)),
        "retry-after until 00:00 UTC": DAY - now % DAY - 1 <= retry <= DAY - asked % DAY + 1,
        "ratelimit-policy": shape.headers.get("ratelimit-policy"),
        "ratelimit": shape.headers.get("ratelimit"),
        "detail": detail(shape),
    } == {
        "admitted": [(200, TOKENS), (200, 2 * TOKENS)],
        "admitted by both workers": True,
        "remaining told on the admitted": [f"r={QUOTA}", f"r={QUOTA - TOKENS}"],
        "then": [429],
        "refused by every worker": WORKERS,
        "model calls": 2,
        # the overshoot: checked before a request, charged after it; the second answer was admitted
        # with 18 of 30 used, so the day ends at 36, 6 over (at most one answer per request in flight)
        "tokens charged in Redis": 36,
        "retry-after until 00:00 UTC": True,
        "ratelimit-policy": f'"tokens-day";q={QUOTA};w={DAY}',
        "ratelimit": f'"tokens-day";r=0;t={retry}',
        "detail": f"{PREFIX}API keys of role 'user' may use {QUOTA} tokens per day (api_key_tiers group:quota "
        f"token_quota) and {2 * TOKENS} are used; the quota starts again in {retry} s",
    }, [(s.status, s.worker, s.headers.get("ratelimit")) for s in refused]


def test_in_monitor_mode_a_spent_quota_is_served_and_logged_would_limit(tiered):
    deployment = tiered.deployment
    deployment.configure(**tiered.valves, mode="monitor")
    try:
        spend(tiered, "monitored")
        spend(tiered, "monitored")
        start = tiered.server.log_path.stat().st_size
        served, used = spend(tiered, "monitored")  # 36 of 30 used: enforce mode would refuse it
    finally:
        deployment.configure(**tiered.valves)
    fingerprint = GUARD.fingerprint(tiered.people["monitored"].api_key)
    assert {
        "status": served.status,
        "used": used,
        "would-limit lines": len(
            log_lines(tiered, start, "api_key_guard would-limit ", "reason=token_quota", fingerprint)
        ),
    } == {"status": 200, "used": 3 * TOKENS, "would-limit lines": 1}


def test_the_overshoot_is_one_answer_per_request_in_flight_when_the_quota_runs_out(tiered):
    """18 of 30 used, then two streams in flight at once, one on each worker: both were admitted with
    room left, so both answers are charged: 54, 24 over, and the next request is refused."""
    backend = tiered.deployment.backend
    spend(tiered, "overshooter")
    key = quota_key(tiered, "overshooter", time.time())
    gate = backend.hold()
    try:
        first = hold(tiered, "overshooter")
        second = hold(tiered, "overshooter", avoid={first.worker})
    finally:
        gate.set()
    answers = [(s.response.status, b"[DONE]" in s.finish()) for s in (first, second)]
    wait_for(lambda: charged(tiered, key) == 3 * TOKENS, "both answers charged")
    after = key_call(tiered, "overshooter", "POST", DIRECT, chat())
    assert {
        "streams": answers,
        "on both workers": first.worker != second.worker,
        "charged": charged(tiered, key),
        "over the quota": charged(tiered, key) - QUOTA,
        "then": after.status,
    } == {
        "streams": [(200, True), (200, True)],
        "on both workers": True,
        "charged": 54,
        "over the quota": 24,
        "then": 429,
    }


def test_a_quota_is_charged_with_usage_accounting_off(tiered):
    deployment = tiered.deployment
    deployment.configure(**tiered.valves, usage_accounting=False)
    try:
        first, after_first = spend(tiered, "unrecorded")
        second, after_second = spend(tiered, "unrecorded")
        third = key_call(tiered, "unrecorded", "POST", DIRECT, chat())
    finally:
        deployment.configure(**tiered.valves)
    assert [(first.status, after_first), (second.status, after_second), third.status] == [
        (200, TOKENS),
        (200, 2 * TOKENS),
        429,
    ]


BACKGROUND = {"session_id": "s-1", "chat_id": "local:c-1", "id": "m-1"}  # core answers with a task id


def test_an_asynchronous_chat_is_refused_where_tokens_are_counted_and_reaches_no_model(tiered):
    """With session_id and chat_id core answers at once and runs the model in a task of its own, where
    no token could be charged: under a quota (the role's 1000/day) such a request is refused."""
    backend = tiered.deployment.backend
    calls = model_calls(backend)
    served = key_call(tiered, "nonmember", "POST", PIPELINE, chat(**BACKGROUND))
    assert (served.status, detail(served), model_calls(backend) - calls) == (
        403,
        PREFIX + "API keys of role 'user' have their tokens or requests in flight counted (api_key_token_quota_user), "
        "and this request makes a model answer after it ends (session_id: core answers at once and calls the "
        "model later, in a task), where the guard can count neither",
        0,
    )


# --- 4. a maximum key age ----------------------------------------------------------------------------
def test_a_key_older_than_the_maximum_age_is_refused_and_a_younger_one_served(tiered):
    if tiered.version < KEY_TIMES_SINCE:
        pytest.skip("no api_key table with creation times before 0.6.41: see the test below")
    created = int(time.time()) - OLD_KEY_DAYS * DAY
    with database(tiered.deployment) as db:
        changed = db.execute(
            "UPDATE api_key SET created_at = ? WHERE user_id = ?", (created, tiered.people["veteran"].id)
        ).rowcount
    calls = model_calls(tiered.deployment.backend)
    old, young = (key_call(tiered, who, "POST", DIRECT, chat()) for who in ("veteran", "rookie"))
    day = time.strftime("%Y-%m-%d", time.gmtime(created))
    assert {
        "rows aged": changed,
        "old": (old.status, detail(old)),
        "young": young.status,
        "model calls": model_calls(tiered.deployment.backend) - calls,
    } == {
        "rows aged": 1,
        "old": (
            403,
            f"{PREFIX}this API key was created on {day} ({OLD_KEY_DAYS} days ago) and keys of role 'user' may be "
            f"at most {MAX_KEY_AGE_DAYS} days old (api_key_tiers group:aged max_key_age_days): generate a new key "
            "under Settings > Account",
        ),
        "young": 200,
        "model calls": 1,
    }


@pytest.mark.parametrize(
    "valves",
    [
        pytest.param({"api_key_max_key_age_days_user": MAX_KEY_AGE_DAYS}, id="role-valve"),
        pytest.param(
            {"api_key_tiers": json.dumps({"group:aged": {"max_key_age_days": MAX_KEY_AGE_DAYS}})}, id="tier-entry"
        ),
    ],
)
def test_without_key_creation_times_a_maximum_key_age_is_refused_on_save(tiered, valves):
    if tiered.version >= KEY_TIMES_SINCE:
        pytest.skip("this release keeps key creation times: the valve is enforced (test above)")
    admin, server = tiered.deployment.people.admin, tiered.server
    before = server.ok("GET", VALVES_PATH, admin.jwt)
    response = server.call("POST", f"{VALVES_PATH}/update", admin.jwt, json={**before, **valves})
    valve = next(iter(valves))
    assert (response.status_code, valve in response.text, GUARD.KEY_TIMES_MISSING in response.text) == (
        400,
        True,
        True,
    ), response.text
    assert server.ok("GET", VALVES_PATH, admin.jwt) == before


# --- 5. a concurrency cap of 1 ---------------------------------------------------------------------
HELD = {"model": "test-model", "messages": [{"role": "user", "content": HOLD}], "stream": True}


def hold(tiered: Tiered, who: str, avoid=()) -> HeldStream:
    """A HOLD stream of `who` on DIRECT, on a worker not in `avoid`."""
    return held_stream(tiered.server, DIRECT, tiered.people[who].api_key, HELD, avoid)


def test_a_concurrency_cap_of_1_refuses_a_second_stream_on_the_other_worker_until_the_first_ends(tiered):
    server, backend, who = tiered.server, tiered.deployment.backend, "streamer"
    token = tiered.people[who].api_key
    lease_key = f"open-webui:api_key_guard:cc:{{{tiered.people[who].id}}}"
    gate = backend.hold()
    try:
        first = hold(tiered, who)
        in_flight = tiered.redis.command("ZCARD", lease_key)
        calls = model_calls(backend)
        second = on_fresh_connection(server, "POST", DIRECT, token, {**HELD, "messages": chat()["messages"]},
                                     avoid={first.worker})  # fmt: skip
        second_calls = model_calls(backend) - calls
    finally:
        gate.set()
    rest = first.finish()
    # The lease goes back once the first answer has ended on its worker: a new request is admitted then.
    again = wait_for(
        lambda: (s := key_call(tiered, who, "POST", DIRECT, chat())).status == 200 and s,
        "a request admitted once the first stream ended",
    )
    assert {
        "first": (first.response.status, b"data:" in first.first_chunk, b"[DONE]" in rest),
        "leases while it streamed": in_flight,
        "second": (second.status, second.worker != first.worker, second_calls),
        # with the role's token quota (api_key_token_quota_user), which the single tier leaves as it is
        "second ratelimit-policy": policy_items(second),
        "second ratelimit": second.headers.get("ratelimit", "").split(", ")[-1],
        "second retry-after": second.headers.get("retry-after"),
        "second detail": detail(second),
        "after the first ended": again.status,
        "leases after": wait_for(lambda: tiered.redis.command("ZCARD", lease_key) == 0, "leases given back"),
    } == {
        "first": (200, True, True),
        "leases while it streamed": 1,
        "second": (429, True, 0),
        "second ratelimit-policy": {f'"tokens-day";q=1000;w={DAY}', '"concurrent";q=1'},
        "second ratelimit": '"concurrent";r=0',
        "second retry-after": "1",
        "second detail": f"{PREFIX}API keys of role 'user' may have 1 request(s) in flight at once "
        "(api_key_tiers group:single max_concurrent); retry once one of them has finished",
        "after the first ended": 200,
        "leases after": True,
    }


# --- 6. explain agrees with what the server does -----------------------------------------------------
# who, method, path, model, the reason explain must give (and the server act on)
EXPLAINED = [
    ("tina", "POST", DIRECT, "other-model", "allowed"),
    ("tina", "POST", DIRECT, "test-model", "model_not_allowed"),
    ("tina", "POST", PIPELINE, "other-model", "endpoint_not_allowed"),
    ("tina", "GET", LISTING, "", "endpoint_not_allowed"),
    ("rolf", "POST", PIPELINE, "test-model", "allowed"),
    ("rolf", "POST", DIRECT, "test-model", "endpoint_not_allowed"),
    ("outsider", "POST", DIRECT, "other-model", "not_admitted"),  # in a tier's group, yet not admitted
    ("duo", "GET", LISTING, "", "allowed"),
    ("duo", "POST", DIRECT, "other-model", "model_not_allowed"),
    ("admin", "GET", LISTING, "", "allowed"),
    ("admin", "POST", DIRECT, "other-model", "allowed"),
    ("veteran", "POST", DIRECT, "test-model", "key_too_old"),  # from 0.6.41: aged by the test above
]


@pytest.mark.parametrize(
    ("who", "method", "path", "model", "reason"),
    EXPLAINED,
    ids=[f"{w}-{m}-{p}-{mo or 'none'}" for w, m, p, mo, _ in EXPLAINED],
)
def test_explain_agrees_with_what_the_server_does(tiered, who, method, path, model, reason):
    if who == "veteran":
        if tiered.version < KEY_TIMES_SINCE:
            pytest.skip("no key creation times before 0.6.41")
        with database(tiered.deployment) as db:  # old, whether or not the key-age test ran first
            db.execute(
                "UPDATE api_key SET created_at = ? WHERE user_id = ?",
                (int(time.time()) - OLD_KEY_DAYS * DAY, tiered.people["veteran"].id),
            )
    told = explain(tiered, who, method, path, model)
    calls = model_calls(tiered.deployment.backend)
    served = key_call(tiered, who, method, path, chat(model) if method == "POST" else None)
    called = model_calls(tiered.deployment.backend) - calls
    decision = told["decision"]
    says = (decision["reason"], decision["allowed"], decision["allowed"] or PREFIX + decision["message"])
    does = (reason, served.status == 200, served.status == 200 or detail(served))
    assert (says, called) == (does, int(served.status == 200 and method == "POST")), told


def test_explain_reads_out_the_tier_admission_and_counters(tiered):
    told = explain(tiered, "member")
    assert {
        "user": told["user"]["email"],
        "groups": told["groups"],
        "blocked": told["blocked"],
        "admitted_by": told["admitted_by"],
        "tier": told["tier"]["name"],
        "models": told["tier"]["fields"]["allowed_models"],
        "counters": told["counters"],
        "decision": told["decision"],
    } == {
        "user": tiered.people["member"].email,
        "groups": ["automation"],
        "blocked": False,
        "admitted_by": "this user (api_key_users)",
        "tier": "user+group:automation",
        "models": {"value": "other-model", "from": "api_key_tiers group:automation allowed_models"},
        "counters": "redis",
        "decision": None,
    }
