from django.contrib import admin

from apps.audit.models import AuditEntry
from apps.tenants.admin_base import ReadOnlyAdmin


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["at", "tenant", "actor_label", "action", "target_type", "target_id"]
    list_filter = ["action", "tenant"]
    search_fields = ["actor_label", "action", "target_id"]
    date_hierarchy = "at"
