"""The product's claim, cell by cell, on real servers: who, how, where -> allowed or denied.

A denied API-key request must get a non-2xx answer carrying the guard's message
and cause no call to the model backend; everything allowed must get a 2xx, from the model
where the route reaches one."""

from dataclasses import dataclass

import pytest

from .attacks import GUARD_PREFIX
from .routes import ROUTES, USER_ENDPOINTS, routes_for

SCENARIOS = {
    "default-admin-only": {},
    "users-chat-only": {"api_key_roles": "admin,user"},
    "group-admitted": {"api_key_groups": "automation"},
}


@dataclass(frozen=True)
class Caller:
    who: str  # admin, alice (ordinary user), gina (member of the automation group)
    transport: str

    @property
    def is_session(self) -> bool:
        return self.transport.startswith("session")

    @property
    def id(self) -> str:
        return f"{self.who}/{self.transport}"


def callers(server, path: str) -> list[Caller]:
    """Every transport core reads a key from on this route, for each person; sessions for two of them."""
    transports = ["bearer", "bearer-lower", "cookie"] + (["x-api-key"] if server.reads_custom_key_header(path) else [])
    keys = [Caller(who, t) for who in ("admin", "alice", "gina") for t in transports]
    sessions = [Caller(who, t) for who in ("admin", "alice") for t in ("session-bearer", "session-cookie")]
    return keys + sessions


def credentials(deployment, caller: Caller) -> dict:
    account = getattr(deployment.people, caller.who)
    token = account.jwt if caller.is_session else account.api_key
    return {
        "bearer": {"headers": {"Authorization": f"Bearer {token}"}},
        "bearer-lower": {"headers": {"authorization": f"bearer {token}"}},
        "cookie": {"cookies": {"token": token}},
        "x-api-key": {"headers": {"x-api-key": token}},
        "session-bearer": {"headers": {"Authorization": f"Bearer {token}"}},
        "session-cookie": {"cookies": {"token": token}},
    }[caller.transport]


def expected_allowed(scenario: str, caller: Caller, path: str) -> bool:
    """The policy, restated independently of the guard's code."""
    if caller.is_session or caller.who == "admin":
        return True
    admitted = scenario == "users-chat-only" or (scenario == "group-admitted" and caller.who == "gina")
    return admitted and path in USER_ENDPOINTS


def outcome(deployment, route, caller: Caller) -> str:
    """One request, summarised as 'allowed' or 'denied', or what went wrong."""
    before = deployment.backend.calls
    response = deployment.server.call(route.method, route.path, json=route.body, **credentials(deployment, caller))
    backend_calls = deployment.backend.calls - before
    if 200 <= response.status_code < 300 and (backend_calls or not route.model_access):
        return "allowed"  # a served model route reached the model: a 2xx without an answer is no pass
    detail = (
        response.json().get("detail", "")
        if response.headers.get("content-type", "").startswith("application/json")
        else ""
    )
    if str(detail).startswith(GUARD_PREFIX) and backend_calls == 0:
        return "denied"
    return f"{response.status_code} backend+{backend_calls} {response.text[:120]}"


CELLS = [pytest.param(scenario, route, id=f"{scenario}:{route.id}") for scenario in SCENARIOS for route in ROUTES]


@pytest.mark.parametrize(("scenario", "route"), CELLS)
def test_matrix(deployment, scenario, route):
    if route not in routes_for(deployment.version):
        pytest.skip(f"{route.id} does not exist on Open WebUI {deployment.server.version}")
    deployment.configure(**SCENARIOS[scenario])
    everyone = callers(deployment.server, route.path)
    expected = {c.id: "allowed" if expected_allowed(scenario, c, route.path) else "denied" for c in everyone}
    actual = {c.id: outcome(deployment, route, c) for c in everyone}
    assert actual == expected
