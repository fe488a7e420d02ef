"""Headless Chromium against the real ASGI server, its Celery workers and beat.

Tests here are marked `browser`, use `pytest.mark.django_db(transaction=True)` (the server
and workers are other processes: they see committed data only) and get:

- `live_url`: the base URL of the ASGI server `make run` runs, started on the module's
  `platform` (a module may override `platform`, e.g. to slow the simulated engine);
- `page`: a fresh browser context's page; at teardown a screenshot of the last open page and
  the context's console messages are saved under the session's log dir, in browser/;
- `browser_log`: what the context's pages logged (`script_errors()` for assertions).

`tests.browser.helpers.login` logs a test user in through the login form.

Chromium is started once per module, not per session: while Playwright's sync API runs, its
event loop counts as running in this thread, which breaks `async_to_sync` and
`asyncio.run` in every later test of the session. Django's check against ORM calls from
async code is relaxed (DJANGO_ALLOW_ASYNC_UNSAFE) for the same span only.
"""

import os
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Error, Page, expect, sync_playwright

from tests.browser.helpers import BrowserLog
from tests.harness.platform import LOG_DIR, Platform
from tests.harness.web import CHROMIUM_ARGS, chromium_executable

ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"
SCREENSHOT_DIR = LOG_DIR / "browser"
# Playwright's default for actions and expect(): long enough for a loaded 2-core machine.
DEFAULT_TIMEOUT_MS = 10_000
expect.set_options(timeout=DEFAULT_TIMEOUT_MS)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture starts processes: no Chromium means skip here, fail in CI."""
    if item.get_closest_marker("browser") is None or chromium_executable() is not None:
        return
    reason = "Chromium is not installed (/usr/bin/chromium); apt-get install chromium"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs every browser test")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    executable = chromium_executable()
    assert executable is not None  # pytest_runtest_setup skipped the test otherwise
    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=executable, headless=True, args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = previous


@pytest.fixture(scope="module")
def live_url(platform: Platform) -> str:
    """The web server, stopped with the module's platform."""
    return platform.start_web()


@pytest.fixture
def browser_log() -> BrowserLog:
    return BrowserLog()


@pytest.fixture
def context(
    chromium: Browser, browser_log: BrowserLog, request: pytest.FixtureRequest
) -> Iterator[BrowserContext]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    context.on("console", browser_log.on_console)
    context.on("weberror", browser_log.on_error)
    try:
        yield context
    finally:
        _save_evidence(context, browser_log, request.node.name)
        context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def _save_evidence(context: BrowserContext, log: BrowserLog, test_name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    lines = "".join(f"{line}\n" for line in log.lines())
    (SCREENSHOT_DIR / f"{name}.console.log").write_text(lines)
    open_pages = [page for page in context.pages if not page.is_closed()]
    if open_pages:
        try:
            open_pages[-1].screenshot(path=SCREENSHOT_DIR / f"{name}.png", full_page=True)
        except Error as exc:  # a broken page must not hide the test's own failure
            print(f"screenshot of {test_name} failed: {exc}")
