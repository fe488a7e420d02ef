"""Every page that takes a slug or an id answers 404 to a member of another tenant, exactly as
it does for something that does not exist, and changes nothing."""

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.graphs.models import GraphVersion
from apps.runs.models import Run, RunStatus, Step, StepStatus
from tests.conftest import World
from tests.web.test_pages import SPEC, sign_in, start


@dataclass(frozen=True)
class Target:
    method: str
    name: str
    by: str  # "slug" or "run"
    data: dict[str, Any]


# Each write carries valid data, so that a missing tenant check would show as a write.
TARGETS = {
    "graph detail": Target("get", "graphs:detail", "slug", {}),
    "start run": Target("post", "graphs:start_run", "slug", {"payload": '{"x": 2}'}),
    "new version": Target(
        "post", "graphs:new_version", "slug", {"spec": json.dumps(SPEC), "note": "theirs now"}
    ),
    "run page": Target("get", "runs:detail", "run", {}),
    "cancel run": Target("post", "runs:cancel", "run", {}),
}


@pytest.fixture
def acme_run(world: World) -> Run:
    return start(world, world.graph("secret", SPEC))


def snapshot(run: Run) -> dict[str, object]:
    return {
        "runs": Run.unscoped_all_tenants.count(),
        "run status": Run.unscoped_all_tenants.get(id=run.id).status,
        "steps": sorted(Step.unscoped_all_tenants.values_list("status", flat=True)),
        "versions": GraphVersion.unscoped_all_tenants.count(),
        "audit": AuditEntry.unscoped_all_tenants.count(),
    }


def request(client: Client, target: Target, slug: str, run_id: uuid.UUID) -> Any:
    arg = slug if target.by == "slug" else run_id
    url = reverse(target.name, args=[arg])
    return getattr(client, target.method)(url, target.data)


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_another_tenants_objects_are_not_found_and_untouched(
    client: Client, world: World, acme_run: Run, target: Target
) -> None:
    before = snapshot(acme_run)
    sign_in(client, world.outsider)
    response = request(client, target, "secret", acme_run.id)
    assert response.status_code == 404
    assert "Secret" not in response.content.decode()
    assert snapshot(acme_run) == before
    assert before["run status"] == RunStatus.QUEUED


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_missing_objects_look_the_same_as_another_tenants(
    client: Client, world: World, acme_run: Run, target: Target
) -> None:
    before = snapshot(acme_run)
    sign_in(client, world.owner)
    response = request(client, target, "no-such-graph", uuid.uuid4())
    assert response.status_code == 404
    assert snapshot(acme_run) == before


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_the_owner_reaches_the_same_urls(
    client: Client, world: World, acme_run: Run, target: Target
) -> None:
    """The control for the two tests above: the same requests succeed in the right tenant."""
    sign_in(client, world.owner)
    response = request(client, target, "secret", acme_run.id)
    assert response.status_code == (200 if target.method == "get" else 302)


def test_the_same_slug_in_two_tenants_shows_each_their_own(client: Client, world: World) -> None:
    world.graph("shared", SPEC)
    theirs = json.loads(json.dumps(SPEC))
    theirs["nodes"][1]["id"] = "globex_only_node"
    theirs["edges"] = [["in", "globex_only_node"], ["globex_only_node", "s"]]
    world.graph("shared", theirs, tenant=world.globex)

    sign_in(client, world.owner)
    assert (
        "globex_only_node"
        not in client.get(reverse("graphs:detail", args=["shared"])).content.decode()
    )
    sign_in(client, world.outsider)
    assert (
        "globex_only_node" in client.get(reverse("graphs:detail", args=["shared"])).content.decode()
    )

    response = client.post(reverse("graphs:start_run", args=["shared"]), {"payload": "{}"})
    assert response.status_code == 302
    run = Run.unscoped_all_tenants.get()
    assert run.tenant_id == world.globex.pk
    assert Step.unscoped_all_tenants.get().status == StepStatus.QUEUED


def test_graph_list_of_the_outsider_shows_only_globex(client: Client, world: World) -> None:
    world.graph("acme-graph", SPEC)
    world.graph("globex-graph", SPEC, tenant=world.globex)
    sign_in(client, world.outsider)
    body = client.get(reverse("graphs:list")).content.decode()
    assert "Globex-Graph" in body
    assert "Acme-Graph" not in body


@pytest.mark.parametrize("url_name", ["graphs:list", "graphs:detail"])
def test_a_user_with_no_membership_gets_404(client: Client, world: World, url_name: str) -> None:
    world.graph("secret", SPEC)
    loner = get_user_model().objects.create_user("loner", password="pw-loner")
    sign_in(client, loner)
    args = ["secret"] if url_name == "graphs:detail" else []
    response = client.get(reverse(url_name, args=args))
    assert response.status_code == 404
    assert "You are not a member of any tenant yet" in response.content.decode()
    assert "Secret" not in response.content.decode()
