"""Hardening, as tables: what an attacker chooses (bodies, ids, URLs, log fields) and how it is judged."""

import pytest

from tests.guard_loader import load_guard

g = load_guard()
LONG_ID = "m" * (g.MAX_MODEL_ID_CHARS + 1)

MENTIONS = [
    pytest.param("hello", ([], ""), id="none"),
    pytest.param("<@M:gpt|GPT>", (["gpt"], ""), id="labelled"),
    pytest.param("<@M:gpt>", (["gpt"], ""), id="bare"),
    pytest.param("<@M:|x>", ([], ""), id="empty-id-is-no-mention"),
    pytest.param("<@M:gpt|>", (["gpt"], ""), id="empty-label-still-a-mention-on-0.8"),
    pytest.param("answer this <@M:gpt", (["gpt"], ""), id="unterminated-is-a-mention-on-0.8-and-0.10"),
    pytest.param("<@U:abc<@M:gpt>", (["gpt"], ""), id="inside-a-user-mention-still-found"),
    pytest.param("<@M:<@M:gpt>", (["<@M:gpt", "gpt"], ""), id="nested-starts-all-tried"),
    pytest.param("<@M:" * 1000 + ">", ([], "a model mention is longer than 256 characters"), id="crafted-maze"),
    pytest.param("<@M:" * 1001, ([], "the message holds more than 1000 model mentions"), id="too-many-mentions"),
    pytest.param("x>" + "<@M:" * 1000, ([], "a model mention is longer than 256 characters"), id="runs-to-the-end"),
    pytest.param("<@M:a><@M:b><@M:c>", (["a", "b"], ""), id="stops-at-two"),
    pytest.param(f"<@M:{LONG_ID}>", ([], "a model mention is longer than 256 characters"), id="id-too-long"),
    pytest.param("<@M:a|x|y>", (["a"], ""), id="bar-in-label"),
]


@pytest.mark.parametrize(("text", "expected"), MENTIONS)
def test_mentioned_models(text, expected):
    assert g.mentioned_models(text) == expected


BODIES = [
    pytest.param({"model": "m"}, g.ModelRequest(model="m"), id="plain"),
    pytest.param(
        {"model": "m", "message_ids": [{"model_id": "a", "message_id": "1"}, {"model_id": "b", "message_id": "2"}]},
        g.ModelRequest(model="m", targets=("a", "b"), calls=2),
        id="fan-out-list",
    ),
    pytest.param(
        {"model": "m", "message_ids": {"p": "1"}}, g.ModelRequest(model="m", targets=("p",), calls=1), id="legacy-dict"
    ),
    pytest.param(
        {"model": "m", "message_ids": "x"},
        g.ModelRequest(model="m", problem="message_ids is neither a list nor an object", calls=2),
        id="fan-out-odd",
    ),
    pytest.param(
        {"model": "m", "message_ids": [{"message_id": "1"}]},
        g.ModelRequest(model="m", problem="a message_ids entry names no model, or one too long to check"),
        id="fan-out-without-model",
    ),
    pytest.param(
        {"model": "m", "message_ids": [{"model_id": "a"}] * 65},
        g.ModelRequest(model="m", problem="message_ids has more than 64 entries", calls=65),
        id="fan-out-too-wide",
    ),
    pytest.param(
        {"model": LONG_ID}, g.ModelRequest(problem="the model id is longer than 256 characters"), id="id-too-long"
    ),
]


@pytest.mark.parametrize(("body", "expected"), BODIES)
def test_model_of(body, expected):
    assert g.model_of(body) == expected


LIMITED = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*", "api_key_rate_limit_user": "5/minute"}
LISTED = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*", "api_key_allowed_models_user": "cheap*"}
OPEN = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"}
PREMIUM_BEHIND = (("premium", "the base model of workspace model 'cheap-wrap'"),)
DECISIONS = [
    pytest.param(LIMITED, {"model": "cheap", "model_calls": 12}, g.REASON_FAN_OUT, id="fan-out-under-a-limit"),
    pytest.param(LISTED, {"model": "cheap", "model_calls": 2}, g.REASON_FAN_OUT, id="fan-out-under-a-model-list"),
    pytest.param(OPEN, {"model": "cheap", "model_calls": 12}, g.REASON_ALLOWED, id="fan-out-with-nothing-at-stake"),
    pytest.param(LISTED, {"model": "cheap-wrap", "resolved": PREMIUM_BEHIND}, g.REASON_MODEL_BEHIND, id="base"),
    pytest.param(LISTED, {"model": "cheap-wrap", "resolved": (("cheap", "x"),)}, g.REASON_ALLOWED, id="base-listed"),
    pytest.param(OPEN, {"model": "cheap-wrap", "resolved": PREMIUM_BEHIND}, g.REASON_ALLOWED, id="every-model"),
    pytest.param(
        OPEN | {"api_key_allowed_endpoints_user": g.DEFAULT_USER_ENDPOINTS},
        {"method": "POST", "path": "/api/v1/models/create"},
        g.REASON_ENDPOINT,
        id="default-list-creates-no-model",
    ),
]


@pytest.mark.parametrize(("valves", "facts", "reason"), DECISIONS)
def test_decide(valves, facts, reason):
    facts = g.Facts(**{"user_id": "u", "role": "user", "path": "/openai/chat/completions"} | facts)
    assert g.decide(facts, g.policy_from_valves(g.Valves(**valves))).reason == reason


DEFAULT_USER = g.PathList.parse(g.DEFAULT_USER_ENDPOINTS)
ENDPOINTS = [
    pytest.param(DEFAULT_USER, "GET", "/api/v1/models", True, id="default-reads-models"),
    pytest.param(DEFAULT_USER, "HEAD", "/api/models", True, id="default-head-is-a-read"),
    pytest.param(DEFAULT_USER, "GET", "/api/v1/models/model", True, id="default-reads-one-model"),
    pytest.param(DEFAULT_USER, "POST", "/api/v1/models/create", False, id="default-creates-no-model"),
    pytest.param(DEFAULT_USER, "POST", "/api/v1/models/model/update", False, id="default-changes-no-model"),
    pytest.param(DEFAULT_USER, "POST", "/api/chat/completions", True, id="default-chats"),
    pytest.param(g.PathList.parse("POST /a"), "GET", "/a", False, id="method-only"),
    pytest.param(g.PathList.parse("/a"), "DELETE", "/a/b", True, id="no-method-is-every-method"),
    pytest.param(g.PathList.parse("*"), "PATCH", "/x", True, id="star"),
]


@pytest.mark.parametrize(("paths", "method", "path", "admitted"), ENDPOINTS)
def test_endpoint_lists(paths, method, path, admitted):
    assert paths.admits(method, path) is admitted


@pytest.mark.parametrize("text", ["FETCH /api", "GET api", "GET"], ids=["unknown-method", "no-slash", "no-path"])
def test_endpoint_lists_refuse_what_they_cannot_mean(text):
    with pytest.raises(ValueError):
        g.PathList.parse(text)


FIELDS = [
    pytest.param("plain", "plain", id="plain"),
    pytest.param("a\nb\rc", "a\\nb\\rc", id="newlines-cannot-forge-a-line"),
    pytest.param("x\x1b[31m", "x\\x1b[31m", id="terminal-escape"),
    pytest.param("a\\nb", "a\\\\nb", id="backslash-cannot-fake-an-escape"),
    pytest.param("\u2028", "\\u2028", id="unicode-line-separator"),
    pytest.param("y" * 300, "y" * 200 + "…", id="cut"),
    pytest.param("x via=route user=u-admin", '"x via=route user=u-admin"', id="cannot-pose-as-more-fields"),
    pytest.param('say "hi"', '"say \\"hi\\""', id="quotes-escaped"),
    pytest.param("\u202egpt", "\\u202egpt", id="bidi-override"),
    pytest.param(None, "-", id="none"),
]


@pytest.mark.parametrize(("value", "shown"), FIELDS)
def test_log_field(value, shown):
    assert g.log_field(value) == shown


def test_audit_throttle_counts_what_it_left_out():
    throttle = g.AuditThrottle(seconds=60)
    seen = [throttle.admit(("u", "r"), now=t) for t in (0, 1, 2, 59, 61, 62)]
    assert seen == [0, None, None, None, 3, None]
    assert throttle.admit(("other", "r"), now=62) == 0


KEY = "sk-" + "0123456789abcdef" * 2
QUERIES = [
    pytest.param(f"api_key={KEY}", "api_key=sk-...cdef", id="value"),
    pytest.param(f"a=1&token={KEY}&b=2", "a=1&token=sk-...cdef&b=2", id="among-others"),
    pytest.param(f"k=%73k-{KEY[3:]}", "k=sk-...cdef", id="percent-encoded"),
    pytest.param(f"{KEY}", "sk-...cdef", id="bare"),
    pytest.param("q=skill&page=2", None, id="no-key"),
]


@pytest.mark.parametrize(("query", "redacted"), QUERIES)
def test_keys_in_the_query_string_become_fingerprints(query, redacted):
    assert g.redacted_query(query) == redacted


def test_keys_in_the_path_become_fingerprints():
    scope = {"path": f"/api/{KEY}/x", "query_string": b""}
    g.redact_keys_in_url(scope)
    assert (scope["path"], scope["raw_path"]) == ("/api/sk-...cdef/x", b"/api/sk-...cdef/x")


@pytest.mark.parametrize(
    ("name", "function_id"),
    [
        ("function_api_key_guard", "api_key_guard"),
        ("function_copy_" + "0" * 32, "copy"),
        ("tool_api_key_guard", None),
        ("api_key_guard", None),
    ],
    ids=["0.6", "0.12", "tool", "import"],
)
def test_only_function_modules_arm(name, function_id):
    assert g.function_id_from_module_name(name) == function_id
