"""Route-table contract: every route of the running Open WebUI either answers a denied API key
with the guard's 403, or is listed below as exempt with the reason. A route a new release adds
fails this test until someone looks at it."""

import json
import re
import subprocess

from .provision import venv_dir
from .test_attacks import GUARD, raw

LIST_ROUTES = (
    "import json, open_webui.main as m\n"
    "print('ROUTES=' + json.dumps([[r.path, sorted(getattr(r, 'methods', None) or [])]"
    " for r in m.app.routes]))"
)
# Routes that never authenticate an API key, so there is nothing for the guard to judge.
EXEMPT = {
    "/openapi.json": "FastAPI schema, public",
    "/docs": "FastAPI docs page, public",
    "/docs/oauth2-redirect": "FastAPI docs helper, public",
    "/ollama/": "Ollama status probe, no authentication",
    "/ollama/api/version": "0.6: Ollama version, no authentication",
    "/ollama/api/version/{url_idx}": "0.6: Ollama version, no authentication",
    "/api/v1/retrieval/": "0.6: retrieval status, no authentication",
    "/api/v1/retrieval/ef/{text}": "0.6: embeds text with NO authentication at all (core's own hole, not a key)",
    "/api/v1/memories/ef": "0.6: embedding self-test, no authentication",
    "/api/v1/auths/ldap": "sign-in with LDAP credentials",
    "/api/v1/auths/signin": "sign-in with a password",
    "/api/v1/auths/signup": "sign-up",
    "/api/v1/auths/signout": "clears cookies, authenticates nothing",
    "/api/v1/auths/oauth/{provider}/token/exchange": "0.12: OAuth token exchange, no API key",
    "/api/v1/auths/mfa/challenge": "0.12: MFA step of a password sign-in",
    "/api/v1/auths/mfa/enroll/start": "0.12: MFA step of a password sign-in",
    "/api/v1/auths/mfa/enroll/confirm": "0.12: MFA step of a password sign-in",
    "/api/v1/auths/mfa/verify": "0.12: MFA step of a password sign-in",
    "/api/v1/auths/mfa/recover": "0.12: MFA step of a password sign-in",
    "/api/v1/channels/webhooks/{webhook_id}/{token}": "0.12: webhook authenticated by its own token",
    "/api/v1/chats/share/{share_id}": "0.12: optional sign-in; a denied key is treated as anonymous",
    "/api/config": "public client configuration",
    "/api/version": "public",
    "/api/changelog": "public",
    "/oauth/clients/{client_id}/callback": "OAuth redirect endpoint",
    "/oauth/{provider}/login": "OAuth redirect endpoint",
    "/oauth/{provider}/callback": "OAuth redirect endpoint",
    "/oauth/{provider}/login/callback": "OAuth redirect endpoint",
    "/oauth/backchannel-logout": "OAuth logout notification",
    "/manifest.json": "web app manifest, public",
    "/opensearch.xml": "public",
    "/health": "health probe",
    "/ready": "readiness probe",
    "/health/db": "health probe",
}


def app_routes(deployment) -> list:
    """The routes of this release's app, read in a separate interpreter with the server's settings."""
    server = deployment.server
    result = subprocess.run(
        [str(venv_dir(server.version) / "bin" / "python"), "-c", LIST_ROUTES],
        env={**server.env(), "FROM_INIT_PY": "true"},
        cwd=server.data_dir,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("ROUTES="))
    return json.loads(line.removeprefix("ROUTES="))


def probe(path: str, methods: list[str]) -> tuple[str, str]:
    method = "GET" if "GET" in methods else sorted(methods)[0]
    return method, re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_is_guarded_or_exempt(deployment):
    deployment.configure()
    headers = [("Authorization", f"Bearer {deployment.people.alice.api_key}")]
    unguarded = {}
    for path, methods in app_routes(deployment):
        if not methods:  # mounts (static files, socket.io) and websocket routes: no API-key auth
            continue
        method, target = probe(path, methods)
        answer = raw(deployment, method, target, headers, {} if method in ("POST", "PUT", "PATCH") else None)
        if answer.outcome != GUARD:
            unguarded[path] = f"{method} -> {answer.status}"
    assert {path: how for path, how in unguarded.items() if path not in EXEMPT} == {}
