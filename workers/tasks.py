"""Celery tasks: thin wrappers that set the tenant and hand over to services."""

import logging
from uuid import UUID

from celery import Task, shared_task

from apps.api import webhooks
from apps.live import viewers
from apps.runs import dispatch, execution, sweeper
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant

logger = logging.getLogger(__name__)

# Fast path (DESIGN step 4): a worker runs a downstream step on its own queue right away
# instead of waiting for the broker, at most this many in a row.
MAX_INLINE_STEPS = 50


@shared_task(bind=True, name="sluice.execute_step", acks_late=True, ignore_result=True)
def execute_step(self: Task, tenant_id: int, step_id: str) -> None:
    tenant = Tenant.objects.filter(id=tenant_id).first()
    if tenant is None:
        logger.warning("step %s: tenant %s no longer exists; message dropped", step_id, tenant_id)
        return
    worker = self.request.hostname or "unknown"
    own_queue = (self.request.delivery_info or {}).get("routing_key")
    with tenant_context(tenant):
        claim = execution.execute(UUID(step_id), worker, inline_queue=own_queue)
        for chained in range(1, MAX_INLINE_STEPS + 1):
            if claim is None:
                break
            # The last inline step claims nothing further: others get a turn on this slot.
            next_queue = own_queue if chained < MAX_INLINE_STEPS else None
            claim = execution.run_claimed(claim, inline_queue=next_queue)


@shared_task(name="sluice.deliver_job_webhook", acks_late=True, ignore_result=True)
def deliver_job_webhook(tenant_id: int, job_id: str) -> None:
    """One attempt at a batch job's completion webhook; sent on the cpu queue by the sweep."""
    tenant = Tenant.objects.filter(id=tenant_id).first()
    if tenant is None:
        logger.warning("job %s: tenant %s no longer exists; webhook dropped", job_id, tenant_id)
        return
    with tenant_context(tenant):
        webhooks.deliver(UUID(job_id))


@shared_task(name="sluice.send_step_messages", acks_late=True, ignore_result=True)
def send_step_messages(tenant_id: int, steps: list[list[str]]) -> None:
    """Sends the step messages a bulk intake handed off ([[step id, queue], ...])."""
    dispatch.send_all(tenant_id, steps)


@shared_task(name="sluice.sweep", ignore_result=True)
def sweep() -> None:
    found = sweeper.sweep()
    # Runs with on_disconnect: cancel whose last viewer left more than the grace period ago.
    found["abandoned_runs"] = viewers.cancel_abandoned_runs()
    found["job_webhooks"] = webhooks.enqueue_due()
    if any(found.values()):
        logger.info("sweeper: %s", found)
