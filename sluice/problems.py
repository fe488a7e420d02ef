"""Error responses for programs: RFC 9457 problem details (`application/problem+json`),
one shape for every JSON endpoint (the SSE feed, the editor's round trips, the API)."""

from typing import Any

from django.http import JsonResponse


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JsonResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return JsonResponse({**body, **extra}, status=status, content_type="application/problem+json")
