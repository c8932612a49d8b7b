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
                                [--ca-bundle PATH]
    uv run install.py status --url URL --api-key KEY [--json] [--no-arm-at-startup] [--id ID] [--file GUARD.py]
    uv run install.py uninstall --url URL --api-key KEY [--id ID] [--file GUARD.py] [--ca-bundle PATH]

(`pipx run install.py ...`, or `python3 install.py ...` with requests and pydantic installed, work the same.)
OPENWEBUI_URL and OPENWEBUI_API_KEY stand in for --url and --api-key. The credential is an
administrator's API key (sk-...) or session token (JWT); both are sent as `Authorization: Bearer`,
never printed, and never sent anywhere a redirect points to. The guard file is --file, else
api_key_guard.py next to this script, else filters/api_key_guard.py under it.

Exit codes:
    0  done; for status: installed, active, global, current, valves valid, route guard armed (or not
       checkable), the stored policy in force (or not checkable), armed at startup (or opted out), no other
       active copy of the guard on the server (or not checkable)
    1  status found a problem, or install finished but the guard is not armed, the policy it wrote is not
       in force within 10 s, or it could not arm the guard at startup
    2  usage or input error (arguments, URL, valves file, valve values, missing dependencies); nothing was written
    3  server, authentication, TLS or network error
"""

import argparse
import importlib.util
import json
import os
import re
import sys
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import Any, NamedTuple
from urllib.parse import urlsplit

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
TIMEOUT_SECONDS = 30
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
    exit_code = 1


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


class Client:
    """Sends every request (credential attached, redirects refused) and maps every failure to an InstallError."""

    def __init__(self, url: str, credential: str, ca_bundle: str | None, shown: str):
        self.url = url
        self.credential = credential
        self.shown = shown  # what output may show of the credential: the guard's own fingerprint of it
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {credential}"
        if ca_bundle:
            self.session.verify = ca_bundle

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
        headers = {"Connection": "close"} if fresh else None
        try:
            response = self.session.request(
                method, self.url + path, json=body, headers=headers, timeout=TIMEOUT_SECONDS, allow_redirects=False
            )
        except requests.exceptions.SSLError as exc:
            raise ServerError(
                f"TLS verification failed for {self.url}: {network_reason(exc)}; "
                "pass --ca-bundle PATH with the CA that signed the server's certificate"
            ) from exc
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach {self.url}: {network_reason(exc)}") from exc
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

    def failure(self, where: str, path: str, response: requests.Response, detail: str) -> ServerError:
        """The error for a 4xx/5xx answer: what it means and what to do, the server's own words last."""
        status = response.status_code
        said = f" Server said: {detail}" if detail else ""
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
    """--valves FILE overlaid by --set NAME=VALUE; every name checked against the local Valves."""
    requested = read_valves_file(valves_file) if valves_file else {}
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals:
            raise UsageError(f"--set expects NAME=VALUE, got {assignment!r}")
        requested[name.strip()] = value
    unknown = [name for name in requested if name not in guard.valve_names]
    if unknown:
        raise UsageError(f"unknown valve {', '.join(unknown)}; valid names: {', '.join(guard.valve_names)}")
    return requested


def install(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    function_id, version = args.id, guard.version
    requested = requested_valves(guard, args.valves, args.set)
    found = read_function(client, function_id)
    stored = read_stored_valves(client, function_id) if found else {}
    try:
        valves = guard.valves_model(**{**stored, **requested}).model_dump()
    except ValidationError as exc:
        raise UsageError(f"invalid valves: {'; '.join(valve_errors(exc))}") from exc
    changed = [name for name in {**valves, **stored} if stored.get(name, MISSING) != valves.get(name, MISSING)]
    arming = None if args.no_arm_at_startup else read_startup_arming(client)
    # Open WebUI creates a function inactive and not global; the read-back at the end checks the outcome.
    function = found.data if found else ServerFunction(is_active=False, is_global=False)
    body = {
        "id": function_id,
        "name": guard.manifest["title"],
        "content": guard.content,
        "meta": {"description": guard.manifest["description"], "manifest": guard.manifest},
    }
    writes = 0

    def write(done: str, would: str, path: str, payload: Any = None) -> None:
        nonlocal writes
        writes += 1
        if not args.dry_run:
            client.call("POST", path, payload)
        print(would if args.dry_run else done)

    if not found:
        created = f"function {function_id} (version {version})"
        write(f"created {created}", f"would create {created}", f"{FUNCTIONS_API}create", body)
    elif function.content != as_stored(guard.content):
        versions = f"({frontmatter(function.content or '').get('version', 'unknown')} -> {version})"
        write(
            f"updated function content {versions}",
            f"would update function content {versions}",
            function_path(function_id, "/update"),
            body,
        )
    # Before the valves: a policy that keeps admin keys off /api/v1/configs takes effect with them.
    startup_problem = arming.problem if arming else ""
    arm_at_startup = bool(arming and arming.form is not None and not arming.armed)
    if arm_at_startup:
        if args.dry_run:
            print(f"would arm at startup: switch on {ARM_AT_STARTUP}")
        elif not (startup_problem := switch_on_startup_arming(client, arming.form)):
            print(f"armed at startup: switched on {ARM_AT_STARTUP}")
    if changed:
        names = ", ".join(changed)
        write(
            f"valves updated: {names}",
            f"would update valves: {names}",
            function_path(function_id, "/valves/update"),
            valves,
        )
    if not function.is_active:
        write("activated", "would activate", function_path(function_id, "/toggle"))
    if not function.is_global:
        write("made global", "would make global", function_path(function_id, "/toggle/global"))
    if not writes and not arm_at_startup:
        print(f"{function_id} {version} is installed and current; nothing changed")
    if not args.dry_run:
        verify_in_force(client, guard, function_id, announce=bool(writes))  # only writes to the function matter
    if startup_problem:
        raise NotArmedError(unarmed_at_startup(startup_problem))
    return 0


def verify_in_force(client: Client, guard: LocalGuard, function_id: str, announce: bool) -> None:
    """Return once the guard is active, global, armed and acting on the stored valves; or say why not."""
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
    if live.reply is None or not live.reply.data.is_active:
        raise ServerError(
            f"function {function_id} is not active after install; Open WebUI switches a function off "
            "when its module fails to load: check the server log"
        )
    if not live.reply.data.is_global:
        raise ServerError(f"function {function_id} is still not global after /toggle/global; check the server log")
    if live.route.armed is False:
        raise NotArmedError(
            f"route guard is not armed {INSTALL_WAIT_SECONDS:g} s after GET /api/models; look in the server log for "
            "'api_key_guard could not arm the route guard' (with several workers, each arms on its own first model "
            "listing)"
        )
    if not live.settled:
        raise NotArmedError(
            f"the guard does not act on the stored valves {INSTALL_WAIT_SECONDS:g} s after install wrote them "
            f"(policy in force: {live.policy.line}); check the server log for api_key_guard errors"
        )
    if announce and live.policy.in_force is None:
        print(f"policy in force: {live.policy.line}")


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
        print(json.dumps(facts, indent=2))
        return 0 if ok else 1

    def yes_no(value: bool) -> str:
        return "yes" if value else "no"

    print(f"verdict: {verdict}")
    print(f"installed: {yes_no(facts['installed'])} (id {function_id})")
    if function:
        print(f"active: {yes_no(facts['active'])}")
        print(f"global: {yes_no(facts['global'])}")
        print(f"content: {'same as' if current else 'differs from'} the local file ({versions})")
        print(f"valves: {'invalid' if errors else 'valid'}")
        for error in errors:
            print(f"  {error}")
    for line in copies_lines:
        print(line)
    if route:
        print(f"route guard: {route.line}")
        print(f"policy in force: {policy.line}")
        print(f"rate-limit counters: {counters_line(client.credential, counters)}")
    print(f"armed at startup: {startup_line(arming, opted_out)}")
    for line in posture_lines:
        print(line)
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# uninstall
# ---------------------------------------------------------------------------
def uninstall(client: Client, guard: LocalGuard, args: argparse.Namespace) -> int:
    function_id = args.id
    if read_function(client, function_id) is None:
        print(f"{function_id} is not installed; nothing to do")
        return 0
    if client.call("DELETE", function_path(function_id, "/delete"), shape=bool).data is not True:
        raise ServerError(f"the server did not delete function {function_id}; check the server log")
    print(f"deleted function {function_id}")
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[Client, LocalGuard, argparse.Namespace], int]] = {
    "install": install,
    "status": status,
    "uninstall": uninstall,
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
    commands.add_parser("uninstall", parents=[common], help="delete the function")
    return parser


def checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"invalid --url {url!r}: expected http:// or https:// and a host, e.g. http://localhost:8080")
    return url.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "install")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has already printed usage and the problem (or the help)
        return int(exc.code or 0)
    try:
        if not args.url:
            raise UsageError("--url is required (or set OPENWEBUI_URL)")
        if not args.api_key:
            raise UsageError("--api-key is required (or set OPENWEBUI_API_KEY)")
        if args.ca_bundle and not Path(args.ca_bundle).is_file():
            raise UsageError(f"--ca-bundle {args.ca_bundle}: no such file")
        url = checked_url(args.url)
        guard = load_local_guard(args.file)
        return COMMANDS[args.command](
            Client(url, args.api_key, args.ca_bundle, guard.fingerprint(args.api_key)), guard, args
        )
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
