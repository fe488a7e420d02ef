"""Tenant-checked reads. Missing and not-yours look the same: 404."""

from django.shortcuts import get_object_or_404

from apps.graphs.models import GraphVersion, StreamGraph


def graph_by_slug(slug: str) -> StreamGraph:
    return get_object_or_404(StreamGraph.objects.select_related("deployed_version"), slug=slug)


def version_of(graph: StreamGraph, number: int) -> GraphVersion:
    return get_object_or_404(GraphVersion.objects, graph=graph, number=number)
