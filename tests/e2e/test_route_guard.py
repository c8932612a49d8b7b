"""The route guard's lifecycle on real servers: off means out of the way, deactivation
disarms it within seconds, and a restart is re-armed by the documented means."""

import pytest

from .attacks import on_release
from .conftest import FUNCTION_ID, start_deployment, wait_for
from .provision import VERSIONS
from .routes import CHAT_BODY


def alice(deployment, method="POST", path="/openai/chat/completions", body=CHAT_BODY):
    """One request with alice's key: (status, reached the model backend, body)."""
    before = deployment.backend.calls
    response = deployment.server.call(method, path, deployment.people.alice.api_key, json=body)
    return response.status_code, deployment.backend.calls > before, response.text


# Open WebUI turns an inlet refusal into a 400 carrying the guard's message for an API client; 0.8
# answers 200 with the body `null` instead (measured on 0.8.12): no data and no model call either way.
NOT_ADMITTED = "API Key Guard: API keys are not enabled for role 'user'"
INLET_REFUSAL = {"0.6": (400, NOT_ADMITTED), "0.8": (200, "null"), "0.9": (400, NOT_ADMITTED)}


def test_route_guard_off_is_out_of_the_way_but_inlet_still_judges_chat(deployment):
    deployment.configure(route_guard=False)
    status, reached, _ = alice(deployment)
    assert (status, reached) == (200, True), "with route_guard off the direct provider route is not guarded"
    status, reached, text = alice(deployment, path="/api/chat/completions")
    refused_with, says = on_release(deployment, INLET_REFUSAL)
    assert (status, reached, says in text) == (refused_with, False, True), text[:200]


def alice_gets(deployment, outcome: tuple) -> tuple:
    """Poll until alice's key request ends as (status, reached the backend) == outcome."""
    return wait_for(lambda: alice(deployment)[:2] == outcome, f"alice's key answered {outcome}")


def test_deactivating_the_function_disarms_within_seconds(deployment):
    deployment.configure()
    assert alice(deployment)[:2] == (403, False)
    toggle = f"/api/v1/functions/id/{FUNCTION_ID}/toggle"
    deployment.server.ok("POST", toggle, deployment.people.admin.jwt)
    try:
        alice_gets(deployment, (200, True))
    finally:
        deployment.server.ok("POST", toggle, deployment.people.admin.jwt)
    alice_gets(deployment, (403, False))


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def restartable(request, tmp_path_factory):
    return start_deployment(request.param, tmp_path_factory.mktemp(f"restart-{request.param}"), request)


def test_restart_is_armed_by_a_model_listing(restartable, capsys):
    restartable.server.restart()
    # The window the README admits: until Open WebUI loads the function, nothing guards the routes.
    assert restartable.installer("status", key=restartable.people.admin.api_key) == 1
    assert "route guard: NOT armed" in capsys.readouterr().out
    restartable.server.ok("GET", "/api/models", restartable.people.admin.jwt)
    assert alice(restartable)[:2] == (403, False)
    # Armed now; not at startup (the harness's config does not persist), which this test opts out of.
    assert restartable.installer("status", "--no-arm-at-startup", key=restartable.people.admin.api_key) == 0


def test_restart_with_base_models_cache_is_armed_from_the_first_request(restartable):
    restartable.server.extra_env["ENABLE_BASE_MODELS_CACHE"] = "true"
    try:
        restartable.server.restart()
        assert alice(restartable)[:2] == (403, False)
    finally:
        restartable.server.extra_env.pop("ENABLE_BASE_MODELS_CACHE")
