"""Creating graphs and their immutable versions. The spec is validated before the
transaction opens; a bad spec writes nothing."""

from typing import Any

from django.db import transaction
from django.db.models import Max

from apps.audit.services import Actor, record
from apps.graphs.models import GraphVersion, StreamGraph, spec_checksum
from apps.graphs.validation import SpecError, SpecInvalid, check_spec
from apps.tenants.context import current_tenant
from workers import kafka


def create_graph(
    *, slug: str, name: str, spec: Any, actor: Actor, description: str = "", note: str = ""
) -> StreamGraph:
    spec = check_spec(spec)
    with transaction.atomic():
        graph = new_graph(slug=slug, name=name, actor=actor, description=description)
        version = _add_version(graph, spec, actor=actor, note=note or "first version")
        graph.deployed_version = version
        graph.save(update_fields=["deployed_version"])
    return graph


def new_graph(*, slug: str, name: str, actor: Actor, description: str = "") -> StreamGraph:
    """A graph with no version yet, for the editor to draw its first one. A slug already in
    use by this tenant raises GraphExists."""
    with transaction.atomic():
        if StreamGraph.objects.filter(slug=slug).exists():
            raise GraphExists(f"A graph with the slug {slug!r} already exists.")
        graph = StreamGraph.objects.create(slug=slug, name=name, description=description)
        record(
            tenant=current_tenant(),
            actor=actor,
            action="graph.create",
            target_type="graph",
            target_id=graph.pk,
            after={"slug": slug, "name": name},
        )
    return graph


class GraphExists(Exception):
    pass


class StaleVersion(Exception):
    """The editor saved on top of a version that is no longer the latest."""


def save_version(
    *, graph: StreamGraph, spec: Any, actor: Actor, note: str, based_on: int | None
) -> GraphVersion:
    """The editor's save: a new version that is not deployed, unless the graph has none yet
    (a graph with no deployed version cannot run at all). `based_on` is the version the
    editor opened; if someone saved another since, StaleVersion is raised and nothing is
    written, so one person's save never silently discards another's."""
    spec = check_spec(spec)
    with transaction.atomic():
        locked = StreamGraph.objects.select_for_update().get(pk=graph.pk)
        latest = locked.versions.aggregate(latest=Max("number"))["latest"]
        if latest != based_on:
            raise StaleVersion(
                f"Version {latest} was saved since you opened version {based_on}. Reload the"
                " editor to see it (your changes are not saved)."
            )
        version = _add_version(locked, spec, actor=actor, note=note)
        if locked.deployed_version_id is None:
            _deploy(locked, version, actor=actor)
    return version


def deploy_version(*, graph: StreamGraph, version: GraphVersion, actor: Actor) -> None:
    """Marks `version` as the one new runs use."""
    with transaction.atomic():
        locked = StreamGraph.objects.select_for_update().get(pk=graph.pk)
        if locked.deployed_version_id != version.pk:
            _deploy(locked, version, actor=actor)


def roll_back(*, graph: StreamGraph, to: GraphVersion, actor: Actor) -> GraphVersion:
    """A new version whose spec equals `to`'s. History is never rewritten: the versions in
    between stay, and the rollback is deployed only if the graph's deployed version was
    the latest (otherwise someone chose to deploy an older one; leave that choice)."""
    with transaction.atomic():
        locked = StreamGraph.objects.select_for_update().get(pk=graph.pk)
        latest = locked.versions.aggregate(latest=Max("number"))["latest"]
        deployed_latest = (
            locked.deployed_version is not None and locked.deployed_version.number == latest
        )
        version = _add_version(
            locked, to.spec, actor=actor, note=f"Rollback to version {to.number}"
        )
        if deployed_latest:
            _deploy(locked, version, actor=actor)
    return version


def _deploy(graph: StreamGraph, version: GraphVersion, *, actor: Actor) -> None:
    before = graph.deployed_version.number if graph.deployed_version else None
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


def _check_topics(spec: dict[str, Any], tenant_slug: str) -> None:
    """A graph may name only its own tenant's Kafka topics (DESIGN "Partitioning")."""
    errors = [
        SpecError(f"node '{node_id}'", f"config.{field}", problem)
        for node_id, field, problem in kafka.spec_topic_problems(spec, tenant_slug)
    ]
    if errors:
        raise SpecInvalid(errors)


def add_version(
    *, graph: StreamGraph, spec: Any, actor: Actor, note: str = "", deploy: bool = True
) -> GraphVersion:
    spec = check_spec(spec)
    with transaction.atomic():
        # Lock the graph so two saves cannot take the same version number.
        graph = StreamGraph.objects.select_for_update().get(pk=graph.pk)
        version = _add_version(graph, spec, actor=actor, note=note)
        if deploy:
            _deploy(graph, version, actor=actor)
    return version


def _add_version(
    graph: StreamGraph, spec: dict[str, Any], *, actor: Actor, note: str
) -> GraphVersion:
    _check_topics(spec, current_tenant().slug)
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
