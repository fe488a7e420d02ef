"""`Idempotency-Key` on POST: the same key with the same request gets the first reply again,
without doing the work twice; the same key with a different request is refused (409).

The reply is stored in the same transaction as the request's own writes, so either both
exist or neither does. A second request with a key in flight waits on the unique index until
the first commits (then replays its reply) or rolls back (then does the work itself). Only
successful replies are kept: an error leaves no trace, and the client may fix and retry."""

import hashlib
import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.db import connection, transaction
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.models import IdempotentReply
from apps.api.problems import Conflict
from apps.tenants.context import current_tenant

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

Handler = Callable[..., Response]


class _NotKept(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def idempotent(handler: Handler) -> Handler:
    @wraps(handler)
    def wrapper(view: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = request.headers.get(HEADER)
        if key is None:
            return handler(view, request, *args, **kwargs)
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
            raise exceptions.ValidationError(
                {HEADER: [f"must be 1 to {MAX_KEY_LENGTH} printable characters"]}
            )
        digest = _digest(request)
        try:
            with transaction.atomic():
                earlier = _claim(key, digest)
                if earlier is not None:
                    return _replay(earlier, key, digest)
                response = handler(view, request, *args, **kwargs)
                if not 200 <= response.status_code < 300:
                    raise _NotKept(response)
                _keep(key, response)
                return response
        except _NotKept as not_kept:
            return not_kept.response

    wrapper.idempotent = True  # type: ignore[attr-defined]  # read by apps.api.schema
    return wrapper


def _digest(request: Request) -> str:
    # The raw body, cached by Django before anything parsed it (TenantAPIView.initial).
    body = request._request.body
    # The query string too: a JSON-lines job carries its parameters there.
    seen = f"{request.method} {request.get_full_path()}\n".encode() + body
    return hashlib.sha256(seen).hexdigest()


def _claim(key: str, digest: str) -> IdempotentReply | None:
    """Takes the key for this request (None), or returns the reply stored under it. An
    INSERT that waits on a concurrent holder of the key, so the two never both do the work."""
    tenant_id = current_tenant().pk
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO api_idempotentreply"
            " (tenant_id, key, request_digest, status, body, location, created_at)"
            " VALUES (%s, %s, %s, 0, NULL, '', now())"
            " ON CONFLICT (tenant_id, key) DO NOTHING RETURNING id",
            [tenant_id, key, digest],
        )
        if cursor.fetchone() is not None:
            return None
    return IdempotentReply.objects.get(key=key)


def _replay(earlier: IdempotentReply, key: str, digest: str) -> Response:
    if earlier.request_digest != digest:
        raise Conflict(
            f"The Idempotency-Key {key!r} was already used with a different request; use a"
            " new key for a new request."
        )
    response = Response(earlier.body, status=earlier.status)
    if earlier.location:
        response["Location"] = earlier.location
    response["Idempotent-Replayed"] = "true"
    return response


def _keep(key: str, response: Response) -> None:
    IdempotentReply.objects.filter(key=key).update(
        status=response.status_code,
        # What the client received, so a replay is the same bytes (datetimes, UUIDs).
        body=json.loads(JSONRenderer().render(response.data)),
        location=response.get("Location", ""),
    )
