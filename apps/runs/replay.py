"""Replaying a run's dead steps after a fix (a dependency is back, a quota was raised).

A dead step is queued again with fresh attempts, in the same run: its inputs, its effect
keys and its place in the fan-in accounting are unchanged, so a tool call that completed
before is not repeated and the collect it belongs to waits for it again. Each failure the
step caused is taken back where it was counted: in its fan-out's scope, in outer scopes
that closed failed because of it, or on the run. A collect that already ran with the items
that succeeded cannot take the item back; such a step is refused.
"""

from uuid import UUID

from django.db import transaction
from django.utils import timezone

from apps.audit.services import Actor, record
from apps.runs.engine import store
from apps.runs.engine.outbox import StepMessage, send_on_commit
from apps.runs.engine.settle import new_step
from apps.runs.models import FanInClosed, Run, RunStatus, Step, StepStatus


class ReplayRefused(ValueError):
    """The message says why the run or step cannot be replayed and what to do instead."""


def replayable_reason(run: Run) -> str | None:
    """None when the run's dead steps may be replayed; else why not."""
    if run.status == RunStatus.CANCELLED:
        return "the run was cancelled; start a new run instead"
    if run.deadline is not None and run.deadline <= timezone.now():
        return "the run's deadline has passed; start a new run instead"
    if run.status not in (RunStatus.RUNNING, RunStatus.FAILED):
        return f"the run is {run.status}"
    return None


def replay_dead_steps(run: Run, *, actor: Actor, step_ids: list[UUID] | None = None) -> int:
    """Queues the run's dead steps (or the given ones) again; returns how many."""
    reason = replayable_reason(run)
    if reason:
        raise ReplayRefused(reason)
    with transaction.atomic():
        steps = store.lock_dead_steps(run.id, step_ids)
        if not steps:
            raise ReplayRefused("the run has no dead steps to replay")
        run_failures = sum(_take_back_failure(step) for step in steps)
        # Lock order as in a step's commit: steps, fan-ins innermost out, the run last.
        status = store.lock_run_status(run.id)
        if status not in (RunStatus.RUNNING, RunStatus.FAILED):
            raise ReplayRefused(f"the run is {status}")
        for step in steps:
            _requeue(step, run)
        if status == RunStatus.FAILED:
            store.transition_run(
                run, from_=(RunStatus.FAILED,), to=RunStatus.RUNNING, error="", finished_at=None
            )
        store.reopen_for_replay(run, steps=len(steps), failures_taken_back=run_failures)
        record(
            tenant=run.tenant,
            actor=actor,
            action="run.replay",
            target_type="run",
            target_id=run.id,
            before={"status": status, "dead_steps": [str(s.id) for s in steps]},
            after={"status": RunStatus.RUNNING},
        )
        send_on_commit([StepMessage(run.tenant_id, s.id, s.queue) for s in steps])
    return len(steps)


def _take_back_failure(step: Step) -> int:
    """Undo what settling this dead step did to its scopes, innermost out; returns 1 if the
    failure had reached the run itself."""
    for entry in reversed(step.scopes):
        fanin = store.lock_fanin(UUID(entry[0]))
        if fanin.closed == FanInClosed.COLLECTED:
            raise ReplayRefused(
                f"step {step.node_id} (item {step.item_index}) cannot be replayed: the collect"
                f" '{fanin.collect_node_id}' already ran with the items that succeeded;"
                " start a new run to process it"
            )
        # The unit this scope gave up (the step, or an inner scope that closed failed)
        # is open again, and the failure it counted is withdrawn.
        was_closed = fanin.closed == FanInClosed.FAILED
        fanin.pending += 1
        fanin.failed -= 1
        fanin.closed = FanInClosed.OPEN
        store.save_fanin(fanin, "pending", "failed", "closed")
        if not was_closed:
            return 0  # still open: outer scopes never heard of this failure
    return 1


def _requeue(step: Step, run: Run) -> None:
    # What a newly created step of this node would get: attempts, deadline, enqueue time.
    fresh = new_step(run, run.nodes[step.node_id], step.inputs, step.scopes)
    store.transition_step(
        step,
        from_=(StepStatus.DEAD,),
        to=StepStatus.QUEUED,
        attempt=0,
        max_attempts=fresh.max_attempts,
        deadline=fresh.deadline,
        error="",
        worker="",
        not_before=None,
        lease_until=None,
        lease_token=None,
        started_at=None,
        finished_at=None,
        enqueued_at=fresh.enqueued_at,
    )
