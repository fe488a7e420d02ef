"""What happens in the transaction that ends a step: its outputs become downstream steps,
fan-in counters move, the run's open-step count moves, and the run ends when it reaches zero.

Lock order, to stay free of deadlocks: the step row (held by the caller), then fan-in rows
from the innermost scope outwards, then the run row last.
"""

from collections import defaultdict
from typing import Any
from uuid import UUID

from django.db import connection
from django.utils import timezone

from apps.graphs.validation import downstream, node_max_attempts, node_queue
from apps.runs.dispatch import StepMessage
from apps.runs.models import FanIn, FanInArrival, Run, RunStatus, Step, StepStatus
from apps.runs.transitions import transition_run
from workers.operators import REGISTRY
from workers.operators.base import PermanentError

Scopes = list[list[Any]]


def new_step(run: Run, node: dict[str, Any], inputs: list[UUID], scopes: Scopes) -> Step:
    innermost = scopes[-1] if scopes else None
    return Step(
        tenant_id=run.tenant_id,
        run=run,
        node_id=node["id"],
        node_type=node["type"],
        queue=node_queue(node),
        max_attempts=node_max_attempts(node),
        inputs=inputs,
        scopes=scopes,
        scope=UUID(innermost[0]) if innermost else None,
        item_index=innermost[1] if innermost else None,
        enqueued_at=timezone.now(),
    )


def collect_for(spec: dict[str, Any], fanout_node_id: str) -> str:
    for node in spec["nodes"]:
        if REGISTRY[node["type"]].is_collect and node.get("config", {}).get("by") == fanout_node_id:
            return str(node["id"])
    return ""


class Routing:
    """Where one finished step's outputs go: new steps, and events arriving at collects."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.arrivals: dict[UUID, list[UUID]] = defaultdict(list)
        # Set when the step was a fan-out: the scope its items belong to.
        self.opened_scope: UUID | None = None

    def route(self, step: Step, run: Run, events: list[Any]) -> None:
        nodes = run.nodes
        for event in events:
            for target in downstream(run.spec, step.node_id, event.port):
                node = nodes[target]
                if REGISTRY[node["type"]].is_collect:
                    self._arrive(event, node)
                else:
                    self.steps.append(new_step(run, node, [event.id], event.scopes))

    def _arrive(self, event: Any, collect: dict[str, Any]) -> None:
        entry = scope_entry(event.scopes, collect["config"]["by"])
        if entry is None:
            raise PermanentError(
                f"collect '{collect['id']}' received an event from outside its fan-out"
            )
        self.arrivals[UUID(entry[0])].append(event.id)


def scope_entry(scopes: Scopes, fanout_node_id: str) -> list[Any] | None:
    """The innermost scope opened by the given fan-out node, if the event is inside one."""
    return next((e for e in reversed(scopes) if e[2] == fanout_node_id), None)


def open_fanin(step: Step, run: Run, routing: Routing) -> None:
    """A fan-out step's items form a new scope; its fan-in starts with nothing pending."""
    routing.opened_scope = step.id
    FanIn.objects.create(
        tenant_id=run.tenant_id,
        fanout_step=step,
        run=run,
        collect_node_id=collect_for(run.spec, step.node_id),
        parent_scopes=step.scopes,
    )


def settle(step: Step, run: Run, routing: Routing) -> list[StepMessage]:
    """Account for a step reaching a final state; returns the messages for new steps.

    The caller has already set the step's final status in this transaction.
    """
    created = list(routing.steps)
    if run.is_active:
        created += _move_fanins(step, run, routing)
    Step.objects.bulk_create(created)
    _move_open_steps(run, len(created) - 1)
    return [StepMessage(run.tenant_id, s.id, s.queue) for s in created]


def _move_fanins(step: Step, run: Run, routing: Routing) -> list[Step]:
    """Each scope's `pending` counts units of unsettled work inside it: steps, and inner
    fan-outs not yet closed. A fan-out step hands its unit to the scope it opens, which
    gives it back (as its collect step, or by closing) once all its items have settled."""
    opened = routing.opened_scope
    deltas: dict[UUID, int] = defaultdict(int)
    if step.scope is not None and opened is None:
        deltas[step.scope] -= 1
    for child in routing.steps:
        if child.scope is not None:
            deltas[child.scope] += 1
    # Innermost first (lock order): the opened scope, then the step's scopes inside out.
    depth = [UUID(entry[0]) for entry in step.scopes] + ([opened] if opened else [])
    touched = [s for s in reversed(depth) if s in deltas or s in routing.arrivals or s == opened]
    settled = []
    # Arrivals first, everywhere, so no collect fires without an item this step delivered.
    for scope_id in touched:
        fanin = FanIn.objects.select_for_update().get(fanout_step_id=scope_id)
        fanin.pending += deltas.get(scope_id, 0)
        fanin.save(update_fields=["pending"])
        FanInArrival.objects.bulk_create(
            FanInArrival(tenant_id=run.tenant_id, fanin=fanin, event_id=event_id)
            for event_id in routing.arrivals.get(scope_id, [])
        )
        if fanin.pending == 0:
            settled.append(scope_id)
    fired: list[Step] = []
    for scope_id in settled:
        fired += _close(FanIn.objects.select_for_update().get(fanout_step_id=scope_id), run)
    return fired


def _close(fanin: FanIn, run: Run) -> list[Step]:
    """Every item of a fan-out has settled. With a collect, the collect step takes all that
    arrived and inherits the fan-out's unit in the outer scope; without one, the unit is
    given back to the outer scope, which may settle in turn."""
    if fanin.fired:
        return []
    fanin.fired = True
    fanin.save(update_fields=["fired"])
    if fanin.collect_node_id:
        node = run.nodes[fanin.collect_node_id]
        arrived = list(fanin.arrivals.order_by("id").values_list("event_id", flat=True))
        return [new_step(run, node, arrived, fanin.parent_scopes)]
    if not fanin.parent_scopes:
        return []
    parent = FanIn.objects.select_for_update().get(fanout_step_id=UUID(fanin.parent_scopes[-1][0]))
    parent.pending -= 1
    parent.save(update_fields=["pending"])
    return _close(parent, run) if parent.pending == 0 else []


def _move_open_steps(run: Run, delta: int) -> None:
    if delta == 0:
        return  # one step ended and one began: the count cannot have reached zero
    with connection.cursor() as cursor:
        # One round trip on the run's hot row: move the count and read where it landed.
        cursor.execute(
            "UPDATE runs_run SET open_steps = open_steps + %s"
            " WHERE id = %s AND tenant_id = %s RETURNING open_steps, status",
            [delta, run.id, run.tenant_id],
        )
        open_steps, status = cursor.fetchone()
    if open_steps == 0 and status in (RunStatus.QUEUED, RunStatus.RUNNING):
        finish_run(run, from_status=status)


def finish_run(run: Run, *, from_status: str) -> None:
    dead = list(
        Step.objects.filter(run_id=run.id, status=StepStatus.DEAD).values_list("node_id", "error")[
            :5
        ]
    )
    if dead:
        summary = "; ".join(f"{node}: {error}" for node, error in dead)
        transition_run(
            run.id,
            from_=(from_status,),
            to=RunStatus.FAILED,
            error=f"dead steps: {summary}",
            finished_at=timezone.now(),
        )
    else:
        transition_run(
            run.id, from_=(from_status,), to=RunStatus.SUCCEEDED, finished_at=timezone.now()
        )
