import hashlib
import json
from typing import Any

from django.conf import settings
from django.db import models

from apps.tenants.models import TenantModel


def spec_checksum(spec: dict[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON: equal specs have equal checksums."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class StreamGraph(TenantModel):
    slug = models.SlugField(max_length=63)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    deployed_version = models.ForeignKey(
        "GraphVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        constraints = [
            models.UniqueConstraint(fields=["tenant", "slug"], name="graph_slug_unique_per_tenant")
        ]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def live_version(self) -> "GraphVersion":
        """The version new runs use. Every graph gets one on creation."""
        if self.deployed_version is None:
            raise GraphVersion.DoesNotExist(f"graph {self.slug!r} has no deployed version")
        return self.deployed_version


class GraphVersion(TenantModel):
    """An immutable, validated spec. A trigger (migration 0002) refuses UPDATE."""

    graph = models.ForeignKey(StreamGraph, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    spec = models.JSONField()
    checksum = models.CharField(max_length=64)
    note = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        constraints = [
            models.UniqueConstraint(fields=["graph", "number"], name="graph_version_number_unique")
        ]
        ordering = ["graph", "-number"]

    def __str__(self) -> str:
        return f"{self.graph_id} v{self.number}"

    def node(self, node_id: str) -> dict[str, Any]:
        for node in self.spec["nodes"]:
            if node["id"] == node_id:
                return dict(node)
        raise KeyError(node_id)
