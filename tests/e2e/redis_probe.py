"""The guard's limiter on a pinned release's own Redis stack, without a server: run by that release's venv
Python (`python redis_probe.py GUARD_FILE sync|async`) with Open WebUI's Redis settings in its environment.

It imports the release's open_webui.env and open_webui.utils.redis (whose helper builds the client from
those settings, with the release's redis-py), runs the guard file, and answers one JSON line per
`check <user id> <limit>` line on stdin: whether it was admitted, where it was counted, how long the
check took, and whether it went over the guard's own connections (DirectLine). The test drives faults
(stall, crash, failover) between checks. Standard library only."""

import asyncio
import inspect
import json
import logging
import sys
import time
import types

READY = "api-key-guard-probe-ready"  # 0.6.22's env module prints paths on import: wait for this line


def main(guard_file: str, mode: str) -> None:
    import open_webui.env as env
    import open_webui.utils.redis  # noqa: F401 - the guard reaches it through sys.modules

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    guard = types.ModuleType("function_api_key_guard_probe")
    sys.modules[guard.__name__] = guard
    with open(guard_file, encoding="utf-8") as source:
        exec(compile(source.read(), guard_file, "exec"), guard.__dict__)  # the repository's guard file
    prefix = str(getattr(env, "REDIS_KEY_PREFIX", "open-webui"))
    limiter = guard.Limiter(guard.RedisCounters(lambda: guard.openwebui_redis(mode == "async"), prefix))
    with asyncio.Runner() as runner:
        print(READY, flush=True)
        for line in sys.stdin:
            _, user_id, text = line.split()
            started = time.monotonic()
            verdict = runner.run(settled(limiter.check(user_id, guard.RateLimit.parse(text))))
            answer = {"allowed": verdict.allowed, "counters": limiter.counters, "seconds": time.monotonic() - started}
            answer["direct line"] = limiter.redis._line is not None  # one server: the guard's own connections
            print(json.dumps(answer), flush=True)


async def settled(value):
    return await value if inspect.isawaitable(value) else value


if __name__ == "__main__":
    main(*sys.argv[1:3])
