"""What the unit tests share: stand-ins for the Open WebUI modules the guard imports, the fixture that puts
them in place for one test, await-if-needed, an injected clock, an ASGI receive, the one poll-until helper,
and a real redis-server and Redis Cluster. Test files import the helpers from here (`from tests.conftest
import ...`: pytest loads this file as that module, so there is one copy of each). tests/e2e/conftest.py
adds the real servers on top."""

import inspect
import logging
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

# What a refused API client is told, as the guard words it under the default block_message.
NOT_ADMITTED = (
    "API Key Guard: API keys are not enabled for role 'user' (api_key_roles), nor for this user's groups "
    "(api_key_groups) or account (api_key_users)"
)
GUARD_ERROR = (
    "API Key Guard: API Key Guard could not evaluate this API key request and denied it; "
    "an administrator must check the server log"
)
POLL_SECONDS = 0.01
WAIT_SECONDS = 10.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS, interval: float = POLL_SECONDS):
    """Poll `condition` until it returns something truthy, and return that; fail naming `what` after
    `timeout` seconds. The way to wait in a test: never a fixed sleep where a condition can be watched."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout:g} s: {what}")
        time.sleep(interval)
    return result


async def settle(value: Any) -> Any:
    """Await `value` if it is awaitable: Open WebUI's lookups are sync up to 0.6 and async from 0.12."""
    return await value if inspect.isawaitable(value) else value


def error_lines(caplog) -> list[str]:
    """The messages of the ERROR (and worse) records pytest's caplog captured."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


class Clock:
    """An injected clock: `clock()` is `clock.now`, which the test moves. No test sleeps out a window."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def receiver(messages: list[dict]) -> Callable:
    """An ASGI `receive` handing out `messages` in order, then `http.disconnect` as a server does."""
    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


# ---------------------------------------------------------------------------
# A real redis-server and a real Redis Cluster, the harness's own, one per test module
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from tests.e2e.services import Redis

    started = Redis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The server's URL, emptied (and started again if a test stopped it)."""
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    from tests.e2e.services import Cluster

    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started.start()
    finally:
        started.stop()


# ---------------------------------------------------------------------------
# Stand-ins for Open WebUI, by the name the guard imports each under
# ---------------------------------------------------------------------------
class HTTPException(Exception):
    """open_webui.utils.auth.HTTPException (FastAPI's): how the guard refuses inside core's lookup."""

    def __init__(self, status_code, detail, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class Groups:
    """open_webui.models.groups.Groups: `membership` maps user ids to group names (id `g-<name>`)."""

    def __init__(self, membership: dict, fail: bool = False, is_async: bool = False):
        self.membership, self.fail, self.calls = membership, fail, 0
        if is_async:
            self.get_groups_by_member_id = self._async_lookup

    def get_groups_by_member_id(self, user_id):
        self.calls += 1
        if self.fail:
            raise RuntimeError("database is locked")
        return [SimpleNamespace(id=f"g-{name}", name=name) for name in self.membership.get(user_id, [])]

    async def _async_lookup(self, user_id):
        return Groups.get_groups_by_member_id(self, user_id)


class Models:
    """open_webui.models.models.Models with no workspace models: every id is a provider's model."""

    def get_model_by_id(self, model_id):
        return None


class Users:
    """open_webui.models.users.Users: `by_key` maps API keys to users; async like 0.12 or sync like 0.6."""

    def __init__(self, by_key: dict, is_async: bool = False):
        self.by_key = by_key
        if is_async:
            self.get_user_by_api_key = self._async_lookup

    def get_user_by_api_key(self, api_key):
        return self.by_key.get(api_key)

    async def _async_lookup(self, api_key):
        return Users.get_user_by_api_key(self, api_key)


class Functions:
    """open_webui.models.functions.Functions: the installed guard `api_key_guard`, and `copies`: other active
    functions by id, with their valves."""

    def __init__(self):
        self.active, self.valves, self.reads, self.copies = True, {}, 0, {}

    def get_function_by_id(self, function_id):
        self.reads += function_id == "api_key_guard"
        if function_id in self.copies:
            return SimpleNamespace(is_active=True)
        return SimpleNamespace(is_active=self.active) if function_id == "api_key_guard" else None

    def get_function_valves_by_id(self, function_id):
        return self.copies.get(function_id, self.valves)


class App:
    """open_webui.main.app: its middleware stack is one route that authenticates through core, then answers."""

    def __init__(self):
        self.middleware_stack = None
        self.served = []

    def build_middleware_stack(self):
        async def routed(scope, receive, send):
            user = await settle(sys.modules["open_webui.models.users"].Users.get_user_by_api_key(scope["key"]))
            self.served.append((scope["path"], user.id))
            await send({"type": "http.response.start", "status": 200, "headers": []})

        return routed


# Each stand-in's module, by the name the guard reads from it.
MODULES = {
    "app": "open_webui.main",
    "HTTPException": "open_webui.utils.auth",
    "Users": "open_webui.models.users",
    "Functions": "open_webui.models.functions",
    "Groups": "open_webui.models.groups",
    "Models": "open_webui.models.models",
}


@pytest.fixture
def open_webui(monkeypatch):
    """`open_webui(Groups=..., Models=..., app=...)` puts each stand-in where the guard imports it from,
    for this test only (monkeypatch takes the modules out again)."""

    def install(**stand_ins):
        for name, stand_in in stand_ins.items():
            monkeypatch.setitem(sys.modules, MODULES[name], SimpleNamespace(**{name: stand_in}))

    return install
