"""The providers page: flow control's state per model from the real Redis, the member's own
tenant's waiting steps beside it, the figures' polling partial, who may see it; and the run
page's step details showing how a step was routed and why it waits. Runs are started through
the service and only their source step is run here, so their llm step stays queued on its
model's queue (no worker takes it: on_commit messages do not leave the test transaction)."""

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.urls import reverse

from apps.graphs.models import StreamGraph
from apps.runs.models import Run, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from sluice.tasks import execute_step
from tests.conftest import World
from tests.web.test_pages import LLM_SPEC, logged_in, sign_in, text
from workers.flow.config import FlowConfig
from workers.flow.state import Outcome, Permit, acquire, release
from workers.inference.registry import platform_models

PAGE = reverse("runs:providers")
FIGURES = reverse("runs:provider-figures")


@pytest.fixture
def flow_model() -> Iterator[tuple[str, FlowConfig]]:
    """A flow-controlled model of its own (and provider), beside the built-in simulated ones."""
    name = f"pv-{uuid.uuid4().hex[:8]}"
    flow = {"provider": f"prov-{name}", "max_concurrency": 4, "rpm": 60, "breaker_failures": 2}
    with override_settings(SLUICE_MODELS={name: {"engine": "simulated", "flow": flow}}):
        platform_models.cache_clear()
        config = platform_models()[name].flow
        assert config is not None
        yield name, config
    platform_models.cache_clear()


def take(model: str, config: FlowConfig) -> Permit:
    got = acquire(model, config, uuid.uuid4().hex, 10, retry=False)
    assert isinstance(got, Permit), got
    return got


def row_of(body: str, model: str) -> str:
    found = re.search(rf'<tr data-model="{re.escape(model)}">(.*?)</tr>', body, re.S)
    assert found is not None, f"no row for {model}"
    return found[1]


def figure(row: str, name: str) -> str:
    found = re.search(rf'data-figure="{name}">([^<]*)<', row)
    assert found is not None, f"no {name} figure"
    return found[1].strip()


def queued_llm_step(world: World, tenant: Tenant, graph: StreamGraph) -> Step:
    """A run whose source step ran here: its llm step waits on gpu.default."""
    version = graph.deployed_version
    assert version is not None
    with tenant_context(tenant):
        run: Run = start_run(version=version, payload={"q": "why"}, actor=world.owner)
        source = Step.objects.get(run=run, node_id="in")
    execute_step.apply(args=(tenant.id, str(source.id)), throw=True)
    with tenant_context(tenant):
        return Step.objects.get(run=run, node_id="ask", status=StepStatus.QUEUED)


def set_fields(step: Step, **fields: Any) -> None:
    with tenant_context(step.tenant):
        Step.objects.filter(id=step.id).update(**fields)


def test_the_page_lists_every_model_with_its_flow_state(
    client: Client, world: World, flow_model: tuple[str, FlowConfig]
) -> None:
    name, config = flow_model
    held = take(name, config)
    release(config, take(name, config), Outcome("failed"))  # one failure: the limit halves
    body = text(logged_in(client, world, "viewer").get(PAGE))

    assert "<h1>Providers</h1>" in body
    assert f"Provider <code>{config.provider}</code>" in body
    row = row_of(body, name)
    assert figure(row, "concurrency") == "1 / 2"  # the held permit, of the halved limit
    assert "limit moves 1 to 4" in row
    assert 58 <= float(figure(row, "rpm")) <= 59  # two requests taken from 60
    assert 'data-breaker="closed">closed<' in row
    assert "1 failure in a row (opens at 2)" in row
    assert figure(row, "retries-left") == "5 retries left"
    assert figure(row, "waiting") == "0"
    # The built-in simulated models are listed too, as not flow-controlled.
    plain = body[body.index("Not flow-controlled</h2>") :]
    assert '<tr data-model="default">' in plain and '<tr data-model="small">' in plain
    assert "No model is flow-controlled" not in body
    # The page polls its figures; without JavaScript it refreshes itself.
    assert f'hx-get="{FIGURES}" hx-trigger="every 3s"' in body
    assert '<noscript><meta http-equiv="refresh" content="3"></noscript>' in body
    assert f'<a href="{PAGE}" aria-current="page">Providers</a>' in body
    assert f'<a href="{reverse("graphs:list")}" aria-current="page">' not in body

    release(config, held, Outcome("failed"))  # the second failure in a row opens it
    fragment = text(client.get(FIGURES, headers={"HX-Request": "true"}))
    assert fragment.startswith('<div id="provider-figures"') and "<h1>" not in fragment
    row = row_of(fragment, name)
    assert 'data-breaker="open">open<' in row and "a probe in" in row
    assert figure(row, "concurrency") == "0 / 2"  # one cut per burst of failures


def test_with_no_flow_controlled_model_the_page_says_how_to_get_one(
    client: Client, world: World
) -> None:
    body = text(logged_in(client, world, "viewer").get(PAGE))
    assert "No model is flow-controlled" in body
    assert "None of Acme's steps is waiting for a model." in body
    assert '<tr data-model="default">' in body


@pytest.mark.parametrize("url", [PAGE, FIGURES])
def test_anonymous_visitors_are_sent_to_login(client: Client, world: World, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"
    polled = client.get(url, headers={"HX-Request": "true"})
    assert polled["HX-Redirect"] == f"{reverse('login')}?next={url}"


def test_each_tenant_sees_only_its_own_waiting_steps(client: Client, world: World) -> None:
    acme_graph = world.graph("asker", LLM_SPEC)
    globex_graph = world.graph("asker", LLM_SPEC, tenant=world.globex)
    first = queued_llm_step(world, world.acme, acme_graph)
    queued_llm_step(world, world.acme, acme_graph)
    queued_llm_step(world, world.globex, globex_graph)
    set_fields(first, waiting="waiting: default is at its concurrency limit of 2")

    acme = text(logged_in(client, world, "viewer").get(PAGE))
    assert figure(row_of(acme, "default"), "waiting") == "2"
    assert "1 sent back by flow control" in row_of(acme, "default")
    assert "<strong>2</strong> steps of Acme wait in a model's queue" in acme
    assert "<strong>1</strong> of them was sent back by flow control" in acme

    client.logout()
    globex = text(sign_in(client, world.outsider).get(PAGE))
    assert figure(row_of(globex, "default"), "waiting") == "1"
    assert "sent back by flow control" not in row_of(globex, "default")
    assert "<strong>1</strong> step of Globex waits in a model's queue" in globex
    assert "none was sent back by flow control" in globex
    assert "Acme" not in globex


def test_a_user_in_no_tenant_gets_a_404(client: Client, world: World) -> None:
    lonely = get_user_model().objects.create_user("lonely", password="pw-lonely")
    assert sign_in(client, lonely).get(PAGE).status_code == 404


def test_step_details_show_the_model_route_waiting_reason_and_priority(
    client: Client, world: World
) -> None:
    graph = world.graph("asker", LLM_SPEC)
    step = queued_llm_step(world, world.acme, graph)
    route = "served by small (fallback); default passed over: default's circuit breaker is open"
    waiting = "waiting: small is at its RPM limit of 60; next room in 0.8 s"
    set_fields(step, model="small", route=route, waiting=waiting, priority=2)
    logged_in(client, world, "viewer")

    details = text(
        client.get(
            reverse("runs:step", args=[step.run_id, step.id]), headers={"HX-Request": "true"}
        )
    )
    detail = text(client.get(reverse("runs:step", args=[step.run_id, step.id])))
    for body in (details, detail):
        assert "<dt>Model</dt><dd>small</dd>" in body
        assert f'<dt>Route</dt><dd class="step-route">{route}</dd>' in body
        assert f"until a model can take it: {waiting}</p>" in body
        assert "<dt>Priority</dt><dd>high</dd>" in body

    page = text(client.get(reverse("runs:detail", args=[step.run_id])))
    assert f'<p class="muted small">{waiting}</p>' in page
    assert f"Model small ({route})" in page

    set_fields(step, route="", waiting="", priority=1)
    plain = text(client.get(reverse("runs:step", args=[step.run_id, step.id])))
    assert "<dt>Route</dt>" not in plain and "until a model can take it" not in plain
    assert "<dt>Priority</dt>" not in plain
