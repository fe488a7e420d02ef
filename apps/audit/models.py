from django.conf import settings
from django.db import models

from apps.tenants.models import Tenant, TenantModel


class AuditEntry(TenantModel):
    """Append-only record of who changed what. A database trigger (migration 0002)
    refuses UPDATE and DELETE, so not even a bug in our own code can rewrite history."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, db_index=True, related_name="+")
    # PROTECT: a user with history is deactivated, not deleted; the log is never rewritten.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta(TenantModel.Meta):
        ordering = ["-at"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        target = f"{self.target_type}:{self.target_id}"
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {target}"
