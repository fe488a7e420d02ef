"""New work entering a run from outside a step: a run's input, a batch's items, a stream's
events. Each input event gets a step of the graph's source node, created in the caller's
transaction together with the events, and a message once that commits."""

from collections.abc import Sequence
from typing import Any

from apps.audit.models import AuditEntry
from apps.runs.engine import store
from apps.runs.engine.outbox import StepMessage, hand_off_on_commit, send_on_commit
from apps.runs.engine.settle import new_step
from apps.runs.models import Event, Run, Step


def enqueue(run: Run, source: dict[str, Any], events: Sequence[Event]) -> list[Step]:
    steps = [new_step(run, source, [event.id], []) for event in events]
    if len(steps) > 1:
        store.copy_new_rows(steps)  # a batch: COPY streams thousands of rows
    else:
        store.create_steps(steps)
    store.move_open_steps(run, len(steps))
    hand_off_on_commit(
        run.tenant_id, [StepMessage(run.tenant_id, step.id, step.queue) for step in steps]
    )
    return steps


def start_at_once(run: Run, source: dict[str, Any], event: Event, entry: AuditEntry) -> bool:
    """A new run with its input event, its source step and its audit entry, all written in
    one statement; False, with nothing written, when the tenant has run quotas to check
    (the caller then starts it in a transaction that checks them and calls enqueue)."""
    step = new_step(run, source, [event.id], [])
    run.open_steps = 1
    if not store.start_run_at_once(run, [event], [step], entry):
        run.open_steps = 0
        return False
    send_on_commit([StepMessage(run.tenant_id, step.id, step.queue)])
    return True


def release_hold(run: Run) -> None:
    """A stream run stays open between events on one open step of its own (the hold);
    giving it up lets the run finish once its last steps settle."""
    store.move_open_steps(run, -1)
