"""A real Open WebUI server on 127.0.0.1, started from a cached venv, and its bootstrap."""

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .processes import end, free_port, spawn, wait_until
from .provision import openwebui_bin, provision

STARTUP_TIMEOUT = 180.0
PASSWORD = "Correct-Horse-Battery-9"
# Harness only (API_KEY_GUARD_TEST_CACHE_SECONDS): the guard's group and valve caches live this long
# on test servers, so a test waiting for a change polls for a fraction of a second.
TEST_CACHE_SECONDS = 0.5
ANTHROPIC_ROUTES = ("/api/message", "/api/v1/messages")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass
class Account:
    name: str
    email: str
    role: str
    id: str = ""
    jwt: str = ""
    api_key: str = ""


@dataclass
class OpenWebUI:
    """One Open WebUI process. `start()` launches it; `stop()` always ends it."""

    version: str
    data_dir: Path
    backend_url: str
    port: int = field(default_factory=free_port)
    extra_env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def at_least(self, release: str) -> bool:
        return version_tuple(self.version) >= version_tuple(release)

    @property
    def admin_from_env(self) -> bool:
        """WEBUI_ADMIN_EMAIL/PASSWORD make the admin (seen on 0.8.12; on 0.6.22 the first sign-up does)."""
        return self.at_least("0.8.0")

    @property
    def key_permission(self) -> bool:
        """0.6.37+: an ordinary user needs the features.api_keys permission to hold a key."""
        return self.at_least("0.6.37")

    @property
    def members_table(self) -> str:
        """Where group membership lives: a group_member table (seen on 0.8.12), else a column of "group"."""
        return "group_member" if self.at_least("0.8.0") else '"group"'

    @property
    def workers(self) -> int:
        return int(self.env().get("UVICORN_WORKERS") or 1)

    def reads_custom_key_header(self, path: str) -> bool:
        """0.9+: core reads x-api-key on every route; 0.8: only on the Anthropic-style message routes."""
        return self.at_least("0.9.0") or (self.at_least("0.8.0") and path in ANTHROPIC_ROUTES)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "WEBUI_", "API_KEY_GUARD_"))}
        env.update(
            DATA_DIR=str(self.data_dir),
            WEBUI_SECRET_KEY=self.data_dir.name + "-secret-for-tests-only",
            OFFLINE_MODE="true",
            HF_HUB_OFFLINE="1",
            ENABLE_OLLAMA_API="false",
            OPENAI_API_BASE_URL=self.backend_url,
            OPENAI_API_KEY="backend-key-not-secret",
            RAG_EMBEDDING_ENGINE="openai",
            RAG_OPENAI_API_BASE_URL=self.backend_url,
            RAG_OPENAI_API_KEY="backend-key-not-secret",
            RAG_EMBEDDING_MODEL="test-model",
            ENABLE_API_KEY="true",
            ENABLE_API_KEYS="true",
            BYPASS_MODEL_ACCESS_CONTROL="true",
            ENABLE_PERSISTENT_CONFIG="false",
            ENABLE_VERSION_UPDATE_CHECK="false",
            WEBUI_ADMIN_EMAIL="admin@example.com",
            WEBUI_ADMIN_PASSWORD=PASSWORD,
            WEBUI_ADMIN_NAME="Admin",
            GLOBAL_LOG_LEVEL="INFO",
            API_KEY_GUARD_TEST_CACHE_SECONDS=str(TEST_CACHE_SECONDS),
        )
        env.update(self.extra_env)
        return env

    def start(self) -> "OpenWebUI":
        provision(self.version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(openwebui_bin(self.version)), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = spawn(argv, self.log_path, self.data_dir, env=self.env())
        try:
            wait_until(self.healthy, self.process, f"Open WebUI {self.version}", self.log_path, STARTUP_TIMEOUT)
        except RuntimeError:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        end(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- REST helpers -------------------------------------------------------
    def call(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = kwargs.pop("timeout", 60)
        return requests.request(
            method, self.url + path, headers=headers, allow_redirects=False, timeout=timeout, **kwargs
        )

    def ok(self, method: str, path: str, token: str | None = None, **kwargs):
        response = self.call(method, path, token, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:300]}")
        return response.json()


class Bootstrap:
    """Creates, through the real REST API, the people every scenario uses."""

    GROUP = "automation"

    def __init__(self, server: OpenWebUI):
        self.server = server
        self.admin = Account("Admin", "admin@example.com", "admin")
        self.alice = Account("Alice", "alice@example.com", "user")  # ordinary user with a key
        self.gina = Account("Gina", "gina@example.com", "user")  # member of the automation group
        self.group_id = ""

    @property
    def accounts(self) -> list[Account]:
        return [self.admin, self.alice, self.gina]

    def signin(self, account: Account) -> None:
        data = self.server.ok("POST", "/api/v1/auths/signin", json={"email": account.email, "password": PASSWORD})
        account.id, account.jwt = data["id"], data["token"]

    def run(self) -> "Bootstrap":
        s = self.server
        if s.admin_from_env:
            self.signin(self.admin)
        else:  # the first sign-up becomes the admin
            data = s.ok(
                "POST", "/api/v1/auths/signup", json={"name": "Admin", "email": self.admin.email, "password": PASSWORD}
            )
            self.admin.id, self.admin.jwt = data["id"], data["token"]
        self.grant_key_permission()
        for account in (self.alice, self.gina):
            s.ok(
                "POST",
                "/api/v1/auths/add",
                self.admin.jwt,
                json={"name": account.name, "email": account.email, "password": PASSWORD, "role": account.role},
            )
            self.signin(account)
        for account in self.accounts:
            account.api_key = s.ok("POST", "/api/v1/auths/api_key", account.jwt)["api_key"]
        group = s.ok(
            "POST", "/api/v1/groups/create", self.admin.jwt, json={"name": self.GROUP, "description": "keys for CI"}
        )
        self.group_id = group["id"]
        self.add_group_member(self.gina.id)
        return self

    def grant_key_permission(self) -> None:
        """0.6.37+: let ordinary users hold keys (a default permission, off by default)."""
        s = self.server
        if s.key_permission:
            perms = s.ok("GET", "/api/v1/users/default/permissions", self.admin.jwt)
            perms.setdefault("features", {})["api_keys"] = True
            s.ok("POST", "/api/v1/users/default/permissions", self.admin.jwt, json=perms)

    def add_group_member(self, user_id: str) -> None:
        self._change_group("add", user_id)

    def remove_group_member(self, user_id: str) -> None:
        self._change_group("remove", user_id)

    def _change_group(self, action: str, user_id: str) -> None:
        s, path = self.server, f"/api/v1/groups/id/{self.group_id}"
        if s.at_least("0.8.0"):
            s.ok("POST", f"{path}/users/{action}", self.admin.jwt, json={"user_ids": [user_id]})
            return
        group = s.ok("GET", path, self.admin.jwt)  # 0.6.22: the whole member list is replaced
        members = set(group.get("user_ids") or [])
        members = members | {user_id} if action == "add" else members - {user_id}
        body = {"name": group["name"], "description": group["description"], "user_ids": sorted(members)}
        s.ok("POST", f"{path}/update", self.admin.jwt, json=body)
