"""Events into a graph's stream deployment: the deployed version's stream run takes them,
one per request or many, each becoming an input event and a source step."""

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.admission import admit
from apps.api.base import TenantAPIView
from apps.api.idempotency import idempotent
from apps.api.views.graphs import deployed, valid
from apps.graphs.access import graph_by_slug
from apps.runs.intake import Item, ingest
from apps.tenants.keys import EVENTS_WRITE


class EventInSerializer(serializers.Serializer[Any]):
    payload = serializers.JSONField(help_text="The event: a JSON object the source accepts.")
    key = serializers.CharField(
        required=False,
        default="",
        allow_blank=True,
        max_length=200,
        help_text="Partition key, carried by everything computed from this event.",
    )
    event_time = serializers.DateTimeField(
        required=False, help_text="When it happened; when it arrived if left out."
    )


class BulkEventsSerializer(serializers.Serializer[Any]):
    events = EventInSerializer(many=True, allow_empty=False)

    def validate_events(self, events: list[Any]) -> list[Any]:
        if len(events) > settings.SLUICE_MAX_BATCH_ITEMS:
            raise serializers.ValidationError(
                f"at most {settings.SLUICE_MAX_BATCH_ITEMS} events per request"
            )
        return events


class AcceptedSerializer(serializers.Serializer[Any]):
    run = serializers.UUIDField(help_text="The stream run that took the events.")
    accepted = serializers.IntegerField()
    events = serializers.ListField(child=serializers.UUIDField())


def _accept(view: TenantAPIView, slug: str, events: list[dict[str, Any]]) -> Response:
    graph = graph_by_slug(slug)
    version = deployed(graph)
    admit(view.caller.tenant, steps=len(events), events=len(events))
    items = [Item(e["payload"], e["key"], e.get("event_time")) for e in events]
    run, created = ingest(version=version, items=items, actor=view.caller.actor)
    body = {"run": run.id, "accepted": len(created), "events": [e.id for e in created]}
    return Response(body, status=status.HTTP_202_ACCEPTED)


class EventView(TenantAPIView):
    scopes = {"POST": EVENTS_WRITE}

    @extend_schema(
        operation_id="graphs_events_send",
        request=EventInSerializer,
        responses={202: AcceptedSerializer},
        description="Sends one event into the graph's deployed version (its stream run).",
    )
    @idempotent
    def post(self, request: Request, slug: str) -> Response:
        return _accept(self, slug, [valid(EventInSerializer, request.data)])


class BulkEventView(TenantAPIView):
    scopes = {"POST": EVENTS_WRITE}

    @extend_schema(
        operation_id="graphs_events_send_bulk",
        request=BulkEventsSerializer,
        responses={202: AcceptedSerializer},
        description=(
            "Sends many events in one request, written in one transaction: all are"
            " accepted or none."
        ),
    )
    @idempotent
    def post(self, request: Request, slug: str) -> Response:
        return _accept(self, slug, valid(BulkEventsSerializer, request.data)["events"])
