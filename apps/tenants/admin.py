from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.audit.services import record
from apps.tenants.admin_base import AllTenantsAdmin, ReadOnlyAdmin
from apps.tenants.models import ApiKey, Invitation, Membership, Tenant
from apps.tenants.quotas import SETTINGS_FIELDS

# Admission limits are the platform's to set (staff, here), not the tenant's own Settings:
# a tenant raising its own limit would defeat them.
ADMISSION_FIELDS = ("max_queued_steps", "max_events_per_s", "api_requests_per_min")


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "monthly_budget_usd", "feed_retention_days", "created_at"]
    search_fields = ["slug", "name"]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        watched = (*SETTINGS_FIELDS, *ADMISSION_FIELDS, "model_overrides", "outbound_allowlist")
        changed = [name for name in watched if name in form.changed_data]
        if change and changed:
            record(
                tenant=obj,
                actor=request.user,
                action="tenant.change",
                target_type="tenant",
                target_id=obj.pk,
                before={name: str(form.initial.get(name)) for name in changed},
                after={name: str(getattr(obj, name)) for name in changed},
            )


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


@admin.register(Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    list_display = [
        "email",
        "tenant",
        "role",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "revoked_at",
    ]
    list_filter = ["tenant", "role"]
    exclude = ["token_hash"]
