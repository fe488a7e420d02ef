from django.contrib import admin

from apps.runs.models import Effect, Event, FanIn, FanInArrival, ResultRow, Run, Step, Usage
from apps.tenants.admin_base import ReadOnlyAdmin


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "graph_version", "kind", "status", "open_steps", "created_at"]
    list_filter = ["status", "kind", "tenant"]


@admin.register(Step)
class StepAdmin(ReadOnlyAdmin):
    list_display = ["id", "run", "node_id", "status", "attempt", "worker", "duration_ms"]
    list_filter = ["status", "queue", "tenant"]
    search_fields = ["node_id", "worker"]


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["id", "run", "node_id", "port", "seq", "event_time"]
    list_filter = ["tenant"]


@admin.register(FanIn)
class FanInAdmin(ReadOnlyAdmin):
    list_display = ["fanout_step", "run", "collect_node_id", "pending", "failed", "closed"]


@admin.register(FanInArrival)
class FanInArrivalAdmin(ReadOnlyAdmin):
    list_display = ["id", "fanin", "event"]


@admin.register(ResultRow)
class ResultRowAdmin(ReadOnlyAdmin):
    list_display = ["id", "run", "table", "created_at"]
    list_filter = ["table", "tenant"]


@admin.register(Effect)
class EffectAdmin(ReadOnlyAdmin):
    list_display = ["key", "kind", "status", "created_at", "completed_at"]
    list_filter = ["kind", "status", "tenant"]


@admin.register(Usage)
class UsageAdmin(ReadOnlyAdmin):
    list_display = ["at", "tenant", "run", "model", "engine", "tokens_in", "tokens_out", "cost_usd"]
    list_filter = ["engine", "model", "tenant"]
