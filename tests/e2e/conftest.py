"""Real Open WebUI servers for the end-to-end suite: one per pinned release, per test session."""

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import install
from tests.conftest import wait_for as poll_until
from tests.guard_loader import load_guard

from .backend import CountingBackend
from .provision import VERSIONS
from .server import Bootstrap, OpenWebUI, version_tuple

ROOT = Path(__file__).resolve().parents[2]
GUARD = load_guard()  # the guard module as the servers run it: its constants, fingerprint and Valves
DEFAULT_VALVES = GUARD.Valves().model_dump()
FUNCTION_ID = "api_key_guard"
# Upper bound for any wait on a server: the guard's production cache lifetimes plus slack. The test
# servers run with short ones (server.TEST_CACHE_SECONDS), so a wait normally ends far sooner.
WAIT_SECONDS = max(GUARD.GROUPS_TTL_SECONDS, GUARD.FUNCTION_STATE_TTL_SECONDS) + 5.0
POLL_SECONDS = 0.05
ADVERSARIAL_FILE = "test_adversarial.py"
HARDENING_FILE = "e2e/test_hardening.py"  # not tests/test_hardening.py, the unit tables
RELEASE_ID = re.compile(r"owui-([0-9.]+)")
HARDENING_CLASS = re.compile(r"::test_([a-z0-9]+)")  # the word after test_ in the function name
CASES = {"run": Counter(), "passed": Counter()}  # per release, for the summary line
CLASSES = {"run": Counter(), "passed": Counter()}  # per hardening class, in the order first run


def wait_for(condition: Callable, what: str, timeout: float = WAIT_SECONDS):
    """The one poll-until helper (tests/conftest.py), with the servers' wait bound."""
    return poll_until(condition, what, timeout, POLL_SECONDS)


def pytest_runtest_logreport(report):
    if (
        report.when == "call"
        and not report.skipped
        and (ADVERSARIAL_FILE in report.nodeid or HARDENING_FILE in report.nodeid)
    ):
        release = RELEASE_ID.search(report.nodeid)
        release = release[1] if release else "?"
        CASES["run"][release] += 1
        CASES["passed"][release] += report.passed
        kind = HARDENING_CLASS.search(report.nodeid) if HARDENING_FILE in report.nodeid else None
        if kind:
            CLASSES["run"][kind[1]] += 1
            CLASSES["passed"][kind[1]] += report.passed


def pytest_terminal_summary(terminalreporter):
    module = sys.modules.get("tests.e2e.attacks")
    bypasses = getattr(module, "BYPASSES", []) if module is not None else []
    run, passed = CASES["run"], CASES["passed"]
    if run:
        releases = sorted(run, key=lambda release: [int(part) for part in release.split(".") if part.isdigit()])
        per_release = ", ".join(f"{release}: {passed[release]}/{run[release]}" for release in releases)
        terminalreporter.write_line(
            f"adversarial: {run.total()} cases run, {passed.total()} passed, bypasses found = {len(bypasses)}"
            + (f" ({', '.join(bypasses)})" if bypasses else "")
            + f"; per release passed/run: {per_release}"
            + (f"; per class: {per_class}" if (per_class := classes_line()) else "")
        )


def classes_line() -> str:
    """`dos 8/8, workspace 12/12, ...`: the hardening classes (tests/e2e/test_hardening.py), every release."""
    run, passed = CLASSES["run"], CLASSES["passed"]
    return ", ".join(f"{kind} {passed[kind]}/{run[kind]}" for kind in run)


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Deployment:
    server: OpenWebUI
    backend: CountingBackend
    people: Bootstrap
    valves: str = ""
    extra_secrets: list = field(default_factory=list)  # keys and tokens of accounts tests add

    @property
    def secrets(self) -> list[str]:
        """Every credential this server has been sent: none may ever appear in its log."""
        own = [s for account in self.people.accounts for s in (account.api_key, account.jwt)]
        return [s for s in own + self.extra_secrets if s]

    @property
    def version(self) -> tuple:
        return version_tuple(self.server.version)

    def installer(self, command: str = "install", *args: str, key: str | None = None) -> int:
        """Run install.py against this server as its admin, the way an operator would.

        By default with the admin's session token, which no guard policy can lock out; pass the
        admin's API key where the armed probe (an API-key request) is the point."""
        return install.main([command, "--url", self.server.url, "--api-key", key or self.people.admin.jwt, *args])

    def configure(self, **valves) -> None:
        """Put the guard's valves at their defaults plus `valves`, and wait until the route guard acts on them."""
        wanted = json.dumps(valves, sort_keys=True)
        if wanted == self.valves:
            return
        path = self.server.data_dir.parent / "valves.json"
        path.write_text(json.dumps(DEFAULT_VALVES | valves))
        assert self.installer("install", "--valves", str(path)) == 0
        self.wait_for_policy(written=time.monotonic())
        self.valves = wanted

    def policy_in_force(self) -> str | None:
        """The X-API-Key-Guard-Policy header on an admin key request: the stored valves the guard acted on."""
        response = self.server.call("GET", "/api/v1/auths/", self.people.admin.api_key)
        return response.headers.get(install.POLICY_HEADER)

    @property
    def state_seconds(self) -> float:
        """How long the guard in this server trusts its cached function state (valves, active flag)."""
        test_value = self.server.env().get("API_KEY_GUARD_TEST_CACHE_SECONDS")
        return float(test_value) if test_value else GUARD.FUNCTION_STATE_TTL_SECONDS

    def wait_for_policy(self, written: float | None = None) -> None:
        """Wait until the route guard judges key requests by the valves stored at `written` (default: now),
        or, with route_guard off, judges none.

        One worker answering with the new fingerprint speaks for itself only: with several workers the
        others re-read their cached state within the cache lifetime, so wait that long after the write too."""
        stored = self.server.ok("GET", f"/api/v1/functions/id/{FUNCTION_ID}/valves", self.people.admin.jwt)
        judging = GUARD.stored_valves(stored).route_guard
        wanted = GUARD.policy_fingerprint(stored) if judging else None
        written = time.monotonic() if written is None else written
        every_worker = written + (self.state_seconds if self.server.workers > 1 else 0)
        wait_for(
            lambda: self.policy_in_force() == wanted and time.monotonic() >= every_worker,
            f"policy {wanted} in force on {self.server.url}",
        )


def leaked(deployment: Deployment) -> list[str]:
    """Fingerprints of the credentials whose secret part shows up in the server's log."""
    text = deployment.server.log_path.read_text(errors="replace") if deployment.server.log_path.exists() else ""
    # the secret part: a key without its sk- prefix, a JWT's signature
    return [s[:6] + "…" + s[-4:] for s in deployment.secrets if (s[3:] if s.startswith("sk-") else s[-20:]) in text]


def start_deployment(
    version: str, workdir: Path, request, install_guard: bool = True, ollama: bool = False, **extra_env
) -> Deployment:
    """A real server with its counting backend and people; the guard installed with defaults unless told not to.

    `ollama` also connects Open WebUI's Ollama API to the backend (its /api/* routes)."""
    backend = CountingBackend().start()
    request.addfinalizer(backend.stop)
    if ollama:
        extra_env |= {"ENABLE_OLLAMA_API": "true", "OLLAMA_BASE_URL": backend.url.removesuffix("/v1")}
    server = OpenWebUI(version, workdir / "data", backend.url, extra_env=extra_env)
    if server.workers > 1:
        # On a new database every worker's startup writes core's config rows at once, and one of them can
        # die of the duplicate key (seen on 0.12.4 with PostgreSQL): one worker creates them first.
        first = OpenWebUI(version, server.data_dir, backend.url, extra_env={**extra_env, "UVICORN_WORKERS": "1"})
        request.addfinalizer(first.stop)
        first.start()
        first.stop()
    deployment = None

    def stop_and_scan_logs():
        server.stop()
        if deployment is not None:
            assert leaked(deployment) == [], f"credentials leaked into {server.log_path}"

    request.addfinalizer(stop_and_scan_logs)
    server.start()
    deployment = Deployment(server, backend, Bootstrap(server).run())
    if install_guard:
        deployment.configure()
    return deployment


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def deployment(request, tmp_path_factory) -> Deployment:
    version = request.param
    return start_deployment(version, tmp_path_factory.mktemp(f"owui-{version}"), request)
