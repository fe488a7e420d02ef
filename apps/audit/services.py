"""Writing audit entries. Call inside the same transaction as the change it records."""

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from apps.audit.models import AuditEntry
from apps.tenants.models import Tenant

Actor = AbstractBaseUser | AnonymousUser | str | None


def actor_label(actor: Actor) -> str:
    if actor is None:
        return "system"
    if isinstance(actor, str):
        return actor
    if isinstance(actor, AnonymousUser):
        return "anonymous"
    return actor.get_username()


def record(*, tenant: Tenant, actor: Actor, **fields: Any) -> AuditEntry:
    """Saves an entry (new_entry's fields) for `tenant`, in the caller's transaction."""
    entry = new_entry(tenant_id=tenant.pk, actor=actor, **fields)
    entry.save()
    return entry


def new_entry(
    *,
    tenant_id: int,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: object,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEntry:
    """An entry not yet saved, for a writer that saves it with the change in one statement."""
    return AuditEntry(
        tenant_id=tenant_id,
        actor_id=actor.pk if isinstance(actor, AbstractBaseUser) else None,
        actor_label=actor_label(actor),
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        before=before,
        after=after,
    )
