"""The safety net behind "PostgreSQL is the truth": Celery messages and workers can be lost;
every few seconds beat runs this to find steps whose lease expired (worker died) or whose
message went missing, and runs past their deadline."""

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.runs.engine import store
from apps.runs.engine.outbox import RECOVERY_PRIORITY, StepMessage, send_now, send_on_commit
from apps.runs.engine.retries import dead_or_retry
from apps.runs.engine.settle import Routing, settle
from apps.runs.engine.states import attempt_label
from apps.runs.engine.stop import expire_run
from apps.runs.models import (
    ACTIVE_RUN_STATUSES,
    CLAIMABLE_STEP_STATUSES,
    Run,
    Step,
    StepStatus,
)
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from sluice.celery import app

logger = logging.getLogger(__name__)
BATCH = 500


def sweep() -> dict[str, int]:
    """One pass over all tenants. Uses the unscoped managers to find work, then does each
    piece inside its tenant's context."""
    return {
        "expired_leases": _expired_leases(),
        "lost_messages": _lost_messages(),
        "overdue_runs": _overdue_runs(),
    }


def _expired_leases() -> int:
    expired = Step.unscoped_all_tenants.filter(
        status=StepStatus.RUNNING, lease_until__lt=timezone.now()
    ).values_list("tenant_id", "id")[:BATCH]
    tenants: dict[int, Tenant] = {}
    count = 0
    for tenant_id, step_id in expired:
        if tenant_id not in tenants:
            tenants[tenant_id] = Tenant.objects.get(id=tenant_id)
        with tenant_context(tenants[tenant_id]):
            count += release_expired_lease(step_id)
    return count


def release_expired_lease(step_id: UUID) -> int:
    """The worker holding this step is gone: try again elsewhere, or dead-letter it."""
    with transaction.atomic():
        step = store.lock_expired_step(step_id, timezone.now())
        if step is None:
            return 0
        run = Run.objects.defer("input").get(id=step.run_id)
        lost = f"worker {step.worker} lost (lease expired)"
        logger.warning("step %s: attempt %s: %s", step.id, step.attempt, lost)
        if not run.is_active:  # stopped meanwhile: nothing to run again
            store.transition_step(
                step,
                from_=(StepStatus.RUNNING,),
                to=StepStatus.SKIPPED,
                skip_reason=f"run {run.status}; {lost}",
                lease_until=None,
                finished_at=timezone.now(),
            )
            send_on_commit(settle(step, run, Routing()))
            return 1
        dead = dead_or_retry(run, step.attempt, step.max_attempts, lost, permanent=False)
        if dead is not None:
            store.transition_step(
                step,
                from_=(StepStatus.RUNNING,),
                to=StepStatus.DEAD,
                error=dead,
                lease_until=None,
                finished_at=timezone.now(),
            )
            send_on_commit(settle(step, run, Routing(), failed=True))
            return 1
        store.transition_step(
            step,
            from_=(StepStatus.RUNNING,),
            to=StepStatus.QUEUED,
            error=attempt_label(step.attempt, step.max_attempts, lost),
            lease_until=None,
            lease_token=None,
            enqueued_at=timezone.now(),
        )
        send_on_commit(
            [StepMessage(step.tenant_id, step.id, step.queue, priority=RECOVERY_PRIORITY)]
        )
    return 1


def _lost_messages() -> int:
    """Queued steps nobody picked up for a while get a fresh message, but only from queues
    the broker says are drained: a step behind a long backlog is waiting, not lost. A
    duplicate message is harmless anyway, because claiming is conditional."""
    now = timezone.now()
    stale = Step.unscoped_all_tenants.filter(
        status__in=CLAIMABLE_STEP_STATUSES,
        enqueued_at__lt=now - timedelta(seconds=settings.SLUICE_REQUEUE_AFTER_S),
    ).exclude(not_before__gt=now)
    candidates = list(stale.values_list("tenant_id", "id", "queue")[:BATCH])
    drained = {queue for queue in {c[2] for c in candidates} if broker_queue_depth(queue) == 0}
    resent = [c for c in candidates if c[2] in drained]
    for tenant_id, step_id, queue in resent:
        send_now(StepMessage(tenant_id, step_id, queue, priority=RECOVERY_PRIORITY))
    store.mark_resent([r[1] for r in resent], now)
    return len(resent)


def broker_queue_depth(queue: str) -> int:
    """Messages waiting in the broker's queue (not counting those workers hold)."""
    with app.connection_for_read() as connection:
        try:
            channel: Any = connection.default_channel
            declared = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            return 0  # Redis keeps no key for an empty queue: "not found" means drained
        return int(declared.message_count)


def _overdue_runs() -> int:
    overdue = Run.unscoped_all_tenants.select_related("tenant").filter(
        status__in=ACTIVE_RUN_STATUSES, deadline__lt=timezone.now()
    )[:BATCH]
    count = 0
    for run in overdue:
        with tenant_context(run.tenant):
            count += expire_run(run)
    return count
