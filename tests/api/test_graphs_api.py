"""The graphs API (apps/api/views/graphs.py): list with cursor pages, create, get, versions
(list, add, get), validate, diff, deploy and the pre-flight estimate. Checked by what comes
back (bodies, headers) and what the database holds afterwards."""

import copy
from typing import Any

import pytest

from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion, StreamGraph
from apps.tenants.api_keys import create_api_key
from apps.tenants.keys import GRAPHS_READ, GRAPHS_WRITE
from tests.api.helpers import SPEC, ApiClient, key_client
from tests.conftest import World

PROBLEM = "application/problem+json"


def edited(template: str = "{{ x }}!") -> dict[str, Any]:
    """SPEC with the template node's config changed."""
    spec = copy.deepcopy(SPEC)
    spec["nodes"][1]["config"]["template"] = template
    return spec


def unknown_type() -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["nodes"][1]["type"] = "transform.nope"
    return spec


def bad_config() -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["nodes"][1]["config"]["template"] = 5
    return spec


def fields(response: Any) -> list[str]:
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == 400
    return [error["field"] for error in body["errors"]]


def versions(graph: str) -> list[int]:
    return sorted(
        GraphVersion.unscoped_all_tenants.filter(graph__slug=graph).values_list("number", flat=True)
    )


def deployed_number(graph: StreamGraph) -> int:
    graph = StreamGraph.unscoped_all_tenants.select_related("deployed_version").get(pk=graph.pk)
    assert graph.deployed_version is not None
    return graph.deployed_version.number


def add_version(api: ApiClient, slug: str, spec: dict[str, Any], **extra: Any) -> Any:
    return api.post(f"/api/graphs/{slug}/versions/", {"spec": spec, **extra})


# -- list ---------------------------------------------------------------------------------


def test_list_pages_with_a_cursor(world: World) -> None:
    for slug in ("charlie", "alpha", "bravo"):
        world.graph(slug, SPEC)
    world.graph("delta", SPEC, tenant=world.globex)
    api = key_client(world, [GRAPHS_READ])

    first = api.get("/api/graphs/", limit=2)
    assert first.status_code == 200
    page = first.json()
    assert [g["slug"] for g in page["results"]] == ["alpha", "bravo"]
    assert page["next"]

    rest = api.get(page["next"]).json()
    assert [g["slug"] for g in rest["results"]] == ["charlie"]
    assert rest["next"] is None


def test_list_items_say_which_versions(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ, GRAPHS_WRITE])
    assert add_version(api, "alpha", edited(), deploy=False).status_code == 201

    (item,) = api.get("/api/graphs/").json()["results"]

    assert item["slug"] == "alpha" and item["name"] == "Alpha"
    assert item["deployed_version"] == 1
    assert item["latest_version"] == 2
    assert deployed_number(graph) == 1


@pytest.mark.parametrize("limit", ["0", "999", "-1", "two"])
def test_list_refuses_a_limit_out_of_range(world: World, limit: str) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.get("/api/graphs/", limit=limit)

    assert fields(response) == ["limit"]
    assert "200" in response.json()["errors"][0]["message"]


# -- create -------------------------------------------------------------------------------


def test_create_answers_201_with_location_and_writes_the_graph(world: World) -> None:
    api = key_client(world, [GRAPHS_WRITE])

    response = api.post(
        "/api/graphs/", {"slug": "fresh", "name": "Fresh", "description": "d", "spec": SPEC}
    )

    assert response.status_code == 201
    assert response["Location"] == "/api/graphs/fresh/"
    body = response.json()
    assert body["slug"] == "fresh" and body["name"] == "Fresh" and body["description"] == "d"
    assert body["deployed_version"] == body["latest_version"] == 1
    graph = StreamGraph.unscoped_all_tenants.get(slug="fresh")
    assert graph.tenant_id == world.acme.pk
    assert deployed_number(graph) == 1
    assert GraphVersion.unscoped_all_tenants.get(graph=graph).spec == SPEC


def test_create_with_a_slug_in_use_is_a_conflict(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = api.post("/api/graphs/", {"slug": "alpha", "name": "Again", "spec": edited()})

    assert response.status_code == 409
    assert response["Content-Type"] == PROBLEM
    assert "alpha" in response.json()["detail"]
    graph = StreamGraph.unscoped_all_tenants.get(tenant=world.acme, slug="alpha")
    assert graph.name == "Alpha"
    assert versions("alpha") == [1]


def test_a_slug_used_by_another_tenant_is_free(world: World) -> None:
    world.graph("alpha", SPEC, tenant=world.globex)
    api = key_client(world, [GRAPHS_WRITE])

    response = api.post("/api/graphs/", {"slug": "alpha", "name": "Ours", "spec": SPEC})

    assert response.status_code == 201
    assert StreamGraph.unscoped_all_tenants.filter(slug="alpha").count() == 2


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (unknown_type(), "node 't'.type", "unknown operator type"),
        (bad_config(), "node 't'.config.template", "not of type 'string'"),
    ],
    ids=["unknown-type", "bad-config"],
)
def test_create_with_an_invalid_spec_names_the_node_field_and_writes_nothing(
    world: World, spec: dict[str, Any], field: str, words: str
) -> None:
    api = key_client(world, [GRAPHS_WRITE])

    response = api.post("/api/graphs/", {"slug": "broken", "name": "Broken", "spec": spec})

    assert fields(response) == [field]
    assert words in response.json()["errors"][0]["message"]
    assert response.json()["detail"].startswith(field)
    assert not StreamGraph.unscoped_all_tenants.exists()
    assert not GraphVersion.unscoped_all_tenants.exists()
    assert not AuditEntry.unscoped_all_tenants.filter(action__startswith="graph.").exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "No slug", "spec": SPEC}, "slug"),
        ({"slug": "Not A Slug", "name": "x", "spec": SPEC}, "slug"),
        ({"slug": "nospec", "name": "x"}, "spec"),
        ({"slug": "noname", "spec": SPEC}, "name"),
    ],
)
def test_create_names_the_field_at_fault(world: World, body: dict[str, Any], field: str) -> None:
    api = key_client(world, [GRAPHS_WRITE])

    assert fields(api.post("/api/graphs/", body)) == [field]
    assert not StreamGraph.unscoped_all_tenants.exists()


# -- get ----------------------------------------------------------------------------------


def test_get_a_graph(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.get("/api/graphs/alpha/")

    assert response.status_code == 200
    body = response.json()
    assert body["slug"] == "alpha"
    assert body["deployed_version"] == body["latest_version"] == 1
    assert api.get("/api/graphs/missing/").status_code == 404


# -- versions -----------------------------------------------------------------------------


def test_versions_list_newest_first(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ, GRAPHS_WRITE])
    add_version(api, "alpha", edited("a"), note="second", deploy=False)
    add_version(api, "alpha", edited("b"), note="third", deploy=False)

    page = api.get("/api/graphs/alpha/versions/", limit=2).json()

    assert [(v["number"], v["note"], v["deployed"]) for v in page["results"]] == [
        (3, "third", False),
        (2, "second", False),
    ]
    assert page["results"][0]["spec"] == edited("b")
    rest = api.get(page["next"]).json()
    assert [(v["number"], v["deployed"], v["created_by"]) for v in rest["results"]] == [
        (1, True, "owner")
    ]


def test_add_version_without_deploy_keeps_the_deployed_one(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = add_version(api, "alpha", edited(), note="try", deploy=False)

    assert response.status_code == 201
    assert response["Location"] == "/api/graphs/alpha/versions/2/"
    body = response.json()
    assert body["number"] == 2 and body["note"] == "try" and body["deployed"] is False
    assert body["created_by"] is None  # made by a key, not a member
    assert versions("alpha") == [1, 2]
    assert deployed_number(graph) == 1


def test_add_version_leaves_deploy_off_by_default(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    assert add_version(api, "alpha", edited()).json()["deployed"] is False
    assert deployed_number(graph) == 1


def test_add_version_with_deploy_moves_the_deployed_one(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = add_version(api, "alpha", edited(), deploy=True)

    assert response.status_code == 201
    assert response.json()["deployed"] is True
    assert deployed_number(graph) == 2


def test_add_version_based_on_the_latest_goes_through(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = add_version(api, "alpha", edited(), based_on=1, deploy=True)

    assert response.status_code == 201
    assert response.json()["number"] == 2
    assert deployed_number(graph) == 2


def test_add_version_based_on_a_stale_one_is_a_conflict_and_writes_nothing(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])
    assert add_version(api, "alpha", edited("a"), based_on=1).status_code == 201

    response = add_version(api, "alpha", edited("b"), based_on=1, deploy=True)

    assert response.status_code == 409
    assert response["Content-Type"] == PROBLEM
    assert "Version 2" in response.json()["detail"]
    assert versions("alpha") == [1, 2]
    assert deployed_number(graph) == 1


def test_add_version_with_an_invalid_spec_writes_nothing(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = add_version(api, "alpha", unknown_type(), deploy=True)

    assert fields(response) == ["node 't'.type"]
    assert versions("alpha") == [1]
    assert deployed_number(graph) == 1


def test_get_a_version(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.get("/api/graphs/alpha/versions/1/")

    assert response.status_code == 200
    body = response.json()
    assert body["number"] == 1 and body["deployed"] is True and body["spec"] == SPEC
    assert len(body["checksum"]) > 0


@pytest.mark.parametrize("number", ["2", "99999999999", "0"])
def test_a_missing_version_is_404(world: World, number: str) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.get(f"/api/graphs/alpha/versions/{number}/")

    assert response.status_code == 404
    assert response["Content-Type"] == PROBLEM


# -- validate -----------------------------------------------------------------------------


def test_validate_a_valid_spec(world: World) -> None:
    api = key_client(world, [GRAPHS_READ])

    response = api.post("/api/graphs/validate/", {"spec": SPEC})

    assert response.status_code == 200
    assert response.json() == {"valid": True, "errors": []}


def test_validate_lists_every_error_and_saves_nothing(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])
    spec = unknown_type()
    spec["nodes"].append({"id": "u", "type": "transform.template", "config": {"template": 5}})
    spec["edges"].append(["in", "u"])

    response = api.post("/api/graphs/validate/", {"spec": spec})

    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    assert [(e["where"], e["field"]) for e in body["errors"]] == [
        ("node 't'", "type"),
        ("node 'u'", "config.template"),
    ]
    assert all(e["message"] for e in body["errors"])
    assert StreamGraph.unscoped_all_tenants.count() == 1
    assert versions("alpha") == [1]


def test_validate_without_a_spec_names_it(world: World) -> None:
    api = key_client(world, [GRAPHS_READ])

    assert fields(api.post("/api/graphs/validate/", {})) == ["spec"]


# -- diff ---------------------------------------------------------------------------------


def test_diff_shows_a_config_change(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ, GRAPHS_WRITE])
    add_version(api, "alpha", edited("{{ x }}!"))

    response = api.get("/api/graphs/alpha/diff/", **{"from": 1, "to": 2})

    assert response.status_code == 200
    body = response.json()
    assert body["behaviour_changed"] is True
    assert body["added_nodes"] == body["removed_nodes"] == []
    assert body["changed_nodes"] == [
        {
            "id": "t",
            "type": "transform.template",
            "changes": [
                {
                    "field": "config.template",
                    "kind": "changed",
                    "before": "{{ x }}",
                    "after": "{{ x }}!",
                }
            ],
        }
    ]
    assert "1 node changed" in body["summary"]


@pytest.mark.parametrize(
    ("params", "missing"), [({"to": 2}, "from"), ({"from": 1}, "to"), ({}, "from")]
)
def test_diff_needs_from_and_to(world: World, params: dict[str, int], missing: str) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    assert missing in fields(api.get("/api/graphs/alpha/diff/", **params))


def test_diff_of_a_missing_version_is_404(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    assert api.get("/api/graphs/alpha/diff/", **{"from": 1, "to": 7}).status_code == 404


# -- deploy -------------------------------------------------------------------------------


def test_deploy_moves_the_deployed_version_and_audits_it_as_the_key(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    key, secret = create_api_key(
        tenant=world.acme, name="ci deploy", scopes=[GRAPHS_WRITE], actor=world.owner
    )
    api = ApiClient(secret)
    assert add_version(api, "alpha", edited()).status_code == 201
    assert deployed_number(graph) == 1

    response = api.post("/api/graphs/alpha/deploy/", {"version": 2})

    assert response.status_code == 200
    assert response.json()["deployed_version"] == 2
    assert response.json()["latest_version"] == 2
    assert deployed_number(graph) == 2
    entry = AuditEntry.unscoped_all_tenants.get(
        action="graph.deploy", target_id=str(graph.pk), after={"version": 2}
    )
    assert entry.tenant_id == world.acme.pk
    assert entry.before == {"version": 1}
    assert entry.actor is None
    assert entry.actor_label == f"api key ci deploy (sk_{key.prefix}…)"


def test_deploy_back_to_an_older_version(world: World) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])
    add_version(api, "alpha", edited(), deploy=True)

    response = api.post("/api/graphs/alpha/deploy/", {"version": 1})

    assert response.status_code == 200
    assert deployed_number(graph) == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [({"version": 5}, 404, None), ({}, 400, "version"), ({"version": 0}, 400, "version")],
)
def test_deploy_refuses_a_version_it_cannot_find(
    world: World, body: dict[str, int], status: int, field: str | None
) -> None:
    graph = world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_WRITE])

    response = api.post("/api/graphs/alpha/deploy/", body)

    assert response.status_code == status
    if field is not None:
        assert fields(response) == [field]
    assert deployed_number(graph) == 1
    assert not AuditEntry.unscoped_all_tenants.filter(action="graph.deploy").exists()


# -- estimate -----------------------------------------------------------------------------


def test_estimate_counts_steps(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.post("/api/graphs/alpha/estimate/", {"items": 10})

    assert response.status_code == 200
    body = response.json()
    assert body["steps"]["total"] > 0
    assert set(body["steps"]["per_node"]) == {"in", "t", "s"}
    assert body["steps"]["per_node"]["in"] >= 10
    assert isinstance(body["assumptions"], list)


@pytest.mark.parametrize("body", [{"items": 0}, {}, {"items": "many"}])
def test_estimate_needs_a_positive_number_of_items(world: World, body: dict[str, Any]) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    assert fields(api.post("/api/graphs/alpha/estimate/", body)) == ["items"]


def test_estimate_of_a_missing_version_is_404(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [GRAPHS_READ])

    response = api.post("/api/graphs/alpha/estimate/", {"items": 1, "version": 9})

    assert response.status_code == 404
