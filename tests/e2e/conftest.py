"""Real Open WebUI servers for the end-to-end suite: one per pinned release, per test session."""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .backend import CountingBackend
from .provision import VERSIONS
from .server import Bootstrap, OpenWebUI, version_tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import install  # noqa: E402
from tests.guard_loader import load_guard  # noqa: E402

DEFAULT_VALVES = load_guard().Valves().model_dump()

# The route guard re-reads the stored valves at most this often (FUNCTION_STATE_TTL_SECONDS).
VALVES_SETTLE_SECONDS = 2.5


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

    @property
    def version(self) -> tuple:
        return version_tuple(self.server.version)

    def installer(self, command: str = "install", *args: str, key: str | None = None) -> int:
        """Run install.py against this server as its admin, the way an operator would."""
        return install.main([command, "--url", self.server.url, "--api-key", key or self.people.admin.api_key, *args])

    def configure(self, **valves) -> None:
        """Put the guard's valves at their defaults plus `valves`, and wait until the route guard sees them."""
        wanted = json.dumps(valves, sort_keys=True)
        if wanted == self.valves:
            return
        path = self.server.data_dir.parent / "valves.json"
        path.write_text(json.dumps(DEFAULT_VALVES | valves))
        assert self.installer("install", "--valves", str(path)) == 0
        time.sleep(VALVES_SETTLE_SECONDS)
        self.valves = wanted


def start_deployment(version: str, workdir: Path, request, **extra_env) -> Deployment:
    backend = CountingBackend().start()
    request.addfinalizer(backend.stop)
    server = OpenWebUI(version, workdir / "data", backend.url, extra_env=extra_env)
    request.addfinalizer(server.stop)
    server.start()
    deployment = Deployment(server, backend, Bootstrap(server).run())
    deployment.configure()
    return deployment


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def deployment(request, tmp_path_factory) -> Deployment:
    version = request.param
    return start_deployment(version, tmp_path_factory.mktemp(f"owui-{version}"), request)
