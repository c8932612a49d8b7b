"""Figures on real Open WebUI servers: A/B latency, database queries, concurrency, memory.

Two identical servers of the same release run side by side on 127.0.0.1: A has the
guard installed (active, global, route guard on), B never had it. Requests are
interleaved between them, so drift on the machine hits both arms alike.
"""

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.e2e.backend import CountingBackend
from tests.e2e.conftest import Deployment
from tests.e2e.routes import CHAT_BODY
from tests.e2e.server import Bootstrap, OpenWebUI, free_port

INSTRUMENT = Path(__file__).resolve().parent / "instrument"
CHEAP_GET = "/api/v1/chats/"


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


def ab_chat(a: Server, b: Server, n: int) -> dict:
    """Non-streaming chat with an admin key, A and B interleaved request by request."""
    arms = {"guard": [], "baseline": []}
    sessions = {name: requests.Session() for name in arms}
    for name, server in (("guard", a), ("baseline", b)):
        for _ in range(20):  # warm-up: module loaded, caches filled, connections open
            timed(
                sessions[name],
                server,
                "POST",
                "/api/chat/completions",
                server.deployment.people.admin.api_key,
                CHAT_BODY,
            )
    q0 = {"guard": a.queries(), "baseline": b.queries()}
    for i in range(n):
        order = (("guard", a), ("baseline", b)) if i % 2 == 0 else (("baseline", b), ("guard", a))
        for name, server in order:
            key = server.deployment.people.admin.api_key
            arms[name].append(timed(sessions[name], server, "POST", "/api/chat/completions", key, CHAT_BODY))
    q = {"guard": (a.queries() - q0["guard"]) / n, "baseline": (b.queries() - q0["baseline"]) / n}
    result = {name: summary(samples) for name, samples in arms.items()}
    result["ratio_median"] = result["guard"]["median_ms"] / result["baseline"]["median_ms"]
    result["queries_per_request"] = q
    return result


def ab_route_guard_get(a: Server, n_blocks: int, block: int) -> dict:
    """A cheap authenticated GET with an admin key on server A, route_guard on vs off, in alternating blocks."""
    arms = {"route_guard_on": [], "route_guard_off": []}
    queries = {name: [0, 0] for name in arms}  # [statements, requests]
    session = requests.Session()
    key = a.deployment.people.admin.api_key
    for i in range(n_blocks):
        name = "route_guard_on" if i % 2 == 0 else "route_guard_off"
        a.deployment.installer("install", "--set", f"route_guard={name.endswith('on')}")
        a.deployment.wait_for_policy()
        for _ in range(20):
            timed(session, a, "GET", CHEAP_GET, key)
        q0 = a.queries()
        arms[name].extend(timed(session, a, "GET", CHEAP_GET, key) for _ in range(block))
        queries[name][0] += a.queries() - q0
        queries[name][1] += block
    a.deployment.installer("install", "--set", "route_guard=True")
    result = {name: summary(samples) for name, samples in arms.items()}
    result["ratio_median"] = result["route_guard_on"]["median_ms"] / result["route_guard_off"]["median_ms"]
    result["queries_per_request"] = {name: s / r for name, (s, r) in queries.items()}
    return result


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


def install_noop_filter(b: Server) -> None:
    s, jwt = b.owui, b.deployment.people.admin.jwt
    s.ok(
        "POST", "/api/v1/functions/create", jwt, json={"id": "noop", "name": "noop", "content": NOOP_FILTER, "meta": {}}
    )
    for flag in ("toggle", "toggle/global"):
        s.ok("POST", f"/api/v1/functions/id/noop/{flag}", jwt)


def concurrency_ab(a: Server, b: Server, total: int) -> dict:
    runs = {"guard": [], "baseline": []}
    for _ in range(2):  # A, B, A, B: drift hits both
        runs["guard"].append(concurrency(a, True, total))
        runs["baseline"].append(concurrency(b, False, total))
    best = {name: max(r, key=lambda x: x["throughput_rps"]) for name, r in runs.items()}
    return {
        "runs": runs,
        "throughput_ratio": best["guard"]["throughput_rps"] / best["baseline"]["throughput_rps"],
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
        "wrong_decisions": sum(r["wrong_decisions"] for rs in runs.values() for r in rs),
        "rss_mb": {name: rs[-1]["rss_mb_after"] for name, rs in runs.items()},
    }


def run(version: str, chat_n: int, get_blocks: int, get_block: int, concurrent_total: int) -> dict:
    backend = CountingBackend().start()
    root = Path(tempfile.mkdtemp(prefix="api-key-guard-bench-"))
    a, b = Server(version, root, backend, "guard"), Server(version, root, backend, "no-guard")
    try:
        a.start()
        b.start()
        a.deployment.installer("install")
        a.deployment.wait_for_policy()
        results = {"open_webui": version, "get_route_guard_ab": ab_route_guard_get(a, get_blocks, get_block)}
        # Baseline 1: B never had a filter. Baseline 2: B with a do-nothing global filter, which
        # isolates the guard's own cost from what Open WebUI's filter pipeline costs any filter.
        for baseline in ("pristine", "noop_filter"):
            if baseline == "noop_filter":
                install_noop_filter(b)
            results[f"vs_{baseline}"] = {
                "chat_ab": ab_chat(a, b, chat_n),
                "concurrency": concurrency_ab(a, b, concurrent_total),
            }
        return results
    finally:
        a.owui.stop()
        b.owui.stop()
        backend.stop()
