from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.audit.services import record
from apps.tenants.admin_base import AllTenantsAdmin, ReadOnlyAdmin
from apps.tenants.models import ApiKey, Membership, Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]


@admin.register(Membership)
class MembershipAdmin(AllTenantsAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    raw_id_fields = ["user", "tenant"]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        record(
            tenant=obj.tenant,
            actor=request.user,
            action="membership.change" if change else "membership.add",
            target_type="membership",
            target_id=obj.pk,
            after={"user": obj.user.get_username(), "role": obj.role, "via": "admin"},
        )


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    list_display = ["name", "prefix", "tenant", "scopes", "created_at", "revoked_at"]
    list_filter = ["tenant"]
    exclude = ["hashed_secret"]
