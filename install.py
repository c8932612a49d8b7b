# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "pydantic>=2.7,<3",
#     "requests>=2.31",
# ]
# ///
"""Install, check or remove API Key Guard on an Open WebUI server through its admin REST API.

    uv run install.py [install] --url URL --api-key KEY [--valves FILE.json] [--set NAME=VALUE ...]
                                [--id api_key_guard] [--file GUARD.py] [--no-arm-at-startup] [--dry-run]
                                [--ca-bundle PATH] [--allow-insecure-http]
    uv run install.py status --url URL --api-key KEY [--json] [--no-arm-at-startup] [--id ID] [--file GUARD.py]
    uv run install.py uninstall --url URL --api-key KEY [--drop-usage] [--id ID] [--file GUARD.py] [--ca-bundle PATH]
    uv run install.py usage --url URL --api-key KEY [--since 7d|DATE] [--until DATE] [--by user|model|day]
                            [--json|--csv]
    uv run install.py explain --url URL --api-key KEY --user EMAIL_OR_ID [--path P] [--method M] [--model M]
                              [--json] [--id ID] [--file GUARD.py] [--ca-bundle PATH]

(`pipx run install.py ...`, or `python3 install.py ...` with requests and pydantic installed, work the same.)
OPENWEBUI_URL and OPENWEBUI_API_KEY stand in for --url and --api-key. The credential is an
administrator's API key (sk-...) or session token (JWT); both are sent as `Authorization: Bearer`,
never printed, and never sent anywhere a redirect points to, nor in clear text over http:// to another
machine unless --allow-insecure-http says so. A user name and password in --url are neither sent nor shown.
A server answering 429 is asked again after the wait it names (Retry-After), 30 s in all at most. The guard
file is --file, else api_key_guard.py next to this script, else filters/api_key_guard.py under it.

Exit codes:
    0  done; for status: installed, active, global, current, valves valid, route guard armed (or not
       checkable), the stored policy in force (or not checkable), armed at startup (or opted out), no other
       active copy of the guard on the server (or not checkable); for explain: the read-out printed, whatever
       the decision in it
    1  status found a problem, or install finished but the guard is not armed, the policy it wrote is not
       in force within 10 s, or it could not arm the guard at startup
    2  usage or input error (arguments, URL, plain http:// to another machine, valves file, valve values, missing
       dependencies, an explain --user the server has no user for); nothing was written
    3  server, authentication, TLS or network error, or still rate limited (429) after the retries
When several problems are found together, each gets its own `error:` line and the exit code is the gravest's.
"""

import argparse
import csv
import email.utils
import importlib.util
import io
import ipaddress
import json
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from time import sleep
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

# On a bare laptop: one line saying what to run, exit 2, instead of a traceback at the first import below.
DEPENDENCIES = ("requests", "pydantic")
MISSING_DEPENDENCIES = (
    "install.py needs {missing}: run it as 'uv run {script} ...' or 'pipx run {script} ...' "
    "(both read the dependencies from the script), or install them with: "
    '{python} -m pip install "requests>=2.31" "pydantic>=2.7,<3"'
)
if __name__ == "__main__":
    if sys.version_info < (3, 11):  # noqa: UP036 - a laptop's python3 may be older than this script needs
        print(
            f"install.py needs Python 3.11 or newer (this is {'.'.join(map(str, sys.version_info[:3]))}): "
            f"run it as 'uv run {sys.argv[0]} ...', which fetches a suitable Python",
            file=sys.stderr,
        )
        sys.exit(2)
    if missing := [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]:
        print(
            MISSING_DEPENDENCIES.format(missing=" and ".join(missing), script=sys.argv[0], python=sys.executable),
            file=sys.stderr,
        )
        sys.exit(2)

import requests  # noqa: E402
import requests.auth  # noqa: E402
from pydantic import BaseModel, TypeAdapter, ValidationError  # noqa: E402

HERE = Path(__file__).resolve().parent
# An admin who downloaded just the two files keeps them side by side; a clone of the repository has filters/.
GUARD_CANDIDATES = (HERE / "api_key_guard.py", HERE / "filters" / "api_key_guard.py")
GUARD_FILE = next((path for path in GUARD_CANDIDATES if path.is_file()), GUARD_CANDIDATES[-1])
DEFAULT_ID = "api_key_guard"
FUNCTIONS_API = "/api/v1/functions/"
# Every function with its content in one admin-only request, the same on 0.6.22 to 0.12.4 (GET /api/v1/functions/
# and /list carry no content: one more request per function). Without include_valves it holds no valves.
EXPORT_API = f"{FUNCTIONS_API}export"
# A line of the guard file (its route hooks' attribute on the app) that marks a function as a copy of the guard,
# whatever its id, name or version: every release of the file has it, and tests/test_install.py checks it still does.
GUARD_MARKER = 'HOOKS_ATTR = "_api_key_guard_hooks"'
CONNECTIONS_API = "/api/v1/configs/connections"
BASE_MODELS_CACHE = "ENABLE_BASE_MODELS_CACHE"
GUARD_HEADER = "X-API-Key-Guard"
POLICY_HEADER = "X-API-Key-Guard-Policy"
COUNTERS_HEADER = "X-API-Key-Guard-Counters"
GUARD_DETAIL = "API Key Guard: "  # how the guard's own error answers begin
TIMEOUT_SECONDS = 30
# A server (or the guard's own api_key_rate_limit_admin) answering 429: ask again after the wait it names in
# Retry-After, else after 1, 2, 4, 8 s; at most RATE_LIMIT_RETRIES times per request and RATE_LIMIT_WAIT_SECONDS
# of waiting in the whole run, so a limit that will not lift soon ends the run with an error, not a hang.
RATE_LIMIT_RETRIES = 4
RATE_LIMIT_WAIT_SECONDS = 30.0
RATE_LIMIT_FIRST_WAIT_SECONDS = 1.0
# Right after a write a worker may still act on the function state it cached before (the guard's TTL, 2 s;
# the worker that saved drops it at once): install probes until the guard shows the policy it wrote, bounded.
PROBE_INTERVAL_SECONDS = 0.2
WORKER_ARMING_LISTINGS = 16
ARMING_CONCURRENCY = 4
INSTALL_WAIT_SECONDS = 10.0
STATUS_WAIT_SECONDS = 2.5
# Open WebUI's replace_imports (utils/plugin.py) rewrites these substrings in the content it stores.
IMPORT_REWRITES = {
    "from utils": "from open_webui.utils",
    "from apps": "from open_webui.apps",
    "from main": "from open_webui.main",
    "from config": "from open_webui.config",
}
FRONTMATTER_LINE = re.compile(r"^\s*([a-z_]+):\s*(.*)\s*$", re.IGNORECASE)
MISSING = object()
NOT_FOUND_DETAILS = ("not found", "could not find")
NOT_ARMED_HELP = (
    "Open WebUI loads the guard on the first model listing or chat after a restart; "
    "run `install.py --url ...` again or call GET /api/models"
)
COUNTERS = {
    "redis": "shared (Redis)",
    "per-worker": "per worker",
    "degraded": "degraded (Redis is configured but failing; counting per worker meanwhile)",
}
# Why the guard's counters are degraded, from `degraded; cause=<code>` (the guard's REDIS_CAUSES; a unit
# test keeps the codes in step): what is wrong and the fix. A misconfiguration never clears by itself.
REDIS_CAUSES = {
    "cluster": "REDIS_URL points at a Redis Cluster node but REDIS_CLUSTER is not true: set REDIS_CLUSTER=true",
    "noperm": "the Redis ACL user may not run the guard's script or touch its keys: grant the permissions "
    "the README lists (Redis permissions)",
    "auth": "Redis refused the credentials: fix the user name and password in REDIS_URL",
    "readonly": "Redis answered READONLY (a replica or demoted master): clears after a failover; "
    "otherwise point REDIS_URL at the master",
    "clusterdown": "the Redis Cluster has slots without a master: bring the failed master or its replica back",
    "sentinel": "no Sentinel named a master: check REDIS_SENTINEL_HOSTS, REDIS_SENTINEL_PORT and the service name",
    "timeout": "Redis did not answer in time: look for a stalled or overloaded Redis node",
    "unreachable": "Redis refused or dropped the connection: check that it runs and that REDIS_URL reaches it",
    "error": "Redis answered an error: see the guard's ERROR line in the server log",
}
ARM_AT_STARTUP = (
    f"Open WebUI's base models cache ({BASE_MODELS_CACHE}), "
    "so every worker loads the guard before it serves its first request after a restart"
)
UNARMED_AFTER_RESTART = (
    "the guard is in force now, but after every restart each worker serves API keys unguarded "
    "until something lists models there"
)
NO_CACHE_SETTING = f"this Open WebUI has no base models cache ({BASE_MODELS_CACHE} came with 0.6.16)"


class InstallError(Exception):
    """An expected failure: its message is the whole story, its exit_code what the process returns."""

    exit_code = 3


class UsageError(InstallError):
    exit_code = 2


class ServerError(InstallError):
    exit_code = 3


class NotAnApiRoute(ServerError):
    """404, or a 2xx page that is not JSON: Open WebUI's web app answers paths its API lacks with its HTML page."""


class NotArmedError(InstallError):
    """Install finished, but the guard is not in force as planned (not armed, policy or valves not as written)."""

    exit_code = 1


class Problems(InstallError):
    """Several failures found together: each reported on its own line, the exit code the gravest one's."""

    def __init__(self, errors: Iterable[InstallError]):
        self.errors = list(errors)
        super().__init__("; ".join(map(str, self.errors)))

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return max(error.exit_code for error in self.errors)


def reported(errors: list[InstallError]) -> InstallError:
    """One error for all of `errors`: itself when alone."""
    flat = [one for error in errors for one in (error.errors if isinstance(error, Problems) else [error])]
    return flat[0] if len(flat) == 1 else Problems(flat)


# ---------------------------------------------------------------------------
# What is printed. A password in a URL (--url https://user:pass@host, a Location header, a server's own words)
# would otherwise land in a terminal, a CI log or a bug report: every line goes out through say(), which masks
# it, so one forgotten call site cannot leak it. (The credential itself is masked where it can come back: the
# server's error details, Client.detail.)
# ---------------------------------------------------------------------------
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s:/?#@]*):\S*@")


def masked(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***, user names and hosts kept."""
    return URL_PASSWORD.sub(r"\1\2:***@", text)


def say(text: str, *, err: bool = False) -> None:
    print(masked(text), file=sys.stderr if err else sys.stdout)


# ---------------------------------------------------------------------------
# The local guard file.
# ---------------------------------------------------------------------------
def frontmatter(content: str) -> dict[str, str]:
    """The `key: value` lines of the leading docstring, read as Open WebUI's extract_frontmatter reads them."""
    lines = content.splitlines()
    if not lines or lines[0].strip() != '"""':
        return {}
    found = {}
    for line in lines[1:]:
        if '"""' in line:
            break
        if match := FRONTMATTER_LINE.match(line):
            found[match[1]] = match[2].strip()
    return found


def as_stored(content: str) -> str:
    for old, new in IMPORT_REWRITES.items():
        content = content.replace(old, new)
    return content


@dataclass(frozen=True)
class LocalGuard:
    content: str
    manifest: dict[str, str]
    module: types.ModuleType

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def valves_model(self) -> type[BaseModel]:
        return self.module.Valves

    @property
    def valve_names(self) -> list[str]:
        return list(self.valves_model.model_fields)

    @property
    def refresh_seconds(self) -> float:
        """How long a worker other than the one that saved may act on the valves it cached before."""
        return self.module.FUNCTION_STATE_TTL_SECONDS

    def fingerprint(self, credential: str) -> str:
        """What output may show of a credential: the guard's own fingerprint, as in its log lines."""
        return self.module.fingerprint(credential)

    def policy(self, stored: dict | None) -> str | None:
        """The guard's own fingerprint of these stored valves; None for a guard file older than fingerprints."""
        fingerprint_of = getattr(self.module, "policy_fingerprint", None)
        return fingerprint_of(stored) if fingerprint_of else None


def guard_module(content: str, path: Path, name: str) -> types.ModuleType:
    """The guard file run as Open WebUI's loader runs it: imports rewritten, in a module registered under
    `name` while its code runs (pydantic resolves the Valves' annotations through sys.modules)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(as_stored(content), str(path), "exec"), module.__dict__)  # noqa: S102 - the admin's guard file
    finally:
        sys.modules.pop(name, None)
    return module


def load_local_guard(path: Path = GUARD_FILE) -> LocalGuard:
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"cannot read the guard file {path}: {exc.strerror}; put api_key_guard.py next to install.py "
            "or pass --file PATH"
        ) from exc
    manifest = frontmatter(content)
    missing = [key for key in ("title", "version", "description") if key not in manifest]
    if missing:
        raise UsageError(f"{path} lacks frontmatter {', '.join(missing)} in its leading docstring")
    try:
        # The guard's module code only arms its route hooks inside Open WebUI; here it just defines Valves.
        module = guard_module(content, path, "api_key_guard_local")
    except Exception as exc:
        raise UsageError(f"the guard file {path} does not load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(getattr(module, "Valves", None), type):
        raise UsageError(f"{path} is not API Key Guard: it defines no Valves")
    return LocalGuard(content, manifest, module)


def valve_errors(exc: ValidationError) -> list[str]:
    return [f"valve {'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()]


# ---------------------------------------------------------------------------
# The server.
# ---------------------------------------------------------------------------
class ServerFunction(BaseModel):
    """The fields of Open WebUI's function answer the installer reads."""

    content: str | None = None  # the create answer carries no content
    is_active: bool
    is_global: bool


class ListedFunction(BaseModel):
    """The fields of an entry of Open WebUI's function export the installer reads."""

    id: str
    type: str
    content: str = ""
    is_active: bool = False
    is_global: bool = False


class Reply(NamedTuple):
    data: Any
    # The guard's response headers, set when the armed guard judged this (API-key) request.
    guard: str | None = None  # mode: enforce, monitor or fail-closed
    policy: str | None = None  # fingerprint of the stored valves it acted on
    counters: str | None = None  # where its rate-limit counters live


def says_not_found(detail: str) -> bool:
    """Open WebUI answers a missing function id with 401 and "We could not find what you're looking for :/"."""
    return any(text in detail.lower() for text in NOT_FOUND_DETAILS)


def network_reason(exc: requests.RequestException) -> str:
    cause = exc.args[0] if exc.args else exc
    return str(getattr(cause, "reason", cause))


class BearerAuth(requests.auth.AuthBase):
    """`Authorization: Bearer <credential>` on every request, set as the session's auth.

    Not as a session header: for a request without auth, requests puts the credentials of a ~/.netrc (or
    $NETRC) entry for the host, or a user:password in the URL, in place of that header. The admin's key would
    silently give way to whoever's login the netrc holds, every answer then speaking for that account."""

    def __init__(self, credential: str):
        self.credential = credential

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.credential}"
        return request

    def __repr__(self) -> str:  # never the credential, should the object ever be printed
        return "BearerAuth(...)"


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A Retry-After header as seconds from `now`: delta-seconds or an HTTP-date (RFC 9110 10.2.3);
    None when absent or unreadable."""
    text = (value or "").strip()
    if re.fullmatch(r"[0-9]+", text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when.replace(tzinfo=when.tzinfo or UTC) - now).total_seconds())


class Backoff(NamedTuple):
    wait: float | None  # seconds to wait before asking again; None: give up
    why: str  # when giving up: "retries" (all used), "asked" (Retry-After beyond what is left), "budget" (spent)


def backoff(asked: float | None, retries: int, waited: float) -> Backoff:
    """What to do about a 429 after `retries` retries of this request and `waited` s of waiting in the run.

    Never sooner than Retry-After asks (it would be refused again); without one, 1, 2, 4, 8 s."""
    if retries >= RATE_LIMIT_RETRIES:
        return Backoff(None, "retries")
    wait = RATE_LIMIT_FIRST_WAIT_SECONDS * 2**retries if asked is None else asked
    if waited + wait <= RATE_LIMIT_WAIT_SECONDS:
        return Backoff(wait, "")
    return Backoff(None, "budget" if asked is None or waited >= RATE_LIMIT_WAIT_SECONDS else "asked")


class Client:
    """Sends every request (credential attached, redirects refused, 429 waited out within bounds) and maps
    every failure to an InstallError."""

    def __init__(self, url: str, credential: str, ca_bundle: str | None, shown: str):
        self.url = url  # never with a user name or password (checked_url takes them out)
        self.credential = credential
        self.shown = shown  # what output may show of the credential: the guard's own fingerprint of it
        self.session = requests.Session()
        # The session still trusts the environment for proxies and REQUESTS_CA_BUNDLE; as its auth, the key
        # wins over ~/.netrc (see BearerAuth).
        self.session.auth = BearerAuth(credential)
        if ca_bundle:
            self.session.verify = ca_bundle
        self.waited = 0.0  # seconds spent waiting out 429s, across the run and its threads
        self.waiting = threading.Lock()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        shape: Any = Any,
        absent_ok: bool = False,
        fresh: bool = False,
    ) -> Reply | None:
        """The answer's JSON validated as `shape`, in a Reply; None for a missing function when absent_ok.

        `fresh` sends the request on a new connection, so that with several workers probes reach more
        than the one worker a kept-alive connection is bound to."""
        where = f"{method} {path}"
        response = self.answer(method, path, body, {"Connection": "close"} if fresh else None)
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("Location", "(no Location header)")
            raise ServerError(
                f"the server redirected {where} to {location} ({status}); the API key was not sent there. "
                "Pass the final address as --url"
            )
        if status >= 400:
            detail = self.detail(response)
            if absent_ok and status == 401 and says_not_found(detail):
                return None
            raise self.failure(where, path, response, detail)
        try:
            data = response.json()
        except ValueError as exc:
            content_type = response.headers.get("Content-Type", "no content type")
            raise NotAnApiRoute(
                f"{where} answered {status} with a non-JSON body ({content_type}); is --url the Open WebUI address?"
            ) from exc
        try:
            data = TypeAdapter(shape).validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ServerError(
                f"{where} answered unexpected JSON ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                "is --url the Open WebUI address?"
            ) from exc
        headers = response.headers
        return Reply(data, headers.get(GUARD_HEADER), headers.get(POLICY_HEADER), headers.get(COUNTERS_HEADER))

    def send(self, method: str, path: str, body: Any, headers: dict | None) -> requests.Response:
        try:
            return self.session.request(
                method, self.url + path, json=body, headers=headers, timeout=TIMEOUT_SECONDS, allow_redirects=False
            )
        except requests.exceptions.SSLError as exc:
            raise ServerError(
                f"TLS verification failed for {self.url}: {network_reason(exc)}; "
                "pass --ca-bundle PATH with the CA that signed the server's certificate"
            ) from exc
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach {self.url}: {network_reason(exc)}") from exc

    def answer(self, method: str, path: str, body: Any, headers: dict | None) -> requests.Response:
        """The first answer that is not 429 Too Many Requests, waiting between tries as `backoff` says."""
        where, retries = f"{method} {path}", 0
        while (response := self.send(method, path, body, headers)).status_code == 429:  # bounded: backoff gives up
            asked = retry_after_seconds(response.headers.get("Retry-After"), datetime.now(UTC))
            with self.waiting:  # the arming listings run on threads; the budget is the run's
                decision = backoff(asked, retries, self.waited)
                self.waited += decision.wait or 0.0
            if decision.wait is None:
                raise self.rate_limited(where, response, asked, decision.why)
            honoured = ", as its Retry-After asks" if asked is not None else ""
            say(
                f"rate limited (429) on {where}: asking again in {decision.wait:g} s{honoured} "
                f"(retry {retries + 1} of {RATE_LIMIT_RETRIES})",
                err=True,
            )
            sleep(decision.wait)
            retries += 1
        return response

    def rate_limited(self, where: str, response: requests.Response, asked: float | None, why: str) -> ServerError:
        detail = self.detail(response)
        said = f" Server said: {detail}" if detail else ""
        cap = f"{RATE_LIMIT_WAIT_SECONDS:g} s"
        if why == "retries":
            story = f"still after {RATE_LIMIT_RETRIES} retries ({self.waited:g} s of waiting)"
        elif why == "asked":
            story = (
                f"and asks to wait {asked:g} s: more than install.py waits for rate limits ({cap} in a run, "
                f"{self.waited:g} s spent)"
            )
        else:
            story = f"and install.py has spent the {cap} it waits for rate limits in a run"
        guard = (
            " API Key Guard's valve api_key_rate_limit_admin limits this key: raise it, or use an admin session "
            "token (JWT)."
            if GUARD_HEADER in response.headers
            else ""
        )
        return ServerError(
            f"the server answered {where} with 429 Too Many Requests {story}; try again later.{guard}{said}"
        )

    def failure(self, where: str, path: str, response: requests.Response, detail: str) -> InstallError:
        """The error for a 4xx/5xx answer: what it means and what to do, the server's own words last."""
        status = response.status_code
        said = f" Server said: {detail}" if detail else ""
        if status == 404 and detail.startswith(GUARD_DETAIL):  # the guard's own read-out: what was asked is not there
            return UsageError(detail.removeprefix(GUARD_DETAIL))
        if status == 403 and GUARD_HEADER in response.headers:
            return ServerError(
                f"API Key Guard itself denied {where} (403); use an admin session token (JWT), or allow the path "
                f"in the valve api_key_allowed_endpoints_admin.{said}"
            )
        if status == 401 and "permission" in detail.lower():
            return ServerError(f"the key is not an administrator's (401); use an admin's API key or token.{said}")
        if status == 403:
            return ServerError(
                "the server refused the credential (403): API keys are disabled or restricted on this server; "
                f"use an admin session token (JWT) or check its API key settings.{said}"
            )
        if status == 401 and not says_not_found(detail):
            return ServerError(
                f"the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY (got {self.shown}).{said}"
            )
        if status == 404 and path.startswith(FUNCTIONS_API):
            return NotAnApiRoute(
                f"functions API not found: Open WebUI too old, or functions disabled ({where} gave 404)"
            )
        error = NotAnApiRoute if status == 404 else ServerError
        return error(f"the server answered {where} with {status} {response.reason}.{said}")

    def detail(self, response: requests.Response) -> str:
        """The `detail` of Open WebUI's error answer, credential masked should it be echoed; "" when none."""
        try:
            data = response.json()
        except ValueError:
            return ""
        text = str(data.get("detail") or data) if isinstance(data, dict) else str(data)
        return text.replace(self.credential, self.shown)


def function_path(function_id: str, action: str = "") -> str:
    return f"{FUNCTIONS_API}id/{function_id}{action}"


def read_function(client: Client, function_id: str, *, fresh: bool = False) -> Reply | None:
    return client.call("GET", function_path(function_id), shape=ServerFunction, absent_ok=True, fresh=fresh)


def read_stored_valves(client: Client, function_id: str) -> dict:
    return client.call("GET", function_path(function_id, "/valves"), shape=dict[str, Any] | None).data or {}


def is_api_key(credential: str) -> bool:
    return credential.startswith("sk-")


class RouteGuardState(NamedTuple):
    armed: bool | None
    verdict: str  # how the OK verdict names it
    line: str  # the status line after "route guard: "


def route_guard_state(credential: str, header: str | None, stored_valves: dict) -> RouteGuardState:
    """What the X-API-Key-Guard header on an API-key request says about route-level enforcement."""
    if stored_valves.get("route_guard") is False:
        return RouteGuardState(None, "route guard switched off", "switched off by the valve route_guard")
    if not is_api_key(credential):
        return RouteGuardState(
            None,
            "route guard not checked (session token)",
            "cannot tell with a session token; run status with an admin API key",
        )
    if header is None:
        return RouteGuardState(False, "route guard not armed", f"NOT armed - {NOT_ARMED_HELP}")
    return RouteGuardState(True, "route guard armed", f"armed (mode {header})")


class PolicyState(NamedTuple):
    in_force: bool | None
    verdict: str  # how the OK verdict names it
    line: str  # the status line after "policy in force: "


def policy_state(credential: str, live: str | None, stored: dict, expected: str | None, refresh: float) -> PolicyState:
    """Whether the policy the guard acts on (its X-API-Key-Guard-Policy header) is the stored valves'."""
    if stored.get("route_guard") is False:
        return PolicyState(
            None,
            "policy not checked (route guard off)",
            f"cannot tell: with route_guard off no request shows the guard's policy; the inlet filter applies the "
            f"stored valves within {refresh:g} s",
        )
    if not is_api_key(credential):
        return PolicyState(
            None,
            "policy not checked (session token)",
            f"cannot tell with a session token (the worker that saved the valves applies them at once, the others "
            f"within {refresh:g} s); run status with an admin API key",
        )
    if expected is None:
        return PolicyState(
            None,
            "policy not checked (old guard file)",
            "cannot tell: the local guard file has no policy_fingerprint; use the guard file of this release",
        )
    if live is None:
        return PolicyState(None, "policy not checked", f"cannot tell: the guard sent no {POLICY_HEADER} header")
    if live == expected:
        return PolicyState(True, "policy in force", f"yes (policy {expected})")
    if expected in live.split(","):  # several active copies: each one's policy, all of them judging
        return PolicyState(True, "policy in force", f"yes (policy {expected}, beside other copies' {live})")
    return PolicyState(False, "", f"no - the guard acts on policy {live}, the stored valves are policy {expected}")


def counters_state(header: str | None) -> tuple[str | None, str | None]:
    """(where the counters live, why they are degraded) from the header: `degraded; cause=noperm`."""
    if header is None:
        return None, None
    state, _, params = header.partition(";")
    cause = dict(p.strip().partition("=")[::2] for p in params.split(";") if "=" in p).get("cause")
    return state.strip(), cause


def counters_problem(header: str | None) -> str | None:
    state, cause = counters_state(header)
    if state != "degraded":
        return None
    why = REDIS_CAUSES.get(cause or "", f"cause {cause!r}" if cause else "Redis failing")
    return f"rate-limit counters degraded ({why})"


def counters_line(credential: str, header: str | None) -> str:
    """Where the guard keeps its rate-limit counters, from its X-API-Key-Guard-Counters header."""
    state, cause = counters_state(header)
    if state == "degraded" and cause:
        why = REDIS_CAUSES.get(cause, f"cause {cause!r}")
        return f"degraded ({why}; counting per worker meanwhile)"
    if header in COUNTERS:
        return COUNTERS[header]
    if not is_api_key(credential):
        return "unknown (a session token sees no guard headers; run status with an admin API key)"
    return f"unknown (the guard sent no {COUNTERS_HEADER} header)" if header is None else f"unknown ({header!r})"


class Live(NamedTuple):
    """What one read of the function with the credential shows of the guard at work."""

    reply: Reply | None
    route: RouteGuardState | None
    policy: PolicyState | None
    settled: bool  # probing again cannot change the outcome (or nothing is left to wait for)


def live_state(credential: str, guard: LocalGuard, reply: Reply | None, stored: dict) -> Live:
    if reply is None or not (reply.data.is_active and reply.data.is_global):
        return Live(reply, None, None, True)
    expected = guard.policy(stored)
    route = route_guard_state(credential, reply.guard, stored)
    policy = policy_state(credential, reply.policy, stored, expected, guard.refresh_seconds)
    settled = route.armed is None or (route.armed and (policy.in_force is True or expected is None))
    return Live(reply, route, policy, settled)


def watch(client: Client, guard: LocalGuard, function_id: str, stored: dict, reply: Reply | None, wait: float) -> Live:
    """Probe, each time on a new connection, until the guard is armed and acts on `stored`, for `wait` s at most."""
    live = live_state(client.credential, guard, reply, stored)
    for _ in range(round(wait / PROBE_INTERVAL_SECONDS)):
        if live.settled:
            break
        sleep(PROBE_INTERVAL_SECONDS)
        live = live_state(client.credential, guard, read_function(client, function_id, fresh=True), stored)
    return live


# ---------------------------------------------------------------------------
# Armed at startup: Open WebUI's base models cache makes every worker list models (and so load the guard)
# during startup, before it accepts a connection.
# ---------------------------------------------------------------------------
class StartupArming(NamedTuple):
    form: dict[str, bool] | None  # the connections form as read, when it carries the setting
    armed: bool | None
    problem: str  # why it cannot be read or switched on; "" when it can


def connections_form_problem(form: Any) -> str:
    """What is wrong with the shape of the connections form ("" when nothing): every field is a boolean."""
    if not isinstance(form, dict):
        return f"expected a JSON object of settings, got {type(form).__name__}"
    wrong = [f"{name}={value!r}" for name, value in form.items() if not isinstance(value, bool)]
    return f"expected true or false, got {', '.join(wrong)}" if wrong else ""


def judge_connections_form(form: Any) -> StartupArming:
    if problem := connections_form_problem(form):
        return StartupArming(None, None, f"GET {CONNECTIONS_API} answered an unexpected shape ({problem})")
    if BASE_MODELS_CACHE not in form:
        return StartupArming(None, False, NO_CACHE_SETTING)
    return StartupArming(form, form[BASE_MODELS_CACHE], "")


def read_startup_arming(client: Client) -> StartupArming:
    try:
        return judge_connections_form(client.call("GET", CONNECTIONS_API).data)
    except NotAnApiRoute:  # before 0.6.16 (the function API answered JSON, so this is no proxy's page)
        return StartupArming(None, False, NO_CACHE_SETTING)
    except ServerError as exc:
        return StartupArming(None, None, str(exc))


def switch_on_startup_arming(client: Client, form: dict[str, bool]) -> str:
    """Send the form back exactly as read but for the cache switched on; the problem, or "" when it took."""
    try:
        answer = client.call("POST", CONNECTIONS_API, {**form, BASE_MODELS_CACHE: True}).data
    except ServerError as exc:
        return str(exc)
    if not (isinstance(answer, dict) and answer.get(BASE_MODELS_CACHE) is True):
        return f"POST {CONNECTIONS_API} answered without {BASE_MODELS_CACHE}: true"
    return ""


def unarmed_at_startup(problem: str) -> str:
    fix = (
        "upgrade Open WebUI"
        if problem == NO_CACHE_SETTING
        else f"switch on Admin Panel > Settings > Connections > Cache Base Model List ({BASE_MODELS_CACHE})"
    )
    return (
        f"not armed at startup: {problem}. This means {UNARMED_AFTER_RESTART}; {fix}, "
        "or pass --no-arm-at-startup to accept that"
    )


def startup_line(arming: StartupArming, opted_out: bool) -> str:
    """The status line after "armed at startup: "."""
    if arming.armed:
        return f"yes ({BASE_MODELS_CACHE} is on: every worker loads the guard before its first request)"
    if arming.armed is None:
        return f"cannot tell - {arming.problem}"
    why = arming.problem or f"{BASE_MODELS_CACHE} is off"
    if opted_out:
        return f"no ({why}; --no-arm-at-startup)"
    fix = "upgrade Open WebUI" if arming.problem == NO_CACHE_SETTING else "run install.py to switch it on"
    return f"no - {why}: {UNARMED_AFTER_RESTART}; {fix}"


# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------
def read_valves_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read valves file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid valves file {path}: line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"invalid valves file {path}: expected a JSON object of valve names to values")
    return data


def requested_valves(guard: LocalGuard, valves_file: Path | None, assignments: list[str]) -> dict:
    """--valves FILE overlaid by --set NAME=VALUE, every name and value checked against the local Valves
    before anything is sent; all that is wrong with them in one UsageError."""
    problems = []
    requested = {}
    if valves_file:
        try:
            requested = read_valves_file(valves_file)
        except UsageError as exc:
            problems.append(str(exc))
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals:
            problems.append(f"--set expects NAME=VALUE, got {assignment!r}")
            continue
        requested[name.strip()] = value
    unknown = [name for name in requested if name not in guard.valve_names]
    try:  # each value on its own, the others at their defaults: the stored ones are checked in the plan
        guard.valves_model(**{name: value for name, value in requested.items() if name not in unknown})
    except ValidationError as exc:
        problems.append(f"invalid valves: {'; '.join(valve_errors(exc))}")
    if unknown:
        problems.append(f"unknown valve {', '.join(unknown)}; valid names: {', '.join(guard.valve_names)}")
    if problems:
        raise UsageError("; ".join(problems))
    return requested


def changed_valves(stored: dict, valves: dict) -> list[str]:
    """The names whose value differs between two sets of valves (one lacking a name counts as different)."""
    return [name for name in {**valves, **stored} if stored.get(name, MISSING) != valves.get(name, MISSING)]


class Step(NamedTuple):
    """One write of an install: what --dry-run says, what install says once it is done, the POST that does it."""

    action: str  # create, update, arm (at startup), valves, activate, global
    would: str
    done: str
    path: str
    payload: Any = None


class Plan(NamedTuple):
    steps: list[Step]
    valves: dict  # the function's valves once the steps are done: what verify expects to read back
    startup_problem: str  # why the guard cannot be armed at startup; "" when it can, is, or the admin opted out
    problems: list[str]  # why no step may be taken; empty when the plan can be applied

    @property
    def writes_function(self) -> bool:
        return any(step.action != "arm" for step in self.steps)


def plan_install(
    function_id: str,
    guard: LocalGuard,
    found: ServerFunction | None,
    stored: dict,
    requested: dict,
    arming: StartupArming | None,
) -> Plan:
    """The writes that take the server from what was read (`found`, `stored` valves, `arming`; None when opted
    out) to the local guard with the `requested` valves, in the order they must happen. Reads and writes nothing."""
    try:
        valves = guard.valves_model(**{**stored, **requested}).model_dump()
    except ValidationError as exc:  # the request's own values passed requested_valves: a stored one is wrong
        return Plan([], {}, "", [f"invalid valves: {'; '.join(valve_errors(exc))}"])
    version = guard.version
    body = {
        "id": function_id,
        "name": guard.manifest["title"],
        "content": guard.content,
        "meta": {"description": guard.manifest["description"], "manifest": guard.manifest},
    }
    steps = []
    if found is None:
        created = f"function {function_id} (version {version})"
        steps.append(Step("create", f"would create {created}", f"created {created}", f"{FUNCTIONS_API}create", body))
    elif found.content != as_stored(guard.content):
        versions = f"({frontmatter(found.content or '').get('version', 'unknown')} -> {version})"
        update = f"function content {versions}"
        steps.append(
            Step("update", f"would update {update}", f"updated {update}", function_path(function_id, "/update"), body)
        )
    # Before the valves: a policy that keeps admin keys off /api/v1/configs takes effect with them.
    if arming and arming.form is not None and not arming.armed:
        steps.append(
            Step(
                "arm",
                f"would arm at startup: switch on {ARM_AT_STARTUP}",
                f"armed at startup: switched on {ARM_AT_STARTUP}",
                CONNECTIONS_API,
                {**arming.form, BASE_MODELS_CACHE: True},  # the form exactly as read but for the cache
            )
        )
    if changed := changed_valves(stored, valves):
        names = ", ".join(changed)
        path = function_path(function_id, "/valves/update")
        steps.append(Step("valves", f"would update valves: {names}", f"valves updated: {names}", path, valves))
    # Open WebUI creates a function inactive and not global.
    if not (found and found.is_active):
        steps.append(Step("activate", "would activate", "activated", function_path(function_id, "/toggle")))
    if not (found and found.is_global):
        path = function_path(function_id, "/toggle/global")
        steps.append(Step("global", "would make global", "made global", path))
    return Plan(steps, valves, arming.problem if arming else "", [])


def install(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    function_id = args.id
    requested = requested_valves(guard, args.valves, args.set)  # before any request: input errors send nothing
    found = read_function(client, function_id)
    stored = read_stored_valves(client, function_id) if found else {}
    arming = None if args.no_arm_at_startup else read_startup_arming(client)
    plan = plan_install(function_id, guard, found.data if found else None, stored, requested, arming)
    if plan.problems:
        raise UsageError("; ".join(plan.problems))
    problems: list[InstallError] = []
    if plan.startup_problem:
        problems.append(NotArmedError(unarmed_at_startup(plan.startup_problem)))
    try:
        if args.dry_run:
            for step in plan.steps:
                say(step.would)
        else:
            problems += apply(client, plan)
        if not plan.steps:
            say(f"{function_id} {guard.version} is installed and current; nothing changed")
        if not args.dry_run:
            problems += verify(client, guard, function_id, plan)
    except InstallError as exc:  # a write or a read failed: nothing more can be done; what was found before stands
        raise reported([*problems, exc]) from exc
    if problems:
        raise reported(problems)
    return 0


def apply(client: Client, plan: Plan) -> list[InstallError]:
    """Take the plan's steps in order, saying each once done; the problems that need not stop the others.

    Only arming at startup may fail and let the rest go on: the guard is in force without it, until a restart."""
    problems: list[InstallError] = []
    for step in plan.steps:
        if step.action == "arm":
            if problem := switch_on_startup_arming(client, step.payload):
                problems.append(NotArmedError(unarmed_at_startup(problem)))
                continue
        else:
            try:
                client.call("POST", step.path, step.payload)
            except InstallError as exc:  # the later steps depend on this one; what went wrong before still counts
                raise reported([*problems, exc]) from exc
        say(step.done)
    return problems


def verify(client: Client, guard: LocalGuard, function_id: str, plan: Plan) -> list[InstallError]:
    """What is not as planned once the guard had time to take it: the function active, global, holding the
    local file and the planned valves, the route guard armed and acting on them. Empty when all is."""
    # A model listing makes the worker that serves it load global filters, which arms the route guard there.
    # Each worker of a running multi-worker server must list once, and the kernel picks the worker of each
    # new connection; one connection after another tends to land on the same idle worker, so the listings
    # go ARMING_CONCURRENCY at a time: while one worker is busy with one, another accepts the next.
    with ThreadPoolExecutor(ARMING_CONCURRENCY) as pool:
        list(pool.map(lambda _: client.call("GET", "/api/models", fresh=True), range(WORKER_ARMING_LISTINGS)))
    stored = read_stored_valves(client, function_id)  # exactly what the guard reads
    live = watch(
        client, guard, function_id, stored, read_function(client, function_id, fresh=True), INSTALL_WAIT_SECONDS
    )
    function = live.reply.data if live.reply else None
    if function is None or not function.is_active:
        return [
            ServerError(
                f"function {function_id} is not active after install; Open WebUI switches a function off "
                "when its module fails to load: check the server log"
            )
        ]
    # Another admin (or a second install.py) writing at the same time: what is in force is not what was planned.
    problems: list[InstallError] = []
    if function.content != as_stored(guard.content):
        server = frontmatter(function.content or "").get("version", "unknown")
        problems.append(
            NotArmedError(
                f"function {function_id} on the server differs from the local file after install (server {server}, "
                f"local {guard.version}); did something else write it meanwhile? Run install.py again"
            )
        )
    if changed := changed_valves(stored, plan.valves):
        problems.append(
            NotArmedError(
                f"the stored valves differ from what install wrote ({', '.join(changed)}); did something else "
                "write them meanwhile? Run install.py again"
            )
        )
    if not function.is_global:
        problems.append(
            ServerError(f"function {function_id} is still not global after /toggle/global; check the server log")
        )
    elif live.route.armed is False:
        problems.append(
            NotArmedError(
                f"route guard is not armed {INSTALL_WAIT_SECONDS:g} s after GET /api/models; look in the server log "
                "for 'api_key_guard could not arm the route guard' (with several workers, each arms on its own "
                "first model listing)"
            )
        )
    elif not live.settled:
        problems.append(
            NotArmedError(
                f"the guard does not act on the stored valves {INSTALL_WAIT_SECONDS:g} s after install wrote them "
                f"(policy in force: {live.policy.line}); check the server log for api_key_guard errors"
            )
        )
    elif plan.writes_function and live.policy.in_force is None:  # only writes to the function matter
        say(f"policy in force: {live.policy.line}")
    return problems


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------
def is_guard_copy(function: ListedFunction) -> bool:
    """A filter whose content has the guard's marker line: the guard under whatever id it was installed."""
    return function.type == "filter" and GUARD_MARKER in (line.strip() for line in function.content.splitlines())


def read_copies(client: Client, function_id: str) -> tuple[list[ListedFunction] | None, str]:
    """The copies of the guard on the server, this --id first, the others by id; None and why when unlistable."""
    try:
        listed = client.call("GET", EXPORT_API, shape=list[ListedFunction]).data
    except ServerError as exc:
        return None, str(exc)
    return sorted(filter(is_guard_copy, listed), key=lambda copy: (copy.id != function_id, copy.id)), ""


def copy_state(copy: ListedFunction) -> str:
    if not copy.is_active:
        return "inactive"
    return "active, global" if copy.is_global else "active, not global"


def copies_report(function_id: str, copies: list[ListedFunction] | None, unlisted: str) -> tuple[list[str], str]:
    """The status lines about the copies of the guard, and the verdict's problem ("" when none)."""
    if copies is None:
        return [f"copies: cannot tell - could not list the server's functions: {unlisted}"], ""
    if not copies:
        return ["copies: none (no filter on the server is API Key Guard)"], ""
    if len(copies) == 1:
        only = copies[0]
        notes = "the only one" if only.id == function_id else f"{copy_state(only)}; the only one"
        return [f"copies: {only.id} ({notes})"], ""
    listed = ", ".join(
        f"{copy.id} ({copy_state(copy)}{'; installed here' if copy.id == function_id else ''})" for copy in copies
    )
    lines = [f"copies: {listed}"]
    active = [copy.id for copy in copies if copy.is_active]
    if len(active) < 2:
        return lines, ""
    if function_id in active:
        fix = f"delete or deactivate {', '.join(name for name in active if name != function_id)} (keep {function_id})"
    else:
        fix = f"delete or deactivate all but one of {', '.join(active)}"
    lines.append(
        f"  {len(active)} copies are active: every active copy judges each API-key request and the strictest answer "
        f"wins, and the server logs an ERROR about it; {fix}"
    )
    return lines, f"{len(active)} copies of the guard are active ({', '.join(active)})"


def api_key_posture(client: Client) -> tuple[dict, list[str]]:
    """The server's own API-key settings (facts, status lines), from the 0.12.x or the 0.6.x names."""
    config = client.call("GET", "/api/v1/auths/admin/config", shape=dict[str, Any]).data
    permissions = client.call("GET", "/api/v1/users/default/permissions", shape=dict[str, Any]).data
    enabled = bool(config.get("ENABLE_API_KEYS", config.get("ENABLE_API_KEY")))
    restricted = config.get("ENABLE_API_KEYS_ENDPOINT_RESTRICTIONS", config.get("ENABLE_API_KEY_ENDPOINT_RESTRICTIONS"))
    allowed = config.get("API_KEYS_ALLOWED_ENDPOINTS", config.get("API_KEY_ALLOWED_ENDPOINTS"))
    features = permissions.get("features") or {}
    if not enabled:
        users, users_line = False, "no (API keys are disabled on the server)"
    elif "api_keys" in features:
        users = bool(features["api_keys"])
        users_line = (
            "yes (default permission features.api_keys is on)"
            if users
            else "not by default (features.api_keys is off; a group can still grant it)"
        )
    else:
        users, users_line = True, "yes (Open WebUI 0.6.x has no features.api_keys permission: any user may)"
    facts = {
        "api_keys_enabled": enabled,
        "users_may_hold_keys": users,
        "server_endpoint_restriction": {"enabled": bool(restricted), "allowed_endpoints": allowed},
    }
    lines = [
        f"api keys: {'enabled' if enabled else 'disabled'}",
        f"server endpoint restriction: {f'on ({allowed})' if restricted else 'off'}",
        f"users may hold keys: {users_line}",
    ]
    return facts, lines


def status(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    function_id = args.id
    found = read_function(client, function_id)
    function = found.data if found else None
    copies, unlisted = read_copies(client, function_id)
    copies_lines, copies_problem = copies_report(function_id, copies, unlisted)
    stored = read_stored_valves(client, function_id) if found else {}
    try:
        guard.valves_model(**stored)
        errors = []
    except ValidationError as exc:
        errors = valve_errors(exc)
    live = watch(client, guard, function_id, stored, found, STATUS_WAIT_SECONDS)
    route, policy, reply = live.route, live.policy, live.reply
    arming = read_startup_arming(client)
    opted_out = args.no_arm_at_startup
    server_version = frontmatter(function.content or "").get("version") if function else None
    current = bool(function and function.content == as_stored(guard.content))
    counters = reply.counters if reply else None
    posture, posture_lines = api_key_posture(client)
    facts = {
        "installed": function is not None,
        "active": bool(function and function.is_active),
        "global": bool(function and function.is_global),
        "current": current,
        "local_version": guard.version,
        "server_version": server_version,
        "valves_valid": not errors if function else None,
        "valves_errors": errors,
        "route_guard_armed": route.armed if route else None,
        "policy_in_force": policy.in_force if policy else None,
        "stored_policy": guard.policy(stored) if function else None,
        "live_policy": reply.policy if reply else None,
        "rate_limit_counters": counters_state(counters)[0],
        "rate_limit_cause": counters_state(counters)[1],
        "armed_at_startup": arming.armed,
        "copies": None
        if copies is None
        else [{"id": copy.id, "active": copy.is_active, "global": copy.is_global} for copy in copies],
        "copies_error": unlisted or None,
        **posture,
    }
    versions = f"server {server_version or 'unknown'}, local {guard.version}"
    if function is None:
        problems = [f"function {function_id} is not installed"]
    else:
        checks = (
            (function.is_active, "function is not active"),
            (function.is_global, "function is not global"),
            (current, f"server copy differs from the local file ({versions})"),
            (not errors, "stored valves do not validate"),
            (route is None or route.armed is not False, "route guard is not armed"),
            (policy is None or policy.in_force is not False, "the guard does not act on the stored valves"),
            (counters_problem(counters) is None, counters_problem(counters)),
        )
        problems = [problem for passed, problem in checks if not passed]
    if copies_problem:
        problems.append(copies_problem)
    if not opted_out and not arming.armed:
        problems.append("not armed at startup" if arming.armed is False else "cannot tell if armed at startup")
    ok = not problems
    if ok:
        startup = "armed at startup" if arming.armed else "not armed at startup (opted out)"
        verdict = (
            f"OK - {guard.manifest['title']} {guard.version} is installed, active, global and current; "
            f"{route.verdict}; {policy.verdict}; {startup}"
        )
    else:
        verdict = f"NOT OK - {'; '.join(problems)}"
    facts.update(ok=ok, verdict=verdict)
    if args.json:
        say(json.dumps(facts, indent=2))
        return 0 if ok else 1

    def yes_no(value: bool) -> str:
        return "yes" if value else "no"

    say(f"verdict: {verdict}")
    say(f"installed: {yes_no(facts['installed'])} (id {function_id})")
    if function:
        say(f"active: {yes_no(facts['active'])}")
        say(f"global: {yes_no(facts['global'])}")
        say(f"content: {'same as' if current else 'differs from'} the local file ({versions})")
        say(f"valves: {'invalid' if errors else 'valid'}")
        for error in errors:
            say(f"  {error}")
    for line in copies_lines:
        say(line)
    if route:
        say(f"route guard: {route.line}")
        say(f"policy in force: {policy.line}")
        say(f"rate-limit counters: {counters_line(client.credential, counters)}")
    say(f"armed at startup: {startup_line(arming, opted_out)}")
    for line in posture_lines:
        say(line)
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# uninstall
# ---------------------------------------------------------------------------
def uninstall(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    function_id = args.id
    if read_function(client, function_id) is None:
        say(f"{function_id} is not installed; nothing to do")
        return 0
    left = usage_left_behind(client, function_id, args.drop_usage)  # the function serves it: ask first
    if client.call("DELETE", function_path(function_id, "/delete"), shape=bool).data is not True:
        raise ServerError(f"the server did not delete function {function_id}; check the server log")
    say(f"deleted function {function_id}")
    say(left)
    return 0


def usage_left_behind(client: Client, function_id: str, drop: bool) -> str:
    """What uninstall leaves in the database, or that it dropped it (before the function, which serves it)."""
    table = "api_key_guard_usage"
    try:
        if drop:
            client.call("DELETE", function_path(function_id, "/usage"), shape=dict[str, Any])
            return f"dropped the usage table {table}"
        path = function_path(function_id, "/usage") + f"?since={ALL_DAYS}"
        rows = client.call("GET", path, shape=dict[str, Any]).data.get("rows", [])
    except InstallError as exc:
        return f"usage table {table}: not read ({exc}); it stays in Open WebUI's database if it exists"
    return (
        f"usage table {table} stays in Open WebUI's database ({len(rows)} rows); "
        "`install.py uninstall --drop-usage` removes it"
    )


# ---------------------------------------------------------------------------
# Usage: what API keys spent, read from the guard's table through core's admin check
# ---------------------------------------------------------------------------
ALL_DAYS = "2000-01-01"
COUNTED = ("requests", "input_tokens", "output_tokens", "total_tokens", "estimated_requests")
USAGE_FIELDS = ("day", "user_id", "user_email", "model", *COUNTED)
USAGE_GROUPS = {
    None: ("day", "user_id", "user_email", "model"),
    "user": ("user_id", "user_email"),
    "model": ("model",),
    "day": ("day",),
}


def day_argument(text: str, today: date | None = None) -> str:
    """`7d` (the last 7 days, today included) or YYYY-MM-DD."""
    today = today or datetime.now(UTC).date()
    if re.fullmatch(r"[0-9]+d", text):
        return (today - timedelta(days=int(text[:-1]) - 1)).isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError("expected Nd (e.g. 7d) or a day YYYY-MM-DD") from None


def read_usage(client: Client, function_id: str, since: str, until: str | None) -> list[dict]:
    query = f"?since={since}" + (f"&until={until}" if until else "")
    data = client.call("GET", function_path(function_id, "/usage") + query, shape=dict[str, Any]).data
    return [row for row in data.get("rows", []) if row.get("decision") == "allow"]


def grouped_usage(rows: list[dict], by: str | None) -> list[dict]:
    """Rows summed per group (user x model x day by default), sorted, the totals row last."""
    keys = USAGE_GROUPS[by]
    groups: dict = {}
    for row in rows:
        key = tuple(row.get(k) or "" for k in keys)
        into = groups.setdefault(key, dict.fromkeys(COUNTED, 0))
        for field in COUNTED:
            into[field] += int(row.get(field) or 0)
    out = [
        {**dict.fromkeys(USAGE_FIELDS), **dict(zip(keys, key, strict=True)), **v} for key, v in sorted(groups.items())
    ]
    total = {**dict.fromkeys(USAGE_FIELDS), "day": "total" if "day" in keys else None}
    total |= {f: sum(r[f] for r in out) for f in COUNTED}
    return [*out, total]


def usage_lines(rows: list[dict], by: str | None) -> list[str]:
    keys = USAGE_GROUPS[by]
    columns = [k for k in ("day", "user", "model") if k in keys or (k == "user" and "user_id" in keys)]
    head = [*columns, "requests", "input", "output", "total", "estimated"]

    def cells(row: dict) -> list[str]:
        who = f"{row['user_email'] or '-'} ({row['user_id']})" if row.get("user_id") else ""
        named = {"day": row.get("day") or "", "user": who, "model": row.get("model") or ""}
        if row is rows[-1]:
            named = dict.fromkeys(columns, "") | {columns[0]: "total"}
        return [named[c] for c in columns] + [str(row[f]) for f in COUNTED]

    table = [head, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]


def usage(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    rows = grouped_usage(read_usage(client, args.id, args.since, args.until), args.by)
    if args.json:
        say(json.dumps(rows, indent=2))
    elif args.csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=USAGE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        say(out.getvalue().removesuffix("\n"))
    else:
        say("\n".join(usage_lines(rows, args.by)))
    return 0


# ---------------------------------------------------------------------------
# explain: what one user's keys may do, as the guard on the server works it out from the stored valves and the
# server's own user and group data, and with --path or --model the answer it would give such a request
# ---------------------------------------------------------------------------
LIMIT_FIELDS = ("rate_limit", "token_quota")  # empty: no limit
KEY_TIMES_SINCE = (0, 6, 41)  # core's api_key table, which keeps when a key was created
TIER_VALUE_WIDTH = 32  # values up to this long line up their sources


def path_argument(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError("expected a path starting with /, e.g. /api/chat/completions")
    return text


def method_argument(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z]+", text):
        raise argparse.ArgumentTypeError("expected an HTTP method, e.g. GET or POST")
    return text.upper()


def read_explain(client: Client, args: argparse.Namespace) -> dict:
    asked = {"user": args.user, "path": args.path, "method": args.method, "model": args.model}
    query = urlencode({name: value for name, value in asked.items() if value})
    try:
        return client.call("GET", function_path(args.id, f"/explain?{query}"), shape=dict[str, Any]).data
    except UsageError as exc:  # the guard's 404: no such user
        raise UsageError(f"{exc} (--user takes a user's email or id)") from exc
    except NotAnApiRoute as exc:  # core's 404 (or its web page): no armed guard serves this id
        found = read_function(client, args.id)
        if found is None:
            raise ServerError(f"function {args.id} is not installed; install.py installs it") from exc
        version = frontmatter(found.data.content or "").get("version", "unknown")
        raise ServerError(
            f"the guard {args.id} on the server (version {version}) does not answer explain: it is older than "
            "explain, not active, or not loaded since a restart; `install.py status` says which, `install.py` "
            "fixes it"
        ) from exc


def server_version(client: Client) -> tuple[int, ...] | None:
    """Open WebUI's release from its public /api/version; None when it does not say."""
    try:
        text = str(client.call("GET", "/api/version", shape=dict[str, Any]).data.get("version", ""))
    except InstallError:
        return None
    numbers = re.match(r"[0-9]+(\.[0-9]+)*", text)
    return tuple(map(int, numbers[0].split("."))) if numbers else None


def admission_line(data: dict) -> str:
    if data.get("blocked"):
        return "may use API keys: no: blocked by api_key_blocked_users"
    if by := data.get("admitted_by"):
        return f"may use API keys: yes, by {by}"
    return "may use API keys: no: not admitted by api_key_roles, api_key_groups or api_key_users"


def shown_value(field: str, value: Any) -> str:
    text = str(value if value is not None else "").strip()
    if not text:
        return "(none: no limit)" if field in LIMIT_FIELDS else "(none)"
    return "0 (no limit)" if text == "0" else text


def tier_lines(tier: dict) -> list[str]:
    fields = tier.get("fields") or {}
    rows = [(field, shown_value(field, one.get("value")), one.get("from") or "?") for field, one in fields.items()]
    name_width = max((len(name) for name, _, _ in rows), default=0)
    # A long list (the user tier's four default endpoints) pushes its own source out, not every line's.
    value_width = max((len(value) for _, value, _ in rows if len(value) <= TIER_VALUE_WIDTH), default=0)
    lines = [f"tier {tier.get('name') or '?'}"]
    lines += [f"  {name.ljust(name_width)}  {value.ljust(value_width)}  from {source}" for name, value, source in rows]
    return lines


def key_line(key: dict, version: tuple[int, ...] | None) -> str:
    created, age = key.get("created_at"), key.get("age_days")
    if created is not None:
        day = datetime.fromtimestamp(created, UTC).date().isoformat()
        return f"key created {day} ({age:g} days ago)" if age is not None else f"key created {day}"
    if version is not None and version < KEY_TIMES_SINCE:
        release = ".".join(map(str, version))
        return f"key: this Open WebUI ({release}) keeps no key creation time (0.6.41 and later do)"
    if version is not None:
        return "no key"
    return "no key, or this Open WebUI keeps no key creation time (before 0.6.41)"


def tokens_line(used: dict) -> str:
    if not used:
        return "tokens used: not counted (no token quota)"
    return "tokens used: " + ", ".join(f"{unit} {count}" for unit, count in used.items())


def decision_line(request: dict, decision: dict, mode: str | None) -> str:
    asked = f"{request.get('method')} {request.get('path')}"
    if request.get("model"):
        asked += f" model {request['model']}"
    if decision.get("allowed"):
        return f"{asked}: allowed"
    refused = f"refused ({decision.get('reason')}): {decision.get('message')}"
    if mode == "monitor":
        return f"{asked}: would be {refused}; mode monitor logs it as would-deny and lets it through"
    return f"{asked}: {refused}"


def explain_lines(data: dict, credential: str, version: tuple[int, ...] | None) -> list[str]:
    person = data.get("user") or {}
    groups = ", ".join(data.get("groups") or []) or "none"
    lines = [
        f"user {person.get('email') or person.get('id')} (role {person.get('role') or 'none'}), groups: {groups}",
        admission_line(data),
        *tier_lines(data.get("tier") or {}),
        key_line(data.get("key") or {}, version),
        tokens_line(data.get("tokens_used") or {}),
        f"counters: {counters_line(credential, data.get('counters'))}",
    ]
    if data.get("request") and data.get("decision"):
        lines.append(decision_line(data["request"], data["decision"], data.get("mode")))
    return lines


def explain(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    data = read_explain(client, args)
    if args.json:
        say(json.dumps(data, sort_keys=True, indent=2))
        return 0
    # Without a creation time the read-out cannot tell "no key" from "this release keeps none": its version can.
    version = server_version(client) if (data.get("key") or {}).get("created_at") is None else None
    say("\n".join(explain_lines(data, client.credential, version)))
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[Client, LocalGuard, argparse.Namespace], int]] = {
    "install": install,
    "status": status,
    "uninstall": uninstall,
    "usage": usage,
    "explain": explain,
}


def function_id_argument(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", text):
        raise argparse.ArgumentTypeError("expected lowercase letters, digits and underscores (an Open WebUI id)")
    return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("OPENWEBUI_URL"), help="Open WebUI address (env OPENWEBUI_URL)")
    common.add_argument(
        "--api-key",
        default=os.environ.get("OPENWEBUI_API_KEY"),
        help="an admin's API key (sk-...) or session token (env OPENWEBUI_API_KEY keeps it out of shell history)",
    )
    common.add_argument("--id", type=function_id_argument, default=DEFAULT_ID, help="function id (default %(default)s)")
    common.add_argument("--ca-bundle", help="CA bundle (PEM) to verify the server's TLS certificate")
    common.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="send the admin key over plain http:// to a host other than this machine (it crosses the network "
        "in clear text)",
    )
    common.add_argument(
        "--file",
        type=Path,
        default=GUARD_FILE,
        metavar="GUARD.py",
        help="the guard file (default: api_key_guard.py next to install.py, else filters/api_key_guard.py)",
    )
    arming = argparse.ArgumentParser(add_help=False)
    arming.add_argument(
        "--no-arm-at-startup",
        action="store_true",
        help=f"leave Open WebUI's {BASE_MODELS_CACHE} alone (the guard then arms on the first model listing "
        "after each restart)",
    )
    parser = argparse.ArgumentParser(
        prog="install.py", description="Install, check or remove API Key Guard on an Open WebUI server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser(
        "install", parents=[common, arming], help="install or update the guard (default command)"
    )
    install_parser.add_argument("--valves", type=Path, metavar="FILE.json", help="JSON object of valve values")
    install_parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one valve (repeatable; wins over --valves)",
    )
    install_parser.add_argument("--dry-run", action="store_true", help="read everything, print what would change")
    status_parser = commands.add_parser("status", parents=[common, arming], help="report whether the guard is in force")
    status_parser.add_argument("--json", action="store_true", help="print one JSON object")
    uninstall_parser = commands.add_parser("uninstall", parents=[common], help="delete the function")
    uninstall_parser.add_argument(
        "--drop-usage", action="store_true", help="also delete the usage table (kept by default)"
    )
    usage_parser = commands.add_parser("usage", parents=[common], help="what API keys used: requests and tokens")
    usage_parser.add_argument("--since", type=day_argument, default=day_argument("7d"), help="Nd or YYYY-MM-DD (7d)")
    usage_parser.add_argument("--until", type=day_argument, help="last day, YYYY-MM-DD (default today)")
    usage_parser.add_argument("--by", choices=("user", "model", "day"), help="one row per user, model or day")
    output = usage_parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON rows")
    output.add_argument("--csv", action="store_true", help="print CSV rows")
    explain_parser = commands.add_parser(
        "explain", parents=[common], help="what one user's API keys may do, and the guard's answer for a request"
    )
    explain_parser.add_argument("--user", metavar="EMAIL_OR_ID", help="the user, by email or user id (required)")
    explain_parser.add_argument(
        "--path", type=path_argument, help="judge a request to this path (with --model alone: /api/chat/completions)"
    )
    explain_parser.add_argument(
        "--method", type=method_argument, help="the request's method (default POST with a path or model)"
    )
    explain_parser.add_argument("--model", help="the model the request names")
    explain_parser.add_argument("--json", action="store_true", help="print the guard's read-out as JSON")
    return parser


class Address(NamedTuple):
    url: str  # where requests go: without user name and password, without a trailing slash
    host: str
    plain_http: bool
    had_userinfo: bool  # --url carried user[:password]@, taken out


def hidden_userinfo(url: str) -> str:
    """A --url as an error may echo it, parsed or not: everything from :// (or the start) to its last @ hidden."""
    head, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme, sep, _ = head.partition("://")
    return f"{scheme}{sep}***@{rest}" if sep else f"***@{rest}"


def checked_url(url: str) -> Address:
    parts = urlsplit(url)
    try:
        port = parts.port  # raises for a port that is no number, as a password with a / in it makes one:
    except ValueError:  # in https://user:pa/ss@host the host ends at the /, and "pa" is where the port goes
        port = -1
    # An @ after the host (https://host/x@y, or a password with an unescaped / ? #) means the URL is not what
    # it looks like: refused rather than guessed at.
    stray_at = "@" in parts.path + parts.query + parts.fragment
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or stray_at:
        raise UsageError(
            f"invalid --url {hidden_userinfo(url)!r}: expected http:// or https:// and a host, "
            "e.g. http://localhost:8080"
        )
    _, at, host_port = parts.netloc.rpartition("@")
    return Address(
        url.replace(parts.netloc, host_port, 1).rstrip("/"), parts.hostname, parts.scheme == "http", bool(at)
    )


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine. Anything else may cross a network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_http(address: Address) -> bool:
    """Plain http:// to another machine: the admin's key would cross the network in clear text, readable by
    anyone on the path (a shared Wi-Fi, a cloud VPC, a corporate proxy) and good for everything an admin can do."""
    return address.plain_http and not is_loopback(address.host)


def insecure_refused(host: str) -> str:
    return (
        f"refusing to send the admin key in clear text to {host}: --url is plain http:// and {host} is not this "
        "machine (loopback); use https://, or pass --allow-insecure-http if every network in between is trusted"
    )


def insecure_warning(host: str) -> str:
    return (
        f"warning: sending the admin key in clear text to {host} (plain http://, --allow-insecure-http): anyone "
        "on the network in between can read it and act as this admin"
    )


USERINFO_WARNING = (
    "warning: --url carries a user name and password; install.py neither sends nor shows them "
    "(its only credential is the admin key, sent as Authorization: Bearer)"
)


def preflight(args: argparse.Namespace) -> tuple[Address, LocalGuard]:
    """What the arguments, the URL and the guard file allow before anything is sent; all their problems at once."""
    problems: list[InstallError] = []
    address = guard = None
    if not args.url:
        problems.append(UsageError("--url is required (or set OPENWEBUI_URL)"))
    if not args.api_key:
        problems.append(UsageError("--api-key is required (or set OPENWEBUI_API_KEY)"))
    if args.command == "explain" and not args.user:
        problems.append(UsageError("--user is required: the email or id of the user to explain"))
    if args.command == "explain" and args.method and not (args.path or args.model):
        problems.append(UsageError("--method needs --path or --model: the request to judge"))
    if args.ca_bundle and not Path(args.ca_bundle).is_file():
        problems.append(UsageError(f"--ca-bundle {args.ca_bundle}: no such file"))
    if args.url:
        try:
            address = checked_url(args.url)
        except UsageError as exc:
            problems.append(exc)
    if address and insecure_http(address) and not args.allow_insecure_http:
        problems.append(UsageError(insecure_refused(address.host)))
    try:
        guard = load_local_guard(args.file)
    except UsageError as exc:
        problems.append(exc)
    if problems:
        raise reported(problems)
    return address, guard


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "install")
    # argparse echoes what it cannot place (a URL typed without --url, say): its output is masked like ours.
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the problem (or the help)
        return int(exc.code or 0)
    finally:
        sys.stdout.write(masked(out.getvalue()))
        sys.stderr.write(masked(err.getvalue()))
    try:
        address, guard = preflight(args)
        if address.had_userinfo:
            say(USERINFO_WARNING, err=True)
        if insecure_http(address):
            say(insecure_warning(address.host), err=True)
        client = Client(address.url, args.api_key, args.ca_bundle, guard.fingerprint(args.api_key))
        return COMMANDS[args.command](client, guard, args)
    except InstallError as exc:
        for error in exc.errors if isinstance(exc, Problems) else [exc]:
            say(f"error: {error}", err=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
