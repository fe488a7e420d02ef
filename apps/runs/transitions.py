"""The only way a run or a step changes status: a conditional UPDATE from the statuses the
caller expects, checked against the allowed transitions. A race (cancel against the last
step's commit) shows as False; a transition the state machine forbids raises.

Every change is announced on the run's live feed once its transaction commits
(apps/live): the run page's counts and a failed step's error appear without a reload."""

from typing import Any
from uuid import UUID

from django.db import transaction

from apps.live.publisher import FEED
from apps.runs.models import Run, RunStatus, Step, StepStatus

RUN_TRANSITIONS: dict[str, set[str]] = {
    RunStatus.QUEUED: {
        RunStatus.RUNNING,
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.BUDGET_EXCEEDED,
    },
    RunStatus.RUNNING: {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.BUDGET_EXCEEDED,
    },
    # failed -> running: its dead steps are replayed after a fix (replay.replay_dead_steps).
    RunStatus.FAILED: {RunStatus.RUNNING},
}

STEP_TRANSITIONS: dict[str, set[str]] = {
    StepStatus.QUEUED: {StepStatus.RUNNING, StepStatus.SKIPPED},
    StepStatus.FAILED: {StepStatus.RUNNING, StepStatus.SKIPPED},
    # running -> queued: the lease expired and the sweeper hands the step to another worker.
    StepStatus.RUNNING: {
        StepStatus.DONE,
        StepStatus.FAILED,
        StepStatus.DEAD,
        StepStatus.SKIPPED,
        StepStatus.QUEUED,
    },
    # dead -> queued: replayed after a fix, with fresh attempts.
    StepStatus.DEAD: {StepStatus.QUEUED},
}


class IllegalTransition(RuntimeError):
    pass


def _check(table: dict[str, set[str]], kind: str, from_: tuple[str, ...], to: str) -> None:
    for status in from_:
        if to not in table.get(status, set()):
            raise IllegalTransition(f"{kind} cannot go from {status} to {to}")


def transition_run(run: Run, *, from_: tuple[str, ...], to: str, **fields: Any) -> bool:
    _check(RUN_TRANSITIONS, "run", from_, to)
    moved = Run.objects.filter(id=run.id, status__in=from_).update(status=to, **fields) == 1
    if moved:
        frame = {"type": "run", "status": to, "error": fields.get("error", "")}
        tenant_id, run_id = run.tenant_id, run.id
        transaction.on_commit(lambda: FEED.frame(tenant_id, run_id, frame))
    return moved


def transition_step(
    step: Step,
    *,
    from_: tuple[str, ...],
    to: str,
    holding_lease: UUID | None = None,
    **fields: Any,
) -> bool:
    """With holding_lease, only the worker holding that lease token can make the change."""
    _check(STEP_TRANSITIONS, "step", from_, to)
    rows = Step.objects.filter(id=step.id, status__in=from_)
    if holding_lease is not None:
        rows = rows.filter(lease_token=holding_lease)
    moved = rows.update(status=to, **fields) == 1
    if moved:
        _announce_step(step, to, fields)
    return moved


def _announce_step(step: Step, to: str, fields: dict[str, Any]) -> None:
    frame: dict[str, Any] = {
        "type": "step",
        "step": str(step.id),
        "node": step.node_id,
        "item": step.item_index,
        "status": to,
        "attempt": fields.get("attempt", step.attempt),
    }
    if fields.get("error"):
        frame["error"] = fields["error"]
    if fields.get("skip_reason"):
        frame["skip_reason"] = fields["skip_reason"]
    tenant_id, run_id = step.tenant_id, step.run_id
    transaction.on_commit(lambda: FEED.frame(tenant_id, run_id, frame))


def skip_waiting_steps(step_ids: list[UUID], *, reason: str, **fields: Any) -> int:
    """Bulk form of transition_step for cancellation: queued or retry-waiting steps only."""
    _check(STEP_TRANSITIONS, "step", (StepStatus.QUEUED, StepStatus.FAILED), StepStatus.SKIPPED)
    return Step.objects.filter(
        id__in=step_ids, status__in=(StepStatus.QUEUED, StepStatus.FAILED)
    ).update(status=StepStatus.SKIPPED, skip_reason=reason, **fields)
