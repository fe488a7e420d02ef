"""API keys in Chromium: an owner creates a key with runs:read, copies its secret from the
page (once), reads a run's events with it over real HTTP, revokes it in the page, and the
same request is refused. The web server only: the run is stopped before it is read."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Dialog, Page, expect

from apps.live.publisher import FEED
from apps.runs.models import Run
from apps.runs.services import cancel_run, start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import ApiKey
from tests.browser.conftest import SCREENSHOT_DIR
from tests.browser.helpers import BrowserLog, login
from tests.conftest import World
from tests.harness.platform import Platform

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "t", "type": "transform.template", "config": {"template": "{{ x }}"}},
    ],
    "edges": [["in", "t"]],
}


@pytest.fixture(scope="module")
def platform(django_db_setup: None) -> Iterator[Platform]:
    """The web server only (started by `live_url`)."""
    running = Platform("keys")
    try:
        yield running
    finally:
        running.stop()


def finished_run(world: World) -> Run:
    """A run of acme that is over (cancelled while queued), its final frame stored."""
    graph = world.graph("keyed", SPEC)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"x": 1}, actor=world.owner)
        cancel_run(run, actor=world.owner)
    FEED.flush()
    return run


def read_events(url: str, secret: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.read().decode()


def test_api_key_create_use_revoke(
    world: World, live_url: str, context: BrowserContext, page: Page, browser_log: BrowserLog
) -> None:
    run = finished_run(world)
    events_url = f"{live_url}/api/runs/{run.id}/events?after=0"
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)

    login(page, live_url, "owner")
    page.goto(f"{live_url}/tenant/keys/")
    expect(page.get_by_role("heading", name="No API keys yet")).to_be_visible()
    page.get_by_label("Name").fill("browser reader")
    page.get_by_label("runs:read").check()
    page.get_by_role("button", name="Create key").click()

    expect(page.locator("#new-key")).to_contain_text("it will not be shown again")
    secret = page.locator("#new-key-secret").input_value()
    key = ApiKey.unscoped_all_tenants.get()
    assert secret.startswith(f"sk_{key.prefix}_")
    page.get_by_role("button", name="Copy secret").click()
    expect(page.locator("#new-key .copy-status")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.screenshot(path=SCREENSHOT_DIR / "key_created.png", full_page=True)

    status, body = read_events(events_url, secret)
    assert status == 200, body
    frames = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert frames[-1]["type"] == "run" and frames[-1]["status"] == "cancelled", frames

    page.goto(f"{live_url}/tenant/keys/")
    row = page.locator(f'tr[data-key="{key.prefix}"]')
    expect(row).to_contain_text(f"sk_{key.prefix}_…")
    expect(row).to_contain_text("runs:read")
    expect(row.locator("td").nth(4)).not_to_have_text("never")  # last used: just now
    assert secret not in page.content()

    def confirm(dialog: Dialog) -> None:
        assert "Revoke the key “browser reader”?" in dialog.message
        dialog.accept()

    page.once("dialog", confirm)
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator(".message-success")).to_contain_text("it no longer works")
    expect(page.locator(f'tr[data-key="{key.prefix}"] .key-status')).to_contain_text("revoked")
    page.screenshot(path=SCREENSHOT_DIR / "key_revoked.png", full_page=True)

    status, body = read_events(events_url, secret)
    assert status == 401, body
    assert json.loads(body)["title"] == "Unauthorized"
    assert browser_log.script_errors() == []
