"""Every route family that gives an API key access to a model, plus a sample of the REST API."""

from dataclasses import dataclass

CHAT_BODY = {"model": "test-model", "messages": [{"role": "user", "content": "ping"}], "stream": False}


@dataclass(frozen=True)
class Route:
    family: str
    method: str
    path: str
    body: dict | None = None
    since: tuple = (0, 6, 0)  # first Open WebUI release serving it
    model_access: bool = True  # reaches the model backend when served

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = (
    Route("chat pipeline", "POST", "/api/chat/completions", CHAT_BODY),
    Route("chat pipeline", "POST", "/api/v1/chat/completions", CHAT_BODY),
    Route("anthropic messages", "POST", "/api/v1/messages", {**CHAT_BODY, "max_tokens": 16}, since=(0, 7, 0)),
    Route("direct provider", "POST", "/openai/chat/completions", CHAT_BODY),
    Route("direct provider", "POST", "/openai/responses", {"model": "test-model", "input": "ping"}, since=(0, 7, 0)),
    Route("tasks", "POST", "/api/v1/tasks/title/completions", {**CHAT_BODY, "chat_id": "local"}),
    Route("tasks", "POST", "/api/v1/tasks/queries/completions", {**CHAT_BODY, "type": "web_search"}),
    Route("embeddings", "POST", "/api/embeddings", {"model": "test-model", "input": "ping"}),
    Route("model list", "GET", "/api/models", model_access=False),
    Route("model list", "GET", "/api/v1/models", model_access=False),
    Route("model list", "GET", "/openai/models", model_access=False),
    Route("rest", "GET", "/api/v1/chats/", model_access=False),
    Route("rest", "GET", "/api/v1/functions/", model_access=False),
    Route("rest", "GET", "/api/v1/files/", model_access=False),
)

# Where ordinary users' keys may go in the "users on chat endpoints only" scenario (the default user list).
USER_ENDPOINTS = ("/api/chat/completions", "/api/v1/chat/completions", "/api/models", "/api/v1/models")


def routes_for(version: tuple) -> list[Route]:
    return [route for route in ROUTES if version >= route.since]
