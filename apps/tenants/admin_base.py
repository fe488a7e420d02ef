"""Admin bases. Platform staff see every tenant, so admin reads go through the unscoped
manager by name; and operational records are read-only, because changing them by hand
would bypass the state machines and the ledger. Any active staff user may view them: the
admin is the platform's audit console.

Also the small pieces the admins share: links between records' pages, pretty JSON and a
recent-dates filter. Everything rendered goes through format_html, which escapes."""

import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

# How many related rows a detail page lists before it links to the rest.
SHOWN = 50


class AllTenantsAdmin(admin.ModelAdmin):
    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return self.model.unscoped_all_tenants.all()


def is_staff(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_active and getattr(user, "is_staff", False))


class ReadOnlyAdmin(AllTenantsAdmin):
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return is_staff(request)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return is_staff(request)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """Every column, shown read-only. Django's default builds a model form to find the
        fields, and a form's foreign keys read the related tenant-scoped default manager,
        which fails closed for staff outside any tenant."""
        if self.fields:
            return self.fields
        exclude = set(self.exclude or ())
        columns = [f.name for f in self.model._meta.fields if f.name not in exclude]
        extra = [name for name in self.get_readonly_fields(request, obj) if name not in columns]
        return [*columns, *extra]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def change_url(model: type[Model] | Model, pk: object) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[pk])


def changelist_url(model: type[Model], **params: object) -> str:
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def link(model: type[Model] | Model, pk: object, text: object) -> SafeString:
    """A link to a record's admin page; an empty string when there is no record."""
    if pk is None:
        return SafeString("")
    return format_html('<a href="{}">{}</a>', change_url(model, pk), text)


def list_link(model: type[Model], text: object, **params: object) -> SafeString:
    return format_html('<a href="{}">{}</a>', changelist_url(model, **params), text)


def pretty_json(value: Any) -> SafeString:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return format_html('<pre class="sluice-json">{}</pre>', text)


class RecentFilter(admin.SimpleListFilter):
    """Rows from today (local midnight on), the past 7 or the past 30 days."""

    title = "recent"
    parameter_name = "recent"
    field_name = "created_at"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("today", "Today"), ("7d", "Past 7 days"), ("30d", "Past 30 days")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        since = {
            "today": timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0),
            "7d": now - timedelta(days=7),
            "30d": now - timedelta(days=30),
        }.get(self.value() or "")
        if since is None:
            return queryset
        return queryset.filter(**{f"{self.field_name}__gte": since})


def recent_filter(field_name: str) -> type[RecentFilter]:
    class Recent(RecentFilter):
        pass

    Recent.field_name = field_name
    return Recent
