"""Usage accounting: what an answer reports (or is estimated at), and the book on a real SQLite."""

import asyncio
import json
from types import SimpleNamespace

import pytest
import sqlalchemy
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.conftest import error_lines, receiver
from tests.guard_loader import load_guard

g = load_guard()


def sse(*objects, done=True) -> list[bytes]:
    lines = [f"data: {json.dumps(o)}\n\n".encode() for o in objects]
    return lines + ([b"data: [DONE]\n\n"] if done else [])


def metered(content_type: bytes, chunks: list[bytes], request_bytes: int = 40):
    meter = g.UsageMeter(request_bytes)
    meter.start({"status": 200, "headers": [(b"content-type", content_type)]})
    for chunk in chunks:
        meter.feed(chunk)
    return meter.result()


JSON, SSE, NDJSON = b"application/json", b"text/event-stream; charset=utf-8", b"application/x-ndjson"
OPENAI = {"usage": {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}}
DELTA = {"choices": [{"delta": {"content": "po"}}]}
LARGE = {"choices": [{"delta": {"content": "x" * 4000}}]}  # a provider's one chunk of 4000 characters
ANSWERS = [
    pytest.param(JSON, [json.dumps(OPENAI).encode()], g.Usage(7, 11, 18, False), id="openai-json"),
    pytest.param(
        JSON, [b'{"usage": {"prompt_tokens": 5, ', b'"total_tokens": 5}}'], g.Usage(5, 0, 5, False), id="embed"
    ),
    pytest.param(
        JSON, [b'{"usage": {"input_tokens": 3, "output_tokens": 4}}'], g.Usage(3, 4, 7, False), id="anthropic"
    ),
    pytest.param(SSE, sse(DELTA, DELTA, {"choices": [], **OPENAI}), g.Usage(7, 11, 18, False), id="openai-stream"),
    pytest.param(
        SSE,
        sse(
            {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
            {"type": "message_delta", "usage": {"output_tokens": 21}},
        ),
        g.Usage(9, 21, 30, False),
        id="anthropic-stream",
    ),
    pytest.param(
        SSE,
        sse({"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 3}}}),
        g.Usage(2, 3, 5, False),
        id="responses-stream",
    ),
    pytest.param(
        NDJSON,
        [
            b'{"message": {"content": "po"}, "done": false}\n{"done": true, "prompt_eval_count": 6,',
            b' "eval_count": 8}\n',
        ],
        g.Usage(6, 8, 14, False),
        id="ollama-stream",
    ),
    pytest.param(SSE, sse(DELTA, DELTA, DELTA, done=False), g.Usage(10, 3, 13, True), id="cut-off-stream-estimated"),
    pytest.param(JSON, [b'{"choices": []}'], g.Usage(10, 4, 14, True), id="silent-provider-estimated"),
    pytest.param(JSON, [b'{"usage": {"prompt_tokens": -1}}'], g.Usage(10, 8, 18, True), id="negative-refused"),
    pytest.param(JSON, [b'{"usage": {"prompt_tokens": "7"}}'], g.Usage(10, 9, 19, True), id="string-refused"),
    pytest.param(JSON, [b'{"usage": {"prompt_tokens": true}}'], g.Usage(10, 9, 19, True), id="bool-refused"),
    pytest.param(JSON, [b'{"usage": {"prompt_tokens": 99999999999}}'], g.Usage(10, 11, 21, True), id="absurd-refused"),
    pytest.param(JSON, [b"not json at all"], g.Usage(10, 4, 14, True), id="junk"),
    # one chunk of 100 014 bytes: its text beyond 512 bytes of framing, at 4 bytes a token
    pytest.param(SSE, [b"data: {" + b"[" * 100_000 + b"usage\n\n"], g.Usage(10, 24876, 24886, True), id="deep-junk"),
    pytest.param(SSE, sse(LARGE, done=False), g.Usage(10, 885, 895, True), id="a-few-large-chunks-by-their-bytes"),
]


@pytest.mark.parametrize(("content_type", "chunks", "usage"), ANSWERS)
def test_usage_meter(content_type, chunks, usage):
    assert metered(content_type, chunks) == usage


def test_a_long_line_is_skipped_not_kept():
    meter = g.UsageMeter(0)
    meter.start({"headers": [(b"content-type", SSE)]})
    meter.feed(b"data: " + b"x" * (g.MAX_USAGE_LINE_BYTES + 10))
    assert meter.carry == b""


@pytest.fixture
def book(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'webui.db'}")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text('CREATE TABLE "user" (id VARCHAR PRIMARY KEY, email VARCHAR)'))
        conn.execute(sqlalchemy.text("INSERT INTO \"user\" VALUES ('u1', 'alice@example.com')"))
    return g.UsageBook(engine=lambda: engine, seconds=3600)


def test_book_adds_across_flushes_and_workers(book):
    other_worker = g.UsageBook(engine=book.engine, seconds=3600)
    key = ("2026-12-04", "u1", "m", "chat", "allow")
    book.add(key, g.Usage(1, 2, 3, False))
    book.flush()
    other_worker.add(key, g.Usage(10, 20, 30, True))
    other_worker.flush()
    book.add(("2026-12-04", "u1", "m", "chat", "deny"), None)
    rows = book.rows("2026-12-01", "2026-12-31")
    assert [
        (r["decision"], r["requests"], r["input_tokens"], r["total_tokens"], r["estimated_requests"]) for r in rows
    ] == [
        ("allow", 2, 11, 33, 1),
        ("deny", 1, 0, 0, 0),
    ]
    assert rows[0]["user_email"] == "alice@example.com"


def test_book_prunes_days_past_retention(book):
    book.retention_days = 30
    book.add(("2001-01-01", "u1", "m", "chat", "allow"), g.Usage(1, 1, 2, False))
    book.flush()
    book._pruned_at = -1e9
    book.flush()
    assert book.rows("2000-01-01", "2099-01-01") == []


def test_a_failing_database_keeps_the_rows_and_logs_once(book, caplog):
    engine = book.engine
    book.engine = lambda: (_ for _ in ()).throw(RuntimeError("database is locked"))
    book.add(("2026-12-04", "u1", "m", "chat", "allow"), g.Usage(1, 1, 2, False))
    book.flush()
    book.flush()
    book.engine = engine
    assert [r["requests"] for r in book.rows("2026-01-01", "2026-12-31")] == [1]
    assert len(error_lines(caplog)) == 1, error_lines(caplog)


def test_openmetrics_parses_with_a_real_parser():
    rows = [
        {
            "user_id": "u1",
            "user_email": 'a"b@x',
            "model": "m",
            "route_class": "chat",
            "decision": "allow",
            "requests": 2,
            "input_tokens": 7,
            "output_tokens": 11,
        },
        {
            "user_id": "u1",
            "user_email": 'a"b@x',
            "model": "-",
            "route_class": "other",
            "decision": "deny",
            "requests": 1,
            "input_tokens": 0,
            "output_tokens": 0,
        },
    ]
    families = {f.name: f for f in text_string_to_metric_families(g.openmetrics(rows))}
    requests = {(s.labels["decision"], s.labels["model"]): s.value for s in families["api_key_guard_requests"].samples}
    tokens = {s.labels["kind"]: s.value for s in families["api_key_guard_tokens"].samples if s.labels["model"] == "m"}
    assert (requests, tokens) == ({("allow", "m"): 2, ("deny", "-"): 1}, {"input": 7, "output": 11})
    assert families["api_key_guard_requests"].samples[0].labels["user_email"] == 'a"b@x'


@pytest.mark.parametrize(
    ("path", "klass"),
    [
        ("/api/chat/completions", "chat"),
        ("/openai/responses", "openai"),
        ("/api/v1/tasks/title/completions", "tasks"),
        ("/ollama/api/chat", "ollama"),
        ("/api/embeddings", "embeddings"),
        ("/api/v1/messages", "messages"),
        ("/api/v1/chats/", "other"),
        ("/api/v1/files/", "other"),
    ],
    ids=["chat", "openai", "tasks", "ollama", "embeddings", "messages", "chats", "other"],
)
def test_route_class(path, klass):
    assert g.route_class(path) == klass


@pytest.mark.parametrize(
    ("status", "model"),
    [pytest.param(200, "gpt-x", id="answered"), pytest.param(404, "-", id="core-refused-the-callers-model-word")],
)
def test_an_answer_core_refused_is_recorded_under_no_model(monkeypatch, status, model):
    book = g.UsageBook(engine=lambda: None, seconds=3600)
    book._thread = True  # no flusher: the pending row is the point here
    monkeypatch.setattr(g, "usage_book", lambda: book)
    meter = g.UsageMeter(40)
    meter.start({"status": status, "headers": [(b"content-type", JSON)]})
    asyncio.run(g.finish(g.RequestState(usage=("u1", "gpt-x", "openai", "allow"), meter=meter)))
    assert [key[2] for key in book._rows] == [model]


def test_an_admitted_requests_audit_line_carries_its_tokens(caplog, monkeypatch):
    caplog.set_level("INFO", "api_key_guard")
    book = g.UsageBook(engine=lambda: None, seconds=3600)
    book._thread = True  # no flusher: the line is the point here
    monkeypatch.setattr(g, "usage_book", lambda: book)
    meter = g.UsageMeter(40)
    meter.start({"status": 200, "headers": [(b"content-type", JSON)]})
    meter.feed(json.dumps(OPENAI).encode())
    state = g.RequestState(usage=("u1", "m", "openai", "allow"), meter=meter, audit_all=True)
    asyncio.run(g.finish(state))
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("api_key_guard usage user=u1 model=m route=openai status=200 input=7 output=11 total=18")


@pytest.mark.parametrize(
    ("chunks", "kept", "counted"),
    [
        pytest.param([b"x" * 8], b"x" * 8, 8, id="within-the-limit"),
        pytest.param([b"x" * 8, b"y" * 8], None, 16, id="past-the-limit-still-counted"),
    ],
)
def test_the_body_read_is_counted_for_the_estimate_also_past_the_limit(monkeypatch, chunks, kept, counted):
    guard = g.RouteGuard.__new__(g.RouteGuard)  # only read_body: no app, no hooks

    async def active_copies():
        return [SimpleNamespace(valves=g.Valves(usage_accounting=True))]

    guard.active_copies = active_copies
    monkeypatch.setattr(g, "MAX_MODEL_BODY_BYTES", 10)
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    state = g.RequestState()
    asyncio.run(guard.read_body(state, receiver(messages)))
    assert (state.body, state.body_bytes) == (kept, counted)
