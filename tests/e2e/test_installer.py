"""install.py against the real servers: install, a second run that changes nothing, a valve change in
force when install returns, a dry run that writes nothing, arming at startup and what status proves of it, a
deactivated guard, a second copy of the guard under another id, uninstall; the credential it sends (a netrc entry
for the server, a user:password in --url), the guard's own rate limit on the admin key waited out, and explain's
read-out for an admin and a user against what the server answers their keys.

The test servers run with ENABLE_PERSISTENT_CONFIG=false. There Open WebUI's connections endpoint still
answers and switches the base models cache in the memory of the process that served the request (0.6-0.8:
app.state.config, also written to the database but ignored at the next start; 0.10+: Config.DEFAULTS, not
written at all), and a restart takes it back to the environment's value. So these tests prove what install
writes and what status reads on a running server; that a restart then arms every worker before its first
request is the restart suite's to prove, on servers whose config persists.
"""

import json
from datetime import UTC, datetime

import pytest

import install

from .conftest import FUNCTION_ID, GUARD

LOCAL = install.load_local_guard()
VERSION = LOCAL.version
COPY_ID = "api_key_guard_copy"
ONLY_COPY = "copies: api_key_guard (the only one)"
CONNECTIONS = install.CONNECTIONS_API
VALVES = f"/api/v1/functions/id/{FUNCTION_ID}/valves"
STARTUP_OFF = (
    "armed at startup: no - ENABLE_BASE_MODELS_CACHE is off: the guard is in force now, but after every restart "
    "each worker serves API keys unguarded until something lists models there; run install.py to switch it on"
)


def run(deployment, capsys, *args) -> tuple[int, list[str]]:
    code = deployment.installer(*args, key=deployment.people.admin.api_key)
    out = capsys.readouterr().out
    return code, out.splitlines()


def run_at(url: str, deployment, capsys, *args) -> tuple[int, list[str], list[str]]:
    """install.py with the admin's key against `url` (the server under another address): code, stdout, stderr."""
    code = install.main([*args, "--url", url, "--api-key", deployment.people.admin.api_key])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def status_json(deployment, capsys, *args) -> tuple[int, dict]:
    code, lines = run(deployment, capsys, "status", "--json", *args)
    return code, json.loads("\n".join(lines))


def base_models_cache(deployment, on: bool | None = None) -> bool:
    """Open WebUI's own view of the setting (read, or switched first), through the admin's session."""
    server, jwt = deployment.server, deployment.people.admin.jwt
    form = server.ok("GET", CONNECTIONS, jwt)
    if on is not None:
        form = server.ok("POST", CONNECTIONS, jwt, json=form | {install.BASE_MODELS_CACHE: on})
    return form[install.BASE_MODELS_CACHE]


@pytest.fixture
def installed(deployment):
    deployment.configure()
    yield deployment
    deployment.valves = ""  # whatever a test did, the next configure() reinstalls from scratch
    deployment.configure()


def test_second_run_changes_nothing(installed, capsys):
    assert run(installed, capsys, "install") == (
        0,
        [f"api_key_guard {VERSION} is installed and current; nothing changed"],
    )


def test_valve_change_is_in_force_when_install_returns(installed, capsys):
    """No wait after install: the very next key request is judged by the valves it wrote."""
    alice = installed.people.alice.api_key
    assert installed.server.call("GET", "/api/models", alice).status_code == 403  # default: admin keys only

    assert run(installed, capsys, "install", "--set", "api_key_users=alice@example.com") == (
        0,
        ["valves updated: api_key_users"],
    )

    stored = installed.server.ok("GET", VALVES, installed.people.admin.jwt)
    allowed = installed.server.call("GET", "/api/models", alice)
    elsewhere = installed.server.call("GET", "/api/v1/chats/", alice)
    assert (stored["api_key_users"], allowed.status_code, elsewhere.status_code) == ("alice@example.com", 200, 403)
    assert allowed.headers[install.POLICY_HEADER] == GUARD.policy_fingerprint(stored)
    assert "may not call /api/v1/chats/" in elsewhere.json()["detail"]


def test_install_arms_at_startup_and_status_proves_it(installed, capsys):
    code, facts = status_json(installed, capsys)
    assert (code, base_models_cache(installed)) == (0, True)
    assert {name: facts[name] for name in ("armed_at_startup", "route_guard_armed", "policy_in_force")} == {
        "armed_at_startup": True,
        "route_guard_armed": True,
        "policy_in_force": True,
    }
    assert (
        facts["live_policy"]
        == facts["stored_policy"]
        == GUARD.policy_fingerprint(installed.server.ok("GET", VALVES, installed.people.admin.jwt))
    )


def test_no_arm_at_startup_leaves_the_setting_alone_and_status_says_no(installed, capsys):
    base_models_cache(installed, on=False)
    try:
        assert run(installed, capsys, "install", "--no-arm-at-startup") == (
            0,
            [f"api_key_guard {VERSION} is installed and current; nothing changed"],
        )
        assert base_models_cache(installed) is False
        code, lines = run(installed, capsys, "status")
        assert (code, lines[0], STARTUP_OFF in lines) == (1, "verdict: NOT OK - not armed at startup", True)
        code, facts = status_json(installed, capsys, "--no-arm-at-startup")
        assert (code, facts["armed_at_startup"], facts["ok"]) == (0, False, True)

        assert run(installed, capsys, "install") == (0, [f"armed at startup: switched on {install.ARM_AT_STARTUP}"])
        assert base_models_cache(installed) is True
    finally:
        base_models_cache(installed, on=True)


def test_status_on_a_deactivated_guard_exits_non_zero(installed, capsys):
    installed.server.ok("POST", f"/api/v1/functions/id/{FUNCTION_ID}/toggle", installed.people.admin.jwt)
    code, lines = run(installed, capsys, "status")
    assert code == 1
    assert lines[0].startswith("verdict: NOT OK - function is not active")
    assert run(installed, capsys, "install") == (0, ["activated"])


def test_status_shows_a_copy_of_the_guard_and_fails_while_two_copies_are_active(installed, capsys):
    """An admin's clone or trial install: listed while inactive, a problem once active, gone once deleted."""
    server, jwt = installed.server, installed.people.admin.jwt
    code, before = run(installed, capsys, "status")
    assert ONLY_COPY in before
    body = {"id": COPY_ID, "name": "API Key Guard copy", "content": LOCAL.content, "meta": {"manifest": LOCAL.manifest}}
    server.ok("POST", "/api/v1/functions/create", jwt, json=body)  # Open WebUI creates it inactive, not global
    try:
        inactive = "copies: api_key_guard (active, global; installed here), api_key_guard_copy (inactive)"
        assert run(installed, capsys, "status") == (code, [inactive if line == ONLY_COPY else line for line in before])

        server.ok("POST", f"/api/v1/functions/id/{COPY_ID}/toggle", jwt)
        two_active, lines = run(installed, capsys, "status")
        assert (two_active, "2 copies of the guard are active (api_key_guard, api_key_guard_copy)" in lines[0]) == (
            1,
            True,
        )
        assert [line for line in lines if line.startswith(("copies: ", "  2 copies"))] == [
            "copies: api_key_guard (active, global; installed here), api_key_guard_copy (active, not global)",
            "  2 copies are active: every active copy judges each API-key request and the strictest answer wins, and "
            "the server logs an ERROR about it; delete or deactivate api_key_guard_copy (keep api_key_guard)",
        ]
    finally:
        server.ok("DELETE", f"/api/v1/functions/id/{COPY_ID}/delete", jwt)
    assert run(installed, capsys, "status") == (code, before)


def test_uninstall_then_status_then_reinstall(installed, capsys):
    code, lines = run(installed, capsys, "uninstall")
    assert (
        code,
        lines[0],
        lines[1].startswith("usage table api_key_guard_usage stays in Open WebUI's database ("),
    ) == (
        0,
        "deleted function api_key_guard",
        True,
    )
    code, lines = run(installed, capsys, "status")
    assert code == 1
    assert lines[0] == "verdict: NOT OK - function api_key_guard is not installed"
    assert run(installed, capsys, "uninstall") == (0, ["api_key_guard is not installed; nothing to do"])


def test_status_of_a_healthy_install(installed, capsys):
    code, lines = run(installed, capsys, "status")
    assert (code, lines[0]) == (
        0,
        f"verdict: OK - API Key Guard {VERSION} is installed, active, global and current; route guard armed; "
        "policy in force; armed at startup",
    )


def test_status_reports_where_the_rate_limit_counters_live(installed, capsys):
    code, lines = run(installed, capsys, "status")
    assert (code, "rate-limit counters: per worker" in lines) == (0, True)  # no REDIS_URL on these servers


def test_without_persistent_config_a_restart_forgets_the_setting(installed, capsys):
    """ENABLE_PERSISTENT_CONFIG=false: the environment's value comes back at every start, and status says so."""
    assert base_models_cache(installed) is True
    installed.server.restart()
    try:
        code, lines = run(installed, capsys, "status")
        assert (code, lines[0], STARTUP_OFF in lines) == (
            1,
            "verdict: NOT OK - route guard is not armed; not armed at startup",
            True,
        )
    finally:
        if installed.server.key_permission:  # forgotten too: the users' key permission the bootstrap granted
            server, jwt = installed.server, installed.people.admin.jwt
            permissions = server.ok("GET", "/api/v1/users/default/permissions", jwt)
            permissions["features"]["api_keys"] = True
            server.ok("POST", "/api/v1/users/default/permissions", jwt, json=permissions)


def test_dry_run_prints_the_plan_and_writes_nothing(installed, capsys):
    assert run(installed, capsys, "install", "--dry-run", "--set", "mode=monitor") == (0, ["would update valves: mode"])
    assert installed.server.ok("GET", VALVES, installed.people.admin.jwt)["mode"] == "enforce"


def test_every_invalid_valve_in_one_error_and_nothing_sent(installed, capsys):
    code, out, err = run_at(
        installed.server.url, installed, capsys, "install", "--set", "priority=high", "--set", "api_key_roles=root"
    )
    assert (code, out, err) == (
        2,
        [],
        [
            "error: invalid valves: valve priority: Input should be a valid integer, unable to parse string as an "
            "integer; valve api_key_roles: Value error, expected roles from admin, user, pending, got 'root'"
        ],
    )


def test_a_netrc_entry_for_the_server_never_replaces_the_key(installed, capsys, tmp_path, monkeypatch):
    """requests would send a netrc entry's login for the host in place of an Authorization header."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice@example.com password not-the-admin\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    code, lines = run(installed, capsys, "status")
    assert (code, lines[0].startswith("verdict: OK - ")) == (0, True)


URL_PASSWORD = "Hunter2-url-password"


@pytest.mark.parametrize(
    "netloc, err",
    [
        pytest.param("127.0.0.1", [], id="loopback-address"),
        pytest.param("localhost", [], id="localhost-plain-http-allowed"),
        pytest.param(f"admin:{URL_PASSWORD}@127.0.0.1", [install.USERINFO_WARNING], id="url-credentials-not-used"),
    ],
)
def test_status_over_plain_http_to_this_machine(installed, capsys, netloc, err):
    url = installed.server.url.replace("127.0.0.1", netloc)
    code, out, errors = run_at(url, installed, capsys, "status")
    assert (code, out[0].startswith("verdict: OK - "), errors, URL_PASSWORD in "\n".join(out)) == (0, True, err, False)


def test_a_rate_limited_admin_key_is_waited_out(installed, capsys):
    """The guard's own api_key_rate_limit_admin answers 429 with Retry-After; status waits and still proves all."""
    installed.configure(api_key_rate_limit_admin="2/second")
    capsys.readouterr()  # what configure's install said
    code, out, err = run_at(installed.server.url, installed, capsys, "status")
    waits = [line for line in err if line.startswith("rate limited (429) on ") and "as its Retry-After asks" in line]
    assert (code, out[0].startswith("verdict: OK - "), bool(waits), len(waits) == len(err)) == (0, True, True, True)


ADMIN_LINES = [
    "user admin@example.com (role admin), groups: none",
    "may use API keys: yes, by role 'admin' (api_key_roles)",
]
USER_LINES = [
    "user alice@example.com (role user), groups: none",
    "may use API keys: no: not admitted by api_key_roles, api_key_groups or api_key_users",
]


@pytest.mark.parametrize(
    "who, lines, status",
    [pytest.param("admin", ADMIN_LINES, 200, id="admin"), pytest.param("alice", USER_LINES, 403, id="user")],
)
def test_explain_says_what_the_server_does_with_the_key(deployment, capsys, who, lines, status):
    """The read-out's first lines, its key line, and its decision for a path against what the server answers the
    person's own key there."""
    deployment.configure()  # the defaults (already in force unless a test before changed them)
    person = getattr(deployment.people, who)
    asked = ("--user", person.email, "--method", "GET", "--path", "/api/v1/chats/")
    code, out = run(deployment, capsys, "explain", *asked)
    answer = deployment.server.call("GET", "/api/v1/chats/", person.api_key)
    refused = answer.json()["detail"].removeprefix(install.GUARD_DETAIL) if answer.status_code == 403 else ""
    decision = f"refused (not_admitted): {refused}" if refused else "allowed"
    today = datetime.now(UTC).date().isoformat()  # the harness made every key today
    key = (
        f"key created {today} ("
        if deployment.version >= install.KEY_TIMES_SINCE
        else "key: this Open WebUI (0.6.22) keeps no key creation time (0.6.41 and later do)"
    )
    keys = [line for line in out if line.startswith(("key", "no key"))]
    assert (code, out[:2], out[-1], answer.status_code) == (0, lines, f"GET /api/v1/chats/: {decision}", status)
    assert (len(keys), keys[0].startswith(key)) == (1, True), keys
