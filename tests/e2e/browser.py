"""Open WebUI's own web UI, driven in the distribution's Chromium the way a person clicks through it.

Playwright for Python only talks to /usr/bin/chromium (Debian's package): nothing is downloaded at run
time. Locators name what a person sees (labels, titles, descriptions); where one release labels a button
and the other shows a bare icon, the helper says so.
"""

import re
from dataclasses import dataclass

from playwright.sync_api import Browser, Locator, Page, Playwright, expect

from .server import PASSWORD, Account, OpenWebUI

CHROMIUM = "/usr/bin/chromium"
# Root in a container: no sandbox. The rest keeps the browser from calling home or updating itself.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# The admin's window is tall enough for the whole valves form on one screenshot.
ADMIN_VIEWPORT = {"width": 1280, "height": 1500}
USER_VIEWPORT = {"width": 1280, "height": 720}
UI_TIMEOUT_MS = 20_000
SAVED = "Valves updated successfully"


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))


def sign_in(browser: Browser, server: OpenWebUI, account: Account) -> Page:
    """A fresh browser profile signed in as `account`, past the release notes an admin sees once."""
    viewport = ADMIN_VIEWPORT if account.role == "admin" else USER_VIEWPORT
    context = browser.new_context(viewport=viewport, base_url=server.url)
    context.set_default_timeout(UI_TIMEOUT_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto("/auth")
    page.locator("input[type=email]").fill(account.email)
    page.locator("input[type=password]").fill(PASSWORD)
    page.locator("input[type=password]").press("Enter")
    if account.role == "admin":
        page.get_by_role("button", name="Okay, Let's Go!").click()
    page.wait_for_url(lambda url: "/auth" not in url)
    return page


PASTE_ATTEMPTS = 3


def paste(page: Page, editor: Locator, text: str) -> None:
    """Copy `text` to the clipboard, then select all in `editor` and paste over it, as a person would; and
    look, as a person would, that it landed: a click before the editor is ready leaves its template in place
    (seen on a loaded machine), so the paste is done again. The cursor ends on the last line, which shows."""
    last_line = text.rstrip().splitlines()[-1].strip()
    page.evaluate("text => navigator.clipboard.writeText(text)", text)
    expect(editor).not_to_have_text(re.compile(r"^\s*$"))  # the editor shows its template: it is ready
    for attempt in range(PASTE_ATTEMPTS):
        editor.click()
        page.keyboard.press("ControlOrMeta+A")
        page.keyboard.press("ControlOrMeta+V")
        try:
            expect(editor).to_contain_text(last_line, timeout=5_000)
            return
        except AssertionError:
            if attempt == PASTE_ATTEMPTS - 1:
                raise


def labelled_or(scope: Page | Locator, name: str, icon: Locator) -> Locator:
    """The button labelled `name` (0.12), else the bare `icon` button older releases show in its place."""
    labelled = scope.get_by_role("button", name=name, exact=True)
    return labelled if labelled.count() else icon


def open_functions(page: Page) -> None:
    page.goto("/admin")
    page.get_by_role("link", name="Functions").click()
    expect(page.get_by_placeholder("Search Functions")).to_be_visible()


def create_function(page: Page, function_id: str, name: str, description: str, source: str) -> None:
    """Admin Panel -> Functions -> new function: paste the source, name it, save, confirm the warning."""
    open_functions(page)
    plus = page.get_by_placeholder("Search Functions").locator("xpath=following::button[1]")
    create = labelled_or(page, "Create", plus)
    create.click()
    if create is plus:  # 0.6: the plus opens a menu
        page.get_by_text("New Function", exact=True).click()
    page.wait_for_url("**/admin/functions/create")
    paste(page, page.locator(".cm-content"), source)
    page.get_by_placeholder("Function Name").fill(name)
    page.get_by_placeholder("Function ID").fill(function_id)
    page.get_by_placeholder("Function Description").fill(description)
    page.get_by_role("button", name=re.compile(r"^Save")).click()  # "Save & Create" on 0.12
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url("**/admin/functions")


def function_row(page: Page, name: str) -> Locator:
    """The functions list entry titled `name`, once shown: the smallest block holding its title and switch."""
    titled = page.locator("div").filter(has=page.get_by_text(name, exact=True))
    row = titled.filter(has=page.get_by_role("switch")).last
    expect(row).to_be_visible()
    return row


def switch_on_and_make_global(page: Page, name: str) -> None:
    """In this order: 0.6 reloads the list after a global toggle, and a reload that lands after a click on
    the enabled switch flips it back."""
    row = function_row(page, name)
    switch_on(row)
    labelled_or(row, "Function Menu", row.locator("button[data-menu-trigger]")).click()
    menu = page.get_by_role("menu")
    switch_on(menu.locator("div").filter(has_text="Global").filter(has=page.get_by_role("switch")).last)
    expect(page.get_by_text("Filter is now globally enabled")).to_be_visible()
    page.keyboard.press("Escape")


def switch_on(scope: Locator) -> None:
    switch = scope.get_by_role("switch")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")


@dataclass
class ValvesForm:
    """The valves dialog Open WebUI generates from the Valves' JSON Schema: one block per valve with its
    title, a Default/Custom button, the input (only while Custom) and the description."""

    page: Page
    schema: dict

    @property
    def dialog(self) -> Locator:
        return self.page.get_by_role("dialog")

    @property
    def box(self) -> Locator:
        """The dialog's visible box, without the dimmed page around it."""
        return self.dialog.locator("xpath=./div").first

    def valve(self, name: str) -> Locator:
        """The block of one valve, found the way a person finds it: by its title and its description."""
        spec = self.schema["properties"][name]
        blocks = self.dialog.locator("form div").filter(has=self.page.get_by_text(spec["title"], exact=True))
        return blocks.filter(has=self.page.get_by_text(spec["description"], exact=True)).last

    def missing(self) -> list[str]:
        """Valves whose title and description are not both on the form, once it shows one block per valve."""
        expect(self.dialog.get_by_role("button", name=re.compile("^(Default|Custom)$"))).to_have_count(
            len(self.schema["properties"])
        )
        valves = self.schema["properties"].items()
        return [name for name, spec in valves if not spec.get("description") or not self.valve(name).count()]

    def control(self, name: str) -> Locator:
        """The input of one valve, switching it from Default to Custom first if needed."""
        block = self.valve(name)
        default = block.get_by_role("button", name="Default", exact=True)
        if default.count():
            default.click()
        return block.locator("select, textarea, input")

    def choices(self, name: str) -> list[str]:
        select = self.control(name)
        expect(select).to_have_count(1)
        return select.locator("option").evaluate_all("options => options.map(o => o.value)")

    def set(self, name: str, value: str) -> None:
        self.control(name).fill(value)

    def reset(self, name: str) -> None:
        """Back to Default: the stored value goes, the guard's default applies."""
        self.valve(name).get_by_role("button", name="Custom", exact=True).click()

    def save(self) -> Locator:
        """Save once earlier notices are gone, and return the one Open WebUI answers with."""
        toasts = self.page.locator("[data-sonner-toast]")
        expect(toasts).to_have_count(0)
        self.dialog.get_by_role("button", name="Save", exact=True).click()
        expect(toasts).to_have_count(1)
        return toasts


def open_valves(page: Page, name: str, schema: dict) -> ValvesForm:
    open_functions(page)
    row = function_row(page, name)
    labelled_or(row, "Valves", row.locator("button").first).click()
    return ValvesForm(page, schema)


def chat(page: Page, message: str) -> Locator:
    """Send `message` from the chat box of the home page; return the answer block."""
    page.goto("/")
    page.locator("#chat-input").click()
    page.keyboard.type(message)
    page.keyboard.press("Enter")
    return page.locator("#response-content-container").last
