"""No zombie inference, end to end: every way a run or step can be stopped reaches the
engine inside the GPU worker process within one token interval, the waste is counted, usage
is recorded for stopped attempts, and budgets stop runs. The engine runs at 20 tokens/s
here, so one token interval is 50 ms and a generation left running would be obvious."""

import html
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from apps.runs.models import Run, RunStatus, Step, StepStatus, Usage
from apps.runs.services import cancel_abandoned, cancel_run, start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.fake_openai import FakeOpenAI, Fault
from tests.harness.platform import Platform
from tests.runs.helpers import wait_for_run, wait_until
from workers.inference.registry import platform_models
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

TOKENS_PER_S = 20
LONG = 400  # max_tokens: 10 to 20 s of generation, far longer than any test waits


@pytest.fixture(scope="module")
def fake_provider() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tokens_per_s=TOKENS_PER_S, answer_words=LONG) as fake:
        yield fake


def remote_models(fake: FakeOpenAI) -> dict[str, Any]:
    """A model served over the OpenAI protocol by the fake provider on loopback."""
    params = {"base_url": fake.base_url, "model": "fake-model", "stall_timeout_s": 0.5}
    return {"remote": {"engine": "openai", "params": params, "usd_per_mtok_out": "2"}}


@pytest.fixture(scope="module")
def slow_platform(django_db_setup: None, fake_provider: FakeOpenAI) -> Iterator[Platform]:
    platform = Platform("inference")
    env = {
        "SLUICE_SIM_TOKENS_PER_S": str(TOKENS_PER_S),
        "SLUICE_MODELS": json.dumps(remote_models(fake_provider)),
    }
    try:
        platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        platform.start_worker("gpu", ["gpu"], concurrency=8, env=env)
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


@pytest.fixture
def registry(fake_provider: FakeOpenAI) -> Iterator[None]:
    """This process validates graphs against the same registry the worker has."""
    with override_settings(SLUICE_MODELS=remote_models(fake_provider)):
        platform_models.cache_clear()
        yield
    platform_models.cache_clear()


@pytest.fixture(autouse=True)
def quiet_workers() -> Iterator[None]:
    """After each test, wait until no step is running or waiting: a worker still finishing
    a stopped step would hold row locks while the test database is flushed."""
    yield
    open_steps = Step.unscoped_all_tenants.filter(status__in=("queued", "running", "failed"))
    wait_until(lambda: not open_steps.exists(), 30, "every step to settle")


def spec(
    *,
    model: str = "default",
    max_tokens: int = LONG,
    items: int = 0,
    node: dict[str, Any] | None = None,
    **policies: Any,
) -> dict[str, Any]:
    gen = {
        "id": "gen",
        "type": "llm.generate",
        # A fan-out's items arrive as {"item": ..., "index": ...}.
        "config": {
            "model": model,
            "prompt": "Tell {{ item }}" if items else "Tell {{ q }}",
            "max_tokens": max_tokens,
        },
        "retry": {"max_attempts": 3, "backoff_s": 0.1},
        **(node or {}),
    }
    nodes: list[dict[str, Any]] = [{"id": "in", "type": "source.manual"}, gen]
    edges = [["in", "gen"]]
    if items:
        nodes.insert(1, {"id": "split", "type": "fanout.split", "config": {"field": "qs"}})
        edges = [["in", "split"], ["split", "gen"]]
    return {"nodes": nodes, "edges": edges, "policies": policies}


def start(world: World, slug: str, graph_spec: dict[str, Any], payload: Any = None) -> Run:
    graph = world.graph(slug, graph_spec)
    with tenant_context(world.acme):
        return start_run(
            version=graph.live_version(), payload=payload or {"q": slug}, actor=world.owner
        )


def generating(run: Run, count: int = 1) -> None:
    """Waits until `count` steps of the run are running and tokens are flowing."""

    def started() -> bool:
        with tenant_context(run.tenant):
            return Step.objects.filter(run=run, node_id="gen", status="running").count() >= count

    wait_until(started, 30, "generation to start")
    time.sleep(0.6)  # a dozen tokens at 20 tokens/s


def gen_steps(run: Run) -> list[Step]:
    with tenant_context(run.tenant):
        return list(Step.objects.filter(run=run, node_id="gen"))


def settled(run: Run, count: int = 1) -> list[Step]:
    def done() -> bool:
        steps = gen_steps(run)
        return len(steps) >= count and all(s.status in ("done", "dead", "skipped") for s in steps)

    wait_until(done, 30, "generation steps to settle")
    return gen_steps(run)


def assert_stopped_in_engine(step: Step) -> None:
    """The engine stopped within one token interval of the stop signal: at most one token
    was produced after it, well short of the answer, and the attempt's usage was recorded."""
    assert step.stop_latency_ms is not None, step
    assert step.wasted_tokens <= 1, step.wasted_tokens
    usage = Usage.unscoped_all_tenants.get(step=step)
    assert 0 < usage.tokens_out < LONG // 2  # an answer is at least half of max_tokens
    assert usage.wasted_tokens == step.wasted_tokens
    assert usage.cost_usd > 0 and usage.stop_latency_ms == step.stop_latency_ms


def test_cancel_reaches_the_engine_within_one_token(world: World, slow_platform: Platform) -> None:
    run = start(world, "cancelled", spec())
    generating(run)
    with tenant_context(world.acme):
        assert cancel_run(run, actor=world.operator)
    [step] = settled(run)
    assert wait_for_run(run).status == RunStatus.CANCELLED
    assert (step.status, step.skip_reason) == (StepStatus.SKIPPED, "run cancelled while running")
    assert_stopped_in_engine(step)


def test_a_step_deadline_aborts_its_generation(world: World, slow_platform: Platform) -> None:
    run = start(world, "slow-step", spec(node={"ttl_s": 1}))
    [step] = settled(run)
    assert (step.status, step.skip_reason) == (StepStatus.SKIPPED, "deadline")
    assert_stopped_in_engine(step)
    run = wait_for_run(run)
    assert run.status == RunStatus.FAILED and "gen" in run.error


def test_the_run_deadline_aborts_its_generations(world: World, slow_platform: Platform) -> None:
    run = start(world, "slow-run", spec(ttl_s=1))
    [step] = settled(run)
    assert (step.status, step.skip_reason) == (StepStatus.SKIPPED, "deadline")
    assert_stopped_in_engine(step)
    run = wait_for_run(run)
    assert (run.status, run.error) == (RunStatus.FAILED, "deadline passed")


def test_a_crossed_run_budget_stops_every_generation_of_the_run(
    world: World, slow_platform: Platform, client: Client
) -> None:
    # $1.50 per million completion tokens: about 70 tokens in all, across three streams.
    budget = Decimal("0.000100")
    run = start(
        world,
        "budgeted",
        spec(items=3, budget_usd=float(budget)),
        {"qs": list("abc")},
    )
    steps = settled(run, count=3)
    run = wait_for_run(run)
    assert run.status == RunStatus.BUDGET_EXCEEDED, (run.error, steps)
    assert run.error.startswith("run budget $0.0001 exceeded: $0.0001"), run.error
    assert {(s.status, s.skip_reason) for s in steps} == {(StepStatus.SKIPPED, "budget exceeded")}
    with tenant_context(world.acme):
        usage = list(Usage.objects.filter(run=run))
    spent = sum((u.cost_usd for u in usage), Decimal(0))
    # Overshoot is bounded by the meter's flush interval (8 tokens) per concurrent stream.
    assert budget <= spent <= budget + Decimal("0.0000015") * 8 * 3
    assert all(u.stop_latency_ms is not None for u in usage)

    # The run page shows why it ended and what the stop cost; other tenants see nothing.
    client.force_login(world.viewer)  # type: ignore[arg-type]
    page = html.unescape(client.get(reverse("runs:detail", args=[run.id])).content.decode())
    assert f"Budget exceeded:</strong> {run.error}" in page
    assert "Budget</dt><dd>$0.0001 " in page
    assert page.count("ms after the stop signal") == 3
    client.force_login(world.outsider)  # type: ignore[arg-type]
    assert client.get(reverse("runs:detail", args=[run.id])).status_code == 404


def test_a_spent_tenant_budget_stops_the_run_and_refuses_the_next(
    world: World, slow_platform: Platform
) -> None:
    # $1.50 per million completion tokens: about 330 tokens, from 8 streams of 200 to 400.
    world.acme.monthly_budget_usd = Decimal("0.0005")
    world.acme.save(update_fields=["monthly_budget_usd"])
    first = start(world, "spender", spec(items=8), {"qs": [str(i) for i in range(8)]})
    assert wait_for_run(first).status == RunStatus.BUDGET_EXCEEDED
    assert first.error.startswith("tenant monthly budget $0.0005 exceeded"), first.error

    second = start(world, "refused", spec())
    second = wait_for_run(second)
    assert second.status == RunStatus.BUDGET_EXCEEDED
    [step] = gen_steps(second)
    assert (step.status, step.skip_reason) == (StepStatus.SKIPPED, "budget exceeded")
    assert not Usage.unscoped_all_tenants.filter(step=step).exists()  # never generated


def test_the_last_viewer_leaving_cancels_only_cancel_runs(
    world: World, slow_platform: Platform
) -> None:
    watched = start(world, "watched", spec(on_disconnect="cancel"))
    detached = start(world, "detached", spec(on_disconnect="detach"))
    generating(watched)
    generating(detached)
    with tenant_context(world.acme):
        assert cancel_abandoned(watched, viewers_gone_s=15)
        assert not cancel_abandoned(detached, viewers_gone_s=15)
    [step] = settled(watched)
    assert wait_for_run(watched).error == "cancelled: no viewer for 15s (on_disconnect: cancel)"
    assert_stopped_in_engine(step)
    time.sleep(0.5)
    [still] = gen_steps(detached)
    assert still.status == StepStatus.RUNNING
    with tenant_context(world.acme):
        cancel_run(detached, actor=world.owner)
    wait_for_run(detached)


# -- the openai engine against a fake provider on loopback --------------------------------


def test_openai_engine_streams_and_records_the_providers_usage(
    world: World, slow_platform: Platform, fake_provider: FakeOpenAI, registry: None
) -> None:
    fake_provider.faults = ()
    run = start(world, "remote", spec(model="remote", max_tokens=6))
    run = wait_for_run(run)
    assert run.status == RunStatus.SUCCEEDED, run.error
    [step] = gen_steps(run)
    assert step.queue == "gpu.remote" and step.tokens_out == 6
    usage = Usage.unscoped_all_tenants.get(step=step)
    record = fake_provider.streams[-1]
    assert record.body["model"] == "fake-model" and record.completed
    assert usage.engine == "openai" and usage.tokens_in == len(["Tell", "remote"]) + 8
    assert usage.cost_usd == Decimal("0.000012")  # 6 tokens at $2 per million


@pytest.mark.parametrize(
    "fault",
    [Fault(status=503), Fault(drop_after=3), Fault(stall_after=2)],
    ids=["5xx", "dropped", "stalled"],
)
def test_openai_engine_failures_are_retried_and_leave_nothing_open(
    world: World, slow_platform: Platform, fake_provider: FakeOpenAI, registry: None, fault: Fault
) -> None:
    before = len(fake_provider.streams)
    fake_provider.faults = lambda index, body: fault if index == before else None
    run = start(world, f"flaky-{len(fake_provider.streams)}", spec(model="remote", max_tokens=5))
    run = wait_for_run(run)
    assert run.status == RunStatus.SUCCEEDED, run.error
    [step] = gen_steps(run)
    assert step.attempt == 2 and step.tokens_out >= 5
    assert len(fake_provider.streams) == before + 2
    assert fake_provider.active_streams() == 0
    # The failed attempt's tokens were paid for too: one usage row per attempt.
    assert Usage.unscoped_all_tenants.filter(step=step).count() == 2


def test_cancelling_closes_the_providers_stream(
    world: World, slow_platform: Platform, fake_provider: FakeOpenAI, registry: None
) -> None:
    fake_provider.faults = ()
    run = start(world, "remote-cancel", spec(model="remote"))
    generating(run)
    with tenant_context(world.acme):
        cancel_run(run, actor=world.owner)
    [step] = settled(run)
    assert_stopped_in_engine(step)
    record = fake_provider.streams[-1]
    assert record.client_closed_at is not None and not record.completed
    assert record.tokens_sent - step.tokens_out <= 1  # nothing streamed to nobody
    wait_until(lambda: fake_provider.active_streams() == 0, 5, "the stream to end")


def test_a_tenants_negotiated_price_is_what_its_usage_costs(
    world: World, slow_platform: Platform
) -> None:
    world.acme.model_overrides = {"default": {"usd_per_mtok_in": "0", "usd_per_mtok_out": "10"}}
    world.acme.full_clean()
    world.acme.save(update_fields=["model_overrides"])
    run = wait_for_run(start(world, "negotiated", spec(max_tokens=4)))
    assert run.status == RunStatus.SUCCEEDED, run.error
    [step] = gen_steps(run)
    # $10 per million completion tokens, prompt free, instead of the platform's prices.
    assert step.cost_usd == Decimal(10) * step.tokens_out / 1_000_000
    assert step.model == "default" and step.tokens_out > 0
