"""Creating graphs and their immutable versions. The spec is validated before the
transaction opens; a bad spec writes nothing."""

from typing import Any

from django.db import transaction
from django.db.models import Max

from apps.audit.services import Actor, record
from apps.graphs.models import GraphVersion, StreamGraph, spec_checksum
from apps.graphs.validation import check_spec
from apps.tenants.context import current_tenant


def create_graph(
    *, slug: str, name: str, spec: Any, actor: Actor, description: str = "", note: str = ""
) -> StreamGraph:
    spec = check_spec(spec)
    with transaction.atomic():
        graph = StreamGraph.objects.create(slug=slug, name=name, description=description)
        record(
            tenant=current_tenant(),
            actor=actor,
            action="graph.create",
            target_type="graph",
            target_id=graph.pk,
            after={"slug": slug, "name": name},
        )
        version = _add_version(graph, spec, actor=actor, note=note or "first version")
        graph.deployed_version = version
        graph.save(update_fields=["deployed_version"])
    return graph


def add_version(
    *, graph: StreamGraph, spec: Any, actor: Actor, note: str = "", deploy: bool = True
) -> GraphVersion:
    spec = check_spec(spec)
    with transaction.atomic():
        # Lock the graph so two saves cannot take the same version number.
        graph = StreamGraph.objects.select_for_update().get(pk=graph.pk)
        before = graph.deployed_version.number if graph.deployed_version else None
        version = _add_version(graph, spec, actor=actor, note=note)
        if deploy:
            graph.deployed_version = version
            graph.save(update_fields=["deployed_version"])
            record(
                tenant=current_tenant(),
                actor=actor,
                action="graph.deploy",
                target_type="graph",
                target_id=graph.pk,
                before={"version": before},
                after={"version": version.number},
            )
    return version


def _add_version(
    graph: StreamGraph, spec: dict[str, Any], *, actor: Actor, note: str
) -> GraphVersion:
    latest = graph.versions.aggregate(latest=Max("number"))["latest"] or 0
    version = GraphVersion.objects.create(
        graph=graph,
        number=latest + 1,
        spec=spec,
        checksum=spec_checksum(spec),
        note=note,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    record(
        tenant=current_tenant(),
        actor=actor,
        action="graph_version.create",
        target_type="graph_version",
        target_id=version.pk,
        after={"graph": graph.slug, "number": version.number, "checksum": version.checksum},
    )
    return version
