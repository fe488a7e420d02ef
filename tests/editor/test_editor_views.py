"""The editor's pages and round trips: who may do what (checked on the server), what a save,
rollback and deploy write (with their audit entries), and that another tenant's graph is a
404 everywhere with nothing changed."""

import json
import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion, StreamGraph
from apps.runs.models import Run
from tests.conftest import World
from tests.web.test_pages import SCHEMA_SPEC, SPEC, logged_in, text

pytestmark = pytest.mark.django_db

SWITCH_NODE = {"id": "route", "type": "route.switch"}


@pytest.fixture
def graph(world: World) -> StreamGraph:
    return world.graph("flow", SCHEMA_SPEC)


def post_json(client: Client, name: str, slug: str, body: Any) -> Any:
    url = reverse(f"editor:{name}", args=[slug])
    return client.post(url, json.dumps(body), content_type="application/json")


def node_post(client: Client, name: str, slug: str, node: Any, spec: Any, **fields: str) -> Any:
    data = {"cell": "c1", "node": json.dumps(node), "spec": json.dumps(spec), **fields}
    return client.post(reverse(f"editor:{name}", args=[slug]), data)


def versions(graph: StreamGraph) -> list[int]:
    rows = GraphVersion.unscoped_all_tenants.filter(graph=graph).order_by("number")
    return list(rows.values_list("number", flat=True))


def with_change(spec: dict[str, Any], template: str) -> dict[str, Any]:
    nodes = [dict(n) for n in spec["nodes"]]
    nodes[1] = {**nodes[1], "config": {"template": template}}
    return {**spec, "nodes": nodes}


# -- the page -----------------------------------------------------------------------------


def test_the_editor_page_carries_the_spec_and_the_palette(
    client: Client, world: World, graph: StreamGraph
) -> None:
    page = logged_in(client, world, "editor").get(reverse("editor:edit", args=["flow"]))
    assert page.status_code == 200
    found = re.search(r'id="editor-data"[^>]*>(.*?)</script>', page.content.decode(), re.S)
    assert found is not None
    data = json.loads(found.group(1))
    assert data["spec"] == SCHEMA_SPEC and data["canEdit"] is True and data["basedOn"] == 1
    assert data["palette"]["source.manual"]["has_input"] is False
    assert data["palette"]["llm.generate"]["outputs"] == ["out"]
    assert 'class="palette-item"' in text(page) and "Save version" in text(page)


def test_a_viewer_sees_the_graph_read_only(
    client: Client, world: World, graph: StreamGraph
) -> None:
    page = logged_in(client, world, "viewer").get(reverse("editor:edit", args=["flow"]))
    body = text(page)
    assert page.status_code == 200
    assert '"canEdit": false' in body
    assert "palette-item" not in body and "Save version" not in body
    assert "Read only: changing graphs needs the editor role" in body
    form = node_post(client, "node_form", "flow", SPEC["nodes"][1], SPEC)
    assert form.status_code == 200 and "<fieldset disabled>" in text(form)


def test_an_old_version_opens_with_a_warning(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    post_json(client, "save", "flow", {"spec": with_change(SCHEMA_SPEC, "v2"), "based_on": 1})
    page = client.get(reverse("editor:edit", args=["flow"]) + "?version=1")
    assert "You are looking at version 1; the latest is 2" in text(page)
    assert client.get(reverse("editor:edit", args=["flow"]) + "?version=9").status_code == 404


# -- new graphs ---------------------------------------------------------------------------


def test_an_editor_creates_an_empty_graph_and_lands_in_the_editor(
    client: Client, world: World
) -> None:
    logged_in(client, world, "editor")
    response = client.post(reverse("editor:new_graph"), {"name": "Daily digest"})
    assert response.status_code == 302
    assert response["Location"] == reverse("editor:edit", args=["daily-digest"])
    graph = StreamGraph.unscoped_all_tenants.get(slug="daily-digest")
    assert graph.tenant_id == world.acme.pk and graph.deployed_version is None
    assert AuditEntry.unscoped_all_tenants.filter(
        action="graph.create", target_id=graph.pk
    ).exists()
    page = client.get(response["Location"])
    assert page.status_code == 200 and "Empty graph." in text(page)


def test_new_graph_errors_name_the_field(client: Client, world: World, graph: StreamGraph) -> None:
    logged_in(client, world, "editor")
    taken = client.post(reverse("editor:new_graph"), {"name": "Flow", "slug": "flow"})
    assert taken.status_code == 400
    assert "A graph with the slug 'flow' already exists." in text(taken)
    reserved = client.post(reverse("editor:new_graph"), {"name": "New"})
    assert "'new' is reserved" in text(reserved)
    assert StreamGraph.unscoped_all_tenants.count() == 1


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_below_editor_no_new_graph(client: Client, world: World, role: str) -> None:
    logged_in(client, world, role)
    assert client.get(reverse("editor:new_graph")).status_code == 403
    assert client.post(reverse("editor:new_graph"), {"name": "X"}).status_code == 403
    assert not StreamGraph.unscoped_all_tenants.exists()


# -- node forms ---------------------------------------------------------------------------


def test_a_valid_config_comes_back_as_the_node_in_an_event(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    node = {"id": "ask", "type": "llm.generate", "position": {"x": 1, "y": 2}}
    fields = {"node_id": "ask2", "label": "Ask", "cfg.prompt": "Q: {{ x }}", "cfg.max_tokens": "9"}
    response = node_post(client, "node_config", "flow", node, SPEC, **fields)
    assert response.status_code == 200
    event = json.loads(response["HX-Trigger"])["sluice:node-config"]
    assert event["valid"] is True and event["cell"] == "c1"
    assert event["node"] == {
        "id": "ask2",
        "type": "llm.generate",
        "position": {"x": 1, "y": 2},
        "config": {"prompt": "Q: {{ x }}", "max_tokens": 9},
        "label": "Ask",
    }
    assert "Applied to the node" in text(response)


def test_config_errors_are_shown_on_their_fields(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    node = {"id": "ask", "type": "llm.generate"}
    bad = node_post(
        client, "node_config", "flow", node, SPEC,
        node_id="in", **{"cfg.prompt": "{{ broken", "cfg.max_tokens": "0"},
    )  # fmt: skip
    body = text(bad)
    assert json.loads(bad["HX-Trigger"])["sluice:node-config"]["valid"] is False
    assert "Another node is already called 'in'." in body
    bounds = node_post(
        client, "node_config", "flow", node, SPEC,
        node_id="ask", **{"cfg.prompt": "{{ broken", "cfg.max_tokens": "0"},
    )  # fmt: skip
    assert "0 is less than the minimum of 1" in text(bounds)
    syntax = node_post(
        client, "node_config", "flow", node, SPEC, node_id="ask", **{"cfg.prompt": "{{ broken"}
    )
    assert 'id="cfg.prompt-error"' in text(syntax)


def test_a_switch_gets_one_output_port_per_case(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    fields = {"node_id": "route", "cfg.field": "kind", "cfg.cases": '{"a": "fast", "b": "slow"}'}
    response = node_post(client, "node_config", "flow", SWITCH_NODE, SPEC, **fields)
    event = json.loads(response["HX-Trigger"])["sluice:node-config"]
    assert event["valid"] and event["outputs"] == ["fast", "slow"]


def test_forms_refuse_what_no_form_sends(client: Client, world: World, graph: StreamGraph) -> None:
    logged_in(client, world, "editor")
    unknown = node_post(client, "node_form", "flow", {"id": "x", "type": "nope"}, SPEC)
    assert unknown.status_code == 400 and "unknown operator type" in text(unknown)
    broken = client.post(reverse("editor:node_form", args=["flow"]), {"node": "{", "spec": "{}"})
    assert broken.status_code == 400


def test_a_viewer_cannot_apply_a_config(client: Client, world: World, graph: StreamGraph) -> None:
    logged_in(client, world, "viewer")
    response = node_post(client, "node_config", "flow", SWITCH_NODE, SPEC, node_id="route")
    assert response.status_code == 403


# -- validate, layout, save -----------------------------------------------------------------


def test_validate_lists_every_problem_with_where_it_is(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "viewer")
    spec = {"nodes": [*SPEC["nodes"], {"id": "lost", "type": "sink.table"}], "edges": SPEC["edges"]}
    result = post_json(client, "validate", "flow", {"spec": spec}).json()
    assert result["valid"] is False
    assert {
        "where": "node 'lost'",
        "field": "config",
        "message": "'table' is a required property",
    } in result["errors"]
    assert post_json(client, "validate", "flow", {"spec": SPEC}).json() == {
        "valid": True,
        "errors": [],
    }


def test_layout_places_every_node_left_to_right(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "viewer")
    positions = post_json(client, "layout", "flow", {"spec": SPEC}).json()["positions"]
    assert set(positions) == {"in", "t", "s"}
    assert positions["in"]["x"] < positions["t"]["x"] < positions["s"]["x"]


def test_save_makes_a_version_that_is_not_deployed(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    spec = with_change(SCHEMA_SPEC, "changed {{ x }}")
    response = post_json(client, "save", "flow", {"spec": spec, "note": "louder", "based_on": 1})
    assert response.status_code == 201
    assert response.json()["number"] == 2 and response.json()["deployed"] is False
    version = GraphVersion.unscoped_all_tenants.get(graph=graph, number=2)
    assert version.spec == spec and version.note == "louder" and version.created_by == world.editor
    assert StreamGraph.unscoped_all_tenants.get(pk=graph.pk).deployed_version.number == 1
    audit = AuditEntry.unscoped_all_tenants.get(action="graph_version.create", target_id=version.pk)
    assert audit.actor == world.editor and audit.after["number"] == 2


def test_the_first_version_of_a_new_graph_is_deployed(client: Client, world: World) -> None:
    logged_in(client, world, "editor")
    client.post(reverse("editor:new_graph"), {"name": "Fresh"})
    response = post_json(client, "save", "fresh", {"spec": SPEC, "based_on": None})
    assert response.status_code == 201 and response.json()["deployed"] is True


def test_an_invalid_save_writes_nothing_and_says_why(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    before = AuditEntry.unscoped_all_tenants.count()
    spec = {**SPEC, "edges": [["in", "t"]]}
    response = post_json(client, "save", "flow", {"spec": spec, "based_on": 1})
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["title"] == "Not saved: the graph has 1 problem."
    assert response.json()["errors"][0]["where"] == "node 's'"
    assert versions(graph) == [1] and AuditEntry.unscoped_all_tenants.count() == before


def test_a_save_on_top_of_a_stale_version_is_refused(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    assert post_json(client, "save", "flow", {"spec": SPEC, "based_on": 1}).status_code == 201
    stale = post_json(client, "save", "flow", {"spec": SCHEMA_SPEC, "based_on": 1})
    assert stale.status_code == 409
    assert "Version 2 was saved since you opened version 1" in stale.json()["title"]
    assert versions(graph) == [1, 2]


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_below_editor_nothing_is_saved(
    client: Client, world: World, graph: StreamGraph, role: str
) -> None:
    logged_in(client, world, role)
    response = post_json(client, "save", "flow", {"spec": SPEC, "based_on": 1})
    assert response.status_code == 403
    assert versions(graph) == [1]


# -- history --------------------------------------------------------------------------------


def test_history_diff_rollback_and_deploy(client: Client, world: World, graph: StreamGraph) -> None:
    logged_in(client, world, "editor")
    post_json(
        client, "save", "flow", {"spec": with_change(SCHEMA_SPEC, "v2 {{ x }}"), "based_on": 1}
    )
    history = text(client.get(reverse("editor:history", args=["flow"])))
    assert "v2" in history and "Roll back to this" in history
    diff = client.get(reverse("editor:diff", args=["flow"]) + "?from=1&to=2")
    assert "1 node changed" in text(diff)
    assert "config.template" in text(diff) and "v2 {{ x }}" in text(diff)

    rollback = client.post(reverse("editor:rollback", args=["flow", 1]))
    assert rollback.status_code == 302
    v1, v3 = (GraphVersion.unscoped_all_tenants.get(graph=graph, number=n) for n in (1, 3))
    assert v3.spec == v1.spec and v3.checksum == v1.checksum
    assert v3.note == "Rollback to version 1"
    # v2 was saved but not deployed, so the rollback is not deployed either.
    assert StreamGraph.unscoped_all_tenants.get(pk=graph.pk).deployed_version == v1

    assert client.post(reverse("editor:deploy", args=["flow", 2])).status_code == 302
    assert StreamGraph.unscoped_all_tenants.get(pk=graph.pk).deployed_version.number == 2
    deploy = AuditEntry.unscoped_all_tenants.filter(action="graph.deploy").order_by("-at").first()
    assert deploy is not None and (deploy.before, deploy.after) == ({"version": 1}, {"version": 2})
    assert "no changes" in text(client.get(reverse("editor:diff", args=["flow"]) + "?from=1&to=3"))


def test_a_rollback_of_the_deployed_head_is_deployed(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    post_json(client, "save", "flow", {"spec": with_change(SCHEMA_SPEC, "v2"), "based_on": 1})
    client.post(reverse("editor:deploy", args=["flow", 2]))
    client.post(reverse("editor:rollback", args=["flow", 1]))
    assert StreamGraph.unscoped_all_tenants.get(pk=graph.pk).deployed_version.number == 3


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_below_editor_no_rollback_or_deploy(
    client: Client, world: World, graph: StreamGraph, role: str
) -> None:
    logged_in(client, world, role)
    assert client.post(reverse("editor:rollback", args=["flow", 1])).status_code == 403
    assert client.post(reverse("editor:deploy", args=["flow", 1])).status_code == 403
    assert versions(graph) == [1]


# -- running --------------------------------------------------------------------------------


def test_the_run_form_follows_the_input_schema_and_starts_a_run(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "operator")
    form = client.get(reverse("editor:run_form", args=["flow"]) + "?version=1")
    assert form.status_code == 200 and 'name="in.x"' in text(form) and 'value="1"' in text(form)
    bad = client.post(reverse("editor:run", args=["flow"]), {"version": "1", "in.x": "one"})
    assert "Enter a whole number, not &#x27;one&#x27;." in bad.content.decode()
    assert not Run.unscoped_all_tenants.exists()
    started = client.post(reverse("editor:run", args=["flow"]), {"version": "1", "in.x": "7"})
    run = Run.unscoped_all_tenants.get()
    assert started["HX-Redirect"] == reverse("runs:detail", args=[run.id])
    assert run.input == {"x": 7} and run.graph_version.number == 1


def test_without_an_input_schema_the_whole_input_is_json(client: Client, world: World) -> None:
    world.graph("plain", SPEC)
    logged_in(client, world, "operator")
    form = text(client.get(reverse("editor:run_form", args=["plain"]) + "?version=1"))
    assert 'name="in.payload"' in form
    client.post(reverse("editor:run", args=["plain"]), {"version": "1", "in.payload": '{"x": 3}'})
    assert Run.unscoped_all_tenants.get().input == {"x": 3}


def test_a_viewer_cannot_run(client: Client, world: World, graph: StreamGraph) -> None:
    logged_in(client, world, "viewer")
    assert client.get(reverse("editor:run_form", args=["flow"]) + "?version=1").status_code == 403
    response = client.post(reverse("editor:run", args=["flow"]), {"version": "1", "in.x": "1"})
    assert response.status_code == 403 and not Run.unscoped_all_tenants.exists()


# -- another tenant -------------------------------------------------------------------------

GETS = ["edit", "history", "run_form"]
POSTS = ["node_form", "node_config", "validate", "layout", "save", "run"]


def test_another_tenants_graph_is_a_404_everywhere_and_nothing_changes(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "outsider")
    before = (versions(graph), AuditEntry.unscoped_all_tenants.count())
    for name in GETS:
        assert (
            client.get(reverse(f"editor:{name}", args=["flow"]) + "?version=1").status_code == 404
        )
    assert client.get(reverse("editor:diff", args=["flow"]) + "?from=1&to=1").status_code == 404
    for name in ("validate", "layout", "save"):
        assert post_json(client, name, "flow", {"spec": SPEC, "based_on": 1}).status_code == 404
    for name in ("node_form", "node_config"):
        assert node_post(client, name, "flow", SWITCH_NODE, SPEC, node_id="r").status_code == 404
    run = client.post(reverse("editor:run", args=["flow"]), {"version": "1", "in.x": "1"})
    assert run.status_code == 404
    for name in ("rollback", "deploy"):
        assert client.post(reverse(f"editor:{name}", args=["flow", 1])).status_code == 404
    assert (versions(graph), AuditEntry.unscoped_all_tenants.count()) == before
    assert not Run.unscoped_all_tenants.exists()


def test_signed_out_visitors_are_sent_to_log_in(client: Client, graph: StreamGraph) -> None:
    response = client.get(reverse("editor:edit", args=["flow"]))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_graph_settings_are_checked_and_come_back_as_policies(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    url = reverse("editor:policies_form", args=["flow"])
    form = text(client.post(url, {"policies": json.dumps({"ttl_s": 60})}))
    assert 'name="policy.ttl_s"' in form and 'value="60"' in form
    apply = reverse("editor:policies", args=["flow"])
    good = client.post(apply, {"policy.ttl_s": "120", "policy.on_disconnect": "cancel"})
    event = json.loads(good["HX-Trigger"])["sluice:policies"]
    assert event == {"policies": {"ttl_s": 120, "on_disconnect": "cancel"}, "valid": True}
    bad = client.post(apply, {"policy.ttl_s": "0", "policy.max_fanout": "many"})
    assert json.loads(bad["HX-Trigger"])["sluice:policies"]["valid"] is False
    assert "Enter a whole number, not &#x27;many&#x27;." in bad.content.decode()
    bounds = client.post(apply, {"policy.ttl_s": "0"})
    assert "0 is less than the minimum of 1." in text(bounds)
    logged_in(client, world, "viewer")
    assert client.post(apply, {"policy.ttl_s": "5"}).status_code == 403


def test_retries_and_the_step_deadline_are_set_from_the_form(
    client: Client, world: World, graph: StreamGraph
) -> None:
    logged_in(client, world, "editor")
    node = {"id": "ask", "type": "llm.generate", "retry": {"max_attempts": 5}, "ttl_s": 30}
    form = text(node_post(client, "node_form", "flow", node, SPEC))
    assert 'name="step.max_attempts"' in form and 'value="5"' in form and 'value="30"' in form
    fields = {"node_id": "ask", "cfg.prompt": "Q", "step.backoff_s": "2.5", "step.step_ttl_s": ""}
    response = node_post(client, "node_config", "flow", node, SPEC, **fields)
    event = json.loads(response["HX-Trigger"])["sluice:node-config"]
    # Emptied fields are removed: the platform's defaults apply again.
    assert event["node"]["retry"] == {"backoff_s": 2.5} and "ttl_s" not in event["node"]
    bad = node_post(
        client, "node_config", "flow", node, SPEC,
        node_id="ask", **{"cfg.prompt": "Q", "step.max_attempts": "11"},
    )  # fmt: skip
    assert json.loads(bad["HX-Trigger"])["sluice:node-config"]["valid"] is False
    assert "11 is greater than the maximum of 10" in text(bad)
