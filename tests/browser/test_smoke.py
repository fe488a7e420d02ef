"""The harness itself: a user logs in, finds a graph's last run from the graphs list and
opens its page, which carries the live view's contract and raises no script errors. No
worker runs in this module, so the run stays queued."""

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.browser.helpers import BrowserLog, login
from tests.conftest import World
from tests.harness.platform import Platform

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "gen", "type": "llm.generate", "config": {"prompt": "Tell {{ q }}"}},
    ],
    "edges": [["in", "gen"]],
}


@pytest.fixture(scope="module")
def platform(django_db_setup: None) -> Iterator[Platform]:
    """The web server only (started by `live_url`)."""
    running = Platform("smoke")
    try:
        yield running
    finally:
        running.stop()


def test_a_queued_run_page_opens_from_the_graphs_list(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    graph = world.graph("smoke", SPEC)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"q": "x"}, actor=world.owner)

    login(page, live_url, "viewer")
    expect(page).to_have_url(f"{live_url}/")
    expect(page.get_by_role("heading", name="Graphs")).to_be_visible()
    expect(page.get_by_role("link", name="Smoke")).to_be_visible()
    page.locator(f'a.badge-link[href="/runs/{run.id}/"]').click()

    expect(page).to_have_url(f"{live_url}/runs/{run.id}/")
    live = page.locator("#run-live")
    expect(live).to_have_attribute("data-run-id", str(run.id))
    expect(live).to_have_attribute("data-status", "queued")
    expect(live).to_have_attribute("data-last-seq", re.compile(r"^\d+$"))
    expect(page.locator("#run-status")).to_have_attribute("data-status", "queued")
    expect(page.locator("#live-state")).to_have_text("live")
    expect(page.locator("#run-graph [data-node='gen']")).to_be_attached()
    assert browser_log.script_errors() == []


def test_another_tenants_run_is_not_found(world: World, live_url: str, page: Page) -> None:
    graph = world.graph("private", SPEC, tenant=world.globex)
    with tenant_context(world.globex):
        run = start_run(version=graph.live_version(), payload={"q": "x"}, actor=world.outsider)
    login(page, live_url, "viewer")
    response = page.goto(f"{live_url}/runs/{run.id}/")
    assert response is not None and response.status == 404
