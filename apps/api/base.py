"""The base of every API view: who is calling (apps.api.auth), whether they may (the
view's scope for the request's method), the per-key request rate, and the tenant context
for the whole request, set here (one of the four places that may) and reset in `finally`."""

from contextlib import ExitStack
from typing import Any, ClassVar

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.views import APIView

from apps.api.admission import throttle_key
from apps.api.auth import Caller
from apps.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from apps.api.problems import TooLarge, too_large
from apps.tenants.context import tenant_context


class TenantAPIView(APIView):
    # The scope each method needs, e.g. {"GET": RUNS_READ, "POST": RUNS_WRITE}.
    scopes: ClassVar[dict[str, str]] = {}

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        with ExitStack() as self.tenant_scope:
            return super().dispatch(request, *args, **kwargs)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if _content_length(request) > settings.SLUICE_API_MAX_BODY_BYTES:
            raise TooLarge(too_large())
        if request.method == "POST" and IDEMPOTENCY_HEADER in request.headers:
            # Keep the raw body for the request's digest: the session's CSRF check may
            # parse a multipart form first, after which Django cannot give it back.
            request._request.body  # noqa: B018
        super().initial(request, *args, **kwargs)
        caller = self.caller
        self.tenant_scope.enter_context(tenant_context(caller.tenant))

    def check_permissions(self, request: Request) -> None:
        caller = request.auth
        if not isinstance(caller, Caller):
            raise exceptions.NotAuthenticated(
                "Send `Authorization: Bearer sk_…` with an API key, or sign in."
            )
        method = request.method or ""
        scope = self.scopes.get("GET" if method in ("HEAD", "OPTIONS") else method)
        if scope is None:
            raise exceptions.MethodNotAllowed(request.method or "")
        if (refusal := caller.refusal(scope)) is not None:
            raise exceptions.PermissionDenied(refusal)

    def check_throttles(self, request: Request) -> None:
        caller = request.auth
        if isinstance(caller, Caller) and caller.key is not None:
            wait = throttle_key(caller.key)
            if wait is not None:
                raise exceptions.Throttled(
                    wait, detail="This API key is over its request rate; slow down."
                )

    @property
    def caller(self) -> Caller:
        caller = self.request.auth
        assert isinstance(caller, Caller)  # check_permissions made sure
        return caller


def _content_length(request: Request) -> int:
    raw = request.META.get("CONTENT_LENGTH") or "0"
    return int(raw) if raw.isdigit() else 0
