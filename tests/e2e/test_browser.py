"""The admin's own path, walked in a real Chromium on the newest and the oldest pinned release: paste the
guard into Admin Panel -> Functions, switch it on and make it global, edit its valves, have an invalid
value refused; meanwhile a user's browser session keeps chatting while the policy refuses her API key.

The steps run in order on one server per release; once a step fails the later ones are skipped and every
open page is saved under test-results/browser/. `make screenshots` (API_KEY_GUARD_SCREENSHOTS=1) also
writes the README's images into docs/images/.
"""

import ast
import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from install import GUARD_FILE
from tests.guard_loader import load_guard

from . import browser
from .conftest import Deployment, start_deployment
from .provision import VERSIONS
from .routes import CHAT_BODY

ROOT = Path(__file__).resolve().parents[2]
RELEASES = (VERSIONS[0], VERSIONS[-1])  # the newest and the oldest pinned
GUARD_ID, GUARD_NAME = "api_key_guard", "API Key Guard"
GUARD_SOURCE = GUARD_FILE.read_text(encoding="utf-8")
VALVES_SCHEMA = load_guard().Valves.model_json_schema()
SCREENSHOTS = ROOT / "docs" / "images" if os.environ.get("API_KEY_GUARD_SCREENSHOTS") else None
DEBUG_SHOTS = ROOT / "test-results" / "browser"

POLICY_TIMEOUT = 5.0
POLL_SECONDS = 0.1

CHAT = ("POST", "/api/chat/completions", CHAT_BODY)
ELSEWHERE = ("GET", "/api/v1/chats/", None)  # not on the user role's endpoint list
SERVED, REFUSED = (200, True), (403, False)

REFUSAL_CLIP = {"x": 0, "y": 0, "width": 1280, "height": 640}  # the toast and the top of the valves form

FAILED: dict[str, str] = {}  # release -> the step that failed first


@pytest.fixture(scope="module", params=RELEASES, ids=[f"owui-{v}" for v in RELEASES])
def bare(request, tmp_path_factory) -> Deployment:
    """A real server with its people and their keys, and no guard yet: the admin is about to paste it."""
    version = request.param
    return start_deployment(version, tmp_path_factory.mktemp(f"browser-{version}"), request, install_guard=False)


@pytest.fixture(scope="session")
def chromium():
    with sync_playwright() as playwright:
        chromium = browser.launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def admin(chromium, bare):
    page = browser.sign_in(chromium, bare.server, bare.people.admin)
    yield page
    page.context.close()


@pytest.fixture(autouse=True)
def step(request, chromium, bare):
    """Skip what follows a failed step; keep a picture of every open page where one fails."""
    release = bare.server.version
    if release in FAILED:
        pytest.skip(f"step {FAILED[release]} failed on {release}")
    failures = request.session.testsfailed
    yield
    if request.session.testsfailed > failures:
        FAILED[release] = request.node.name
        DEBUG_SHOTS.mkdir(parents=True, exist_ok=True)
        pages = [page for context in chromium.contexts for page in context.pages]
        name = re.sub(r"\W+", "-", request.node.name)
        for number, page in enumerate(pages):
            page.screenshot(path=DEBUG_SHOTS / f"{name}-{number}.png")


def screenshot(target, deployment: Deployment, name: str, **options) -> None:
    """The README's images: docs/images/<name>-<release>.png of a page or an element, when asked for."""
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}-{deployment.server.version}.png"
        target.screenshot(path=path, animations="disabled", **options)


def alice_key(deployment: Deployment, route: tuple) -> tuple[int, bool]:
    """One request with alice's API key: (status, reached the model backend)."""
    method, path, body = route
    before = deployment.backend.calls
    response = deployment.server.call(method, path, deployment.people.alice.api_key, json=body)
    return response.status_code, deployment.backend.calls > before


def eventually(probe, want, timeout: float = POLICY_TIMEOUT):
    """Poll `probe` until it answers `want` (a valve change reaches the guard within its cache lifetime)."""
    deadline = time.monotonic() + timeout
    while (got := probe()) != want and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return got


def stored(deployment: Deployment, suffix: str = "") -> dict:
    return deployment.server.ok("GET", f"/api/v1/functions/id/{GUARD_ID}{suffix}", deployment.people.admin.jwt)


def switches(deployment: Deployment) -> tuple[bool, bool]:
    function = stored(deployment)
    return function["is_active"], function["is_global"]


def same_code(a: str, b: str) -> bool:
    """Equal up to formatting: 0.12 runs Black over the code it stores, which also re-indents docstrings."""
    return code_shape(a) == code_shape(b)


def code_shape(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = " ".join(node.value.split())
    return ast.dump(tree)


def valves_form(admin) -> browser.ValvesForm:
    return browser.ValvesForm(admin, VALVES_SCHEMA)


# -- the walk, one step per test, in order ---------------------------------------------------------------


def test_paste_the_guard_into_a_new_function(admin, bare):
    browser.create_function(admin, GUARD_ID, GUARD_NAME, "Decide who may use API keys, and where", GUARD_SOURCE)
    assert same_code(stored(bare)["content"], GUARD_SOURCE)


def test_switch_it_on_and_make_it_global(admin, bare):
    browser.switch_on_and_make_global(admin, GUARD_NAME)
    assert eventually(lambda: switches(bare), (True, True)) == (True, True)  # the UI flips before the server
    assert eventually(lambda: alice_key(bare, CHAT), REFUSED) == REFUSED  # the default: admins' keys only


def test_every_valve_is_shown_with_its_description(admin):
    assert browser.open_valves(admin, GUARD_NAME, VALVES_SCHEMA).missing() == []


@pytest.mark.parametrize("valve", ["mode", "audit_log"])
def test_choices_are_offered_as_a_select(admin, valve):
    assert valves_form(admin).choices(valve) == VALVES_SCHEMA["properties"][valve]["enum"]


def test_api_key_roles_is_changed_and_saved(admin, bare):
    form = valves_form(admin)
    form.set("api_key_roles", "admin,user")
    expect(form.save()).to_contain_text(browser.SAVED)
    screenshot(form.box, bare, "valves-form")
    assert stored(bare, "/valves")["api_key_roles"] == "admin,user"


def test_the_change_is_in_force(bare):
    assert eventually(lambda: alice_key(bare, CHAT), SERVED) == SERVED
    assert alice_key(bare, ELSEWHERE) == REFUSED


def test_an_invalid_value_is_refused_and_nothing_changes(admin, bare):
    before = stored(bare, "/valves")
    form = valves_form(admin)
    form.set("api_key_roles", "root")
    expect(form.save()).to_have_attribute("data-type", "error")
    screenshot(admin, bare, "valves-refused", clip=REFUSAL_CLIP)
    assert stored(bare, "/valves") == before
    assert (alice_key(bare, CHAT), alice_key(bare, ELSEWHERE)) == (SERVED, REFUSED)


def test_the_refusal_names_the_valve(admin, bare):
    """Open WebUI 0.10+ answers any refused save with a fixed text; the guard puts its reason back."""
    toast = admin.locator("[data-sonner-toast][data-type=error]").inner_text()
    assert "API Key Guard refused these valves: api_key_roles: expected roles from admin, user, pending" in toast


def test_a_users_browser_session_keeps_chatting_while_her_key_is_refused(admin, bare, chromium):
    form = valves_form(admin)
    form.reset("api_key_roles")
    form.save()
    assert eventually(lambda: stored(bare, "/valves").get("api_key_roles", "admin"), "admin") == "admin"
    assert eventually(lambda: alice_key(bare, CHAT), REFUSED) == REFUSED
    alice = browser.sign_in(chromium, bare.server, bare.people.alice)
    before = bare.backend.calls
    expect(browser.chat(alice, "Hello from a browser session")).to_contain_text("pong")
    screenshot(alice, bare, "chat-session")
    assert bare.backend.calls > before
