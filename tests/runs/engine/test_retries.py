"""A failed attempt: retried later at the cost of one retry from the run's budget, or
dead-lettered (a permanent error, the last attempt, a spent budget). The retry and the
step's new status commit together, and the retry's message carries its delay."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.runs.engine.execute import fail_attempt
from apps.runs.engine.outbox import StepMessage
from apps.runs.models import RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, drain, only_step, source_only

# source -> split -> shape (retried after a long backoff) -> store
SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        {
            "id": "shape",
            "type": "transform.template",
            "config": {"template": "{{ item }}"},
            "retry": {"max_attempts": 3, "backoff_s": 600},
        },
        {"id": "store", "type": "sink.table", "config": {"table": "shaped"}},
    ],
    "edges": [["in", "split"], ["split", "shape"], ["shape", "store"]],
}

BUDGET_SPENT = "not retried: the run's retry budget is spent (0% of its steps + 1)"


@pytest.fixture
def one_retry(settings: Any) -> None:
    settings.SLUICE_RETRY_BUDGET_RATIO = 0
    settings.SLUICE_RETRY_BUDGET_MIN = 1


@pytest.mark.django_db
@pytest.mark.usefixtures("one_retry")
def test_a_failure_is_retried_once_then_the_spent_budget_dead_letters_it(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run = begin(world, "retried", SPEC, {"items": ["a", "b"]})
    with tenant_context(world.acme):
        drain(run, until="shape")
        step = only_step(run, "shape", 0)

        with django_capture_on_commit_callbacks(execute=True):
            fail_attempt(claim(step), "boom", permanent=False)
        step.refresh_from_db()
        assert step.status == StepStatus.FAILED and step.attempt == 1
        assert step.error == "attempt 1/3: boom" and step.lease_until is None
        assert step.not_before is not None and step.enqueued_at is not None
        wait = (step.not_before - step.enqueued_at).total_seconds()
        assert 150 <= wait <= 300  # the 600 s backoff, capped at 300 s, jittered by half
        assert step.not_before > timezone.now()
        # One message, held back by the broker until the retry is due.
        [message] = sent
        assert (message.step_id, message.queue) == (step.id, step.queue)
        assert message.countdown_s == pytest.approx(wait, abs=1e-3)
        run.refresh_from_db()
        assert (run.retries, run.failures, run.open_steps) == (1, 0, 2)

        # The retry falls due; the second attempt fails too, with no retry left.
        Step.objects.filter(id=step.id).update(not_before=timezone.now() - timedelta(seconds=1))
        with django_capture_on_commit_callbacks(execute=True):
            fail_attempt(claim(step), "boom again", permanent=False)
        step.refresh_from_db()
        assert step.status == StepStatus.DEAD and step.attempt == 2
        assert step.error == f"attempt 2/3: boom again; {BUDGET_SPENT}"
        assert len(sent) == 1  # nothing more to send: no retry, no new step
        run.refresh_from_db()
        # The other item is still in flight: the failure waits in its fan-out.
        assert (run.status, run.retries, run.failures, run.open_steps) == (
            RunStatus.RUNNING,
            1,
            0,
            1,
        )

        drain(run)
        run.refresh_from_db()
        assert (run.status, run.retries, run.failures, run.open_steps) == (
            RunStatus.FAILED,
            1,
            1,
            0,
        )
        assert run.error == f"1 failed step: shape: attempt 2/3: boom again; {BUDGET_SPENT}"
        assert only_step(run, "store", 1).status == StepStatus.DONE


@pytest.mark.django_db
@pytest.mark.usefixtures("one_retry")
def test_a_permanent_error_goes_dead_without_spending_a_retry(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run = begin(world, "permanent", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        with django_capture_on_commit_callbacks(execute=True):
            fail_attempt(claim(step), "bad input", permanent=True)
        step.refresh_from_db()
        assert (step.status, step.attempt, step.error) == (
            StepStatus.DEAD,
            1,
            "attempt 1/3: bad input",
        )
        assert step.finished_at is not None and step.lease_until is None
        assert sent == []
        run.refresh_from_db()
        assert (run.status, run.retries, run.failures, run.open_steps) == (
            RunStatus.FAILED,
            0,
            1,
            0,
        )
        assert run.error == "1 failed step: in: attempt 1/3: bad input"


@pytest.mark.django_db
@pytest.mark.usefixtures("one_retry")
def test_the_last_attempt_goes_dead_without_spending_a_retry(world: World) -> None:
    run = begin(world, "last", source_only(retry={"max_attempts": 1}), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        fail_attempt(claim(step), "boom", permanent=False)
        step.refresh_from_db()
        assert (step.status, step.error) == (StepStatus.DEAD, "attempt 1/1: boom")
        run.refresh_from_db()
        assert (run.status, run.retries) == (RunStatus.FAILED, 0)


@pytest.mark.django_db
@pytest.mark.usefixtures("one_retry")
def test_a_stale_claim_cannot_record_a_failure(world: World) -> None:
    run = begin(world, "stale-fail", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        stale = claim(step)
        Step.objects.filter(id=step.id).update(lease_token=None)  # another worker's now
        fail_attempt(stale, "boom", permanent=False)
        step.refresh_from_db()
        assert (step.status, step.error) == (StepStatus.RUNNING, "")
        run.refresh_from_db()
        assert run.retries == 0  # the retry is not spent without the step's failure
