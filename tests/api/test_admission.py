"""Admission control: over a tenant's limits the API answers 429 with a Retry-After worked
out from the drain rate (waiting steps) or the bucket's refill (events, requests), and
writes nothing."""

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.runs.models import Event, Run, Step, StepStatus
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.api.helpers import SPEC, key_client
from tests.conftest import World

pytestmark = pytest.mark.django_db


def limit(tenant: Tenant, **limits: int) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(**limits)


def counts(world: World) -> tuple[int, int, int]:
    with tenant_context(world.acme):
        return Run.objects.count(), Event.objects.count(), Step.objects.count()


def test_too_many_waiting_steps_is_429_with_retry_after_from_the_drain_rate(
    world: World,
) -> None:
    world.graph("g", SPEC)
    limit(world.acme, max_queued_steps=4)
    api = key_client(world)
    assert api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": 1}] * 3}).status_code == 202
    before = counts(world)

    # Nothing has finished lately: look again in a minute.
    idle = api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": 1}] * 2})
    assert idle.status_code == 429
    assert idle["Content-Type"] == "application/problem+json"
    assert idle["Retry-After"] == "60"
    assert "3 steps are waiting" in idle.json()["detail"] and "limit is 4" in idle.json()["detail"]
    assert counts(world) == before

    # Steps finishing at 30 in the last 30 s (1/s): one step over the limit → 1 s.
    with tenant_context(world.acme):
        run = Run.objects.first()
        assert run is not None
        finished = [
            Step(
                tenant=world.acme,
                run=run,
                node_id="in",
                node_type="source.manual",
                queue="cpu",
                status=StepStatus.DONE,
                finished_at=timezone.now(),
            )
            for _ in range(30)
        ]
        Step.objects.bulk_create(finished)
    drained = api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": 1}] * 2})
    assert drained.status_code == 429 and drained["Retry-After"] == "1"

    # Other tenants are not held back by acme's queue.
    world.graph("g", SPEC, tenant=world.globex)
    other = key_client(world, tenant=world.globex)
    assert other.post("/api/runs/", {"graph": "g", "input": {"x": 1}}).status_code == 201


def test_events_per_second_are_limited_per_tenant(world: World) -> None:
    world.graph("g", SPEC)
    limit(world.acme, max_events_per_s=5)  # bursts up to 10
    api = key_client(world)
    events = [{"payload": {"x": i}} for i in range(6)]
    too_big = api.post("/api/graphs/g/events/bulk/", {"events": events * 2})
    assert (
        too_big.status_code == 429 and "split it into smaller requests" in too_big.json()["detail"]
    )

    assert api.post("/api/graphs/g/events/bulk/", {"events": events}).status_code == 202
    over = api.post("/api/graphs/g/events/bulk/", {"events": events})
    assert over.status_code == 429
    assert 1 <= int(over["Retry-After"]) <= 2  # 2 tokens left, 4 more at 5/s
    with tenant_context(world.acme):
        assert Event.objects.count() == 6


def test_each_api_key_has_a_request_rate(world: World) -> None:
    limit(world.acme, api_requests_per_min=60)  # one a second, bursts of 2
    first, second = key_client(world), key_client(world)
    answers = [first.get("/api/graphs/").status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    refused = first.get("/api/graphs/")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert "request rate" in refused.json()["detail"]
    assert second.get("/api/graphs/").status_code == 200  # another key has its own


def test_steps_that_finish_make_room_again(world: World) -> None:
    """Steps that finish leave the count: the same request passes once the queue drained."""
    world.graph("g", SPEC)
    limit(world.acme, max_queued_steps=2)
    api = key_client(world)
    assert api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": 1}] * 2}).status_code == 202
    assert api.post("/api/runs/", {"graph": "g", "input": {"x": 1}}).status_code == 429
    with tenant_context(world.acme):
        Step.objects.update(status=StepStatus.DONE, finished_at=timezone.now() - timedelta(1))
    assert api.post("/api/runs/", {"graph": "g", "input": {"x": 1}}).status_code == 201
