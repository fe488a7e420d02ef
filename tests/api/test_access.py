"""Who may call what in the REST API, table-driven over every endpoint in apps/api/urls.py:
no credentials or a bad key → 401; a key without the endpoint's scope → 403 naming it; the
right scope passes; another tenant's graph, version, run, output event, job, stream
deployment or dead letter → 404 with nothing of theirs changed; the browser session by role,
with CSRF; a key wins over a cookie. The OpenAPI schema and its docs page are public and
served from our own static files."""

import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from apps.api.models import BatchJob, IdempotentReply
from apps.api.urls import urlpatterns
from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.services import add_version
from apps.runs.models import Event, Run, RunKind, RunStatus, Step
from apps.runs.services import start_run
from apps.streams.models import DeadLetter, Deployment
from apps.streams.services import deploy as deploy_stream
from apps.tenants.api_keys import create_api_key, revoke_api_key
from apps.tenants.context import tenant_context
from apps.tenants.keys import (
    EVENTS_WRITE,
    GRAPHS_READ,
    GRAPHS_WRITE,
    RUNS_READ,
    RUNS_WRITE,
    SCOPES,
)
from apps.tenants.models import Tenant
from tests.api.helpers import SPEC, ApiClient, key_client
from tests.conftest import World

PROBLEM = "application/problem+json"
PUBLIC = {"schema", "docs"}
# A stream graph's version: what the deployment endpoints act on.
WEBHOOK_SPEC = {
    "nodes": [
        {"id": "hook", "type": "source.webhook"},
        {"id": "keep", "type": "sink.table", "config": {"table": "hooked"}},
    ],
    "edges": [["hook", "keep"]],
}


@dataclass(frozen=True)
class Ids:
    """One tenant's objects that endpoints name: a graph (with version 1), a run, one of
    the run's events, a batch job, and the graph's stream deployment (of version 2, a
    webhook source) with one dead letter."""

    graph: str
    run: UUID
    event: UUID
    job: UUID
    deployment: UUID
    dead: int


@dataclass(frozen=True)
class Endpoint:
    name: str  # the URL's name in apps/api/urls.py
    method: str
    path: str  # "{graph}", "{run}", "{event}" and "{job}" stand for an Ids field
    scope: str
    body: Any = None  # JSON; strings are filled in like the path
    ok: int = 200  # the answer with the right scope, on the caller's own objects

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def names_objects(self) -> bool:
        return fill((self.path, self.body), NOBODYS) != fill((self.path, self.body), SOMEONES)

    def url(self, ids: Ids) -> str:
        return fill(self.path, ids)

    def call(self, api: ApiClient, ids: Ids) -> Any:
        if self.method == "GET":
            return api.get(self.url(ids))
        return api.post(self.url(ids), fill(self.body, ids))


def fill(value: Any, ids: Ids) -> Any:
    if isinstance(value, str):
        return value.format(**vars(ids))
    if isinstance(value, dict):
        return {name: fill(inner, ids) for name, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [fill(inner, ids) for inner in value]
    return value


ENDPOINTS = [
    Endpoint("graphs", "GET", "/api/graphs/", GRAPHS_READ),
    Endpoint(
        "graphs",
        "POST",
        "/api/graphs/",
        GRAPHS_WRITE,
        {"slug": "fresh", "name": "Fresh", "spec": SPEC},
        201,
    ),
    Endpoint("graph-validate", "POST", "/api/graphs/validate/", GRAPHS_READ, {"spec": SPEC}),
    Endpoint("graph", "GET", "/api/graphs/{graph}/", GRAPHS_READ),
    Endpoint("versions", "GET", "/api/graphs/{graph}/versions/", GRAPHS_READ),
    Endpoint(
        "versions", "POST", "/api/graphs/{graph}/versions/", GRAPHS_WRITE, {"spec": SPEC}, 201
    ),
    Endpoint("version", "GET", "/api/graphs/{graph}/versions/1/", GRAPHS_READ),
    Endpoint("graph-diff", "GET", "/api/graphs/{graph}/diff/?from=1&to=1", GRAPHS_READ),
    Endpoint("graph-deploy", "POST", "/api/graphs/{graph}/deploy/", GRAPHS_WRITE, {"version": 1}),
    Endpoint("graph-estimate", "POST", "/api/graphs/{graph}/estimate/", GRAPHS_READ, {"items": 2}),
    Endpoint(
        "events",
        "POST",
        "/api/graphs/{graph}/events/",
        EVENTS_WRITE,
        {"payload": {"x": 1}},
        202,
    ),
    Endpoint(
        "events-bulk",
        "POST",
        "/api/graphs/{graph}/events/bulk/",
        EVENTS_WRITE,
        {"events": [{"payload": {"x": 1}}, {"payload": {"x": 2}}]},
        202,
    ),
    Endpoint("runs", "GET", "/api/runs/", RUNS_READ),
    Endpoint(
        "runs", "POST", "/api/runs/", RUNS_WRITE, {"graph": "{graph}", "input": {"x": 1}}, 201
    ),
    Endpoint("run", "GET", "/api/runs/{run}/", RUNS_READ),
    Endpoint("run-cancel", "POST", "/api/runs/{run}/cancel/", RUNS_WRITE),
    # The run has no dead steps: allowed, and refused for that reason.
    Endpoint("run-replay", "POST", "/api/runs/{run}/replay/", RUNS_WRITE, {}, 409),
    Endpoint("run-outputs", "GET", "/api/runs/{run}/outputs/", RUNS_READ),
    Endpoint("run-output-lineage", "GET", "/api/runs/{run}/outputs/{event}/lineage/", RUNS_READ),
    Endpoint("jobs", "GET", "/api/jobs/", RUNS_READ),
    Endpoint(
        "jobs", "POST", "/api/jobs/", RUNS_WRITE, {"graph": "{graph}", "inputs": [{"x": 1}]}, 202
    ),
    Endpoint("job", "GET", "/api/jobs/{job}/", RUNS_READ),
    Endpoint("job-cancel", "POST", "/api/jobs/{job}/cancel/", RUNS_WRITE),
    Endpoint("job-results", "GET", "/api/jobs/{job}/results/", RUNS_READ),
    Endpoint("deployments", "GET", "/api/deployments/", RUNS_READ),
    # The version is deployed already: allowed, and nothing changes.
    Endpoint(
        "deployments",
        "POST",
        "/api/deployments/",
        RUNS_WRITE,
        {"graph": "{graph}", "version": 2},
        201,
    ),
    Endpoint("deployment", "GET", "/api/deployments/{deployment}/", RUNS_READ),
    Endpoint("deployment-pause", "POST", "/api/deployments/{deployment}/pause/", RUNS_WRITE),
    # The deployment is running: allowed, and refused for that reason.
    Endpoint(
        "deployment-resume", "POST", "/api/deployments/{deployment}/resume/", RUNS_WRITE, ok=409
    ),
    Endpoint("deployment-drain", "POST", "/api/deployments/{deployment}/drain/", RUNS_WRITE),
    Endpoint(
        "deployment-redeploy",
        "POST",
        "/api/deployments/{deployment}/redeploy/",
        RUNS_WRITE,
        {"version": 2},
    ),
    Endpoint(
        "deployment-dead-letters", "GET", "/api/deployments/{deployment}/dead-letters/", RUNS_READ
    ),
    Endpoint("deployment-state", "GET", "/api/deployments/{deployment}/state/", RUNS_READ),
    Endpoint(
        "deployment-state-preview",
        "GET",
        "/api/deployments/{deployment}/state/preview/?version=2",
        RUNS_READ,
    ),
    Endpoint(
        "deployment-dead-letter-replay",
        "POST",
        "/api/deployments/{deployment}/dead-letters/{dead}/replay/",
        RUNS_WRITE,
    ),
]
# Paths for the checks made before any lookup: the objects need not exist.
NOBODYS = Ids(
    graph="nobodys", run=uuid4(), event=uuid4(), job=uuid4(), deployment=uuid4(), dead=10**9
)
SOMEONES = Ids(
    graph="someones", run=uuid4(), event=uuid4(), job=uuid4(), deployment=uuid4(), dead=10**9 + 1
)
NAMING_OBJECTS = [endpoint for endpoint in ENDPOINTS if endpoint.names_objects]


def each(endpoints: list[Endpoint]) -> Any:
    return pytest.mark.parametrize("endpoint", endpoints, ids=str)


def objects(world: World, tenant: Tenant, slug: str) -> Ids:
    """A graph, an interactive run of it (with its input event) and a batch job, made as
    users and clients make them."""
    actor = world.owner if tenant == world.acme else world.outsider
    graph = world.graph(slug, SPEC, tenant=tenant)
    with tenant_context(tenant):
        assert graph.deployed_version is not None
        run = start_run(version=graph.deployed_version, payload={"x": 1}, actor=actor)
        event = Event.objects.get(run=run, node_id="input")
    job = key_client(world, [RUNS_WRITE], tenant=tenant).post(
        "/api/jobs/", {"graph": slug, "inputs": [{"x": 1}, {"x": 2}]}
    )
    assert job.status_code == 202, job.content
    with tenant_context(tenant):
        hook = add_version(graph=graph, spec=WEBHOOK_SPEC, actor=actor, deploy=False)
        deployment = deploy_stream(graph=graph, version=hook, actor=actor)
        dead = DeadLetter.objects.create(
            tenant=tenant, deployment=deployment, error="not JSON", payload="{"
        )
    return Ids(
        graph=slug,
        run=run.id,
        event=event.id,
        job=UUID(job.json()["id"]),
        deployment=deployment.id,
        dead=dead.pk,
    )


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body


def state(tenant: Tenant) -> dict[str, Any]:
    """Everything of the tenant's that an API call could change."""

    def rows(model: Any, *fields: str) -> list[Any]:
        return list(
            model.unscoped_all_tenants.filter(tenant=tenant).order_by(*fields).values_list(*fields)
        )

    return {
        "graphs": rows(StreamGraph, "slug", "name", "deployed_version__number"),
        "versions": rows(GraphVersion, "graph__slug", "number"),
        "runs": rows(Run, "id", "kind", "status", "open_steps", "error"),
        "steps": rows(Step, "id", "status", "attempt"),
        "events": rows(Event, "id"),
        "jobs": rows(BatchJob, "id", "items"),
        "deployments": rows(Deployment, "id", "status", "version_id", "run_id"),
        "dead letters": rows(DeadLetter, "id", "replayed_at", "error"),
        "audit": rows(AuditEntry, "id"),
        "replies": rows(IdempotentReply, "id"),
    }


# -- the table is the API -----------------------------------------------------------------


def test_the_table_covers_every_endpoint_and_method() -> None:
    served: dict[str, set[str]] = {}
    for pattern in urlpatterns:
        if pattern.name in PUBLIC:
            continue
        view = pattern.callback.cls  # type: ignore[attr-defined]  # set by APIView.as_view
        served[str(pattern.name)] = {
            method.upper()
            for method in ("get", "post", "put", "patch", "delete")
            if hasattr(view, method)
        }
    table: dict[str, set[str]] = defaultdict(set)
    for endpoint in ENDPOINTS:
        table[endpoint.name].add(endpoint.method)
    assert table == served


# -- 401 ----------------------------------------------------------------------------------


@each(ENDPOINTS)
def test_no_credentials_is_401_with_a_bearer_challenge(db: None, endpoint: Endpoint) -> None:
    response = endpoint.call(ApiClient(None), NOBODYS)

    body = assert_problem(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in body["detail"]


@each(ENDPOINTS)
def test_a_malformed_unknown_or_revoked_key_is_401(world: World, endpoint: Endpoint) -> None:
    revoked, revoked_secret = create_api_key(
        tenant=world.acme, name="old", scopes=list(SCOPES), actor=world.owner
    )
    revoke_api_key(key=revoked, actor=world.owner)
    _, live_secret = create_api_key(
        tenant=world.acme, name="live", scopes=list(SCOPES), actor=world.owner
    )
    bad = {
        "malformed": "not-a-key",
        "no prefix": live_secret.removeprefix("sk_"),
        "truncated": live_secret[:-4],
        "unknown": "sk_" + secrets.token_urlsafe(32),
        "revoked": revoked_secret,
    }
    for why, secret in bad.items():
        response = endpoint.call(ApiClient(secret), NOBODYS)
        assert response.status_code == 401, why
        body = assert_problem(response, 401)
        assert response["WWW-Authenticate"].startswith("Bearer"), why
        assert "malformed, unknown or revoked" in body["detail"], why
    basic = Client().generic(
        endpoint.method, endpoint.url(NOBODYS), headers={"authorization": "Basic dXNlcjpwdw=="}
    )
    assert_problem(basic, 401)


# -- 403 and the right scope --------------------------------------------------------------


@each(ENDPOINTS)
def test_a_key_without_the_scope_is_403_naming_it(world: World, endpoint: Endpoint) -> None:
    ids = objects(world, world.acme, "alpha")
    api = key_client(world, [scope for scope in SCOPES if scope != endpoint.scope])
    before = state(world.acme)

    response = endpoint.call(api, ids)

    body = assert_problem(response, 403)
    assert endpoint.scope in body["detail"]
    assert state(world.acme) == before


@each(ENDPOINTS)
def test_a_key_with_just_the_scope_may(world: World, endpoint: Endpoint) -> None:
    ids = objects(world, world.acme, "alpha")

    response = endpoint.call(key_client(world, [endpoint.scope]), ids)

    assert response.status_code == endpoint.ok, response.content


# -- another tenant's objects -------------------------------------------------------------


@each(NAMING_OBJECTS)
def test_another_tenants_objects_are_404_and_untouched(world: World, endpoint: Endpoint) -> None:
    objects(world, world.acme, "alpha")
    theirs = objects(world, world.globex, "gx")
    api = key_client(world)  # every scope
    before = {tenant.slug: state(tenant) for tenant in (world.acme, world.globex)}

    response = endpoint.call(api, theirs)

    body = assert_problem(response, 404)
    assert "gx" not in body["detail"] and str(theirs.run) not in body["detail"]
    assert {tenant.slug: state(tenant) for tenant in (world.acme, world.globex)} == before


def test_another_tenants_event_in_my_run_is_404(world: World) -> None:
    mine = objects(world, world.acme, "alpha")
    theirs = objects(world, world.globex, "gx")
    api = key_client(world, [RUNS_READ])

    response = api.get(f"/api/runs/{mine.run}/outputs/{theirs.event}/lineage/")

    assert_problem(response, 404)
    assert api.get(f"/api/runs/{mine.run}/outputs/{mine.event}/lineage/").status_code == 200


def test_lists_hold_only_the_callers_objects(world: World) -> None:
    mine = objects(world, world.acme, "alpha")
    objects(world, world.globex, "gx")
    api = key_client(world, [GRAPHS_READ, RUNS_READ])

    graphs = api.get("/api/graphs/").json()["results"]
    runs = api.get("/api/runs/").json()["results"]
    jobs = api.get("/api/jobs/").json()["results"]

    assert [g["slug"] for g in graphs] == ["alpha"]
    assert {r["graph"] for r in runs} == {"alpha"}
    assert str(mine.run) in {r["id"] for r in runs}
    assert [j["id"] for j in jobs] == [str(mine.job)]
    assert api.get("/api/runs/", graph="gx").json()["results"] == []


def test_a_cross_tenant_cancel_leaves_the_run_going(world: World) -> None:
    theirs = objects(world, world.globex, "gx")
    api = key_client(world, [RUNS_WRITE])

    assert api.post(f"/api/runs/{theirs.run}/cancel/").status_code == 404
    assert api.post(f"/api/jobs/{theirs.job}/cancel/").status_code == 404

    for run_id in (theirs.run, BatchJob.unscoped_all_tenants.get(id=theirs.job).run_id):
        run = Run.unscoped_all_tenants.get(id=run_id)
        assert run.status != RunStatus.CANCELLED
        assert run.error == ""


# -- the browser session ------------------------------------------------------------------


def signed_in(name: str, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    assert client.login(username=name, password=f"pw-{name}")
    return client


def post_json(client: Client, path: str, body: Any, **headers: str) -> Any:
    return client.post(path, body, content_type="application/json", headers=headers)


def test_a_viewer_reads_but_cannot_start_a_run(world: World) -> None:
    ids = objects(world, world.acme, "alpha")
    viewer = signed_in("viewer")
    runs_before = Run.unscoped_all_tenants.count()

    graphs = viewer.get("/api/graphs/")
    runs = viewer.get("/api/runs/")
    refused = post_json(viewer, "/api/runs/", {"graph": ids.graph, "input": {"x": 1}})

    assert graphs.status_code == 200 and [g["slug"] for g in graphs.json()["results"]] == ["alpha"]
    assert runs.status_code == 200 and str(ids.run) in {r["id"] for r in runs.json()["results"]}
    detail = assert_problem(refused, 403)["detail"]
    assert "viewer" in detail and "operator" in detail
    assert Run.unscoped_all_tenants.count() == runs_before


def test_an_operator_starts_a_run_but_cannot_create_a_graph(world: World) -> None:
    world.graph("alpha", SPEC)
    operator = signed_in("operator")

    started = post_json(operator, "/api/runs/", {"graph": "alpha", "input": {"x": 1}})
    refused = post_json(operator, "/api/graphs/", {"slug": "new", "name": "New", "spec": SPEC})

    assert started.status_code == 201
    run = Run.unscoped_all_tenants.get(id=started.json()["id"])
    assert run.tenant_id == world.acme.pk
    assert run.created_by == world.operator
    detail = assert_problem(refused, 403)["detail"]
    assert "operator" in detail and "editor" in detail
    assert not StreamGraph.unscoped_all_tenants.filter(slug="new").exists()


def test_an_editor_creates_a_graph(world: World) -> None:
    editor = signed_in("editor")

    response = post_json(editor, "/api/graphs/", {"slug": "new", "name": "New", "spec": SPEC})

    assert response.status_code == 201
    graph = StreamGraph.unscoped_all_tenants.get(slug="new")
    assert graph.tenant_id == world.acme.pk
    entry = AuditEntry.unscoped_all_tenants.get(action="graph.create", target_id=str(graph.pk))
    assert entry.actor == world.editor


def test_a_session_write_needs_the_csrf_token(world: World) -> None:
    world.graph("alpha", SPEC)
    operator = signed_in("operator", csrf=True)
    body = {"graph": "alpha", "input": {"x": 1}}

    refused = post_json(operator, "/api/runs/", body)

    assert "CSRF" in assert_problem(refused, 403)["detail"]
    assert not Run.unscoped_all_tenants.exists()

    token = secrets.token_hex(16)  # 32 characters: a well-formed unmasked token
    operator.cookies["csrftoken"] = token
    accepted = post_json(operator, "/api/runs/", body, **{"X-CSRFToken": token})
    assert accepted.status_code == 201
    assert Run.unscoped_all_tenants.count() == 1


def test_a_session_read_needs_no_csrf_token(world: World) -> None:
    world.graph("alpha", SPEC)

    assert signed_in("viewer", csrf=True).get("/api/graphs/alpha/").status_code == 200


def test_a_key_with_another_tenants_session_acts_for_the_key_only(world: World) -> None:
    mine = objects(world, world.acme, "alpha")
    theirs = objects(world, world.globex, "gx")
    key, secret = create_api_key(
        tenant=world.acme,
        name="cli",
        scopes=[GRAPHS_READ, RUNS_READ, RUNS_WRITE],
        actor=world.owner,
    )
    outsider = signed_in("outsider")  # globex's owner
    bearer = {"authorization": f"Bearer {secret}"}

    graphs = outsider.get("/api/graphs/", headers=bearer)
    their_run = outsider.get(f"/api/runs/{theirs.run}/", headers=bearer)
    their_start = post_json(outsider, "/api/runs/", {"graph": "gx", "input": {"x": 1}}, **bearer)
    my_start = post_json(outsider, "/api/runs/", {"graph": "alpha", "input": {"x": 1}}, **bearer)

    assert [g["slug"] for g in graphs.json()["results"]] == ["alpha"]
    assert_problem(their_run, 404)
    assert_problem(their_start, 404)
    assert my_start.status_code == 201
    run = Run.unscoped_all_tenants.get(id=my_start.json()["id"])
    assert run.tenant_id == world.acme.pk
    assert run.created_by is None
    entry = AuditEntry.unscoped_all_tenants.get(action="run.start", target_id=str(run.id))
    assert entry.actor is None
    assert entry.actor_label == f"api key cli (sk_{key.prefix}…)"
    their_runs = Run.unscoped_all_tenants.filter(tenant=world.globex).exclude(kind=RunKind.STREAM)
    assert their_runs.count() == 2  # the interactive run and the job's, as made
    assert str(mine.run) != my_start.json()["id"]


def test_a_cookie_never_widens_a_key(world: World) -> None:
    world.graph("alpha", SPEC)
    _, secret = create_api_key(
        tenant=world.acme, name="read only", scopes=[GRAPHS_READ], actor=world.owner
    )
    owner = signed_in("owner")

    refused = post_json(
        owner,
        "/api/graphs/",
        {"slug": "new", "name": "New", "spec": SPEC},
        authorization=f"Bearer {secret}",
    )
    bad_key = owner.get("/api/graphs/", headers={"authorization": "Bearer sk_nope"})

    assert GRAPHS_WRITE in assert_problem(refused, 403)["detail"]
    assert_problem(bad_key, 401)
    assert not StreamGraph.unscoped_all_tenants.filter(slug="new").exists()
    assert owner.get("/api/graphs/").status_code == 200  # the session alone still works


# -- schema and docs ----------------------------------------------------------------------


def test_the_schema_is_public(db: None) -> None:
    response = Client().get("/api/schema/", headers={"accept": "application/json"})

    assert response.status_code == 200
    assert "/api/runs/" in response.content.decode()


def test_the_docs_load_swagger_ui_from_our_static_files(db: None) -> None:
    response = Client().get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger" in html.lower()
    lowered = html.lower()
    for cdn in ("cdn", "unpkg", "jsdelivr"):
        assert cdn not in lowered
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', html)
    assert any("swagger-ui-bundle" in asset for asset in assets)
    for asset in assets:
        assert asset.startswith("/static/"), asset
        assert finders.find(asset.removeprefix("/static/").split("?")[0]), asset
        served = Client().get(asset)
        served.close()  # a file response: its file stays open until closed
        assert served.status_code == 200, asset
    assert "/api/schema/" in html
