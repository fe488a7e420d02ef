"""Who is calling the API, and for which tenant.

Two ways in: an API key (`Authorization: Bearer sk_…`), whose tenant and scopes are the
key's, or the browser session, whose tenant is the one chosen in the session and whose
scopes follow the member's role. A request that carries a bearer header is judged by the key
alone: a cookie sent along never widens a key, and a bad key is refused, not ignored."""

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.audit.services import Actor
from apps.tenants.keys import (
    EVENTS_WRITE,
    GRAPHS_READ,
    GRAPHS_WRITE,
    RUNS_READ,
    RUNS_WRITE,
    key_for_authorization,
)
from apps.tenants.models import ApiKey, Membership, Role, Tenant

# The role a signed-in member needs for what each key scope allows.
ROLE_FOR_SCOPE: dict[str, Role] = {
    GRAPHS_READ: Role.VIEWER,
    RUNS_READ: Role.VIEWER,
    RUNS_WRITE: Role.OPERATOR,
    EVENTS_WRITE: Role.OPERATOR,
    GRAPHS_WRITE: Role.EDITOR,
}


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for, and on whose authority: a key or a member."""

    tenant: Tenant
    key: ApiKey | None = None
    membership: Membership | None = None

    @property
    def actor(self) -> Actor:
        """What audit entries name: the member, or the key by its name and prefix."""
        if self.membership is not None:
            return self.membership.user
        assert self.key is not None
        return f"api key {self.key.name} (sk_{self.key.prefix}…)"

    @property
    def user(self) -> AbstractBaseUser | None:
        return self.membership.user if self.membership is not None else None

    def refusal(self, scope: str) -> str | None:
        """Why this caller may not do what `scope` allows, or None when it may."""
        if self.key is not None:
            if scope in self.key.scopes:
                return None
            return f"This API key does not have the {scope} scope; create a key that has it."
        assert self.membership is not None
        needed = ROLE_FOR_SCOPE[scope]
        if self.membership.allows(needed):
            return None
        return (
            f"Your role ({self.membership.role}) cannot do this; it needs {needed.value} or"
            " above. Ask an owner of the tenant."
        )


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[AnonymousUser, Caller] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if header is None:
            return None
        key = key_for_authorization(header)
        if key is None:
            raise exceptions.AuthenticationFailed(
                "The API key is malformed, unknown or revoked. Send `Authorization: Bearer"
                " sk_…` with a key from Settings → API keys."
            )
        return AnonymousUser(), Caller(tenant=key.tenant, key=key)

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with this challenge) rather than 403 to anonymous requests.
        return 'Bearer realm="sluice"'


class SessionAuthentication(authentication.SessionAuthentication):
    """The browser's session, with DRF's CSRF check on unsafe methods. The member's tenant
    is the one TenantMiddleware chose for the session."""

    def authenticate(self, request: Request) -> tuple[AbstractBaseUser, Caller] | None:
        found = super().authenticate(request)
        if found is None:
            return None
        membership: Membership | None = getattr(request._request, "membership", None)
        if membership is None:
            raise exceptions.PermissionDenied(
                "You are not a member of any tenant; create one or accept an invitation."
            )
        return found[0], Caller(tenant=membership.tenant, membership=membership)
