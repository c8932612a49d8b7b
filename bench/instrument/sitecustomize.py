"""Benchmark-only instrumentation, loaded into the Open WebUI server process via PYTHONPATH.

Counts every SQL statement SQLAlchemy executes (all engines, sync and async) and
serves the running total on http://127.0.0.1:$BENCH_QUERY_COUNTER_PORT/ so the
benchmark can tell whether the guard adds database queries per request.
"""

import os

if os.environ.get("BENCH_QUERY_COUNTER_PORT"):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _lock = threading.Lock()
    _count = [0]

    @event.listens_for(Engine, "before_cursor_execute")
    def _count_statement(*_args, **_kwargs):
        with _lock:
            _count[0] += 1

    class _Counter(BaseHTTPRequestHandler):
        def do_GET(self):
            data = str(_count[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    _server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["BENCH_QUERY_COUNTER_PORT"])), _Counter)
    threading.Thread(target=_server.serve_forever, name="bench-query-counter", daemon=True).start()
