"""A step's life on a worker (DESIGN "A step's life"): claim with a lease, run the operator
outside any transaction, then commit outputs, downstream steps and `done` in one
transaction that first proves this worker still holds the lease. A worker that lost its
lease commits nothing, so a step's outputs exist once however often it is attempted."""

import logging
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

from django.db import transaction
from django.utils import timezone

from apps.runs.engine import chains, store
from apps.runs.engine.chains import Link
from apps.runs.engine.context import Claimed, Heartbeat, input_events, step_context
from apps.runs.engine.leases import KEEPER, lease_until
from apps.runs.engine.outbox import StepMessage, send_on_commit
from apps.runs.engine.outputs import record_usage, save_outputs
from apps.runs.engine.retries import dead_or_retry
from apps.runs.engine.settle import Routing, open_fanin, settle
from apps.runs.engine.states import BUDGET_SKIP, DEADLINE, attempt_label, retry_delay_s
from apps.runs.engine.stop import exceed_budget, expire_run
from apps.runs.models import Run, RunStatus, Step, StepStatus
from apps.tenants.context import current_tenant
from workers.operators import REGISTRY
from workers.operators.base import (
    BudgetExceeded,
    DeadlinePassed,
    Deferred,
    LeaseLost,
    PermanentError,
    RetrySoon,
    StepCancelled,
    StepDeadlinePassed,
    StepResult,
)

logger = logging.getLogger(__name__)

# Fast path (DESIGN step 4): a worker runs a downstream step on its own queue right away
# instead of waiting for the broker, at most this many in a row; then others get a turn.
MAX_INLINE_STEPS = 50


def execute(step_id: UUID, worker: str, *, own_queue: str | None) -> None:
    """Claim, run and commit one step, then the downstream steps on this worker's own queue
    that its commit claimed for it, one after another."""
    claim = claim_step(step_id, worker)
    for inline in range(1, MAX_INLINE_STEPS + 1):
        if claim is None:
            return
        # The last inline step claims nothing further: others get a turn on this slot.
        claim = run_claimed(claim, inline_queue=own_queue if inline < MAX_INLINE_STEPS else None)


def run_claimed(claim: Claimed, *, inline_queue: str | None) -> Claimed | None:
    """Runs a claimed step, and the chain of cheap steps after it (chains.py), and ends them
    however they go; returns the downstream step the commit leased to this worker (on
    `inline_queue`) for it to run next, if any."""
    KEEPER.hold(claim.step.id, claim.token)
    try:
        chain, broken = run_chain(claim, inline_queue)
        following = commit_chain(chain, broken, inline_queue=inline_queue)
    except Exception as exc:
        end_after_error(claim, exc)
        return None
    finally:
        KEEPER.release(claim.step.id)
    if broken is None or following is not broken[0]:
        return following
    # A chained step failed: the chain before it is committed, and the step itself was
    # written leased to this worker, so it fails (or retries) like any other step.
    failed, error = broken
    KEEPER.hold(failed.step.id, failed.token)
    try:
        end_after_error(failed, error)
    finally:
        KEEPER.release(failed.step.id)
    return None


Broken = tuple[Claimed, Exception]


def run_chain(first: Claimed, own_queue: str | None) -> tuple[list[Link], Broken | None]:
    """Runs the claimed step's operator, then the cheap steps it feeds on this worker's
    queue, one after another. A failure of the first step raises; a later step's failure
    ends the chain before it and is returned with the step."""
    started = time.monotonic()
    chain = [chains.plan(first, run_operator(first))]
    while (following := chains.next_step(chain, own_queue, started)) is not None:
        try:
            chain.append(chains.plan(following, run_operator(following)))
        except Exception as exc:
            return chain, (following, exc)
    return chain, None


def end_after_error(claim: Claimed, error: Exception) -> None:
    """Ends a step whose operator (or commit) raised, by what was raised."""
    step_id = claim.step.id
    try:
        raise error
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


def claim_step(step_id: UUID, worker: str) -> Claimed | None:
    """Leases the step to this worker, after checking its run and deadlines. A step whose
    run has ended or whose deadline passed is skipped instead; an overdue run expires."""
    token, now = uuid4(), timezone.now()
    tenant_id = current_tenant().id
    claimed = store.claim_at_once(
        step_id, tenant_id, token=token, worker=worker, now=now, until=lease_until()
    )
    if claimed is not None:
        step, run, events = claimed
        claim = Claimed(step, run, run.nodes[step.node_id], token, time.monotonic())
        claim.events = events
        return claim
    return _claim_or_skip(step_id, worker)


def _claim_or_skip(step_id: UUID, worker: str) -> Claimed | None:
    """The general claim, for the cases the one-statement claim leaves: a step already
    taken or not yet due is left alone, one whose run ended or deadline passed is skipped,
    an overdue run expires, and a step that became claimable meanwhile is claimed."""
    overdue = None
    with transaction.atomic():
        step = store.lock_claimable_step(step_id)
        now = timezone.now()
        if step is None or (step.not_before is not None and step.not_before > now):
            return None  # done, leased, or a retry not yet due (its own message will come)
        run = Run.objects.defer("input").get(id=step.run_id)
        if not run.is_active:
            _skip(step, run, f"run {run.status}")
            return None
        if run.deadline is not None and run.deadline <= now:
            overdue = run
        elif step.deadline is not None and step.deadline <= now:
            _skip(step, run, DEADLINE, failed=True)
            return None
        else:
            token = uuid4()
            # The row is locked, so its attempt count cannot move under us.
            changes: dict[str, Any] = {
                "attempt": step.attempt + 1,
                "lease_until": lease_until(),
                "lease_token": token,
                "worker": worker,
                "started_at": now,
                "not_before": None,
                "waiting": "",
            }
            if not store.transition_step(
                step, from_=(step.status,), to=StepStatus.RUNNING, **changes
            ):
                return None
            for field, value in {**changes, "status": StepStatus.RUNNING}.items():
                setattr(step, field, value)
            if run.status == RunStatus.QUEUED and store.transition_run(
                run, from_=(RunStatus.QUEUED,), to=RunStatus.RUNNING, started_at=now
            ):
                run.status = RunStatus.RUNNING
            return Claimed(step, run, run.nodes[step.node_id], token, time.monotonic())
    if overdue is not None:
        expire_run(overdue)  # its own transaction: it skips this step too
    return None


def _skip(step: Step, run: Run, reason: str, *, failed: bool = False) -> None:
    store.transition_step(
        step,
        from_=(step.status,),
        to=StepStatus.SKIPPED,
        skip_reason=reason,
        finished_at=timezone.now(),
    )
    send_on_commit(settle(step, run, Routing(), failed=failed))


def run_operator(claim: Claimed) -> StepResult:
    inputs = input_events(claim)
    heartbeat = Heartbeat(claim)
    ctx = step_context(claim, heartbeat)
    heartbeat()  # a step already past its deadline does not start
    started = time.monotonic()
    try:
        return REGISTRY[claim.node["type"]].run(ctx, inputs)
    finally:
        claim.operator_ms = (time.monotonic() - started) * 1000


def _lock_own_step(claim: Claimed) -> None:
    """Locks the step, proves this worker still holds its lease, and refreshes the run's
    status (one query: the commit path is hot)."""
    status, token, run_status = store.lock_own_step(claim.step.id)
    if status != StepStatus.RUNNING or token != claim.token:
        raise LeaseLost(str(claim.step.id))
    claim.run.status = run_status


def commit_chain(
    chain: list[Link], broken: Broken | None, *, inline_queue: str | None
) -> Claimed | None:
    """One transaction for the whole chain: each step's outputs, the steps they feed, fan-in
    and run counters, and `done`; the first step's lease is proven first. Chained steps are
    written already done. Returns the step written leased to this worker to run next: the
    chain's failed step, else a downstream step on this worker's own queue, if any."""
    first = chain[0].claim
    run = first.run
    for link in chain[1:]:
        chains.mark_done(link.claim)
    following = broken[0] if broken is not None else _inline(chain[-1], run, inline_queue)
    if following is not None:
        chains.mark_leased(following)
    # Chained steps are done, and the following step is this worker's: no message. If the
    # worker dies before finishing that one, its lease expires and the sweeper sends one.
    own = chains.chained_ids(chain) | ({following.step.id} if following else set())
    if broken is None and _commit_at_once(chain, own):
        return following
    with transaction.atomic():
        _lock_own_step(first)
        if not run.is_active:
            _end(first, StepStatus.SKIPPED, skip_reason=f"run {run.status} while running")
            return None
        messages: list[StepMessage] = []
        for index, link in enumerate(chain):
            step = link.claim.step
            save_outputs(step, run, link.events, link.result)
            if link.routing.opened_scope is not None:
                open_fanin(step, run, link.routing)
            if index == 0:
                messages += _end(
                    first, StepStatus.DONE, routing=link.routing, operator_ms=first.operator_ms
                )
            else:
                store.announce_step(step, StepStatus.DONE, {})
                messages += settle(step, run, link.routing)
        send_on_commit([m for m in messages if m.step_id not in own])
    return following


def _commit_at_once(chain: list[Link], own: set[UUID]) -> bool:
    """The common commit as one statement (store.commit_at_once): a chain that writes only
    events and steps, touches at most one fan-out scope without settling it, and recorded
    no usage. False when the chain is not that simple or the statement found its case
    does not hold (the lease lost, the run stopped, the run's last step with failures to
    name): the general path then commits or ends it."""
    first = chain[0].claim
    if first.usage is not None or not first.run.is_active:
        return False
    if any(
        link.routing.opened_scope is not None or link.result.table_rows or link.routing.relays
        for link in chain
    ):
        return False
    scope_move = _scope_move(chain)
    if scope_move is False:
        return False
    new_steps = [step for link in chain for step in link.routing.steps]
    done = {
        "finished_at": timezone.now(),
        "duration_ms": (time.monotonic() - first.started) * 1000,
        "operator_ms": first.operator_ms,
    }
    if not store.commit_at_once(
        first.step,
        first.token,
        first.run,
        done=done,
        events=[event for link in chain for event in link.events],
        new_steps=new_steps,
        # Each step ended takes one off the count; each step written adds one.
        open_delta=len(new_steps) - len(chain),
        scope_move=scope_move,
    ):
        return False
    for link in chain[1:]:
        store.announce_step(link.claim.step, StepStatus.DONE, {})
    send_on_commit([StepMessage(s.tenant_id, s.id, s.queue) for s in new_steps if s.id not in own])
    return True


def _scope_move(chain: list[Link]) -> store.ScopeMove | Literal[False] | None:
    """What the chain does to fan-out scopes, as settle._move_fanins counts it (a step ends
    in its scope, a step it feeds begins there, an output reaches a collect): None when it
    touches none, False when it touches more than one (the general path's work)."""
    pending: dict[UUID, int] = defaultdict(int)
    arrived: dict[UUID, list[UUID]] = defaultdict(list)
    for link in chain:
        if link.claim.step.scope is not None:
            pending[link.claim.step.scope] -= 1
        for child in link.routing.steps:
            if child.scope is not None:
                pending[child.scope] += 1
        for scope, event_ids in link.routing.arrivals.items():
            arrived[scope] += event_ids
    touched = set(pending) | set(arrived)
    if not touched:
        return None
    if len(touched) > 1:
        return False
    (scope,) = touched
    return store.ScopeMove(scope, pending[scope], arrived[scope])


def _inline(link: Link, run: Run, queue: str | None) -> Claimed | None:
    """DESIGN "A step's life" step 4, the fast path: a new step on this worker's own queue
    is written already leased to this worker, skipping a broker round trip and a claim."""
    if queue is None or (run.deadline is not None and run.deadline <= timezone.now()):
        return None
    step = next((s for s in link.routing.steps if s.queue == queue), None)
    if step is None:
        return None
    step.worker = link.claim.step.worker
    claim = Claimed(step, run, run.nodes[step.node_id], uuid4(), time.monotonic())
    claim.events = [e for e in link.events if e.id in step.inputs]
    return claim


def _end(
    claim: Claimed,
    to: str,
    *,
    routing: Routing | None = None,
    failed: bool = False,
    **fields: Any,
) -> list[StepMessage]:
    """Move a running step this worker holds to a final status and settle the run."""
    step, run = claim.step, claim.run
    if claim.usage is not None:
        fields.update(record_usage(step.id, run, claim.usage))
    moved = store.transition_step(
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
            _lock_own_step(claim)
            send_on_commit(_end(claim, to, failed=failed, **fields))
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
        moved = store.transition_step(
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
    node's backoff and jitter. The retry taken and the step's new status commit together."""
    attempt, most = claim.step.attempt, claim.step.max_attempts
    try:
        with transaction.atomic():
            _lock_own_step(claim)
            if not claim.run.is_active:  # stopped meanwhile: nothing to retry for
                send_on_commit(
                    _end(
                        claim,
                        StepStatus.SKIPPED,
                        skip_reason=f"run {claim.run.status} while running",
                    )
                )
                return
            dead = dead_or_retry(claim.run, attempt, most, error, permanent=permanent)
            if dead is not None:
                messages = _end(
                    claim, StepStatus.DEAD, error=dead, failed=True, operator_ms=claim.operator_ms
                )
                send_on_commit(messages)
                return
            delay = retry_delay_s(claim.node, attempt) if delay_s is None else delay_s
            now = timezone.now()
            usage = record_usage(claim.step.id, claim.run, claim.usage) if claim.usage else {}
            store.transition_step(
                claim.step,
                from_=(StepStatus.RUNNING,),
                to=StepStatus.FAILED,
                holding_lease=claim.token,
                lease_until=None,
                error=attempt_label(attempt, most, error),
                not_before=now + timedelta(seconds=delay),
                enqueued_at=now,
                **usage,
            )
            send_on_commit(
                [StepMessage(claim.run.tenant_id, claim.step.id, claim.step.queue, delay)]
            )
    except LeaseLost:
        logger.warning("step %s: lease lost before its failure could be recorded", claim.step.id)
        record_orphan_usage(claim)
