"""Model policy on every route: the pure pieces the route guard uses, as tables."""

import asyncio
import json

import pytest

from tests.conftest import receiver
from tests.guard_loader import load_guard

g = load_guard()
USER_OTHER = g.Valves(
    api_key_roles="admin,user", api_key_allowed_endpoints_user="*", api_key_allowed_models_user="other-*"
)
UNREADABLE = (
    "API keys of role 'user' may only use the models in api_key_allowed_models_user, and the model of this "
    "request cannot be checked: {}"
)


def decided(model, problem, role="user", valves=USER_OTHER):
    facts = g.Facts(user_id="u", role=role, path="/openai/chat/completions", model=model, model_problem=problem)
    return g.decide(facts, g.policy_from_valves(valves)).message


DECISIONS = [
    pytest.param("other-1", "", "allowed by the API key policy", id="listed-model"),
    pytest.param(
        "gpt-premium",
        "",
        "API keys of role 'user' may not use model 'gpt-premium' (api_key_allowed_models_user)",
        id="unlisted-model",
    ),
    pytest.param(None, "the request names no model", UNREADABLE.format("the request names no model"), id="no-model"),
    pytest.param(
        None,
        "the request body is not a JSON object",
        UNREADABLE.format("the request body is not a JSON object"),
        id="not-json",
    ),
    pytest.param(None, "", "allowed by the API key policy", id="route-without-model"),
]


@pytest.mark.parametrize(("model", "problem", "message"), DECISIONS)
def test_model_decision(model, problem, message):
    assert decided(model, problem) == message


def test_unreadable_model_passes_where_every_model_is_allowed():
    assert decided(None, "the request names no model", role="admin") == "allowed by the API key policy"


BODIES = [
    pytest.param({"model": "m", "messages": []}, ("m", ""), id="model"),
    pytest.param({"messages": []}, (None, "the request names no model"), id="missing"),
    pytest.param({"model": ""}, (None, "the request names no model"), id="empty"),
    pytest.param({"model": ["a", "b"]}, (None, "the request names no model"), id="not-a-string"),
    pytest.param(["model", "m"], (None, "the request body is not a JSON object"), id="array"),
    pytest.param(None, (None, "the request body is not a JSON object"), id="unparsable"),
]


@pytest.mark.parametrize(("body", "expected"), BODIES)
def test_model_of(body, expected):
    assert (g.model_of(body).model, g.model_of(body).problem) == expected


OTHER = g.ModelList.parse("other-*")
LISTINGS = [
    pytest.param({"data": [{"id": "gpt-premium"}, {"id": "other-1"}]}, {"data": [{"id": "other-1"}]}, id="openai"),
    pytest.param({"data": [{"id": "a"}], "object": "list"}, {"data": [], "object": "list"}, id="openai-empty"),
    pytest.param(
        {"models": [{"model": "other-2", "name": "x"}, {"name": "llama"}]},
        {"models": [{"model": "other-2", "name": "x"}]},
        id="ollama",
    ),
]


@pytest.mark.parametrize(("listing", "expected"), LISTINGS)
def test_listing_trimmed(listing, expected):
    assert json.loads(g.listing_trimmed(json.dumps(listing).encode(), (OTHER,))) == expected


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"data": 1}', b"not json"], ids=["list", "empty", "odd", "junk"])
def test_untrimmable_listing_raises(body):
    with pytest.raises(ValueError):
        g.listing_trimmed(body, (OTHER,))


HEADERS = [
    pytest.param([(b"authorization", b"Bearer sk-a")], "sk-a", id="bearer"),
    pytest.param([(b"cookie", b"a=1; token=sk-b; c=2")], "sk-b", id="cookie"),
    pytest.param([(b"cookie", b'token="sk-c"')], "sk-c", id="quoted-cookie"),
    pytest.param([(b"cookie", b"token=sk-x"), (b"cookie", b"token=sk-y")], "sk-y", id="last-cookie-wins"),
    pytest.param([(b"x-api-key", b"sk-d")], "sk-d", id="custom-header"),
    pytest.param([(b"authorization", b"Basic sk-e"), (b"cookie", b"token=jwt")], "jwt", id="cookie-beats-basic"),
    pytest.param([(b"authorization", b"Bearer jwt"), (b"x-api-key", b"sk-f")], "jwt", id="bearer-beats-header"),
    pytest.param([], None, id="none"),
]


@pytest.mark.parametrize(("headers", "expected"), HEADERS)
def test_scope_credential_follows_cores_order(headers, expected):
    assert g.scope_credential({"headers": headers}) == expected


def test_policy_fingerprint_is_stable_and_short():
    assert g.policy_fingerprint({"b": 1, "a": "x"}) == g.policy_fingerprint({"a": "x", "b": 1})
    assert g.policy_fingerprint(None) == g.policy_fingerprint({}) != g.policy_fingerprint({"a": "x"})
    assert len(g.policy_fingerprint({})) == 12


MENTIONS = [
    pytest.param({"content": "hello"}, (None, ""), id="no-mention-calls-no-model"),
    pytest.param({"content": "hi <@M:gpt-premium|GPT> there"}, ("gpt-premium", ""), id="labelled-mention"),
    pytest.param({"content": "<@M:other-1>"}, ("other-1", ""), id="bare-mention"),
    pytest.param({"content": "<@U:u-1|Bob>"}, (None, ""), id="user-mention"),
    pytest.param({"content": "<@M:a> <@M:b|B>"}, (None, "the message mentions several models"), id="two-models"),
    pytest.param({"content": "<@M:a> <@M:a|A>"}, ("a", ""), id="same-model-twice"),
    pytest.param(
        {"content": "ok", "reply_to_id": "m-1"},
        (None, "a reply can make the model of the message it answers respond"),
        id="reply",
    ),
    pytest.param("text", (None, "the request body is not a JSON object"), id="not-an-object"),
]


@pytest.mark.parametrize(("body", "expected"), MENTIONS)
def test_mentioned_model(body, expected):
    assert (g.mentioned_model(body).model, g.mentioned_model(body).problem) == expected


BODIES_IN_CHUNKS = [
    pytest.param([b'{"model": ', b'"m"}'], 100, b'{"model": "m"}', id="whole-body"),
    pytest.param([b"x" * 60, b"y" * 60, b"z"], 100, None, id="past-the-limit"),
    pytest.param([b"a"] * 5000, 10_000, b"a" * 5000, id="dripped-byte-by-byte"),
]


@pytest.mark.parametrize(("chunks", "limit", "body"), BODIES_IN_CHUNKS)
def test_buffered_body_is_handed_on_byte_for_byte(chunks, limit, body):
    sent = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def read_all():
        raw, replay = await g.buffered(receiver(sent), limit)
        handed, more = [], True
        while more:
            message = await replay()
            handed.append(message["body"])
            more = message["more_body"]
        return raw, b"".join(handed), len(handed)

    raw, handed, messages = asyncio.run(read_all())
    assert {"buffered": raw, "handed on": handed} == {"buffered": body, "handed on": b"".join(chunks)}
    assert messages <= 2, "the buffered part is handed on as one message"
