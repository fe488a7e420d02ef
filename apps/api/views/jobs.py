"""Batch jobs: submit many inputs (JSON, JSON lines, or a JSON-lines file upload) → 202 with
the job's id and Location; progress with counts per stage and an ETA; results as JSON lines;
estimate beside actual; cancel."""

import json
from decimal import Decimal
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.admission import admit
from apps.api.base import TenantAPIView
from apps.api.idempotency import idempotent
from apps.api.jobs import JobRequest, failed_items, progress, submit_job
from apps.api.measured import actual_for_run, step_totals
from apps.api.models import BatchJob
from apps.api.pagination import PAGE_PARAMETERS, cursor_page, page_of, paginated
from apps.api.parsers import JSON_LINES, JsonLinesParser, JSONParser, parse_lines
from apps.api.views.graphs import MAX_NUMBER, ProfileSerializer, profile_from, valid
from apps.api.views.runs import (
    NodeCountsSerializer,
    RunSerializer,
    run_detail,
    terminal_nodes,
    version_for,
)
from apps.runs.models import Event, RunStatus
from apps.runs.services import cancel_run
from apps.tenants.keys import RUNS_READ, RUNS_WRITE


class JobParamsSerializer(ProfileSerializer):
    graph = serializers.SlugField(max_length=63)
    version = serializers.IntegerField(required=False, min_value=1, max_value=MAX_NUMBER)
    webhook_url = serializers.URLField(
        required=False,
        default="",
        allow_blank=True,
        max_length=2000,
        help_text="POSTed once when the job ends, signed with `webhook_secret`.",
    )
    webhook_secret = serializers.CharField(
        required=False,
        default="",
        allow_blank=True,
        max_length=500,
        write_only=True,
        help_text="Signs the webhook (HMAC-SHA256, header Sluice-Signature); never returned.",
    )
    budget_usd = serializers.DecimalField(
        required=False,
        max_digits=12,
        decimal_places=6,
        min_value=Decimal(0),
        help_text="The job's spending limit; the graph's run budget times the items if not.",
    )
    deadline_s = serializers.FloatField(
        required=False,
        min_value=1,
        max_value=30 * 86400,
        help_text="Stop the job this many seconds after it starts.",
    )

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("webhook_url") and not data.get("webhook_secret"):
            raise serializers.ValidationError(
                {"webhook_secret": ["required with webhook_url, to sign the webhook"]}
            )
        return data


class JobCreateSerializer(JobParamsSerializer):
    inputs = serializers.ListField(
        child=serializers.JSONField(),
        allow_empty=False,
        help_text="The inputs, each a JSON object the graph's source accepts.",
    )


class JobUploadSerializer(JobParamsSerializer):
    file = serializers.FileField(help_text="JSON lines: one input per line.")


class WebhookStateSerializer(serializers.Serializer[Any]):
    url = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()


class ProgressSerializer(serializers.Serializer[Any]):
    settled_steps = serializers.IntegerField()
    expected_steps = serializers.IntegerField()
    fraction = serializers.FloatField()
    eta_seconds = serializers.FloatField(allow_null=True)


class FailedItemSerializer(serializers.Serializer[Any]):
    item = serializers.IntegerField(allow_null=True)
    node = serializers.CharField()
    error = serializers.CharField()


class JobSerializer(serializers.Serializer[BatchJob]):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=RunStatus.choices)
    items = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    run = RunSerializer()
    progress = ProgressSerializer()
    stages = NodeCountsSerializer(many=True)
    failed_items = FailedItemSerializer(many=True)
    estimate = serializers.JSONField()
    actual = serializers.JSONField()
    webhook = WebhookStateSerializer(allow_null=True)


def job_by_id(job_id: UUID) -> BatchJob:
    return get_object_or_404(
        BatchJob.objects.select_related("run__graph_version__graph"), id=job_id
    )


def job_data(job: BatchJob) -> dict[str, Any]:
    rows = step_totals(job.run)  # one scan of the steps for the run, stages and actuals
    run = run_detail(job.run, rows)
    per_node = {row["node"]: row["counts"] for row in run["nodes"]}
    return {
        "id": job.id,
        "status": job.run.status,
        "items": job.items,
        "created_at": job.created_at,
        "run": run,
        "progress": progress(job, per_node),
        "stages": run["nodes"],
        "failed_items": failed_items(job),
        "estimate": job.estimate,
        "actual": actual_for_run(job.run, rows),
        "webhook": {
            "url": job.webhook_url,
            "status": job.webhook_status,
            "attempts": job.webhook_attempts,
            "delivered_at": job.webhook_delivered_at,
            "last_error": job.webhook_last_error,
        }
        if job.webhook_url
        else None,
    }


def job_summary(job: BatchJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.run.status,
        "items": job.items,
        "created_at": job.created_at,
        "run": job.run_id,
    }


class JobSummarySerializer(serializers.Serializer[BatchJob]):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=RunStatus.choices)
    items = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    run = serializers.UUIDField()


def _submission(request: Request) -> tuple[dict[str, Any], list[Any]]:
    """The job's parameters and inputs, from whichever of the three forms was sent."""
    if request.content_type.startswith(JSON_LINES):
        inputs = cast(list[Any], request.data)  # what JsonLinesParser returns
        return valid(JobParamsSerializer, request.query_params), inputs
    if request.content_type.startswith("multipart/"):
        params = valid(JobUploadSerializer, request.data)
        return params, parse_lines(params.pop("file").read())
    params = valid(JobCreateSerializer, request.data)
    return params, params.pop("inputs")


class JobListView(TenantAPIView):
    scopes = {"GET": RUNS_READ, "POST": RUNS_WRITE}
    parser_classes = [JSONParser, JsonLinesParser, MultiPartParser]

    @extend_schema(
        operation_id="jobs_list",
        parameters=PAGE_PARAMETERS,
        responses=paginated(JobSummarySerializer),
    )
    def get(self, request: Request) -> Response:
        jobs = BatchJob.objects.select_related("run")
        return page_of(request, jobs, job_summary, ordering="-created_at")

    @extend_schema(
        operation_id="jobs_create",
        request={
            "application/json": JobCreateSerializer,
            "multipart/form-data": JobUploadSerializer,
        },
        responses={202: JobSerializer},
        description=(
            "Accepts a batch job: the inputs as JSON, as a JSON-lines body"
            f" (`{JSON_LINES}`, parameters in the query string) or as a JSON-lines file upload."
            " Answers 202 with the job and its Location; follow progress there."
        ),
    )
    @idempotent
    def post(self, request: Request) -> Response:
        params, inputs = _submission(request)
        if not inputs:
            raise serializers.ValidationError({"inputs": ["at least one input is needed"]})
        if len(inputs) > settings.SLUICE_MAX_BATCH_ITEMS:
            raise serializers.ValidationError(
                {"inputs": [f"at most {settings.SLUICE_MAX_BATCH_ITEMS} inputs per job"]}
            )
        version = version_for(params["graph"], params.get("version"))
        profile = profile_from(
            {"items": len(inputs)}
            | {k: params[k] for k in ("pages_per_item", "tokens_per_item") if k in params}
        )
        admit(self.caller.tenant, steps=len(inputs), events=0)
        job = submit_job(
            JobRequest(
                version=version,
                inputs=inputs,
                profile=profile,
                webhook_url=params["webhook_url"],
                webhook_secret=params["webhook_secret"],
                budget_usd=params.get("budget_usd"),
                deadline_s=params.get("deadline_s"),
            ),
            actor=self.caller.actor,
        )
        response = Response(job_data(job_by_id(job.id)), status=status.HTTP_202_ACCEPTED)
        response["Location"] = f"/api/jobs/{job.id}/"
        return response


class JobDetailView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(operation_id="jobs_get", responses=JobSerializer)
    def get(self, request: Request, job_id: UUID) -> Response:
        return Response(job_data(job_by_id(job_id)))


class JobCancelView(TenantAPIView):
    scopes = {"POST": RUNS_WRITE}

    @extend_schema(operation_id="jobs_cancel", request=None, responses=JobSerializer)
    def post(self, request: Request, job_id: UUID) -> Response:
        job = job_by_id(job_id)
        cancel_run(job.run, actor=self.caller.actor)
        return Response(job_data(job_by_id(job_id)))


class JobResultsView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="jobs_results",
        parameters=PAGE_PARAMETERS,
        responses={
            (200, JSON_LINES): OpenApiResponse(
                response=str,
                description=(
                    'One JSON object per line: {"item": input index, "node", "event",'
                    ' "output"}. More pages: the `Link: <…>; rel="next"` header.'
                ),
            )
        },
    )
    def get(self, request: Request, job_id: UUID) -> HttpResponse:
        job = job_by_id(job_id)
        nodes = terminal_nodes(job.run.spec)
        events = Event.objects.filter(run_id=job.run_id, node_id__in=nodes, producer__isnull=False)
        rows, next_link = cursor_page(request, events, ordering=("created_at", "id"))
        lines = "".join(json.dumps(_result_line(event)) + "\n" for event in rows)
        response = HttpResponse(lines, content_type=JSON_LINES)
        if next_link:
            response["Link"] = f'<{next_link}>; rel="next"'
        return response


def _result_line(event: Event) -> dict[str, Any]:
    item = int(event.key) if event.key.isdigit() else None
    return {"item": item, "node": event.node_id, "event": str(event.id), "output": event.payload}
