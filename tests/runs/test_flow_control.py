"""Provider flow control end to end: two GPU worker processes send llm.generate steps to fake
OpenAI-compatible providers on loopback whose faults the test scripts (a 429 storm with
Retry-After, 30% 5xx, a full outage), and the assertions read what reached the providers.

Every model here has its own provider name, and the flow state in Redis is cleared before
each test, so no test inherits another's breaker or limits."""

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from apps.runs.models import Run, RunStatus, Step
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from sluice.redis_client import redis_client
from tests.conftest import World
from tests.harness.fake_openai import FakeOpenAI, Fault, StreamRecord
from tests.harness.platform import Platform
from tests.runs.helpers import wait_for_run, wait_until
from workers.flow.state import Outcome, Permit, acquire, release
from workers.inference.registry import platform_models
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

OPEN_S = 1.5  # how long a breaker stays open here
# From the fake writing a response to the worker's release reaching Redis: a call another
# worker starts inside it is not a violation, it left before the news.
HEARING_S = 0.3
# The fake notes a response's end after its last write; the worker may act on it first.
CLOCK_SLACK_S = 0.05


class Script:
    """The primary provider's behaviour, switched by the test while workers call it."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.lock = threading.Lock()

    def set(self, mode: str) -> None:
        with self.lock:
            self.mode = mode

    def __call__(self, index: int, body: Any) -> Fault | None:
        with self.lock:
            mode = self.mode
        if mode == "outage":
            return Fault(status=503, message="upstream unavailable")
        if mode == "storm":
            return Fault(status=429, retry_after="1", message="rate limit reached")
        if mode == "flaky" and index % 3 == 2:  # every third request: a third of them
            return Fault(status=500, message="internal error")
        return None


SCRIPT = Script()


@pytest.fixture(scope="module")
def primary() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tokens_per_s=40, answer_words=8, faults=SCRIPT) as fake:
        yield fake


@pytest.fixture(scope="module")
def backup() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tokens_per_s=200, answer_words=8) as fake:
        yield fake


def remote(fake: FakeOpenAI, quality: int, **entry: Any) -> dict[str, Any]:
    params = {"base_url": fake.base_url, "model": "served-model", "stall_timeout_s": 2}
    return {"engine": "openai", "params": params, "quality": quality, **entry}


def flow_models(primary: FakeOpenAI, backup: FakeOpenAI) -> dict[str, Any]:
    # Waits longer than wait_limit_s send a step back to the queue, where its reason shows.
    breaker = {
        "breaker_failures": 3,
        "breaker_open_s": OPEN_S,
        "retry_min": 20,
        "wait_limit_s": 0.2,
    }
    return {
        # Two worker processes, never more than two requests at once between them.
        # (A fixed limit: a slow first token must not cut it while the test holds a permit.)
        "fc-narrow": remote(
            primary, 2, flow={"max_concurrency": 2, "min_concurrency": 2, "wait_limit_s": 0.3}
        ),
        # Falls back to an equal peer on another provider.
        "fc-main": remote(primary, 2, fallbacks=["fc-peer"], flow=breaker),
        "fc-peer": remote(backup, 2),
        # Its only fallback is of a lower tier.
        "fc-lone": remote(
            primary, 3, fallbacks=["fc-cheap"], flow={**breaker, "max_concurrency": 1}
        ),
        "fc-cheap": remote(backup, 1),
        "fc-flaky": remote(
            primary, 2, flow={"breaker_failures": 100, "retry_ratio": 0.25, "retry_min": 2}
        ),
        # One call at a time: the next one's start shows whether the pause was kept.
        "fc-storm": remote(primary, 2, flow={"max_concurrency": 1, "wait_limit_s": 0.2}),
        "fc-queue": remote(
            primary, 2, flow={"max_concurrency": 1, "wait_limit_s": 0.2, "tenant_queue_limit": 2}
        ),
    }


@pytest.fixture(scope="module")
def flow_platform(
    django_db_setup: None, primary: FakeOpenAI, backup: FakeOpenAI
) -> Iterator[Platform]:
    platform = Platform("flow")
    env = {"SLUICE_MODELS": json.dumps(flow_models(primary, backup))}
    try:
        platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        platform.start_worker("gpu-a", ["gpu"], concurrency=4, env=env)
        platform.start_worker("gpu-b", ["gpu"], concurrency=4, env=env)
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


@pytest.fixture(autouse=True)
def fresh_flow(primary: FakeOpenAI, backup: FakeOpenAI) -> Iterator[None]:
    """This process validates graphs against the workers' registry; every test starts with
    no flow state, a healthy primary and empty request logs."""
    redis = redis_client()
    for key in redis.scan_iter("sluice:flow:*"):
        redis.delete(key)
    SCRIPT.set("ok")
    for fake in (primary, backup):
        with fake.lock:
            fake.streams.clear()
    with override_settings(SLUICE_MODELS=flow_models(primary, backup)):
        platform_models.cache_clear()
        yield
    platform_models.cache_clear()
    SCRIPT.set("ok")
    open_steps = Step.unscoped_all_tenants.filter(status__in=("queued", "running", "failed"))
    wait_until(lambda: not open_steps.exists(), 60, "every step to settle")
    # A step that waited or retried left delayed messages behind; when they land, a worker
    # looks at the settled step in a transaction, which must not meet the database flush.
    time.sleep(OPEN_S + 0.5)


def fan_out(model: str, items: int, **config: Any) -> dict[str, Any]:
    gen = {
        "id": "gen",
        "type": "llm.generate",
        "config": {"model": model, "prompt": "Tell {{ item }}", "max_tokens": 8, **config},
        "retry": {"max_attempts": 8, "backoff_s": 0.1},
    }
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "qs"}},
            gen,
        ],
        "edges": [["in", "split"], ["split", "gen"]],
    }


def start(world: World, slug: str, graph_spec: dict[str, Any], items: int) -> Run:
    graph = world.graph(slug, graph_spec)
    payload = {"qs": [f"{slug} {i}" for i in range(items)]}
    with tenant_context(world.acme):
        return start_run(version=graph.live_version(), payload=payload, actor=world.owner)


def gen_steps(run: Run) -> list[Step]:
    with tenant_context(run.tenant):
        return list(Step.objects.filter(run=run, node_id="gen"))


def requests(fake: FakeOpenAI) -> list[StreamRecord]:
    with fake.lock:
        return sorted(fake.streams, key=lambda r: r.started_at)


def max_overlap(records: list[StreamRecord]) -> int:
    """Calls in flight at once, as the fake saw them: a call ends when its last bytes went
    out (the handler's own end, taken after the write, can trail the client's next call)."""
    edges = sorted(
        [(r.started_at, 1) for r in records]
        + [(r.last_bytes_at or r.ended_at or time.time(), -1) for r in records]
    )
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most


def assert_quiet_while_open(calls: list[StreamRecord], *, failures_to_open: int) -> None:
    """No call starts while the breaker is open: from when the call that opened it ended
    (plus the moment the worker takes to hear of it) until OPEN_S later."""
    ends = sorted(r.ended_at for r in calls if r.status >= 500 and r.ended_at is not None)
    opened = ends[failures_to_open - 1] + HEARING_S
    assert [r for r in calls if opened < r.started_at < opened + OPEN_S - HEARING_S] == []


def test_a_concurrency_limit_holds_across_two_worker_processes(
    world: World, flow_platform: Platform, primary: FakeOpenAI
) -> None:
    run = wait_for_run(start(world, "narrow", fan_out("fc-narrow", 8), 8))
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert len(requests(primary)) == 8
    assert max_overlap(requests(primary)) <= 2


def test_a_permit_held_by_another_process_counts_against_the_limit(
    world: World, flow_platform: Platform, primary: FakeOpenAI
) -> None:
    """Which worker process takes which message is Celery's choice; this process holding
    one of fc-narrow's two permits makes the sharing certain: the workers get one."""
    spec = platform_models()["fc-narrow"]
    assert spec.flow is not None
    held = acquire("fc-narrow", spec.flow, "held-by-the-test", 10, retry=False)
    assert isinstance(held, Permit)
    try:
        run = wait_for_run(start(world, "held", fan_out("fc-narrow", 6), 6))
    finally:
        release(spec.flow, held, Outcome("neutral"))
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert len(requests(primary)) == 6
    assert max_overlap(requests(primary)) == 1


def test_no_call_while_the_breaker_is_open_and_no_fallback_below_min_quality(
    world: World, flow_platform: Platform, primary: FakeOpenAI, backup: FakeOpenAI
) -> None:
    SCRIPT.set("outage")
    run = start(world, "lone", fan_out("fc-lone", 3, min_quality=3), 3)

    def waiting_on_the_breaker() -> bool:
        return any("circuit breaker is open" in s.waiting for s in gen_steps(run))

    wait_until(waiting_on_the_breaker, 30, "a step to wait for the open breaker")
    time.sleep(OPEN_S * 2)  # a probe or two fail while the outage lasts
    SCRIPT.set("ok")
    run = wait_for_run(run)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert {s.model for s in gen_steps(run)} == {"fc-lone"}
    assert backup.streams == []  # fc-cheap is below the floor: never asked
    calls = requests(primary)
    failed = [r for r in calls if r.status == 503]
    assert len(failed) >= 4  # three to open it, then at least one failed probe
    # One request at a time (max_concurrency 1): after the third failure in a row and after
    # every failed probe, the next call waits out the open breaker.
    for opening, after in itertools.pairwise(calls[2:]):
        if opening.status == 503:
            assert opening.ended_at is not None
            assert after.started_at >= opening.ended_at + OPEN_S - 0.05, (opening, after)


def test_the_fallback_serves_while_the_primary_is_down_and_the_primary_after_recovery(
    world: World, flow_platform: Platform, primary: FakeOpenAI, backup: FakeOpenAI
) -> None:
    SCRIPT.set("outage")
    down = wait_for_run(start(world, "down", fan_out("fc-main", 6), 6))
    assert down.status == RunStatus.SUCCEEDED, down.error
    steps = gen_steps(down)
    assert {s.model for s in steps} == {"fc-peer"}
    assert all("served by fc-peer (fallback)" in s.route for s in steps)
    assert any("circuit breaker is open" in s.route for s in steps)
    assert_quiet_while_open(requests(primary), failures_to_open=3)
    SCRIPT.set("ok")
    time.sleep(OPEN_S + 0.2)
    # Half-open: one step probes the primary; the others do not wait on it.
    probe = wait_for_run(start(world, "probe", fan_out("fc-main", 6), 6))
    assert probe.status == RunStatus.SUCCEEDED, probe.error
    assert "fc-main" in {s.model for s in gen_steps(probe)}
    up = wait_for_run(start(world, "up", fan_out("fc-main", 6), 6))
    assert up.status == RunStatus.SUCCEEDED, up.error
    assert {(s.model, s.route) for s in gen_steps(up)} == {("fc-main", "")}


def test_retries_stay_within_the_providers_budget_and_the_rest_fail_with_the_reason(
    world: World, flow_platform: Platform, primary: FakeOpenAI
) -> None:
    SCRIPT.set("flaky")
    items = 12
    run = wait_for_run(start(world, "flaky", fan_out("fc-flaky", items), items))
    calls = requests(primary)
    successes = sum(r.completed for r in calls)
    retries = len(calls) - items  # every step sent one first attempt
    assert retries > 0
    assert retries <= 2 + 0.25 * successes
    dead = [s for s in gen_steps(run) if s.status == "dead"]
    assert all("retry budget is spent" in s.error for s in dead), [s.error for s in dead]
    assert successes + len(dead) == items  # each step either served or failed with why


def test_a_429_storm_pauses_every_worker_for_retry_after(
    world: World, flow_platform: Platform, primary: FakeOpenAI
) -> None:
    SCRIPT.set("storm")
    run = start(world, "storm", fan_out("fc-storm", 8), 8)
    wait_until(lambda: len(requests(primary)) >= 2, 30, "the storm's first 429s")
    time.sleep(1.5)
    SCRIPT.set("ok")
    run = wait_for_run(run)
    assert run.status == RunStatus.SUCCEEDED, run.error
    calls = requests(primary)
    throttled = [r for r in calls if r.status == 429]
    assert throttled
    # Each 429 said Retry-After: 1. Whichever process sends the next call waits it out.
    for refusal, after in itertools.pairwise(calls):
        if refusal.status == 429:
            assert refusal.ended_at is not None
            assert after.started_at >= refusal.ended_at + 1.0 - CLOCK_SLACK_S, (refusal, after)
    assert len(throttled) <= 4  # 1.5 s of storm: a call a second, not a retry storm


def test_lower_priority_steps_wait_while_the_tenants_queue_is_full(
    world: World, flow_platform: Platform, primary: FakeOpenAI
) -> None:
    low = start(world, "low", fan_out("fc-queue", 4, priority="low"), 4)
    high = start(world, "high", fan_out("fc-queue", 3, priority="high"), 3)
    shed: set[str] = set()

    def high_done() -> bool:  # noting every low step seen held back meanwhile
        shed.update(str(s.id) for s in gen_steps(low) if s.waiting.startswith("shed:"))
        with tenant_context(world.acme):
            high.refresh_from_db()
        return not high.is_active

    wait_until(high_done, 60, "the high-priority run to end")
    assert high.finished_at is not None
    ended = high.finished_at
    # Once the high run's steps exist, a low step claimed (its last claim: `started_at`)
    # while they wait is shed, so none finishes before the high run. How many low steps got
    # through before then depends on how soon the high run's split ran, which load varies.
    high_queued = min(s.created_at for s in gen_steps(high))
    overtook = [
        s
        for s in gen_steps(low)
        if s.finished_at and s.finished_at < ended and s.started_at and s.started_at > high_queued
    ]
    low = wait_for_run(low)
    assert high.status == low.status == RunStatus.SUCCEEDED
    assert shed, "no low-priority step was held back"
    # The low run started first, yet it finished last; at most one of its steps overtook,
    # claimed between the high steps' creation and their commit becoming visible.
    assert low.finished_at is not None and low.finished_at > ended
    assert len(overtook) <= 1, [(s.started_at, s.finished_at, high_queued) for s in overtook]
    assert len(requests(primary)) == 7  # nothing dropped, nothing sent twice
