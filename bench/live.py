"""Figures on a real Open WebUI server: latency, database queries, concurrency, memory.

Every comparison is made inside ONE server process, switching between configurations in
alternating blocks (the guard active or not, a do-nothing filter active or not, route_guard
on or off), so drift on the machine hits every arm alike. Two processes are not compared:
two identical servers of one release measured chat latency ratios from 1.00 to 1.09 per
pair (steady within a pair), more than the differences measured here.
"""

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.e2e.backend import CountingBackend
from tests.e2e.conftest import Deployment
from tests.e2e.processes import free_port
from tests.e2e.routes import CHAT_BODY
from tests.e2e.server import Bootstrap, OpenWebUI

INSTRUMENT = Path(__file__).resolve().parent / "instrument"
CHEAP_GET = "/api/v1/chats/"
GUARD_ID = "api_key_guard"
STREAM_CHUNKS = 2000
LONG_STREAM = {**CHAT_BODY, "stream": True, "max_tokens": STREAM_CHUNKS}  # the backend sends that many chunks


class Server:
    """One benchmarked server: the deployment plus its query counter and process."""

    def __init__(self, version: str, root: Path, backend: CountingBackend, name: str):
        self.counter_port = free_port()
        env = {"PYTHONPATH": str(INSTRUMENT), "BENCH_QUERY_COUNTER_PORT": str(self.counter_port)}
        env["API_KEY_GUARD_TEST_CACHE_SECONDS"] = ""  # the guard's production cache lifetimes, as operators run it
        self.owui = OpenWebUI(version, root / name / "data", backend.url, extra_env=env)
        self.backend = backend
        self.deployment: Deployment | None = None

    def start(self) -> "Server":
        self.owui.start()
        self.deployment = Deployment(self.owui, self.backend, Bootstrap(self.owui).run())
        return self

    def queries(self) -> int:
        return int(requests.get(f"http://127.0.0.1:{self.counter_port}/", timeout=5).text)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.owui.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def timed(session: requests.Session, server: Server, method: str, path: str, token: str, body=None) -> float:
    start = time.perf_counter()
    response = session.request(
        method, server.owui.url + path, headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60
    )
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:200]}")
    return elapsed


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered) * 1e3,
        "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1e3,
    }


def blocks(server: Server, method: str, path: str, body, arms: dict, n_blocks: int, block: int) -> dict:
    """Latency and DB statements of one request per arm; `arms` maps a name to the callable that puts
    the server in that configuration. Arms take turns block by block, each block after a warm-up."""
    samples = {name: [] for name in arms}
    queries = {name: [0, 0] for name in arms}  # [statements, requests]
    session = requests.Session()
    key = server.deployment.people.admin.api_key
    for i in range(n_blocks * len(arms)):
        name = list(arms)[i % len(arms)]
        arms[name]()
        for _ in range(20):  # warm-up: module loaded, caches filled, connection open
            timed(session, server, method, path, key, body)
        q0 = server.queries()
        samples[name].extend(timed(session, server, method, path, key, body) for _ in range(block))
        queries[name][0] += server.queries() - q0
        queries[name][1] += block
    result = {name: summary(values) for name, values in samples.items()}
    result["queries_per_request"] = {name: s / r for name, (s, r) in queries.items()}
    return result


def route_guard(server: Server, on: bool) -> Callable[[], None]:
    def switch() -> None:
        server.deployment.installer("install", "--set", f"route_guard={on}")
        server.deployment.wait_for_policy()

    return switch


def filters(server: Server, guard: bool, noop: bool) -> Callable[[], None]:
    """Which of the two global filters are active (Open WebUI runs only active ones)."""

    def switch() -> None:
        for function_id, wanted in ((GUARD_ID, guard), ("noop", noop)):
            path = f"/api/v1/functions/id/{function_id}"
            if server.owui.ok("GET", path, server.deployment.people.admin.jwt)["is_active"] != wanted:
                server.owui.ok("POST", path + "/toggle", server.deployment.people.admin.jwt)

    return switch


def concurrency(server: Server, guarded: bool, total: int, clients: int = 16) -> dict:
    """16 clients, a mix of admin keys, user keys and sessions; every answer checked."""
    people = server.deployment.people
    mix = [
        ("POST", "/api/chat/completions", people.admin.api_key, CHAT_BODY, 200),
        ("POST", "/openai/chat/completions", people.alice.api_key, CHAT_BODY, 403 if guarded else 200),
        ("GET", "/api/models", people.alice.api_key, None, 403 if guarded else 200),
        ("POST", "/api/chat/completions", people.admin.jwt, CHAT_BODY, 200),
        ("GET", "/api/models", people.alice.jwt, None, 200),
    ]
    errors, wrong = [], []
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        method, path, token, body, expected = mix[i % len(mix)]
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        try:
            status = session.request(
                method, server.owui.url + path, headers={"Authorization": f"Bearer {token}"}, json=body, timeout=120
            ).status_code
        except requests.RequestException as exc:
            with lock:
                errors.append(repr(exc))
            return
        if status != expected:
            with lock:
                wrong.append(f"{method} {path} -> {status}, expected {expected}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - start
    return {
        "requests": total,
        "clients": clients,
        "seconds": elapsed,
        "throughput_rps": total / elapsed,
        "errors": len(errors),
        "wrong_decisions": len(wrong),
        "examples": (errors + wrong)[:3],
        "rss_mb_after": server.rss_mb(),
    }


NOOP_FILTER = '''"""
title: No-op filter with valves (benchmark baseline)
"""

from pydantic import BaseModel


class Filter:
    class Valves(BaseModel):
        priority: int = 0

    def __init__(self):
        self.valves = self.Valves()

    def inlet(self, body: dict) -> dict:
        return body
'''


def install_noop_filter(server: Server) -> None:
    s, jwt = server.owui, server.deployment.people.admin.jwt
    s.ok(
        "POST", "/api/v1/functions/create", jwt, json={"id": "noop", "name": "noop", "content": NOOP_FILTER, "meta": {}}
    )
    for flag in ("toggle", "toggle/global"):
        s.ok("POST", f"/api/v1/functions/id/noop/{flag}", jwt)


CONFIGURATIONS = {  # name -> (guard active, do-nothing filter active)
    "guard": (True, False),
    "noop_filter": (False, True),
    "pristine": (False, False),
}


def run(version: str, chat_blocks: int, get_blocks: int, block: int, concurrent_total: int) -> dict:
    backend = CountingBackend().start()
    server = Server(version, Path(tempfile.mkdtemp(prefix="api-key-guard-bench-")), backend, "server")
    try:
        server.start()
        rss_before = server.rss_mb()
        install_noop_filter(server)
        server.deployment.installer("install")
        server.deployment.wait_for_policy()
        switches = {name: filters(server, *active) for name, active in CONFIGURATIONS.items()}
        chat = blocks(server, "POST", "/api/chat/completions", CHAT_BODY, switches, chat_blocks, block)
        for baseline in ("noop_filter", "pristine"):
            chat[f"ratio_vs_{baseline}"] = chat["guard"]["median_ms"] / chat[baseline]["median_ms"]
        # A long stream on a route without filters: the guard's per-chunk work (usage metering) is all
        # that differs between the arms.
        stream_arms = {"guard": switches["guard"], "no_guard": switches["pristine"]}
        stream = blocks(server, "POST", "/openai/chat/completions", LONG_STREAM, stream_arms, chat_blocks, block // 5)
        stream["ratio"] = stream["guard"]["median_ms"] / stream["no_guard"]["median_ms"]
        runs = {name: [] for name in CONFIGURATIONS}
        for _ in range(2):  # every configuration twice, in turn: drift hits all
            for name, switch in switches.items():
                switch()
                runs[name].append(concurrency(server, name == "guard", concurrent_total))
        best = {name: max(r, key=lambda x: x["throughput_rps"])["throughput_rps"] for name, r in runs.items()}
        switches["guard"]()
        get = blocks(
            server,
            "GET",
            CHEAP_GET,
            None,
            {"route_guard_on": route_guard(server, True), "route_guard_off": route_guard(server, False)},
            get_blocks,
            block,
        )
        get["ratio_median"] = get["route_guard_on"]["median_ms"] / get["route_guard_off"]["median_ms"]
        return {
            "open_webui": version,
            "chat": chat,
            "long_stream": stream,
            "get_route_guard": get,
            "concurrency": {
                "runs": runs,
                "best_rps": best,
                "errors": sum(r["errors"] for rs in runs.values() for r in rs),
                "wrong_decisions": sum(r["wrong_decisions"] for rs in runs.values() for r in rs),
            },
            "rss_mb": {"before_the_guard": rss_before, "after_all_runs": server.rss_mb()},
        }
    finally:
        server.owui.stop()
        backend.stop()
