"""Writes for tenants, memberships and API keys. Each writes its audit row in the same
transaction."""

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from apps.audit.services import Actor, record
from apps.tenants.models import ApiKey, Membership, Role, Tenant, hash_api_secret


def create_tenant(*, slug: str, name: str, actor: Actor) -> Tenant:
    with transaction.atomic():
        tenant = Tenant.objects.create(slug=slug, name=name)
        record(
            tenant=tenant,
            actor=actor,
            action="tenant.create",
            target_type="tenant",
            target_id=tenant.pk,
            after={"slug": slug, "name": name},
        )
    return tenant


def add_member(*, tenant: Tenant, user: AbstractBaseUser, role: Role, actor: Actor) -> Membership:
    with transaction.atomic():
        membership = Membership.unscoped_all_tenants.create(tenant=tenant, user=user, role=role)
        record(
            tenant=tenant,
            actor=actor,
            action="membership.add",
            target_type="membership",
            target_id=membership.pk,
            after={"user": user.get_username(), "role": role.value},
        )
    return membership


def create_api_key(
    *, tenant: Tenant, name: str, scopes: list[str], actor: Actor
) -> tuple[ApiKey, str]:
    """Returns the key row and the full secret, which is not stored and cannot be shown again."""
    prefix, secret = ApiKey.new_secret()
    with transaction.atomic():
        key = ApiKey.unscoped_all_tenants.create(
            tenant=tenant,
            name=name,
            prefix=prefix,
            hashed_secret=hash_api_secret(secret),
            scopes=scopes,
            created_by=actor if isinstance(actor, AbstractBaseUser) else None,
        )
        record(
            tenant=tenant,
            actor=actor,
            action="api_key.create",
            target_type="api_key",
            target_id=key.pk,
            after={"name": name, "prefix": prefix, "scopes": scopes},
        )
    return key, secret
