"""What an operator is given: its StepContext, built from a claim. Everything an operator
needs from the platform (secrets, the effect ledger, the token stream, budgets, starting a
generation) reaches it through here, so operators (workers/) never import an app."""

import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from apps.graphs.validation import spec_max_fanout
from apps.live.publisher import FEED
from apps.runs.engine import effects, store
from apps.runs.engine.budgets import budget_for
from apps.runs.engine.leases import KEEPER
from apps.runs.engine.settle import scope_entry
from apps.runs.engine.states import DEADLINE, stop_signal_for
from apps.runs.engine.watchdog import watch_once
from apps.runs.models import (
    ACTIVE_RUN_STATUSES,
    CLAIMABLE_STEP_STATUSES,
    Event,
    FanIn,
    Run,
    RunStatus,
    Step,
)
from apps.secrets.access import SecretMissing, secret_value
from apps.secrets.crypto import SecretUnreadable
from apps.tenants.context import current_tenant
from workers.control import LISTENER
from workers.inference.base import GenerationRequest
from workers.inference.host import HOST, Generation, Owner, StopSignal
from workers.inference.registry import ModelSpec, models_for
from workers.operators import REGISTRY
from workers.operators.base import (
    DeadlinePassed,
    InputEvent,
    LeaseLost,
    SecretNotAvailable,
    StepCancelled,
    StepContext,
    StepDeadlinePassed,
    UsageRecord,
)


@dataclass
class Claimed:
    """A step this worker holds the lease of, and what it knows about it."""

    step: Step
    run: Run
    node: dict[str, Any]
    token: UUID
    started: float
    operator_ms: float = 0.0
    # The input events, when the claim already has them (a step claimed inline by the
    # commit that produced its input): saves a query per step.
    events: list[Event] | None = None
    # What the attempt consumed (inference), recorded however it ends.
    usage: UsageRecord | None = None


class Heartbeat:
    """Checks the run and the deadlines, at most every `interval` seconds, so an operator may
    call it between every token. The lease is renewed in the background (leases.KEEPER)."""

    def __init__(self, claim: Claimed) -> None:
        self.claim = claim
        self.interval = 0.5
        self.last = time.monotonic()

    def __call__(self) -> None:
        claim = self.claim
        if KEEPER.lost(claim.step.id):
            raise LeaseLost(str(claim.step.id))
        step_deadline = claim.step.deadline
        if step_deadline is not None and step_deadline <= timezone.now():
            raise StepDeadlinePassed(DEADLINE)
        if time.monotonic() - self.last < self.interval:
            return
        self.last = time.monotonic()
        status, deadline, _ = store.run_status(claim.run.id)
        if status not in ACTIVE_RUN_STATUSES:
            raise StepCancelled(f"run {status}")
        if deadline is not None and deadline <= timezone.now():
            raise DeadlinePassed("deadline passed")


def input_events(claim: Claimed) -> list[InputEvent]:
    step = claim.step
    events = claim.events
    if events is None:
        # Kept on the claim: the commit reads the inputs' key from them.
        events = claim.events = list(Event.objects.filter(id__in=step.inputs))
    by_id = {event.id: event for event in events}
    node = claim.node
    collected = node.get("config", {}).get("by") if node["type"] == "collect" else None
    return [
        InputEvent(str(e.id), e.payload, item_order(e.scopes, collected))
        for e in (by_id[i] for i in step.inputs)
    ]


def step_context(claim: Claimed, heartbeat: Heartbeat) -> StepContext:
    step, node = claim.step, claim.node
    operator = REGISTRY[node["type"]]
    tenant = current_tenant()
    # Registry, budgets and the engine host only for steps that generate: not on the path
    # of every CPU step.
    inference: dict[str, Any] = {}
    if operator.uses_inference:
        inference = {
            "models": models_for(tenant.model_overrides),
            "start_generation": lambda spec, request: start_generation(claim, spec, request),
            "budget": budget_for(claim.run, tenant),
            "report_usage": lambda usage: setattr(claim, "usage", usage),
            "open_token_stream": lambda: FEED.stream(
                tenant_id=step.tenant_id,
                run_id=step.run_id,
                step_id=step.id,
                node=step.node_id,
                item=step.item_index,
                attempt=step.attempt,
            ),
            "waiting_ahead": lambda: waiting_ahead(step),
        }
    return StepContext(
        run_id=str(claim.run.id),
        step_id=str(step.id),
        node_id=node["id"],
        config=node.get("config", {}),
        attempt=step.attempt,
        max_fanout=spec_max_fanout(claim.run.spec, settings.SLUICE_DEFAULT_MAX_FANOUT),
        heartbeat=heartbeat,
        perform_effect=lambda name, request, call: effects.perform(
            step, claim.token, name, request, call
        ),
        outbound_allowlist=frozenset(tenant.outbound_allowlist),
        read_secret=read_secret,
        failures=tuple(collect_failures(step)) if operator.is_collect else (),
        **inference,
    )


def read_secret(name: str) -> str:
    """The current tenant's secret, for an operator (the task's tenant context is current)."""
    try:
        return secret_value(name)
    except (SecretMissing, SecretUnreadable) as exc:
        raise SecretNotAvailable(str(exc)) from None


def start_generation(claim: Claimed, spec: ModelSpec, request: GenerationRequest) -> Generation:
    """Starts a generation owned by this step, where every stop signal can reach it: the
    control channel, the watchdog, and timers for the step's and the run's deadlines."""
    LISTENER.ensure_running(watch_once)
    step, run = claim.step, claim.run
    deadlines = [
        (when.timestamp(), kind)
        for when, kind in ((step.deadline, "step_deadline"), (run.deadline, "deadline"))
        if when is not None
    ]
    owner = Owner(step_id=str(step.id), run_id=str(run.id), tenant_id=run.tenant_id)
    generation = HOST.start(spec, request, owner, deadline=min(deadlines, default=None))
    # A stop published before this generation was registered reached no one: look once.
    # Any stop after the registration arrives on the control channel.
    status, _, finished_at = store.run_status(run.id)
    if status not in (RunStatus.QUEUED, RunStatus.RUNNING):
        at = finished_at.timestamp() if finished_at else time.time()
        generation.stop(StopSignal(stop_signal_for(status), at))
    return generation


def waiting_ahead(step: Step) -> tuple[int, int]:
    """This tenant's steps waiting on the step's queue (its model's pool), and how many of
    them outrank it: what load shedding by priority decides on."""
    counts = Step.objects.filter(queue=step.queue, status__in=CLAIMABLE_STEP_STATUSES).aggregate(
        waiting=Count("id"), higher=Count("id", filter=Q(priority__gt=step.priority))
    )
    return counts["waiting"], counts["higher"]


def collect_failures(collect_step: Step) -> list[Any]:
    fanin = FanIn.objects.filter(collect_step_id=collect_step.id).values_list("failures")
    return list(fanin[0][0]) if fanin else []


def item_order(scopes: list[list[Any]], collected_fanout: str | None) -> tuple[int, ...]:
    """Indexes from the collected fan-out's scope inwards; else the innermost index."""
    if not scopes:
        return ()
    entry = scope_entry(scopes, collected_fanout) if collected_fanout else None
    start = scopes.index(entry) if entry is not None else len(scopes) - 1
    return tuple(e[1] for e in scopes[start:])
