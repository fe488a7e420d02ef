"""The server-rendered pages: login, graph list, graph detail with its two forms, the run
page and cancel. Runs started here are never picked up by a worker (on_commit callbacks do
not fire inside the test transaction), except where a test drives the steps in-process or
uses the real workers."""

import html
import json
import re
from typing import Any, cast

import pytest
from django.contrib.auth.models import AbstractBaseUser, User
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.validation import validate_spec
from apps.runs.models import Run, RunStatus, Step, StepStatus, Usage
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from sluice.tasks import execute_step
from tests.conftest import World
from tests.runs.helpers import wait_for_run

SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "config": {"example": {"x": 1}}},
        {"id": "t", "type": "transform.template", "config": {"template": "{{ x }}"}},
        {"id": "s", "type": "sink.table", "config": {"table": "out"}},
    ],
    "edges": [["in", "t"], ["t", "s"]],
}

SCHEMA_SPEC: dict[str, Any] = {
    **SPEC,
    "nodes": [
        {
            "id": "in",
            "type": "source.manual",
            "config": {
                "example": {"x": 1},
                "input_schema": {
                    "type": "object",
                    "required": ["x"],
                    "properties": {"x": {"type": "integer"}},
                },
            },
        },
        *SPEC["nodes"][1:],
    ],
}

LLM_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "config": {"example": {"q": "why"}}},
        {
            "id": "ask",
            "type": "llm.generate",
            "config": {"prompt": "Answer: {{ q }}", "max_tokens": 5},
        },
        {"id": "keep", "type": "sink.table", "config": {"table": "answers"}},
    ],
    "edges": [["in", "ask"], ["ask", "keep"]],
}


def text(response: Any) -> str:
    """The response body with HTML entities decoded, so messages can be compared as written."""
    return html.unescape(response.content.decode())


def sign_in(client: Client, user: AbstractBaseUser) -> Client:
    client.force_login(cast(User, user))
    return client


def logged_in(client: Client, world: World, name: str) -> Client:
    return sign_in(client, getattr(world, name))


def runs_of(world: World) -> int:
    return Run.unscoped_all_tenants.filter(tenant=world.acme).count()


def start(world: World, graph: StreamGraph, payload: dict[str, Any] | None = None) -> Run:
    version = graph.deployed_version
    assert version is not None
    with tenant_context(world.acme):
        return start_run(version=version, payload=payload or {"x": 1}, actor=world.owner)


def run_in_process(run: Run) -> Run:
    """Runs the run's steps here, one message at a time, through the workers' own task."""
    with tenant_context(run.tenant):
        for _ in range(50):
            waiting = Step.objects.filter(run=run, status=StepStatus.QUEUED)
            step_ids = list(waiting.values_list("id", flat=True))
            if not step_ids:
                break
            for step_id in step_ids:
                execute_step.apply(args=(run.tenant_id, str(step_id)), throw=True)
        run.refresh_from_db()
    return run


# -- login and the frame -------------------------------------------------------------------


def test_login_page_renders_a_labelled_form_with_autofocus(client: Client, db: None) -> None:
    response = client.get(reverse("login"))
    assert response.status_code == 200
    body = response.content.decode()
    assert '<label for="id_username">Username</label>' in body
    assert '<label for="id_password">Password</label>' in body
    assert re.search(r'<input[^>]*name="username"[^>]*autofocus', body)
    assert 'href="/static/sluice.css"' in body


def test_bad_credentials_show_an_error_and_good_ones_land_on_the_graph_list(
    client: Client, world: World
) -> None:
    response = client.post(reverse("login"), {"username": "owner", "password": "wrong"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in text(response)

    response = client.post(reverse("login"), {"username": "owner", "password": "pw-owner"})
    assert response.status_code == 302
    assert response["Location"] == reverse("graphs:list")


def test_header_shows_tenant_user_logout_and_admin_only_for_staff(
    client: Client, world: World
) -> None:
    body = text(logged_in(client, world, "viewer").get(reverse("graphs:list")))
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Acme</a>' in body
    assert "viewer" in body
    assert f'<form method="post" action="{reverse("logout")}">' in body
    assert reverse("admin:index") not in body

    world.viewer.is_staff = True  # type: ignore[attr-defined]
    world.viewer.save()
    assert reverse("admin:index") in text(client.get(reverse("graphs:list")))


def test_logout_is_a_post_and_signs_out(client: Client, world: World) -> None:
    logged_in(client, world, "owner")
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert client.get(reverse("graphs:list")).status_code == 302


@pytest.mark.parametrize("page", ["list", "detail", "run"])
def test_anonymous_visitors_are_sent_to_login(client: Client, world: World, page: str) -> None:
    graph = world.graph("alpha", SPEC)
    url = {
        "list": reverse("graphs:list"),
        "detail": reverse("graphs:detail", args=["alpha"]),
        "run": reverse("runs:detail", args=[start(world, graph).id]),
    }[page]
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


# -- graph list ----------------------------------------------------------------------------


def test_graph_list_shows_this_tenants_graphs_only(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    world.graph("bravo", SPEC)
    world.graph("zulu", SPEC, tenant=world.globex)
    body = text(logged_in(client, world, "viewer").get(reverse("graphs:list")))
    assert "Alpha" in body and "Bravo" in body
    assert "Zulu" not in body
    assert reverse("graphs:detail", args=["alpha"]) in body
    assert "2 graphs in Acme" in body


def test_graph_list_shows_version_node_count_and_last_run(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    run = start(world, graph)
    response = logged_in(client, world, "viewer").get(reverse("graphs:list"))
    row = re.search(r"<tr>\s*<td>\s*<a class=\"strong\".*?</tr>", response.content.decode(), re.S)
    assert row is not None
    cells = [
        re.sub(r"<[^>]+>|\s+", " ", c).strip()
        for c in re.findall(r"<td[^>]*>(.*?)</td>", row[0], re.S)
    ]
    assert cells[1:3] == ["v1", "3"]
    assert cells[3].startswith("queued")
    assert reverse("runs:detail", args=[run.id]) in row[0]


def test_graph_list_empty_state(client: Client, world: World) -> None:
    body = text(logged_in(client, world, "owner").get(reverse("graphs:list")))
    assert "No graphs yet" in body
    assert "<table" not in body


def test_graph_list_paginates_past_25(client: Client, world: World) -> None:
    for i in range(27):
        world.graph(f"g{i:02d}", SPEC)
    logged_in(client, world, "viewer")
    first = client.get(reverse("graphs:list")).content.decode()
    second = client.get(reverse("graphs:list") + "?page=2").content.decode()
    assert first.count('class="strong"') == 25
    assert second.count('class="strong"') == 2
    # The name as the page shows it: a bare "G26" can turn up in a random CSRF token.
    assert "Page 1 of 2" in first and ">G26<" in second and ">G26<" not in first


# -- graph detail and starting a run ---------------------------------------------------------


def test_graph_detail_shows_nodes_edges_versions_and_the_example_input(
    client: Client, world: World
) -> None:
    world.graph("alpha", SPEC)
    response = logged_in(client, world, "operator").get(reverse("graphs:detail", args=["alpha"]))
    assert response.status_code == 200
    body = text(response)
    textarea = re.search(r'<textarea name="payload"[^>]*>(.*?)</textarea>', body, re.S)
    assert textarea is not None
    assert json.loads(textarea[1]) == {"x": 1}
    assert '{"x": 1}' not in textarea[1]  # pretty-printed
    assert "transform.template" in body and "sink.table" in body
    assert "<code>t</code> → <code>s</code>" in body
    assert "first version" in body  # the versions table
    assert "simulated engine" not in body


def test_llm_nodes_on_the_simulated_engine_are_labelled(client: Client, world: World) -> None:
    world.graph("asker", LLM_SPEC)
    body = text(logged_in(client, world, "viewer").get(reverse("graphs:detail", args=["asker"])))
    node_row = re.search(r"<tr>\s*<td><code>ask</code></td>.*?</tr>", body, re.S)
    assert node_row is not None and "simulated engine" in node_row[0]
    assert "<td>gpu.default</td>" in node_row[0]


def test_starting_a_run_from_the_form_creates_it_and_redirects_to_its_page(
    client: Client, world: World
) -> None:
    graph = world.graph("alpha", SPEC)
    response = logged_in(client, world, "operator").post(
        reverse("graphs:start_run", args=["alpha"]), {"payload": '{"x": 41}'}
    )
    assert response.status_code == 302
    with tenant_context(world.acme):
        run = Run.objects.get()
        step = Step.objects.get(run=run)
    assert response["Location"] == reverse("runs:detail", args=[run.id])
    assert run.input == {"x": 41}
    assert run.graph_version_id == graph.deployed_version_id
    assert run.created_by_id == world.operator.pk
    assert (step.node_id, step.status) == ("in", StepStatus.QUEUED)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ('{"x": ', "The input is not valid JSON: Expecting value (line 1, column 7)"),
        ("[1, 2]", "input must be a JSON object, got list"),
        ('{"x": "two"}', "x: 'two' is not of type 'integer'"),
        ("{}", "input: 'x' is a required property"),
    ],
)
def test_bad_input_is_refused_with_the_reason_and_writes_nothing(
    client: Client, world: World, payload: str, message: str
) -> None:
    world.graph("alpha", SCHEMA_SPEC)
    audit_before = AuditEntry.unscoped_all_tenants.count()
    response = logged_in(client, world, "operator").post(
        reverse("graphs:start_run", args=["alpha"]), {"payload": payload}
    )
    assert response.status_code == 400
    body = text(response)
    errors = re.search(
        r'<ul class="field-errors" role="alert" id="id_payload_error">(.*?)</ul>', body, re.S
    )
    assert errors is not None and message in errors[1]
    assert payload in body  # what was typed is kept for correction
    assert runs_of(world) == 0
    assert AuditEntry.unscoped_all_tenants.count() == audit_before


def test_a_viewer_cannot_start_a_run(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    logged_in(client, world, "viewer")
    page = text(client.get(reverse("graphs:detail", args=["alpha"])))
    assert 'name="payload"' not in page
    assert "Starting runs needs the operator role; you are viewer." in page
    response = client.post(reverse("graphs:start_run", args=["alpha"]), {"payload": "{}"})
    assert response.status_code == 403
    assert "This needs the operator role; you are viewer." in text(response)
    assert runs_of(world) == 0


def test_forms_need_a_csrf_token(world: World) -> None:
    world.graph("alpha", SPEC)
    client = sign_in(Client(enforce_csrf_checks=True), world.operator)
    response = client.post(reverse("graphs:start_run", args=["alpha"]), {"payload": "{}"})
    assert response.status_code == 403
    assert runs_of(world) == 0


def test_writes_refuse_get(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    logged_in(client, world, "owner")
    assert client.get(reverse("graphs:start_run", args=["alpha"])).status_code == 405
    assert client.get(reverse("graphs:new_version", args=["alpha"])).status_code == 405
    run = start(world, graph)
    assert client.get(reverse("runs:cancel", args=[run.id])).status_code == 405
    assert runs_of(world) == 1


# -- new versions ----------------------------------------------------------------------------


def test_an_invalid_spec_lists_every_error_and_saves_nothing(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    bad = json.loads(json.dumps(SPEC))
    bad["nodes"][1]["type"] = "transform.nope"
    bad["nodes"][2]["config"] = {}
    expected = [str(error) for error in validate_spec(bad)]
    assert len(expected) >= 2
    response = logged_in(client, world, "editor").post(
        reverse("graphs:new_version", args=["alpha"]),
        {"spec": json.dumps(bad), "note": "broken"},
    )
    assert response.status_code == 400
    body = text(response)
    alert = re.search(
        r'<div class="alert alert-error" role="alert" id="id_spec_error">(.*?)</div>', body, re.S
    )
    assert alert is not None
    listed = [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", alert[1], re.S)]
    assert listed == expected
    with tenant_context(world.acme):
        assert GraphVersion.objects.count() == 1
        assert StreamGraph.objects.get().deployed_version == GraphVersion.objects.get()


def test_spec_that_is_not_json_is_refused(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    response = logged_in(client, world, "editor").post(
        reverse("graphs:new_version", args=["alpha"]), {"spec": "{nodes: []}", "note": ""}
    )
    assert response.status_code == 400
    assert "The spec is not valid JSON: Expecting property name enclosed in double quotes" in text(
        response
    )
    with tenant_context(world.acme):
        assert GraphVersion.objects.count() == 1


def test_a_valid_spec_becomes_the_next_deployed_version(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    changed = json.loads(json.dumps(SPEC))
    changed["nodes"][1]["config"]["template"] = "x is {{ x }}"
    logged_in(client, world, "editor")
    response = client.post(
        reverse("graphs:new_version", args=["alpha"]),
        {"spec": json.dumps(changed), "note": "clearer text"},
        follow=True,
    )
    assert response.redirect_chain == [(reverse("graphs:detail", args=["alpha"]), 302)]
    body = text(response)
    assert "Version 2 saved and deployed" in body
    assert "v2 deployed" in body
    with tenant_context(world.acme):
        graph = StreamGraph.objects.get()
        assert graph.deployed_version is not None
        assert graph.deployed_version.number == 2
        assert graph.deployed_version.spec == changed
        assert graph.deployed_version.note == "clearer text"
        assert graph.deployed_version.created_by_id == world.editor.pk


def test_an_operator_cannot_add_a_version(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    logged_in(client, world, "operator")
    assert 'name="spec"' not in text(client.get(reverse("graphs:detail", args=["alpha"])))
    response = client.post(
        reverse("graphs:new_version", args=["alpha"]), {"spec": json.dumps(SPEC), "note": ""}
    )
    assert response.status_code == 403
    with tenant_context(world.acme):
        assert GraphVersion.objects.count() == 1


# -- the run page and cancel -------------------------------------------------------------------


def test_run_page_shows_an_active_run_its_steps_and_refreshes(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    run = start(world, graph, {"x": 7})
    response = logged_in(client, world, "viewer").get(reverse("runs:detail", args=[run.id]))
    assert response.status_code == 200
    body = text(response)
    assert '<meta http-equiv="refresh" content="2">' in body
    assert '<span class="badge badge-queued">queued</span>' in body
    step_rows = re.findall(r"<tr>\s*<td><code>(\w+)</code></td>\s*<td[^>]*>([\w.]+)</td>", body)
    assert step_rows == [("in", "source.manual")]
    assert "0/3" in body  # attempt / max_attempts
    assert '"x": 7' in body  # the input, pretty-printed
    assert "Cancel run" not in body  # a viewer


def test_run_page_after_completion_shows_outputs_results_and_usage(
    client: Client, world: World
) -> None:
    graph = world.graph("asker", LLM_SPEC)
    run = run_in_process(start(world, graph, {"q": "why"}))
    assert run.status == RunStatus.SUCCEEDED, run.error
    body = text(logged_in(client, world, "operator").get(reverse("runs:detail", args=[run.id])))
    assert 'http-equiv="refresh"' not in body
    assert "Cancel run" not in body
    assert body.count('<span class="badge badge-done">done</span>') == 3
    with tenant_context(world.acme):
        workers = set(Step.objects.filter(run=run).values_list("worker", flat=True))
    assert len(workers) == 1 and "" not in workers
    assert f'<td class="small">{workers.pop()}</td>' in body
    assert "<summary>Output</summary>" in body
    assert "Table <code>answers</code>" in body
    assert '"q": "why"' in body
    usage = re.search(
        r'<section class="panel" aria-labelledby="usage-title">(.*?)</section>', body, re.S
    )
    assert usage is not None
    with tenant_context(world.acme):
        tokens_out = sum(Usage.objects.filter(run=run).values_list("tokens_out", flat=True))
    assert tokens_out > 0
    assert f"<dt>Tokens out</dt><dd>{tokens_out}</dd>" in usage[1]
    assert "simulated engine" in usage[1]


def test_long_outputs_are_truncated(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    run = run_in_process(start(world, graph, {"x": "y" * 5000}))
    assert run.status == RunStatus.SUCCEEDED, run.error
    body = text(logged_in(client, world, "viewer").get(reverse("runs:detail", args=[run.id])))
    steps = re.search(
        r'<section aria-labelledby="steps-title" id="steps">(.*?)</section>', body, re.S
    )
    results = re.search(r'<section aria-labelledby="results-title">(.*)</section>', body, re.S)
    for section in (steps, results):
        assert section is not None
        assert "more characters)" in section[1]
        assert "y" * 5000 not in section[1]


def test_cancel_by_an_operator_stops_the_run(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    run = start(world, graph)
    logged_in(client, world, "operator")
    page = text(client.get(reverse("runs:detail", args=[run.id])))
    assert f'<form method="post" action="{reverse("runs:cancel", args=[run.id])}"' in page
    response = client.post(reverse("runs:cancel", args=[run.id]), follow=True)
    assert response.redirect_chain == [(reverse("runs:detail", args=[run.id]), 302)]
    body = text(response)
    assert "Run cancelled" in body
    assert '<span class="badge badge-cancelled">cancelled</span>' in body
    assert "cancelled by operator" in body
    with tenant_context(world.acme):
        run.refresh_from_db()
        assert run.status == RunStatus.CANCELLED
        assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {
            StepStatus.SKIPPED
        }

    again = client.post(reverse("runs:cancel", args=[run.id]), follow=True)
    assert "Run had already finished" in text(again)


def test_cancel_by_a_viewer_is_forbidden_and_changes_nothing(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    run = start(world, graph)
    response = logged_in(client, world, "viewer").post(reverse("runs:cancel", args=[run.id]))
    assert response.status_code == 403
    with tenant_context(world.acme):
        run.refresh_from_db()
        assert run.status == RunStatus.QUEUED
        assert list(Step.objects.filter(run=run).values_list("status", flat=True)) == [
            StepStatus.QUEUED
        ]


def test_steps_table_paginates_past_200(client: Client, world: World) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items", "max_items": 300}},
            {"id": "each", "type": "sink.table", "config": {"table": "items"}},
        ],
        "edges": [["in", "split"], ["split", "each"]],
    }
    graph = world.graph("many", spec)
    run = run_in_process(start(world, graph, {"items": list(range(250))}))
    assert run.status == RunStatus.SUCCEEDED, run.error
    logged_in(client, world, "viewer")
    first = text(client.get(reverse("runs:detail", args=[run.id])))
    second = text(client.get(reverse("runs:detail", args=[run.id]) + "?page=2"))
    assert first.count('<span class="badge badge-done">done</span>') == 200
    assert second.count('<span class="badge badge-done">done</span>') == 52
    assert "Page 1 of 2 · 252 in all" in first
    assert "252 done" in first
    assert "250 rows, first 100 shown" in first


# -- end to end on the real workers --------------------------------------------------------------


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_a_run_started_from_the_page_runs_on_the_workers(
    client: Client, world: World, platform: object
) -> None:
    world.graph("alpha", SPEC)
    response = logged_in(client, world, "operator").post(
        reverse("graphs:start_run", args=["alpha"]), {"payload": '{"x": "hello"}'}
    )
    assert response.status_code == 302
    with tenant_context(world.acme):
        run = Run.objects.get()
    assert wait_for_run(run).status == RunStatus.SUCCEEDED
    body = text(client.get(response["Location"]))
    assert '<span class="badge badge-succeeded">succeeded</span>' in body
    assert 'http-equiv="refresh"' not in body
    assert "Table <code>out</code>" in body
    assert body.count('<span class="badge badge-done">done</span>') == 3
