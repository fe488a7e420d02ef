"""Choices for config fields whose valid values live outside the schema: the models this
platform serves, and the current tenant's secret names."""

from django.apps import apps

from workers.inference.registry import platform_models


def choices_for(name: str) -> list[str] | None:
    if name == "model":
        return sorted(platform_models())
    if name == "auth_secret" and apps.is_installed("apps.secrets"):
        from apps.secrets.models import Secret  # the secrets app is optional to the editor

        return list(Secret.objects.order_by("name").values_list("name", flat=True))
    return None
