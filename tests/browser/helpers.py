"""Helpers for browser tests: logging in through the form, and what the pages logged."""

import re
from dataclasses import dataclass, field

from playwright.sync_api import ConsoleMessage, Page, WebError, expect

# Console errors that are not the page's own: its feed connection refused or retried
# (a reload, a restart), and the favicon the browser asks for by itself.
NOT_SCRIPT_ERRORS = re.compile(r"^(WebSocket connection to|EventSource)|ERR_CONNECTION")
BROWSER_OWN_REQUESTS = re.compile(r"/favicon\.ico$")


def login(page: Page, live_url: str, username: str) -> None:
    """Logs in through the login form; the test users' password is "pw-<username>"."""
    page.goto(f"{live_url}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("pw-" + username)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".user-name")).to_contain_text(username)


@dataclass
class BrowserLog:
    """What the pages of one context reported: console messages and uncaught errors."""

    console: list[ConsoleMessage] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        self.console.append(message)

    def on_error(self, error: WebError) -> None:
        self.page_errors.append(str(error.error))

    def script_errors(self) -> list[str]:
        """Uncaught exceptions, and console errors other than connection retries and the
        browser's own requests."""
        errors = [
            f"{message.text} ({message.location.get('url', '')})"
            for message in self.console
            if message.type == "error"
            and not NOT_SCRIPT_ERRORS.search(message.text)
            and not BROWSER_OWN_REQUESTS.search(message.location.get("url", ""))
        ]
        return errors + self.page_errors

    def lines(self) -> list[str]:
        lines = [f"{m.type}: {m.text} ({m.location.get('url', '')})" for m in self.console]
        return lines + [f"pageerror: {error}" for error in self.page_errors]
