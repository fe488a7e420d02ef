"""Chains (DESIGN "Two executors, one graph"): after a step's operator has run, the cheap
step it feeds on this worker's own queue runs at once, on the outputs still in memory, and
so on, and the whole chain commits in one transaction: one claim and one commit for the
chain instead of a message, a claim and a commit per node. Each node still gets its own
step row and output events, so the run page and lineage show chained steps like any other.

Nothing of a chain is written before its commit: a worker that dies in the middle leaves
the first step running under its lease, and the sweeper runs the chain again from there.
A chain stops at a fan-out (its items are many steps) and before a collect (it waits for
a whole scope), at a node that sets `chain: false`, and at MAX_STEPS or MAX_SECONDS, so
one worker slot is never held for long.
"""

import time
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from django.utils import timezone

from apps.runs.engine.context import Claimed
from apps.runs.engine.leases import lease_until
from apps.runs.engine.outputs import output_events, shared_key, stream_event_time
from apps.runs.engine.settle import Routing
from apps.runs.models import Event, StepStatus
from workers.operators import REGISTRY
from workers.operators.base import StepResult

MAX_STEPS = 20
MAX_SECONDS = 0.5


@dataclass
class Link:
    """One step of a chain whose operator has run: what its commit will write."""

    claim: Claimed
    result: StepResult
    events: list[Event]
    routing: Routing


def plan(claim: Claimed, result: StepResult) -> Link:
    """The step's outputs and where they go, in memory. Raises PermanentError when an output
    cannot be routed (an event reaching a collect from outside its fan-out)."""
    step, run = claim.step, claim.run
    opens_scope = REGISTRY[claim.node["type"]].opens_scope
    events = output_events(
        step,
        run,
        result,
        opens_scope=opens_scope,
        key=shared_key(claim.events),
        event_time=stream_event_time(run, claim.events),
    )
    routing = Routing()
    if opens_scope:
        routing.opened_scope = step.id
    routing.route(step, run, events)
    return Link(claim, result, events, routing)


def may_chain(node: dict[str, Any]) -> bool:
    operator = REGISTRY[node["type"]]
    return operator.cheap and not operator.opens_scope and node.get("chain", True) is not False


def next_step(chain: list[Link], own_queue: str | None, started: float) -> Claimed | None:
    """The step the chain runs next: the first new step of its last link that is cheap and on
    this worker's queue; None when the chain ends here."""
    last = chain[-1]
    run = last.claim.run
    if (
        own_queue is None
        or len(chain) >= MAX_STEPS
        or time.monotonic() - started >= MAX_SECONDS
        or last.routing.opened_scope is not None
        or not may_chain(last.claim.node)
        or (run.deadline is not None and run.deadline <= timezone.now())
    ):
        return None
    for step in last.routing.steps:
        node = run.nodes[step.node_id]
        if step.queue == own_queue and may_chain(node):
            claim = Claimed(step, run, node, uuid4(), time.monotonic())
            claim.events = [e for e in last.events if e.id in step.inputs]
            step.attempt, step.worker = 1, last.claim.step.worker
            return claim
    return None


def mark_done(claim: Claimed) -> None:
    """A chained step is written once, already done, by its predecessor's commit."""
    step = claim.step
    step.status = StepStatus.DONE
    step.started_at = step.finished_at = timezone.now()
    step.duration_ms = (time.monotonic() - claim.started) * 1000
    step.operator_ms = claim.operator_ms


def mark_leased(claim: Claimed) -> None:
    """A step written already leased to this worker, which runs it (or ends it) next."""
    step = claim.step
    step.status, step.attempt = StepStatus.RUNNING, 1
    step.lease_until, step.lease_token, step.started_at = lease_until(), claim.token, timezone.now()


def chained_ids(chain: list[Link]) -> set[Any]:
    return {link.claim.step.id for link in chain[1:]}
