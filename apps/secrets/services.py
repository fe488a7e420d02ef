"""Writes to tenant secrets (each one transaction with its audit row, which names the secret
and never holds its value). The reads live in access.py and are re-exported here."""

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from apps.audit.services import Actor, record
from apps.secrets.access import SecretMissing, secret_value
from apps.secrets.crypto import SecretUnreadable, encrypt
from apps.secrets.models import Secret
from workers.secret_names import name_problem

MAX_VALUE_CHARS = 8192

__all__ = [
    "SecretInvalid",
    "SecretMissing",
    "SecretUnreadable",
    "create_secret",
    "delete_secret",
    "replace_secret_value",
    "secret_value",
]


class SecretInvalid(ValueError):
    """Refused input; `field` says which ("name" or "value"), the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_value(value: str) -> str:
    """The value as stored: surrounding whitespace (a pasted newline) removed."""
    value = value.strip()
    if not value:
        raise SecretInvalid("value", "A value is required.")
    if len(value) > MAX_VALUE_CHARS:
        raise SecretInvalid("value", f"The value is over {MAX_VALUE_CHARS} characters.")
    if not value.isprintable():
        raise SecretInvalid("value", "The value must be one line, without control characters.")
    return value


def create_secret(*, name: str, value: str, actor: Actor) -> Secret:
    problem = name_problem(name)
    if problem:
        raise SecretInvalid("name", problem)
    value = check_value(value)
    taken = SecretInvalid(
        "name", f"A secret named {name!r} already exists; replace its value instead."
    )
    if Secret.objects.filter(name=name).exists():
        raise taken
    try:
        with transaction.atomic():
            secret = Secret.objects.create(
                name=name,
                ciphertext=encrypt(value),
                created_by=actor if isinstance(actor, AbstractBaseUser) else None,
            )
            record(
                tenant=secret.tenant,
                actor=actor,
                action="secret.create",
                target_type="secret",
                target_id=secret.pk,
                after={"name": name},
            )
    except IntegrityError:  # created by someone else since the check above
        raise taken from None
    return secret


def replace_secret_value(secret: Secret, *, value: str, actor: Actor) -> Secret:
    """Rotates the value; graphs referencing the name use the new one from their next call."""
    value = check_value(value)
    with transaction.atomic():
        secret = Secret.objects.select_for_update().get(pk=secret.pk)
        secret.ciphertext = encrypt(value)
        secret.save(update_fields=["ciphertext", "updated_at"])
        record(
            tenant=secret.tenant,
            actor=actor,
            action="secret.rotate",
            target_type="secret",
            target_id=secret.pk,
            after={"name": secret.name},
        )
    return secret


def delete_secret(secret: Secret, *, actor: Actor) -> None:
    with transaction.atomic():
        record(
            tenant=secret.tenant,
            actor=actor,
            action="secret.delete",
            target_type="secret",
            target_id=secret.pk,
            before={"name": secret.name},
        )
        Secret.objects.filter(pk=secret.pk).delete()
