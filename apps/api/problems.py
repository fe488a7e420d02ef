"""Every API error as `application/problem+json` (RFC 9457): a title, a detail that says
what to do, and for invalid input an `errors` list naming each field at fault."""

import math
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpResponse
from rest_framework import exceptions

from apps.graphs.services import GraphExists, StaleVersion
from apps.graphs.validation import SpecInvalid
from apps.runs.replay import ReplayRefused
from apps.runs.services import InvalidInput
from sluice.problems import problem


class Conflict(exceptions.APIException):
    status_code = 409
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"


class TooLarge(exceptions.APIException):
    status_code = 413
    default_code = "too_large"


class Overloaded(exceptions.APIException):
    """Admission control refused the work; `retry_after_s` is when it is likely to pass."""

    status_code = 429
    default_code = "overloaded"

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


def field_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """DRF's nested error detail flattened to [{"field": "inputs.3.url", "message": …}]."""
    if isinstance(detail, dict):
        found = []
        for name, inner in detail.items():
            field = "" if name == "non_field_errors" else str(name)
            found += field_errors(
                inner, f"{prefix}.{field}" if prefix and field else prefix or field
            )
        return found
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return [{"field": prefix, "message": str(item)} for item in detail]
        found = []
        for index, inner in enumerate(detail):
            found += field_errors(inner, f"{prefix}.{index}" if prefix else str(index))
        return found
    return [{"field": prefix, "message": str(detail)}]


def invalid(errors: list[dict[str, str]], title: str = "Invalid request") -> HttpResponse:
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return problem(400, title, detail, code="invalid", errors=errors)


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse | None:
    if isinstance(exc, SpecInvalid):
        errors = [
            {"field": e.where + (f".{e.field}" if e.field else ""), "message": e.message}
            for e in exc.errors
        ]
        return invalid(errors, "Invalid graph spec")
    if isinstance(exc, InvalidInput):
        field, sep, message = str(exc).partition(": ")
        error = {"field": field, "message": message} if sep else {"field": "", "message": field}
        return invalid([error], "Invalid input")
    if isinstance(exc, (GraphExists, StaleVersion, ReplayRefused)):
        exc = Conflict(str(exc))
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound("Not found, or not yours.")
    elif isinstance(exc, RequestDataTooBig):
        exc = TooLarge(too_large())
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None  # a bug: Django's 500 handler logs it
    if isinstance(exc, exceptions.ValidationError):
        return invalid(field_errors(exc.detail))
    if isinstance(exc, exceptions.ParseError):
        return invalid([{"field": "", "message": str(exc.detail)}], "Unreadable body")
    response = problem(exc.status_code, _title(exc), str(exc.detail), code=_code(exc))
    if auth_header := getattr(exc, "auth_header", None):
        response["WWW-Authenticate"] = auth_header
    if isinstance(exc, Overloaded):
        response["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, exceptions.Throttled) and (wait := getattr(exc, "wait", None)):
        response["Retry-After"] = str(max(1, math.ceil(wait)))
    return response


def too_large() -> str:
    limit = settings.SLUICE_API_MAX_BODY_BYTES // (1024 * 1024)
    return f"The request body is over {limit} MB; split the inputs over several requests."


def _code(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    429: "Too many requests",
}


def _title(exc: exceptions.APIException) -> str:
    return TITLES.get(exc.status_code, "Error")
