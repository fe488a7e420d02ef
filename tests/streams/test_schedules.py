"""Schedule deployments: one record per cron tick, each tick fired exactly once however many
beats ask, and however late."""

import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from apps.runs.models import Event, ResultRow
from apps.streams import services
from apps.streams.models import DeadLetter, Deployment, ScheduleTick
from apps.streams.schedules import due_ticks, fire_due_ticks
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.harness.platform import Platform
from tests.harness.streams import wait_for
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.django_db]

TABLE = "ticked"
MINUTE = timedelta(minutes=1)
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def schedule_spec(template: str = "tick {{ tick }}", cron: str = "* * * * *") -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": "clock",
                "type": "source.schedule",
                "config": {"cron": cron, "payload": {"site": "plant-1"}},
            },
            {
                "id": "shape",
                "type": "transform.template",
                "config": {"template": template, "output": "text"},
            },
            {"id": "store", "type": "sink.table", "config": {"table": TABLE}},
        ],
        "edges": [["clock", "shape"], ["shape", "store"]],
    }


def deploy(
    world: World, spec: dict[str, Any], *, slug: str = "clock", tenant: Tenant | None = None
) -> Deployment:
    tenant = tenant or world.acme
    graph = world.graph(slug, spec, tenant=tenant)
    actor = world.owner if tenant == world.acme else world.outsider
    with tenant_context(tenant):
        return services.deploy(graph=graph, version=graph.live_version(), actor=actor)


def behind(deployment: Deployment, last_tick_at: datetime) -> None:
    """As if the deployment's last tick fired at `last_tick_at` (beat was down since)."""
    Deployment.unscoped_all_tenants.filter(pk=deployment.pk).update(last_tick_at=last_tick_at)


def fired(deployment: Deployment) -> list[datetime]:
    with tenant_context(deployment.tenant):
        ticks = ScheduleTick.objects.filter(deployment=deployment).order_by("tick_at")
        return list(ticks.values_list("tick_at", flat=True))


def rows(tenant: Tenant) -> list[dict[str, Any]]:
    with tenant_context(tenant):
        found = ResultRow.objects.filter(table=TABLE).order_by("data__tick")
        return [row.data for row in found]


def last_tick_at(deployment: Deployment) -> datetime | None:
    return Deployment.unscoped_all_tenants.get(pk=deployment.pk).last_tick_at


def test_fires_exactly_the_ticks_due_since_the_deployment_began(world: World) -> None:
    ours = deploy(world, schedule_spec())
    theirs = deploy(world, schedule_spec(), slug="their-clock", tenant=world.globex)
    now = ours.created_at + timedelta(seconds=150)
    # The minutes in (created_at, now]: two or three, by where created_at fell in its minute.
    due = _minutes_between(ours.created_at, now)
    due_theirs = _minutes_between(theirs.created_at, now)

    assert fire_due_ticks(now) == len(due) + len(due_theirs)
    assert fired(ours) == due
    assert last_tick_at(ours) == due[-1]
    assert rows(world.acme) == [
        {"site": "plant-1", "tick": t.isoformat(), "text": f"tick {t.isoformat()}"} for t in due
    ]
    with tenant_context(world.acme):
        events = Event.objects.filter(node_id="clock").order_by("event_time")
        assert [(e.event_time, e.origin) for e in events] == [
            (t, f"schedule:{t.isoformat()}") for t in due
        ]
        assert {e.run_id for e in events} == {ours.run_id}
    # Each tenant's ticks land in its own tenant.
    assert [r["tick"] for r in rows(world.globex)] == [t.isoformat() for t in due_theirs]


def test_a_second_beat_for_the_same_moment_fires_nothing(world: World) -> None:
    deployment = deploy(world, schedule_spec())
    behind(deployment, T0)
    assert fire_due_ticks(T0 + 2 * MINUTE) == 2
    assert fire_due_ticks(T0 + 2 * MINUTE) == 0
    assert fire_due_ticks(T0 + 2 * MINUTE + timedelta(seconds=59)) == 0
    assert fire_due_ticks(T0 + 3 * MINUTE) == 1  # a tick at `now` itself is due
    assert fired(deployment) == [T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE]
    assert len(rows(world.acme)) == 3


@pytest.mark.django_db(transaction=True)
def test_two_beats_racing_fire_each_tick_once(world: World) -> None:
    # Each thread has its own connection, so its own transactions: committed data needed.
    deployment = deploy(world, schedule_spec())
    behind(deployment, T0)
    now = T0 + 5 * MINUTE
    start = threading.Barrier(4)
    counts: list[int] = []
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            start.wait()
            counts.append(fire_due_ticks(now))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=beat) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sum(counts) == 5 and len(counts) == 4
    assert fired(deployment) == [T0 + MINUTE * i for i in range(1, 6)]
    assert [r["tick"] for r in rows(world.acme)] == [
        (T0 + MINUTE * i).isoformat() for i in range(1, 6)
    ]
    assert last_tick_at(deployment) == now


def test_a_restart_across_ticks_catches_up_exactly_those_missed(world: World) -> None:
    deployment = deploy(world, schedule_spec())
    behind(deployment, T0)
    now = T0 + 3 * MINUTE + timedelta(seconds=30)
    assert fire_due_ticks(now) == 3
    assert fired(deployment) == [T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE]
    assert len(rows(world.acme)) == 3


def test_catching_up_is_bounded_to_the_most_recent_ticks(world: World, settings: Any) -> None:
    settings.SLUICE_SCHEDULE_CATCH_UP = 4
    deployment = deploy(world, schedule_spec())
    behind(deployment, T0 - timedelta(days=1))
    assert fire_due_ticks(T0) == 4
    assert fired(deployment) == [T0 - MINUTE * i for i in (3, 2, 1, 0)]
    assert last_tick_at(deployment) == T0


def test_a_failing_tick_becomes_a_dead_letter_and_the_next_tick_fires(world: World) -> None:
    # The template fails at 12:01 only (`missing` is no field), and renders at other minutes.
    spec = schedule_spec(template="{{ missing if tick[14:16] == '01' else 'fine' }}")
    deployment = deploy(world, spec)
    behind(deployment, T0)
    assert fire_due_ticks(T0 + 2 * MINUTE) == 2
    assert fired(deployment) == [T0 + MINUTE, T0 + 2 * MINUTE]
    assert [r["tick"] for r in rows(world.acme)] == [(T0 + 2 * MINUTE).isoformat()]
    with tenant_context(world.acme):
        dead = DeadLetter.objects.get()
    assert "node 'shape'" in dead.error and "missing" in dead.error
    assert (T0 + MINUTE).isoformat() in dead.payload and "plant-1" in dead.payload
    assert dead.deployment_id == deployment.pk
    assert last_tick_at(deployment) == T0 + 2 * MINUTE
    assert fire_due_ticks(T0 + 3 * MINUTE) == 1
    assert len(rows(world.acme)) == 2


def test_a_paused_deployment_fires_nothing_and_resumes_from_now(world: World) -> None:
    deployment = deploy(world, schedule_spec())
    behind(deployment, T0)
    with tenant_context(world.acme):
        services.pause(deployment, actor=world.owner)
    assert fire_due_ticks(T0 + 2 * MINUTE) == 0
    assert fired(deployment) == []
    with tenant_context(world.acme):
        services.resume(deployment, actor=world.owner)
    # The ticks it was paused through are not caught up: it goes on from the resume.
    resumed_at = last_tick_at(deployment)
    assert resumed_at is not None
    assert abs((resumed_at - timezone.now()).total_seconds()) < 60
    assert fire_due_ticks(resumed_at + 2 * MINUTE) == 2


def _floor(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _minutes_between(start: datetime, end: datetime) -> list[datetime]:
    """Whole minutes in (start, end]."""
    minutes = []
    moment = _floor(start) + MINUTE
    while moment <= end:
        minutes.append(moment)
        moment += MINUTE
    return minutes


def _count(path: Path, pattern: str) -> int:
    return len(re.findall(pattern, path.read_text())) if path.exists() else 0


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_two_real_beats_fire_a_due_tick_once(world: World) -> None:
    deployment = deploy(world, schedule_spec())
    due = _floor(timezone.now())
    behind(deployment, due - MINUTE)  # the tick at `due` is due at once
    env = {"SLUICE_SCHEDULE_POLL_S": "1"}
    platform = Platform("schedules")
    try:
        platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2, env=env)
        platform.start_beat("beat-a", env=env)
        platform.start_beat("beat-b", env=env)
        wait_for(lambda: due in fired(deployment), 60, "the due tick")

        # Both beats go on asking; let each send several more polls and the worker run them.
        sent = "Sending due task fire due schedule ticks"
        done = r"Task sluice\.fire_schedules\[[^\]]+\] succeeded"
        worker_log = platform.log_path("cpu")
        seen = _count(worker_log, done)
        before = {b: _count(platform.log_path(b), sent) for b in ("beat-a", "beat-b")}
        wait_for(
            lambda: (
                all(_count(platform.log_path(b), sent) >= n + 3 for b, n in before.items())
                and _count(worker_log, done) >= seen + 6
            ),
            60,
            "more polls from both beats",
        )
    finally:
        platform.stop()

    ticks = fired(deployment)
    # A minute may turn while the test runs: then its tick fires too, once.
    assert due in ticks and set(ticks) <= {due, due + MINUTE}
    assert [r["tick"] for r in rows(world.acme)] == [t.isoformat() for t in ticks]


def test_due_ticks_are_the_most_recent_in_the_window() -> None:
    quarter = timedelta(minutes=15)
    hour_later = T0 + 4 * quarter
    assert due_ticks("*/15 * * * *", T0, hour_later, 10) == [T0 + quarter * i for i in (1, 2, 3, 4)]
    assert due_ticks("*/15 * * * *", T0, hour_later - MINUTE, 10) == [
        T0 + quarter * i for i in (1, 2, 3)
    ]
    assert due_ticks("*/15 * * * *", T0, hour_later, 2) == [T0 + 3 * quarter, hour_later]
    assert due_ticks("*/15 * * * *", hour_later, T0, 10) == []
    # A whole year behind costs no more than the limit.
    assert len(due_ticks("* * * * *", T0 - timedelta(days=365), T0, 10)) == 10
