"""install.py against the real servers: install, a second run that changes nothing, a valve
change, status on a deactivated guard, uninstall."""

import pytest

VERSION = "0.1.0"


def run(deployment, capsys, *args) -> tuple[int, list[str]]:
    code = deployment.installer(*args, key=deployment.people.admin.api_key)
    out = capsys.readouterr().out
    return code, out.splitlines()


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


def test_valve_change_is_written_and_enforced(installed, capsys):
    assert run(installed, capsys, "install", "--set", "api_key_users=alice@example.com") == (
        0,
        ["valves updated: api_key_users"],
    )
    stored = installed.server.ok("GET", "/api/v1/functions/id/api_key_guard/valves", installed.people.admin.jwt)
    assert stored["api_key_users"] == "alice@example.com"


def test_status_on_a_deactivated_guard_exits_non_zero(installed, capsys):
    installed.server.ok("POST", "/api/v1/functions/id/api_key_guard/toggle", installed.people.admin.jwt)
    code, lines = run(installed, capsys, "status")
    assert code == 1
    assert lines[0].startswith("verdict: NOT OK - function is not active")
    assert run(installed, capsys, "install") == (0, ["activated"])


def test_uninstall_then_status_then_reinstall(installed, capsys):
    assert run(installed, capsys, "uninstall") == (0, ["deleted function api_key_guard"])
    code, lines = run(installed, capsys, "status")
    assert code == 1
    assert lines[0] == "verdict: NOT OK - function api_key_guard is not installed"
    assert run(installed, capsys, "uninstall") == (0, ["api_key_guard is not installed; nothing to do"])


def test_status_of_a_healthy_install(installed, capsys):
    code, lines = run(installed, capsys, "status")
    assert (code, lines[0]) == (
        0,
        f"verdict: OK - API Key Guard {VERSION} is installed, active, global and current; route guard armed",
    )
