"""Event time and keyed state on the deployment page and in the API: each partition's
watermark (and how far behind the clock) and late events; per window or memory node the open
windows (keys held), late events and the oldest open window's end, read with one aggregate
query; what a redeploy would drop, shown before it is confirmed; another tenant's deployment
is a 404 for all of it, and bad version numbers are a 400 or a 404, never a 500.

No Kafka runs: deployments are made through apps.streams.services (deploying only checks
that KAFKA_BOOTSTRAP_SERVERS is set), and the partition offsets and keyed state a Kafka
worker's checkpoint would write are made directly."""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.graphs.services import add_version
from apps.streams.access import PartitionRow, datetime_of_ms
from apps.streams.models import Deployment, KeyedState, PartitionOffset
from apps.tenants.context import tenant_context
from apps.tenants.keys import RUNS_READ, RUNS_WRITE
from tests.api.helpers import key_client
from tests.conftest import World
from tests.streams.test_deployment_api import problem
from tests.streams.test_deployment_pages import (
    actions,
    body,
    deployed,
    kafka_spec,
    signed_in,
    state,
    url,
    webhook_spec,
)
from tests.web.test_pages import sign_in

pytestmark = pytest.mark.django_db

T0 = 1_700_000_000_000  # epoch ms: 2023-11-14 22:13:20 UTC


@pytest.fixture(autouse=True)
def kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")


def stateful_spec(
    tenant_slug: str = "acme", *, size_s: int = 60, with_sessions: bool = True
) -> dict[str, Any]:
    """kafka -> a tumbling window (and a session window) -> table; kafka -> two memory nodes
    sharing the store "chat"."""
    nodes: list[dict[str, Any]] = [
        {"id": "orders", "type": "source.kafka", "config": {"topics": [f"{tenant_slug}.orders"]}},
        {"id": "per_min", "type": "window.tumbling", "config": {"size_s": size_s}},
        {"id": "remember", "type": "memory", "config": {"op": "append", "store": "chat"}},
        {"id": "recall", "type": "memory", "config": {"op": "read", "store": "chat"}},
        {"id": "keep", "type": "sink.table", "config": {"table": "orders"}},
    ]
    edges = [["orders", "per_min"], ["per_min", "keep"], ["orders", "remember"]]
    edges.append(["remember", "recall"])
    if with_sessions:
        nodes.insert(2, {"id": "visits", "type": "window.session", "config": {"gap_s": 30}})
        edges.append(["orders", "visits"])
    return {"nodes": nodes, "edges": edges}


def partition(
    deployment: Deployment, number: int, *, watermark_ms: int | None, late: dict[str, Any]
) -> None:
    with tenant_context(deployment.tenant):
        PartitionOffset.objects.create(
            tenant=deployment.tenant,
            deployment=deployment,
            topic="acme.orders",
            partition=number,
            next_offset=10,
            high_watermark=10,
            watermark_ms=watermark_ms,
            late=late,
        )


def window(deployment: Deployment, owner: str, part: int, key: str, start_ms: int) -> None:
    """An open window as a checkpoint keeps it."""
    value = {"start": start_ms, "end": start_ms + 60_000, "count": 2, "acc": None}
    keyed(deployment, owner, part, key, str(start_ms), value)


def keyed(
    deployment: Deployment, owner: str, part: int, key: str, slot: str, value: dict[str, Any]
) -> None:
    with tenant_context(deployment.tenant):
        KeyedState.objects.create(
            tenant=deployment.tenant,
            deployment=deployment,
            owner=owner,
            partition=f"acme.orders:{part}",
            key=key,
            slot=slot,
            value=value,
        )


def stateful(world: World, slug: str = "orders") -> Deployment:
    """A deployment whose workers have been at it: partition 0's watermark 12 s behind the
    clock with 3 late events for per_min and 1 for visits; partition 1 without a record yet;
    per_min holds 3 open windows, visits 1, the store "chat" 2 keys."""
    deployment = deployed(world, slug, stateful_spec())
    now_ms = int(timezone.now().timestamp() * 1000)
    partition(deployment, 0, watermark_ms=now_ms - 12_000, late={"per_min": 3, "visits": 1})
    partition(deployment, 1, watermark_ms=None, late={})
    window(deployment, "per_min", 0, "a", T0)
    window(deployment, "per_min", 0, "b", T0 + 60_000)
    window(deployment, "per_min", 1, "a", T0 - 60_000)  # the oldest: it ends at T0
    window(deployment, "visits", 0, "a", T0 + 5_000)
    for key in ("u1", "u2"):
        keyed(deployment, "store:chat", 0, key, "", {"items": [1], "expires": T0 + 10**9})
    return deployment


def cells(row: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td.*?</td>", row, re.S)]


def row_of(page: str, attribute: str, value: str) -> str:
    found = re.search(rf'<tr {attribute}="{re.escape(value)}">(.*?)</tr>', page, re.S)
    assert found is not None, value
    return found[1]


def preview_url(deployment: Deployment, version: str) -> str:
    return f"{url('redeploy', deployment)}?version={version}"


def api_path(deployment: Deployment, tail: str) -> str:
    return f"/api/deployments/{deployment.pk}/{tail}"


# -- the page -----------------------------------------------------------------------------


def test_the_partitions_show_their_watermark_and_late_events(world: World) -> None:
    deployment = stateful(world)

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    busy = cells(row_of(page, "data-partition", "acme.orders:0"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 1[234] s behind", busy[8]), busy[8]
    assert busy[9] == "4"  # 3 + 1, every window node's late events
    assert 'title="per_min: 3, visits: 1"' in row_of(page, "data-partition", "acme.orders:0")
    quiet = cells(row_of(page, "data-partition", "acme.orders:1"))
    assert quiet[8:10] == ["—", "0"]


def test_the_watermark_is_shown_in_utc_and_measured_against_the_clock(world: World) -> None:
    deployment = deployed(world, "orders", stateful_spec())
    partition(deployment, 0, watermark_ms=T0, late={})

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    assert '<time datetime="2023-11-14T22:13:20+00:00">2023-11-14 22:13:20</time>' in page
    assert re.search(r"</time> <span class=\"muted small\">\d+ d behind</span>", page)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(12.4, "12 s behind"), (119, "119 s behind"), (180, "3 min behind"),
     (3 * 3600, "3 h behind"), (5 * 86_400, "5 d behind"), (-2, "2 s ahead")],
)  # fmt: skip
def test_how_far_behind_reads_in_a_fitting_unit(seconds: float, text: str) -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    row = PartitionRow(
        "t", 0, 0, 0, 0, 0, 0, 0.0, at, True, at, timedelta(seconds=seconds), {}
    )  # fmt: skip
    assert row.behind == text


def test_a_watermark_no_datetime_holds_reads_as_none() -> None:
    assert datetime_of_ms(2**62) is None and datetime_of_ms(None) is None
    assert datetime_of_ms(T0) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_the_page_lists_each_stateful_node_with_what_it_holds(world: World) -> None:
    deployment = stateful(world)

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    assert "Windows and state" in page and 'id="no-state"' not in page
    assert cells(row_of(page, "data-node", "per_min")) == [
        "per_min", "window.tumbling", "3", "3", "2023-11-14 22:13:20",
    ]  # fmt: skip
    assert cells(row_of(page, "data-node", "visits")) == [
        "visits", "window.session", "1", "1", "2023-11-14 22:14:25",
    ]  # fmt: skip
    remember = cells(row_of(page, "data-node", "remember"))
    assert remember == ["remember store chat, shared with recall", "memory", "2", "—", "—"]
    assert cells(row_of(page, "data-node", "recall"))[2] == "2"  # the same store's keys
    # In the spec's order, and the source and sink are not stateful.
    order = [page.index(f'data-node="{n}"') for n in ("per_min", "visits", "remember", "recall")]
    assert order == sorted(order)
    assert 'data-node="keep"' not in page.split('id="state-nodes"')[1].split("</table>")[0]


def test_the_polled_partial_carries_the_state_too(world: World) -> None:
    deployment = stateful(world)

    page = body(signed_in(world, "viewer").get(url("status", deployment)))

    assert page.lstrip().startswith('<div id="deployment-status"')
    assert cells(row_of(page, "data-node", "per_min"))[2] == "3"


def test_the_state_is_counted_in_one_query_however_many_nodes(world: World) -> None:
    deployment = stateful(world)
    client = signed_in(world, "viewer")

    with CaptureQueriesContext(connection) as queries:
        assert client.get(url("detail", deployment)).status_code == 200

    state_queries = [q["sql"] for q in queries if '"streams_keyedstate"' in q["sql"]]
    assert len(state_queries) == 1
    assert "GROUP BY" in state_queries[0]


def test_a_version_without_windows_or_memory_says_so(world: World) -> None:
    deployment = deployed(world, "plain", kafka_spec())

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    assert 'id="no-state"' in page
    assert "This version keeps no state between records" in page
    assert 'id="state-nodes"' not in page


def test_a_webhook_deployment_has_no_state_section(world: World) -> None:
    deployment = deployed(world, "hooked", webhook_spec())

    page = body(signed_in(world, "viewer").get(url("detail", deployment)))

    assert "Windows and state" not in page


def test_odd_values_in_state_and_late_counts_do_not_break_the_page(world: World) -> None:
    deployment = deployed(world, "orders", stateful_spec())
    partition(deployment, 0, watermark_ms=2**62, late={"per_min": "x", "visits": True, "q": 2})
    keyed(deployment, "per_min", 0, "a", "1", {"start": 1, "end": "soon"})
    keyed(deployment, "per_min", 0, "b", "2", {"start": 2, "end": 1.5e12})
    keyed(deployment, "visits", 0, "a", "3", {"start": 3, "end": 10**30})

    response = signed_in(world, "viewer").get(url("detail", deployment))

    assert response.status_code == 200
    page = body(response)
    assert cells(row_of(page, "data-partition", "acme.orders:0"))[8:10] == ["—", "2"]
    assert cells(row_of(page, "data-node", "per_min"))[2:] == ["2", "0", "—"]
    assert cells(row_of(page, "data-node", "visits"))[2:] == ["1", "0", "—"]


# -- redeploying: what it drops, before it is confirmed ------------------------------------


def with_versions(world: World) -> Deployment:
    """v1 deployed with state; v2 changes per_min's size and removes visits; v3 only adds a
    node, so it keeps all the state."""
    deployment = stateful(world)
    with tenant_context(world.acme):
        add_version(
            graph=deployment.graph,
            spec=stateful_spec(size_s=120, with_sessions=False),
            actor=world.owner,
        )
        kept = stateful_spec()
        kept["nodes"].append({"id": "also", "type": "sink.table", "config": {"table": "also"}})
        kept["edges"].append(["orders", "also"])
        add_version(graph=deployment.graph, spec=kept, actor=world.owner)
    return deployment


def held(deployment: Deployment) -> dict[str, int]:
    rows = KeyedState.unscoped_all_tenants.filter(deployment=deployment)
    found: dict[str, int] = {}
    for owner in rows.values_list("owner", flat=True):
        found[owner] = found.get(owner, 0) + 1
    return found


CONFIRM_2 = {"version": "2", "confirm": "1", "from_version": "1"}


def test_the_preview_says_what_a_redeploy_drops(world: World) -> None:
    deployment = with_versions(world)

    response = signed_in(world, "operator").get(preview_url(deployment, "2"))

    assert response.status_code == 200
    page = body(response)
    assert "Redeploying to v2 drops the state of:" in page
    assert "window 'per_min' (config changed, 3 open windows)" in page
    assert "window 'visits' (removed, 1 open window)" in page
    assert "memory store 'chat'" not in page  # its nodes stay as they are
    form = re.search(r'<div id="redeploy-preview">.*?</div>\s*</section>', page, re.S)
    assert form is not None
    assert 'name="csrfmiddlewaretoken"' in form[0]
    assert '<input type="hidden" name="version" value="2">' in form[0]
    assert '<input type="hidden" name="confirm" value="1">' in form[0]
    assert '<input type="hidden" name="from_version" value="1">' in form[0]
    assert "Redeploy v2 and drop that state</button>" in form[0]
    assert f'href="{url("detail", deployment)}" class="button">Cancel' in form[0]
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}  # nothing moved
    assert actions(deployment).count("deployment.redeploy") == 0


def test_a_redeploy_that_would_drop_state_asks_first(world: World) -> None:
    deployment = with_versions(world)
    operator = signed_in(world, "operator")

    asked = operator.post(url("redeploy", deployment), {"version": "2"})

    assert asked.status_code == 302
    assert asked["Location"] == preview_url(deployment, "2") + "#redeploy"
    assert Deployment.unscoped_all_tenants.get(pk=deployment.pk).version.number == 1
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}

    done = body(operator.post(url("redeploy", deployment), CONFIRM_2, follow=True))

    assert "Version 2 deployed." in done
    assert Deployment.unscoped_all_tenants.get(pk=deployment.pk).version.number == 2
    assert held(deployment) == {"store:chat": 2}
    assert actions(deployment).count("deployment.redeploy") == 1


def test_a_confirmation_shown_before_another_redeploy_asks_again(world: World) -> None:
    deployment = with_versions(world)
    operator = signed_in(world, "operator")
    # Shown while v1 was deployed; meanwhile someone moved the deployment to v3.
    assert "Version 3 deployed." in body(
        operator.post(url("redeploy", deployment), {"version": "3"}, follow=True)
    )

    asked = operator.post(url("redeploy", deployment), CONFIRM_2)

    assert asked.status_code == 302
    assert asked["Location"] == preview_url(deployment, "2") + "#redeploy"
    assert Deployment.unscoped_all_tenants.get(pk=deployment.pk).version.number == 3
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}
    page = body(operator.get(asked["Location"]))
    assert '<input type="hidden" name="from_version" value="3">' in page


def test_a_redeploy_that_keeps_the_state_needs_no_confirmation(world: World) -> None:
    deployment = with_versions(world)
    operator = signed_in(world, "operator")

    preview = body(operator.get(preview_url(deployment, "3")))
    assert "Redeploying to v3 keeps all the state" in preview
    assert "Redeploy v3</button>" in preview

    done = body(operator.post(url("redeploy", deployment), {"version": "3"}, follow=True))

    assert "Version 3 deployed." in done
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}


def test_the_preview_of_the_deployed_version_offers_nothing(world: World) -> None:
    deployment = with_versions(world)

    page = body(signed_in(world, "operator").get(preview_url(deployment, "1")))

    assert "Version 1 is already deployed here." in page
    assert 'name="confirm"' not in page


def test_a_viewer_sees_the_preview_but_no_confirm_button(world: World) -> None:
    deployment = with_versions(world)
    viewer = signed_in(world, "viewer")

    page = body(viewer.get(preview_url(deployment, "2")))

    assert "window 'per_min' (config changed, 3 open windows)" in page
    assert 'name="confirm"' not in page
    refused = viewer.post(url("redeploy", deployment), CONFIRM_2)
    assert refused.status_code == 403
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}


def test_the_confirmation_needs_a_csrf_token(world: World) -> None:
    deployment = with_versions(world)
    strict = sign_in(Client(enforce_csrf_checks=True), world.owner)

    refused = strict.post(url("redeploy", deployment), CONFIRM_2)

    assert refused.status_code == 403
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}


BAD_VERSIONS = ["abc", "-1", "0", "9", "1\x00", "\x00", "\u00b2", "9" * 5000, "1" * 20, ""]


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_bad_version_to_preview_is_a_404(world: World, version: str) -> None:
    deployment = with_versions(world)

    response = signed_in(world, "operator").get(url("redeploy", deployment), {"version": version})

    assert response.status_code == 404


def test_a_preview_without_a_version_is_a_404(world: World) -> None:
    deployment = with_versions(world)

    assert signed_in(world, "operator").get(url("redeploy", deployment)).status_code == 404


def test_another_graphs_version_number_is_not_this_graphs(world: World) -> None:
    deployment = with_versions(world)
    other = world.graph("other", stateful_spec())
    with tenant_context(world.acme):
        for _ in range(4):
            add_version(graph=other, spec=stateful_spec(size_s=30), actor=world.owner)

    response = signed_in(world, "operator").get(preview_url(deployment, "5"))

    assert response.status_code == 404


# -- the API ------------------------------------------------------------------------------


def test_the_deployment_has_each_partitions_watermark_and_late_events(world: World) -> None:
    deployment = stateful(world)

    data = key_client(world, [RUNS_READ]).get(api_path(deployment, "")).json()

    busy, quiet = data["partitions"]
    watermark = datetime.fromisoformat(busy["watermark"])
    assert watermark.utcoffset() == timedelta(0)
    assert 11 <= (timezone.now() - watermark).total_seconds() <= 14
    assert busy["late"] == {"per_min": 3, "visits": 1}
    assert quiet["watermark"] is None and quiet["late"] == {}


def test_the_state_endpoint_lists_each_owner(world: World) -> None:
    deployment = stateful(world)

    response = key_client(world, [RUNS_READ]).get(api_path(deployment, "state/"))

    assert response.status_code == 200
    assert response.json() == {
        "version": 1,
        "owners": [
            {
                "owner": "per_min",
                "nodes": ["per_min"],
                "type": "window.tumbling",
                "open_entries": 3,
                "late": 3,
                "oldest_end": "2023-11-14T22:13:20Z",
            },
            {
                "owner": "visits",
                "nodes": ["visits"],
                "type": "window.session",
                "open_entries": 1,
                "late": 1,
                "oldest_end": "2023-11-14T22:14:25Z",
            },
            {
                "owner": "store:chat",
                "nodes": ["remember", "recall"],
                "type": "memory",
                "open_entries": 2,
                "late": 0,
                "oldest_end": None,
            },
        ],
    }


def test_a_version_without_state_has_no_owners(world: World) -> None:
    deployment = deployed(world, "plain", kafka_spec())

    response = key_client(world, [RUNS_READ]).get(api_path(deployment, "state/"))

    assert response.json() == {"version": 1, "owners": []}


def test_the_preview_endpoint_returns_what_would_be_dropped(world: World) -> None:
    deployment = with_versions(world)
    client = key_client(world, [RUNS_READ])

    dropping = client.get(api_path(deployment, "state/preview/"), version="2")
    keeping = client.get(api_path(deployment, "state/preview/"), version="3")

    assert dropping.status_code == 200
    assert dropping.json() == {
        "version": 2,
        "drops": [
            {"owner": "per_min", "nodes": ["per_min"], "entries": 3, "reason": "config changed"},
            {"owner": "visits", "nodes": ["visits"], "entries": 1, "reason": "removed"},
        ],
    }
    assert keeping.json() == {"version": 3, "drops": []}
    assert held(deployment) == {"per_min": 3, "visits": 1, "store:chat": 2}


def test_the_preview_without_a_trailing_slash_is_redirected_there(world: World) -> None:
    deployment = with_versions(world)

    response = key_client(world, [RUNS_READ]).get(
        api_path(deployment, "state/preview"), version="2"
    )

    assert response.status_code == 301
    assert response["Location"].endswith(api_path(deployment, "state/preview/?version=2"))


@pytest.mark.parametrize(
    "version", ["abc", "-1", "0", "1\x00", "\x00", "\u00b2", "9" * 5000, str(2**31), "1.5", ""]
)
def test_a_bad_version_to_the_preview_endpoint_is_a_400(world: World, version: str) -> None:
    deployment = with_versions(world)

    response = key_client(world, [RUNS_READ]).get(
        api_path(deployment, "state/preview/"), version=version
    )

    found = problem(response, 400)
    assert [e["field"] for e in found["errors"]] == ["version"]


def test_a_version_the_graph_lacks_is_a_400_naming_it(world: World) -> None:
    deployment = with_versions(world)
    client = key_client(world, [RUNS_READ])

    missing = problem(client.get(api_path(deployment, "state/preview/"), version="9"), 400)
    absent = problem(client.get(api_path(deployment, "state/preview/")), 400)

    assert missing["errors"] == [{"field": "version", "message": "the graph has no version 9"}]
    assert [e["field"] for e in absent["errors"]] == ["version"]


def test_the_state_endpoints_need_runs_read(world: World) -> None:
    deployment = with_versions(world)
    writer_only = key_client(world, [RUNS_WRITE])

    for tail in ("state/", "state/preview/?version=2"):
        assert RUNS_READ in problem(writer_only.get(api_path(deployment, tail)), 403)["detail"]
    assert key_client(world, [RUNS_READ]).get(api_path(deployment, "state/")).status_code == 200


def test_a_viewer_reads_the_state_through_the_session(world: World) -> None:
    deployment = with_versions(world)
    viewer = sign_in(Client(), world.viewer)

    assert viewer.get(api_path(deployment, "state/")).status_code == 200
    assert viewer.get(api_path(deployment, "state/preview/?version=2")).status_code == 200


# -- another tenant's ---------------------------------------------------------------------


def globex_stateful(world: World) -> Deployment:
    """Globex's deployment, with state and a second version that would drop it."""
    theirs = deployed(world, "secret-stream", stateful_spec("globex"), tenant=world.globex)
    now_ms = int(timezone.now().timestamp() * 1000)
    partition(theirs, 0, watermark_ms=now_ms, late={"per_min": 7})
    window(theirs, "per_min", 0, "secret-key", T0)
    with tenant_context(world.globex):
        add_version(
            graph=theirs.graph,
            spec=stateful_spec("globex", size_s=120, with_sessions=False),
            actor=world.outsider,
        )
    return theirs


PAGE_TARGETS = ["detail", "status", "preview", "preview-bad", "confirm"]


@pytest.mark.parametrize("target", PAGE_TARGETS)
def test_another_tenants_state_is_not_found_on_the_pages(world: World, target: str) -> None:
    theirs = globex_stateful(world)
    stateful(world, "mine")
    before = (state(), held(theirs))
    client = signed_in(world, "owner")  # acme's owner

    if target == "confirm":
        response = client.post(url("redeploy", theirs), CONFIRM_2)
    elif target.startswith("preview"):
        response = client.get(preview_url(theirs, "2" if target == "preview" else "abc"))
    else:
        response = client.get(url(target, theirs))

    assert response.status_code == 404
    page = body(response)
    assert "secret-key" not in page and "Secret-Stream" not in page and "per_min" not in page
    assert (state(), held(theirs)) == before


@pytest.mark.parametrize(
    "tail", ["", "state/", "state/preview/?version=2", "state/preview/?version=abc"]
)
def test_another_tenants_state_is_not_found_in_the_api(world: World, tail: str) -> None:
    theirs = globex_stateful(world)
    stateful(world, "mine")
    before = held(theirs)

    response = key_client(world).get(api_path(theirs, tail))  # acme's key, every scope

    found = problem(response, 404)
    assert str(theirs.pk) not in found["detail"]
    assert "secret-key" not in response.content.decode()
    assert held(theirs) == before


def test_each_tenant_sees_only_its_own_state(world: World) -> None:
    theirs = globex_stateful(world)
    mine = stateful(world, "mine")

    acme = key_client(world, [RUNS_READ]).get(api_path(mine, "state/")).json()
    page = body(signed_in(world, "owner").get(url("detail", mine)))

    assert [o["open_entries"] for o in acme["owners"]] == [3, 1, 2]  # not 4: globex's is theirs
    assert cells(row_of(page, "data-node", "per_min"))[2:4] == ["3", "3"]
    outsider_page = body(signed_in(world, "outsider").get(url("detail", theirs)))
    assert cells(row_of(outsider_page, "data-node", "per_min"))[2:4] == ["1", "7"]


def test_the_schema_documents_the_state_endpoints(db: None) -> None:
    response = Client().get("/api/schema/", headers={"accept": "application/json"})

    paths = response.json()["paths"]
    assert "/api/deployments/{deployment_id}/state/" in paths
    preview = paths["/api/deployments/{deployment_id}/state/preview/"]["get"]
    assert any(p["name"] == "version" and p["required"] for p in preview["parameters"])


def test_the_admin_lists_keyed_state_read_only(world: World) -> None:
    deployment = stateful(world)
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = sign_in(Client(), staff)

    listed = client.get("/admin/streams/keyedstate/")
    offsets = client.get("/admin/streams/partitionoffset/")

    assert listed.status_code == 200 and "per_min" in body(listed)
    assert offsets.status_code == 200
    entry = KeyedState.unscoped_all_tenants.filter(deployment=deployment).first()
    assert entry is not None
    assert client.get(f"/admin/streams/keyedstate/{entry.pk}/change/").status_code == 200
    assert client.post(f"/admin/streams/keyedstate/{entry.pk}/delete/").status_code == 403
    assert reverse("admin:streams_keyedstate_changelist") in body(
        client.get(f"/admin/streams/deployment/{deployment.pk}/change/")
    )
