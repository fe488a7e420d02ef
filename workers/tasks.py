"""Celery tasks: thin wrappers that set the tenant and hand over to services."""

import logging
from uuid import UUID

from celery import Task, shared_task

from apps.runs import execution, sweeper
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant

logger = logging.getLogger(__name__)

# Fast path (DESIGN step 4): a worker runs a downstream step on its own queue right away
# instead of waiting for the broker; the step's message still goes out and finds it taken.
MAX_INLINE_STEPS = 50


@shared_task(bind=True, name="sluice.execute_step", acks_late=True, ignore_result=True)
def execute_step(self: Task, tenant_id: int, step_id: str) -> None:
    tenant = Tenant.objects.get(id=tenant_id)
    worker = self.request.hostname or "unknown"
    own_queue = (self.request.delivery_info or {}).get("routing_key")
    with tenant_context(tenant):
        next_id: UUID | None = UUID(step_id)
        for _ in range(MAX_INLINE_STEPS):
            if next_id is None:
                break
            created = execution.execute(next_id, worker)
            next_id = next((m.step_id for m in created if m.queue == own_queue), None)


@shared_task(name="sluice.sweep", ignore_result=True)
def sweep() -> None:
    found = sweeper.sweep()
    if any(found.values()):
        logger.info("sweeper: %s", found)
