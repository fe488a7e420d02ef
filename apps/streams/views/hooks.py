"""The webhook deployment's URL: POST /hooks/<deployment id>/, signed with the deployment's
secret (apps/streams/webhooks.py). No session, no CSRF token: the signature is the
authentication, and every answer is JSON (errors as application/problem+json)."""

from uuid import UUID

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from apps.streams import webhooks
from sluice.problems import problem
from workers.operators.streams import MAX_RECORD_BYTES


@csrf_exempt
def receive_webhook(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    if request.method != "POST":
        response = problem(405, "Method not allowed", "Send the record with POST.")
        response["Allow"] = "POST"
        return response
    if _declared_length(request) > MAX_RECORD_BYTES:  # refused before it is read
        return problem(413, "Too large", "The body is over 1 MB.", code="too_large")
    try:
        body = request.body
    except RequestDataTooBig:
        return problem(413, "Too large", "The body is over 1 MB.", code="too_large")
    header = request.headers.get(webhooks.SIGNATURE_HEADER, "")
    result = webhooks.receive(deployment_id, body, header, timezone.now())
    if not result.ok:
        return problem(result.status, **result.body)
    return JsonResponse(result.body, status=result.status)


def _declared_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0
