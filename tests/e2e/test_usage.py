"""Usage accounting on real servers: every model route an API key reaches, counted as the backend reported.

Each row sends one request with a key of its own (a fresh account), so the guard's aggregate for that
user is exactly that request; the counting backend's token numbers are the truth it is compared with."""

import json
import math

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from .attacks import add_account
from .backend import CHAT_USAGE, CUT_OFF, EMBEDDING_USAGE, OLLAMA_USAGE, RESPONSES_USAGE, STREAM_CHUNKS
from .conftest import FUNCTION_ID, start_deployment, wait_for
from .provision import VERSIONS
from .server import version_tuple

VALVES = {"api_key_roles": "admin,user", "api_key_allowed_endpoints_user": "*"}
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "ping"}]}
OLLAMA_CHAT = {"model": "llama-test:latest", "messages": [{"role": "user", "content": "ping"}]}
USAGE_PATH = f"/api/v1/functions/id/{FUNCTION_ID}/usage"
METRICS_PATH = f"/api/v1/functions/id/{FUNCTION_ID}/metrics"


def reported(usage: dict) -> tuple:
    inp = usage.get("prompt_tokens", usage.get("input_tokens", usage.get("prompt_eval_count", 0)))
    out = usage.get("completion_tokens", usage.get("output_tokens", usage.get("eval_count", 0)))
    return (inp, out, inp + out, 0)


ROUTES = [
    pytest.param("/api/chat/completions", CHAT, reported(CHAT_USAGE), "chat", (0, 6, 0), id="chat"),
    pytest.param(
        "/api/chat/completions", {**CHAT, "stream": True}, reported(CHAT_USAGE), "chat", (0, 6, 0), id="chat-stream"
    ),
    pytest.param("/openai/chat/completions", CHAT, reported(CHAT_USAGE), "openai", (0, 6, 0), id="openai"),
    pytest.param(
        "/openai/chat/completions",
        {**CHAT, "stream": True},
        reported(CHAT_USAGE),
        "openai",
        (0, 6, 0),
        id="openai-stream",
    ),
    pytest.param(
        "/openai/responses",
        {"model": "test-model", "input": "ping"},
        reported(RESPONSES_USAGE),
        "openai",
        (0, 7, 0),
        id="responses",
    ),
    pytest.param(
        "/api/v1/tasks/title/completions",
        {**CHAT, "chat_id": "local"},
        reported(CHAT_USAGE),
        "tasks",
        (0, 6, 0),
        id="task",
    ),
    pytest.param(
        "/api/embeddings",
        {"model": "test-model", "input": "ping"},
        reported(EMBEDDING_USAGE),
        "embeddings",
        (0, 6, 0),
        id="embeddings",
    ),
    pytest.param("/ollama/api/chat", OLLAMA_CHAT, reported(OLLAMA_USAGE), "ollama", (0, 6, 0), id="ollama-stream"),
    pytest.param(
        "/ollama/api/chat", {**OLLAMA_CHAT, "stream": False}, reported(OLLAMA_USAGE), "ollama", (0, 6, 0), id="ollama"
    ),
]


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def metered(request, tmp_path_factory):
    version = request.param
    deployment = start_deployment(version, tmp_path_factory.mktemp(f"usage-{version}"), request, ollama=True)
    deployment.configure(**VALVES)
    return deployment


def usage_rows(deployment, user_id: str | None = None) -> list[dict]:
    rows = deployment.server.ok("GET", USAGE_PATH + "?since=2000-01-01", deployment.people.admin.api_key)["rows"]
    return [r for r in rows if user_id is None or r["user_id"] == user_id]


def recorded(deployment, user_id: str) -> list[tuple]:
    """(route class, decision, model, requests, input, output, total, estimated) of one user, once flushed."""
    rows = wait_for(lambda: usage_rows(deployment, user_id), f"usage of {user_id} recorded")
    fields = ("route_class", "decision", "model", "requests", "input_tokens", "output_tokens", "total_tokens")
    return [(*(r[f] for f in fields), r["estimated_requests"]) for r in rows]


def key_request(deployment, account, path: str, body: dict) -> requests.Response:
    response = deployment.server.call("POST", path, account.api_key, json=body, stream=True)
    for _ in response.iter_content(chunk_size=None):  # read to the end, as a client does
        pass
    return response


@pytest.mark.parametrize(("path", "body", "tokens", "klass", "since"), ROUTES)
def test_each_model_route_is_recorded_with_the_tokens_the_backend_reported(metered, path, body, tokens, klass, since):
    if version_tuple(metered.server.version) < since:
        pytest.skip(f"{path} does not exist on Open WebUI {metered.server.version}")
    account = add_account(metered, "metered")
    response = key_request(metered, account, path, body)
    assert response.status_code == 200, response.text[:300]
    model = body["model"]
    assert recorded(metered, account.id) == [(klass, "allow", model, 1, *tokens)]


def test_an_aborted_stream_is_recorded_as_estimated_and_never_free(metered):
    account = add_account(metered, "aborted")
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": CUT_OFF}]}
    response = key_request(metered, account, "/openai/chat/completions", body)
    assert response.status_code == 200
    [(klass, decision, _, requests_, inp, out, total, estimated)] = recorded(metered, account.id)
    expected_input = math.ceil(len(json.dumps(body).encode()) / 4)
    assert (klass, decision, requests_, inp, out, total, estimated) == (
        "openai",
        "allow",
        1,
        expected_input,
        STREAM_CHUNKS,
        expected_input + STREAM_CHUNKS,
        1,
    )


def test_session_traffic_is_not_recorded(metered):
    account = add_account(metered, "browser")
    response = metered.server.call("POST", "/api/chat/completions", account.jwt, json=CHAT)
    assert response.status_code == 200
    key_request(metered, account, "/openai/chat/completions", CHAT)  # the key's, so a flush is waited for
    assert [r[:4] for r in recorded(metered, account.id)] == [("openai", "allow", "test-model", 1)]


def test_a_refused_key_request_is_counted_as_denied_without_tokens(metered):
    account = add_account(metered, "refused")
    metered.configure(**VALVES, api_key_allowed_models_user="other-*")
    try:
        assert key_request(metered, account, "/openai/chat/completions", CHAT).status_code == 403
    finally:
        metered.configure(**VALVES)
    # under '-': a refused request's model is the caller's word, and each new name would be a new row
    assert recorded(metered, account.id) == [("openai", "deny", "-", 1, 0, 0, 0, 0)]


def test_install_usage_json_reports_the_documented_rows(metered, capsys):
    account = add_account(metered, "reader")
    key_request(metered, account, "/openai/chat/completions", CHAT)
    recorded(metered, account.id)
    capsys.readouterr()
    assert metered.installer("usage", "--json", "--since", "1d", key=metered.people.admin.api_key) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = [r for r in rows if r["user_id"] == account.id]
    assert [(r["user_email"], r["model"], r["requests"], r["total_tokens"]) for r in mine] == [
        (account.email, "test-model", 1, reported(CHAT_USAGE)[2])
    ]
    assert rows[-1]["day"] == "total" and rows[-1]["requests"] == sum(r["requests"] for r in rows[:-1])


def test_metrics_parse_and_only_an_admin_reads_them(metered):
    account = add_account(metered, "scraped")
    key_request(metered, account, "/openai/chat/completions", CHAT)
    recorded(metered, account.id)
    people, server = metered.people, metered.server
    answers = {
        who: server.call("GET", METRICS_PATH, token)
        for who, token in (
            ("admin key", people.admin.api_key),
            ("admin session", people.admin.jwt),
            ("user key", people.alice.api_key),
            ("user session", people.alice.jwt),
            ("nobody", None),
        )
    }
    statuses = {who: response.status_code for who, response in answers.items()}
    assert (statuses.pop("admin key"), statuses.pop("admin session")) == (200, 200), statuses
    assert set(statuses.values()) <= {401, 403}, statuses
    families = {f.name: f for f in text_string_to_metric_families(answers["admin key"].text)}
    mine = {
        (s.labels["kind"], s.value)
        for s in families["api_key_guard_tokens"].samples
        if s.labels["user_id"] == account.id
    }
    assert mine == {("input", CHAT_USAGE["prompt_tokens"]), ("output", CHAT_USAGE["completion_tokens"])}
    assert "api_key_guard_requests" in families


def test_the_numbers_survive_a_restart(metered):
    """Last in the module: the harness runs without persistent config, so a restart undoes settings."""
    before = usage_rows(metered)
    metered.server.restart()
    metered.server.ok("GET", "/api/models", metered.people.admin.jwt)  # the documented arming after a restart
    assert usage_rows(metered) == before
