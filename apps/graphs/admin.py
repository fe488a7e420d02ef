from django.contrib import admin

from apps.graphs.models import GraphVersion, StreamGraph
from apps.tenants.admin_base import ReadOnlyAdmin


@admin.register(StreamGraph)
class StreamGraphAdmin(ReadOnlyAdmin):
    list_display = ["slug", "name", "tenant", "deployed_version", "created_at"]
    list_filter = ["tenant"]
    search_fields = ["slug", "name"]


@admin.register(GraphVersion)
class GraphVersionAdmin(ReadOnlyAdmin):
    list_display = ["graph", "number", "checksum", "created_by", "created_at", "tenant"]
    list_filter = ["tenant"]
