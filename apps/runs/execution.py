"""A step's life on a worker (DESIGN "A step's life"): claim with a lease, run the operator
outside any transaction, then commit outputs, downstream steps and `done` in one
transaction that first proves this worker still holds the lease. A worker that lost its
lease commits nothing, so a step's outputs exist once however often it is attempted."""

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from apps.graphs.validation import spec_max_fanout
from apps.live.publisher import FEED
from apps.runs import effects
from apps.runs.budgets import budget_for
from apps.runs.dispatch import StepMessage, send_on_commit
from apps.runs.leases import KEEPER
from apps.runs.models import (
    ACTIVE_RUN_STATUSES,
    CLAIMABLE_STEP_STATUSES,
    Event,
    FanIn,
    Run,
    RunStatus,
    Step,
    StepStatus,
)
from apps.runs.retries import give_up_reason, retry_delay_s
from apps.runs.services import BUDGET_SKIP, STOP_SIGNALS, exceed_budget, expire_run
from apps.runs.stepflow import DEADLINE, Routing, open_fanin, scope_entry, settle
from apps.runs.transitions import transition_run, transition_step
from apps.runs.writes import record_usage, shared_key, write_outputs
from apps.tenants.context import current_tenant
from workers.control import LISTENER
from workers.inference.base import GenerationRequest
from workers.inference.host import HOST, Generation, Owner, StopSignal
from workers.inference.registry import ModelSpec, models_for
from workers.operators import REGISTRY
from workers.operators.base import (
    BudgetExceeded,
    DeadlinePassed,
    Deferred,
    InputEvent,
    LeaseLost,
    PermanentError,
    RetrySoon,
    StepCancelled,
    StepContext,
    StepDeadlinePassed,
    StepResult,
    UsageRecord,
)

logger = logging.getLogger(__name__)


@dataclass
class Claimed:
    step: Step
    run: Run
    node: dict[str, Any]
    token: UUID
    started: float
    operator_ms: float = 0.0
    # The input events, when the claim already has them (a step claimed inline by the
    # commit that produced its input): saves a query and a commit per step.
    events: list[Event] | None = None
    # What the attempt consumed (inference), recorded however it ends.
    usage: UsageRecord | None = None


@dataclass(frozen=True)
class Overdue:
    run: Run


def lease_until() -> Any:
    return timezone.now() + timedelta(seconds=settings.SLUICE_STEP_LEASE_S)


def execute(step_id: UUID, worker: str, *, inline_queue: str | None) -> Claimed | None:
    """Claim, run and commit one step. With inline_queue, the commit may also claim one
    new downstream step on that queue for this worker; it is returned to be run next."""
    claim = claim_step(step_id, worker)
    if isinstance(claim, Overdue):
        expire_run(claim.run)
        return None
    if claim is None:
        return None
    return run_claimed(claim, inline_queue=inline_queue)


def run_claimed(claim: Claimed, *, inline_queue: str | None) -> Claimed | None:
    step_id = claim.step.id
    KEEPER.hold(step_id, claim.token)
    try:
        result = run_operator(claim)
        return commit_step(claim, result, inline_queue=inline_queue)
    except StepDeadlinePassed:
        end_running_step(claim, StepStatus.SKIPPED, skip_reason=DEADLINE, failed=True)
    except DeadlinePassed:
        expire_run(claim.run)  # first, so the run ends failed rather than succeeded
        end_running_step(claim, StepStatus.SKIPPED, skip_reason=DEADLINE)
    except BudgetExceeded as exc:
        exceed_budget(claim.run, str(exc))
        end_running_step(claim, StepStatus.SKIPPED, skip_reason=BUDGET_SKIP)
    except StepCancelled as exc:
        end_running_step(claim, StepStatus.SKIPPED, skip_reason=f"{exc} while running")
    except LeaseLost:
        logger.warning("step %s: lease lost to another worker; its results are dropped", step_id)
        record_orphan_usage(claim)
    except Deferred as exc:
        defer_step(claim, str(exc), exc.wait_s)
    except PermanentError as exc:
        fail_attempt(claim, str(exc), permanent=True)
    except RetrySoon as exc:
        logger.info("step %s (%s): %s", step_id, claim.node["id"], exc)
        fail_attempt(claim, str(exc), permanent=False, delay_s=exc.retry_in_s)
    except Exception as exc:
        logger.exception("step %s (%s) failed", step_id, claim.node["id"])
        fail_attempt(claim, f"{type(exc).__name__}: {exc}", permanent=False)
    finally:
        KEEPER.release(step_id)
    return None


def claim_step(step_id: UUID, worker: str) -> Claimed | Overdue | None:
    with transaction.atomic():
        # SKIP LOCKED: if another worker is claiming this step right now, leave it to them.
        step = (
            Step.objects.select_for_update(skip_locked=True)
            .filter(id=step_id, status__in=CLAIMABLE_STEP_STATUSES)
            .first()
        )
        now = timezone.now()
        if step is None or (step.not_before is not None and step.not_before > now):
            return None  # done, leased, or a retry not yet due (its own message will come)
        run = Run.objects.defer("input").get(id=step.run_id)
        if not run.is_active:
            _skip(step, run, f"run {run.status}")
            return None
        if run.deadline is not None and run.deadline <= now:
            return Overdue(run)
        if step.deadline is not None and step.deadline <= now:
            _skip(step, run, DEADLINE, failed=True)
            return None
        token = uuid4()
        # The row is locked, so its attempt count cannot move under us.
        changes = {
            "attempt": step.attempt + 1,
            "lease_until": lease_until(),
            "lease_token": token,
            "worker": worker,
            "started_at": now,
            "not_before": None,
            "waiting": "",
        }
        if not transition_step(step, from_=(step.status,), to=StepStatus.RUNNING, **changes):
            return None
        for field, value in {**changes, "status": StepStatus.RUNNING}.items():
            setattr(step, field, value)
        if run.status == RunStatus.QUEUED:
            transition_run(run, from_=(RunStatus.QUEUED,), to=RunStatus.RUNNING, started_at=now)
    return Claimed(step, run, run.nodes[step.node_id], token, time.monotonic())


def _skip(step: Step, run: Run, reason: str, *, failed: bool = False) -> None:
    transition_step(
        step,
        from_=(step.status,),
        to=StepStatus.SKIPPED,
        skip_reason=reason,
        finished_at=timezone.now(),
    )
    send_on_commit(settle(step, run, Routing(), failed=failed))


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
        status, deadline = (
            Run.objects.filter(id=claim.run.id).values_list("status", "deadline").get()
        )
        if status not in ACTIVE_RUN_STATUSES:
            raise StepCancelled(f"run {status}")
        if deadline is not None and deadline <= timezone.now():
            raise DeadlinePassed("deadline passed")


def run_operator(claim: Claimed) -> StepResult:
    step, node = claim.step, claim.node
    events = claim.events
    if events is None:
        # Kept on the claim: the commit reads the inputs' key from them.
        events = claim.events = list(Event.objects.filter(id__in=step.inputs))
    by_id = {event.id: event for event in events}
    collected = claim.node.get("config", {}).get("by") if claim.node["type"] == "collect" else None
    inputs = [
        InputEvent(str(e.id), e.payload, item_order(e.scopes, collected))
        for e in (by_id[i] for i in claim.step.inputs)
    ]
    heartbeat = Heartbeat(claim)
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
    ctx = StepContext(
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
        failures=tuple(collect_failures(step)) if operator.is_collect else (),
        **inference,
    )
    heartbeat()  # a step already past its deadline does not start
    started = time.monotonic()
    try:
        return operator.run(ctx, inputs)
    finally:
        claim.operator_ms = (time.monotonic() - started) * 1000


def start_generation(claim: Claimed, spec: ModelSpec, request: GenerationRequest) -> Generation:
    """Starts a generation owned by this step, where every stop signal can reach it: the
    control channel, the watchdog, and timers for the step's and the run's deadlines."""
    LISTENER.ensure_running()
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
    status, finished_at = Run.objects.values_list("status", "finished_at").get(id=run.id)
    if status not in (RunStatus.QUEUED, RunStatus.RUNNING):
        at = finished_at.timestamp() if finished_at else time.time()
        generation.stop(StopSignal(STOP_SIGNALS.get(status, status), at))
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


def _lock_own_step(claim: Claimed) -> Step:
    """Locks the step, proves this worker still holds its lease, and refreshes the run's
    status (one query: the commit path is hot)."""
    step = (
        Step.objects.select_for_update(of=("self",))
        .annotate(run_status=F("run__status"))
        .get(id=claim.step.id)
    )
    if step.status != StepStatus.RUNNING or step.lease_token != claim.token:
        raise LeaseLost(str(step.id))
    claim.run.status = step.run_status
    return step


def commit_step(
    claim: Claimed, result: StepResult, *, inline_queue: str | None = None
) -> Claimed | None:
    """One transaction: outputs, downstream steps, fan-in and run counters, and `done`.
    Returns the downstream step it claimed for this worker to run next, if any."""
    operator = REGISTRY[claim.node["type"]]
    with transaction.atomic():
        step = _lock_own_step(claim)
        run = claim.run
        if not run.is_active:
            skip_reason = f"run {run.status} while running"
            _end(step, run, claim, StepStatus.SKIPPED, skip_reason=skip_reason)
            return None
        events = write_outputs(
            step, run, result, opens_scope=operator.opens_scope, key=shared_key(claim.events)
        )
        routing = Routing()
        if operator.opens_scope:
            open_fanin(step, run, routing)
        routing.route(step, run, events)
        inline = _claim_inline(routing, run, step.worker, inline_queue)
        if inline is not None:
            inline.events = [e for e in events if e.id in inline.step.inputs]
        messages = _end(
            step, run, claim, StepStatus.DONE, routing=routing, operator_ms=claim.operator_ms
        )
        # The inline step needs no message: if this worker dies before finishing it, its
        # lease expires and the sweeper sends one.
        send_on_commit([m for m in messages if inline is None or m.step_id != inline.step.id])
    return inline


def _claim_inline(routing: Routing, run: Run, worker: str, queue: str | None) -> Claimed | None:
    """DESIGN "A step's life" step 4, the fast path: a new step on this worker's own queue
    is created already leased to this worker, skipping a broker round trip and a claim."""
    if queue is None or (run.deadline is not None and run.deadline <= timezone.now()):
        return None
    step = next((s for s in routing.steps if s.queue == queue), None)
    if step is None:
        return None
    token = uuid4()
    step.status, step.attempt, step.worker = StepStatus.RUNNING, 1, worker
    step.lease_until, step.lease_token, step.started_at = lease_until(), token, timezone.now()
    return Claimed(step, run, run.nodes[step.node_id], token, time.monotonic())


def _end(
    step: Step,
    run: Run,
    claim: Claimed,
    to: str,
    *,
    routing: Routing | None = None,
    failed: bool = False,
    **fields: Any,
) -> list[StepMessage]:
    """Move a running step this worker holds to a final status and settle the run."""
    if claim.usage is not None:
        fields.update(record_usage(step.id, run, claim.usage))
    moved = transition_step(
        step,
        from_=(StepStatus.RUNNING,),
        to=to,
        holding_lease=claim.token,
        lease_until=None,
        finished_at=timezone.now(),
        duration_ms=(time.monotonic() - claim.started) * 1000,
        **fields,
    )
    if not moved:
        raise LeaseLost(str(step.id))
    return settle(step, run, routing or Routing(), failed=failed)


def end_running_step(claim: Claimed, to: str, *, failed: bool = False, **fields: Any) -> None:
    try:
        with transaction.atomic():
            step = _lock_own_step(claim)
            send_on_commit(_end(step, claim.run, claim, to, failed=failed, **fields))
    except LeaseLost:
        logger.warning("step %s: lease lost before it could be closed", claim.step.id)
        record_orphan_usage(claim)


def record_orphan_usage(claim: Claimed) -> None:
    """An attempt that lost its lease commits nothing, but what it generated was paid for."""
    if claim.usage is not None:
        with transaction.atomic():
            record_usage(claim.step.id, claim.run, claim.usage, on_step=False)


def defer_step(claim: Claimed, reason: str, wait_s: float) -> None:
    """Back to the queue for `wait_s`, as if this attempt had not been claimed: flow control
    found no model that can serve it now. The reason shows on the step while it waits."""
    now = timezone.now()
    with transaction.atomic():
        moved = transition_step(
            claim.step,
            from_=(StepStatus.RUNNING,),
            to=StepStatus.QUEUED,
            holding_lease=claim.token,
            attempt=claim.step.attempt - 1,
            lease_until=None,
            not_before=now + timedelta(seconds=wait_s),
            enqueued_at=now,
            waiting=reason,
        )
        if moved:
            send_on_commit(
                [StepMessage(claim.run.tenant_id, claim.step.id, claim.step.queue, wait_s)]
            )
        else:
            logger.warning("step %s: lease lost before it could wait", claim.step.id)


def fail_attempt(
    claim: Claimed, error: str, *, permanent: bool, delay_s: float | None = None
) -> None:
    """Dead-letter the step after a permanent error, its last attempt, or when the run's
    retry budget is spent; else retry later: after `delay_s` when given, else with the
    node's backoff and jitter."""
    attempt, most = claim.step.attempt, claim.step.max_attempts
    dead = give_up_reason(
        claim.run.id, claim.run.tenant_id, attempt, most, error, permanent=permanent
    )
    if dead is not None:
        end_running_step(
            claim, StepStatus.DEAD, error=dead, failed=True, operator_ms=claim.operator_ms
        )
        return
    delay = retry_delay_s(claim.node, attempt) if delay_s is None else delay_s
    now = timezone.now()
    with transaction.atomic():
        usage = record_usage(claim.step.id, claim.run, claim.usage) if claim.usage else {}
        moved = transition_step(
            claim.step,
            from_=(StepStatus.RUNNING,),
            to=StepStatus.FAILED,
            holding_lease=claim.token,
            lease_until=None,
            error=f"attempt {attempt}/{most}: {error}",
            not_before=now + timedelta(seconds=delay),
            enqueued_at=now,
            **usage,
        )
        if moved:
            send_on_commit(
                [StepMessage(claim.run.tenant_id, claim.step.id, claim.step.queue, delay)]
            )
