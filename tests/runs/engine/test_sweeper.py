"""The sweeper's answer to a worker that went quiet: a step whose lease expired is queued
again for another worker (ahead of the backlog), or dead-lettered on its last attempt; the
worker that lost it commits nothing if it comes back."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.runs.engine.execute import run_claimed
from apps.runs.engine.outbox import RECOVERY_PRIORITY, StepMessage
from apps.runs.engine.sweeper import release_expired_lease
from apps.runs.models import Event, RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, drain, only_step, source_only


def expire_lease(step: Step) -> None:
    Step.objects.filter(id=step.id).update(lease_until=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
def test_an_expired_lease_is_queued_again_and_the_lost_worker_commits_nothing(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run = begin(world, "sweep", source_only(), {"x": 1})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        lost = claim(step, "w1")
        expire_lease(step)
        with django_capture_on_commit_callbacks(execute=True):
            assert release_expired_lease(step.id) == 1
        assert release_expired_lease(step.id) == 0  # already released

        step.refresh_from_db()
        assert (step.status, step.attempt) == (StepStatus.QUEUED, 1)
        assert step.error == "attempt 1/3: worker w1 lost (lease expired)"
        assert step.lease_token is None and step.lease_until is None
        assert sent == [StepMessage(run.tenant_id, step.id, step.queue, 0.0, RECOVERY_PRIORITY)]
        run.refresh_from_db()
        assert (run.retries, run.open_steps, run.status) == (1, 1, RunStatus.RUNNING)

        # w1 was only slow: it finishes its operator, but the commit finds the lease gone.
        assert run_claimed(lost, inline_queue=None) is None
        step.refresh_from_db()
        assert step.status == StepStatus.QUEUED
        assert not Event.objects.filter(producer=step).exists()

        drain(run)
        step.refresh_from_db()
        assert (step.status, step.attempt) == (StepStatus.DONE, 2)
        assert Event.objects.filter(producer=step).count() == 1
        run.refresh_from_db()
        assert (run.status, run.open_steps) == (RunStatus.SUCCEEDED, 0)


@pytest.mark.django_db
def test_an_expired_lease_on_the_last_attempt_is_dead_lettered(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run = begin(world, "sweep-last", source_only(retry={"max_attempts": 1}), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claim(step, "w1")
        expire_lease(step)
        with django_capture_on_commit_callbacks(execute=True):
            assert release_expired_lease(step.id) == 1

        step.refresh_from_db()
        assert step.status == StepStatus.DEAD
        assert step.error == "attempt 1/1: worker w1 lost (lease expired)"
        assert sent == []
        run.refresh_from_db()
        assert (run.status, run.retries, run.failures, run.open_steps) == (
            RunStatus.FAILED,
            0,
            1,
            0,
        )
        assert run.error == "1 failed step: in: attempt 1/1: worker w1 lost (lease expired)"


@pytest.mark.django_db
def test_a_lease_still_held_is_left_alone(world: World) -> None:
    run = begin(world, "sweep-held", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        held = claim(step, "w1")
        assert release_expired_lease(step.id) == 0
        step.refresh_from_db()
        assert (step.status, step.lease_token, step.error) == (
            StepStatus.RUNNING,
            held.token,
            "",
        )
        run.refresh_from_db()
        assert run.retries == 0
