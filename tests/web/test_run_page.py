"""The run page as the live view uses it: the root element live.js reads, the htmx partials
(summary, graph, steps, results, a step's details with its lineage) that reload themselves,
who may see them, and the graph's layout. Runs are started through the service and, where a
test needs finished steps, driven in-process by the workers' own task; none needs a worker."""

import re
from html.parser import HTMLParser
from typing import Any
from uuid import UUID

import pytest
from django.test import Client
from django.urls import reverse

from apps.runs.graph_layout import NODE_HEIGHT, NODE_WIDTH, layers, layout
from apps.runs.models import Run, RunStatus, Step
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.web.test_pages import LLM_SPEC, SPEC, logged_in, run_in_process, sign_in, start, text

PARTIALS = {
    "summary": "runs:summary",
    "graph": "runs:graph",
    "steps": "runs:steps",
    "results": "runs:results",
}

FAILING_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        # Loopback is refused for a tenant that has not allowed it: a permanent error.
        {"id": "call", "type": "tool.http", "config": {"url": "http://127.0.0.1:9/never"}},
        {"id": "keep", "type": "sink.table", "config": {"table": "out"}},
    ],
    "edges": [["in", "call"], ["call", "keep"]],
}


class GraphDom(HTMLParser):
    """What the graph's DOM contract exposes: each `data-node` element's classes and state,
    and the numbers in its `data-count` elements."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.counts: dict[str, dict[str, int]] = {}
        self.classes: dict[str, set[str]] = {}
        self.states: dict[str, str] = {}
        self.node: str | None = None
        self.category: str | None = None
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("data-node") is not None:
            self.node = str(found["data-node"])
            self.counts[self.node] = {}
            self.classes[self.node] = set(str(found.get("class", "")).split())
            self.states[self.node] = str(found.get("data-state"))
        self.category = found.get("data-count")

    def handle_data(self, data: str) -> None:
        if self.category and self.node is not None:
            self.counts[self.node][self.category] = int(data)
            self.category = None


def zero(**counts: int) -> dict[str, int]:
    return {**dict.fromkeys(("queued", "running", "done", "failed", "skipped"), 0), **counts}


def step_of(run: Run, node_id: str) -> Step:
    with tenant_context(run.tenant):
        return Step.objects.get(run=run, node_id=node_id)


def partial_url(name: str, run: Run) -> str:
    if name == "runs:step":
        return reverse(name, args=[run.id, step_of(run, "in").id])
    return reverse(name, args=[run.id])


# -- the graph's layout ------------------------------------------------------------------------


def spec_of(edges: list[list[str]], *lonely: str) -> dict[str, Any]:
    ids = dict.fromkeys([node for edge in edges for node in edge[:2]] + list(lonely))
    return {"nodes": [{"id": i, "type": "t"} for i in ids], "edges": edges}


def test_a_diamond_is_laid_out_in_three_layers_from_its_source() -> None:
    spec = spec_of([["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]])
    assert layers(spec) == {"a": 0, "b": 1, "c": 1, "d": 2}
    drawn = layout(spec)
    at = {node.id: node for node in drawn.nodes}
    assert at["b"].x == at["c"].x > at["a"].x
    assert at["d"].x > at["b"].x
    assert abs(at["b"].y - at["c"].y) >= NODE_HEIGHT  # side by side, not on top of each other
    assert len(drawn.edges) == 4


def test_layers_follow_the_longest_path_and_every_source_is_in_layer_0() -> None:
    spec = spec_of([["a", "b"], ["b", "c"], ["a", "c"], ["x", "c"]], "alone")
    assert layers(spec) == {"a": 0, "b": 1, "c": 2, "x": 0, "alone": 0}


def test_edges_point_right_boxes_do_not_overlap_and_a_long_edge_goes_around() -> None:
    spec = spec_of([["a", "b"], ["b", "c"], ["c", "d"], ["a", "d", "late"], ["a", "e"]])
    drawn = layout(spec)
    at = {node.id: node for node in drawn.nodes}
    for edge in drawn.edges:
        assert at[edge.target].x > at[edge.source].x
    for one in drawn.nodes:
        assert one.x >= 0 and one.x + NODE_WIDTH <= drawn.width
        assert one.y >= 0 and one.y + NODE_HEIGHT <= drawn.height
        for other in drawn.nodes:
            if one is not other and one.x == other.x:
                assert abs(one.y - other.y) >= NODE_HEIGHT
    long_edge = next(edge for edge in drawn.edges if edge.port == "late")
    # It crosses columns b and c straight through a gap of their own, not behind a box.
    assert long_edge.path.count("H") == 2
    for middle in ("b", "c"):
        crossing = [float(y) for y in re.findall(r" (-?[\d.]+) H", long_edge.path)]
        box = at[middle]
        assert all(not (box.y <= y <= box.y + NODE_HEIGHT) for y in crossing)


# -- the page and its partials ----------------------------------------------------------------


def test_the_run_page_carries_what_live_js_needs(client: Client, world: World) -> None:
    run = start(world, world.graph("alpha", SPEC))
    body = text(logged_in(client, world, "viewer").get(reverse("runs:detail", args=[run.id])))
    assert (
        f'<div id="run-live" data-run-id="{run.id}" data-ws-url="/ws/runs/{run.id}/" '
        f'data-sse-url="/api/runs/{run.id}/events" '
        f'data-step-url="{reverse("runs:step", args=[run.id, UUID(int=0)])}" '
        f'data-status="queued" data-last-seq="0">'
    ) in body
    # Without JavaScript an active run's page still refreshes itself; with it, it does not.
    assert '<noscript><meta http-equiv="refresh" content="2"></noscript>' in body
    assert body.count('http-equiv="refresh"') == 1
    assert re.search(r'<script src="/static/vendor/htmx\.min\.js" defer></script>', body)
    assert re.search(r'<script src="/static/runs/live\.js" defer></script>', body)
    assert 'id="live-state"' in body and 'aria-live="polite"' in body
    assert '<div id="token-panels"></div>' in body
    assert "No step is streaming yet." in body
    assert re.search(r'<section id="step-failures-panel"[^>]* hidden>', body)
    assert '<ul id="step-failures"></ul>' in body
    assert '<div id="step-detail">' in body
    assert '<span id="run-status" data-status="queued">' in body
    for name in PARTIALS.values():
        url = reverse(name, args=[run.id]) + ("?page=1" if name == "runs:steps" else "")
        assert (
            f'hx-get="{url}" hx-trigger="sluice:refresh from:body" hx-swap="outerHTML"' in body
        ), name


@pytest.mark.parametrize("name", PARTIALS.values(), ids=PARTIALS.keys())
def test_each_partial_renders_alone_with_its_own_refresh(
    client: Client, world: World, name: str
) -> None:
    run = start(world, world.graph("alpha", SPEC))
    response = logged_in(client, world, "viewer").get(reverse(name, args=[run.id]))
    assert response.status_code == 200
    body = text(response)
    assert "<html" not in body  # a fragment
    assert body.startswith("<div id=")
    assert f'hx-get="{reverse(name, args=[run.id])}' in body
    assert 'hx-trigger="sluice:refresh from:body"' in body


def test_the_graph_counts_steps_per_node(client: Client, world: World) -> None:
    run = start(world, world.graph("alpha", SPEC))
    body = text(logged_in(client, world, "viewer").get(reverse("runs:graph", args=[run.id])))
    assert body.startswith('<div id="run-graph"')
    dom = GraphDom(body)
    assert dom.counts == {"in": zero(queued=1), "t": zero(), "s": zero()}
    assert dom.states == {"in": "queued", "t": "idle", "s": "idle"}
    assert body.count('<path class="graph-edge"') == 2
    assert body.count('marker-end="url(#graph-arrow)"') == 2

    finished = run_in_process(run)
    assert finished.status == RunStatus.SUCCEEDED, finished.error
    dom = GraphDom(text(client.get(reverse("runs:graph", args=[run.id]))))
    assert dom.counts == {node: zero(done=1) for node in ("in", "t", "s")}
    assert set(dom.states.values()) == {"done"}


def test_a_dead_step_shows_as_a_failure_on_its_node_and_in_the_summary(
    client: Client, world: World
) -> None:
    run = run_in_process(start(world, world.graph("broken", FAILING_SPEC)))
    assert run.status == RunStatus.FAILED
    logged_in(client, world, "viewer")
    dom = GraphDom(text(client.get(reverse("runs:graph", args=[run.id]))))
    assert dom.counts == {"in": zero(done=1), "call": zero(failed=1), "keep": zero()}
    assert "has-failed" in dom.classes["call"] and dom.states["call"] == "failed"
    assert "has-failed" not in dom.classes["in"]

    summary = text(client.get(reverse("runs:summary", args=[run.id])))
    assert '<span id="run-status" data-status="failed">' in summary
    assert '<span class="badge badge-failed">failed</span>' in summary
    assert "Dead steps (1)" in summary
    detail = text(client.get(reverse("runs:step", args=[run.id, step_of(run, "call").id])))
    assert "loopback" in detail and '<span class="badge badge-dead">dead</span>' in detail


def test_each_step_row_links_to_its_details_with_and_without_javascript(
    client: Client, world: World
) -> None:
    run = start(world, world.graph("alpha", SPEC))
    step = step_of(run, "in")
    response = logged_in(client, world, "viewer").get(
        reverse("runs:steps", args=[run.id]) + "?page=7"
    )
    body = text(response)
    assert f'hx-get="{reverse("runs:steps", args=[run.id])}?page=1"' in body  # the page served
    url = reverse("runs:step", args=[run.id, step.id])
    assert (
        f'<a class="step-link" id="step-link-{step.id}" href="{url}" hx-get="{url}" '
        f'hx-target="#step-detail" hx-swap="innerHTML" data-step="{step.id}">Details'
    ) in body


def test_step_details_are_a_fragment_for_htmx_and_a_page_for_a_plain_link(
    client: Client, world: World
) -> None:
    run = start(world, world.graph("alpha", SPEC))
    url = reverse("runs:step", args=[run.id, step_of(run, "in").id])
    logged_in(client, world, "viewer")
    fragment = client.get(url, headers={"HX-Request": "true"})
    page = client.get(url)
    for response in (fragment, page):
        assert response.status_code == 200
        assert "HX-Request" in response["Vary"]
        assert "The run's input" in text(response)
    assert "<html" not in text(fragment) and '<h3 id="step-detail-heading"' in text(fragment)
    assert "<html" in text(page) and '<h2 id="step-detail-heading"' in text(page)
    assert f'href="{reverse("runs:detail", args=[run.id])}"' in text(page)  # back to the run


def test_step_details_trace_lineage_both_ways(client: Client, world: World) -> None:
    run = run_in_process(start(world, world.graph("alpha", SPEC), {"x": "hi"}))
    assert run.status == RunStatus.SUCCEEDED, run.error
    source, middle, sink = (step_of(run, node) for node in ("in", "t", "s"))
    logged_in(client, world, "viewer")

    def detail(step: Step) -> str:
        url = reverse("runs:step", args=[run.id, step.id])
        return text(client.get(url, headers={"HX-Request": "true"}))

    def link_to(step: Step) -> str:
        return f'hx-get="{reverse("runs:step", args=[run.id, step.id])}"'

    body = detail(middle)
    inputs, outputs = body.split("Outputs (")
    assert "Inputs (1)" in inputs and "From step" in inputs
    assert re.search(link_to(source) + r"[^>]*>in</a>", inputs)
    assert outputs.startswith("1)") and "taken by" in outputs
    assert re.search(link_to(sink) + r"[^>]*>s</a>", outputs)
    assert "<dt>Attempts</dt><dd>1/3</dd>" in body
    assert "The run's input" in detail(source)
    assert link_to(middle) in detail(source).split("Outputs (")[1]
    assert "no step took it" in detail(sink).split("Outputs (")[1]


def test_step_details_list_usage_per_attempt(client: Client, world: World) -> None:
    run = run_in_process(start(world, world.graph("asker", LLM_SPEC), {"q": "why"}))
    assert run.status == RunStatus.SUCCEEDED, run.error
    ask = step_of(run, "ask")
    body = text(
        logged_in(client, world, "viewer").get(
            reverse("runs:step", args=[run.id, ask.id]), headers={"HX-Request": "true"}
        )
    )
    rows = re.search(r'<table class="table compact usage-rows">.*?<tbody>(.*?)</tbody>', body, re.S)
    assert rows is not None and rows[1].count("<tr>") == 1
    assert f'<td class="num">{ask.tokens_out}</td>' in rows[1]
    assert f"<dt>Model</dt><dd>{ask.model}</dd>" in body
    assert f"<dt>Tokens</dt><dd>{ask.tokens_in} in / {ask.tokens_out} out</dd>" in body
    assert "<dt>Stop latency</dt>" in body and "<dt>Wasted tokens</dt><dd>0</dd>" in body


# -- who may see them ---------------------------------------------------------------------------

ALL = {**PARTIALS, "step": "runs:step"}


@pytest.mark.parametrize("name", ALL.values(), ids=ALL.keys())
def test_another_tenants_run_is_not_found(client: Client, world: World, name: str) -> None:
    run = start(world, world.graph("secret", SPEC))
    response = sign_in(client, world.outsider).get(partial_url(name, run))
    assert response.status_code == 404
    assert "secret" not in response.content.decode().lower()


@pytest.mark.parametrize("name", ALL.values(), ids=ALL.keys())
def test_signed_out_visitors_are_sent_to_login(client: Client, world: World, name: str) -> None:
    url = partial_url(name, start(world, world.graph("alpha", SPEC)))
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


def test_a_step_of_another_run_is_not_found(client: Client, world: World) -> None:
    graph = world.graph("alpha", SPEC)
    mine, other = start(world, graph), start(world, graph)
    logged_in(client, world, "owner")
    theirs = step_of(other, "in")
    assert client.get(reverse("runs:step", args=[other.id, theirs.id])).status_code == 200
    assert client.get(reverse("runs:step", args=[mine.id, theirs.id])).status_code == 404
