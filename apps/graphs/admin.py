from django.contrib import admin
from django.utils.safestring import SafeString

from apps.graphs.models import GraphVersion, StreamGraph
from apps.runs.models import Run
from apps.tenants.admin_base import ReadOnlyAdmin, link, list_link, pretty_json


@admin.register(StreamGraph)
class StreamGraphAdmin(ReadOnlyAdmin):
    list_display = ["slug", "name", "tenant", "deployed", "created_at"]
    list_filter = ["tenant"]
    list_select_related = ["tenant", "deployed_version"]
    search_fields = ["slug", "name"]
    fields = ["slug", "name", "description", "tenant", "deployed", "versions", "created_at"]
    readonly_fields = ["deployed", "versions"]

    @admin.display(description="deployed version")
    def deployed(self, graph: StreamGraph) -> SafeString:
        version = graph.deployed_version
        if version is None:
            return SafeString("")
        return link(GraphVersion, version.pk, f"v{version.number}")

    @admin.display(description="versions")
    def versions(self, graph: StreamGraph) -> SafeString:
        return list_link(GraphVersion, "all versions", graph__id__exact=graph.pk)


@admin.register(GraphVersion)
class GraphVersionAdmin(ReadOnlyAdmin):
    list_display = ["graph", "number", "checksum", "created_by", "created_at", "tenant"]
    list_filter = ["tenant"]
    list_select_related = ["graph", "created_by", "tenant"]
    search_fields = ["graph__slug", "checksum"]
    fields = [
        "graph",
        "number",
        "note",
        "checksum",
        "created_by",
        "created_at",
        "tenant",
        "runs",
        "spec_json",
    ]
    readonly_fields = ["runs", "spec_json"]

    @admin.display(description="runs")
    def runs(self, version: GraphVersion) -> SafeString:
        return list_link(Run, "runs of this version", graph_version__id__exact=version.pk)

    @admin.display(description="spec")
    def spec_json(self, version: GraphVersion) -> SafeString:
        return pretty_json(version.spec)
