"""The deployments pages: the list (and its empty state), one deployment's page and its
polled status partial, the actions on it (pause, resume, drain and stop, redeploy, replay a
dead letter), "Deploy as stream" on the graph's page, who may do what, and that another
tenant's deployment is a 404 everywhere, exactly as a missing one.

Deployments are made through apps.streams.services. Kafka deployments need no broker here:
deploying only checks that KAFKA_BOOTSTRAP_SERVERS is set, so the tests set it themselves;
their partition offsets and dead letters, which Kafka workers would write, are made
directly, for display. No worker runs: steps a replay creates stay queued."""

import html
import os
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.graphs.models import StreamGraph
from apps.graphs.services import add_version
from apps.runs.models import Step, StepStatus
from apps.streams import services
from apps.streams.access import deployment_status
from apps.streams.models import (
    DeadLetter,
    Deployment,
    DeploymentStatus,
    PartitionOffset,
    ScheduleTick,
    WebhookDelivery,
)
from apps.streams.webhooks import reveal_secret
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.web.test_pages import SPEC, sign_in

pytestmark = pytest.mark.django_db

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"


def webhook_spec(template: str = "{{ x }}") -> dict[str, Any]:
    """webhook -> shape (in the segment) -> ask (an LLM: a durable step) -> keep."""
    return {
        "nodes": [
            {
                "id": "hook",
                "type": "source.webhook",
                "config": {"input_schema": {"type": "object", "required": ["x"]}},
            },
            {
                "id": "shape",
                "type": "transform.template",
                "config": {"template": template, "output": "text"},
            },
            {
                "id": "ask",
                "type": "llm.generate",
                "config": {"prompt": "Say {{ text }}", "max_tokens": 5},
            },
            {"id": "keep", "type": "sink.table", "config": {"table": "answers"}},
        ],
        "edges": [["hook", "shape"], ["shape", "ask"], ["ask", "keep"]],
    }


SCHEDULE_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "tick", "type": "source.schedule", "config": {"cron": "*/5 * * * *"}},
        {"id": "keep", "type": "sink.table", "config": {"table": "ticks"}},
    ],
    "edges": [["tick", "keep"]],
}


def kafka_spec(tenant_slug: str = "acme") -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": "orders",
                "type": "source.kafka",
                "config": {"topics": [f"{tenant_slug}.orders"]},
            },
            {"id": "keep", "type": "sink.table", "config": {"table": "orders"}},
        ],
        "edges": [["orders", "keep"]],
    }


@pytest.fixture
def kafka_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kafka deployments pass the deploy check; no broker is contacted by deploying."""
    monkeypatch.setenv(KAFKA_ENV, os.environ.get(KAFKA_ENV) or "127.0.0.1:9")
    yield


def actor_of(world: World, tenant: Tenant) -> Any:
    return world.owner if tenant == world.acme else world.outsider


def deployed(
    world: World, slug: str, spec: dict[str, Any], tenant: Tenant | None = None
) -> Deployment:
    """A graph with `spec`, deployed as a stream through the service."""
    tenant = tenant or world.acme
    graph = world.graph(slug, spec, tenant=tenant)
    with tenant_context(tenant):
        return services.deploy(
            graph=graph, version=graph.live_version(), actor=actor_of(world, tenant)
        )


def dead_letter(deployment: Deployment, **fields: Any) -> DeadLetter:
    """A record the deployment could not take, as a worker or webhook would keep it."""
    values: dict[str, Any] = {"error": "input schema: the payload: 'x' is a required property"}
    values.update(payload='{"y": 1}')
    values.update(fields)
    with tenant_context(deployment.tenant):
        return DeadLetter.objects.create(tenant=deployment.tenant, deployment=deployment, **values)


def offsets(deployment: Deployment) -> None:
    """Two partitions as a Kafka worker leaves them: one busy (15 behind, 12.5 records/s),
    one caught up whose last report is a minute old (its rate no longer counts)."""
    with tenant_context(deployment.tenant):
        for partition, (next_offset, end, rate) in enumerate([(10, 25, 12.5), (5, 5, 3.0)]):
            PartitionOffset.objects.create(
                tenant=deployment.tenant,
                deployment=deployment,
                topic="acme.orders",
                partition=partition,
                next_offset=next_offset,
                high_watermark=end,
                records=next_offset,
                dead_letters=partition,
                rate=rate,
            )
        PartitionOffset.objects.filter(deployment=deployment, partition=1).update(
            updated_at=timezone.now() - timedelta(minutes=1)
        )


def body(response: Any) -> str:
    return html.unescape(response.content.decode())


def signed_in(world: World, name: str) -> Client:
    return sign_in(Client(), getattr(world, name))


def status_of(deployment: Deployment) -> str:
    return str(Deployment.unscoped_all_tenants.get(pk=deployment.pk).status)


def actions(deployment: Deployment) -> list[str]:
    return list(
        AuditEntry.unscoped_all_tenants.filter(
            target_type="deployment", target_id=str(deployment.pk)
        )
        .order_by("at", "id")
        .values_list("action", flat=True)
    )


def url(name: str, deployment: Deployment, *extra: object) -> str:
    return reverse(f"streams:{name}", args=[deployment.pk, *extra])


# -- the list -----------------------------------------------------------------------------


def test_the_empty_list_says_how_to_deploy(world: World) -> None:
    response = signed_in(world, "viewer").get(reverse("streams:list"))

    assert response.status_code == 200
    page = body(response)
    assert "No deployments yet" in page
    for source in ("source.kafka", "source.webhook", "source.schedule"):
        assert source in page
    assert "Deploy as stream" in page


def test_the_list_shows_each_deployment_with_its_figures(world: World, kafka_env: None) -> None:
    kafka = deployed(world, "orders", kafka_spec())
    offsets(kafka)
    dead_letter(kafka, topic="acme.orders", partition=0, offset=3)
    hook = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        services.pause(hook, actor=world.owner)

    page = body(signed_in(world, "viewer").get(reverse("streams:list")))

    kafka_row = re.search(rf'<tr data-deployment="{kafka.pk}">(.*?)</tr>', page, re.S)
    hook_row = re.search(rf'<tr data-deployment="{hook.pk}">(.*?)</tr>', page, re.S)
    assert kafka_row is not None and hook_row is not None
    cells = [
        re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td.*?</td>", kafka_row[1], re.S)
    ]
    assert cells == ["Orders orders", "v1", "kafka", "running", "15", "12.5", "1"]
    assert 'data-status="paused"' in hook_row[1]
    assert reverse("streams:detail", args=[kafka.pk]) in page


def test_the_list_never_shows_another_tenants_deployment(world: World) -> None:
    deployed(world, "mine", webhook_spec())
    theirs = deployed(world, "theirs", webhook_spec(), tenant=world.globex)

    page = body(signed_in(world, "owner").get(reverse("streams:list")))
    assert "Mine" in page
    assert "Theirs" not in page and str(theirs.pk) not in page

    outsiders = body(signed_in(world, "outsider").get(reverse("streams:list")))
    assert "Theirs" in outsiders and "Mine" not in outsiders


def test_the_nav_links_to_deployments(world: World) -> None:
    page = body(signed_in(world, "viewer").get(reverse("streams:list")))

    assert f'<a href="{reverse("streams:list")}" aria-current="page">Deployments</a>' in page


# -- one deployment -----------------------------------------------------------------------


def test_the_page_shows_partitions_lag_rate_dead_letters_and_segment(
    world: World, kafka_env: None
) -> None:
    deployment = deployed(world, "orders", kafka_spec())
    offsets(deployment)
    old = dead_letter(deployment, topic="acme.orders", partition=0, offset=3, error="older")
    new = dead_letter(deployment, topic="acme.orders", partition=1, offset=4, error="not JSON")

    response = signed_in(world, "operator").get(url("detail", deployment))

    assert response.status_code == 200
    page = body(response)
    assert 'hx-trigger="every 2s"' in page
    assert re.search(r'id="total-lag">15<', page)
    assert re.search(r'id="events-per-s">12.5<', page)
    assert re.search(r'id="dead-letter-count">2<', page)
    assert re.search(r'id="steps-waiting">0<', page)
    busy = re.search(r'<tr data-partition="acme.orders:0">(.*?)</tr>', page, re.S)
    assert busy is not None
    assert [c for c in re.findall(r'class="num">([\d.]+)<', busy[1])] == [
        "0",
        "10",
        "25",
        "15",
        "10",
        "0",
        "12.5",
        "0",  # late events
    ]
    assert "No record taken yet" in busy[1]  # no watermark: the offsets carry none
    # Newest first, each with its coordinates and a Replay button for an operator.
    assert page.index("not JSON") < page.index("older")
    assert "acme.orders:1@4" in page
    for dead in (old, new):
        assert url("replay", deployment, dead.pk) in page
    assert deployment.group_id in page
    assert url("pause", deployment) in page and "Drain and stop" in page
    assert url("resume", deployment) not in page
    assert re.search(r'<option value="1" selected>v1 \(deployed here\)', page)
    assert "Where nodes run" in page and "<code>keep</code>" in page


def test_the_status_partial_is_the_polled_fragment(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())

    response = signed_in(world, "viewer").get(url("status", deployment))

    assert response.status_code == 200
    page = body(response)
    assert page.lstrip().startswith('<div id="deployment-status"')
    assert "<html" not in page
    assert f'hx-get="{url("status", deployment)}"' in page


def test_a_webhook_deployment_shows_its_url_and_records_per_second(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    assert f"http://testserver/hooks/{deployment.pk}/" in page
    assert 'id="total-lag"' not in page  # no partitions, no lag
    assert "No step of the stream run is waiting" in page


def test_events_per_second_of_a_webhook_is_the_last_minutes_records(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        for n in range(3):  # requests received (apps.streams.webhooks writes one each)
            WebhookDelivery.objects.create(
                tenant=world.acme, deployment=deployment, signature=f"{n:064x}"
            )
    now = timezone.now()

    with tenant_context(world.acme):
        fresh = deployment_status(deployment, now=now)
        later = deployment_status(deployment, now=now + timedelta(minutes=2))

    assert fresh.events_per_s == pytest.approx(3 / 60)
    assert later.events_per_s == 0


def test_a_schedule_deployment_shows_its_last_tick(world: World) -> None:
    deployment = deployed(world, "ticking", SCHEDULE_SPEC)
    viewer = signed_in(world, "viewer")
    assert "none yet" in body(viewer.get(url("detail", deployment)))

    tick = timezone.now().replace(microsecond=0) - timedelta(minutes=5)
    with tenant_context(world.acme):
        ScheduleTick.objects.create(tenant=world.acme, deployment=deployment, tick_at=tick)

    page = body(viewer.get(url("detail", deployment)))
    assert f'id="last-tick"><time datetime="{tick.isoformat()}"' in page


def test_a_viewer_sees_the_page_read_only(world: World, kafka_env: None) -> None:
    deployment = deployed(world, "orders", kafka_spec())
    dead = dead_letter(deployment, topic="acme.orders", partition=0, offset=1)

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    for action in ("pause", "drain", "redeploy"):
        assert url(action, deployment) not in page
    assert url("replay", deployment, dead.pk) not in page
    assert "needs the operator role; you are viewer" in page


# -- actions ------------------------------------------------------------------------------


def test_pause_resume_and_stop_move_the_deployment_and_are_audited(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    operator = signed_in(world, "operator")

    paused = operator.post(url("pause", deployment), follow=True)
    assert status_of(deployment) == DeploymentStatus.PAUSED
    assert paused.redirect_chain == [(url("detail", deployment), 302)]
    assert "Paused" in body(paused) and url("resume", deployment) in body(paused)

    operator.post(url("resume", deployment))
    assert status_of(deployment) == DeploymentStatus.RUNNING

    stopped = operator.post(url("drain", deployment), follow=True)
    assert status_of(deployment) == DeploymentStatus.STOPPED
    assert "Stopped." in body(stopped)

    assert actions(deployment) == [
        "deployment.create",
        "deployment.paused",
        "deployment.running",
        "deployment.stop",
    ]
    entry = AuditEntry.unscoped_all_tenants.get(action="deployment.paused")
    assert entry.actor == world.operator
    assert entry.before == {"status": "running"} and entry.after == {"status": "paused"}


def test_draining_a_kafka_deployment_leaves_it_draining(world: World, kafka_env: None) -> None:
    deployment = deployed(world, "orders", kafka_spec())

    page = body(signed_in(world, "editor").post(url("drain", deployment), follow=True))

    assert status_of(deployment) == DeploymentStatus.DRAINING
    assert "Draining" in page
    assert actions(deployment)[-1] == "deployment.draining"


def test_a_refusal_is_a_message_on_the_page(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    before = actions(deployment)

    response = signed_in(world, "operator").post(url("resume", deployment), follow=True)

    assert response.status_code == 200
    assert "Not done: the deployment is running; it cannot become running" in body(response)
    assert status_of(deployment) == DeploymentStatus.RUNNING
    assert actions(deployment) == before


def test_a_viewer_cannot_act(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 1}')
    viewer = signed_in(world, "viewer")
    before = actions(deployment)

    for action in ("pause", "resume", "drain"):
        assert viewer.post(url(action, deployment)).status_code == 403
    assert viewer.post(url("redeploy", deployment), {"version": "1"}).status_code == 403
    assert viewer.post(url("replay", deployment, dead.pk)).status_code == 403
    graph = deployment.graph
    assert viewer.post(reverse("streams:deploy"), {"graph": graph.slug}).status_code == 403

    assert status_of(deployment) == DeploymentStatus.RUNNING
    assert actions(deployment) == before
    assert DeadLetter.unscoped_all_tenants.get(pk=dead.pk).replayed_at is None


def test_actions_need_post_and_a_csrf_token(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    strict = sign_in(Client(enforce_csrf_checks=True), world.owner)

    assert signed_in(world, "owner").get(url("pause", deployment)).status_code == 405
    assert strict.post(url("pause", deployment)).status_code == 403
    assert status_of(deployment) == DeploymentStatus.RUNNING


@pytest.mark.parametrize("version", ["abc", "9" * 5000, "1" * 20, "-1", "\u00b2", ""])
def test_a_bad_version_to_redeploy_is_a_message(world: World, version: str) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    response = signed_in(world, "owner").post(
        url("redeploy", deployment), {"version": version}, follow=True
    )
    assert response.status_code == 200
    assert "Not done: choose one of the graph" in body(response)
    assert status_of(deployment) == "running"


@pytest.mark.parametrize("graph", ["", "x" * 5000, "\x00", "no-such-graph"])
def test_deploying_a_graph_that_is_not_there_is_a_404(world: World, graph: str) -> None:
    response = signed_in(world, "owner").post(reverse("streams:deploy"), {"graph": graph})
    assert response.status_code == 404


def test_redeploy_moves_the_deployment_to_another_version(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        add_version(graph=deployment.graph, spec=webhook_spec("{{ x }}!"), actor=world.owner)
    operator = signed_in(world, "operator")
    first_run = deployment.run_id

    page = body(operator.post(url("redeploy", deployment), {"version": "2"}, follow=True))

    moved = Deployment.unscoped_all_tenants.select_related("version").get(pk=deployment.pk)
    assert moved.version.number == 2 and moved.run_id != first_run
    assert "Version 2 deployed." in page and re.search(r'id="deployed-version">v2<', page)
    assert actions(deployment)[-1] == "deployment.redeploy"

    again = body(operator.post(url("redeploy", deployment), {"version": "2"}, follow=True))
    assert "Version 2 is already deployed." in again
    missing = body(operator.post(url("redeploy", deployment), {"version": "9"}, follow=True))
    assert "choose one of the graph's versions" in missing
    assert actions(deployment)[-1] == "deployment.redeploy"
    assert actions(deployment).count("deployment.redeploy") == 1


def test_replay_takes_a_dead_letter_once(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 7}')
    operator = signed_in(world, "operator")

    page = body(operator.post(url("replay", deployment, dead.pk), follow=True))

    assert f"Dead letter {dead.pk} replayed and taken." in page
    assert DeadLetter.unscoped_all_tenants.get(pk=dead.pk).replayed_at is not None
    # The record went through the segment and left it for the LLM: one step waits.
    waiting = Step.unscoped_all_tenants.filter(run_id=deployment.run_id, node_id="ask")
    assert list(waiting.values_list("status", flat=True)) == [StepStatus.QUEUED]
    row = re.search(r'<tr data-node="ask">(.*?)</tr>', page, re.S)
    assert row is not None and re.findall(r'class="num">(\d+)<', row[1]) == ["1", "0", "0"]
    assert re.search(r'id="dead-letter-count">0<', page)

    twice = body(operator.post(url("replay", deployment, dead.pk), follow=True))
    assert "Not replayed: this record was already replayed" in twice
    assert waiting.count() == 1


def test_a_replay_that_fails_again_says_why(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"y": 1}')  # still against the input schema

    page = body(signed_in(world, "operator").post(url("replay", deployment, dead.pk), follow=True))

    assert f"Dead letter {dead.pk} failed again: replay failed:" in page
    assert "'x' is a required property" in page
    assert DeadLetter.unscoped_all_tenants.get(pk=dead.pk).replayed_at is None


# -- the graph page's "Deploy as stream" ---------------------------------------------------


def test_deploy_as_stream_from_the_graph_page(world: World) -> None:
    graph = world.graph("hooked", webhook_spec())
    operator = signed_in(world, "operator")
    graph_page = reverse("graphs:detail", args=[graph.slug])

    before = body(operator.get(graph_page))
    assert "Deploy as stream" in before and reverse("streams:deploy") in before

    response = operator.post(reverse("streams:deploy"), {"graph": graph.slug})

    deployment = Deployment.unscoped_all_tenants.get(graph=graph)
    assert response.status_code == 302
    assert response["Location"] == url("detail", deployment)
    assert deployment.source_kind == "webhook" and deployment.created_by == world.operator
    after = body(operator.get(graph_page))
    assert url("detail", deployment) in after
    assert "Deploy as stream" not in after  # it runs this version already


def test_the_graph_page_offers_no_stream_deploy_for_other_sources_or_viewers(
    world: World,
) -> None:
    world.graph("manual", SPEC)
    world.graph("hooked", webhook_spec())

    operator_page = body(
        signed_in(world, "operator").get(reverse("graphs:detail", args=["manual"]))
    )
    viewer_page = body(signed_in(world, "viewer").get(reverse("graphs:detail", args=["hooked"])))

    assert "Deploy as stream" not in operator_page and "Stream deployment" not in operator_page
    assert "Stream deployment" in viewer_page
    assert reverse("streams:deploy") not in viewer_page
    assert "needs the operator role" in viewer_page


def test_a_refused_deploy_is_a_message_on_the_graph_page(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KAFKA_ENV, raising=False)
    graph = world.graph("orders", kafka_spec())

    response = signed_in(world, "operator").post(
        reverse("streams:deploy"), {"graph": graph.slug}, follow=True
    )

    assert response.redirect_chain == [(reverse("graphs:detail", args=[graph.slug]), 302)]
    assert "Not deployed: Kafka is off here: set KAFKA_BOOTSTRAP_SERVERS" in body(response)
    assert not Deployment.unscoped_all_tenants.exists()


def test_a_stopped_deployment_may_take_another_kind_of_source(world: World) -> None:
    deployment = deployed(world, "switching", webhook_spec())
    graph = deployment.graph
    with tenant_context(world.acme):
        version_2 = add_version(graph=graph, spec=SCHEDULE_SPEC, actor=world.owner)
        with pytest.raises(services.DeploymentRefused, match="drain it, then deploy"):
            services.deploy(graph=graph, version=version_2, actor=world.owner)
        services.drain(deployment, actor=world.owner)  # a webhook stops at once
        moved = services.deploy(graph=graph, version=version_2, actor=world.owner)
    assert (moved.pk, moved.source_kind, moved.status) == (deployment.pk, "schedule", "running")


def test_an_owner_sees_and_rotates_the_webhook_secret_others_cannot(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        secret = webhook_secret_of(deployment)

    shown = signed_in(world, "owner").post(url("secret", deployment))
    rotated = signed_in(world, "owner").post(url("secret", deployment), {"rotate": "1"})
    operator = signed_in(world, "operator").post(url("secret", deployment))

    assert shown.status_code == 200 and secret in body(shown)
    with tenant_context(world.acme):
        new_secret = webhook_secret_of(deployment)
    assert new_secret != secret and new_secret in body(rotated) and secret not in body(rotated)
    assert operator.status_code == 403 and new_secret not in body(operator)
    assert "deployment.rotate_secret" in actions(deployment)
    page = signed_in(world, "owner").get(url("detail", deployment))
    assert new_secret not in body(page)  # shown only in answer to the POST


def webhook_secret_of(deployment: Deployment) -> str:
    deployment.refresh_from_db()
    return reveal_secret(deployment)


# -- another tenant's deployment ------------------------------------------------------------


def acme_targets(deployment: Deployment, dead: DeadLetter) -> dict[str, tuple[str, str, dict]]:
    """Every deployment URL, aimed at `deployment` and `dead`, each write with valid data
    (so a missing tenant check would show as a change)."""
    return {
        "detail": ("get", url("detail", deployment), {}),
        "status": ("get", url("status", deployment), {}),
        "pause": ("post", url("pause", deployment), {}),
        "resume": ("post", url("resume", deployment), {}),
        "drain": ("post", url("drain", deployment), {}),
        "redeploy": ("post", url("redeploy", deployment), {"version": "1"}),
        "redeploy preview": ("get", url("redeploy", deployment), {"version": "1"}),
        "replay": ("post", url("replay", deployment, dead.pk), {}),
        "deploy": ("post", reverse("streams:deploy"), {"graph": deployment.graph.slug}),
        "secret": ("post", url("secret", deployment), {}),
        "rotate": ("post", url("secret", deployment), {"rotate": "1"}),
    }


def state() -> dict[str, object]:
    return {
        "deployments": sorted(
            Deployment.unscoped_all_tenants.values_list(
                "id", "status", "version_id", "run_id", "webhook_secret"
            )
        ),
        "dead letters": sorted(
            DeadLetter.unscoped_all_tenants.values_list("id", "replayed_at", "error")
        ),
        "steps": Step.unscoped_all_tenants.count(),
        "audit": AuditEntry.unscoped_all_tenants.count(),
    }


TARGETS = [
    "detail", "status", "pause", "resume", "drain", "redeploy", "redeploy preview", "replay",
    "deploy", "secret", "rotate",
]  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_another_tenants_deployment_is_not_found_and_untouched(world: World, target: str) -> None:
    deployment = deployed(world, "secret-stream", webhook_spec())
    with tenant_context(world.acme):
        services.pause(deployment, actor=world.owner)  # so that resume would change it
    dead = dead_letter(deployment, payload='{"x": 1}')
    deployed(world, "own", webhook_spec(), tenant=world.globex)
    before = state()
    method, path, data = acme_targets(deployment, dead)[target]

    response = getattr(signed_in(world, "outsider"), method)(path, data)

    assert response.status_code == 404
    assert "Secret-Stream" not in body(response)
    assert state() == before


@pytest.mark.parametrize("target", TARGETS)
def test_missing_deployments_look_the_same(world: World, target: str) -> None:
    deployment = deployed(world, "secret-stream", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 1}')
    before = state()
    ghost = Deployment(id=uuid.uuid4(), graph=StreamGraph(slug="no-such-graph"))
    method, path, data = acme_targets(ghost, DeadLetter(pk=dead.pk + 1000))[target]

    response = getattr(signed_in(world, "owner"), method)(path, data)

    assert response.status_code == 404
    assert state() == before


def test_a_dead_letter_of_another_deployment_is_not_found(world: World) -> None:
    theirs = deployed(world, "theirs", webhook_spec(), tenant=world.globex)
    their_dead = dead_letter(theirs, payload='{"x": 1}')
    mine = deployed(world, "mine", webhook_spec())
    before = state()

    response = signed_in(world, "owner").post(url("replay", mine, their_dead.pk))

    assert response.status_code == 404
    assert state() == before


def test_anonymous_visitors_are_sent_to_login(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())

    for path in (reverse("streams:list"), url("detail", deployment), url("status", deployment)):
        response = Client().get(path)
        assert response.status_code == 302
        assert response["Location"] == f"{reverse('login')}?next={path}"


def test_the_admin_lists_deployments_read_only_without_the_webhook_secret(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 1}')
    theirs = deployed(world, "theirs", webhook_spec(), tenant=world.globex)
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = sign_in(Client(), staff)

    for model in ("deployment", "partitionoffset", "deadletter"):
        assert client.get(f"/admin/streams/{model}/").status_code == 200, model
    listed = body(client.get("/admin/streams/deployment/"))
    assert str(deployment.pk) in listed and str(theirs.pk) in listed  # every tenant's
    change = client.get(f"/admin/streams/deployment/{deployment.pk}/change/")
    assert change.status_code == 200
    assert "webhook_secret" not in body(change) and deployment.webhook_secret not in body(change)
    assert client.get(f"/admin/streams/deadletter/{dead.pk}/change/").status_code == 200
    assert client.post(f"/admin/streams/deadletter/{dead.pk}/delete/").status_code == 403
    assert DeadLetter.unscoped_all_tenants.filter(pk=dead.pk).exists()
