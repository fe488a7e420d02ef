from collections.abc import Callable
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse

from apps.tenants.context import tenant_context
from apps.tenants.models import Membership

SESSION_TENANT_KEY = "sluice_tenant_id"


def membership_for(request: HttpRequest) -> Membership | None:
    """The signed-in user's membership in the tenant chosen in the session, else their first.

    Runs before any tenant is set, so it uses the unscoped manager, filtered by user.
    """
    return membership_for_user(request.user, request.session.get(SESSION_TENANT_KEY))


def membership_for_user(user: Any, chosen: object) -> Membership | None:
    """The user's membership in tenant `chosen` (from their session), else their first.
    Shared by the web middleware and the live feed's websocket and SSE."""
    if user is None or not user.is_authenticated:
        return None
    memberships = Membership.unscoped_all_tenants.select_related("tenant").filter(user=user)
    if chosen is not None:
        membership = memberships.filter(tenant_id=chosen).first()
        if membership is not None:
            return membership
    return memberships.order_by("created_at", "id").first()


def choose_tenant(request: HttpRequest, tenant_id: object) -> Membership:
    """Makes `tenant_id` the session's current tenant, if the signed-in user is a member of
    it; 404 otherwise (another tenant and a missing one look the same)."""
    membership = membership_for_user(request.user, tenant_id)
    if membership is None or str(membership.tenant_id) != str(tenant_id):
        raise Http404("You are not a member of that tenant.")
    set_current_tenant(request, membership.tenant_id)
    return membership


def set_current_tenant(request: HttpRequest, tenant_id: int) -> None:
    """The one place the session's tenant is written; callers have checked the membership."""
    request.session[SESSION_TENANT_KEY] = tenant_id


class TenantMiddleware:
    """Sets the current tenant for the whole request (one of the four places that may)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        membership = membership_for(request)
        request.membership = membership  # type: ignore[attr-defined]
        if membership is None:
            return self.get_response(request)
        with tenant_context(membership.tenant):
            return self.get_response(request)
