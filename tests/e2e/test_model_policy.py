"""Model policy on every route that reaches a model, with one answer everywhere (issue 12).

Users are admitted on every endpoint, but their keys may use `other-*` models only; the
counting backend serves `test-model` and `other-model`. A refused request must be the guard's
403 JSON detail on every release, streaming or not, and must never reach the backend."""

import pytest

from .routes import ROUTES, routes_for

USERS_OTHER_MODELS = {
    "api_key_roles": "admin,user",
    "api_key_allowed_endpoints_user": "*",
    "api_key_allowed_models_user": "other-*",
}
DENIED_MODEL = "API Key Guard: API keys of role 'user' may not use model 'test-model' (api_key_allowed_models_user)"
NO_MODEL = (
    "API Key Guard: API keys of role 'user' may only use the models in api_key_allowed_models_user, and the "
    "model of this request cannot be checked: the request names no model"
)
MODEL_ROUTES = [route for route in ROUTES if route.model_access]
LISTINGS = ("/api/models", "/api/v1/models", "/openai/models")


def answer(deployment, method, path, token, body=None):
    """(status, JSON detail or None, backend calls) of one request."""
    before = deployment.backend.calls
    response = deployment.server.call(method, path, token, json=body)
    is_json = response.headers.get("content-type", "").startswith("application/json")
    detail = response.json().get("detail") if is_json and isinstance(response.json(), dict) else None
    return response.status_code, detail, deployment.backend.calls - before


def served_here(deployment, route) -> None:
    if route not in routes_for(deployment.version):
        pytest.skip(f"{route.id} does not exist on Open WebUI {deployment.server.version}")


def with_model(body: dict, model: str | None, stream: bool = False) -> dict:
    changed = {k: v for k, v in body.items() if k != "model"}
    return changed | ({"model": model} if model else {}) | ({"stream": True} if stream else {})


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("route", MODEL_ROUTES, ids=[r.id for r in MODEL_ROUTES])
def test_unlisted_model_is_refused_before_the_backend(deployment, route, stream):
    served_here(deployment, route)
    deployment.configure(**USERS_OTHER_MODELS)
    body = with_model(route.body, "test-model", stream)
    assert answer(deployment, route.method, route.path, deployment.people.alice.api_key, body) == (403, DENIED_MODEL, 0)


@pytest.mark.parametrize("route", MODEL_ROUTES, ids=[r.id for r in MODEL_ROUTES])
def test_request_without_a_model_is_refused_where_a_list_applies(deployment, route):
    served_here(deployment, route)
    deployment.configure(**USERS_OTHER_MODELS)
    body = with_model(route.body, None)
    assert answer(deployment, route.method, route.path, deployment.people.alice.api_key, body) == (403, NO_MODEL, 0)


SERVED = [
    pytest.param("api_key", "other-model", id="key-listed-model"),
    pytest.param("jwt", "test-model", id="session-never-judged"),
]


@pytest.mark.parametrize(("credential", "model"), SERVED)
@pytest.mark.parametrize("route", MODEL_ROUTES, ids=[r.id for r in MODEL_ROUTES])
def test_served(deployment, route, credential, model):
    served_here(deployment, route)
    deployment.configure(**USERS_OTHER_MODELS)
    token = getattr(deployment.people.alice, credential)
    status, _, calls = answer(deployment, route.method, route.path, token, with_model(route.body, model))
    assert (status, calls > 0) == (200, True)


def listed(deployment, path: str, token: str) -> list[str]:
    response = deployment.server.call("GET", path, token)
    assert response.status_code == 200, response.text[:200]
    return sorted(m["id"] for m in response.json()["data"])


@pytest.mark.parametrize("path", LISTINGS)
def test_listings_show_a_key_only_its_models(deployment, path):
    deployment.configure(**USERS_OTHER_MODELS)
    people = deployment.people
    assert listed(deployment, path, people.alice.api_key) == ["other-model"]
    assert {"test-model", "other-model"} <= set(listed(deployment, path, people.alice.jwt)), "sessions see all"
    assert {"test-model", "other-model"} <= set(listed(deployment, path, people.admin.api_key)), "admin list is *"


def test_one_request_writes_one_audit_line(deployment):
    """The inlet re-judges what the route guard admitted, silently: `audit_log=all` logs each request once."""
    deployment.configure(**USERS_OTHER_MODELS, audit_log="all")
    marker = f"user={deployment.people.alice.id} role=user path=/api/chat/completions model=other-model"
    log = deployment.server.log_path
    before = log.read_text(errors="replace").count(marker)
    body = with_model(ROUTES[0].body, "other-model")
    assert answer(deployment, "POST", "/api/chat/completions", deployment.people.alice.api_key, body)[0] == 200
    assert log.read_text(errors="replace").count(marker) - before == 1


# Routes where the model is named some other way, each refused before its handler for an unlisted model.
OTHER_WAYS = [
    pytest.param("/api/v1/chats/any/compact", {"model": "test-model"}, DENIED_MODEL, (0, 10, 0), id="compact"),
    pytest.param(
        "/api/v1/channels/any/messages/post",
        {"content": "hi <@M:test-model|Test>"},
        DENIED_MODEL,
        (0, 6, 0),
        id="channel-model-mention",
    ),
    pytest.param(
        "/api/v1/channels/any/messages/post",
        {"content": "<@M:other-model> and <@M:test-model>"},
        "API Key Guard: API keys of role 'user' get one model call per request, and this request asks for 2 "
        "(message_ids targets or model mentions; api_key_allowed_models_user)",
        (0, 6, 0),
        id="channel-two-mentions",
    ),
]


@pytest.mark.parametrize(("path", "body", "detail", "since"), OTHER_WAYS)
def test_model_named_another_way_is_refused(deployment, path, body, detail, since):
    if deployment.version < since:
        pytest.skip(f"{path} does not exist on Open WebUI {deployment.server.version}")
    deployment.configure(**USERS_OTHER_MODELS)
    assert answer(deployment, "POST", path, deployment.people.alice.api_key, body) == (403, detail, 0)
