"""Ending a drain: a draining Kafka deployment stops once every partition it reads is read
to its end. Called by Kafka workers while idle; the first to see the end stops it."""

from uuid import UUID

from django.db import transaction

from apps.audit.services import Actor, record
from apps.runs import engine
from apps.streams.models import Deployment, DeploymentStatus, KeyedState, PartitionOffset
from workers.operators import REGISTRY
from workers.operators.windows import WindowOperator


def finish_drain(deployment_id: UUID, tenant_id: int) -> bool:
    """True when this call stopped the deployment."""
    with transaction.atomic():
        deployment = (
            Deployment.unscoped_all_tenants.select_for_update()
            .select_related("tenant", "run", "version")
            .filter(id=deployment_id, tenant_id=tenant_id)
            .first()
        )
        if deployment is None or deployment.status != DeploymentStatus.DRAINING:
            return False
        offsets = PartitionOffset.unscoped_all_tenants.filter(deployment_id=deployment_id)
        behind = [o for o in offsets if o.next_offset < o.high_watermark]
        if behind or not offsets or _windows_open(deployment):
            return False
        stop_deployment(deployment, actor=None, action="deployment.drained")
    return True


def _windows_open(deployment: Deployment) -> bool:
    """Windows not fired yet: the workers holding their partitions close them first."""
    windows = [
        node["id"]
        for node in deployment.version.spec["nodes"]
        if isinstance(REGISTRY.get(node["type"]), WindowOperator)
    ]
    return bool(windows) and (
        KeyedState.unscoped_all_tenants.filter(deployment=deployment, owner__in=windows).exists()
    )


def stop_deployment(deployment: Deployment, *, actor: Actor, action: str) -> None:
    """Stopped: no more records are taken, and the stream run finishes once its steps
    settle. In the caller's transaction, with the deployment's row locked."""
    before = deployment.status
    deployment.status = DeploymentStatus.STOPPED
    deployment.save(update_fields=["status", "updated_at"])
    release_run(deployment)
    record(
        tenant=deployment.tenant,
        actor=actor,
        action=action,
        target_type="deployment",
        target_id=deployment.id,
        before={"status": before},
        after={"status": DeploymentStatus.STOPPED.value},
    )


def release_run(deployment: Deployment) -> None:
    """The deployment's stream run takes no more events: it gives up its hold (once: the
    callers move the deployment off that run, or to stopped, in the same transaction)."""
    engine.release_hold(deployment.run)
