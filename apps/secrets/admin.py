from django.contrib import admin

from apps.secrets.models import Secret
from apps.tenants.admin_base import ReadOnlyAdmin


@admin.register(Secret)
class SecretAdmin(ReadOnlyAdmin):
    """Names and dates only: neither the value nor its ciphertext is shown."""

    list_display = ["name", "tenant", "created_by", "created_at", "updated_at"]
    list_filter = ["tenant"]
    search_fields = ["name"]
    fields = ("tenant", "name", "created_by", "created_at", "updated_at")
