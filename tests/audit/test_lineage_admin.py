"""A finished run on real workers, browsed in the admin along its lineage: each step links
to the events it took and the steps that produced them, to the events it produced and the
steps that took them, and to its usage rows and effects."""

import pytest
from django.db.models import Model
from django.urls import reverse

from apps.runs.models import Effect, Event, Run, RunStatus, Step, Usage
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.audit.helpers import staff_client
from tests.conftest import World
from tests.runs.helpers import wait_for_run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {
            "id": "gen",
            "type": "llm.generate",
            "config": {"prompt": "Say {{ word }}", "max_tokens": 8},
        },
        {"id": "store", "type": "sink.table", "config": {"table": "texts"}},
    ],
    "edges": [["in", "gen"], ["gen", "store"]],
}


def change(model: type[Model], pk: object) -> str:
    return f'href="{reverse(f"admin:runs_{model._meta.model_name}_change", args=[pk])}"'


def test_step_and_event_pages_link_along_the_lineage(world: World, platform: object) -> None:
    graph = world.graph("lineage", SPEC)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"word": "<i>hi</i>"}, actor=world.owner
        )
    assert wait_for_run(run).status == RunStatus.SUCCEEDED
    steps = {s.node_id: s for s in Step.unscoped_all_tenants.filter(run=run)}
    source, gen, store = steps["in"], steps["gen"], steps["store"]
    source_out = Event.unscoped_all_tenants.get(producer=source)
    gen_out = Event.unscoped_all_tenants.get(producer=gen)
    assert gen.inputs == [source_out.id] and store.inputs == [gen_out.id]
    usage = Usage.unscoped_all_tenants.get(step=gen)
    effect = Effect.unscoped_all_tenants.get(step=store)
    client = staff_client()

    page = client.get(reverse("admin:runs_step_change", args=[gen.pk])).content.decode()
    lineage = page[page.index("Lineage") :]
    assert change(Event, source_out.pk) in lineage  # its input event...
    assert change(Step, source.pk) in lineage  # ...and the step that produced it
    assert change(Event, gen_out.pk) in lineage  # its output event...
    assert change(Step, store.pk) in lineage  # ...and the step that took it
    assert change(Usage, usage.pk) in lineage
    assert change(Run, run.pk) in page
    assert "<i>hi</i>" not in page and "&lt;i&gt;hi&lt;/i&gt;" in page  # payloads escaped

    page = client.get(reverse("admin:runs_step_change", args=[store.pk])).content.decode()
    assert change(Effect, effect.pk) in page and change(Step, gen.pk) in page

    page = client.get(reverse("admin:runs_event_change", args=[gen_out.pk])).content.decode()
    assert change(Step, gen.pk) in page and change(Step, store.pk) in page

    page = client.get(reverse("admin:runs_event_change", args=[source_out.pk])).content.decode()
    assert change(Step, source.pk) in page and change(Step, gen.pk) in page
    assert change(Step, store.pk) not in page

    page = client.get(reverse("admin:runs_run_change", args=[run.pk])).content.decode()
    assert f'href="/admin/runs/step/?run__id__exact={run.pk}"' in page
    assert "done 3" in page
    listing = client.get(f"/admin/runs/step/?run__id__exact={run.pk}")
    assert {s.pk for s in listing.context["cl"].result_list} == {source.pk, gen.pk, store.pk}
