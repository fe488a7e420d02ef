"""Checks that a signed-in person may act in the current tenant."""

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse

from apps.tenants.models import Membership, Role

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


def tenant_member_required(view: View) -> View:
    """login_required, plus a membership (404 for a user with none)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        membership_of(request)
        return view(request, *args, **kwargs)

    return login_required(wrapper)  # type: ignore[return-value]
