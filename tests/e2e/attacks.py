"""Helpers of the adversarial suite (tests/e2e/test_adversarial.py).

Every request is sent with `http.client` exactly as written: no client-side path or header
normalisation. Each answer is reduced to one outcome word so a case can pin it exactly:

    guard        403 with the guard's message (a policy denial)
    guard-error  403 with the guard's fail-closed message (it could not decide)
    ok           2xx with data
    page         2xx HTML: Open WebUI's web app shell, served without authentication
    core-NNN     anything else: Open WebUI refused before, or without, asking the guard
"""

import http.client
import json
import sqlite3
import time
from dataclasses import dataclass

from .server import PASSWORD, Account, version_tuple

GUARD_PREFIX = "API Key Guard: "
GUARD_ERROR_TEXT = (
    "API Key Guard: API Key Guard could not evaluate this API key request and denied it; "
    "an administrator must check the server log"
)
# A request may start a model call in the background after its answer; a denied one must not, and a
# negative cannot be waited for, so each answer is read this long after the response.
BACKEND_SETTLE_SECONDS = 0.05

# Cases whose invariant broke, for the summary line printed at the end of the run (conftest.py).
BYPASSES: list[str] = []


@dataclass(frozen=True)
class Answer:
    status: int
    text: str
    backend_calls: int
    content_type: str = ""
    guard_header: str = ""

    @property
    def detail(self) -> str:
        try:
            detail = json.loads(self.text).get("detail", "")
        except (ValueError, AttributeError):
            return ""
        return detail if isinstance(detail, str) else ""

    @property
    def outcome(self) -> str:
        if 200 <= self.status < 300:
            return "page" if self.content_type.startswith("text/html") else "ok"
        if self.status == 403 and self.detail == GUARD_ERROR_TEXT:
            return "guard-error"
        if self.status == 403 and self.detail.startswith(GUARD_PREFIX):
            return "guard"
        return f"core-{self.status}"

    @property
    def breaks_invariant(self) -> bool:
        """A denied key got data or reached a model (the web app shell is no data)."""
        return self.outcome == "ok" or self.backend_calls > 0

    def __str__(self) -> str:
        return f"{self.outcome} ({self.status}, backend+{self.backend_calls}): {self.text[:240]!r}"


def send(
    deployment,
    method: str,
    target: str,
    headers: list | None = None,
    body: dict | bytes | None = None,
    settle: float = BACKEND_SETTLE_SECONDS,
) -> Answer:
    """One request exactly as written; `backend_calls` is what it caused at the model backend."""
    server = deployment.server
    headers = list(headers or [])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    before = deployment.backend.calls
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if not any(name.lower() == "host" for name, _ in headers):
            conn.putheader("Host", f"127.0.0.1:{server.port}")
        for name, value in headers:
            conn.putheader(name, value)
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        if body is not None and not any(name.lower() == "content-type" for name, _ in headers):
            conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        conn.close()
    if settle:
        time.sleep(settle)
    return Answer(
        response.status,
        text,
        deployment.backend.calls - before,
        response.getheader("content-type", "") or "",
        response.getheader("x-api-key-guard", "") or "",
    )


def bearer(token: str) -> list:
    return [("Authorization", f"Bearer {token}")]


def on_release(deployment, expected):
    """`expected` is one value for every release, or {first release: value from it on, ...}.

    {"0.6": "core-401", "0.9": "guard"} reads: Open WebUI 0.6 up to 0.8 answers core-401, 0.9 on the guard."""
    if not isinstance(expected, dict):
        return expected
    starts = [release for release in expected if deployment.server.at_least(release)]
    return expected[max(starts, key=version_tuple)]


def verdict(request, answer: Answer, expected: str, attack: bool, backend: bool | None = False) -> None:
    """Pin the exact outcome and whether the backend was called; record a broken invariant as a bypass.

    `backend=None` only for a served model listing: Open WebUI 0.12 may answer it from a short-lived
    cache instead of asking the backend again."""
    if attack and answer.breaks_invariant:
        BYPASSES.append(request.node.name)
    called = answer.backend_calls > 0
    assert (answer.outcome, called if backend is not None else None) == (expected, backend), str(answer)


# --- placeholders in case tables, filled per deployment ------------------------------------
def fill(deployment, value):
    if isinstance(value, bytes):
        return value
    people = deployment.people
    secrets = {
        "{alice_key}": people.alice.api_key,
        "{alice_jwt}": people.alice.jwt,
        "{admin_key}": people.admin.api_key,
        "{admin_jwt}": people.admin.jwt,
        "{gina_key}": people.gina.api_key,
    }
    for placeholder, secret in secrets.items():
        value = value.replace(placeholder, secret)
    return value


def fill_headers(deployment, headers: list) -> list:
    return [(name, fill(deployment, value)) for name, value in headers]


# --- accounts made by single cases -----------------------------------------------------------
def add_account(deployment, stem: str, role: str = "user") -> Account:
    """A fresh account with an API key (created while it is a user), then given `role`."""
    server, admin = deployment.server, deployment.people.admin
    name = f"{stem}{time.monotonic_ns() % 10**9}"
    account = Account(name.title(), f"{name}@example.com", role)
    form = {"name": account.name, "email": account.email, "password": PASSWORD, "role": "user"}
    account.id = server.ok("POST", "/api/v1/auths/add", admin.jwt, json=form)["id"]
    data = server.ok("POST", "/api/v1/auths/signin", json={"email": account.email, "password": PASSWORD})
    account.jwt = data["token"]
    account.api_key = server.ok("POST", "/api/v1/auths/api_key", account.jwt)["api_key"]
    deployment.extra_secrets += [account.jwt, account.api_key]
    if role != "user":
        set_role(deployment, account, role)
    return account


def set_role(deployment, account: Account, role: str) -> None:
    """The admin API both releases serve: POST /api/v1/users/{id}/update (routers/users.py)."""
    form = {"role": role, "name": account.name, "email": account.email, "profile_image_url": "/user.png"}
    deployment.server.ok("POST", f"/api/v1/users/{account.id}/update", deployment.people.admin.jwt, json=form)
    account.role = role


# --- the server's database and log -----------------------------------------------------------
def database(deployment) -> sqlite3.Connection:
    return sqlite3.connect(deployment.server.data_dir / "webui.db", timeout=30)


def log_text(deployment) -> str:
    path = deployment.server.log_path
    return path.read_text(errors="replace") if path.exists() else ""


def guard_error_lines(deployment) -> list[str]:
    return [line for line in log_text(deployment).splitlines() if "ERROR" in line and "reason=guard_error" in line]
