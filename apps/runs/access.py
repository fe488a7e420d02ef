"""Tenant-checked reads for runs. Missing and not-yours look the same: 404."""

from uuid import UUID

from django.shortcuts import get_object_or_404

from apps.runs.models import Run


def run_by_id(run_id: UUID) -> Run:
    return get_object_or_404(
        Run.objects.select_related("graph_version", "graph_version__graph", "created_by"), id=run_id
    )
