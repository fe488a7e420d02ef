"""Tenant-checked reads. Missing and not-yours look the same: 404."""

from django.shortcuts import get_object_or_404

from apps.secrets.models import Secret


def secret_by_name(name: str) -> Secret:
    return get_object_or_404(Secret.objects.select_related("created_by"), name=name)
