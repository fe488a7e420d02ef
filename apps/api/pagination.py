"""Cursor pagination for every list: stable under inserts (a new run does not shift the next
page), `?cursor=` from the previous page's `next`, `?limit=` up to MAX_LIMIT."""

from collections.abc import Callable
from functools import cache
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

PAGE_PARAMETERS = [
    OpenApiParameter("cursor", str, description="From the previous page's `next` link."),
    OpenApiParameter(
        "limit", int, description=f"Items per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})."
    ),
]


class _Cursor(CursorPagination):
    page_size = DEFAULT_LIMIT
    page_size_query_param = "limit"
    max_page_size = MAX_LIMIT

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get("limit")
        if raw is None:
            return DEFAULT_LIMIT
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise serializers.ValidationError(
                {"limit": [f"must be a whole number from 1 to {MAX_LIMIT}"]}
            )
        return int(raw)

    def decode_cursor(self, request: Request) -> Any:
        try:
            return super().decode_cursor(request)
        except NotFound:
            raise serializers.ValidationError(
                {"cursor": ["is not a cursor this list gave out; start again without it"]}
            ) from None


def page_of(
    request: Request,
    queryset: QuerySet[Any],
    to_data: Callable[[Any], dict[str, Any]],
    *,
    ordering: str | tuple[str, ...],
) -> Response:
    paginator, rows = _paginate(request, queryset, ordering)
    return paginator.get_paginated_response([to_data(row) for row in rows])


def cursor_page(
    request: Request, queryset: QuerySet[Any], *, ordering: str | tuple[str, ...]
) -> tuple[list[Any], str | None]:
    """One page of rows and the link to the next, for answers that are not JSON."""
    paginator, rows = _paginate(request, queryset, ordering)
    return rows, paginator.get_next_link()


def _paginate(
    request: Request, queryset: QuerySet[Any], ordering: str | tuple[str, ...]
) -> tuple[_Cursor, list[Any]]:
    paginator = _Cursor()
    paginator.ordering = ordering
    return paginator, list(paginator.paginate_queryset(queryset, request) or [])


@cache
def paginated(item: type[serializers.Serializer[Any]]) -> type[serializers.Serializer[Any]]:
    """The schema of one page of `item`s, for the OpenAPI document."""
    name = item.__name__.removesuffix("Serializer")
    return type(
        f"Paginated{name}ListSerializer",
        (serializers.Serializer,),
        {
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": item(many=True),
        },
    )
