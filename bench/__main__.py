"""API Key Guard benchmark: `python -m bench [--quick]` (or `make bench`).

Prints a table and writes bench/results/latest.json. Talks to 127.0.0.1 only; every
server it starts is stopped at the end.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from tests.e2e.provision import VERSIONS
from tests.guard_loader import load_guard

from . import hardening, live, micro

RESULTS = Path(__file__).resolve().parent / "results"
# The performance goals, the one place they are written: figure -> (comparison, bound).
GOALS = {
    "decision_typical_median_us": ("<", 5.0),
    "inlet_warm_median_us": ("<", 50.0),
    "get_latency_ratio": ("<=", 1.05),
    "chat_latency_ratio": ("<=", 1.03),
    "ratelimit_ratio_sync": ("<=", 1.5),
    "ratelimit_ratio_async": ("<=", 1.5),
}
UNITS = {"decision_typical_median_us": " us", "inlet_warm_median_us": " us"}


def goal(name: str, value: float) -> dict:
    """The `goal` and `ok` cells of a table row for a figure with a goal."""
    comparison, bound = GOALS[name]
    ok = value < bound if comparison == "<" else value <= bound
    return {"goal": f"{comparison}{bound:g}{UNITS.get(name, '')}", "ok": ok}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem_gb:.0f} GiB, {cpu}, Python {platform.python_version()}"


# The chat arms, all on one server: the guard, and the two baselines it is compared with.
ARMS = {
    "guard": "the guard",
    "noop_filter": "a do-nothing global filter with valves",  # what Open WebUI costs any filter
    "pristine": "no active filter (guard off, its hooks inert)",
}


def row(label: str, first: float | str = "", second: float | str = "", goal: str = "", ok: bool = True) -> str:
    cells = [f"{v:10.3f}" if isinstance(v, float) else f"{v:>10}" for v in (first, second)]
    verdict = f"  {goal} {'ok' if ok else 'MISSED'}" if goal else ""
    return f"{label:60} {cells[0]} {cells[1]}{verdict}"


def table(r: dict) -> list[str]:
    m, live_r = r["micro"], r["live"]
    get, chat, conc = live_r["get_route_guard"], live_r["chat"], live_r["concurrency"]
    typical, inlet = m["decision_typical"]["median_us"], m["inlet_warm"]["median_us"]
    rows = [
        f"API Key Guard benchmark  {r['date']}  Open WebUI {r['live']['open_webui']}",
        f"machine: {r['machine']}",
        "",
        row("figure", "median", "p95"),
        row(
            "policy decision, typical valves (us/call)",
            typical,
            m["decision_typical"]["p95_us"],
            **goal("decision_typical_median_us", typical),
        ),
        row("policy decision, worst-case valves (us/call)", *m["decision_worst_case"].values()),
        row("policy decision, ten group tiers (us/call)", *m["decision_ten_tiers"].values()),
        row("rate limiter, counters per worker (us/request)", *m["ratelimit_per_worker"].values()),
        *limiter_rows(m),
        row(
            "inlet as Open WebUI calls it, warm cache (us/call)",
            inlet,
            m["inlet_warm"]["p95_us"],
            **goal("inlet_warm_median_us", inlet),
        ),
        row("inlet, ten group tiers, a token quota read (us/call)", *m["inlet_ten_tiers"].values()),
    ]
    for arm in ("route_guard_on", "route_guard_off"):
        rows.append(
            row(f"GET {live.CHEAP_GET}, {arm.replace('_', ' ')} (ms)", get[arm]["median_ms"], get[arm]["p95_ms"])
        )
    rows += [
        row("GET latency ratio on / off", get["ratio_median"], "", **goal("get_latency_ratio", get["ratio_median"])),
        row("DB statements per GET, route guard on | off", *map(float, get["queries_per_request"].values())),
    ]
    rows += ["", "chat completion on one server, the active filter switched in alternating blocks:"]
    rows += [row(f"  {label} (ms)", chat[arm]["median_ms"], chat[arm]["p95_ms"]) for arm, label in ARMS.items()]
    noop_ratio = chat["ratio_vs_noop_filter"]
    statements = chat["queries_per_request"]
    rows += [
        row("chat latency ratio guard / do-nothing filter", noop_ratio, "", **goal("chat_latency_ratio", noop_ratio)),
        row("chat latency ratio guard / no filter", chat["ratio_vs_pristine"]),
        row("DB statements per chat, guard | do-nothing filter", statements["guard"], statements["noop_filter"]),
        row("DB statements per chat, no filter", statements["pristine"]),
    ]
    rows += ["", f"16 clients, {conc['runs']['guard'][0]['requests']} mixed requests (best of 2 each):"]
    rows += [row(f"  {label} (req/s)", conc["best_rps"][arm]) for arm, label in ARMS.items()]
    rows += [
        row("errors | wrong decisions under concurrency", conc["errors"], conc["wrong_decisions"]),
        row("server RSS before the guard | after all runs (MiB)", *map(float, live_r["rss_mb"].values())),
    ]
    stream = live_r["long_stream"]
    rows += [
        "",
        f"a {live.STREAM_CHUNKS}-chunk stream on /openai/chat/completions (no filters run there):",
        row(
            "  guard, its usage meter reading every chunk (ms)", stream["guard"]["median_ms"], stream["guard"]["p95_ms"]
        ),
        row("  no guard (ms)", stream["no_guard"]["median_ms"], stream["no_guard"]["p95_ms"]),
        row("long stream ratio guard / no guard", stream["ratio"]),
    ]
    rows += hardening_rows(r["hardening"])
    rows.append(cache_line(load_guard()))
    return rows


def hardening_rows(h: dict) -> list[str]:
    usage = h["usage"]
    rows = [
        "",
        row("usage: meter and record one admitted JSON answer (us)", *usage["usage_record_admitted_request"].values()),
        row("usage: meter one SSE chunk (us)", *usage["usage_meter_per_sse_chunk"].values()),
        row(
            "usage: send one chunk, metered | bare (us)",
            usage["send_per_chunk_metered"]["median_us"],
            usage["send_per_chunk_bare"]["median_us"],
        ),
        "",
        "judging a crafted body after core accepted the key (ms at 1 | 2 | 4 | 8 MiB, the largest accepted):",
    ]
    for name, figures in h["worst_case_judging"].items():
        ms = " | ".join(f"{v:.1f}" for v in figures["ms"].values())
        rows.append(f"  {name:45} {ms:>32}   largest doubling x{figures['largest_doubling_ratio']:.2f}")
    return rows


def limiter_rows(m: dict) -> list[str]:
    """The limiter against a local Redis, next to a bare PING of the same client, for micro.SCALE_LIMIT."""
    rows = []
    for suffix, crowd in (("", ""), ("_10k_users", f", {micro.SCALE_USERS} users' counters present")):
        for mode, client in (("sync", "sync"), ("async", "asyncio")):
            rows.append(
                row(
                    f"rate limiter, Redis, {client} client{crowd} (us/request)",
                    *m[f"ratelimit_redis_{mode}{suffix}"].values(),
                )
            )
            rows.append(row("  bare PING of the same client (us)", *m[f"redis_ping_{mode}{suffix}"].values()))
            ratio, name = m[f"ratelimit_ratio_{mode}{suffix}"], f"ratelimit_ratio_{mode}"
            rows.append(
                row(
                    "  limiter / PING (median of paired batches)",
                    ratio,
                    "",
                    **(goal(name, ratio) if not suffix else {}),
                )
            )
            rows.append(
                row("  of it: the script alone, the guard's connections / PING", m[f"script_ratio_{mode}{suffix}"])
            )
            rows.append(row("  a PING on those connections / PING", m[f"line_ping_ratio_{mode}{suffix}"]))
            rows.append(row("  of it: the script's time inside Redis (us)", m[f"script_in_redis_us_{mode}{suffix}"]))
    rows += [
        row(f"Redis bytes per active user, {micro.SCALE_LIMIT}, full windows", float(m["bytes_per_user_buckets"])),
        row("  the same with the sliding log of before (bytes)", float(m["bytes_per_user_log_before"])),
        row(f"  Redis used_memory per user, {micro.SCALE_USERS} users (bytes)", m["used_memory_per_user_10k"]),
    ]
    return rows


def cache_line(guard) -> str:
    """The guard's cache bounds, read from the guard itself."""
    return (
        f"guard caches: groups <= {guard.CACHE_MAX_ENTRIES} users ({guard.GROUPS_TTL_SECONDS:g} s TTL), "
        f"function state 1 entry ({guard.FUNCTION_STATE_TTL_SECONDS:g} s TTL), "
        f"compiled policies <= {guard.compile_policy.cache_info().maxsize}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSIONS[0], help="Open WebUI release (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    args = parser.parse_args(argv)
    sizes = (
        dict(chat_blocks=2, get_blocks=2, block=60, concurrent_total=500)
        if args.quick
        else dict(chat_blocks=8, get_blocks=8, block=150, concurrent_total=2000)
    )
    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "micro": micro.run(),
        "hardening": hardening.run(),
        "live": live.run(args.version, **sizes),
    }
    print("\n".join(table(results)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
