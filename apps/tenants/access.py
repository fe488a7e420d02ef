"""Checks that a signed-in person may act in the current tenant, and lookups by id of the
current tenant's members, invitations and API keys (404 for missing and not yours alike)."""

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404

from apps.tenants.models import ApiKey, Invitation, Membership, Role

View = TypeVar("View", bound=Callable[..., HttpResponse])


def membership_of(request: HttpRequest) -> Membership:
    membership = getattr(request, "membership", None)
    if membership is None:
        # Signed in but in no tenant: nothing here is theirs.
        raise Http404("You are not a member of any tenant.")
    return membership


def require_role(request: HttpRequest, role: Role) -> Membership:
    membership = membership_of(request)
    if not membership.allows(role):
        raise PermissionDenied(f"This needs the {role.value} role; you are {membership.role}.")
    return membership


def is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def to_login(request: HttpRequest) -> HttpResponse:
    """The login page, coming back here after. An htmx request gets the address in
    `HX-Redirect` instead of a 302, which htmx would follow and swap into a fragment."""
    redirect = redirect_to_login(request.get_full_path())
    if not is_htmx(request):
        return redirect
    response = HttpResponse(status=200)
    response["HX-Redirect"] = redirect["Location"]
    return response


def login_required(view: View) -> View:
    """Django's login_required, with `to_login` for anonymous visitors."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return to_login(request)
        return view(request, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def tenant_member_required(view: View) -> View:
    """login_required, plus a membership (404 for a user with none)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        membership_of(request)
        return view(request, *args, **kwargs)

    return login_required(wrapper)  # type: ignore[return-value]


def member_by_id(membership_id: int) -> Membership:
    return get_object_or_404(Membership.objects.select_related("user", "tenant"), pk=membership_id)


def invitation_by_id(invitation_id: int) -> Invitation:
    return get_object_or_404(Invitation.objects.select_related("tenant"), pk=invitation_id)


def api_key_by_id(key_id: int) -> ApiKey:
    return get_object_or_404(ApiKey.objects.select_related("tenant"), pk=key_id)
