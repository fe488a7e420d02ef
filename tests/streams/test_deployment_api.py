"""The deployments API: list, deploy (or redeploy) a graph, one deployment's status, pause,
resume, drain, redeploy, dead letters and their replay; problem+json for bad input (400
naming the field) and refusals (409 with the service's message); scopes and roles like the
runs' endpoints; another tenant's deployment or dead letter is a 404 and stays untouched."""

from typing import Any
from uuid import UUID, uuid4

import pytest
from django.test import Client

from apps.audit.models import AuditEntry
from apps.graphs.services import add_version
from apps.streams import services
from apps.streams.models import DeadLetter, Deployment, DeploymentStatus, ScheduleTick
from apps.tenants.context import tenant_context
from apps.tenants.keys import GRAPHS_READ, GRAPHS_WRITE, RUNS_READ, RUNS_WRITE
from tests.api.helpers import ApiClient, key_client
from tests.conftest import World
from tests.streams.test_deployment_pages import (
    KAFKA_ENV,
    SCHEDULE_SPEC,
    actions,
    dead_letter,
    deployed,
    kafka_spec,
    offsets,
    state,
    status_of,
    webhook_spec,
)
from tests.web.test_pages import SPEC, sign_in

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    found: dict[str, Any] = response.json()
    assert found["status"] == status and found["title"] and found["detail"]
    return found


def api(world: World, *scopes: str) -> ApiClient:
    return key_client(world, scopes or [RUNS_READ, RUNS_WRITE])


def path(deployment: Deployment | UUID, tail: str = "") -> str:
    id_ = deployment.pk if isinstance(deployment, Deployment) else deployment
    return f"/api/deployments/{id_}/{tail}"


# -- list and read ------------------------------------------------------------------------


def test_the_list_pages_the_callers_deployments_newest_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KAFKA_ENV, "127.0.0.1:9")
    kafka = deployed(world, "orders", kafka_spec())
    offsets(kafka)
    dead_letter(kafka, topic="acme.orders", partition=0, offset=1)
    hook = deployed(world, "hooked", webhook_spec())
    deployed(world, "theirs", webhook_spec(), tenant=world.globex)
    client = api(world, RUNS_READ)

    first = client.get("/api/deployments/", limit=1)
    second = client.get(first.json()["next"])

    assert first.status_code == 200 and second.status_code == 200
    assert [d["id"] for d in first.json()["results"]] == [str(hook.pk)]
    row = second.json()["results"][0]
    assert row == {
        "id": str(kafka.pk),
        "graph": "orders",
        "version": 1,
        "source_kind": "kafka",
        "status": "running",
        "run": str(kafka.run_id),
        "lag": 15,
        "events_per_s": 12.5,
        "dead_letters": 1,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    assert second.json()["next"] is None


def test_get_shows_the_deployment_status(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    older = dead_letter(deployment, payload='{"x": 1}', key="k1")
    newer = dead_letter(deployment, payload="not json", error="not JSON")
    client = api(world)
    assert client.post(path(deployment, f"dead-letters/{older.pk}/replay/")).status_code == 200

    response = client.get(path(deployment))

    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "running" and data["source_kind"] == "webhook"
    assert data["lag"] == 0 and data["partitions"] == []
    assert data["events_per_s"] == 0.0  # requests received a second; a replay is none
    assert data["dead_letters"] == 1  # the newer one; the older was replayed
    assert [d["id"] for d in data["recent_dead_letters"]] == [newer.pk, older.pk]
    assert data["recent_dead_letters"][1]["replayed_at"] is not None
    assert data["steps_waiting"] == [{"node": "ask", "queued": 1, "running": 0, "failed": 0}]
    assert data["segment"]["source"] == "hook" and data["segment"]["steps"] == ["ask"]
    assert "shape" in data["segment"]["inside"]
    assert data["webhook_url"] == f"http://testserver/hooks/{deployment.pk}/"
    assert data["last_tick_at"] is None


def test_a_schedule_deployment_has_its_last_tick(world: World) -> None:
    deployment = deployed(world, "ticking", SCHEDULE_SPEC)
    with tenant_context(world.acme):
        ScheduleTick.objects.create(
            tenant=world.acme, deployment=deployment, tick_at="2030-01-01T00:05:00Z"
        )

    data = api(world).get(path(deployment)).json()

    assert data["webhook_url"] is None
    assert data["last_tick_at"].startswith("2030-01-01T00:05:00")


def test_dead_letters_are_paged_newest_first(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    made = [dead_letter(deployment, payload=f'{{"n": {n}}}') for n in range(3)]
    client = api(world, RUNS_READ)

    first = client.get(path(deployment, "dead-letters/"), limit=2)
    rest = client.get(first.json()["next"])

    ids = [d["id"] for d in first.json()["results"] + rest.json()["results"]]
    assert ids == [d.pk for d in reversed(made)]
    assert first.json()["results"][0]["payload"] == '{"n": 2}'
    bad_limit = problem(client.get(path(deployment, "dead-letters/"), limit=0), 400)
    assert bad_limit["errors"][0]["field"] == "limit"


# -- deploy and redeploy ------------------------------------------------------------------


def test_post_deploys_the_graphs_deployed_version(world: World) -> None:
    world.graph("hooked", webhook_spec())
    client = api(world)

    created = client.post("/api/deployments/", {"graph": "hooked"})

    assert created.status_code == 201, created.content
    deployment = Deployment.unscoped_all_tenants.get(graph__slug="hooked")
    assert created["Location"] == path(deployment)
    assert created.json()["id"] == str(deployment.pk) and created.json()["version"] == 1
    assert deployment.tenant_id == world.acme.pk
    assert actions(deployment) == ["deployment.create"]
    entry = AuditEntry.unscoped_all_tenants.get(action="deployment.create")
    assert entry.actor is None and entry.actor_label.startswith("api key test key")

    again = client.post("/api/deployments/", {"graph": "hooked", "version": 1})
    assert again.status_code == 201 and again.json()["id"] == str(deployment.pk)
    assert actions(deployment) == ["deployment.create"]  # already there: nothing changed


def test_post_with_another_version_redeploys(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        add_version(graph=deployment.graph, spec=webhook_spec("{{ x }}!"), actor=world.owner)

    moved = api(world).post("/api/deployments/", {"graph": "hooked", "version": 2})

    assert moved.status_code == 201
    assert moved.json()["id"] == str(deployment.pk) and moved.json()["version"] == 2
    assert moved.json()["run"] != str(deployment.run_id)
    assert actions(deployment) == ["deployment.create", "deployment.redeploy"]


def test_redeploy_endpoint(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    with tenant_context(world.acme):
        add_version(graph=deployment.graph, spec=webhook_spec("{{ x }}!"), actor=world.owner)
    client = api(world)

    moved = client.post(path(deployment, "redeploy/"), {"version": 2})
    missing = client.post(path(deployment, "redeploy/"), {"version": 7})
    not_a_number = client.post(path(deployment, "redeploy/"), {"version": "two"})

    assert moved.status_code == 200 and moved.json()["version"] == 2
    for bad in (missing, not_a_number):
        assert problem(bad, 400)["errors"][0]["field"] == "version"
    assert "no version 7" in missing.json()["detail"]
    assert actions(deployment) == ["deployment.create", "deployment.redeploy"]


def test_bad_input_is_a_400_naming_the_field(world: World) -> None:
    world.graph("hooked", webhook_spec())
    client = api(world)

    for body, field in (
        ({}, "graph"),
        ({"graph": "not a slug!"}, "graph"),
        ({"graph": "hooked", "version": 0}, "version"),
        ({"graph": "hooked", "version": 3}, "version"),
    ):
        response = client.post("/api/deployments/", body)
        assert problem(response, 400)["errors"][0]["field"] == field, body
    assert not Deployment.unscoped_all_tenants.exists()


def test_refusals_are_409s_with_the_services_message(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KAFKA_ENV, raising=False)
    world.graph("manual", SPEC)
    world.graph("orders", kafka_spec())
    client = api(world)

    manual = problem(client.post("/api/deployments/", {"graph": "manual"}), 409)
    kafka = problem(client.post("/api/deployments/", {"graph": "orders"}), 409)

    assert "starts with source.manual" in manual["detail"]
    assert "Kafka is off here" in kafka["detail"]
    assert not Deployment.unscoped_all_tenants.exists()


# -- pause, resume, drain -----------------------------------------------------------------


def test_pause_resume_and_drain(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KAFKA_ENV, "127.0.0.1:9")
    hook = deployed(world, "hooked", webhook_spec())
    kafka = deployed(world, "orders", kafka_spec())
    client = api(world)

    assert client.post(path(hook, "pause/")).json()["status"] == "paused"
    assert client.post(path(hook, "resume/")).json()["status"] == "running"
    assert client.post(path(hook, "drain/")).json()["status"] == "stopped"
    assert client.post(path(kafka, "drain/")).json()["status"] == "draining"

    assert actions(hook) == [
        "deployment.create",
        "deployment.paused",
        "deployment.running",
        "deployment.stop",
    ]
    assert actions(kafka) == ["deployment.create", "deployment.draining"]


def test_an_illegal_transition_is_a_409_and_changes_nothing(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    client = api(world)

    refused = problem(client.post(path(deployment, "resume/")), 409)

    assert refused["detail"] == "the deployment is running; it cannot become running"
    assert status_of(deployment) == DeploymentStatus.RUNNING
    assert actions(deployment) == ["deployment.create"]
    client.post(path(deployment, "drain/"))
    assert "already stopped" in problem(client.post(path(deployment, "drain/")), 409)["detail"]


# -- replay -------------------------------------------------------------------------------


def test_replay_takes_the_record_once(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 5}')
    client = api(world)

    replayed = client.post(path(deployment, f"dead-letters/{dead.pk}/replay/"))
    twice = client.post(path(deployment, f"dead-letters/{dead.pk}/replay/"))

    assert replayed.status_code == 200
    assert replayed.json()["replayed"] is True
    assert replayed.json()["dead_letter"]["replayed_at"] is not None
    assert "already replayed" in problem(twice, 409)["detail"]
    assert actions(deployment) == ["deployment.create", "deployment.replay"]


def test_a_replay_that_fails_again_keeps_the_letter(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"y": 5}')

    response = api(world).post(path(deployment, f"dead-letters/{dead.pk}/replay/"))

    assert response.status_code == 200
    assert response.json()["replayed"] is False
    assert response.json()["dead_letter"]["error"].startswith("replay failed: input schema")
    assert DeadLetter.unscoped_all_tenants.get(pk=dead.pk).replayed_at is None


# -- who may ------------------------------------------------------------------------------


def test_writes_need_runs_write_and_reads_runs_read(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    dead = dead_letter(deployment, payload='{"x": 1}')
    reader = api(world, RUNS_READ, GRAPHS_READ, GRAPHS_WRITE)
    writer_only = api(world, RUNS_WRITE)
    before = state()

    for tail in ("pause/", "resume/", "drain/", f"dead-letters/{dead.pk}/replay/"):
        assert RUNS_WRITE in problem(reader.post(path(deployment, tail)), 403)["detail"]
    redeploy = reader.post(path(deployment, "redeploy/"), {"version": 1})
    assert RUNS_WRITE in problem(redeploy, 403)["detail"]
    assert problem(reader.post("/api/deployments/", {"graph": "hooked"}), 403)
    for tail in ("", "dead-letters/"):
        assert RUNS_READ in problem(writer_only.get(path(deployment, tail)), 403)["detail"]
    assert problem(ApiClient(None).get("/api/deployments/"), 401)
    assert state() == before


def test_a_viewer_reads_and_an_operator_acts_through_the_session(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    viewer = sign_in(Client(), world.viewer)
    operator = sign_in(Client(), world.operator)

    assert viewer.get(path(deployment)).status_code == 200
    refused = problem(viewer.post(path(deployment, "pause/")), 403)
    assert "viewer" in refused["detail"] and "operator" in refused["detail"]
    assert status_of(deployment) == DeploymentStatus.RUNNING

    assert operator.post(path(deployment, "pause/")).status_code == 200
    assert status_of(deployment) == DeploymentStatus.PAUSED
    entry = AuditEntry.unscoped_all_tenants.get(action="deployment.paused")
    assert entry.actor == world.operator


# -- another tenant's ---------------------------------------------------------------------


ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "", None),
    ("GET", "dead-letters/", None),
    ("POST", "pause/", {}),
    ("POST", "resume/", {}),
    ("POST", "drain/", {}),
    ("POST", "redeploy/", {"version": 1}),
    ("POST", "dead-letters/{dead}/replay/", {}),
    ("GET", "state/", None),
    ("GET", "state/preview/?version=1", None),
]


@pytest.mark.parametrize(("method", "tail", "body"), ENDPOINTS, ids=lambda v: str(v))
def test_another_tenants_deployment_is_404_and_untouched(
    world: World, method: str, tail: str, body: Any
) -> None:
    theirs = deployed(world, "secret-stream", webhook_spec(), tenant=world.globex)
    with tenant_context(world.globex):
        services.pause(theirs, actor=world.outsider)  # so that resume would change it
    dead = dead_letter(theirs, payload='{"x": 1}')
    deployed(world, "mine", webhook_spec())
    client = key_client(world)  # acme's key, every scope
    before = state()
    target = path(theirs, tail.format(dead=dead.pk))

    response = client.get(target) if method == "GET" else client.post(target, body)

    found = problem(response, 404)
    assert str(theirs.pk) not in found["detail"] and "secret" not in response.content.decode()
    assert state() == before


@pytest.mark.parametrize(("method", "tail", "body"), ENDPOINTS, ids=lambda v: str(v))
def test_a_missing_deployment_looks_the_same(
    world: World, method: str, tail: str, body: Any
) -> None:
    mine = deployed(world, "mine", webhook_spec())
    dead = dead_letter(mine, payload='{"x": 1}')
    client = key_client(world)
    target = path(uuid4(), tail.format(dead=dead.pk))

    response = client.get(target) if method == "GET" else client.post(target, body)

    problem(response, 404)


def test_another_tenants_dead_letter_under_my_deployment_is_404(world: World) -> None:
    theirs = deployed(world, "theirs", webhook_spec(), tenant=world.globex)
    their_dead = dead_letter(theirs, payload='{"x": 1}')
    mine = deployed(world, "mine", webhook_spec())
    client = key_client(world)
    before = state()

    response = client.post(path(mine, f"dead-letters/{their_dead.pk}/replay/"))

    problem(response, 404)
    assert state() == before


def test_another_tenants_graph_cannot_be_deployed(world: World) -> None:
    world.graph("theirs", webhook_spec(), tenant=world.globex)

    response = key_client(world).post("/api/deployments/", {"graph": "theirs"})

    problem(response, 404)
    assert not Deployment.unscoped_all_tenants.exists()


def test_the_list_holds_only_the_callers_deployments(world: World) -> None:
    mine = deployed(world, "mine", webhook_spec())
    deployed(world, "theirs", webhook_spec(), tenant=world.globex)

    rows = api(world, RUNS_READ).get("/api/deployments/").json()["results"]

    assert [(r["id"], r["graph"]) for r in rows] == [(str(mine.pk), "mine")]


def test_the_schema_documents_the_deployment_endpoints(db: None) -> None:
    response = Client().get("/api/schema/", headers={"accept": "application/json"})

    assert response.status_code == 200
    paths = response.json()["paths"]
    for documented in (
        "/api/deployments/",
        "/api/deployments/{deployment_id}/",
        "/api/deployments/{deployment_id}/pause/",
        "/api/deployments/{deployment_id}/resume/",
        "/api/deployments/{deployment_id}/drain/",
        "/api/deployments/{deployment_id}/redeploy/",
        "/api/deployments/{deployment_id}/dead-letters/",
        "/api/deployments/{deployment_id}/dead-letters/{dead_letter_id}/replay/",
        "/api/deployments/{deployment_id}/state/",
        "/api/deployments/{deployment_id}/state/preview/",
    ):
        assert documented in paths, documented
    assert "409" in paths["/api/deployments/{deployment_id}/pause/"]["post"]["responses"]


BAD_BODIES = [
    b"{",
    b"[" * 100_000 + b"]" * 100_000,  # past Python's JSON parser
    b'{"graph": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"graph": "' + b"y" * 2_000_000 + b'"}',
    b'{"version": {"a": 1}}',
    b'{"version": 1e400}',
    b'{"version": NaN}',
    b'"a string"',
    b"\xff\xfe",
]


def test_malformed_huge_and_deep_bodies_are_refused_never_a_500(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())
    client = api(world)
    # Deploy and redeploy read a body: refused. Pause and replay read none: they may act.
    reads_body = {"/api/deployments/": True, path(deployment, "redeploy/"): True}
    targets = [*reads_body, path(deployment, "pause/"), path(deployment, "dead-letters/5/replay/")]
    for target in targets:
        for raw in BAD_BODIES:
            response = client.client.post(
                target, raw, content_type="application/json", headers=client.headers
            )
            case = f"{target} {raw[:30]!r}: {response.content[:200]!r}"
            assert response.status_code < 500, case
            if target in reads_body:
                assert 400 <= response.status_code < 500, case
