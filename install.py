"""Install, check or remove API Key Guard on an Open WebUI server through its admin REST API.

    python install.py [install] --url URL --api-key KEY [--valves FILE.json] [--set NAME=VALUE ...]
                                [--id api_key_guard] [--dry-run] [--ca-bundle PATH]
    python install.py status --url URL --api-key KEY [--json] [--id ID] [--ca-bundle PATH]
    python install.py uninstall --url URL --api-key KEY [--id ID] [--ca-bundle PATH]

OPENWEBUI_URL and OPENWEBUI_API_KEY stand in for --url and --api-key. The credential is an
administrator's API key (sk-...) or session token (JWT); both are sent as `Authorization: Bearer`,
never printed, and never sent anywhere a redirect points to.

Exit codes:
    0  done; for status: installed, active, global, current, valves valid, route guard armed or not checkable
    1  status found a problem, or install finished but the route guard is not armed
    2  usage or input error (arguments, URL, valves file, valve values); nothing was written
    3  server, authentication, TLS or network error
"""

import argparse
import json
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from pydantic import BaseModel, TypeAdapter, ValidationError

GUARD_FILE = Path(__file__).resolve().parent / "filters" / "api_key_guard.py"
DEFAULT_ID = "api_key_guard"
FUNCTIONS_API = "/api/v1/functions/"
GUARD_HEADER = "X-API-Key-Guard"
TIMEOUT_SECONDS = 30
# The guard re-reads its own active flag and valves every 2 s (FUNCTION_STATE_TTL_SECONDS), so right after an
# install it may still act on the state it cached before activation: probe a few times before calling it unarmed.
PROBE_ATTEMPTS = 7
PROBE_INTERVAL_SECONDS = 0.5
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
    "run `python install.py --url ...` again or call GET /api/models, or set ENABLE_BASE_MODELS_CACHE=true"
)


class InstallError(Exception):
    """An expected failure: its message is the whole story, its exit_code what the process returns."""

    exit_code = 3


class UsageError(InstallError):
    exit_code = 2


class ServerError(InstallError):
    exit_code = 3


class NotArmedError(InstallError):
    exit_code = 1


def fingerprint(credential: str) -> str:
    """What output may show of the credential: its kind and, for long ones, the last 4 characters."""
    kind = "sk-…" if credential.startswith("sk-") else "JWT …"
    return kind + credential[-4:] if len(credential) >= 12 else kind


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
    valves_model: type[BaseModel]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def valve_names(self) -> list[str]:
        return list(self.valves_model.model_fields)


def load_local_guard() -> LocalGuard:
    content = GUARD_FILE.read_text(encoding="utf-8")
    manifest = frontmatter(content)
    missing = [key for key in ("title", "version", "description") if key not in manifest]
    if missing:
        raise UsageError(f"{GUARD_FILE} lacks frontmatter {', '.join(missing)} in its leading docstring")
    module = types.ModuleType("api_key_guard_local")
    # The guard's module code only arms its route hooks inside Open WebUI; here it just defines Valves.
    exec(compile(content, str(GUARD_FILE), "exec"), module.__dict__)  # noqa: S102 - our own file, as Open WebUI runs it
    return LocalGuard(content, manifest, module.Valves)


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


class Reply(NamedTuple):
    data: Any
    guard: str | None  # the X-API-Key-Guard response header: set when the armed guard judged this request


def says_not_found(detail: str) -> bool:
    """Open WebUI answers a missing function id with 401 and "We could not find what you're looking for :/"."""
    return any(text in detail.lower() for text in NOT_FOUND_DETAILS)


def network_reason(exc: requests.RequestException) -> str:
    cause = exc.args[0] if exc.args else exc
    return str(getattr(cause, "reason", cause))


class Client:
    """Sends every request (credential attached, redirects refused) and maps every failure to an InstallError."""

    def __init__(self, url: str, credential: str, ca_bundle: str | None):
        self.url = url
        self.credential = credential
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {credential}"
        if ca_bundle:
            self.session.verify = ca_bundle

    def call(
        self, method: str, path: str, body: Any = None, *, shape: Any = Any, absent_ok: bool = False
    ) -> Reply | None:
        """The answer's JSON validated as `shape`, in a Reply; None for a missing function when absent_ok."""
        where = f"{method} {path}"
        try:
            response = self.session.request(
                method, self.url + path, json=body, timeout=TIMEOUT_SECONDS, allow_redirects=False
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
            raise ServerError(
                f"{where} answered {status} with a non-JSON body ({content_type}); is --url the Open WebUI address?"
            ) from exc
        try:
            return Reply(TypeAdapter(shape).validate_python(data), response.headers.get(GUARD_HEADER))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ServerError(
                f"{where} answered unexpected JSON ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                "is --url the Open WebUI address?"
            ) from exc

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
                f"the server rejected the API key (401); check --api-key or OPENWEBUI_API_KEY "
                f"(got {fingerprint(self.credential)}).{said}"
            )
        if status == 404 and path.startswith(FUNCTIONS_API):
            return ServerError(f"functions API not found: Open WebUI too old, or functions disabled ({where} gave 404)")
        return ServerError(f"the server answered {where} with {status} {response.reason}.{said}")

    def detail(self, response: requests.Response) -> str:
        """The `detail` of Open WebUI's error answer, credential masked should it be echoed; "" when none."""
        try:
            data = response.json()
        except ValueError:
            return ""
        text = str(data.get("detail") or data) if isinstance(data, dict) else str(data)
        return text.replace(self.credential, fingerprint(self.credential))


def function_path(function_id: str, action: str = "") -> str:
    return f"{FUNCTIONS_API}id/{function_id}{action}"


def read_function(client: Client, function_id: str) -> Reply | None:
    return client.call("GET", function_path(function_id), shape=ServerFunction, absent_ok=True)


def read_stored_valves(client: Client, function_id: str) -> dict:
    return client.call("GET", function_path(function_id, "/valves"), shape=dict[str, Any] | None).data or {}


class RouteGuardState(NamedTuple):
    armed: bool | None
    verdict: str  # how the OK verdict ends
    line: str  # the status line after "route guard: "


def route_guard_state(credential: str, header: str | None, stored_valves: dict) -> RouteGuardState:
    """What the X-API-Key-Guard header on an API-key request says about route-level enforcement."""
    if stored_valves.get("route_guard") is False:
        return RouteGuardState(None, "route guard switched off", "switched off by the valve route_guard")
    if not credential.startswith("sk-"):
        return RouteGuardState(
            None,
            "route guard not checked (session token)",
            "cannot tell with a session token; run status with an admin API key",
        )
    if header is None:
        return RouteGuardState(False, "route guard not armed", f"NOT armed - {NOT_ARMED_HELP}")
    return RouteGuardState(True, "route guard armed", f"armed (mode {header})")


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


def install(client: Client, args: argparse.Namespace) -> int:
    guard = load_local_guard()
    function_id, version = args.id, guard.version
    requested = requested_valves(guard, args.valves, args.set)
    found = read_function(client, function_id)
    stored = read_stored_valves(client, function_id) if found else {}
    try:
        valves = guard.valves_model(**{**stored, **requested}).model_dump()
    except ValidationError as exc:
        raise UsageError(f"invalid valves: {'; '.join(valve_errors(exc))}") from exc
    changed = [name for name in {**valves, **stored} if stored.get(name, MISSING) != valves.get(name, MISSING)]
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
    if not writes:
        print(f"{function_id} {version} is installed and current; nothing changed")
    if args.dry_run:
        return 0

    client.call("GET", "/api/models")  # makes Open WebUI load global filters, which arms the route guard
    for attempt in range(PROBE_ATTEMPTS):
        if attempt:
            sleep(PROBE_INTERVAL_SECONDS)
        after = read_function(client, function_id)
        if after is None or not after.data.is_active:
            raise ServerError(
                f"function {function_id} is not active after install; Open WebUI switches a function off "
                "when its module fails to load: check the server log"
            )
        if not after.data.is_global:
            raise ServerError(f"function {function_id} is still not global after /toggle/global; check the server log")
        if route_guard_state(client.credential, after.guard, valves).armed is not False:
            return 0
    raise NotArmedError(
        f"route guard is not armed {PROBE_INTERVAL_SECONDS * (PROBE_ATTEMPTS - 1):g} s after GET /api/models; "
        "look in the server log for 'api_key_guard could not arm the route guard' (with several workers, "
        "each arms on its own first model listing)"
    )


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------
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


def status(client: Client, args: argparse.Namespace) -> int:
    guard = load_local_guard()
    function_id = args.id
    found = read_function(client, function_id)
    function = found.data if found else None
    stored = read_stored_valves(client, function_id) if found else {}
    try:
        guard.valves_model(**stored)
        errors = []
    except ValidationError as exc:
        errors = valve_errors(exc)
    route = route_guard_state(client.credential, found.guard, stored) if found else None
    server_version = frontmatter(function.content or "").get("version") if function else None
    current = bool(function and function.content == as_stored(guard.content))
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
            (route.armed is not False, "route guard is not armed"),
        )
        problems = [problem for passed, problem in checks if not passed]
    ok = not problems
    if ok:
        verdict = (
            f"OK - {guard.manifest['title']} {guard.version} is installed, active, global and current; {route.verdict}"
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
        print(f"route guard: {route.line}")
    for line in posture_lines:
        print(line)
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# uninstall
# ---------------------------------------------------------------------------
def uninstall(client: Client, args: argparse.Namespace) -> int:
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
COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
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
    parser = argparse.ArgumentParser(
        prog="install.py", description="Install, check or remove API Key Guard on an Open WebUI server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser(
        "install", parents=[common], help="install or update the guard (default command)"
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
    status_parser = commands.add_parser("status", parents=[common], help="report whether the guard is in force")
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
        client = Client(checked_url(args.url), args.api_key, args.ca_bundle)
        return COMMANDS[args.command](client, args)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
