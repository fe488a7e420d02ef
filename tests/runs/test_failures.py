"""Items that fail inside a fan-out: the collect's policy (fail the run, or collect what
succeeded and list the failures), node deadlines, and replaying dead steps after a fix, from
the service and from the run page's button."""

from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.runs.models import Event, FanIn, ResultRow, Run, RunStatus, Step, StepStatus
from apps.runs.replay import ReplayRefused, replay_dead_steps
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.effect_service import EffectService
from tests.runs.helpers import wait_for_run
from tests.runs.test_effects import allow_loopback

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

ITEMS = 5
BROKEN_ITEM = 2


@pytest.fixture
def service() -> Iterator[EffectService]:
    with EffectService() as running:
        running.broken.add(f"/item/{BROKEN_ITEM}")
        yield running


def fanout_spec(url: str, collect_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {"id": "call", "type": "tool.http", "config": {"url": url + "/item/{{ item }}"}},
            {"id": "gather", "type": "collect", "config": {"by": "split", **collect_config}},
            {"id": "store", "type": "sink.table", "config": {"table": "gathered"}},
        ],
        "edges": [["in", "split"], ["split", "call"], ["call", "gather"], ["gather", "store"]],
    }


def start(world: World, spec: dict[str, Any], slug: str = "failing") -> Run:
    allow_loopback(world)
    graph = world.graph(slug, spec)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"items": list(range(ITEMS))}, actor=world.owner
        )
    return wait_for_run(run, timeout=60)


def test_collect_succeeded_collects_the_rest_and_lists_the_failure(
    world: World, platform: object, service: EffectService
) -> None:
    run = start(world, fanout_spec(service.url, {"on_item_failure": "collect_succeeded"}))
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        row = ResultRow.objects.get(run=run, table="gathered").data
        assert [item["item"] for item in row["items"]] == [0, 1, 3, 4]
        assert row["count"] == ITEMS - 1
        [failure] = row["failures"]
        assert failure["index"] == BROKEN_ITEM and failure["node"] == "call"
        assert "answered 400" in failure["error"]
        # The failure was handled: the run succeeded, and there is nothing to replay into.
        with pytest.raises(ReplayRefused, match="run is succeeded"):
            replay_dead_steps(run, actor=world.owner)


def test_fail_run_does_not_collect_and_a_replay_after_the_fix_completes_the_run(
    world: World, platform: object, service: EffectService
) -> None:
    run = start(world, fanout_spec(service.url, {}))
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED
        assert run.error.startswith("1 failed step: call: attempt 1/3")
        assert not Step.objects.filter(run=run, node_id="gather").exists()
        assert FanIn.objects.get(run=run).closed == "failed"
        performed_before = dict(service.performed)

        service.broken.clear()  # the fix
        assert replay_dead_steps(run, actor=world.operator) == 1
        run = wait_for_run(run, timeout=60)
        assert run.status == RunStatus.SUCCEEDED, run.error
        assert run.error == "" and run.failures == 0
        row = ResultRow.objects.get(run=run, table="gathered").data
        assert [item["item"] for item in row["items"]] == list(range(ITEMS))
        assert "failures" not in row
        # Items that had succeeded were not called again; the replayed one was called once.
        assert len(service.performed) == ITEMS and set(service.performed.values()) == {1}
        assert {k: service.performed[k] for k in performed_before} == performed_before
        entry = AuditEntry.objects.get(action="run.replay", target_id=str(run.id))
        assert entry.actor_id == world.operator.pk


def test_a_step_past_its_node_deadline_is_skipped_and_fails_the_run(
    world: World, platform: object
) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "gen",
                "type": "llm.generate",
                "ttl_s": 1,
                # About five seconds on the test engine: the deadline comes first.
                "config": {"prompt": "Say a lot", "max_tokens": 2000},
            },
        ],
        "edges": [["in", "gen"]],
    }
    graph = world.graph("slow-node", spec)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={}, actor=world.owner)
        run = wait_for_run(run, timeout=30)
        gen = Step.objects.get(run=run, node_id="gen")
        assert gen.status == StepStatus.SKIPPED and gen.skip_reason == "deadline"
        assert not Event.objects.filter(producer=gen).exists()
        assert run.status == RunStatus.FAILED and run.error == "1 failed step: gen: deadline"


def logged_in(client: Client, name: str) -> Client:
    assert client.login(username=name, password="pw-" + name)
    return client


def test_the_run_page_lists_dead_steps_and_its_button_replays_them(
    client: Client, world: World, platform: object, service: EffectService
) -> None:
    run = start(world, fanout_spec(service.url, {}), slug="button")
    url = reverse("runs:detail", args=[run.id])
    page = logged_in(client, "viewer").get(url).content.decode()
    assert "Dead steps (1)" in page and "answered 400" in page
    assert reverse("runs:replay", args=[run.id]) not in page  # viewers see no button
    assert client.post(reverse("runs:replay", args=[run.id])).status_code == 403

    client.logout()
    page = logged_in(client, "operator").get(url).content.decode()
    assert "Replay 1 dead step" in page
    service.broken.clear()
    response = client.post(reverse("runs:replay", args=[run.id]))
    assert response.status_code == 302 and response["Location"] == url
    with tenant_context(world.acme):
        assert wait_for_run(run, timeout=60).status == RunStatus.SUCCEEDED


def test_replay_of_another_tenants_run_is_not_found(
    client: Client, world: World, platform: object, service: EffectService
) -> None:
    run = start(world, fanout_spec(service.url, {}), slug="private")
    response = logged_in(client, "outsider").post(reverse("runs:replay", args=[run.id]))
    assert response.status_code == 404
    with tenant_context(world.acme):
        run.refresh_from_db()
        assert run.status == RunStatus.FAILED
        assert Step.objects.filter(run=run, status=StepStatus.DEAD).count() == 1
