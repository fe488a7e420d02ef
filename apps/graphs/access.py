"""Tenant-checked reads. Missing and not-yours look the same: 404."""

from functools import lru_cache
from typing import Any

from django.http import Http404
from django.shortcuts import get_object_or_404

from apps.graphs.models import GraphVersion, StreamGraph


def graph_by_slug(slug: str) -> StreamGraph:
    if "\x00" in slug:  # from a form, not a URL: no graph has it, and PostgreSQL refuses it
        raise Http404("no such graph")
    return get_object_or_404(StreamGraph.objects.select_related("deployed_version"), slug=slug)


def version_of(graph: StreamGraph, number: int) -> GraphVersion:
    return get_object_or_404(GraphVersion.objects, graph=graph, number=number)


@lru_cache(maxsize=256)
def version_spec(version_id: int) -> dict[str, Any]:
    """A version's spec, parsed once per process: versions are immutable, and workers read
    the spec of every step they run. Callers reach a version id only through a row of
    their own tenant, and must not mutate the returned dict."""
    spec: dict[str, Any] = GraphVersion.objects.values_list("spec", flat=True).get(id=version_id)
    return spec


@lru_cache(maxsize=256)
def version_nodes(version_id: int) -> dict[str, dict[str, Any]]:
    """A version's nodes by id, built once per process (same terms as version_spec)."""
    return {node["id"]: node for node in version_spec(version_id)["nodes"]}
