"""In-process figures for what an attacker or a busy key chooses: the time to judge the largest body the
guard accepts, with crafted content, at full and half size (doubling the input must at most double the
time); and what usage accounting adds to an admitted request and to each chunk of a stream."""

import asyncio
import itertools
import json
import time

from tests.guard_loader import load_guard

from .micro import per_call_us


def judged_seconds(g, reader, body: bytes, repeat: int = 3) -> float:
    """Best of `repeat`: the parse and read the route guard runs inside core's key lookup."""
    state = g.RequestState(body=body, body_read=True)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        g.read_asked(state, reader)
        best = min(best, time.perf_counter() - start)
    return best


def crafted_bodies(g, size: int) -> dict:
    """Bodies of about `size` bytes built to be slow: what a regex, a recursive parser or a scan of every
    candidate would choke on."""
    mention_maze = "<@M:" * (size // 4)
    almost_mentions = "<@M:a|" * (size // 6)
    return {
        "channel post, '<@M:' repeated": json.dumps({"content": mention_maze}).encode(),
        "channel post, '<@M:a|' repeated": json.dumps({"content": almost_mentions}).encode(),
        "chat, one huge message": json.dumps({"model": "m", "messages": [{"content": "x" * size}]}).encode(),
        "chat, 64 fan-out targets and padding": json.dumps(
            {"model": "m", "message_ids": [{"model_id": "m" * 256}] * 64, "pad": "y" * size}
        ).encode(),
        "nested arrays": b"[" * (size // 2) + b"]" * (size // 2),
    }


def worst_case_figures(g) -> dict:
    """ms to judge each crafted body at 1, 2, 4 and 8 MiB (the largest accepted), and the largest ratio
    between one size and the next: linear work doubles, a quadratic scan would quadruple."""
    readers = {True: g.MODEL_READERS[g.MENTIONS], False: g.MODEL_READERS[g.MODEL_ROUTE]}
    sizes = [g.MAX_MODEL_BODY_BYTES >> shift for shift in (3, 2, 1, 0)]
    bodies = [crafted_bodies(g, size - 64) for size in sizes]
    figures = {}
    for name in bodies[0]:
        reader = readers[name.startswith("channel")]
        ms = [judged_seconds(g, reader, b[name], repeat=5) * 1e3 for b in bodies]
        figures[name] = {"ms": dict(zip((f"{s >> 20} MiB" for s in sizes), ms, strict=True))}
        figures[name]["largest_doubling_ratio"] = max(b / a for a, b in itertools.pairwise(ms))
    return figures


SSE_CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" x"}}]}\n\n'
JSON_ANSWER = json.dumps(
    {"choices": [{"message": {"content": "pong"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 11}}
).encode()


def usage_figures(g) -> dict:
    book = g.UsageBook(engine=lambda: None, seconds=3600)  # never flushed here: the request path only
    book._thread = True  # no flusher thread in a benchmark
    key = ("2026-12-04", "u-1", "test-model", "openai", "allow")
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}

    def record_one() -> None:
        meter = g.UsageMeter(120)
        meter.start(start)
        meter.feed(JSON_ANSWER)
        book.add(key, meter.result())

    stream = g.UsageMeter(120)
    stream.start({"status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    sent = []

    async def bare(message):
        sent.append(message)

    state = g.RequestState(meter=g.UsageMeter(120))
    guard = g.RouteGuard(None, None)
    metered_send = guard.marking(state, bare)
    message = {"type": "http.response.body", "body": SSE_CHUNK, "more_body": True}
    loop = asyncio.new_event_loop()
    sse = [(b"content-type", b"text/event-stream")]
    loop.run_until_complete(metered_send({"type": "http.response.start", "status": 200, "headers": sse}))

    def through(send_fn, n: int):
        async def many():
            for _ in range(n):
                await send_fn(message)
                sent.clear()

        loop.run_until_complete(many())

    try:
        figures = {
            "usage_record_admitted_request": per_call_us(record_one, 500),
            "usage_meter_per_sse_chunk": per_call_us(lambda: stream.feed(SSE_CHUNK), 2000),
            "send_per_chunk_metered": per_call_us(lambda: through(metered_send, 100), 1),
            "send_per_chunk_bare": per_call_us(lambda: through(bare, 100), 1),
        }
    finally:
        loop.close()
    for name in ("send_per_chunk_metered", "send_per_chunk_bare"):
        figures[name] = {k: v / 100 for k, v in figures[name].items()}
    return figures


def run() -> dict:
    g = load_guard()
    return {"worst_case_judging": worst_case_figures(g), "usage": usage_figures(g)}
