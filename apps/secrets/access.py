"""Tenant-checked reads. Missing and not-yours look the same: 404 on a page, SecretMissing
to a step. `secret_value` is the one way a step reads a value (through its StepContext)."""

from django.shortcuts import get_object_or_404

from apps.secrets.crypto import decrypt
from apps.secrets.models import Secret


def secret_by_name(name: str) -> Secret:
    return get_object_or_404(Secret.objects.select_related("created_by"), name=name)


class SecretMissing(LookupError):
    """No secret of that name in the current tenant."""


def secret_value(name: str) -> str:
    """The plaintext of the current tenant's secret `name` (fails closed with no tenant).
    Raises SecretMissing or SecretUnreadable, whose messages name the secret, not the value."""
    token = Secret.objects.filter(name=name).values_list("ciphertext", flat=True).first()
    if token is None:
        raise SecretMissing(
            f"secret {name!r} does not exist in this tenant; an owner can add it on the"
            " Secrets page"
        )
    return decrypt(token, name=name)
