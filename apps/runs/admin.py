"""The runs' records in the admin, read-only and linked along their lineage: a run to its
steps, a step to the events it took (and the steps that produced them) and the events it
produced (and the steps that took them), its usage rows and its effects."""

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.contrib import admin
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from apps.audit.models import AuditEntry
from apps.runs.models import (
    Effect,
    Event,
    FanIn,
    FanInArrival,
    ResultRow,
    Run,
    Step,
    StreamRelay,
    Usage,
)
from apps.tenants.admin_base import (
    SHOWN,
    ReadOnlyAdmin,
    link,
    list_link,
    pretty_json,
    recent_filter,
)

PREVIEW_CHARS = 120


def short(pk: object) -> str:
    return str(pk)[:8]


def step_label(step: Step) -> str:
    item = f"[{step.item_index}]" if step.item_index is not None else ""
    return f"{step.node_id}{item} {short(step.pk)} ({step.status})"


def event_label(event: Event) -> str:
    return f"{event.node_id}.{event.port}#{event.seq} {short(event.pk)}"


def preview(payload: object) -> str:
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def table(headers: Iterable[str], rows: Iterable[Iterable[object]]) -> SafeString:
    head = format_html_join("", "<th>{}</th>", ((h,) for h in headers))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        ((format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows),
    )
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)


def links(items: Iterable[SafeString]) -> SafeString:
    return format_html_join(", ", "{}", ((item,) for item in items))


def more(total: int, shown: int, rest: SafeString | str = "") -> SafeString:
    if total <= shown:
        return SafeString("")
    return format_html("<p>{} of {} shown. {}</p>", shown, total, rest)


def consumers_of(run_id: UUID, event_ids: list[UUID]) -> dict[UUID, list[Step]]:
    """The steps that took each of these events as input, in one query (a step's input
    events are the `inputs` array), as the run page's step detail finds them."""
    found: dict[UUID, list[Step]] = defaultdict(list)
    if not event_ids:
        return found
    wanted = set(event_ids)
    taking = Step.unscoped_all_tenants.filter(run_id=run_id, inputs__overlap=event_ids)
    for step in taking.order_by("created_at", "node_id", "item_index"):
        for event_id in step.inputs:
            if event_id in wanted:
                found[event_id].append(step)
    return found


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "graph", "kind", "status", "open_steps", "created_at"]
    list_filter = ["status", "kind", "tenant", recent_filter("created_at")]
    list_select_related = ["tenant", "graph_version__graph"]
    search_fields = ["graph_version__graph__slug"]
    date_hierarchy = "created_at"
    exclude = ["input"]
    readonly_fields = ["records", "input_json"]

    @admin.display(description="graph")
    def graph(self, run: Run) -> str:
        return f"{run.graph_version.graph.slug} v{run.graph_version.number}"

    @admin.display(description="input")
    def input_json(self, run: Run) -> SafeString:
        return pretty_json(run.input)

    @admin.display(description="records")
    def records(self, run: Run) -> SafeString:
        by_status = dict(
            Step.unscoped_all_tenants.filter(run=run)
            .order_by()
            .values("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        usage = Usage.unscoped_all_tenants.filter(run=run).aggregate(
            rows=Count("id"),
            tokens_in=Sum("tokens_in"),
            tokens_out=Sum("tokens_out"),
            cost=Sum("cost_usd"),
        )
        steps = ", ".join(f"{status} {n}" for status, n in sorted(by_status.items())) or "none"
        rows = [
            (list_link(Step, f"{sum(by_status.values())} steps", run__id__exact=run.pk), steps),
            (
                list_link(Event, "events", run__id__exact=run.pk),
                Event.unscoped_all_tenants.filter(run=run).count(),
            ),
            (
                list_link(Usage, f"{usage['rows']} usage rows", run__id__exact=run.pk),
                f"tokens in {usage['tokens_in'] or 0}, out {usage['tokens_out'] or 0},"
                f" cost {usage['cost'] or 0} USD",
            ),
            (list_link(Effect, "effects", step__run__id__exact=run.pk), ""),
            (list_link(ResultRow, "result rows", run__id__exact=run.pk), ""),
            (
                list_link(AuditEntry, "audit entries", target_type="run", target_id=run.pk),
                "",
            ),
        ]
        return table(["records", ""], rows)


@admin.register(Step)
class StepAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "run_link",
        "node_id",
        "status",
        "attempt",
        "worker",
        "duration_ms",
        "tokens_out",
        "cost_usd",
        "tenant",
        "created_at",
    ]
    list_filter = ["status", "queue", "tenant", recent_filter("created_at")]
    list_select_related = ["tenant"]
    search_fields = ["node_id", "worker"]
    readonly_fields = ["run_link", "input_events", "output_events", "usage_rows", "effect_rows"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "run_link",
                    "tenant",
                    "node_id",
                    "node_type",
                    "queue",
                    "status",
                    "attempt",
                    "max_attempts",
                    "worker",
                    "item_index",
                    "scope",
                    "scopes",
                ]
            },
        ),
        ("Lineage", {"fields": ["input_events", "output_events"]}),
        (
            "Attempts, usage and effects",
            {
                "fields": [
                    "usage_rows",
                    "effect_rows",
                    "model",
                    "tokens_in",
                    "tokens_out",
                    "wasted_tokens",
                    "cost_usd",
                    "stop_latency_ms",
                    "error",
                    "skip_reason",
                ]
            },
        ),
        (
            "Timing",
            {
                "fields": [
                    "created_at",
                    "enqueued_at",
                    "started_at",
                    "finished_at",
                    "duration_ms",
                    "operator_ms",
                    "lease_until",
                    "not_before",
                    "deadline",
                ]
            },
        ),
    ]

    @admin.display(description="run")
    def run_link(self, step: Step) -> SafeString:
        return link(Run, step.run_id, f"run {short(step.run_id)}")

    @admin.display(description="input events")
    def input_events(self, step: Step) -> SafeString:
        ids = list(step.inputs[:SHOWN])
        found = Event.unscoped_all_tenants.filter(run_id=step.run_id, id__in=ids)
        by_id = {event.id: event for event in found.select_related("producer")}
        rows = [
            (
                link(Event, event.pk, event_label(event)),
                link(Step, event.producer_id, step_label(event.producer))
                if event.producer is not None
                else "run input",
                preview(event.payload),
            )
            for event in (by_id[i] for i in ids if i in by_id)
        ]
        if not rows:
            return SafeString("none")
        shown = table(["event", "produced by", "payload"], rows)
        return format_html("{}{}", shown, more(len(step.inputs), len(rows)))

    @admin.display(description="output events")
    def output_events(self, step: Step) -> SafeString:
        outputs = Event.unscoped_all_tenants.filter(producer=step).order_by("seq")
        shown = list(outputs[:SHOWN])
        if not shown:
            return SafeString("none")
        taken = consumers_of(step.run_id, [event.id for event in shown])
        rows = [
            (
                link(Event, event.pk, event_label(event)),
                links(link(Step, s.pk, step_label(s)) for s in taken[event.id]) or "none",
                preview(event.payload),
            )
            for event in shown
        ]
        total = outputs.count() if len(shown) == SHOWN else len(shown)
        rest = list_link(Event, "All outputs", producer__id__exact=step.pk)
        return format_html(
            "{}{}", table(["event", "taken by", "payload"], rows), more(total, len(shown), rest)
        )

    @admin.display(description="usage (one row per attempt)")
    def usage_rows(self, step: Step) -> SafeString:
        found = Usage.unscoped_all_tenants.filter(step=step).order_by("at", "id")
        rows = [
            (
                link(Usage, usage.pk, f"{timezone.localtime(usage.at):%Y-%m-%d %H:%M:%S}"),
                usage.model,
                usage.engine,
                usage.tokens_in,
                usage.tokens_out,
                usage.wasted_tokens,
                f"{usage.engine_seconds:.3f}",
                usage.cost_usd,
            )
            for usage in found[:SHOWN]
        ]
        if not rows:
            return SafeString("none")
        headers = ["at", "model", "engine", "in", "out", "wasted", "engine s", "USD"]
        return table(headers, rows)

    @admin.display(description="effects")
    def effect_rows(self, step: Step) -> SafeString:
        found = Effect.unscoped_all_tenants.filter(step=step).order_by("created_at", "id")
        rows = [
            (link(Effect, effect.pk, effect.key), effect.kind, effect.status, effect.calls)
            for effect in found[:SHOWN]
        ]
        return table(["key", "kind", "status", "calls"], rows) if rows else SafeString("none")


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "run_link",
        "producer_link",
        "node_id",
        "port",
        "seq",
        "key",
        "event_time",
        "tenant",
    ]
    list_filter = ["tenant", recent_filter("created_at")]
    list_select_related = ["tenant"]
    search_fields = ["key", "node_id"]
    fields = [
        "id",
        "run_link",
        "producer_link",
        "consumers",
        "tenant",
        "node_id",
        "port",
        "seq",
        "key",
        "event_time",
        "created_at",
        "scopes",
        "payload_json",
    ]
    readonly_fields = ["run_link", "producer_link", "consumers", "payload_json"]

    @admin.display(description="run")
    def run_link(self, event: Event) -> SafeString:
        return link(Run, event.run_id, f"run {short(event.run_id)}")

    @admin.display(description="produced by")
    def producer_link(self, event: Event) -> SafeString | str:
        if event.producer_id is None:
            return "run input"
        return link(Step, event.producer_id, f"{event.node_id} {short(event.producer_id)}")

    @admin.display(description="taken by")
    def consumers(self, event: Event) -> SafeString | str:
        steps = consumers_of(event.run_id, [event.id])[event.id]
        return links(link(Step, s.pk, step_label(s)) for s in steps[:SHOWN]) or "none"

    @admin.display(description="payload")
    def payload_json(self, event: Event) -> SafeString:
        return pretty_json(event.payload)


@admin.register(FanIn)
class FanInAdmin(ReadOnlyAdmin):
    list_display = ["fanout_step", "run", "collect_node_id", "pending", "failed", "closed"]
    list_select_related = ["fanout_step", "run"]


@admin.register(FanInArrival)
class FanInArrivalAdmin(ReadOnlyAdmin):
    list_display = ["id", "fanin", "event"]
    list_select_related = ["fanin", "event"]


@admin.register(StreamRelay)
class StreamRelayAdmin(ReadOnlyAdmin):
    """Step outputs on their way back into a stream segment (a window after an LLM): a row
    lingering unsent means no Kafka worker runs the deployment."""

    list_display = ["id", "run", "node_id", "key", "event_time", "sent_at", "created_at"]
    list_filter = ["tenant"]
    list_select_related = ["run"]


@admin.register(ResultRow)
class ResultRowAdmin(ReadOnlyAdmin):
    list_display = ["id", "run", "table", "created_at"]
    list_filter = ["table", "tenant"]
    list_select_related = ["run"]


@admin.register(Effect)
class EffectAdmin(ReadOnlyAdmin):
    list_display = [
        "key",
        "kind",
        "status",
        "calls",
        "tenant",
        "step_link",
        "created_at",
        "completed_at",
    ]
    list_filter = ["kind", "status", "tenant", recent_filter("created_at")]
    list_select_related = ["tenant", "step"]
    search_fields = ["key"]
    date_hierarchy = "created_at"
    fields = [
        "key",
        "kind",
        "status",
        "calls",
        "tenant",
        "step_link",
        "run_link",
        "request_digest",
        "result_json",
        "error",
        "created_at",
        "completed_at",
    ]
    readonly_fields = ["step_link", "run_link", "result_json"]
    # The run page's link to a run's effects goes through their step.
    extra_lookups = {"step__run__id__exact"}

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        return lookup in self.extra_lookups or super().lookup_allowed(lookup, value, request)

    @admin.display(description="step")
    def step_link(self, effect: Effect) -> SafeString:
        return link(Step, effect.step_id, step_label(effect.step))

    @admin.display(description="run")
    def run_link(self, effect: Effect) -> SafeString:
        return link(Run, effect.step.run_id, f"run {short(effect.step.run_id)}")

    @admin.display(description="result")
    def result_json(self, effect: Effect) -> SafeString:
        return pretty_json(effect.result)


def _add_totals(response: HttpResponse) -> None:
    """Adds the sums over the changelist's filtered rows (all pages) to its context."""
    if not isinstance(response, TemplateResponse) or response.context_data is None:
        return
    changelist = response.context_data.get("cl")
    if changelist is None:
        return
    response.context_data["totals"] = changelist.queryset.aggregate(
        rows=Count("id"),
        tokens_in=Sum("tokens_in"),
        tokens_out=Sum("tokens_out"),
        wasted_tokens=Sum("wasted_tokens"),
        engine_seconds=Sum("engine_seconds"),
        cost_usd=Sum("cost_usd"),
    )


@admin.register(Usage)
class UsageAdmin(ReadOnlyAdmin):
    list_display = [
        "at",
        "tenant",
        "run_link",
        "step_link",
        "model",
        "engine",
        "tokens_in",
        "tokens_out",
        "wasted_tokens",
        "engine_seconds",
        "cost_usd",
    ]
    list_filter = ["tenant", "model", "engine", recent_filter("at")]
    list_select_related = ["tenant", "step"]
    date_hierarchy = "at"
    readonly_fields = ["run_link", "step_link"]
    exclude = ["run", "step"]

    @admin.display(description="run")
    def run_link(self, usage: Usage) -> SafeString:
        return link(Run, usage.run_id, f"run {short(usage.run_id)}")

    @admin.display(description="step")
    def step_link(self, usage: Usage) -> SafeString:
        if usage.step is None:
            return SafeString("")
        return link(Step, usage.step_id, step_label(usage.step))

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        _add_totals(response)
        return response
