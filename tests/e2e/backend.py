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
OLLAMA_MODELS = ("llama-test:latest",)
# What the backend reports, so a test can compare the guard's numbers with what a model really said.
CHAT_USAGE = {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}
EMBEDDING_USAGE = {"prompt_tokens": 5, "total_tokens": 5}
RESPONSES_USAGE = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
OLLAMA_USAGE = {"prompt_eval_count": 6, "eval_count": 8}
OLLAMA_EMBED_USAGE = {"prompt_eval_count": 5}
STREAM_TEXTS = ("po", "n", "g")  # "pong", in three chunks
STREAM_CHUNKS = len(STREAM_TEXTS)
LONG_STREAM_FROM = 100  # max_tokens from this on: that many more chunks (the benchmark's long stream)
CUT_OFF = "cut the stream off"  # a last user message saying this gets a stream with no usage and no [DONE]
# A last user message saying this gets a stream held after its first chunk until the test opens the gate
# (CountingBackend.hold()): a request in flight for as long as a test needs, with no timing guessed.
HOLD = "hold the stream open"
HOLD_SECONDS = 60.0  # bound on a hold whose test never opened the gate


class CountingBackend:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_path: dict[str, int] = {}
        self.posted: list[str] = []  # the model of every POST, in arrival order ("" when the body names none)
        self.gate = threading.Event()  # what held streams wait for (see HOLD)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, name="counting-backend", daemon=True)

    @property
    def calls(self) -> int:
        with self.lock:
            return sum(self.by_path.values())

    def models_since(self, mark: int) -> list[str]:
        """The models of the POSTs (chat, embeddings, responses) served after the first `mark` of them."""
        with self.lock:
            return self.posted[mark:]

    @property
    def posts(self) -> int:
        with self.lock:
            return len(self.posted)

    def hold(self) -> threading.Event:
        """A new closed gate for the HOLD streams that arrive from now on; set() it to let them finish."""
        self.gate = threading.Event()
        return self.gate

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
                if self.path == "/api/tags":  # Ollama's listing (servers started with Ollama on)
                    return self._json({"models": [{"name": m, "model": m, "size": 1} for m in OLLAMA_MODELS]})
                if self.path == "/api/version":
                    return self._json({"version": "0.6.0"})
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in MODELS]
                    return self._json({"object": "list", "data": data})
                return self._json({"error": "not found"}, 404)

            def do_POST(self):
                backend._count("POST " + self.path)
                body = self._body()
                with backend.lock:
                    backend.posted.append(str(body.get("model") or ""))
                model = body.get("model", MODELS[0])
                if self.path in ("/api/chat", "/api/generate"):
                    return self._ollama(model, body)
                if self.path in ("/api/embed", "/api/embeddings"):
                    return self._json({"model": model, "embeddings": [[0.1, 0.2]], **OLLAMA_EMBED_USAGE})
                if self.path.endswith("/chat/completions"):
                    if body.get("stream"):
                        gate = backend.gate if last_message(body) == HOLD else None
                        return self._stream(model, cut=asks_for_a_cut(body), chunks=long_stream(body), gate=gate)
                    return self._json(completion(model))
                if self.path.endswith("/embeddings"):
                    inputs = body.get("input") or [""]
                    inputs = inputs if isinstance(inputs, list) else [inputs]
                    data = [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))
                    ]
                    return self._json({"object": "list", "data": data, "model": model, "usage": EMBEDDING_USAGE})
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
                            "usage": RESPONSES_USAGE,
                        }
                    )
                return self._json({"error": "not found"}, 404)

            def _stream(self, model: str, cut: bool = False, chunks: int = 0, gate=None) -> None:
                """An OpenAI stream: STREAM_CHUNKS content chunks (`chunks` more for a long one, the
                benchmark's), then (unless cut off) a usage chunk and [DONE]; with a `gate`, held after
                the first chunk until it opens."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = completion(model)
                chunk["object"] = "chat.completion.chunk"
                del chunk["usage"]
                for i in range(STREAM_CHUNKS):
                    last = i == STREAM_CHUNKS - 1
                    delta = (
                        {"role": "assistant", "content": STREAM_TEXTS[i]} if i == 0 else {"content": STREAM_TEXTS[i]}
                    )
                    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}]
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if gate is not None and i == 0:
                        gate.wait(HOLD_SECONDS)
                for _ in range(chunks):
                    chunk["choices"] = [{"index": 0, "delta": {"content": " x"}, "finish_reason": None}]
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if not cut:
                    final = {**chunk, "choices": [], "usage": CHAT_USAGE}
                    self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                self.close_connection = True

            def _ollama(self, model: str, body: dict) -> None:
                """Ollama's /api/chat and /api/generate: NDJSON by default, the counts in the last object."""
                final = {"model": model, "done": True, "done_reason": "stop", **OLLAMA_USAGE}
                if body.get("stream") is False:
                    return self._json(
                        {**final, "message": {"role": "assistant", "content": "pong"}, "response": "pong"}
                    )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Connection", "close")
                self.end_headers()
                for text in ("po", "ng"):
                    part = {"model": model, "message": {"role": "assistant", "content": text}, "response": text}
                    self.wfile.write((json.dumps({**part, "done": False}) + "\n").encode())
                self.wfile.write((json.dumps(final) + "\n").encode())
                self.close_connection = True

        return Handler


def completion(model: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
        "usage": CHAT_USAGE,
    }


def long_stream(body: dict) -> int:
    """Extra chunks a benchmark asks for with `max_tokens` (bounded); none otherwise."""
    wanted = body.get("max_tokens")
    return min(wanted, 20_000) if isinstance(wanted, int) and wanted >= LONG_STREAM_FROM else 0


def last_message(body: dict) -> object:
    messages = body.get("messages") or [{}]
    return messages[-1].get("content") if isinstance(messages[-1], dict) else None


def asks_for_a_cut(body: dict) -> bool:
    return last_message(body) == CUT_OFF
