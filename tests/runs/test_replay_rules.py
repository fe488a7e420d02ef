"""When replaying dead steps is refused, checked on runs put into each state directly in
PostgreSQL (no workers: the messages of a test transaction are never sent)."""

from datetime import timedelta
from uuid import UUID

import pytest
from django.utils import timezone

from apps.runs.engine.store import transition_run
from apps.runs.models import FanIn, FanInClosed, Run, RunStatus, Step, StepStatus
from apps.runs.replay import ReplayRefused, replay_dead_steps
from apps.runs.services import cancel_run, start_run
from apps.tenants.context import tenant_context
from tests.conftest import World

pytestmark = pytest.mark.django_db

SPEC: dict[str, object] = {"nodes": [{"id": "in", "type": "source.manual"}], "edges": []}


@pytest.fixture
def run(world: World) -> Run:
    graph = world.graph("rules", SPEC)
    with tenant_context(world.acme):
        return start_run(version=graph.live_version(), payload={}, actor=world.owner)


def refusal(world: World, run: Run) -> str:
    with tenant_context(world.acme), pytest.raises(ReplayRefused) as refused:
        replay_dead_steps(Run.objects.get(id=run.id), actor=world.owner)
    return str(refused.value)


def test_a_queued_run_is_refused(world: World, run: Run) -> None:
    assert refusal(world, run) == "the run is queued"


def test_a_running_run_without_dead_steps_is_refused(world: World, run: Run) -> None:
    with tenant_context(world.acme):
        transition_run(run, from_=(RunStatus.QUEUED,), to=RunStatus.RUNNING)
    assert refusal(world, run) == "the run has no dead steps to replay"


def test_a_cancelled_run_is_refused(world: World, run: Run) -> None:
    with tenant_context(world.acme):
        cancel_run(run, actor=world.owner)
    assert "cancelled; start a new run" in refusal(world, run)


def test_a_run_past_its_deadline_is_refused(world: World, run: Run) -> None:
    with tenant_context(world.acme):
        Run.objects.filter(id=run.id).update(
            status=RunStatus.FAILED, deadline=timezone.now() - timedelta(seconds=1)
        )
    assert "deadline has passed" in refusal(world, run)


def test_an_item_whose_collect_already_ran_is_refused_and_nothing_changes(
    world: World, run: Run
) -> None:
    with tenant_context(world.acme):
        # The source step stands in for a fan-out whose collect ran without item 3.
        fanout = Step.objects.get(run=run)
        FanIn.objects.create(
            fanout_step=fanout, run=run, collect_node_id="gather", closed=FanInClosed.COLLECTED
        )
        dead = Step.objects.create(
            run=run,
            node_id="call",
            node_type="tool.http",
            queue="cpu",
            status=StepStatus.DEAD,
            scopes=[[str(fanout.id), 3, "in"]],
            scope=UUID(str(fanout.id)),
            item_index=3,
            error="attempt 3/3: boom",
        )
        Run.objects.filter(id=run.id).update(status=RunStatus.FAILED)
    message = refusal(world, run)
    assert "collect 'gather' already ran with the items that succeeded" in message
    with tenant_context(world.acme):
        dead.refresh_from_db()
        assert dead.status == StepStatus.DEAD and dead.error == "attempt 3/3: boom"
        fanin = FanIn.objects.get(fanout_step=fanout)
        assert fanin.pending == 0 and fanin.closed == FanInClosed.COLLECTED
        assert Run.objects.get(id=run.id).status == RunStatus.FAILED
