"""install.py against a mocked Open WebUI admin API (responses): exact output lines, exit codes, requests sent."""

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import requests
import responses

ROOT = Path(__file__).resolve().parent.parent
INSTALL_PY = ROOT / "install.py"

URL = "https://owui.test"
KEY = "sk-RECOGNISABLE-test-key-0123456789wxyz"  # must never appear in any output
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJpZCI6ImFkbWluIn0.RECOGNISABLE-signature-abcd"
FN = f"{URL}/api/v1/functions/id/api_key_guard"
FN_PATH = "/api/v1/functions/id/api_key_guard"
CREATE = f"{URL}/api/v1/functions/create"
EXPLAIN = f"{FN}/explain"
ALICE = "user=alice%40example.com"  # explain's query for --user alice@example.com
EXPORT = f"{URL}/api/v1/functions/export"
MODELS = f"{URL}/api/models"
ARMING_LISTINGS = [("GET", "/api/models")] * 16  # one per new connection, so every worker loads the guard
CONFIG = f"{URL}/api/v1/auths/admin/config"
PERMISSIONS = f"{URL}/api/v1/users/default/permissions"
CONNECTIONS_PATH = "/api/v1/configs/connections"
CONNECTIONS = URL + CONNECTIONS_PATH
NOT_FOUND = {"detail": "We could not find what you're looking for :/"}
OLD_CONTENT = '"""\ntitle: API Key Guard\nversion: 0.0.9\n"""\nHOOKS_ATTR = "_api_key_guard_hooks"\n'  # a guard of old
ARGS = ("--url", URL, "--api-key", KEY)
URL_PASSWORD = "Hunter2-url-password"  # like KEY: must never appear in any output
URL_WITH_PASSWORD = f"https://admin:{URL_PASSWORD}@owui.test"
USERINFO_WARNING = (
    "warning: --url carries a user name and password; install.py neither sends nor shows them (its only "
    "credential is the admin key, sent as Authorization: Bearer)"
)
INSECURE_REFUSED = (
    "error: refusing to send the admin key in clear text to {host}: --url is plain http:// and {host} is not this "
    "machine (loopback); use https://, or pass --allow-insecure-http if every network in between is trusted"
)
INSECURE_WARNING = (
    "warning: sending the admin key in clear text to {host} (plain http://, --allow-insecure-http): anyone on the "
    "network in between can read it and act as this admin"
)

# The connections form as 0.11+ answers it (0.6.16-0.10 lack ENABLE_DIRECT_INTEGRATIONS).
CACHE_OFF = {"ENABLE_DIRECT_CONNECTIONS": True, "ENABLE_DIRECT_INTEGRATIONS": False, "ENABLE_BASE_MODELS_CACHE": False}
CACHE_ON = CACHE_OFF | {"ENABLE_BASE_MODELS_CACHE": True}
ARMED_AT_STARTUP = (
    "armed at startup: switched on Open WebUI's base models cache (ENABLE_BASE_MODELS_CACHE), "
    "so every worker loads the guard before it serves its first request after a restart"
)
WOULD_ARM_AT_STARTUP = (
    "would arm at startup: switch on Open WebUI's base models cache (ENABLE_BASE_MODELS_CACHE), "
    "so every worker loads the guard before it serves its first request after a restart"
)
UNARMED_AFTER_RESTART = (
    "This means the guard is in force now, but after every restart each worker serves API keys unguarded until "
    "something lists models there"
)
SESSION_POLICY_LINE = (
    "policy in force: cannot tell with a session token (the worker that saved the valves applies them at once, "
    "the others within 2 s); run status with an admin API key"
)

CONFIG_012 = {"ENABLE_API_KEYS": True, "ENABLE_API_KEYS_ENDPOINT_RESTRICTIONS": False, "API_KEYS_ALLOWED_ENDPOINTS": ""}
PERMISSIONS_012 = {"features": {"api_keys": False, "web_search": True}}
POSTURE_012_LINES = [
    "api keys: enabled",
    "server endpoint restriction: off",
    "users may hold keys: not by default (features.api_keys is off; a group can still grant it)",
]
NOT_ARMED_LINE = (
    "route guard: NOT armed - Open WebUI loads the guard on the first model listing or chat after a restart; "
    "run `install.py --url ...` again or call GET /api/models"
)


@pytest.fixture(scope="module")
def install():
    spec = importlib.util.spec_from_file_location("install", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local(install):
    return install.load_local_guard()


@pytest.fixture(scope="module")
def defaults(local):
    return local.valves_model().model_dump()


@pytest.fixture(autouse=True)
def no_openwebui_env(monkeypatch):
    monkeypatch.delenv("OPENWEBUI_URL", raising=False)
    monkeypatch.delenv("OPENWEBUI_API_KEY", raising=False)


@pytest.fixture(autouse=True)
def slept(install, monkeypatch) -> list[float]:
    """The pauses between probes, recorded instead of waited for."""
    pauses: list[float] = []
    monkeypatch.setattr(install, "sleep", pauses.append)
    return pauses


@pytest.fixture
def server():
    with responses.RequestsMock() as mock:  # fails the test when a registered answer is never asked for
        yield mock


@pytest.fixture
def cli(install, capsys):
    def run(*argv: str) -> tuple[int, list[str], list[str]]:
        code = install.main(list(argv))
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    return run


@pytest.fixture
def expand(local, defaults, tmp_path):
    """Fill the placeholders the tables use for values only known at run time."""
    names = ", ".join(defaults)

    def fill(text: str) -> str:
        return (
            text.replace("{version}", local.version)
            .replace("{all}", names)
            .replace("{tmp}", str(tmp_path))
            .replace("{policy}", local.policy(defaults))
        )

    return fill


def function(
    content: str,
    *,
    active: bool = True,
    is_global: bool = True,
    function_id: str = "api_key_guard",
    kind: str = "filter",
) -> dict:
    return {
        "id": function_id,
        "user_id": "admin-1",
        "name": "API Key Guard",
        "type": kind,
        "content": content,
        "meta": {"description": "", "manifest": {}},
        "is_active": active,
        "is_global": is_global,
        "updated_at": 1,
        "created_at": 1,
    }


def json_body(data) -> dict:
    """responses sends no body for json=None; Open WebUI answers never-stored valves with a literal null."""
    return {"body": json.dumps(data), "content_type": "application/json"}


def guard_headers(mode: str | None, policy: str | None = None, counters: str | None = "per-worker") -> dict:
    """What the armed guard adds to an API-key request it judged (nothing when it is not armed)."""
    if mode is None:
        return {}
    named = {"X-API-Key-Guard-Policy": policy, "X-API-Key-Guard-Counters": counters}
    return {"X-API-Key-Guard": mode} | {name: value for name, value in named.items() if value is not None}


def in_force(
    server, local, stored, *, mode: str | None = "enforce", policy: str = "stored", content: str = "", **flags
) -> None:
    """The read-back after install's writes: one model listing, the stored valves re-read, the probe.

    `policy` is what the guard says it acts on: "stored" for the fingerprint of `stored`; `content` what the
    server holds (default: the local guard file)."""
    server.get(MODELS, json={"data": []})
    server.get(f"{FN}/valves", **json_body(stored))
    live = local.policy(stored) if policy == "stored" else policy
    server.get(FN, json=function(content or local.content, **flags), headers=guard_headers(mode, live))


def sent(server) -> list[tuple[str, str]]:
    return [(call.request.method, call.request.url.removeprefix(URL)) for call in server.calls]


def body(server, index: int):
    raw = server.calls[index].request.body
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "credential, mode, last_lines",
    [
        pytest.param(KEY, "enforce", [], id="api-key-waits-for-the-policy"),
        pytest.param(JWT, None, [SESSION_POLICY_LINE], id="session-token-cannot-probe-says-so"),
    ],
)
def test_fresh_install_creates_arms_stores_valves_activates_and_verifies(
    server, cli, local, defaults, credential, mode, last_lines
):
    server.get(FN, status=401, json=NOT_FOUND)
    server.get(CONNECTIONS, json=CACHE_OFF)
    server.post(CREATE, json=function(local.content, active=False, is_global=False))
    server.post(CONNECTIONS, json=CACHE_ON)
    server.post(f"{FN}/valves/update", json=defaults)
    server.post(f"{FN}/toggle", json=function(local.content, active=True, is_global=False))
    server.post(f"{FN}/toggle/global", json=function(local.content))
    in_force(server, local, defaults, mode=mode)

    code, out, err = cli("--url", URL, "--api-key", credential)

    assert (code, err) == (0, [])
    assert out == [
        f"created function api_key_guard (version {local.version})",
        ARMED_AT_STARTUP,
        f"valves updated: {', '.join(defaults)}",
        "activated",
        "made global",
        *last_lines,
    ]
    assert sent(server) == [
        ("GET", FN_PATH),
        ("GET", CONNECTIONS_PATH),
        ("POST", "/api/v1/functions/create"),
        ("POST", CONNECTIONS_PATH),
        ("POST", f"{FN_PATH}/valves/update"),
        ("POST", f"{FN_PATH}/toggle"),
        ("POST", f"{FN_PATH}/toggle/global"),
        *ARMING_LISTINGS,
        ("GET", f"{FN_PATH}/valves"),
        ("GET", FN_PATH),
    ]
    assert body(server, 2) == {
        "id": "api_key_guard",
        "name": "API Key Guard",
        "content": local.content,
        "meta": {"description": local.manifest["description"], "manifest": local.manifest},
    }
    assert body(server, 3) == CACHE_ON
    assert body(server, 4) == defaults
    assert all(call.request.headers["Authorization"] == f"Bearer {credential}" for call in server.calls)
    assert server.calls[-1].request.headers["Connection"] == "close"  # the probe may reach another worker


@pytest.mark.parametrize(
    "argv, env",
    [
        pytest.param(["--url", URL, "--api-key", KEY], {}, id="flags-without-subcommand"),
        pytest.param(["install", "--url", URL + "/", "--api-key", KEY], {}, id="explicit-install-trailing-slash"),
        pytest.param([], {"OPENWEBUI_URL": URL, "OPENWEBUI_API_KEY": KEY}, id="environment-variables"),
    ],
)
def test_second_run_changes_nothing(server, cli, local, defaults, monkeypatch, argv, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    in_force(server, local, defaults)

    code, out, err = cli(*argv)

    assert (code, out, err) == (0, [f"api_key_guard {local.version} is installed and current; nothing changed"], [])
    assert {method for method, _ in sent(server)} == {"GET"}


DROPPED = "<not stored>"


@pytest.mark.parametrize(
    "stored, argv, valves_file, changed, sent_valves, last_lines",
    [
        pytest.param(None, [], None, "{all}", {}, [], id="server-never-stored-valves"),
        pytest.param(
            {},
            ["--set", "api_key_roles=admin,user"],
            None,
            "api_key_roles",
            {"api_key_roles": "admin,user"},
            [],
            id="set-string",
        ),
        pytest.param({}, ["--set", "priority=-5"], None, "priority", {"priority": -5}, [], id="set-int-converted"),
        pytest.param(
            {},
            ["--set", "route_guard=false"],
            None,
            "route_guard",
            {"route_guard": False},
            [
                "policy in force: cannot tell: with route_guard off no request shows the guard's policy; the inlet "
                "filter applies the stored valves within 2 s"
            ],
            id="set-bool-converted-route-guard-off-no-probe",
        ),
        pytest.param(
            {},
            [],
            {"mode": "monitor", "priority": 7},
            "mode, priority",
            {"mode": "monitor", "priority": 7},
            [],
            id="valves-file",
        ),
        pytest.param(
            {}, ["--set", "priority=8"], {"priority": 7}, "priority", {"priority": 8}, [], id="set-wins-over-file"
        ),
        pytest.param(
            {"api_key_groups": "ops"},
            ["--set", "mode=monitor"],
            None,
            "mode",
            {"api_key_groups": "ops", "mode": "monitor"},
            [],
            id="stored-values-kept",
        ),
        pytest.param({"priority": DROPPED}, [], None, "priority", {}, [], id="stored-without-priority-gets-it"),
        pytest.param({"legacy_valve": "x"}, [], None, "legacy_valve", {}, [], id="obsolete-stored-valve-dropped"),
    ],
)
def test_valve_changes(
    server, cli, local, defaults, tmp_path, expand, stored, argv, valves_file, changed, sent_valves, last_lines
):
    """`stored` is what the server holds on top of the defaults (None: the server answers null)."""
    if valves_file is not None:
        (tmp_path / "valves.json").write_text(json.dumps(valves_file))
        argv = [*argv, "--valves", str(tmp_path / "valves.json")]
    held = None if stored is None else {name: v for name, v in (defaults | stored).items() if v != DROPPED}
    written = defaults | sent_valves
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", **json_body(held))
    server.get(CONNECTIONS, json=CACHE_ON)
    server.post(f"{FN}/valves/update", json={})
    in_force(server, local, written, mode=None if written["route_guard"] is False else "enforce")

    code, out, err = cli(*ARGS, *argv)

    assert (code, out, err) == (0, [expand(f"valves updated: {changed}"), *last_lines], [])
    assert sent(server)[3] == ("POST", f"{FN_PATH}/valves/update")
    assert body(server, 3) == written


@pytest.mark.parametrize(
    "content, active, is_global, writes, lines",
    [
        pytest.param("current", False, True, ["/toggle"], ["activated"], id="inactive-toggled-on"),
        pytest.param("current", True, False, ["/toggle/global"], ["made global"], id="not-global-toggled-on"),
        pytest.param(
            "old", True, True, ["/update"], ["updated function content (0.0.9 -> {version})"], id="outdated-content"
        ),
        pytest.param(
            "old",
            False,
            False,
            ["/update", "/toggle", "/toggle/global"],
            ["updated function content (0.0.9 -> {version})", "activated", "made global"],
            id="outdated-inactive-not-global",
        ),
    ],
)
def test_update_writes_only_what_differs(
    server, cli, local, defaults, expand, content, active, is_global, writes, lines
):
    stored_content = local.content if content == "current" else OLD_CONTENT
    server.get(FN, json=function(stored_content, active=active, is_global=is_global))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    for action in writes:
        server.post(f"{FN}{action}", json=function(local.content))
    in_force(server, local, defaults)

    code, out, err = cli(*ARGS)

    assert (code, out, err) == (0, [expand(line) for line in lines], [])
    assert [path for method, path in sent(server) if method == "POST"] == [f"{FN_PATH}{a}" for a in writes]
    if "/update" in writes:
        assert body(server, 3)["content"] == local.content


@pytest.mark.parametrize(
    "content, form, argv, lines",
    [
        pytest.param(
            None,
            CACHE_OFF,
            [],
            [
                "would create function api_key_guard (version {version})",
                WOULD_ARM_AT_STARTUP,
                "would update valves: {all}",
                "would activate",
                "would make global",
            ],
            id="absent",
        ),
        pytest.param(
            "old",
            CACHE_ON,
            ["--set", "mode=monitor"],
            ["would update function content (0.0.9 -> {version})", "would update valves: mode"],
            id="outdated-valve-change",
        ),
        pytest.param(
            "current", CACHE_OFF, [], [WOULD_ARM_AT_STARTUP], id="current-only-arming-at-startup-would-change"
        ),
        pytest.param(
            "current",
            None,
            ["--no-arm-at-startup"],
            ["api_key_guard {version} is installed and current; nothing changed"],
            id="current-opted-out",
        ),
    ],
)
def test_dry_run_reads_and_writes_nothing(server, cli, local, defaults, expand, content, form, argv, lines):
    """`content`: None when the function is absent, else what the server holds ("current" or "old")."""
    if content is None:
        server.get(FN, status=401, json=NOT_FOUND)
    else:
        server.get(FN, json=function(local.content if content == "current" else OLD_CONTENT))
        server.get(f"{FN}/valves", json=defaults)
    if form is not None:
        server.get(CONNECTIONS, json=form)

    code, out, err = cli(*ARGS, "--dry-run", *argv)

    assert (code, out, err) == (0, [expand(line) for line in lines], [])
    assert {method for method, _ in sent(server)} == {"GET"}
    assert ("GET", "/api/models") not in sent(server)


def form_answer(status: int = 200, method: str = "GET", url: str = CONNECTIONS, **kwargs) -> dict:
    return {"method": method, "url": url, "status": status, **kwargs}


NO_CACHE_ERROR = (
    "error: not armed at startup: this Open WebUI has no base models cache (ENABLE_BASE_MODELS_CACHE came with "
    f"0.6.16). {UNARMED_AFTER_RESTART}; upgrade Open WebUI, or pass --no-arm-at-startup to accept that"
)
ARMING_CASES = [
    # what the server answers for the connections form and its update: exact request, exact line, exit code
    pytest.param(
        [form_answer(json=CACHE_OFF), form_answer(method="POST", json=CACHE_ON)],
        [],
        CACHE_ON,
        0,
        [ARMED_AT_STARTUP],
        [],
        id="0.11+-form-with-direct-integrations-sent-back-whole",
    ),
    pytest.param(
        [
            form_answer(json={"ENABLE_DIRECT_CONNECTIONS": False, "ENABLE_BASE_MODELS_CACHE": False}),
            form_answer(method="POST", json={"ENABLE_DIRECT_CONNECTIONS": False, "ENABLE_BASE_MODELS_CACHE": True}),
        ],
        [],
        {"ENABLE_DIRECT_CONNECTIONS": False, "ENABLE_BASE_MODELS_CACHE": True},
        0,
        [ARMED_AT_STARTUP],
        [],
        id="0.6.16-0.10-form-of-two",
    ),
    pytest.param(
        [form_answer(json=CACHE_OFF), form_answer(method="POST", json=CACHE_ON)],
        ["--api-key", JWT],
        CACHE_ON,
        0,
        [ARMED_AT_STARTUP],
        [],
        id="session-token-no-policy-line-when-only-the-setting-changed",
    ),
    pytest.param(
        [form_answer(json=CACHE_ON)],
        [],
        None,
        0,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [],
        id="already-on-left-alone",
    ),
    pytest.param(
        [],
        ["--no-arm-at-startup"],
        None,
        0,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [],
        id="opted-out-not-even-read",
    ),
    pytest.param(
        [form_answer(json={"ENABLE_DIRECT_CONNECTIONS": True})],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [NO_CACHE_ERROR],
        id="before-0.6.16-form-without-the-setting",
    ),
    pytest.param(
        [form_answer(404, json={"detail": "Not Found"})],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [NO_CACHE_ERROR],
        id="no-connections-endpoint-404",
    ),
    pytest.param(
        [form_answer(body="<!doctype html><html></html>", content_type="text/html")],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [NO_CACHE_ERROR],
        id="0.6.15-answers-the-web-app-page",
    ),
    pytest.param(
        [form_answer(403, json={"detail": "API Key Guard: no"}, headers={"X-API-Key-Guard": "enforce"})],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [
            "error: not armed at startup: API Key Guard itself denied GET /api/v1/configs/connections (403); use an "
            "admin session token (JWT), or allow the path in the valve api_key_allowed_endpoints_admin. Server said: "
            f"API Key Guard: no. {UNARMED_AFTER_RESTART}; switch on Admin Panel > Settings > Connections > Cache "
            "Base Model List (ENABLE_BASE_MODELS_CACHE), or pass --no-arm-at-startup to accept that"
        ],
        id="refused-by-the-guard-policy",
    ),
    pytest.param(
        [form_answer(json={"ENABLE_DIRECT_CONNECTIONS": True, "ENABLE_BASE_MODELS_CACHE": "yes"})],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [
            "error: not armed at startup: GET /api/v1/configs/connections answered an unexpected shape (expected "
            f"true or false, got ENABLE_BASE_MODELS_CACHE='yes'). {UNARMED_AFTER_RESTART}; switch on Admin Panel > "
            "Settings > Connections > Cache Base Model List (ENABLE_BASE_MODELS_CACHE), or pass "
            "--no-arm-at-startup to accept that"
        ],
        id="unexpected-shape-string-changes-nothing",
    ),
    pytest.param(
        [form_answer(json=[True])],
        [],
        None,
        1,
        ["api_key_guard {version} is installed and current; nothing changed"],
        [
            "error: not armed at startup: GET /api/v1/configs/connections answered an unexpected shape (expected a "
            f"JSON object of settings, got list). {UNARMED_AFTER_RESTART}; switch on Admin Panel > Settings > "
            "Connections > Cache Base Model List (ENABLE_BASE_MODELS_CACHE), or pass --no-arm-at-startup to accept "
            "that"
        ],
        id="unexpected-shape-list-changes-nothing",
    ),
    pytest.param(
        [form_answer(json=CACHE_OFF), form_answer(500, method="POST", json={"detail": "database is locked"})],
        [],
        CACHE_ON,
        1,
        [],
        [
            "error: not armed at startup: the server answered POST /api/v1/configs/connections with 500 Internal "
            f"Server Error. Server said: database is locked. {UNARMED_AFTER_RESTART}; switch on Admin Panel > "
            "Settings > Connections > Cache Base Model List (ENABLE_BASE_MODELS_CACHE), or pass "
            "--no-arm-at-startup to accept that"
        ],
        id="update-refused",
    ),
    pytest.param(
        [form_answer(json=CACHE_OFF), form_answer(method="POST", json=CACHE_OFF)],
        [],
        CACHE_ON,
        1,
        [],
        [
            "error: not armed at startup: POST /api/v1/configs/connections answered without "
            f"ENABLE_BASE_MODELS_CACHE: true. {UNARMED_AFTER_RESTART}; switch on Admin Panel > Settings > "
            "Connections > Cache Base Model List (ENABLE_BASE_MODELS_CACHE), or pass --no-arm-at-startup to accept "
            "that"
        ],
        id="update-not-kept",
    ),
]


@pytest.mark.parametrize("answers, argv, update, code, lines, errors", ARMING_CASES)
def test_arming_at_startup(server, cli, local, defaults, expand, answers, argv, update, code, lines, errors):
    """A guard installed and current; what install does with Open WebUI's base models cache."""
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    for reply in answers:
        server.add(**reply)
    in_force(server, local, defaults)

    assert cli(*ARGS, *argv) == (code, [expand(line) for line in lines], errors)
    posted = [call.request for call in server.calls if call.request.method == "POST"]
    assert [json.loads(request.body) for request in posted] == ([update] if update else [])


@pytest.mark.parametrize(
    "active, is_global, mode, policy, code, error, probes",
    [
        pytest.param(
            False,
            True,
            None,
            "stored",
            3,
            "error: function api_key_guard is not active after install; Open WebUI switches a function off when its "
            "module fails to load: check the server log",
            1,
            id="switched-off-while-loading",
        ),
        pytest.param(
            True,
            False,
            "enforce",
            "stored",
            3,
            "error: function api_key_guard is still not global after /toggle/global; check the server log",
            1,
            id="still-not-global",
        ),
        pytest.param(
            True,
            True,
            None,
            "stored",
            1,
            "error: route guard is not armed 10 s after GET /api/models; look in the server log for 'api_key_guard "
            "could not arm the route guard' (with several workers, each arms on its own first model listing)",
            51,
            id="route-guard-never-armed",
        ),
        pytest.param(
            True,
            True,
            "enforce",
            "0123456789ab",
            1,
            "error: the guard does not act on the stored valves 10 s after install wrote them (policy in force: no - "
            "the guard acts on policy 0123456789ab, the stored valves are policy {policy}); check the server log "
            "for api_key_guard errors",
            51,
            id="policy-never-in-force",
        ),
        pytest.param(
            True,
            True,
            "enforce",
            None,
            1,
            "error: the guard does not act on the stored valves 10 s after install wrote them (policy in force: "
            "cannot tell: the guard sent no X-API-Key-Guard-Policy header); check the server log for api_key_guard "
            "errors",
            51,
            id="armed-guard-never-shows-a-policy",
        ),
    ],
)
def test_install_verifies_the_outcome(
    server, cli, local, defaults, expand, slept, active, is_global, mode, policy, code, error, probes
):
    """What the read-back after GET /api/models shows of a function that was installed and current."""
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    in_force(server, local, defaults, mode=mode, policy=policy, active=active, is_global=is_global)

    assert cli(*ARGS) == (
        code,
        [f"api_key_guard {local.version} is installed and current; nothing changed"],
        [expand(error)],
    )
    assert sent(server)[3:] == [*ARMING_LISTINGS, ("GET", f"{FN_PATH}/valves")] + [("GET", FN_PATH)] * probes
    assert slept == [0.2] * (probes - 1)


@pytest.mark.parametrize(
    "probes, slept_for",
    [
        pytest.param([(None, None)] * 2, [0.2] * 2, id="not-armed-until-the-cached-inactive-state-expires"),
        pytest.param([("enforce", "0123456789ab")] * 3, [0.2] * 3, id="old-policy-until-the-cached-valves-expire"),
        pytest.param([], [], id="in-force-at-once"),
    ],
)
def test_install_waits_until_the_guard_acts_on_what_it_wrote(server, cli, local, defaults, slept, probes, slept_for):
    """A worker other than the one that saved may act on what it cached before, for up to 2 s."""
    wanted = defaults | {"mode": "monitor"}
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    server.post(f"{FN}/valves/update", json=wanted)
    server.get(MODELS, json={"data": []})
    server.get(f"{FN}/valves", json=wanted)
    for mode, policy in probes:
        server.get(FN, json=function(local.content), headers=guard_headers(mode, policy))
    server.get(FN, json=function(local.content), headers=guard_headers("monitor", local.policy(wanted)))

    assert cli(*ARGS, "--set", "mode=monitor") == (0, ["valves updated: mode"], [])
    assert slept == slept_for


def test_install_from_an_old_guard_file_cannot_check_the_policy(server, cli, local, defaults, tmp_path):
    """A guard file from before policy fingerprints: install still works and says what it cannot check."""
    old = tmp_path / "api_key_guard.py"
    old.write_text(local.content.replace("def policy_fingerprint(", "def _no_fingerprint("))
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    server.post(f"{FN}/update", json=function(old.read_text()))
    in_force(server, local, defaults, content=old.read_text())

    assert cli(*ARGS, "--file", str(old)) == (
        0,
        [
            f"updated function content ({local.version} -> {local.version})",
            "policy in force: cannot tell: the local guard file has no policy_fingerprint; use the guard file of "
            "this release",
        ],
        [],
    )
    assert body(server, 3)["content"] == old.read_text()


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------
OK_FUNCTION_LINES = [
    "installed: yes (id api_key_guard)",
    "active: yes",
    "global: yes",
    "content: same as the local file (server {version}, local {version})",
    "valves: valid",
    "copies: api_key_guard (the only one)",
]
NO_COPIES = "copies: none (no filter on the server is API Key Guard)"
OK_VERDICT = (
    "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard armed; "
    "policy in force; armed at startup"
)
ROUTE_ARMED = "route guard: armed (mode enforce)"
POLICY_YES = "policy in force: yes (policy {policy})"
PER_WORKER = "rate-limit counters: per worker"
LIVE_OK = [ROUTE_ARMED, POLICY_YES, PER_WORKER]
STARTUP_YES = (
    "armed at startup: yes (ENABLE_BASE_MODELS_CACHE is on: every worker loads the guard before its first request)"
)
ARMED = ("enforce", "stored", "per-worker")  # what the guard's headers say: mode, policy, counters
SESSION_LINES = [
    "route guard: cannot tell with a session token; run status with an admin API key",
    "policy in force: cannot tell with a session token (the worker that saved the valves applies them at once, "
    "the others within 2 s); run status with an admin API key",
    "rate-limit counters: unknown (a session token sees no guard headers; run status with an admin API key)",
]
ON = form_answer(json=CACHE_ON)


@pytest.mark.parametrize(
    "credential, state, stored, probe, form, argv, code, lines",
    [
        pytest.param(
            KEY, {}, "defaults", ARMED, ON, [], 0, [OK_VERDICT, *OK_FUNCTION_LINES, *LIVE_OK, STARTUP_YES], id="ok"
        ),
        pytest.param(
            KEY,
            {},
            None,
            ("monitor", "stored", "redis"),
            ON,
            [],
            0,
            [
                OK_VERDICT,
                *OK_FUNCTION_LINES,
                "route guard: armed (mode monitor)",
                "policy in force: yes (policy {empty})",
                "rate-limit counters: shared (Redis)",
                STARTUP_YES,
            ],
            id="ok-valves-never-stored-monitor-mode-redis",
        ),
        pytest.param(
            JWT,
            {},
            "defaults",
            (None, None, None),
            ON,
            [],
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard not "
                "checked (session token); policy not checked (session token); armed at startup",
                *OK_FUNCTION_LINES,
                *SESSION_LINES,
                STARTUP_YES,
            ],
            id="ok-session-token-sees-no-guard-headers",
        ),
        pytest.param(
            KEY,
            {},
            {"route_guard": False},
            (None, None, None),
            ON,
            [],
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard "
                "switched off; policy not checked (route guard off); armed at startup",
                *OK_FUNCTION_LINES,
                "route guard: switched off by the valve route_guard",
                "policy in force: cannot tell: with route_guard off no request shows the guard's policy; the inlet "
                "filter applies the stored valves within 2 s",
                "rate-limit counters: unknown (the guard sent no X-API-Key-Guard-Counters header)",
                STARTUP_YES,
            ],
            id="ok-route-guard-valve-off",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            (None, None, None),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - route guard is not armed",
                *OK_FUNCTION_LINES,
                NOT_ARMED_LINE,
                "policy in force: cannot tell: the guard sent no X-API-Key-Guard-Policy header",
                "rate-limit counters: unknown (the guard sent no X-API-Key-Guard-Counters header)",
                STARTUP_YES,
            ],
            id="not-armed",
        ),
        pytest.param(
            KEY,
            {"active": False},
            "defaults",
            (None, None, None),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - function is not active",
                "installed: yes (id api_key_guard)",
                "active: no",
                *OK_FUNCTION_LINES[2:],
                STARTUP_YES,
            ],
            id="not-active",
        ),
        pytest.param(
            KEY,
            {"is_global": False},
            "defaults",
            ARMED,
            ON,
            [],
            1,
            [
                "verdict: NOT OK - function is not global",
                *OK_FUNCTION_LINES[:2],
                "global: no",
                *OK_FUNCTION_LINES[3:],
                STARTUP_YES,
            ],
            id="not-global",
        ),
        pytest.param(
            KEY,
            {"content": OLD_CONTENT},
            "defaults",
            ARMED,
            ON,
            [],
            1,
            [
                "verdict: NOT OK - server copy differs from the local file (server 0.0.9, local {version})",
                *OK_FUNCTION_LINES[:3],
                "content: differs from the local file (server 0.0.9, local {version})",
                *OK_FUNCTION_LINES[4:],
                *LIVE_OK,
                STARTUP_YES,
            ],
            id="outdated-content",
        ),
        pytest.param(
            KEY,
            {},
            {"api_key_roles": "root", "priority": "high"},
            ("fail-closed", "stored", "per-worker"),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - stored valves do not validate",
                *OK_FUNCTION_LINES[:4],
                "valves: invalid",
                "  valve priority: Input should be a valid integer, unable to parse string as an integer",
                "  valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'",
                OK_FUNCTION_LINES[-1],
                "route guard: armed (mode fail-closed)",
                "policy in force: yes (policy {invalid})",
                PER_WORKER,
                STARTUP_YES,
            ],
            id="invalid-stored-valves-fail-closed",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ("enforce", "0123456789ab", "per-worker"),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - the guard does not act on the stored valves",
                *OK_FUNCTION_LINES,
                ROUTE_ARMED,
                "policy in force: no - the guard acts on policy 0123456789ab, the stored valves are policy {policy}",
                PER_WORKER,
                STARTUP_YES,
            ],
            id="policy-not-in-force",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ("enforce", "stored", "degraded"),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - rate-limit counters degraded (Redis failing)",
                *OK_FUNCTION_LINES,
                ROUTE_ARMED,
                POLICY_YES,
                "rate-limit counters: degraded (Redis is configured but failing; counting per worker meanwhile)",
                STARTUP_YES,
            ],
            id="counters-degraded",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ("enforce", "stored", "degraded; cause=noperm"),
            ON,
            [],
            1,
            [
                "verdict: NOT OK - rate-limit counters degraded (the Redis ACL user may not run the guard's script "
                "or touch its keys: grant the permissions the README lists (Redis permissions))",
                *OK_FUNCTION_LINES,
                ROUTE_ARMED,
                POLICY_YES,
                "rate-limit counters: degraded (the Redis ACL user may not run the guard's script or touch its keys: "
                "grant the permissions the README lists (Redis permissions); counting per worker meanwhile)",
                STARTUP_YES,
            ],
            id="counters-degraded-with-a-cause",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ("enforce", "stored", None),
            ON,
            [],
            0,
            [
                OK_VERDICT,
                *OK_FUNCTION_LINES,
                ROUTE_ARMED,
                POLICY_YES,
                "rate-limit counters: unknown (the guard sent no X-API-Key-Guard-Counters header)",
                STARTUP_YES,
            ],
            id="counters-header-missing-is-unknown",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ARMED,
            form_answer(json=CACHE_OFF),
            [],
            1,
            [
                "verdict: NOT OK - not armed at startup",
                *OK_FUNCTION_LINES,
                *LIVE_OK,
                "armed at startup: no - ENABLE_BASE_MODELS_CACHE is off: the guard is in force now, but after every "
                "restart each worker serves API keys unguarded until something lists models there; run install.py "
                "to switch it on",
            ],
            id="not-armed-at-startup",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ARMED,
            form_answer(json=CACHE_OFF),
            ["--no-arm-at-startup"],
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard armed; "
                "policy in force; not armed at startup (opted out)",
                *OK_FUNCTION_LINES,
                *LIVE_OK,
                "armed at startup: no (ENABLE_BASE_MODELS_CACHE is off; --no-arm-at-startup)",
            ],
            id="not-armed-at-startup-opted-out",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ARMED,
            form_answer(json={"ENABLE_DIRECT_CONNECTIONS": True}),
            [],
            1,
            [
                "verdict: NOT OK - not armed at startup",
                *OK_FUNCTION_LINES,
                *LIVE_OK,
                "armed at startup: no - this Open WebUI has no base models cache (ENABLE_BASE_MODELS_CACHE came with "
                "0.6.16): the guard is in force now, but after every restart each worker serves API keys unguarded "
                "until something lists models there; upgrade Open WebUI",
            ],
            id="before-0.6.16",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            ARMED,
            form_answer(403, json={"detail": "API Key Guard: no"}, headers={"X-API-Key-Guard": "enforce"}),
            [],
            1,
            [
                "verdict: NOT OK - cannot tell if armed at startup",
                *OK_FUNCTION_LINES,
                *LIVE_OK,
                "armed at startup: cannot tell - API Key Guard itself denied GET /api/v1/configs/connections (403); "
                "use an admin session token (JWT), or allow the path in the valve api_key_allowed_endpoints_admin. "
                "Server said: API Key Guard: no",
            ],
            id="armed-at-startup-unreadable",
        ),
        pytest.param(
            KEY,
            None,
            None,
            None,
            ON,
            [],
            1,
            [
                "verdict: NOT OK - function api_key_guard is not installed",
                "installed: no (id api_key_guard)",
                NO_COPIES,
                STARTUP_YES,
            ],
            id="not-installed",
        ),
    ],
)
def test_status(server, cli, local, defaults, expand, slept, credential, state, stored, probe, form, argv, code, lines):
    held = defaults if stored == "defaults" else stored
    if state is None:
        server.get(FN, status=401, json=NOT_FOUND)
        server.get(EXPORT, json=[])
    else:
        mode, policy, counters = probe
        live = local.policy(held) if policy == "stored" else policy
        flags = {name: value for name, value in state.items() if name != "content"}
        held_function = function(state.get("content", local.content), **flags)
        server.get(FN, json=held_function, headers=guard_headers(mode, live, counters))
        server.get(EXPORT, json=[held_function])
        server.get(f"{FN}/valves", **json_body(held))
    server.add(**form)
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    expected = [
        expand(line).replace("{empty}", local.policy({})).replace("{invalid}", local.policy(held)) for line in lines
    ]
    assert cli("status", "--url", URL, "--api-key", credential, *argv) == (code, expected + POSTURE_012_LINES, [])
    assert {method for method, _ in sent(server)} == {"GET"}


STALE = ("enforce", "0123456789ab")  # a worker still acting on the valves it cached before the save
IN_FORCE = ("enforce", "stored")


@pytest.mark.parametrize(
    "probes, slept_for, code",
    [
        pytest.param([STALE, STALE, IN_FORCE], [0.2] * 2, 0, id="stale-worker-catches-up-within-the-ttl"),
        pytest.param([STALE] * 13, [0.2] * 12, 1, id="never-catches-up-in-2.5-s"),
        pytest.param([(None, None)] * 13, [0.2] * 12, 1, id="never-armed"),
    ],
)
def test_status_gives_a_stale_worker_the_guards_refresh_time(
    server, cli, local, defaults, slept, probes, slept_for, code
):
    """Right after a save, a worker may still act on the valves it cached (2 s): status probes before judging."""
    headers = [guard_headers(mode, local.policy(defaults) if policy == "stored" else policy) for mode, policy in probes]
    server.get(FN, json=function(local.content), headers=headers[0])
    server.get(EXPORT, json=[function(local.content)])
    server.get(f"{FN}/valves", json=defaults)
    for probe in headers[1:]:
        server.get(FN, json=function(local.content), headers=probe)
    server.get(CONNECTIONS, json=CACHE_ON)
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    assert cli("status", *ARGS)[0] == code
    assert slept == slept_for
    assert [call.request.headers.get("Connection") for call in server.calls[3:-3]] == ["close"] * len(slept_for)


def posture(enabled: bool, users: bool, restricted: bool = False, allowed: str = "") -> dict:
    return {
        "api_keys_enabled": enabled,
        "users_may_hold_keys": users,
        "server_endpoint_restriction": {"enabled": restricted, "allowed_endpoints": allowed},
    }


@pytest.mark.parametrize(
    "config, permissions, lines, facts",
    [
        pytest.param(
            CONFIG_012, PERMISSIONS_012, POSTURE_012_LINES, posture(True, False), id="0.12-keys-admin-only-by-default"
        ),
        pytest.param(
            {
                "ENABLE_API_KEYS": True,
                "ENABLE_API_KEYS_ENDPOINT_RESTRICTIONS": True,
                "API_KEYS_ALLOWED_ENDPOINTS": "/api/models",
            },
            {"features": {"api_keys": True}},
            [
                "api keys: enabled",
                "server endpoint restriction: on (/api/models)",
                "users may hold keys: yes (default permission features.api_keys is on)",
            ],
            posture(True, True, True, "/api/models"),
            id="0.12-users-granted-restricted",
        ),
        pytest.param(
            {"ENABLE_API_KEY": True, "ENABLE_API_KEY_ENDPOINT_RESTRICTIONS": False, "API_KEY_ALLOWED_ENDPOINTS": ""},
            {"features": {"web_search": True}},
            [
                "api keys: enabled",
                "server endpoint restriction: off",
                "users may hold keys: yes (Open WebUI 0.6.x has no features.api_keys permission: any user may)",
            ],
            posture(True, True),
            id="0.6-every-user-may-hold-a-key",
        ),
        pytest.param(
            {"ENABLE_API_KEY": False, "ENABLE_API_KEY_ENDPOINT_RESTRICTIONS": False, "API_KEY_ALLOWED_ENDPOINTS": ""},
            {"features": {}},
            [
                "api keys: disabled",
                "server endpoint restriction: off",
                "users may hold keys: no (API keys are disabled on the server)",
            ],
            posture(False, False),
            id="0.6-keys-disabled",
        ),
    ],
)
def test_status_reports_server_api_key_posture(server, cli, local, defaults, config, permissions, lines, facts):
    server.get(FN, json=function(local.content), headers=guard_headers("enforce", local.policy(defaults)))
    server.get(EXPORT, json=[function(local.content)])
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    server.get(CONFIG, json=config)
    server.get(PERMISSIONS, json=permissions)

    code, out, err = cli("status", *ARGS)
    json_code, json_out, json_err = cli("status", "--json", *ARGS)

    assert (code, out[-3:], err) == (0, lines, [])
    assert (json_code, json_err) == (0, [])
    assert {name: json.loads("\n".join(json_out))[name] for name in facts} == facts


@pytest.mark.parametrize(
    "installed, probe, form, code, facts",
    [
        pytest.param(
            True,
            ARMED,
            CACHE_ON,
            0,
            {
                "installed": True,
                "active": True,
                "global": True,
                "current": True,
                "server_version": "{version}",
                "valves_valid": True,
                "valves_errors": [],
                "route_guard_armed": True,
                "policy_in_force": True,
                "stored_policy": "{policy}",
                "live_policy": "{policy}",
                "rate_limit_counters": "per-worker",
                "rate_limit_cause": None,
                "armed_at_startup": True,
                "copies": [{"id": "api_key_guard", "active": True, "global": True}],
                "copies_error": None,
                "ok": True,
                "verdict": "OK - API Key Guard {version} is installed, active, global and current; route guard armed; "
                "policy in force; armed at startup",
            },
            id="ok",
        ),
        pytest.param(
            True,
            (None, None, None),
            CACHE_OFF,
            1,
            {
                "installed": True,
                "active": True,
                "global": True,
                "current": True,
                "server_version": "{version}",
                "valves_valid": True,
                "valves_errors": [],
                "route_guard_armed": False,
                "policy_in_force": None,
                "stored_policy": "{policy}",
                "live_policy": None,
                "rate_limit_counters": None,
                "rate_limit_cause": None,
                "armed_at_startup": False,
                "copies": [{"id": "api_key_guard", "active": True, "global": True}],
                "copies_error": None,
                "ok": False,
                "verdict": "NOT OK - route guard is not armed; not armed at startup",
            },
            id="not-armed-now-nor-at-startup",
        ),
        pytest.param(
            False,
            None,
            CACHE_ON,
            1,
            {
                "installed": False,
                "active": False,
                "global": False,
                "current": False,
                "server_version": None,
                "valves_valid": None,
                "valves_errors": [],
                "route_guard_armed": None,
                "policy_in_force": None,
                "stored_policy": None,
                "live_policy": None,
                "rate_limit_counters": None,
                "rate_limit_cause": None,
                "armed_at_startup": True,
                "copies": [],
                "copies_error": None,
                "ok": False,
                "verdict": "NOT OK - function api_key_guard is not installed",
            },
            id="not-installed",
        ),
    ],
)
def test_status_json(server, cli, local, defaults, expand, installed, probe, form, code, facts):
    if installed:
        mode, _, counters = probe
        server.get(FN, json=function(local.content), headers=guard_headers(mode, local.policy(defaults), counters))
        server.get(f"{FN}/valves", json=defaults)
    else:
        server.get(FN, status=401, json=NOT_FOUND)
    server.get(EXPORT, json=[function(local.content)] if installed else [])
    server.get(CONNECTIONS, json=form)
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    json_code, out, err = cli("status", "--json", "--url", URL, "--api-key", KEY)

    expected = {name: expand(value) if isinstance(value, str) else value for name, value in facts.items()}
    assert (json_code, err) == (0 if code == 0 else 1, [])
    assert json.loads("\n".join(out)) == {**expected, "local_version": local.version, **posture(True, False)}


# ---------------------------------------------------------------------------
# status: the copies of the guard on the server (a clone, a trial install under another id)
# ---------------------------------------------------------------------------
GUARD_CONTENT = "{guard}"  # stands for the local guard file's content
MARKED = '"""\ntitle: Guard Clone\n"""\nHOOKS_ATTR = "_api_key_guard_hooks"\n'
TWO_ACTIVE = (
    "  2 copies are active: every active copy judges each API-key request and the strictest answer wins, and the "
    "server logs an ERROR about it; delete or deactivate api_key_guard_copy (keep api_key_guard)"
)
UNLISTED = "copies: cannot tell - could not list the server's functions: "


def test_the_guard_file_has_the_marker_line_install_looks_for(install, local):
    assert (install.GUARD_MARKER in local.content.splitlines(), install.GUARD_MARKER) == (
        True,
        f'HOOKS_ATTR = "{local.module.HOOKS_ATTR}"',
    )


@pytest.mark.parametrize(
    "kind, content, copy",
    [
        pytest.param("filter", MARKED, True, id="filter-with-the-marker-line"),
        pytest.param("filter", MARKED.replace("\n", "\r\n"), True, id="crlf-line-endings"),
        pytest.param("filter", "class Filter:\n    pass\n", False, id="another-filter"),
        pytest.param("pipe", MARKED, False, id="pipe-with-the-marker"),
        pytest.param("action", MARKED, False, id="action-with-the-marker"),
        pytest.param("filter", f"NOTE = {MARKED.splitlines()[-1]!r}\n", False, id="marker-inside-another-line"),
        pytest.param("filter", "", False, id="empty"),
    ],
)
def test_a_copy_is_a_filter_with_the_marker_line(install, kind, content, copy):
    assert install.is_guard_copy(install.ListedFunction(id="f", type=kind, content=content)) is copy


@pytest.mark.parametrize(
    "copies, unlisted, lines, problem",
    [
        pytest.param([], "", [NO_COPIES], "", id="none"),
        pytest.param([("api_key_guard", True, True)], "", ["copies: api_key_guard (the only one)"], "", id="only-this"),
        pytest.param(
            [("api_key_guard_trial", True, False)],
            "",
            ["copies: api_key_guard_trial (active, not global; the only one)"],
            "",
            id="only-one-under-another-id",
        ),
        pytest.param(
            [("api_key_guard", True, True), ("api_key_guard_trial", False, False)],
            "",
            ["copies: api_key_guard (active, global; installed here), api_key_guard_trial (inactive)"],
            "",
            id="clone-inactive",
        ),
        pytest.param(
            [("api_key_guard", True, True), ("api_key_guard_copy", True, False)],
            "",
            [
                "copies: api_key_guard (active, global; installed here), api_key_guard_copy (active, not global)",
                TWO_ACTIVE,
            ],
            "2 copies of the guard are active (api_key_guard, api_key_guard_copy)",
            id="two-active",
        ),
        pytest.param(
            [("api_key_guard", False, True), ("a_copy", True, True), ("b_copy", True, False)],
            "",
            [
                "copies: api_key_guard (inactive; installed here), a_copy (active, global), "
                "b_copy (active, not global)",
                "  2 copies are active: every active copy judges each API-key request and the strictest answer wins, "
                "and the server logs an ERROR about it; delete or deactivate all but one of a_copy, b_copy",
            ],
            "2 copies of the guard are active (a_copy, b_copy)",
            id="two-active-neither-this-id",
        ),
        pytest.param(None, "boom", [f"{UNLISTED}boom"], "", id="not-listable"),
    ],
)
def test_copies_report(install, copies, unlisted, lines, problem):
    listed = copies and [install.ListedFunction(id=i, type="filter", is_active=a, is_global=g) for i, a, g in copies]
    assert install.copies_report("api_key_guard", listed, unlisted) == (lines, problem)


ONE_COPY = [{"id": "api_key_guard", "active": True, "global": True}]


def with_local_guard(local, answer: dict) -> dict:
    """A table's export answer with GUARD_CONTENT replaced by the local guard file's content."""
    if not isinstance(answer.get("json"), list):
        return answer
    listed = [
        entry | {"content": local.content} if entry["content"] == GUARD_CONTENT else entry for entry in answer["json"]
    ]
    return answer | {"json": listed}


@pytest.mark.parametrize(
    "listing, code, verdict, lines, facts",
    [
        pytest.param(
            {"json": [function(GUARD_CONTENT)]},
            0,
            OK_VERDICT,
            ["copies: api_key_guard (the only one)"],
            {"copies": ONE_COPY, "copies_error": None, "ok": True},
            id="one-copy",
        ),
        pytest.param(
            {
                "json": [
                    function(GUARD_CONTENT, function_id="api_key_guard_trial", active=False, is_global=False),
                    function(GUARD_CONTENT),
                ]
            },
            0,
            OK_VERDICT,
            ["copies: api_key_guard (active, global; installed here), api_key_guard_trial (inactive)"],
            {
                "copies": [*ONE_COPY, {"id": "api_key_guard_trial", "active": False, "global": False}],
                "copies_error": None,
                "ok": True,
            },
            id="clone-inactive",
        ),
        pytest.param(
            {
                "json": [
                    function(GUARD_CONTENT, function_id="api_key_guard_copy", is_global=False),
                    function(GUARD_CONTENT),
                ]
            },
            1,
            "verdict: NOT OK - 2 copies of the guard are active (api_key_guard, api_key_guard_copy)",
            [
                "copies: api_key_guard (active, global; installed here), api_key_guard_copy (active, not global)",
                TWO_ACTIVE,
            ],
            {
                "copies": [*ONE_COPY, {"id": "api_key_guard_copy", "active": True, "global": False}],
                "copies_error": None,
                "ok": False,
            },
            id="two-active",
        ),
        pytest.param(
            {
                "json": [
                    function(GUARD_CONTENT),
                    function(GUARD_CONTENT, function_id="guard_pipe", kind="pipe"),
                    function(GUARD_CONTENT, function_id="guard_action", kind="action"),
                    function("class Filter:\n    pass\n", function_id="rate_limiter"),
                ]
            },
            0,
            OK_VERDICT,
            ["copies: api_key_guard (the only one)"],
            {"copies": ONE_COPY, "copies_error": None, "ok": True},
            id="pipe-action-and-other-filters-ignored",
        ),
        pytest.param(
            {"status": 500, "json": {"detail": "database is locked"}},
            0,
            OK_VERDICT,
            [
                f"{UNLISTED}the server answered GET /api/v1/functions/export with 500 Internal Server Error. "
                "Server said: database is locked"
            ],
            {
                "copies": None,
                "copies_error": "the server answered GET /api/v1/functions/export with 500 Internal Server Error. "
                "Server said: database is locked",
                "ok": True,
            },
            id="list-fails",
        ),
        pytest.param(
            {"status": 403, "json": {"detail": f"no export for {KEY}"}, "headers": {"X-API-Key-Guard": "enforce"}},
            0,
            OK_VERDICT,
            [
                f"{UNLISTED}API Key Guard itself denied GET /api/v1/functions/export (403); use an admin session "
                "token (JWT), or allow the path in the valve api_key_allowed_endpoints_admin. Server said: no export "
                "for sk-…wxyz"
            ],
            {
                "copies": None,
                "copies_error": "API Key Guard itself denied GET /api/v1/functions/export (403); use an admin session "
                "token (JWT), or allow the path in the valve api_key_allowed_endpoints_admin. Server said: no export "
                "for sk-…wxyz",
                "ok": True,
            },
            id="list-denied-key-masked",
        ),
    ],
)
def test_status_lists_the_copies_of_the_guard(
    server, cli, local, defaults, expand, listing, code, verdict, lines, facts
):
    """One request, the function export (content, no valves), finds every filter that is the guard."""
    server.get(FN, json=function(local.content), headers=guard_headers("enforce", local.policy(defaults)))
    server.get(EXPORT, **with_local_guard(local, listing))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    text = cli("status", *ARGS)
    json_code, json_out, _ = cli("status", "--json", *ARGS)

    expected = [verdict, *OK_FUNCTION_LINES[:-1], *lines, *LIVE_OK, STARTUP_YES]
    assert text == (code, [*map(expand, expected), *POSTURE_012_LINES], [])
    assert (json_code, {name: json.loads("\n".join(json_out))[name] for name in facts}) == (code, facts)
    assert [path for _, path in sent(server) if "/export" in path] == ["/api/v1/functions/export"] * 2  # one each


# ---------------------------------------------------------------------------
# uninstall
# ---------------------------------------------------------------------------
USAGE_KEPT = (
    "usage table api_key_guard_usage stays in Open WebUI's database (2 rows); "
    "`install.py uninstall --drop-usage` removes it"
)


@pytest.mark.parametrize(
    "present, flags, lines, calls",
    [
        pytest.param(
            True,
            [],
            ["deleted function api_key_guard", USAGE_KEPT],
            [("GET", FN_PATH), ("GET", f"{FN_PATH}/usage?since=2000-01-01"), ("DELETE", f"{FN_PATH}/delete")],
            id="present-usage-kept",
        ),
        pytest.param(
            True,
            ["--drop-usage"],
            ["deleted function api_key_guard", "dropped the usage table api_key_guard_usage"],
            [("GET", FN_PATH), ("DELETE", f"{FN_PATH}/usage"), ("DELETE", f"{FN_PATH}/delete")],
            id="present-usage-dropped",
        ),
        pytest.param(False, [], ["api_key_guard is not installed; nothing to do"], [("GET", FN_PATH)], id="absent"),
    ],
)
def test_uninstall(server, cli, local, present, flags, lines, calls):
    if present:
        server.get(FN, json=function(local.content))
        if flags:
            server.delete(f"{FN}/usage", json={"dropped": "api_key_guard_usage"})
        else:
            server.get(f"{FN}/usage", json={"rows": [{"decision": "allow"}, {"decision": "deny"}]})
        server.delete(f"{FN}/delete", json=True)
    else:
        server.get(FN, status=401, json=NOT_FOUND)

    assert cli("uninstall", "--url", URL, "--api-key", KEY, *flags) == (0, lines, [])
    assert sent(server) == calls


# ---------------------------------------------------------------------------
# errors: one line on stderr, the right exit code, the credential never shown
# ---------------------------------------------------------------------------
def answer(status: int = 200, method: str = "GET", url: str = FN, **kwargs) -> dict:
    return {"method": method, "url": url, "status": status, **kwargs}


ABSENT = answer(401, json=NOT_FOUND)
ERROR_CASES = [
    # usage and input: exit 2, nothing sent
    pytest.param(["--api-key", KEY], None, [], "error: --url is required (or set OPENWEBUI_URL)", 2, id="no-url"),
    pytest.param(
        ["--url", URL], None, [], "error: --api-key is required (or set OPENWEBUI_API_KEY)", 2, id="no-api-key"
    ),
    pytest.param(
        ["--url", "owui.test:8080", "--api-key", KEY],
        None,
        [],
        "error: invalid --url 'owui.test:8080': expected http:// or https:// and a host, e.g. http://localhost:8080",
        2,
        id="url-without-scheme",
    ),
    pytest.param(
        ["--url", "ftp://owui.test", "--api-key", KEY],
        None,
        [],
        "error: invalid --url 'ftp://owui.test': expected http:// or https:// and a host, e.g. http://localhost:8080",
        2,
        id="url-not-http",
    ),
    pytest.param(
        ["--url", "https://", "--api-key", KEY],
        None,
        [],
        "error: invalid --url 'https://': expected http:// or https:// and a host, e.g. http://localhost:8080",
        2,
        id="url-without-host",
    ),
    pytest.param(
        [*ARGS, "--ca-bundle", "{tmp}/missing.pem"],
        None,
        [],
        "error: --ca-bundle {tmp}/missing.pem: no such file",
        2,
        id="ca-bundle-missing",
    ),
    pytest.param(
        [*ARGS, "--id", "Guard-1"],
        None,
        [],
        "install.py install: error: argument --id: expected lowercase letters, digits and underscores "
        "(an Open WebUI id)",
        2,
        id="bad-function-id",
    ),
    pytest.param(
        [*ARGS, "--valves", "{tmp}/valves.json"],
        '{"mode": "monitor",\n  oops}',
        [],
        "error: invalid valves file {tmp}/valves.json: line 2 column 3: "
        "Expecting property name enclosed in double quotes",
        2,
        id="valves-file-bad-json",
    ),
    pytest.param(
        [*ARGS, "--valves", "{tmp}/valves.json"],
        '["mode"]',
        [],
        "error: invalid valves file {tmp}/valves.json: expected a JSON object of valve names to values",
        2,
        id="valves-file-not-object",
    ),
    pytest.param(
        [*ARGS, "--valves", "{tmp}/nothing.json"],
        None,
        [],
        "error: cannot read valves file {tmp}/nothing.json: No such file or directory",
        2,
        id="valves-file-missing",
    ),
    pytest.param(
        [*ARGS, "--valves", "{tmp}/valves.json"],
        '{"colour": "blue"}',
        [],
        "error: unknown valve colour; valid names: {all}",
        2,
        id="valves-file-unknown-name",
    ),
    pytest.param(
        [*ARGS, "--set", "colour=blue", "--set", "mode=monitor"],
        None,
        [],
        "error: unknown valve colour; valid names: {all}",
        2,
        id="set-unknown-name",
    ),
    pytest.param(
        [*ARGS, "--set", "mode"], None, [], "error: --set expects NAME=VALUE, got 'mode'", 2, id="set-without-value"
    ),
    pytest.param(
        [*ARGS, "--set", "mode", "--set", "priority=high", "--set", "api_key_roles=root", "--set", "colour=blue"],
        None,
        [],
        "error: --set expects NAME=VALUE, got 'mode'; invalid valves: valve priority: Input should be a valid "
        "integer, unable to parse string as an integer; valve api_key_roles: Value error, expected roles from admin, "
        "user, pending, got 'root'; unknown valve colour; valid names: {all}",
        2,
        id="every-valve-problem-in-one-error-nothing-sent",
    ),
    pytest.param(
        [*ARGS, "--valves", "{tmp}/valves.json", "--set", "colour=blue"],
        '["mode"]',
        [],
        "error: invalid valves file {tmp}/valves.json: expected a JSON object of valve names to values; unknown "
        "valve colour; valid names: {all}",
        2,
        id="valves-file-and-set-problems-together",
    ),
    pytest.param(
        [],
        None,
        [],
        "error: --url is required (or set OPENWEBUI_URL)\nerror: --api-key is required (or set OPENWEBUI_API_KEY)",
        2,
        id="no-url-no-key-both-said",
    ),
    pytest.param(
        ["--url", "http://owui.test", "--api-key", KEY, "--file", "{tmp}/nothing.py"],
        None,
        [],
        INSECURE_REFUSED.replace("{host}", "owui.test") + "\nerror: cannot read the guard file {tmp}/nothing.py: "
        "No such file or directory; put api_key_guard.py next to install.py or pass --file PATH",
        2,
        id="plain-http-and-missing-guard-file-both-said",
    ),
    pytest.param(
        [*ARGS, "--set", "priority=high"],
        None,
        [],
        "error: invalid valves: valve priority: Input should be a valid integer, unable to parse string as an integer",
        2,
        id="set-invalid-int",
    ),
    pytest.param(
        [*ARGS, "--set", "api_key_roles=root"],
        None,
        [],
        "error: invalid valves: valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'",
        2,
        id="set-invalid-roles",
    ),
    # network and TLS: exit 3
    pytest.param(
        ARGS,
        None,
        [answer(body=requests.exceptions.ConnectionError("Connection refused"))],
        "error: cannot reach https://owui.test: Connection refused",
        3,
        id="unreachable",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(body=requests.exceptions.SSLError("certificate verify failed: self-signed certificate"))],
        "error: TLS verification failed for https://owui.test: certificate verify failed: self-signed certificate; "
        "pass --ca-bundle PATH with the CA that signed the server's certificate",
        3,
        id="tls-failure",
    ),
    # answers: exit 3
    pytest.param(
        ARGS,
        None,
        [answer(401, json={"detail": "Your session has expired or the token is invalid. Please sign in again."})],
        "error: the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY (got sk-…wxyz). "
        "Server said: Your session has expired or the token is invalid. Please sign in again.",
        3,
        id="401-bad-key",
    ),
    pytest.param(
        ["--url", URL, "--api-key", JWT],
        None,
        [answer(401, json={"detail": "Your session has expired or the token is invalid. Please sign in again."})],
        "error: the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY (got session). "
        "Server said: Your session has expired or the token is invalid. Please sign in again.",
        3,
        id="401-bad-session-token",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(401, json={"detail": f"invalid key {KEY}"})],
        "error: the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY (got sk-…wxyz). "
        "Server said: invalid key sk-…wxyz",
        3,
        id="401-server-echoes-key-masked",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(401, json={"detail": "You do not have permission to access this resource."})],
        "error: the key is not an administrator's (401); use an admin's API key or token. "
        "Server said: You do not have permission to access this resource.",
        3,
        id="401-not-admin",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(403, json={"detail": "Use of API key is not enabled in the environment."})],
        "error: the server refused the credential (403): API keys are disabled or restricted on this server; "
        "use an admin session token (JWT) or check its API key settings. "
        "Server said: Use of API key is not enabled in the environment.",
        3,
        id="403-forbidden",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(403, json={"detail": "API Key Guard: no"}, headers={"X-API-Key-Guard": "enforce"})],
        "error: API Key Guard itself denied GET /api/v1/functions/id/api_key_guard (403); use an admin session "
        "token (JWT), or allow the path in the valve api_key_allowed_endpoints_admin. Server said: API Key Guard: no",
        3,
        id="403-denied-by-the-guard",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(404, json={"detail": "Not Found"})],
        "error: functions API not found: Open WebUI too old, or functions disabled "
        "(GET /api/v1/functions/id/api_key_guard gave 404)",
        3,
        id="404-functions-api",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(500, json={"detail": "database is locked"})],
        "error: the server answered GET /api/v1/functions/id/api_key_guard with 500 Internal Server Error. "
        "Server said: database is locked",
        3,
        id="500-with-detail",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(502, body="<html>upstream down</html>", content_type="text/html")],
        "error: the server answered GET /api/v1/functions/id/api_key_guard with 502 Bad Gateway.",
        3,
        id="502-html-page",
    ),
    pytest.param(
        ARGS,
        None,
        [ABSENT, answer(url=CONNECTIONS, json=CACHE_ON), answer(500, "POST", CREATE, json={"detail": "boom"})],
        "error: the server answered POST /api/v1/functions/create with 500 Internal Server Error. Server said: boom",
        3,
        id="500-on-create",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(body="<html>login</html>", content_type="text/html")],
        "error: GET /api/v1/functions/id/api_key_guard answered 200 with a non-JSON body (text/html); "
        "is --url the Open WebUI address?",
        3,
        id="200-not-json",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(json={"models": []})],
        "error: GET /api/v1/functions/id/api_key_guard answered unexpected JSON (is_active: Field required); "
        "is --url the Open WebUI address?",
        3,
        id="200-unexpected-json",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(302, headers={"Location": "https://sso.example/login"})],
        "error: the server redirected GET /api/v1/functions/id/api_key_guard to https://sso.example/login (302); "
        "the API key was not sent there. Pass the final address as --url",
        3,
        id="302-redirect-refused",
    ),
    pytest.param(
        ["status", *ARGS],
        None,
        [answer(307, headers={"Location": "http://elsewhere.example/api/v1/functions/id/api_key_guard"})],
        "error: the server redirected GET /api/v1/functions/id/api_key_guard to "
        "http://elsewhere.example/api/v1/functions/id/api_key_guard (307); the API key was not sent there. "
        "Pass the final address as --url",
        3,
        id="status-307-redirect-refused",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(429, json={"detail": "Too Many Requests"}, headers={"Retry-After": "120"})],
        "error: the server answered GET /api/v1/functions/id/api_key_guard with 429 Too Many Requests and asks to "
        "wait 120 s: more than install.py waits for rate limits (30 s in a run, 0 s spent); try again later. "
        "Server said: Too Many Requests",
        3,
        id="429-retry-after-beyond-the-cap",
    ),
    # a password in a URL: never shown, wherever it comes from
    pytest.param(
        ["--url", f"ftp://admin:{URL_PASSWORD}@owui.test", "--api-key", KEY],
        None,
        [],
        "error: invalid --url 'ftp://***@owui.test': expected http:// or https:// and a host, e.g. "
        "http://localhost:8080",
        2,
        id="url-password-not-http",
    ),
    pytest.param(
        ["--url", f"https://admin:{URL_PASSWORD[:6]}/{URL_PASSWORD[6:]}@owui.test", "--api-key", KEY],
        None,
        [],
        "error: invalid --url 'https://***@owui.test': expected http:// or https:// and a host, e.g. "
        "http://localhost:8080",
        2,
        id="url-password-with-a-slash-is-no-port",
    ),
    pytest.param(
        ["--url", f"http://admin:{URL_PASSWORD}@owui.test", "--api-key", KEY],
        None,
        [],
        INSECURE_REFUSED.replace("{host}", "owui.test"),
        2,
        id="url-password-plain-http-refused",
    ),
    pytest.param(
        ["status", URL_WITH_PASSWORD, "--api-key", KEY],
        None,
        [],
        "install.py: error: unrecognized arguments: https://admin:***@owui.test",
        2,
        id="url-without-its-flag-echoed-by-argparse",
    ),
    pytest.param(
        ["--url", URL_WITH_PASSWORD, "--api-key", KEY],
        None,
        [answer(302, headers={"Location": f"https://sso:{URL_PASSWORD}@sso.example/login"})],
        f"{USERINFO_WARNING}\nerror: the server redirected GET /api/v1/functions/id/api_key_guard to "
        "https://sso:***@sso.example/login (302); the API key was not sent there. Pass the final address as --url",
        3,
        id="url-password-in-the-redirect-location",
    ),
    pytest.param(
        ["--url", URL_WITH_PASSWORD, "--api-key", KEY],
        None,
        [answer(500, json={"detail": f"upstream https://svc:{URL_PASSWORD}@db.internal failed"})],
        f"{USERINFO_WARNING}\nerror: the server answered GET /api/v1/functions/id/api_key_guard with 500 Internal "
        "Server Error. Server said: upstream https://svc:***@db.internal failed",
        3,
        id="url-password-echoed-by-the-server",
    ),
    pytest.param(
        ["--url", URL_WITH_PASSWORD, "--api-key", KEY],
        None,
        [answer(body=requests.exceptions.ConnectionError(f"Failed to resolve {URL_WITH_PASSWORD}"))],
        f"{USERINFO_WARNING}\nerror: cannot reach https://owui.test: Failed to resolve https://admin:***@owui.test",
        3,
        id="url-password-in-a-network-error",
    ),
    pytest.param(
        ["uninstall", *ARGS],
        None,
        [
            answer(json=function("x")),
            answer(url=f"{FN}/usage", json={"rows": []}),
            answer(method="DELETE", url=f"{FN}/delete", json=False),
        ],
        "error: the server did not delete function api_key_guard; check the server log",
        3,
        id="uninstall-not-deleted",
    ),
    pytest.param(
        ["explain", *ARGS],
        None,
        [],
        "error: --user is required: the email or id of the user to explain",
        2,
        id="explain-no-user",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "a@x", "--method", "GET"],
        None,
        [],
        "error: --method needs --path or --model: the request to judge",
        2,
        id="explain-method-alone",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "a@x", "--path", "api/models"],
        None,
        [],
        "install.py explain: error: argument --path: expected a path starting with /, e.g. /api/chat/completions",
        2,
        id="explain-path-without-slash",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "bob@example.com"],
        None,
        [
            answer(
                404,
                url=f"{EXPLAIN}?user=bob%40example.com",
                json={"detail": "API Key Guard: no user 'bob@example.com' on this server"},
            )
        ],
        "error: no user 'bob@example.com' on this server (--user takes a user's email or id)",
        2,
        id="explain-unknown-user",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "alice@example.com"],
        None,
        [answer(404, url=f"{EXPLAIN}?{ALICE}", json={"detail": "Not Found"}), ABSENT],
        "error: function api_key_guard is not installed; install.py installs it",
        3,
        id="explain-not-installed",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "alice@example.com"],
        None,
        [answer(404, url=f"{EXPLAIN}?{ALICE}", json={"detail": "Not Found"}), answer(json=function(OLD_CONTENT))],
        "error: the guard api_key_guard on the server (version 0.0.9) does not answer explain: it is older than "
        "explain, not active, or not loaded since a restart; `install.py status` says which, `install.py` fixes it",
        3,
        id="explain-guard-without-explain",
    ),
    pytest.param(
        ["explain", *ARGS, "--user", "alice@example.com"],
        None,
        [answer(500, url=f"{EXPLAIN}?{ALICE}", json={"detail": "API Key Guard could not explain"})],
        f"error: the server answered GET {FN_PATH}/explain?{ALICE} with 500 Internal Server Error. Server said: "
        "API Key Guard could not explain",
        3,
        id="explain-guard-failed",
    ),
]


def run_error_case(server, cli, tmp_path, expand, argv, valves_file, answers) -> tuple[int, list[str], list[str]]:
    if valves_file is not None:
        (tmp_path / "valves.json").write_text(valves_file)
    for reply in answers:
        server.add(**reply)
    return cli(*(expand(arg) for arg in argv))


@pytest.mark.parametrize("argv, valves_file, answers, error, code", ERROR_CASES)
def test_errors(server, cli, tmp_path, expand, argv, valves_file, answers, error, code):
    result_code, out, err = run_error_case(server, cli, tmp_path, expand, argv, valves_file, answers)

    assert (result_code, out) == (code, [])
    if error.startswith(("error: ", "warning: ")):
        assert err == expand(error).splitlines()  # one line per problem, no traceback
    else:  # argparse's own message, after its usage lines
        assert err[-1] == error
    assert len(server.calls) == len(answers)  # a redirect is never followed


@pytest.mark.parametrize("argv, valves_file, answers, error, code", ERROR_CASES)
def test_errors_never_show_the_key(server, cli, tmp_path, expand, argv, valves_file, answers, error, code):
    _, out, err = run_error_case(server, cli, tmp_path, expand, argv, valves_file, answers)

    shown = "\n".join(out + err)
    for secret in (KEY, JWT):
        assert secret[:-4] not in shown  # the whole credential, and all but the 4 characters a fingerprint shows


@pytest.mark.parametrize("argv, valves_file, answers, error, code", ERROR_CASES)
def test_errors_never_show_a_url_password(server, cli, tmp_path, expand, argv, valves_file, answers, error, code):
    """Every error case again with user:password@ in --url: the same outcome, the same requests, no password."""
    argv = [URL_WITH_PASSWORD if arg == URL else arg for arg in argv]
    result_code, out, err = run_error_case(server, cli, tmp_path, expand, argv, valves_file, answers)

    assert (result_code, len(server.calls), URL_PASSWORD in "\n".join(out + err)) == (code, len(answers), False)
    assert all(call.request.url.startswith(URL + "/") for call in server.calls)  # never to admin:...@


# ---------------------------------------------------------------------------
# Credentials: the key is what is sent, to no one in clear text, and a URL's password never shows
# ---------------------------------------------------------------------------
def healthy_status(server, local, defaults, url: str = URL) -> None:
    """A server's answers to one `status` of a guard installed, armed and in force."""
    fn = url + FN_PATH
    server.get(fn, json=function(local.content), headers=guard_headers("enforce", local.policy(defaults)))
    server.get(f"{url}/api/v1/functions/export", json=[function(local.content)])
    server.get(f"{fn}/valves", json=defaults)
    server.get(url + CONNECTIONS_PATH, json=CACHE_ON)
    server.get(f"{url}/api/v1/auths/admin/config", json=CONFIG_012)
    server.get(f"{url}/api/v1/users/default/permissions", json=PERMISSIONS_012)


@pytest.mark.parametrize(
    "netrc_at, env", [pytest.param(".netrc", "HOME", id="home-netrc"), pytest.param("creds", "NETRC", id="NETRC")]
)
def test_a_netrc_entry_for_the_host_never_replaces_the_key(
    server, cli, local, defaults, expand, tmp_path, monkeypatch, netrc_at, env
):
    """requests puts a netrc entry's login in place of an Authorization header set on the session; not the key's."""
    netrc = tmp_path / netrc_at
    netrc.write_text("machine owui.test login someone-else password their-password\n")
    netrc.chmod(0o600)  # Python's netrc ignores a ~/.netrc with a password that others may read
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv(env, str(tmp_path if env == "HOME" else netrc))
    healthy_status(server, local, defaults)

    code, out, err = cli("status", *ARGS)

    assert (code, out[0], err) == (0, expand(OK_VERDICT), [])
    assert [call.request.headers["Authorization"] for call in server.calls] == [f"Bearer {KEY}"] * 6


def current_install(server, local, defaults) -> None:
    """A server's answers to the reads of an install (or a dry run) that finds the guard current."""
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_ON)


def second_install(server, local, defaults) -> None:
    current_install(server, local, defaults)
    in_force(server, local, defaults)


def installed_then_deleted(server, local, defaults) -> None:
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/usage", json={"rows": []})
    server.delete(f"{FN}/delete", json=True)


def usage_rows(server, local, defaults) -> None:
    server.get(f"{FN}/usage", json={"rows": ROWS})


ANSWERS = {  # what the server answers each command of the table below
    "status": healthy_status,
    "install": second_install,
    "dry-run": current_install,
    "uninstall": installed_then_deleted,
    "usage": usage_rows,
    "explain": lambda server, local, defaults: server.get(f"{EXPLAIN}?{ALICE}", json=readout()),
}


@pytest.mark.parametrize(
    "argv, answers",
    [
        pytest.param(["status"], "status", id="status"),
        pytest.param(["status", "--json"], "status", id="status-json"),
        pytest.param(["install"], "install", id="install"),
        pytest.param(["install", "--dry-run"], "dry-run", id="install-dry-run"),
        pytest.param(["uninstall"], "uninstall", id="uninstall"),
        pytest.param(["usage"], "usage", id="usage"),
        pytest.param(["usage", "--json"], "usage", id="usage-json"),
        pytest.param(["usage", "--csv"], "usage", id="usage-csv"),
        pytest.param(["explain", "--user", "alice@example.com"], "explain", id="explain"),
        pytest.param(["explain", "--user", "alice@example.com", "--json"], "explain", id="explain-json"),
    ],
)
def test_url_credentials_are_neither_sent_nor_shown(server, cli, local, defaults, argv, answers):
    """Every command with user:password@ in --url: it works, says once that they are not used, never shows them."""
    ANSWERS[answers](server, local, defaults)

    code, out, err = cli(argv[0], "--url", URL_WITH_PASSWORD, "--api-key", KEY, *argv[1:])

    assert (code, err, URL_PASSWORD in "\n".join(out)) == (0, [USERINFO_WARNING], False)
    assert {(call.request.url.split("/api/")[0], call.request.headers["Authorization"]) for call in server.calls} == {
        (URL, f"Bearer {KEY}")
    }


@pytest.mark.parametrize(
    "text, shown",
    [
        pytest.param("https://admin:s3cret@owui.test/x", "https://admin:***@owui.test/x", id="user-and-password"),
        pytest.param("to https://:s3cret@h (302)", "to https://:***@h (302)", id="password-only"),
        pytest.param("'http://a:p@ss@h/x'", "'http://a:***@h/x'", id="unescaped-at-in-password"),
        pytest.param("x HTTP://A:p@h y https://b:q@i", "x HTTP://A:***@h y https://b:***@i", id="two-urls"),
        pytest.param("https://owui.test:8443/api", "https://owui.test:8443/api", id="port-is-no-password"),
        pytest.param("https://user@owui.test", "https://user@owui.test", id="user-without-password-kept"),
        pytest.param("admin@example.com: 3 rows", "admin@example.com: 3 rows", id="email-kept"),
    ],
)
def test_masked(install, text, shown):
    assert install.masked(text) == shown


def outcome(call, *args):
    """What a pure helper gives: its answer, or the message of the InstallError it raised."""
    try:
        return call(*args)
    except Exception as exc:  # the table says which
        return f"{type(exc).__name__}: {exc}"


INVALID_URL = "UsageError: invalid --url {!r}: expected http:// or https:// and a host, e.g. http://localhost:8080"


@pytest.mark.parametrize(
    "url, address",
    [
        pytest.param("https://owui.test/", ("https://owui.test", "owui.test", False, False), id="https-slash"),
        pytest.param(
            "https://admin:pw@owui.test:8443/base/",
            ("https://owui.test:8443/base", "owui.test", False, True),
            id="userinfo-taken-out",
        ),
        pytest.param("https://admin@owui.test", ("https://owui.test", "owui.test", False, True), id="user-only"),
        pytest.param("http://[::1]:8080", ("http://[::1]:8080", "::1", True, False), id="ipv6-loopback"),
        pytest.param("HTTP://LOCALHOST:3000", ("HTTP://LOCALHOST:3000", "localhost", True, False), id="upper-case"),
        pytest.param("https://u:pa/ss@h", INVALID_URL.format("https://***@h"), id="slash-in-password"),
        pytest.param("https://u:1#x@h", INVALID_URL.format("https://***@h"), id="hash-in-password"),
        pytest.param("https://h/x@y", INVALID_URL.format("https://***@y"), id="at-in-the-path"),
        pytest.param("admin:pw@owui.test", INVALID_URL.format("***@owui.test"), id="no-scheme-password-hidden"),
        pytest.param("https://owui.test:99999", INVALID_URL.format("https://owui.test:99999"), id="port-out-of-range"),
    ],
)
def test_checked_url(install, url, address):
    assert outcome(lambda: tuple(install.checked_url(url))) == address


@pytest.mark.parametrize(
    "host, loopback",
    [
        pytest.param("localhost", True, id="localhost"),
        pytest.param("127.0.0.1", True, id="127.0.0.1"),
        pytest.param("127.8.9.10", True, id="all-of-127/8"),
        pytest.param("::1", True, id="ipv6-loopback"),
        pytest.param("owui.test", False, id="a-name"),
        pytest.param("localhost.owui.test", False, id="localhost-lookalike"),
        pytest.param("127.0.0.1.nip.io", False, id="127-lookalike"),
        pytest.param("10.0.0.5", False, id="private-address"),
        pytest.param("0.0.0.0", False, id="unspecified"),  # noqa: S104 - a host name in a table
        pytest.param("::", False, id="ipv6-unspecified"),
        pytest.param("fe80::1", False, id="ipv6-link-local"),
    ],
)
def test_is_loopback(install, host, loopback):
    assert install.is_loopback(host) is loopback


@pytest.mark.parametrize(
    "url, flags, code, err",
    [
        pytest.param("http://owui.test", [], 2, [INSECURE_REFUSED.replace("{host}", "owui.test")], id="name-refused"),
        pytest.param("http://10.0.0.5:8080", [], 2, [INSECURE_REFUSED.replace("{host}", "10.0.0.5")], id="lan-refused"),
        pytest.param(
            "http://localhost.owui.test",
            [],
            2,
            [INSECURE_REFUSED.replace("{host}", "localhost.owui.test")],
            id="localhost-lookalike-refused",
        ),
        pytest.param(
            "http://owui.test",
            ["--allow-insecure-http"],
            0,
            [INSECURE_WARNING.replace("{host}", "owui.test")],
            id="allowed-warns-once",
        ),
        pytest.param("http://127.0.0.1:8080", [], 0, [], id="loopback"),
        pytest.param("http://[::1]:8080", [], 0, [], id="ipv6-loopback"),
        pytest.param("http://localhost:8080", [], 0, [], id="localhost"),
        pytest.param("https://owui.test", [], 0, [], id="https"),
        pytest.param("https://owui.test", ["--allow-insecure-http"], 0, [], id="https-flag-changes-nothing"),
    ],
)
def test_plain_http_sends_the_key_only_to_this_machine(server, cli, local, defaults, url, flags, code, err):
    """Over plain http:// the key crosses the network readable by anyone on the path: only loopback, or told."""
    if code == 0:
        healthy_status(server, local, defaults, url)

    assert cli("status", "--url", url, "--api-key", KEY, *flags)[::2] == (code, err)
    assert len(server.calls) == (6 if code == 0 else 0)  # refused: nothing sent


# ---------------------------------------------------------------------------
# 429: waited out within bounds, said in one line each time, an error once it will not lift
# ---------------------------------------------------------------------------
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "header, seconds",
    [
        pytest.param("3", 3.0, id="delta-seconds"),
        pytest.param(" 0 ", 0.0, id="zero"),
        pytest.param("Fri, 04 Dec 2026 12:00:10 GMT", 10.0, id="http-date"),
        pytest.param("Fri, 04 Dec 2026 11:59:00 GMT", 0.0, id="http-date-past"),
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("-1", None, id="negative"),
        pytest.param("1.5", None, id="fraction"),
        pytest.param("soon", None, id="garbage"),
    ],
)
def test_retry_after_seconds(install, header, seconds):
    assert install.retry_after_seconds(header, NOW) == seconds


@pytest.mark.parametrize(
    "asked, retries, waited, decision",
    [
        pytest.param(None, 0, 0.0, (1.0, ""), id="first-1-s"),
        pytest.param(None, 3, 7.0, (8.0, ""), id="fourth-8-s"),
        pytest.param(None, 4, 15.0, (None, "retries"), id="retries-used"),
        pytest.param(5.0, 0, 0.0, (5.0, ""), id="retry-after-honoured"),
        pytest.param(0.0, 0, 0.0, (0.0, ""), id="retry-after-zero"),
        pytest.param(30.0, 0, 0.0, (30.0, ""), id="retry-after-the-whole-budget"),
        pytest.param(40.0, 0, 0.0, (None, "asked"), id="retry-after-beyond-the-cap"),
        pytest.param(10.0, 1, 25.0, (None, "asked"), id="retry-after-beyond-what-is-left"),
        pytest.param(None, 2, 28.0, (None, "budget"), id="backoff-beyond-what-is-left"),
        pytest.param(1.0, 0, 30.0, (None, "budget"), id="budget-spent"),
    ],
)
def test_backoff(install, asked, retries, waited, decision):
    assert install.backoff(asked, retries, waited) == decision


def limited(retry_after: str | None = None, guard: bool = False) -> dict:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return {
        "status": 429,
        "json": {"detail": "Too Many Requests"},
        "headers": headers | guard_headers("enforce" if guard else None),
    }


USAGE_AT = "GET /api/v1/functions/id/api_key_guard/usage?since=2026-12-01"
LIMITED_ERROR = f"error: the server answered {USAGE_AT} with 429 Too Many Requests "


def waiting(seconds: int, retry: int, asked: bool = True) -> str:
    honoured = ", as its Retry-After asks" if asked else ""
    return f"rate limited (429) on {USAGE_AT}: asking again in {seconds} s{honoured} (retry {retry} of 4)"


@pytest.mark.parametrize(
    "answers, code, err, slept_for",
    [
        pytest.param([limited("2"), {}], 0, [waiting(2, 1)], [2.0], id="retry-after-honoured"),
        pytest.param(
            [limited(), limited(), {}], 0, [waiting(1, 1, False), waiting(2, 2, False)], [1, 2], id="backs-off-1-2-s"
        ),
        pytest.param(
            [limited()] * 5,
            3,
            [
                *(waiting(s, n, False) for n, s in enumerate((1, 2, 4, 8), 1)),
                LIMITED_ERROR
                + "still after 4 retries (15 s of waiting); try again later. Server said: Too Many Requests",
            ],
            [1, 2, 4, 8],
            id="still-limited-after-4-retries",
        ),
        pytest.param(
            [limited("20"), limited("20")],
            3,
            [
                waiting(20, 1),
                LIMITED_ERROR
                + "and asks to wait 20 s: more than install.py waits for rate limits (30 s in a run, 20 s "
                "spent); try again later. Server said: Too Many Requests",
            ],
            [20],
            id="retry-after-beyond-what-is-left",
        ),
        pytest.param(
            [limited("30"), limited()],
            3,
            [
                waiting(30, 1),
                LIMITED_ERROR + "and install.py has spent the 30 s it waits for rate limits in a run; try again later. "
                "Server said: Too Many Requests",
            ],
            [30],
            id="budget-spent",
        ),
        pytest.param(
            [limited("1", guard=True)] * 5,
            3,
            [
                *(waiting(1, n) for n in range(1, 5)),
                LIMITED_ERROR + "still after 4 retries (4 s of waiting); try again later. API Key Guard's valve "
                "api_key_rate_limit_admin limits this key: raise it, or use an admin session token (JWT). Server said: "
                "Too Many Requests",
            ],
            [1] * 4,
            id="the-guards-own-limit-names-its-valve",
        ),
    ],
)
def test_rate_limited_requests_are_asked_again(server, cli, slept, answers, code, err, slept_for):
    for reply in answers:
        server.get(f"{FN}/usage", **(reply or {"json": {"rows": []}}))

    assert cli("usage", *ARGS, "--since", "2026-12-01", "--json")[::2] == (code, err)
    assert (slept, len(server.calls)) == (slept_for, len(answers))


# ---------------------------------------------------------------------------
# install plans, then applies, then verifies
# ---------------------------------------------------------------------------
FOUND = {  # the function as read: content, is_active, is_global
    "current": ("current", True, True),
    "old": ("old", True, True),
    "current-inactive": ("current", False, True),
    "current-not-global": ("current", True, False),
    "old-off": ("old", False, False),
}
ARMING = {  # the connections form as read: form, armed, problem
    "off": (CACHE_OFF, False, ""),
    "on": (CACHE_ON, True, ""),
    "no-setting": (None, False, "no cache setting"),
    "unreadable": (None, None, "GET refused"),
}


@pytest.mark.parametrize(
    "found, stored, requested, arming, actions, startup_problem",
    [
        pytest.param(None, {}, {}, "off", ["create", "arm", "valves", "activate", "global"], "", id="absent-all"),
        pytest.param(None, {}, {}, None, ["create", "valves", "activate", "global"], "", id="absent-opted-out"),
        pytest.param("current", {}, {}, "on", [], "", id="current-nothing"),
        pytest.param("current", {}, {"mode": "monitor"}, "on", ["valves"], "", id="one-valve"),
        pytest.param("current", {}, {"mode": "enforce"}, "on", [], "", id="valve-already-so"),
        pytest.param("current", {"legacy": "x"}, {}, "on", ["valves"], "", id="obsolete-valve-dropped"),
        pytest.param("old", {}, {}, "on", ["update"], "", id="outdated-content"),
        pytest.param("old-off", {}, {}, "off", ["update", "arm", "activate", "global"], "", id="everything-but-valves"),
        pytest.param("current-inactive", {}, {}, "on", ["activate"], "", id="inactive"),
        pytest.param("current-not-global", {}, {}, "on", ["global"], "", id="not-global"),
        pytest.param("current", {}, {}, "no-setting", [], "no cache setting", id="no-cache-setting-said-not-written"),
        pytest.param("current", {}, {}, "unreadable", [], "GET refused", id="form-unreadable-said"),
    ],
)
def test_plan_install(install, local, defaults, found, stored, requested, arming, actions, startup_problem):
    """`stored`: on top of the defaults; the function absent (None) has none."""
    content, active, is_global = FOUND[found] if found else ("", False, False)
    function = found and install.ServerFunction(
        content=local.content if content == "current" else OLD_CONTENT, is_active=active, is_global=is_global
    )
    held = (defaults | stored) if found else {}
    plan = install.plan_install(
        "api_key_guard", local, function, held, requested, arming and install.StartupArming(*ARMING[arming])
    )
    assert ([step.action for step in plan.steps], plan.startup_problem, plan.problems) == (actions, startup_problem, [])


@pytest.mark.parametrize(
    "stored, problem",
    [
        pytest.param(
            {"priority": "high", "api_key_roles": "root"},
            "invalid valves: valve priority: Input should be a valid integer, unable to parse string as an integer; "
            "valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'",
            id="every-invalid-stored-valve-in-one-problem",
        ),
    ],
)
def test_plan_install_with_invalid_stored_valves_takes_no_step(install, local, defaults, stored, problem):
    function = install.ServerFunction(content=local.content, is_active=True, is_global=True)
    plan = install.plan_install("api_key_guard", local, function, defaults | stored, {}, None)
    assert (plan.steps, plan.problems) == ([], [problem])


STARTUP_REFUSED = (
    "error: not armed at startup: the server answered POST /api/v1/configs/connections with 500 Internal Server "
    f"Error. Server said: database is locked. {UNARMED_AFTER_RESTART}; switch on Admin Panel > Settings > "
    "Connections > Cache Base Model List (ENABLE_BASE_MODELS_CACHE), or pass --no-arm-at-startup to accept that"
)
LOCKED = {"status": 500, "json": {"detail": "database is locked"}}
NOT_ACTIVE = (
    "error: function api_key_guard is not active after install; Open WebUI switches a function off when its module "
    "fails to load: check the server log"
)
NEVER_ARMED = (
    "error: route guard is not armed 10 s after GET /api/models; look in the server log for 'api_key_guard could "
    "not arm the route guard' (with several workers, each arms on its own first model listing)"
)


@pytest.mark.parametrize(
    "argv, form_post, valves_post, read_back, code, out, errors",
    [
        pytest.param(
            [], LOCKED, None, {"mode": None}, 1, [], [STARTUP_REFUSED, NEVER_ARMED], id="arming-refused-and-never-armed"
        ),
        pytest.param(
            [],
            LOCKED,
            None,
            {"mode": None, "active": False},
            3,
            [],
            [STARTUP_REFUSED, NOT_ACTIVE],
            id="arming-refused-and-switched-off-gravest-exit-code",
        ),
        pytest.param(
            ["--set", "mode=monitor"],
            LOCKED,
            LOCKED,
            None,
            3,
            [],
            [
                STARTUP_REFUSED,
                "error: the server answered POST /api/v1/functions/id/api_key_guard/valves/update with 500 Internal "
                "Server Error. Server said: database is locked",
            ],
            id="arming-refused-then-a-write-fails-no-later-step",
        ),
        pytest.param(
            [],
            LOCKED,
            None,
            "listings-limited",
            3,
            [],
            [
                STARTUP_REFUSED,
                "error: the server answered GET /api/models with 429 Too Many Requests and asks to wait 120 s: more "
                "than install.py waits for rate limits (30 s in a run, 0 s spent); try again later. Server said: Too "
                "Many Requests",
            ],
            id="arming-refused-then-verify-cannot-read",
        ),
        pytest.param(
            ["--set", "mode=monitor"],
            None,
            {"json": {}},
            {},
            1,
            ["valves updated: mode"],
            [
                "error: the stored valves differ from what install wrote (mode); did something else write them "
                "meanwhile? Run install.py again"
            ],
            id="valves-changed-meanwhile",
        ),
        pytest.param(
            [],
            None,
            None,
            {"content": OLD_CONTENT},
            1,
            ["api_key_guard {version} is installed and current; nothing changed"],
            [
                "error: function api_key_guard on the server differs from the local file after install (server "
                "0.0.9, local {version}); did something else write it meanwhile? Run install.py again"
            ],
            id="content-changed-meanwhile",
        ),
    ],
)
def test_install_reports_every_problem_together(
    server, cli, local, defaults, expand, argv, form_post, valves_post, read_back, code, out, errors
):
    """The first problem never hides the next; the exit code is the gravest one's. `read_back`: None when
    install stops before verifying, "listings-limited" when verify's model listings stay 429, else how the
    read-back differs (the valves read back are the defaults)."""
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONNECTIONS, json=CACHE_OFF if form_post else CACHE_ON)
    if form_post:
        server.post(CONNECTIONS, **form_post)
    if valves_post:
        server.post(f"{FN}/valves/update", **valves_post)
    if read_back == "listings-limited":
        server.get(MODELS, **limited("120"))
    elif read_back is not None:
        in_force(server, local, defaults, **read_back)

    assert cli(*ARGS, *argv) == (code, [expand(line) for line in out], [expand(line) for line in errors])


# ---------------------------------------------------------------------------
# The admin's laptop: just install.py and the guard file, maybe no requests or pydantic
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python with nothing installed: no requests, no pydantic, not even pip."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    return str(venv / "bin" / "python")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["status", "--url", "http://127.0.0.1:9", "--api-key", "sk-x"], id="status"),
        pytest.param(["--help"], id="help"),
        pytest.param(["install", "--help"], id="install-help"),
        pytest.param(["--url", "http://127.0.0.1:9", "--api-key", "sk-x"], id="install"),
        pytest.param(["uninstall"], id="uninstall"),
    ],
)
def test_without_dependencies_one_line_says_what_to_run(bare_python, argv):
    done = subprocess.run([bare_python, str(INSTALL_PY), *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (
        2,
        "",
        [
            f"install.py needs requests and pydantic: run it as 'uv run {INSTALL_PY} ...' or 'pipx run "
            f"{INSTALL_PY} ...' (both read the dependencies from the script), or install them with: {bare_python} "
            '-m pip install "requests>=2.31" "pydantic>=2.7,<3"'
        ],
    )


def test_an_older_python_reaches_the_version_check():
    """macOS's python3 is 3.9: the script must parse there to say it needs 3.11 instead of a SyntaxError."""
    ast.parse(INSTALL_PY.read_text(), feature_version=(3, 8))


@pytest.mark.parametrize("argv", [pytest.param(["--help"], id="help"), pytest.param(["status"], id="status")])
def test_an_older_python_is_told_what_to_run(argv):
    older = f"import runpy, sys; sys.version_info = (3, 9, 6); sys.argv = {['install.py', *argv]!r}; "
    older += f"runpy.run_path({str(INSTALL_PY)!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", older], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"install.py needs Python 3.11 or newer (this is 3.9.6): run it as 'uv run {INSTALL_PY} ...', which "
        "fetches a suitable Python\n",
    )


def script_metadata(text: str) -> dict:
    """The PEP 723 `script` block, read the way the PEP's reference implementation reads it."""
    block = re.search(r"(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$", text)
    content = "".join(line[2:] if line.startswith("# ") else line[1:] for line in block["content"].splitlines(True))
    return tomllib.loads(content)


def test_inline_script_metadata_matches_the_projects_bounds():
    metadata = script_metadata(INSTALL_PY.read_text())
    pinned = [
        line
        for line in (ROOT / "requirements-dev.txt").read_text().split()
        if line.startswith(("requests", "pydantic"))
    ]
    assert (metadata["requires-python"], sorted(metadata["dependencies"])) == (">=3.11", sorted(pinned))


@pytest.mark.parametrize(
    "guard_at, argv",
    [
        pytest.param("api_key_guard.py", [], id="downloaded-side-by-side"),
        pytest.param("filters/api_key_guard.py", [], id="repository-layout"),
        pytest.param("elsewhere/guard.py", ["--file", "{dir}/elsewhere/guard.py"], id="file-flag"),
    ],
)
def test_finds_the_guard_file_the_admin_downloaded(server, capsys, tmp_path, local, guard_at, argv):
    """A dry run from a copy of install.py: the guard it would create is the file found in that layout."""
    shutil.copy(INSTALL_PY, tmp_path / "install.py")
    (tmp_path / guard_at).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / guard_at).write_text(local.content.replace(f"version: {local.version}", "version: 9.9.9"))
    spec = importlib.util.spec_from_file_location("install_copy", tmp_path / "install.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    server.get(FN, status=401, json=NOT_FOUND)
    server.get(CONNECTIONS, json=CACHE_ON)

    code = copy.main(["install", *ARGS, "--dry-run", *(arg.replace("{dir}", str(tmp_path)) for arg in argv)])

    assert (code, capsys.readouterr().out.splitlines()[0]) == (0, "would create function api_key_guard (version 9.9.9)")


def test_a_missing_guard_file_is_a_usage_error(server, cli, tmp_path):
    assert cli(*ARGS, "--file", str(tmp_path / "nothing.py")) == (
        2,
        [],
        [
            f"error: cannot read the guard file {tmp_path}/nothing.py: No such file or directory; put "
            "api_key_guard.py next to install.py or pass --file PATH"
        ],
    )


# ---------------------------------------------------------------------------
# usage
# ---------------------------------------------------------------------------
ROWS = [
    {
        "day": "2026-12-03",
        "user_id": "u1",
        "user_email": "a@x",
        "model": "m1",
        "decision": "allow",
        "requests": 2,
        "input_tokens": 10,
        "output_tokens": 20,
        "total_tokens": 30,
        "estimated_requests": 1,
    },
    {
        "day": "2026-12-04",
        "user_id": "u1",
        "user_email": "a@x",
        "model": "m2",
        "decision": "allow",
        "requests": 1,
        "input_tokens": 1,
        "output_tokens": 2,
        "total_tokens": 3,
        "estimated_requests": 0,
    },
    {
        "day": "2026-12-04",
        "user_id": "u2",
        "user_email": None,
        "model": "m1",
        "decision": "deny",
        "requests": 5,
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "estimated_requests": 0,
    },
]


@pytest.mark.parametrize(
    ("by", "table"),
    [
        pytest.param(
            "user",
            [
                "user      requests  input  output  total  estimated",
                "a@x (u1)  3         11     22      33     1",
                "total     3         11     22      33     1",
            ],
            id="by-user",
        ),
        pytest.param(
            "model",
            [
                "model  requests  input  output  total  estimated",
                "m1     2         10     20      30     1",
                "m2     1         1      2       3      0",
                "total  3         11     22      33     1",
            ],
            id="by-model",
        ),
        pytest.param(
            None,
            [
                "day         user      model  requests  input  output  total  estimated",
                "2026-12-03  a@x (u1)  m1     2         10     20      30     1",
                "2026-12-04  a@x (u1)  m2     1         1      2       3      0",
                "total                        3         11     22      33     1",
            ],
            id="user-model-day",
        ),
    ],
)
def test_usage_table_counts_admitted_requests_totals_last(server, cli, by, table):
    server.get(f"{FN}/usage", json={"rows": ROWS})
    assert cli("usage", "--url", URL, "--api-key", KEY, *(["--by", by] if by else [])) == (0, table, [])


def test_usage_json_rows_carry_the_documented_fields(server, cli, install):
    server.get(f"{FN}/usage", json={"rows": ROWS})
    code, out, _ = cli("usage", "--url", URL, "--api-key", KEY, "--json", "--since", "2026-12-01")
    rows = json.loads("\n".join(out))
    assert (code, sorted(rows[0]), rows[-1]["total_tokens"]) == (0, sorted(install.USAGE_FIELDS), 33)
    assert sent(server) == [("GET", f"{FN_PATH}/usage?since=2026-12-01")]


@pytest.mark.parametrize(
    ("text", "day"),
    [("7d", "2026-11-28"), ("1d", "2026-12-04"), ("2026-01-31", "2026-01-31")],
    ids=["week", "today", "date"],
)
def test_day_argument(install, text, day):
    assert install.day_argument(text, today=date(2026, 12, 4)) == day


@pytest.mark.parametrize(
    ("header", "state", "line", "problem"),
    [
        pytest.param("redis", ("redis", None), "shared (Redis)", None, id="redis"),
        pytest.param("per-worker", ("per-worker", None), "per worker", None, id="per-worker"),
        pytest.param(
            "degraded",
            ("degraded", None),
            "degraded (Redis is configured but failing; counting per worker meanwhile)",
            "rate-limit counters degraded (Redis failing)",
            id="degraded-older-guard",
        ),
        pytest.param(
            "degraded; cause=cluster",
            ("degraded", "cluster"),
            "degraded (REDIS_URL points at a Redis Cluster node but REDIS_CLUSTER is not true: set REDIS_CLUSTER=true; "
            "counting per worker meanwhile)",
            "rate-limit counters degraded (REDIS_URL points at a Redis Cluster node but REDIS_CLUSTER is not true: "
            "set REDIS_CLUSTER=true)",
            id="cluster",
        ),
        pytest.param(
            "degraded;cause=auth",
            ("degraded", "auth"),
            "degraded (Redis refused the credentials: fix the user name and password in REDIS_URL; "
            "counting per worker meanwhile)",
            "rate-limit counters degraded (Redis refused the credentials: fix the user name and password in REDIS_URL)",
            id="auth-no-space",
        ),
        pytest.param(
            "degraded; cause=newer",
            ("degraded", "newer"),
            "degraded (cause 'newer'; counting per worker meanwhile)",
            "rate-limit counters degraded (cause 'newer')",
            id="cause-of-a-newer-guard",
        ),
        pytest.param(
            None, (None, None), "unknown (the guard sent no X-API-Key-Guard-Counters header)", None, id="none"
        ),
    ],
)
def test_counters_header(install, header, state, line, problem):
    seen = (install.counters_state(header), install.counters_line("sk-admin", header), install.counters_problem(header))
    assert seen == (state, line, problem)


def test_status_knows_every_cause_the_guard_sends(install, local):
    assert sorted(install.REDIS_CAUSES) == sorted(local.module.REDIS_CAUSES)


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------
def readout(**changes) -> dict:
    """The guard's explain read-out for alice, a user admitted by her group interns, whose entry in api_key_tiers
    sets two fields of her tier; `changes` replace whole keys of it."""
    fields = {
        "allowed_endpoints": ("/api/chat/completions", "api_key_tiers group:interns allowed_endpoints"),
        "allowed_models": ("gpt-4o-mini,llama*", "api_key_allowed_models_user"),
        "rate_limit": ("", "api_key_rate_limit_user"),
        "token_quota": ("20000/day", "api_key_tiers group:interns token_quota"),
        "max_key_age_days": ("0", "api_key_max_key_age_days_user"),
        "max_concurrent": ("2", "api_key_max_concurrent_user"),
    }
    return {
        "user": {"id": "u-alice", "email": "alice@example.com", "role": "user"},
        "groups": ["interns", "staff"],
        "blocked": False,
        "admitted_by": "group 'interns' (api_key_groups)",
        "mode": "enforce",
        "tier": {
            "name": "user+group:interns",
            "fields": {f: {"value": v, "from": src} for f, (v, src) in fields.items()},
        },
        "key": {"created_at": 1793525400, "age_days": 33.2},  # 2026-11-01 09:30 UTC
        "tokens_used": {"day": 36},
        "counters": "per-worker",
        "request": None,
        "decision": None,
    } | changes


EXPLAINED = [
    "user alice@example.com (role user), groups: interns, staff",
    "may use API keys: yes, by group 'interns' (api_key_groups)",
    "tier user+group:interns",
    "  allowed_endpoints  /api/chat/completions  from api_key_tiers group:interns allowed_endpoints",
    "  allowed_models     gpt-4o-mini,llama*     from api_key_allowed_models_user",
    "  rate_limit         (none: no limit)       from api_key_rate_limit_user",
    "  token_quota        20000/day              from api_key_tiers group:interns token_quota",
    "  max_key_age_days   0 (no limit)           from api_key_max_key_age_days_user",
    "  max_concurrent     2                      from api_key_max_concurrent_user",
    "key created 2026-11-01 (33.2 days ago)",
    "tokens used: day 36",
    "counters: per worker",
]
DEGRADED_AUTH = (
    "counters: degraded (Redis refused the credentials: fix the user name and password in REDIS_URL; counting per "
    "worker meanwhile)"
)
MODEL_MESSAGE = "API keys of role 'user' may not use model 'gpt-4o' (api_key_allowed_models_user)"
MODEL_REFUSED = {
    "allowed": False,
    "reason": "model_not_allowed",
    "message": MODEL_MESSAGE,
}
CHAT = {"method": "POST", "path": "/api/chat/completions", "model": "gpt-4o"}
NOT_ADMITTED = "may use API keys: no: not admitted by api_key_roles, api_key_groups or api_key_users"


def test_explain_prints_the_tier_field_by_field_and_where_each_came_from(server, cli):
    server.get(f"{EXPLAIN}?{ALICE}", json=readout())
    assert cli("explain", *ARGS, "--user", "alice@example.com") == (0, EXPLAINED, [])
    assert sent(server) == [("GET", f"{FN_PATH}/explain?{ALICE}")]


@pytest.mark.parametrize(
    "changes, argv, query, replaced, added",
    [
        pytest.param(
            {"groups": []},
            [],
            ALICE,
            {EXPLAINED[0]: "user alice@example.com (role user), groups: none"},
            [],
            id="no-groups",
        ),
        pytest.param({"admitted_by": None}, [], ALICE, {EXPLAINED[1]: NOT_ADMITTED}, [], id="not-admitted"),
        pytest.param(
            {"blocked": True},
            [],
            ALICE,
            {EXPLAINED[1]: "may use API keys: no: blocked by api_key_blocked_users"},
            [],
            id="blocked",
        ),
        pytest.param(
            {"admitted_by": "this user (api_key_users)"},
            [],
            ALICE,
            {EXPLAINED[1]: "may use API keys: yes, by this user (api_key_users)"},
            [],
            id="by-user",
        ),
        pytest.param(
            {"tokens_used": {}},
            [],
            ALICE,
            {"tokens used: day 36": "tokens used: not counted (no token quota)"},
            [],
            id="no-quota",
        ),
        pytest.param(
            {"tokens_used": {"day": 36, "month": 1200}},
            [],
            ALICE,
            {"tokens used: day 36": "tokens used: day 36, month 1200"},
            [],
            id="two-windows",
        ),
        pytest.param(
            {"counters": "redis"}, [], ALICE, {"counters: per worker": "counters: shared (Redis)"}, [], id="redis"
        ),
        pytest.param(
            {"counters": "degraded; cause=auth"},
            [],
            ALICE,
            {"counters: per worker": DEGRADED_AUTH},
            [],
            id="degraded",
        ),
        pytest.param(
            {"request": CHAT, "decision": MODEL_REFUSED},
            ["--model", "gpt-4o"],
            f"{ALICE}&model=gpt-4o",
            {},
            [f"POST /api/chat/completions model gpt-4o: refused (model_not_allowed): {MODEL_MESSAGE}"],
            id="model-refused",
        ),
        pytest.param(
            {"request": CHAT, "decision": MODEL_REFUSED, "mode": "monitor"},
            ["--model", "gpt-4o"],
            f"{ALICE}&model=gpt-4o",
            {},
            [
                f"POST /api/chat/completions model gpt-4o: would be refused (model_not_allowed): {MODEL_MESSAGE}; "
                "mode monitor logs it as would-deny and lets it through"
            ],
            id="monitor-refused",
        ),
        pytest.param(
            {
                "request": {"method": "GET", "path": "/api/models", "model": None},
                "decision": {"allowed": True, "reason": "allowed", "message": "allowed by the API key policy"},
            },
            ["--method", "get", "--path", "/api/models"],
            f"{ALICE}&path=%2Fapi%2Fmodels&method=GET",
            {},
            ["GET /api/models: allowed"],
            id="path-allowed",
        ),
    ],
)
def test_explain_lines(server, cli, changes, argv, query, replaced, added):
    server.get(f"{EXPLAIN}?{query}", json=readout(**changes))
    assert cli("explain", *ARGS, "--user", "alice@example.com", *argv) == (
        0,
        [replaced.get(line, line) for line in EXPLAINED] + added,
        [],
    )


@pytest.mark.parametrize(
    "version, line",
    [
        pytest.param({"json": {"version": "0.12.4"}}, "no key", id="no-key"),
        pytest.param(
            {"json": {"version": "0.6.22"}},
            "key: this Open WebUI (0.6.22) keeps no key creation time (0.6.41 and later do)",
            id="release-without-key-times",
        ),
        pytest.param(
            {"status": 404, "json": {"detail": "Not Found"}},
            "no key, or this Open WebUI keeps no key creation time (before 0.6.41)",
            id="release-unknown",
        ),
    ],
)
def test_explain_without_a_key_creation_time_asks_the_release(server, cli, version, line):
    server.get(f"{EXPLAIN}?{ALICE}", json=readout(key={"created_at": None, "age_days": None}))
    server.get(f"{URL}/api/version", **version)
    code, out, err = cli("explain", *ARGS, "--user", "alice@example.com")
    assert (code, out[EXPLAINED.index("key created 2026-11-01 (33.2 days ago)")], err) == (0, line, [])


def test_explain_json_prints_the_read_out_as_is(server, cli):
    """Sorted keys, indent 2, nothing added; no key creation time is no reason to ask anything else."""
    answer = readout(key={"created_at": None, "age_days": None}, request=CHAT, decision=MODEL_REFUSED)
    server.get(f"{EXPLAIN}?{ALICE}&model=gpt-4o", json=answer)
    code, out, err = cli("explain", *ARGS, "--user", "alice@example.com", "--model", "gpt-4o", "--json")
    assert (code, out, err) == (0, json.dumps(answer, sort_keys=True, indent=2).splitlines(), [])
    assert sent(server) == [("GET", f"{FN_PATH}/explain?{ALICE}&model=gpt-4o")]


def test_a_long_tier_value_moves_only_its_own_source(install):
    endpoints = "/api/chat/completions,/api/v1/chat/completions,GET /api/models,GET /api/v1/models"
    fields = {"allowed_endpoints": {"value": endpoints, "from": "a"}, "allowed_models": {"value": "*", "from": "b"}}
    assert install.tier_lines({"name": "user", "fields": fields}) == [
        "tier user",
        f"  allowed_endpoints  {endpoints}  from a",
        "  allowed_models     *  from b",
    ]
