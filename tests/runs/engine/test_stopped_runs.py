"""A run stopped while one of its steps runs: the step's failure is not retried, and the
stop's audit entry records the status the run had, not the caller's stale copy."""

import pytest

from apps.audit.models import AuditEntry
from apps.runs.engine.execute import fail_attempt
from apps.runs.engine.stop import stop_run
from apps.runs.models import RunStatus, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, only_step, source_only


@pytest.mark.django_db
def test_a_failure_after_the_run_was_stopped_is_not_retried(world: World) -> None:
    run = begin(world, "bug-retry", source_only(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claimed = claim(step)
        stop_run(run, to=RunStatus.CANCELLED, reason="stop", actor=world.owner)
        # The operator fails (an exception, not StepCancelled) after the cancel committed.
        fail_attempt(claimed, "boom", permanent=False)

        step.refresh_from_db()
        run.refresh_from_db()
        # Like commit_step: skipped, no retry spent, nothing left open on an ended run.
        assert (step.status, step.skip_reason) == (
            StepStatus.SKIPPED,
            "run cancelled while running",
        )
        assert (run.retries, run.open_steps) == (0, 0)


@pytest.mark.django_db
def test_the_audit_entry_of_a_stop_records_the_status_the_run_had(world: World) -> None:
    run = begin(world, "bug-audit", source_only(), {})
    with tenant_context(world.acme):
        claimed = claim(only_step(run, "in"))  # the run is running now
        # As run_claimed does on DeadlinePassed / BudgetExceeded: expire_run(claim.run).
        stop_run(claimed.run, to=RunStatus.CANCELLED, reason="stop", actor=world.owner)
        entry = AuditEntry.objects.get(action="run.cancel", target_id=str(run.id))
        assert entry.before == {"status": RunStatus.RUNNING}
