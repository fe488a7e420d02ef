"""Stream deployments, their partition offsets, dead letters and keyed state (windows,
memory) in the admin, read-only: they change only through apps.streams.services and the
Kafka workers' checkpoints. The webhook signing secret is never shown, not even encrypted."""

from django.contrib import admin
from django.utils.safestring import SafeString

from apps.runs.models import Run
from apps.streams.access import datetime_of_ms
from apps.streams.models import DeadLetter, Deployment, KeyedState, PartitionOffset
from apps.tenants.admin_base import ReadOnlyAdmin, link, list_link, recent_filter


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "tenant",
        "graph",
        "version_number",
        "source_kind",
        "status",
        "created_at",
    ]
    list_filter = ["status", "source_kind", "tenant", recent_filter("created_at")]
    list_select_related = ["tenant", "graph", "version"]
    search_fields = ["graph__slug", "group_id"]
    exclude = ["webhook_secret"]
    readonly_fields = ["run_link", "records"]

    @admin.display(description="version")
    def version_number(self, deployment: Deployment) -> str:
        return f"v{deployment.version.number}"

    @admin.display(description="stream run")
    def run_link(self, deployment: Deployment) -> SafeString:
        return link(Run, deployment.run_id, deployment.run_id)

    @admin.display(description="records")
    def records(self, deployment: Deployment) -> SafeString:
        return SafeString(
            list_link(PartitionOffset, "partition offsets", deployment__id__exact=deployment.pk)
            + " · "
            + list_link(DeadLetter, "dead letters", deployment__id__exact=deployment.pk)
            + " · "
            + list_link(KeyedState, "keyed state", deployment__id__exact=deployment.pk)
        )


@admin.register(PartitionOffset)
class PartitionOffsetAdmin(ReadOnlyAdmin):
    list_display = [
        "deployment",
        "topic",
        "partition",
        "next_offset",
        "high_watermark",
        "lag",
        "records",
        "dead_letters",
        "rate",
        "watermark_at",
        "late_total",
        "updated_at",
    ]
    list_filter = ["tenant"]
    list_select_related = ["deployment"]
    search_fields = ["topic"]

    @admin.display(description="watermark (UTC)")
    def watermark_at(self, offset: PartitionOffset) -> str:
        watermark = datetime_of_ms(offset.watermark_ms)
        return watermark.strftime("%Y-%m-%d %H:%M:%S") if watermark else "—"


@admin.register(KeyedState)
class KeyedStateAdmin(ReadOnlyAdmin):
    list_display = ["deployment", "owner", "partition", "key", "slot", "updated_at"]
    list_filter = ["tenant", recent_filter("updated_at")]
    list_select_related = ["deployment"]
    search_fields = ["owner", "key", "partition"]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "tenant",
        "deployment",
        "topic",
        "partition",
        "offset",
        "error",
        "created_at",
        "replayed_at",
    ]
    list_filter = ["tenant", recent_filter("created_at")]
    list_select_related = ["tenant", "deployment"]
    search_fields = ["topic", "key", "error"]
    date_hierarchy = "created_at"
