"""The run page, live, in Chromium: tokens stream into the page as the engine emits them, a
reload or a page opened later shows exactly the step's output, closing the page of an
`on_disconnect: cancel` run stops it after the grace period (a reload inside it does not),
a failed step shows up without a reload, and a run pruned after its tenant's retention
shows its summary and final outputs.

Real workers, beat and ASGI server; the simulated engine runs at 20 tokens/s here, so a
120-token answer streams for about six seconds.
"""

import contextlib
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import BrowserContext, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from apps.live.models import PrunedFeed, RunFrame
from apps.live.retention import prune_expired_frames
from apps.runs.models import Event, Run, RunStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.browser.helpers import BrowserLog, login
from tests.conftest import World
from tests.harness.platform import Platform
from tests.live.feedkit import forget_redis_tail
from tests.runs.helpers import wait_for_run, wait_until
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [
    pytest.mark.browser,
    pytest.mark.workers,
    pytest.mark.django_db(transaction=True),
]

TOKENS_PER_S = 20
MAX_TOKENS = 120  # about 6 s of streaming
LONG = 400  # about 20 s: longer than any test waits for a stop
GRACE_S = 2
# How long the page may take to show the end of a stream the engine has finished.
SETTLE_MS = 15_000


@pytest.fixture(scope="module")
def platform(django_db_setup: None) -> Iterator[Platform]:
    """Like the default platform, with a simulated engine slow enough to watch."""
    running = Platform("live_run")
    try:
        running.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        running.start_worker(
            "gpu", ["gpu"], concurrency=8, env={"SLUICE_SIM_TOKENS_PER_S": str(TOKENS_PER_S)}
        )
        running.start_beat()
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def quiet_workers() -> Iterator[None]:
    """After each test, wait until no step is running or waiting: a worker still finishing
    a stopped step would hold row locks while the test database is flushed."""
    yield
    open_steps = Step.unscoped_all_tenants.filter(status__in=("queued", "running", "failed"))
    wait_until(lambda: not open_steps.exists(), 30, "every step to settle")


def llm_spec(*, max_tokens: int = MAX_TOKENS, **policies: Any) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "gen",
                "type": "llm.generate",
                "config": {"prompt": "Tell {{ q }}", "max_tokens": max_tokens},
            },
        ],
        "edges": [["in", "gen"]],
        "policies": policies,
    }


def start(world: World, slug: str, spec: dict[str, Any]) -> Run:
    graph = world.graph(slug, spec)
    with tenant_context(world.acme):
        return start_run(version=graph.live_version(), payload={"q": slug}, actor=world.owner)


def generating(run: Run, node: str = "gen") -> Step:
    """The node's step, once it runs (its tokens are about to flow)."""

    def running() -> bool:
        with tenant_context(run.tenant):
            return Step.objects.filter(run=run, node_id=node, status="running").exists()

    wait_until(running, 30, f"{node} to start")
    return step_of(run, node)


def step_of(run: Run, node: str = "gen") -> Step:
    with tenant_context(run.tenant):
        return Step.objects.get(run=run, node_id=node)


def output_text(run: Run) -> str:
    """The text the llm step produced, as its output event holds it."""
    with tenant_context(run.tenant):
        text: str = Event.objects.get(producer__run=run, node_id="gen").payload["text"]
    return text


def is_active(run: Run) -> bool:
    with tenant_context(run.tenant):
        run.refresh_from_db()
    return run.is_active


def open_run(page: Page, live_url: str, run: Run) -> None:
    """Opens the run page and waits until its feed is connected (or the run is over)."""
    page.goto(f"{live_url}/runs/{run.id}/")
    expect(page.locator("#run-live")).to_have_attribute("data-run-id", str(run.id))
    expect(page.locator("#live-state")).to_have_text(re.compile("^(live|finished)$"))
    mark_document(page)


def mark_document(page: Page) -> None:
    """Leaves a marker in this document: it is gone if the page navigates or reloads."""
    page.evaluate("window.__sluiceSameDocument = true")


def same_document(page: Page) -> bool:
    return bool(page.evaluate("window.__sluiceSameDocument === true"))


def panel_text(step: Step) -> str:
    """The CSS selector of the token panel's text of the step's first attempt."""
    return (
        f'#token-panels section.token-panel[data-step="{step.id}"][data-node="gen"]'
        '[data-attempt="1"] pre.token-text'
    )


def text_of(page: Page, selector: str) -> str:
    return page.locator(selector).text_content() or ""


def wait_longer_than(page: Page, selector: str, length: int, timeout_ms: int = 5_000) -> str:
    """Waits until the element's text is longer than `length` characters; returns it.
    (Polled in the page: an element the script replaces is found again each time.)"""
    page.wait_for_function(
        "([sel, n]) => (document.querySelector(sel)?.textContent.length ?? -1) > n",
        arg=[selector, length],
        timeout=timeout_ms,
    )
    return text_of(page, selector)


def settled_text(page: Page, selector: str, expected: str) -> str:
    """The element's text once it equals `expected` exactly, or what it is after SETTLE_MS
    (for the assertion's message)."""
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(
            "([sel, text]) => document.querySelector(sel)?.textContent === text",
            arg=[selector, expected],
            timeout=SETTLE_MS,
        )
    return text_of(page, selector)


def test_tokens_appear_in_the_page_as_they_are_generated(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    run = start(world, "streamed", llm_spec())
    login(page, live_url, "viewer")
    step = generating(run)
    open_run(page, live_url, run)

    text = panel_text(step)
    first = wait_longer_than(page, text, 0)
    second = wait_longer_than(page, text, len(first))
    assert is_active(run), "the run ended before the page saw its text grow"
    assert second.startswith(first), (first, second)

    run = wait_for_run(run, timeout=30)
    assert run.status == RunStatus.SUCCEEDED, run.error
    expected = output_text(run)
    assert len(expected) > len(second)
    assert settled_text(page, text, expected) == expected
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#live-state")).to_have_text("finished")
    assert same_document(page), "the page reloaded instead of updating in place"
    assert browser_log.script_errors() == []


def test_a_reload_mid_stream_shows_the_text_without_gap_or_repeat(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    run = start(world, "reloaded", llm_spec())
    login(page, live_url, "viewer")
    step = generating(run)
    open_run(page, live_url, run)
    text = panel_text(step)
    before = wait_longer_than(page, text, 20)
    assert is_active(run)

    page.reload()
    expect(page.locator("#live-state")).to_have_text("live")
    mark_document(page)
    after = wait_longer_than(page, text, len(before) - 1)
    assert after.startswith(before), (before, after)
    assert is_active(run), "the stream ended before the reloaded page caught up"

    run = wait_for_run(run, timeout=30)
    assert run.status == RunStatus.SUCCEEDED, run.error
    expected = output_text(run)
    assert expected.startswith(before)
    assert settled_text(page, text, expected) == expected
    assert same_document(page), "the page reloaded again instead of updating in place"
    assert browser_log.script_errors() == []


def test_closing_the_page_of_a_cancel_run_stops_it_after_the_grace_period(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    run = start(
        world,
        "abandoned",
        llm_spec(max_tokens=LONG, on_disconnect="cancel", disconnect_grace_s=GRACE_S),
    )
    login(page, live_url, "viewer")
    step = generating(run)
    open_run(page, live_url, run)
    wait_longer_than(page, panel_text(step), 0)

    page.close()
    closed_at = time.time()
    run = wait_for_run(run, timeout=GRACE_S + 8)
    assert run.status == RunStatus.CANCELLED, run.error
    assert "no viewer" in run.error and "on_disconnect: cancel" in run.error, run.error
    assert run.finished_at is not None
    # Not before the grace period (less the time the close took to reach the server).
    assert run.finished_at.timestamp() - closed_at >= GRACE_S - 0.5
    wait_until(lambda: step_of(run).status == StepStatus.SKIPPED, 10, "gen to be stopped")
    step = step_of(run)
    assert step.stop_latency_ms is not None
    assert step.wasted_tokens <= 3, step.wasted_tokens
    assert 0 < step.tokens_out < LONG
    assert browser_log.script_errors() == []


def test_a_reload_within_the_grace_period_keeps_a_cancel_run(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    run = start(world, "kept", llm_spec(on_disconnect="cancel", disconnect_grace_s=GRACE_S))
    login(page, live_url, "viewer")
    step = generating(run)
    open_run(page, live_url, run)
    wait_longer_than(page, panel_text(step), 0)

    page.reload()
    expect(page.locator("#live-state")).to_have_text("live")
    assert is_active(run)
    run = wait_for_run(run, timeout=30)
    assert run.status == RunStatus.SUCCEEDED, run.error
    expected = output_text(run)
    assert settled_text(page, panel_text(step), expected) == expected
    assert browser_log.script_errors() == []


def test_a_detached_run_finishes_without_a_viewer_and_its_page_shows_all_of_it(
    world: World, live_url: str, context: BrowserContext, page: Page, browser_log: BrowserLog
) -> None:
    run = start(world, "detached", llm_spec(on_disconnect="detach"))
    login(page, live_url, "viewer")
    step = generating(run)
    open_run(page, live_url, run)
    wait_longer_than(page, panel_text(step), 0)

    page.close()
    assert is_active(run)
    run = wait_for_run(run, timeout=30)
    assert run.status == RunStatus.SUCCEEDED, run.error

    again = context.new_page()
    again.goto(f"{live_url}/runs/{run.id}/")
    expect(again.locator("#run-status")).to_have_attribute("data-status", "succeeded")
    expected = output_text(run)
    assert settled_text(again, panel_text(step), expected) == expected
    expect(again.locator("#live-state")).to_have_text("finished")
    assert browser_log.script_errors() == []


def test_a_failed_step_shows_its_error_without_a_reload(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    spec = llm_spec(max_tokens=60)  # about 3 s, then the call fails
    spec["nodes"].append(
        {
            "id": "call",
            "type": "tool.http",
            # Loopback, and acme's outbound allowlist is empty: refused, a permanent error.
            "config": {"url": "http://127.0.0.1:9/hook"},
            "retry": {"max_attempts": 1},
        }
    )
    spec["edges"].append(["gen", "call"])
    run = start(world, "failing", spec)
    login(page, live_url, "viewer")
    open_run(page, live_url, run)
    expect(page.locator("#step-failures li.step-failure")).to_have_count(0)
    assert is_active(run), "the run ended before the page was open"

    failure = page.locator("#step-failures li.step-failure")
    expect(failure).to_contain_text("calls to private, loopback", timeout=SETTLE_MS)
    run = wait_for_run(run, timeout=30)
    assert run.status == RunStatus.FAILED, run.error
    call = step_of(run, "call")
    assert call.status == StepStatus.DEAD
    expect(failure).to_have_count(1)
    expect(failure).to_have_attribute("data-step", str(call.id))
    expect(failure).to_contain_text(call.error)
    expect(page.locator("#run-status")).to_have_attribute("data-status", "failed")
    assert same_document(page), "the page reloaded instead of updating in place"
    assert browser_log.script_errors() == []


def test_an_old_runs_page_shows_the_pruned_summary_and_its_outputs(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    run = wait_for_run(start(world, "old", llm_spec(max_tokens=10)), timeout=30)
    assert run.status == RunStatus.SUCCEEDED, run.error
    archived = RunFrame.unscoped_all_tenants.filter(run=run, kind="run")
    wait_until(archived.exists, 10, "the run's last frame to be archived")
    finished = timezone.now() - timedelta(days=31)
    Run.unscoped_all_tenants.filter(pk=run.pk).update(finished_at=finished)
    prune_expired_frames()  # beat's sweeper may have been first: either way, it is done
    assert not RunFrame.unscoped_all_tenants.filter(run=run).exists()
    assert PrunedFeed.unscoped_all_tenants.filter(run=run).exists()
    forget_redis_tail(run.id)

    login(page, live_url, "viewer")
    open_run(page, live_url, run)
    expect(page.locator("#live-state")).to_have_text("finished")
    expect(page.locator("#token-empty")).to_contain_text(
        "This run finished more than 30 days ago; its token frames were pruned"
    )
    output = page.locator('#token-panels section.pruned-output[data-node="gen"] pre.json')
    expect(output).to_have_count(1)
    expect(output).to_contain_text(output_text(run).split()[0])
    expect(page.locator("#token-panels section.token-panel[data-step]")).to_have_count(0)
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")
    assert browser_log.script_errors() == []
