"""Celery tasks: the top layer. Thin wrappers that look the tenant up, enter its context and
hand over to the engine or a service. Lower layers send these by name (engine.outbox), so
the names are the contract with messages already queued: never rename one."""

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec
from uuid import UUID

from celery import Task, shared_task
from django.utils import timezone

from apps.api import webhooks
from apps.live import retention, viewers
from apps.runs import engine
from apps.runs.engine import outbox
from apps.streams import schedules
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant

logger = logging.getLogger(__name__)

P = ParamSpec("P")


# A worker runs a fan-out's thousands of item steps one message each: looking their tenant
# up once a second instead of once a message saves a query per step. A step already holds
# its tenant for as long as it runs, so settings changed meanwhile reach a new step this
# much later at most.
TENANT_FRESH_S = 1.0
_tenants: dict[int, tuple[float, Tenant | None]] = {}


def _tenant(tenant_id: int) -> Tenant | None:
    now = time.monotonic()
    cached = _tenants.get(tenant_id)
    if cached is not None and now - cached[0] < TENANT_FRESH_S:
        return cached[1]
    tenant = Tenant.objects.filter(id=tenant_id).first()
    _tenants[tenant_id] = (now, tenant)
    return tenant


def tenant_task(work: Callable[P, None]) -> Callable[Concatenate[int, P], None]:
    """The task's first argument is a tenant id: the tenant is looked up, the message dropped
    with a warning if the tenant is gone, and the work done in the tenant's context."""

    @functools.wraps(work)
    def wrapper(tenant_id: int, *args: P.args, **kwargs: P.kwargs) -> None:
        tenant = _tenant(tenant_id)
        if tenant is None:
            logger.warning(
                "%s%r: tenant %s no longer exists; message dropped",
                work.__name__,
                args,
                tenant_id,
            )
            return
        with tenant_context(tenant):
            work(*args, **kwargs)

    return wrapper


@shared_task(bind=True, name=outbox.EXECUTE_STEP, acks_late=True, ignore_result=True)
def execute_step(self: Task, tenant_id: int, step_id: str) -> None:
    worker = self.request.hostname or "unknown"
    own_queue = (self.request.delivery_info or {}).get("routing_key")
    _execute_step(tenant_id, step_id, worker, own_queue)


@tenant_task
def _execute_step(step_id: str, worker: str, own_queue: str | None) -> None:
    engine.execute(UUID(step_id), worker, own_queue=own_queue)


@shared_task(name=webhooks.DELIVER_JOB_WEBHOOK, acks_late=True, ignore_result=True)
@tenant_task
def deliver_job_webhook(job_id: str) -> None:
    """One attempt at a batch job's completion webhook; sent on the cpu queue by the sweep."""
    webhooks.deliver(UUID(job_id))


@shared_task(name=outbox.SEND_STEP_MESSAGES, acks_late=True, ignore_result=True)
def send_step_messages(tenant_id: int, steps: list[list[str]]) -> None:
    """Sends the step messages a bulk intake handed off ([[step id, queue], ...])."""
    outbox.send_all(tenant_id, steps)


@shared_task(name="sluice.sweep", ignore_result=True)
def sweep() -> None:
    found: dict[str, Any] = engine.sweep()
    # Runs with on_disconnect: cancel whose last viewer left more than the grace period ago.
    found["abandoned_runs"] = viewers.cancel_abandoned_runs()
    found["job_webhooks"] = webhooks.enqueue_due()
    # Frames of runs finished longer ago than their tenant's retention; a pass at most every
    # minute while there is nothing to prune (retention.prune_when_due).
    found["pruned_frames"] = retention.prune_when_due()
    if any(found.values()):
        logger.info("sweeper: %s", found)


@shared_task(name=schedules.FIRE_SCHEDULES, ignore_result=True)
def fire_schedules() -> None:
    """Fires the schedule deployments' due ticks; sent by beat on the control queue."""
    fired = schedules.fire_due_ticks(timezone.now())
    if fired:
        logger.info("schedules: %s tick(s) fired", fired)
