"""One-command demo: a real Open WebUI, the test model backend, the guard installed by
install.py, and a before/after table of who can reach what.

    make demo            (or: python -m tests.e2e.demo [VERSION])
"""

import sys
import tempfile
from pathlib import Path

from .backend import CountingBackend
from .conftest import Deployment
from .provision import VERSIONS
from .routes import CHAT_BODY
from .server import Bootstrap, OpenWebUI

REQUESTS = (
    ("admin", "API key", "POST", "/api/chat/completions"),
    ("admin", "API key", "POST", "/openai/chat/completions"),
    ("alice", "API key", "POST", "/api/chat/completions"),
    ("alice", "API key", "POST", "/openai/chat/completions"),
    ("alice", "API key", "GET", "/api/models"),
    ("alice", "API key", "GET", "/api/v1/chats/"),
    ("gina (automation group)", "API key", "POST", "/api/chat/completions"),
    ("gina (automation group)", "API key", "POST", "/openai/chat/completions"),
    ("alice", "browser session", "POST", "/api/chat/completions"),
)


def table(deployment: Deployment) -> list[str]:
    rows = []
    for who, how, method, path in REQUESTS:
        account = getattr(deployment.people, who.split()[0])
        token = account.api_key if how == "API key" else account.jwt
        before = deployment.backend.calls
        response = deployment.server.call(method, path, token, json=CHAT_BODY if method == "POST" else None)
        if deployment.backend.calls > before:
            note = "(reached the model backend)"
        else:
            note = str(response.json().get("detail", ""))[:90] if response.status_code >= 400 else ""
        rows.append(f"  {who:24} {how:16} {method:4} {path:26} -> {response.status_code} {note}")
    return rows


def main(argv: list[str]) -> int:
    version = argv[0] if argv else VERSIONS[0]
    backend = CountingBackend().start()
    server = OpenWebUI(version, Path(tempfile.mkdtemp(prefix="api-key-guard-demo-")) / "data", backend.url)
    try:
        print(f"starting Open WebUI {version} on {server.url} (first run provisions it: a few minutes)")
        server.start()
        deployment = Deployment(server, backend, Bootstrap(server).run())
        print("\nBEFORE: API keys enabled, every user may hold one, no guard")
        print("\n".join(table(deployment)))
        print("\ninstalling the guard with install.py, valves: api_key_groups=automation")
        deployment.installer("install", "--set", "api_key_groups=automation")
        print("\nAFTER: admin keys everywhere; the automation group on chat endpoints; everyone else denied")
        print("\n".join(table(deployment)))
    finally:
        server.stop()
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
