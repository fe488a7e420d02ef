"""Stopping a run: cancelled, expired past its deadline, or over its budget. One
transaction stops the run, skips its waiting steps and writes the audit entry; the engines
generating for it hear of it on the control channel once that commits."""

from django.db import transaction
from django.utils import timezone

from apps.audit.services import Actor, record
from apps.runs.engine import store
from apps.runs.engine.states import BUDGET_SKIP, DEADLINE, STOP_ACTIONS, STOP_SIGNALS
from apps.runs.models import ACTIVE_RUN_STATUSES, Run, RunStatus
from workers.control import publish_stop_on_commit


def stop_run(
    run: Run, *, to: str, reason: str, actor: Actor, skip_reason: str | None = None
) -> bool:
    """The run stops at once; waiting steps are skipped (with `skip_reason`, else
    `reason`); engines generating for it abort within a decode step (the control channel),
    other running steps learn of it at their next heartbeat, and none commits anything.
    False if it had already ended."""
    with transaction.atomic():
        before = store.lock_run_status(run.id)  # the caller's copy may be out of date
        stopped = store.transition_run(
            run, from_=ACTIVE_RUN_STATUSES, to=to, error=reason, finished_at=timezone.now()
        )
        if not stopped:
            return False
        publish_stop_on_commit(STOP_SIGNALS[to], runs=[run.id], detail=reason)
        record(
            tenant=run.tenant,
            actor=actor,
            action=STOP_ACTIONS[to],
            target_type="run",
            target_id=run.id,
            before={"status": before},
            after={"status": to, "reason": reason},
        )
        store.skip_waiting(run, skip_reason or reason)
    return True


def expire_run(run: Run) -> bool:
    """The run's deadline passed: it fails, and its waiting steps are skipped as `deadline`."""
    return stop_run(
        run, to=RunStatus.FAILED, reason="deadline passed", skip_reason=DEADLINE, actor=None
    )


def exceed_budget(run: Run, reason: str) -> bool:
    """A budget was crossed: the run ends `budget_exceeded`, its error stating the figure."""
    return stop_run(
        run, to=RunStatus.BUDGET_EXCEEDED, reason=reason, skip_reason=BUDGET_SKIP, actor=None
    )
