"""A tiny OpenAI-compatible model backend that counts every call it serves.

The only stand-in in the test suite: Open WebUI itself is always real. A test
proves a denied request never reached a model by comparing `calls` before and
after it.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ("test-model", "other-model")


class CountingBackend:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_path: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, name="counting-backend", daemon=True)

    @property
    def calls(self) -> int:
        with self.lock:
            return sum(self.by_path.values())

    def start(self) -> "CountingBackend":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _count(self, path: str) -> None:
        with self.lock:
            self.by_path[path] = self.by_path.get(path, 0) + 1

    def _handler(self):
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

            def log_message(self, *args):  # keep test output quiet
                pass

            def _json(self, payload: dict, status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw or b"{}")
                except ValueError:
                    return {}

            def do_GET(self):
                backend._count("GET " + self.path)
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in MODELS]
                    return self._json({"object": "list", "data": data})
                return self._json({"error": "not found"}, 404)

            def do_POST(self):
                backend._count("POST " + self.path)
                body = self._body()
                model = body.get("model", MODELS[0])
                if self.path.endswith("/chat/completions"):
                    if body.get("stream"):
                        return self._stream(model)
                    return self._json(completion(model))
                if self.path.endswith("/embeddings"):
                    inputs = body.get("input") or [""]
                    inputs = inputs if isinstance(inputs, list) else [inputs]
                    data = [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))
                    ]
                    return self._json({"object": "list", "data": data, "model": model})
                if self.path.endswith("/responses"):
                    return self._json(
                        {
                            "id": "resp-1",
                            "object": "response",
                            "created_at": int(time.time()),
                            "model": model,
                            "status": "completed",
                            "output": [
                                {
                                    "type": "message",
                                    "id": "msg-1",
                                    "role": "assistant",
                                    "status": "completed",
                                    "content": [{"type": "output_text", "text": "pong", "annotations": []}],
                                }
                            ],
                            "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
                        }
                    )
                return self._json({"error": "not found"}, 404)

            def _stream(self, model: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = completion(model)
                chunk["object"] = "chat.completion.chunk"
                chunk["choices"] = [
                    {"index": 0, "delta": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}
                ]
                self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
                self.close_connection = True

        return Handler


def completion(model: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
