"""What happens in the transaction that ends a step: its outputs become downstream steps,
fan-in counters move, the run's open-step count moves, and the run ends when it reaches zero.

Lock order, to stay free of deadlocks: the step row (held by the caller), then fan-in rows
from the innermost scope outwards, then the run row last.
"""

from collections import defaultdict
from typing import Any
from uuid import UUID

from django.db.models import F
from django.utils import timezone

from apps.graphs.validation import downstream, node_max_attempts, node_queue
from apps.runs.dispatch import StepMessage
from apps.runs.models import FanIn, Run, RunStatus, Step, StepStatus
from apps.runs.transitions import transition_run
from workers.operators import REGISTRY
from workers.operators.base import PermanentError

Scopes = list[list[Any]]


def nodes_by_id(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["id"]: node for node in spec["nodes"]}


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

    def route(self, step: Step, run: Run, spec: dict[str, Any], events: list[Any]) -> None:
        nodes = nodes_by_id(spec)
        for event in events:
            for target in downstream(spec, step.node_id, event.port):
                node = nodes[target]
                if REGISTRY[node["type"]].is_collect:
                    self._arrive(event, target)
                else:
                    self.steps.append(new_step(run, node, [event.id], event.scopes))

    def _arrive(self, event: Any, collect_node_id: str) -> None:
        if not event.scopes:
            raise PermanentError(
                f"collect '{collect_node_id}' received an event outside any fan-out"
            )
        self.arrivals[UUID(event.scopes[-1][0])].append(event.id)


def open_fanin(step: Step, run: Run, spec: dict[str, Any], routing: Routing) -> None:
    """A fan-out step's items form a new scope; its fan-in starts with nothing pending."""
    routing.opened_scope = step.id
    FanIn.objects.create(
        tenant_id=run.tenant_id,
        fanout_step=step,
        run=run,
        collect_node_id=collect_for(spec, step.node_id),
        parent_scopes=step.scopes,
    )


def settle(step: Step, run: Run, spec: dict[str, Any], routing: Routing) -> list[StepMessage]:
    """Account for a step reaching a final state; returns the messages for new steps.

    The caller has already set the step's final status in this transaction.
    """
    created = list(routing.steps)
    if run.is_active:
        created += _move_fanins(step, run, spec, routing)
    Step.objects.bulk_create(created)
    _move_open_steps(run, len(created) - 1)
    return [StepMessage(run.tenant_id, s.id, s.queue) for s in created]


def _move_fanins(step: Step, run: Run, spec: dict[str, Any], routing: Routing) -> list[Step]:
    deltas: dict[UUID, int] = defaultdict(int)
    if step.scope is not None:
        deltas[step.scope] -= 1
    for child in routing.steps:
        if child.scope is not None:
            deltas[child.scope] += 1
    fired: list[Step] = []
    touched = set(deltas) | set(routing.arrivals)
    if routing.opened_scope is not None:
        # Even with no items at all: an empty fan-out fires its collect at once.
        touched.add(routing.opened_scope)
    # The step's new scope (if it is a fan-out) is innermost; its own scope is next.
    for scope_id in sorted(touched, key=lambda s: s != step.id):
        fanin = FanIn.objects.select_for_update().get(fanout_step_id=scope_id)
        fanin.pending += deltas.get(scope_id, 0)
        fanin.arrived = [*fanin.arrived, *routing.arrivals.get(scope_id, [])]
        if fanin.pending == 0 and fanin.collect_node_id and not fanin.fired:
            fanin.fired = True
            fired.append(_fire_collect(fanin, run, spec))
        fanin.save(update_fields=["pending", "arrived", "fired"])
    return fired


def _fire_collect(fanin: FanIn, run: Run, spec: dict[str, Any]) -> Step:
    """Every item of the fan-out has settled: the collect step takes all that arrived.
    It belongs to the fan-out's own (outer) scope, which now has one more step pending."""
    node = nodes_by_id(spec)[fanin.collect_node_id]
    collect_step = new_step(run, node, list(fanin.arrived), fanin.parent_scopes)
    if collect_step.scope is not None:
        FanIn.objects.filter(fanout_step_id=collect_step.scope).update(pending=F("pending") + 1)
    return collect_step


def _move_open_steps(run: Run, delta: int) -> None:
    Run.objects.filter(id=run.id).update(open_steps=F("open_steps") + delta)
    open_steps, status = Run.objects.filter(id=run.id).values_list("open_steps", "status").get()
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
