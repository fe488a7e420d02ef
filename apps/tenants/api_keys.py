"""Writes for API keys: create (the secret is returned once and only its hash is kept) and
revoke, each with its audit entry in the same transaction; only the key's prefix and name
reach the audit log."""

from collections.abc import Iterable, Sequence

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from apps.audit.services import Actor, record
from apps.tenants.keys import SCOPES
from apps.tenants.models import ApiKey, Tenant, hash_api_secret
from apps.tenants.services import FieldErrors, Refused, refuse

KEY_NAME_MAX = 100


def api_key_errors(*, name: str, scopes: Sequence[str]) -> FieldErrors:
    errors: FieldErrors = {}
    if not name.strip():
        errors["name"] = ["Give the key a name, e.g. where it is used."]
    elif len(name.strip()) > KEY_NAME_MAX:
        errors["name"] = [f"Use at most {KEY_NAME_MAX} characters."]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        errors["scopes"] = [f"Unknown scope: {', '.join(unknown)}."]
    elif not scopes:
        errors["scopes"] = ["Choose at least one scope."]
    return errors


def create_api_key(
    *, tenant: Tenant, name: str, scopes: Iterable[str], actor: Actor
) -> tuple[ApiKey, str]:
    """Returns the key row and the full secret, which is not stored and cannot be shown again."""
    chosen = list(scopes)
    errors = api_key_errors(name=name, scopes=chosen)
    if errors:
        raise Refused(errors)
    name = name.strip()
    ordered = [scope for scope in SCOPES if scope in chosen]
    prefix, secret = ApiKey.new_secret()
    with transaction.atomic():
        key = ApiKey.unscoped_all_tenants.create(
            tenant=tenant,
            name=name,
            prefix=prefix,
            hashed_secret=hash_api_secret(secret),
            scopes=ordered,
            created_by=actor if isinstance(actor, AbstractBaseUser) else None,
        )
        record(
            tenant=tenant,
            actor=actor,
            action="api_key.create",
            target_type="api_key",
            target_id=key.pk,
            after={"name": name, "prefix": prefix, "scopes": ordered},
        )
    return key, secret


def revoke_api_key(*, key: ApiKey, actor: Actor) -> None:
    with transaction.atomic():
        current = ApiKey.unscoped_all_tenants.select_for_update().get(pk=key.pk)
        if current.revoked_at is not None:
            refuse(None, f"The key “{current.name}” was revoked already.")
        current.revoked_at = timezone.now()
        current.save(update_fields=["revoked_at"])
        record(
            tenant=current.tenant,
            actor=actor,
            action="api_key.revoke",
            target_type="api_key",
            target_id=current.pk,
            before={"name": current.name, "prefix": current.prefix, "revoked_at": None},
            after={
                "name": current.name,
                "prefix": current.prefix,
                "revoked_at": current.revoked_at.isoformat(),
            },
        )
    key.revoked_at = current.revoked_at
