"""The tenant-scoped manager fails closed, and immutable rows stay immutable."""

import pytest
from django.db import IntegrityError, transaction

from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.services import GraphExists, create_graph
from apps.graphs.validation import SpecInvalid
from apps.runs.models import Event
from apps.runs.services import start_run
from apps.tenants.context import NoTenantSelected, tenant_context
from tests.conftest import World

pytestmark = pytest.mark.django_db

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "out", "type": "sink.table", "config": {"table": "t"}},
    ],
    "edges": [["in", "out"]],
}


def test_scoped_manager_without_a_tenant_raises_instead_of_returning_everything(
    world: World,
) -> None:
    world.graph("mine", SPEC)
    with pytest.raises(NoTenantSelected):
        list(StreamGraph.objects.all())


def test_each_tenant_sees_only_its_own_rows(world: World) -> None:
    world.graph("acme-graph", SPEC)
    world.graph("globex-graph", SPEC, tenant=world.globex)
    with tenant_context(world.acme):
        assert list(StreamGraph.objects.values_list("slug", flat=True)) == ["acme-graph"]
    with tenant_context(world.globex):
        assert list(StreamGraph.objects.values_list("slug", flat=True)) == ["globex-graph"]
        assert not GraphVersion.objects.filter(graph__slug="acme-graph").exists()


def test_a_bad_spec_writes_nothing(world: World) -> None:
    bad = {**SPEC, "edges": [["in", "nowhere"]]}
    before = AuditEntry.unscoped_all_tenants.count()
    with tenant_context(world.acme), pytest.raises(SpecInvalid) as caught:
        create_graph(slug="bad", name="Bad", spec=bad, actor=world.owner)
    assert [str(e) for e in caught.value.errors] == [
        "edge 0: node 'nowhere' does not exist",
        "node 'out': has no incoming edge; only the source node may start the graph",
    ]
    assert not StreamGraph.unscoped_all_tenants.filter(slug="bad").exists()
    assert AuditEntry.unscoped_all_tenants.count() == before


def test_graph_slugs_are_unique_per_tenant_only(world: World) -> None:
    world.graph("same", SPEC)
    world.graph("same", SPEC, tenant=world.globex)
    with pytest.raises(GraphExists):
        world.graph("same", SPEC)
    # The service checks first; the database refuses a duplicate all the same.
    with tenant_context(world.acme), pytest.raises(IntegrityError), transaction.atomic():
        StreamGraph.objects.create(slug="same", name="Same again")


def test_versions_events_and_audit_entries_refuse_changes_in_the_database(world: World) -> None:
    graph = world.graph("frozen", SPEC)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"a": 1}, actor=world.owner)
        for rows, change in (
            (GraphVersion.objects.filter(graph=graph), {"note": "rewritten"}),
            (Event.objects.filter(run=run), {"payload": {"a": 2}}),
            (AuditEntry.objects.all(), {"action": "nothing.happened"}),
        ):
            with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
                rows.update(**change)
        with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
            AuditEntry.objects.all().delete()
