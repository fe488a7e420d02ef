"""What happens in the transaction that ends a step: its outputs become downstream steps,
fan-in counters move, the run's open-step count moves, and the run ends when it reaches zero.

Lock order, to stay free of deadlocks: the step row (held by the caller), then fan-in rows
from the innermost scope outwards, then the run row last.
"""

from collections import defaultdict
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.utils import timezone

from apps.graphs.validation import downstream, node_max_attempts, node_queue, node_ttl_s
from apps.runs.engine import store
from apps.runs.engine.outbox import StepMessage
from apps.runs.engine.store import FAILED_STEP
from apps.runs.models import FanIn, FanInClosed, Run, RunKind, Step, StreamRelay
from workers.flow.routing import PRIORITIES
from workers.operators import REGISTRY
from workers.operators.base import PermanentError
from workers.operators.builtin import collects_failures

Scopes = list[list[Any]]


def new_step(run: Run, node: dict[str, Any], inputs: list[UUID], scopes: Scopes) -> Step:
    innermost = scopes[-1] if scopes else None
    ttl = node_ttl_s(node)
    now = timezone.now()
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
        deadline=now + timedelta(seconds=ttl) if ttl is not None else None,
        enqueued_at=now,
        priority=PRIORITIES.get(node.get("config", {}).get("priority"), 1),
    )


def relay(run: Run, node_id: str, event: Any) -> StreamRelay:
    return StreamRelay(
        tenant_id=run.tenant_id,
        run=run,
        node_id=node_id,
        event=event.id,
        key=event.key,
        payload=event.payload,
        event_time=event.event_time,
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
        # Outputs of a stream run's step for a window or memory node: they go back into the
        # stream segment through the relay outbox (DESIGN "Two executors, one graph").
        self.relays: list[StreamRelay] = []
        self.arrivals: dict[UUID, list[UUID]] = defaultdict(list)
        # Set when the step was a fan-out: the scope its items belong to.
        self.opened_scope: UUID | None = None

    def route(self, step: Step, run: Run, events: list[Any]) -> None:
        nodes = run.nodes
        for event in events:
            for target in downstream(run.spec, step.node_id, event.port):
                node = nodes[target]
                operator = REGISTRY[node["type"]]
                if operator.is_collect:
                    self._arrive(event, node)
                elif operator.stateful and run.kind == RunKind.STREAM:
                    self.relays.append(relay(run, target, event))
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
    store.create_fanin(
        tenant_id=run.tenant_id,
        fanout_step=step,
        run=run,
        collect_node_id=collect_for(run.spec, step.node_id),
        parent_scopes=step.scopes,
    )


def settle(step: Step, run: Run, routing: Routing, *, failed: bool = False) -> list[StepMessage]:
    """Account for a step reaching a final state; returns the messages for new steps.

    The caller has already set the step's final status in this transaction. `failed`: the
    step is dead or past its deadline; its fan-out's collect, or else the run, must know.
    """
    created = list(routing.steps)
    run_failures = 0
    if run.is_active:
        fired, run_failures = _move_fanins(step, run, routing, failed)
        created += fired
    store.create_steps(created)
    store.create_rows(routing.relays)
    store.move_open_steps(run, len(created) - 1, run_failures)
    return [StepMessage(run.tenant_id, s.id, s.queue) for s in created]


def _move_fanins(step: Step, run: Run, routing: Routing, failed: bool) -> tuple[list[Step], int]:
    """Each scope's `pending` counts units of unsettled work inside it: steps, and inner
    fan-outs not yet closed. A fan-out step hands its unit to the scope it opens, which
    gives it back (as its collect step, or by closing) once all its items have settled.
    Returns the collect steps that fired and the failures that reached the run itself."""
    opened = routing.opened_scope
    if failed and step.scope is None:
        return [], 1
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
        fanin = store.lock_fanin(scope_id)
        fanin.pending += deltas.get(scope_id, 0)
        if failed and scope_id == step.scope:
            fanin.failed += 1
        store.save_fanin(fanin, "pending", "failed")
        store.add_arrivals(fanin, routing.arrivals.get(scope_id, []))
        if fanin.pending == 0:
            settled.append(scope_id)
    fired: list[Step] = []
    run_failures = 0
    for scope_id in settled:
        steps, failures = _close(store.lock_fanin(scope_id), run)
        fired += steps
        run_failures += failures
    return fired, run_failures


def _close(fanin: FanIn, run: Run) -> tuple[list[Step], int]:
    """Every item of a fan-out has settled. A collect step takes all that arrived and
    inherits the fan-out's unit in the outer scope, unless items failed and its policy is
    to fail the run. Otherwise the unit (and the failure, if any) goes back to the outer
    scope, which may settle in turn, or to the run at the top."""
    if fanin.closed:
        return [], 0
    collect = run.nodes[fanin.collect_node_id] if fanin.collect_node_id else None
    if collect is not None and (not fanin.failed or collects_failures(collect["config"])):
        arrived = list(fanin.arrivals.order_by("id").values_list("event_id", flat=True))
        step = new_step(run, collect, arrived, fanin.parent_scopes)
        fanin.closed, fanin.collect_step_id = FanInClosed.COLLECTED, step.id
        fanin.failures = failures_in(fanin) if fanin.failed else []
        store.save_fanin(fanin, "closed", "collect_step", "failures")
        return [step], 0
    failed = 1 if fanin.failed else 0
    fanin.closed = FanInClosed.FAILED if failed else FanInClosed.PASSED
    store.save_fanin(fanin, "closed")
    if not fanin.parent_scopes:
        return [], failed
    parent = store.lock_fanin(UUID(fanin.parent_scopes[-1][0]))
    parent.pending -= 1
    parent.failed += failed
    store.save_fanin(parent, "pending", "failed")
    return _close(parent, run) if parent.pending == 0 else ([], 0)


def failures_in(fanin: FanIn) -> list[dict[str, Any]]:
    """The items of a fan-out that failed: its dead or expired steps, and inner fan-outs
    that closed failed, by item index."""
    scope = fanin.fanout_step_id
    failures = [
        {"index": index, "node": node, "step": str(step_id), "error": error or reason}
        for step_id, node, index, error, reason in Step.objects.filter(FAILED_STEP, scope=scope)
        .values_list("id", "node_id", "item_index", "error", "skip_reason")
        .order_by("item_index")
    ]
    for inner in FanIn.objects.filter(fanout_step__scope=scope, closed=FanInClosed.FAILED):
        failures.append(
            {
                "index": inner.fanout_step.item_index,
                "node": inner.fanout_step.node_id,
                "step": str(inner.fanout_step_id),
                "error": f"{inner.failed} of its own items failed",
            }
        )
    return sorted(failures, key=lambda f: (f["index"] is None, f["index"]))
