"""The graph editor in Chromium: a graph built from nothing by dragging operators onto the
canvas and connecting their ports, configured through the node panel, a validation error
fixed, saved, changed, compared, rolled back and run; and a viewer who can neither edit nor
save, in the page or behind its back.

Real ASGI server, Celery workers and beat; the model is the simulated engine."""

import json
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Locator, Page, expect

from apps.graphs.models import GraphVersion, StreamGraph
from tests.browser.conftest import SCREENSHOT_DIR
from tests.browser.helpers import BrowserLog, login
from tests.conftest import World
from tests.harness.platform import Platform
from tests.web.test_pages import SPEC
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [
    pytest.mark.browser,
    pytest.mark.workers,
    pytest.mark.django_db(transaction=True),
]

# Where each operator is dropped, in canvas coordinates (a 2 x 2 grid).
DROPS = {
    "source.manual": (130, 110),
    "transform.template": (430, 110),
    "llm.generate": (130, 320),
    "sink.table": (430, 320),
}
RUN_SETTLE_MS = 30_000


@pytest.fixture(scope="module")
def platform(django_db_setup: None) -> Iterator[Platform]:
    running = Platform("editor")
    try:
        running.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        running.start_worker("gpu", ["gpu"], concurrency=4)
        running.start_beat()
        yield running
    finally:
        running.stop()


def shot(page: Page, name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOT_DIR / f"editor-{name}.png", full_page=True)


def node(page: Page, node_id: str) -> Locator:
    """A node on the canvas, by its spec id."""
    return page.locator(f'.x6-node:has([data-node-id="{node_id}"])')


def connect(page: Page, source: str, target: str) -> None:
    """Drags from the source's output port onto the target's input port, as a person does."""
    start = node(page, source).locator('[port-group="out"]').first.bounding_box()
    end = node(page, target).locator('[port-group="in"]').first.bounding_box()
    assert start is not None and end is not None
    page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    page.mouse.down()
    page.mouse.move(end["x"] - 10, end["y"] - 10, steps=8)
    page.mouse.move(end["x"] + end["width"] / 2, end["y"] + end["height"] / 2, steps=4)
    page.mouse.up()


def configure(page: Page, node_id: str, fields: dict[str, str]) -> None:
    node(page, node_id).click()
    form = page.locator("#node-form")
    expect(form.locator('input[name="node_id"]')).to_have_value(node_id)
    for label, value in fields.items():
        form.get_by_label(label).fill(value)
    form.get_by_role("button", name="Apply").click()
    expect(page.locator("#node-form .alert-success")).to_be_visible()


def canvas_spec(page: Page) -> dict[str, object]:
    spec: dict[str, object] = json.loads(
        page.evaluate("JSON.stringify(window.sluiceEditor.spec())")
    )
    return spec


def save(page: Page, note: str) -> None:
    page.locator("#save-note").fill(note)
    page.get_by_role("button", name="Save version").click()


def test_editor_builds_a_graph_by_drag_and_drop_saves_diffs_rolls_back_and_runs(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    login(page, live_url, "owner")
    page.goto(f"{live_url}/graphs/new/")
    page.get_by_label("Name").fill("Greeter")
    page.get_by_role("button", name="Create and open the editor").click()
    expect(page.locator("#editor")).to_have_attribute("data-ready", "true")
    expect(page.locator("#canvas-empty")).to_be_visible()

    canvas = page.locator("#canvas")
    for type_name, (x, y) in DROPS.items():
        page.locator(f'.palette-item[data-type="{type_name}"]').drag_to(
            canvas, target_position={"x": x, "y": y}
        )
    expect(page.locator(".x6-node")).to_have_count(4)
    expect(page.locator("#canvas-empty")).to_be_hidden()
    connect(page, "manual", "template")
    connect(page, "template", "generate")
    connect(page, "generate", "table")
    assert canvas_spec(page)["edges"] == [
        ["manual", "template"],
        ["template", "generate"],
        ["generate", "table"],
    ]

    # Undo and redo a fifth node; then delete it from the keyboard.
    page.get_by_label("Search operators").fill("webhook")
    expect(page.locator('.palette-item[data-type="llm.generate"]')).to_be_hidden()
    page.locator('.palette-item[data-type="sink.webhook"]').drag_to(
        canvas, target_position={"x": 430, "y": 500}
    )
    expect(page.locator(".x6-node")).to_have_count(5)
    page.get_by_role("button", name="Undo").click()
    expect(page.locator(".x6-node")).to_have_count(4)
    page.get_by_role("button", name="Redo").click()
    expect(page.locator(".x6-node")).to_have_count(5)
    # The node panel connects without a pointer too.
    node(page, "generate").click()
    page.get_by_label("To node").select_option(label="webhook")
    page.get_by_role("button", name="Add edge").click()
    assert ["generate", "webhook"] in canvas_spec(page)["edges"]  # type: ignore[operator]
    node(page, "webhook").click()
    page.keyboard.press("Delete")
    expect(page.locator(".x6-node")).to_have_count(4)
    assert len(canvas_spec(page)["edges"]) == 3  # type: ignore[arg-type]
    page.get_by_label("Search operators").fill("")

    configure(page, "template", {"Template": "Hello {{ name }}", "Output": "greeting"})
    configure(page, "table", {"Table": "greetings"})
    shot(page, "1-built")

    # The prompt is still empty: the save is refused, the node is marked, the panel says why.
    save(page, "first greeter")
    expect(page.locator("#editor-status")).to_contain_text("Not saved: the graph has 1 problem.")
    expect(page.locator("#problems")).to_contain_text("'prompt' is a required property")
    expect(node(page, "generate")).to_have_class(re.compile(r"\bhas-error\b"))
    shot(page, "2-validation-error")
    configure(page, "generate", {"Prompt": "Reply kindly to: {{ greeting }}", "Max tokens": "8"})
    expect(node(page, "generate")).not_to_have_class(re.compile(r"\bhas-error\b"))
    save(page, "first greeter")
    expect(page.locator("#editor-status")).to_contain_text("Saved version 1 (deployed).")

    configure(page, "template", {"Template": "Hi {{ name }}"})
    expect(page.locator("#dirty-flag")).to_be_visible()
    save(page, "shorter greeting")
    expect(page.locator("#editor-status")).to_contain_text("Saved version 2.")
    expect(page.locator("#dirty-flag")).to_be_hidden()

    graph = StreamGraph.unscoped_all_tenants.get(slug="greeter")
    v1, v2 = (GraphVersion.unscoped_all_tenants.get(graph=graph, number=n) for n in (1, 2))
    assert [n["id"] for n in v1.spec["nodes"]] == ["manual", "template", "generate", "table"]
    assert v1.created_by == world.owner and v2.note == "shorter greeting"

    # Compare v1 and v2 from the history page.
    page.get_by_role("link", name="History").click()
    page.get_by_label("Compare from version 1").check()
    page.get_by_label("Compare to version 2").check()
    page.get_by_role("button", name="Compare selected versions").click()
    expect(page.locator("#diff-summary")).to_have_text("1 node changed")
    changed = page.locator("tr.diff-changed")
    expect(changed).to_contain_text("config.template")
    expect(changed).to_contain_text("Hello {{ name }}")
    expect(changed).to_contain_text("Hi {{ name }}")
    shot(page, "3-diff")

    # Roll back to v1: a new version 3 equal to it.
    page.get_by_role("link", name="History").click()
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator('tr[data-version="1"]').get_by_role("button", name="Roll back to this").click()
    expect(page.locator(".messages")).to_contain_text("Version 3 is a copy of version 1")
    v3 = GraphVersion.unscoped_all_tenants.get(graph=graph, number=3)
    assert v3.checksum == v1.checksum
    page.locator('tr[data-version="3"]').get_by_role("button", name="Deploy").click()
    expect(page.locator(".messages")).to_contain_text("Version 3 is deployed")

    # Run v3 from the editor: the input form comes from the source node.
    page.get_by_role("link", name="Open the editor").click()
    expect(page.locator("#editor")).to_have_attribute("data-ready", "true")
    page.get_by_role("button", name="Run…").click()
    dialog = page.locator("#run-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Payload").fill('{"name": "Ada"}')
    dialog.get_by_role("button", name="Start run").click()
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}/$"))
    expect(page.locator("#run-status")).to_have_attribute(
        "data-status", "succeeded", timeout=RUN_SETTLE_MS
    )
    expect(page.locator("#run-results")).to_contain_text(
        '"greeting": "Hello Ada"', timeout=RUN_SETTLE_MS
    )
    shot(page, "4-run")
    assert browser_log.page_errors == []


def test_editor_read_only_for_a_viewer_in_the_page_and_on_the_server(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    graph = world.graph("shared", SPEC)
    login(page, live_url, "viewer")
    page.goto(f"{live_url}/graphs/shared/editor/")
    expect(page.locator("#editor")).to_have_attribute("data-ready", "true")
    expect(page.locator(".x6-node")).to_have_count(3)
    expect(page.locator(".palette")).to_have_count(0)
    expect(page.get_by_role("button", name="Save version")).to_have_count(0)
    expect(page.get_by_role("button", name="Undo")).to_have_count(0)
    expect(page.get_by_text("Read only: changing graphs needs the editor role")).to_be_visible()

    # The node panel opens, disabled.
    node(page, "t").click()
    expect(page.locator('#node-form input[name="node_id"]')).to_be_disabled()
    expect(page.locator("#node-form").get_by_label("Template")).to_be_disabled()
    expect(page.locator("#node-form").get_by_role("button", name="Apply")).to_have_count(0)
    shot(page, "5-viewer")

    # Behind the page's back, with the viewer's own session and CSRF token: refused.
    headers = json.loads(page.locator("#editor").get_attribute("hx-headers") or "{}")
    response = page.request.post(
        f"{live_url}/graphs/shared/editor/save",
        data=json.dumps({"spec": SPEC, "note": "sneaky", "based_on": 1}),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status == 403
    assert GraphVersion.unscoped_all_tenants.filter(graph=graph).count() == 1
    assert browser_log.page_errors == []
