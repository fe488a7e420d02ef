import json

from django.contrib import admin
from django.utils.safestring import SafeString

from apps.live.models import PruneCursor, PrunedFeed, RunFrame
from apps.runs.models import Run
from apps.tenants.admin_base import ReadOnlyAdmin, link, pretty_json


@admin.register(RunFrame)
class RunFrameAdmin(ReadOnlyAdmin):
    list_display = ["id", "run_link", "seq", "kind", "tenant"]
    list_filter = ["kind", "tenant"]
    list_select_related = ["tenant"]
    fields = ["id", "run_link", "seq", "kind", "tenant", "body_json"]
    readonly_fields = ["run_link", "body_json"]

    @admin.display(description="run")
    def run_link(self, frame: RunFrame) -> SafeString:
        return link(Run, frame.run_id, f"run {str(frame.run_id)[:8]}")

    @admin.display(description="body")
    def body_json(self, frame: RunFrame) -> SafeString:
        try:
            return pretty_json(json.loads(frame.body))
        except ValueError:
            return pretty_json(frame.body)


@admin.register(PrunedFeed)
class PrunedFeedAdmin(ReadOnlyAdmin):
    list_display = ["id", "run_link", "last_seq", "pruned_at", "tenant"]
    list_filter = ["tenant"]
    list_select_related = ["tenant"]
    fields = ["id", "run_link", "last_seq", "pruned_at", "tenant"]
    readonly_fields = ["run_link"]

    @admin.display(description="run")
    def run_link(self, pruned: PrunedFeed) -> SafeString:
        return link(Run, pruned.run_id, f"run {str(pruned.run_id)[:8]}")


@admin.register(PruneCursor)
class PruneCursorAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "finished_at", "run_id"]
    list_select_related = ["tenant"]
