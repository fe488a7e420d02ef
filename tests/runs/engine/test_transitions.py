"""Status changes through store.py: the state machine refuses illegal moves outright, and a
move from a status the row is no longer in, or by a worker not holding the lease, is a
lost race (False) that changes nothing."""

from datetime import timedelta
from uuid import uuid4

import pytest
from django.utils import timezone

from apps.runs.engine.states import IllegalTransition, check_run_transition, check_step_transition
from apps.runs.engine.store import (
    lock_own_step,
    move_open_steps,
    renew_leases,
    transition_run,
    transition_step,
)
from apps.runs.models import RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, only_step, source_only


@pytest.mark.parametrize(
    ("from_", "to"),
    [
        (StepStatus.DONE, StepStatus.RUNNING),
        (StepStatus.SKIPPED, StepStatus.QUEUED),
        (StepStatus.QUEUED, StepStatus.DONE),
        (StepStatus.QUEUED, StepStatus.DEAD),
        (StepStatus.FAILED, StepStatus.DONE),
        (StepStatus.DEAD, StepStatus.RUNNING),
    ],
)
def test_illegal_step_transitions_raise(from_: str, to: str) -> None:
    with pytest.raises(IllegalTransition, match=f"step cannot go from {from_} to {to}"):
        check_step_transition((from_,), to)
    # One illegal status among legal ones is enough to refuse the whole move.
    with pytest.raises(IllegalTransition):
        check_step_transition((StepStatus.RUNNING, from_), to)


@pytest.mark.parametrize(
    ("from_", "to"),
    [
        (RunStatus.SUCCEEDED, RunStatus.RUNNING),
        (RunStatus.CANCELLED, RunStatus.RUNNING),
        (RunStatus.FAILED, RunStatus.SUCCEEDED),
        (RunStatus.RUNNING, RunStatus.QUEUED),
    ],
)
def test_illegal_run_transitions_raise(from_: str, to: str) -> None:
    with pytest.raises(IllegalTransition, match=f"run cannot go from {from_} to {to}"):
        check_run_transition((from_,), to)


@pytest.mark.django_db
def test_an_illegal_transition_raises_before_touching_the_row(world: World) -> None:
    run = begin(world, "illegal", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        with pytest.raises(IllegalTransition):
            transition_step(step, from_=(StepStatus.QUEUED,), to=StepStatus.DONE)
        with pytest.raises(IllegalTransition):
            transition_run(run, from_=(RunStatus.QUEUED,), to=RunStatus.QUEUED)
        assert Step.objects.get(id=step.id).status == StepStatus.QUEUED
        run.refresh_from_db()
        assert run.status == RunStatus.QUEUED


@pytest.mark.django_db
def test_a_transition_from_the_wrong_status_returns_false_and_changes_nothing(
    world: World,
) -> None:
    run = begin(world, "wrong-status", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        moved = transition_step(
            step, from_=(StepStatus.RUNNING,), to=StepStatus.DONE, finished_at=timezone.now()
        )
        assert moved is False
        step.refresh_from_db()
        assert step.status == StepStatus.QUEUED and step.finished_at is None

        finished = transition_run(
            run, from_=(RunStatus.RUNNING,), to=RunStatus.SUCCEEDED, error="never"
        )
        assert finished is False
        run.refresh_from_db()
        assert (run.status, run.error) == (RunStatus.QUEUED, "")


@pytest.mark.django_db
def test_only_the_lease_holder_can_end_a_running_step(world: World) -> None:
    run = begin(world, "lease", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claimed = claim(step)
        assert lock_own_step(step.id) == (StepStatus.RUNNING, claimed.token, RunStatus.RUNNING)

        stolen = transition_step(
            step, from_=(StepStatus.RUNNING,), to=StepStatus.DONE, holding_lease=uuid4()
        )
        assert stolen is False
        step.refresh_from_db()
        assert step.status == StepStatus.RUNNING and step.lease_token == claimed.token

        assert transition_step(
            step, from_=(StepStatus.RUNNING,), to=StepStatus.DONE, holding_lease=claimed.token
        )
        assert Step.objects.get(id=step.id).status == StepStatus.DONE


@pytest.mark.django_db
def test_leases_are_renewed_only_for_their_holder(world: World) -> None:
    run = begin(world, "renew", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claimed = claim(step)
        before = Step.objects.get(id=step.id).lease_until
        later = timezone.now() + timedelta(minutes=5)

        assert renew_leases({step.id: uuid4()}, later) == set()
        assert Step.objects.get(id=step.id).lease_until == before
        assert renew_leases({step.id: claimed.token}, later) == {step.id}
        assert Step.objects.get(id=step.id).lease_until == later


@pytest.mark.django_db
def test_the_run_ends_exactly_when_its_open_steps_reach_zero(world: World) -> None:
    run = begin(world, "open", source_only(), {})
    with tenant_context(world.acme):
        move_open_steps(run, 2)  # a step ended and made three
        run.refresh_from_db()
        assert (run.open_steps, run.status) == (3, RunStatus.QUEUED)
        move_open_steps(run, -2)
        run.refresh_from_db()
        assert (run.open_steps, run.status) == (1, RunStatus.QUEUED)
        move_open_steps(run, -1)
        run.refresh_from_db()
        assert (run.open_steps, run.status) == (0, RunStatus.SUCCEEDED)
        assert run.finished_at is not None
