"""Admin bases. Platform staff see every tenant, so admin reads go through the unscoped
manager by name; and operational records are read-only, because changing them by hand
would bypass the state machines and the ledger."""

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest


class AllTenantsAdmin(admin.ModelAdmin):
    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return self.model.unscoped_all_tenants.all()


class ReadOnlyAdmin(AllTenantsAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
