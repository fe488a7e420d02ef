"""The current tenant of this request, websocket or task.

Set in exactly four places (web middleware, API base view, Channels connect, Celery task
wrapper) through `tenant_context`, which always resets in `finally`. Tenant-scoped
managers read it and fail closed when it is missing.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apps.tenants.models import Tenant

_current_tenant: ContextVar["Tenant | None"] = ContextVar("sluice_current_tenant", default=None)


class NoTenantSelected(RuntimeError):
    """A tenant-scoped query ran with no tenant set: a bug, never a reason to show all rows."""


def current_tenant_or_none() -> "Tenant | None":
    return _current_tenant.get()


def current_tenant() -> "Tenant":
    tenant = _current_tenant.get()
    if tenant is None:
        raise NoTenantSelected(
            "no tenant is set for this query; wrap the work in tenant_context(tenant)"
        )
    return tenant


@contextmanager
def tenant_context(tenant: "Tenant") -> Iterator["Tenant"]:
    token = _current_tenant.set(tenant)
    try:
        yield tenant
    finally:
        _current_tenant.reset(token)
