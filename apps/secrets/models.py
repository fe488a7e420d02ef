from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from apps.tenants.models import TenantModel
from workers.secret_names import NAME_PATTERN, NAME_RULE


class Secret(TenantModel):
    """A tenant's secret value (a provider key, a bearer token), referenced by name from
    graphs. Only the Fernet token is stored (apps.secrets.crypto); the value is never shown."""

    name = models.CharField(
        max_length=64, validators=[RegexValidator(NAME_PATTERN, f"Use {NAME_RULE}.")]
    )
    ciphertext = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # When the value was last set (created or replaced).
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantModel.Meta):
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="secret_name_once_per_tenant")
        ]

    def __str__(self) -> str:
        return self.name
