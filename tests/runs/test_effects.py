"""tool.http and sink.webhook through the effect ledger, against a loopback service that
deduplicates by Idempotency-Key: calls happen once, retries happen only on 5xx/429/timeouts,
private addresses are refused without an allowlist, and the run's retry budget caps load."""

from collections.abc import Iterator
from typing import Any

import pytest

from apps.runs.models import Effect, EffectStatus, Event, RunStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.effect_service import EffectService
from tests.runs.helpers import wait_for_run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def service() -> Iterator[EffectService]:
    with EffectService() as running:
        yield running


def allow_loopback(world: World) -> None:
    world.acme.outbound_allowlist = ["127.0.0.1"]
    world.acme.save(update_fields=["outbound_allowlist"])


def call_spec(url: str, *, retry: dict[str, Any] | None = None) -> dict[str, Any]:
    tool: dict[str, Any] = {"id": "call", "type": "tool.http", "config": {"url": url}}
    if retry:
        tool["retry"] = retry
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            tool,
            {"id": "notify", "type": "sink.webhook", "config": {"url": url}},
        ],
        "edges": [["in", "call"], ["call", "notify"]],
    }


def run_to_end(world: World, spec: dict[str, Any], payload: dict[str, Any]) -> Any:
    graph = world.graph("effects", spec)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload=payload, actor=world.owner)
    return wait_for_run(run, timeout=60)


def test_http_tool_and_webhook_call_once_with_the_ledger_key(
    world: World, platform: object, service: EffectService
) -> None:
    allow_loopback(world)
    run = run_to_end(world, call_spec(service.url + "/ok"), {"order": 7})
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        effects = {e.kind: e for e in Effect.objects.filter(step__run=run)}
        assert set(effects) == {"tool.http", "sink.webhook"}
        for effect in effects.values():
            assert effect.status == EffectStatus.DONE and effect.calls == 1
            # The key the service saw is the ledger's key, performed exactly once.
            assert service.performed[effect.key] == 1
        output = Event.objects.get(producer__run=run, node_id="call").payload
        assert output["order"] == 7 and output["response"]["echo"] == {"order": 7}
        # The webhook delivered the payload with the tool's response in it.
        assert service.bodies[effects["sink.webhook"].key]["response"]["ok"] is True
    assert service.without_key == 0


def test_a_503_is_retried_with_the_same_key_and_performed_once(
    world: World, platform: object, service: EffectService
) -> None:
    allow_loopback(world)
    spec = call_spec(service.url + "/flaky/x", retry={"max_attempts": 3, "backoff_s": 0.1})
    run = run_to_end(world, spec, {"n": 1})
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        call = Step.objects.get(run=run, node_id="call")
        assert call.attempt == 2
        effect = Effect.objects.get(step=call)
        assert effect.calls == 2 and effect.status == EffectStatus.DONE
        assert service.failed_attempts[effect.key] == 1 and service.performed[effect.key] == 1


def test_a_400_is_not_retried(world: World, platform: object, service: EffectService) -> None:
    allow_loopback(world)
    run = run_to_end(world, call_spec(service.url + "/fail/400"), {"n": 1})
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED
        call = Step.objects.get(run=run, node_id="call")
        assert call.status == StepStatus.DEAD and call.attempt == 1
        assert "answered 400" in call.error
        assert Effect.objects.get(step=call).status == EffectStatus.FAILED
    assert service.requests == 1


def test_loopback_is_refused_without_the_tenants_allowlist(
    world: World, platform: object, service: EffectService
) -> None:
    run = run_to_end(world, call_spec(service.url + "/ok"), {"n": 1})
    with tenant_context(world.acme):
        call = Step.objects.get(run=run, node_id="call")
        assert call.status == StepStatus.DEAD and call.attempt == 1
        assert "127.0.0.1" in call.error and "allowlist" in call.error
        assert not Effect.objects.filter(step=call).exists()  # refused before the ledger
    assert service.requests == 0


def test_the_retry_budget_caps_calls_to_a_failing_dependency(
    world: World, platform: object, service: EffectService
) -> None:
    allow_loopback(world)
    items = 40
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {
                "id": "call",
                "type": "tool.http",
                "retry": {"max_attempts": 10, "backoff_s": 0.05},
                "config": {"url": service.url + "/fail/503"},
            },
        ],
        "edges": [["in", "split"], ["split", "call"]],
    }
    run = run_to_end(world, spec, {"items": list(range(items))})
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED
        steps = Step.objects.filter(run=run).count()
        budget = int(steps * 0.1) + 10 + 1
        assert run.retries <= budget
        spent = Step.objects.filter(run=run, error__contains="retry budget is spent")
        assert spent.count() >= items - budget
    # Without the budget a dead dependency would have taken items * 10 calls.
    assert service.requests <= items + budget


def test_a_call_longer_than_the_lease_keeps_its_lease_and_runs_once(
    world: World, platform: object
) -> None:
    allow_loopback(world)
    # The test lease is 3 s: without renewal the sweeper would hand the step to another
    # worker mid-call.
    with EffectService(delay_s=4.5) as slow:
        spec = {
            "nodes": [
                {"id": "in", "type": "source.manual"},
                {"id": "call", "type": "tool.http", "config": {"url": slow.url + "/ok"}},
            ],
            "edges": [["in", "call"]],
        }
        run = run_to_end(world, spec, {"n": 1})
        with tenant_context(world.acme):
            assert run.status == RunStatus.SUCCEEDED, run.error
            call = Step.objects.get(run=run, node_id="call")
            assert call.attempt == 1 and call.error == ""
            assert Effect.objects.get(step=call).calls == 1
        assert slow.requests == 1
