"""install.py against a mocked Open WebUI admin API (responses): exact output lines, exit codes, requests sent."""

import importlib.util
import json
from pathlib import Path

import pytest
import requests
import responses

INSTALL_PY = Path(__file__).resolve().parent.parent / "install.py"

URL = "http://owui.test"
KEY = "sk-RECOGNISABLE-test-key-0123456789wxyz"  # must never appear in any output
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJpZCI6ImFkbWluIn0.RECOGNISABLE-signature-abcd"
FN = f"{URL}/api/v1/functions/id/api_key_guard"
FN_PATH = "/api/v1/functions/id/api_key_guard"
CREATE = f"{URL}/api/v1/functions/create"
MODELS = f"{URL}/api/models"
CONFIG = f"{URL}/api/v1/auths/admin/config"
PERMISSIONS = f"{URL}/api/v1/users/default/permissions"
NOT_FOUND = {"detail": "We could not find what you're looking for :/"}
OLD_CONTENT = '"""\ntitle: API Key Guard\nversion: 0.0.9\n"""\n'
ARGS = ("--url", URL, "--api-key", KEY)

CONFIG_012 = {"ENABLE_API_KEYS": True, "ENABLE_API_KEYS_ENDPOINT_RESTRICTIONS": False, "API_KEYS_ALLOWED_ENDPOINTS": ""}
PERMISSIONS_012 = {"features": {"api_keys": False, "web_search": True}}
POSTURE_012_LINES = [
    "api keys: enabled",
    "server endpoint restriction: off",
    "users may hold keys: not by default (features.api_keys is off; a group can still grant it)",
]
NOT_ARMED_LINE = (
    "route guard: NOT armed - Open WebUI loads the guard on the first model listing or chat after a restart; "
    "run `python install.py --url ...` again or call GET /api/models, or set ENABLE_BASE_MODELS_CACHE=true"
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
    """The pauses between armed probes, recorded instead of waited for."""
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
        return text.replace("{version}", local.version).replace("{all}", names).replace("{tmp}", str(tmp_path))

    return fill


def function(content: str, *, active: bool = True, is_global: bool = True) -> dict:
    return {
        "id": "api_key_guard",
        "user_id": "admin-1",
        "name": "API Key Guard",
        "type": "filter",
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


def guard_header(mode: str | None) -> dict:
    return {"X-API-Key-Guard": mode} if mode else {}


def sent(server) -> list[tuple[str, str]]:
    return [(call.request.method, call.request.url.removeprefix(URL)) for call in server.calls]


def body(server, index: int):
    raw = server.calls[index].request.body
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "credential, final_header",
    [
        pytest.param(KEY, "enforce", id="api-key-probe-armed"),
        pytest.param(JWT, None, id="session-token-probe-skipped"),
    ],
)
def test_fresh_install_creates_stores_valves_activates_and_verifies(
    server, cli, local, defaults, credential, final_header
):
    server.get(FN, status=401, json=NOT_FOUND)
    server.post(CREATE, json=function(local.content, active=False, is_global=False))
    server.post(f"{FN}/valves/update", json=defaults)
    server.post(f"{FN}/toggle", json=function(local.content, active=True, is_global=False))
    server.post(f"{FN}/toggle/global", json=function(local.content))
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content), headers=guard_header(final_header))

    code, out, err = cli("--url", URL, "--api-key", credential)

    assert (code, err) == (0, [])
    assert out == [
        f"created function api_key_guard (version {local.version})",
        f"valves updated: {', '.join(defaults)}",
        "activated",
        "made global",
    ]
    assert sent(server) == [
        ("GET", FN_PATH),
        ("POST", "/api/v1/functions/create"),
        ("POST", f"{FN_PATH}/valves/update"),
        ("POST", f"{FN_PATH}/toggle"),
        ("POST", f"{FN_PATH}/toggle/global"),
        ("GET", "/api/models"),
        ("GET", FN_PATH),
    ]
    assert body(server, 1) == {
        "id": "api_key_guard",
        "name": "API Key Guard",
        "content": local.content,
        "meta": {"description": local.manifest["description"], "manifest": local.manifest},
    }
    assert body(server, 2) == defaults
    assert all(call.request.headers["Authorization"] == f"Bearer {credential}" for call in server.calls)


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
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content), headers=guard_header("enforce"))

    code, out, err = cli(*argv)

    assert (code, out, err) == (0, [f"api_key_guard {local.version} is installed and current; nothing changed"], [])
    assert [method for method, _ in sent(server)] == ["GET", "GET", "GET", "GET"]


DROPPED = "<not stored>"


@pytest.mark.parametrize(
    "stored, argv, valves_file, changed, sent_valves",
    [
        pytest.param(None, [], None, "{all}", {}, id="server-never-stored-valves"),
        pytest.param(
            {},
            ["--set", "api_key_roles=admin,user"],
            None,
            "api_key_roles",
            {"api_key_roles": "admin,user"},
            id="set-string",
        ),
        pytest.param({}, ["--set", "priority=-5"], None, "priority", {"priority": -5}, id="set-int-converted"),
        pytest.param(
            {},
            ["--set", "route_guard=false"],
            None,
            "route_guard",
            {"route_guard": False},
            id="set-bool-converted-route-guard-off-no-probe",
        ),
        pytest.param(
            {},
            [],
            {"mode": "monitor", "priority": 7},
            "mode, priority",
            {"mode": "monitor", "priority": 7},
            id="valves-file",
        ),
        pytest.param(
            {}, ["--set", "priority=8"], {"priority": 7}, "priority", {"priority": 8}, id="set-wins-over-file"
        ),
        pytest.param(
            {"api_key_groups": "ops"},
            ["--set", "mode=monitor"],
            None,
            "mode",
            {"api_key_groups": "ops", "mode": "monitor"},
            id="stored-values-kept",
        ),
        pytest.param({"priority": DROPPED}, [], None, "priority", {}, id="stored-without-priority-gets-it"),
        pytest.param({"legacy_valve": "x"}, [], None, "legacy_valve", {}, id="obsolete-stored-valve-dropped"),
    ],
)
def test_valve_changes(server, cli, local, defaults, tmp_path, expand, stored, argv, valves_file, changed, sent_valves):
    """`stored` is what the server holds on top of the defaults (None: the server answers null)."""
    if valves_file is not None:
        (tmp_path / "valves.json").write_text(json.dumps(valves_file))
        argv = [*argv, "--valves", str(tmp_path / "valves.json")]
    held = None if stored is None else {name: v for name, v in (defaults | stored).items() if v != DROPPED}
    armed = sent_valves.get("route_guard", True)
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", **json_body(held))
    server.post(f"{FN}/valves/update", json={})
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content), headers=guard_header("enforce" if armed else None))

    code, out, err = cli(*ARGS, *argv)

    assert (code, out, err) == (0, [expand(f"valves updated: {changed}")], [])
    assert sent(server)[2] == ("POST", f"{FN_PATH}/valves/update")
    assert body(server, 2) == defaults | sent_valves


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
    for action in writes:
        server.post(f"{FN}{action}", json=function(local.content))
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content), headers=guard_header("enforce"))

    code, out, err = cli(*ARGS)

    assert (code, out, err) == (0, [expand(line) for line in lines], [])
    assert [path for method, path in sent(server) if method == "POST"] == [f"{FN_PATH}{a}" for a in writes]
    if "/update" in writes:
        assert body(server, 2)["content"] == local.content


@pytest.mark.parametrize(
    "content, argv, lines",
    [
        pytest.param(
            None,
            [],
            [
                "would create function api_key_guard (version {version})",
                "would update valves: {all}",
                "would activate",
                "would make global",
            ],
            id="absent",
        ),
        pytest.param(
            "old",
            ["--set", "mode=monitor"],
            ["would update function content (0.0.9 -> {version})", "would update valves: mode"],
            id="outdated-valve-change",
        ),
        pytest.param(
            "current", [], ["api_key_guard {version} is installed and current; nothing changed"], id="current"
        ),
    ],
)
def test_dry_run_reads_and_writes_nothing(server, cli, local, defaults, expand, content, argv, lines):
    """`content`: None when the function is absent, else what the server holds ("current" or "old")."""
    if content is None:
        server.get(FN, status=401, json=NOT_FOUND)
    else:
        server.get(FN, json=function(local.content if content == "current" else OLD_CONTENT))
        server.get(f"{FN}/valves", json=defaults)

    code, out, err = cli(*ARGS, "--dry-run", *argv)

    assert (code, out, err) == (0, [expand(line) for line in lines], [])
    assert {method for method, _ in sent(server)} == {"GET"}
    assert ("GET", "/api/models") not in sent(server)


@pytest.mark.parametrize(
    "active, is_global, header, code, error, probes",
    [
        pytest.param(
            False,
            True,
            None,
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
            3,
            "error: function api_key_guard is still not global after /toggle/global; check the server log",
            1,
            id="still-not-global",
        ),
        pytest.param(
            True,
            True,
            None,
            1,
            "error: route guard is not armed 3 s after GET /api/models; look in the server log for 'api_key_guard "
            "could not arm the route guard' (with several workers, each arms on its own first model listing)",
            7,
            id="route-guard-never-armed",
        ),
    ],
)
def test_install_verifies_the_outcome(
    server, cli, local, defaults, slept, active, is_global, header, code, error, probes
):
    """What the read-back after GET /api/models shows of a function that was installed and current."""
    server.get(FN, json=function(local.content))
    server.get(f"{FN}/valves", json=defaults)
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content, active=active, is_global=is_global), headers=guard_header(header))

    assert cli(*ARGS) == (
        code,
        [f"api_key_guard {local.version} is installed and current; nothing changed"],
        [error],
    )
    assert sent(server)[2:] == [("GET", "/api/models")] + [("GET", FN_PATH)] * probes
    assert slept == [0.5] * (probes - 1)


def test_install_probes_again_while_the_guard_still_acts_on_its_cached_state(server, cli, local, defaults, slept):
    """The guard re-reads its active flag every 2 s: right after activation it may not mark requests yet."""
    server.get(FN, json=function(local.content, active=False))
    server.get(f"{FN}/valves", json=defaults)
    server.post(f"{FN}/toggle", json=function(local.content))
    server.get(MODELS, json={"data": []})
    server.get(FN, json=function(local.content))
    server.get(FN, json=function(local.content))
    server.get(FN, json=function(local.content), headers=guard_header("enforce"))

    assert cli(*ARGS) == (0, ["activated"], [])
    assert slept == [0.5, 0.5]


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------
OK_FUNCTION_LINES = [
    "installed: yes (id api_key_guard)",
    "active: yes",
    "global: yes",
    "content: same as the local file (server {version}, local {version})",
    "valves: valid",
]


@pytest.mark.parametrize(
    "credential, state, stored, header, code, lines",
    [
        pytest.param(
            KEY,
            {},
            "defaults",
            "enforce",
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard armed",
                *OK_FUNCTION_LINES,
                "route guard: armed (mode enforce)",
            ],
            id="ok-armed",
        ),
        pytest.param(
            KEY,
            {},
            None,
            "monitor",
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; route guard armed",
                *OK_FUNCTION_LINES,
                "route guard: armed (mode monitor)",
            ],
            id="ok-valves-never-stored-monitor-mode",
        ),
        pytest.param(
            JWT,
            {},
            "defaults",
            None,
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; "
                "route guard not checked (session token)",
                *OK_FUNCTION_LINES,
                "route guard: cannot tell with a session token; run status with an admin API key",
            ],
            id="ok-session-token-armed-unknown",
        ),
        pytest.param(
            KEY,
            {},
            {"route_guard": False},
            None,
            0,
            [
                "verdict: OK - API Key Guard {version} is installed, active, global and current; "
                "route guard switched off",
                *OK_FUNCTION_LINES,
                "route guard: switched off by the valve route_guard",
            ],
            id="ok-route-guard-valve-off",
        ),
        pytest.param(
            KEY,
            {},
            "defaults",
            None,
            1,
            ["verdict: NOT OK - route guard is not armed", *OK_FUNCTION_LINES, NOT_ARMED_LINE],
            id="not-armed",
        ),
        pytest.param(
            KEY,
            {"active": False},
            "defaults",
            None,
            1,
            [
                "verdict: NOT OK - function is not active; route guard is not armed",
                "installed: yes (id api_key_guard)",
                "active: no",
                *OK_FUNCTION_LINES[2:],
                NOT_ARMED_LINE,
            ],
            id="not-active",
        ),
        pytest.param(
            KEY,
            {"is_global": False},
            "defaults",
            "enforce",
            1,
            [
                "verdict: NOT OK - function is not global",
                *OK_FUNCTION_LINES[:2],
                "global: no",
                *OK_FUNCTION_LINES[3:],
                "route guard: armed (mode enforce)",
            ],
            id="not-global",
        ),
        pytest.param(
            KEY,
            {"content": OLD_CONTENT},
            "defaults",
            "enforce",
            1,
            [
                "verdict: NOT OK - server copy differs from the local file (server 0.0.9, local {version})",
                *OK_FUNCTION_LINES[:3],
                "content: differs from the local file (server 0.0.9, local {version})",
                "valves: valid",
                "route guard: armed (mode enforce)",
            ],
            id="outdated-content",
        ),
        pytest.param(
            KEY,
            {},
            {"api_key_roles": "root", "priority": "high"},
            "enforce",
            1,
            [
                "verdict: NOT OK - stored valves do not validate",
                *OK_FUNCTION_LINES[:4],
                "valves: invalid",
                "  valve priority: Input should be a valid integer, unable to parse string as an integer",
                "  valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'",
                "route guard: armed (mode enforce)",
            ],
            id="invalid-stored-valves",
        ),
        pytest.param(
            KEY,
            None,
            None,
            None,
            1,
            ["verdict: NOT OK - function api_key_guard is not installed", "installed: no (id api_key_guard)"],
            id="not-installed",
        ),
    ],
)
def test_status(server, cli, local, defaults, expand, credential, state, stored, header, code, lines):
    if state is None:
        server.get(FN, status=401, json=NOT_FOUND)
    else:
        flags = {name: value for name, value in state.items() if name != "content"}
        server.get(FN, json=function(state.get("content", local.content), **flags), headers=guard_header(header))
        server.get(f"{FN}/valves", **json_body(defaults if stored == "defaults" else stored))
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    assert cli("status", "--url", URL, "--api-key", credential) == (
        code,
        [expand(line) for line in lines] + POSTURE_012_LINES,
        [],
    )
    assert {method for method, _ in sent(server)} == {"GET"}


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
    server.get(FN, json=function(local.content), headers=guard_header("enforce"))
    server.get(f"{FN}/valves", json=defaults)
    server.get(CONFIG, json=config)
    server.get(PERMISSIONS, json=permissions)

    code, out, err = cli("status", *ARGS)
    json_code, json_out, json_err = cli("status", "--json", *ARGS)

    assert (code, out[-3:], err) == (0, lines, [])
    assert (json_code, json_err) == (0, [])
    assert {name: json.loads("\n".join(json_out))[name] for name in facts} == facts


@pytest.mark.parametrize(
    "installed, header, code, facts",
    [
        pytest.param(
            True,
            "enforce",
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
                "ok": True,
                "verdict": "OK - API Key Guard {version} is installed, active, global and current; route guard armed",
            },
            id="ok",
        ),
        pytest.param(
            True,
            None,
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
                "ok": False,
                "verdict": "NOT OK - route guard is not armed",
            },
            id="not-armed",
        ),
        pytest.param(
            False,
            None,
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
                "ok": False,
                "verdict": "NOT OK - function api_key_guard is not installed",
            },
            id="not-installed",
        ),
    ],
)
def test_status_json(server, cli, local, defaults, expand, installed, header, code, facts):
    if installed:
        server.get(FN, json=function(local.content), headers=guard_header(header))
        server.get(f"{FN}/valves", json=defaults)
    else:
        server.get(FN, status=401, json=NOT_FOUND)
    server.get(CONFIG, json=CONFIG_012)
    server.get(PERMISSIONS, json=PERMISSIONS_012)

    json_code, out, err = cli("status", "--json", "--url", URL, "--api-key", KEY)

    expected = {name: expand(value) if isinstance(value, str) else value for name, value in facts.items()}
    assert (json_code, err) == (code, [])
    assert json.loads("\n".join(out)) == {**expected, "local_version": local.version, **posture(True, False)}


# ---------------------------------------------------------------------------
# uninstall
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "present, lines, calls",
    [
        pytest.param(
            True,
            ["deleted function api_key_guard"],
            [("GET", FN_PATH), ("DELETE", f"{FN_PATH}/delete")],
            id="present",
        ),
        pytest.param(False, ["api_key_guard is not installed; nothing to do"], [("GET", FN_PATH)], id="absent"),
    ],
)
def test_uninstall(server, cli, local, present, lines, calls):
    if present:
        server.get(FN, json=function(local.content))
        server.delete(f"{FN}/delete", json=True)
    else:
        server.get(FN, status=401, json=NOT_FOUND)

    assert cli("uninstall", "--url", URL, "--api-key", KEY) == (0, lines, [])
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
        [*ARGS, "--set", "priority=high"],
        None,
        [ABSENT],
        "error: invalid valves: valve priority: Input should be a valid integer, unable to parse string as an integer",
        2,
        id="set-invalid-int",
    ),
    pytest.param(
        [*ARGS, "--set", "api_key_roles=root"],
        None,
        [ABSENT],
        "error: invalid valves: valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'",
        2,
        id="set-invalid-roles",
    ),
    # network and TLS: exit 3
    pytest.param(
        ARGS,
        None,
        [answer(body=requests.exceptions.ConnectionError("Connection refused"))],
        "error: cannot reach http://owui.test: Connection refused",
        3,
        id="unreachable",
    ),
    pytest.param(
        ARGS,
        None,
        [answer(body=requests.exceptions.SSLError("certificate verify failed: self-signed certificate"))],
        "error: TLS verification failed for http://owui.test: certificate verify failed: self-signed certificate; "
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
        "error: the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY (got JWT …abcd). "
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
        [ABSENT, answer(500, "POST", CREATE, json={"detail": "boom"})],
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
        ["uninstall", *ARGS],
        None,
        [answer(json=function("x")), answer(method="DELETE", url=f"{FN}/delete", json=False)],
        "error: the server did not delete function api_key_guard; check the server log",
        3,
        id="uninstall-not-deleted",
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
    if error.startswith("error: "):
        assert err == [expand(error)]  # one line, no traceback
    else:  # argparse's own message, after its usage lines
        assert err[-1] == error
    assert len(server.calls) == len(answers)  # a redirect is never followed


@pytest.mark.parametrize("argv, valves_file, answers, error, code", ERROR_CASES)
def test_errors_never_show_the_key(server, cli, tmp_path, expand, argv, valves_file, answers, error, code):
    _, out, err = run_error_case(server, cli, tmp_path, expand, argv, valves_file, answers)

    shown = "\n".join(out + err)
    for secret in (KEY, JWT):
        assert secret[:-4] not in shown  # the whole credential, and all but the 4 characters a fingerprint shows
