"""Claiming a step: once only, never for a stopped run, not before a retry is due, and not
past the step's or the run's deadline."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.runs.engine.context import Claimed
from apps.runs.engine.execute import claim_step, fail_attempt
from apps.runs.engine.store import transition_run
from apps.runs.models import Run, RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import WORKER, begin, claim, only_step, source_only


@pytest.mark.django_db
def test_a_queued_step_is_claimed_once(world: World) -> None:
    run = begin(world, "once", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claimed = claim(step, "w1")
        assert claim_step(step.id, "w2") is None

        step.refresh_from_db()
        assert step.status == StepStatus.RUNNING and step.attempt == 1
        assert step.worker == "w1" and step.lease_token == claimed.token
        assert step.lease_until is not None and step.lease_until > timezone.now()
        run.refresh_from_db()
        assert run.status == RunStatus.RUNNING and run.started_at is not None


@pytest.mark.django_db(transaction=True)
def test_of_workers_racing_for_one_step_exactly_one_wins(world: World) -> None:
    run = begin(world, "race", source_only(), {})
    with tenant_context(world.acme):
        step_id = only_step(run, "in").id
    contenders = 6
    barrier = threading.Barrier(contenders)
    claims: list[Claimed | None] = []

    def contend(worker: str) -> None:
        try:
            with tenant_context(world.acme):
                barrier.wait(timeout=10)
                claims.append(claim_step(step_id, worker))
        finally:
            connection.close()

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [c for c in claims if c is not None]
    assert len(claims) == contenders and len(winners) == 1
    with tenant_context(world.acme):
        step = Step.objects.get(id=step_id)
        assert step.attempt == 1 and step.worker == winners[0].step.worker


@pytest.mark.django_db
def test_a_step_of_a_cancelled_run_is_skipped_instead(world: World) -> None:
    run = begin(world, "cancelled", source_only(), {})
    with tenant_context(world.acme):
        # Cancelled while this step was locked mid-claim, so the cancel passed it over.
        assert transition_run(run, from_=(RunStatus.QUEUED,), to=RunStatus.CANCELLED)
        step = only_step(run, "in")
        assert claim_step(step.id, WORKER) is None

        step.refresh_from_db()
        assert step.status == StepStatus.SKIPPED and step.skip_reason == "run cancelled"
        assert step.attempt == 0 and step.finished_at is not None
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.failures) == (RunStatus.CANCELLED, 0, 0)


@pytest.mark.django_db
def test_a_retry_is_not_claimed_before_it_is_due(world: World) -> None:
    run = begin(world, "not-due", source_only(retry={"backoff_s": 600}), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        fail_attempt(claim(step), "flaky", permanent=False)
        assert claim_step(step.id, WORKER) is None
        step.refresh_from_db()
        assert step.status == StepStatus.FAILED and step.attempt == 1
        assert step.not_before is not None and step.not_before > timezone.now()

        Step.objects.filter(id=step.id).update(not_before=timezone.now() - timedelta(seconds=1))
        assert claim(step).step.attempt == 2


@pytest.mark.django_db
def test_a_step_past_its_node_ttl_is_skipped_as_deadline(world: World) -> None:
    run = begin(world, "ttl", source_only(ttl_s=60), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        assert step.deadline is not None
        assert timedelta(seconds=59) < step.deadline - timezone.now() <= timedelta(seconds=60)
        Step.objects.filter(id=step.id).update(deadline=timezone.now() - timedelta(seconds=1))
        assert claim_step(step.id, WORKER) is None

        step.refresh_from_db()
        assert step.status == StepStatus.SKIPPED and step.skip_reason == "deadline"
        assert step.attempt == 0
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.failures) == (RunStatus.FAILED, 0, 1)
        assert run.error == "1 failed step: in: deadline"


@pytest.mark.django_db
def test_a_claim_for_a_run_past_its_deadline_expires_the_run(world: World) -> None:
    run = begin(world, "overdue", source_only(policies={"ttl_s": 60}), {})
    with tenant_context(world.acme):
        Run.objects.filter(id=run.id).update(deadline=timezone.now() - timedelta(seconds=1))
        step = only_step(run, "in")
        assert claim_step(step.id, WORKER) is None

        step.refresh_from_db()
        assert step.status == StepStatus.SKIPPED and step.skip_reason == "deadline"
        run.refresh_from_db()
        assert (run.status, run.open_steps) == (RunStatus.FAILED, 0)
        assert run.error == "deadline passed"
        assert AuditEntry.objects.filter(action="run.expire", target_id=str(run.id)).count() == 1
