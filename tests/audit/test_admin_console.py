"""The admin as platform staff's read-only audit console: any staff user may look at every
tenant's operational records, nobody may change them there, and the pages are filterable,
linked, escaped and free of per-row queries."""

import re
from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.apps import apps
from django.contrib import admin
from django.db import connection
from django.db.models import Model, Sum
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.audit.services import record
from apps.live.models import PruneCursor, PrunedFeed, RunFrame
from apps.runs.models import Effect, Event, Run, Step, Usage
from apps.tenants.admin_base import ReadOnlyAdmin
from apps.tenants.api_keys import create_api_key
from apps.tenants.keys import RUNS_READ
from apps.tenants.models import ApiKey
from apps.tenants.services import invite_member
from tests.audit.helpers import add_row, add_usage, cells, make_run, staff_client
from tests.conftest import World

pytestmark = pytest.mark.django_db

CONSOLE_APPS = ["audit", "graphs", "runs", "live", "tenants"]


def read_only_models() -> list[type[Model]]:
    return [
        model
        for label in CONSOLE_APPS
        for model in apps.get_app_config(label).get_models()
        if isinstance(admin.site._registry.get(model), ReadOnlyAdmin)
    ]


def admin_url(model: type[Model], view: str = "changelist", *args: object) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def some_records(world: World) -> tuple[Run, Step]:
    run, step = make_run(world, world.acme, {"n": 1})
    add_usage(run, step)
    add_row(run, step, {"n": 1})
    other, other_step = make_run(world, world.globex, {"n": 2})
    add_usage(other, other_step, model="big", engine="vllm")
    return run, step


# Fan-in rows need a fan-out run, relay rows a stream deployment's step before a window;
# their pages are covered by their changelists only.
WITHOUT_ROWS_HERE = {"FanIn", "FanInArrival", "StreamRelay"}


def test_staff_without_permissions_can_view_every_read_only_page(world: World) -> None:
    some_records(world)
    key, _ = create_api_key(tenant=world.globex, name="ci", scopes=[RUNS_READ], actor="test")
    run = Run.unscoped_all_tenants.first()
    assert run is not None
    body = '{"type":"run","status":"running","seq":1}'
    RunFrame.unscoped_all_tenants.create(tenant=run.tenant, run=run, seq=1, kind="run", body=body)
    PrunedFeed.unscoped_all_tenants.create(
        tenant=run.tenant, run=run, last_seq=1, pruned_at=timezone.now()
    )
    PruneCursor.unscoped_all_tenants.create(
        tenant=run.tenant, run_id=run.id, finished_at=timezone.now()
    )
    invite_member(
        tenant=world.acme, email="new@example.com", role="viewer", base_url="http://x/",
        actor=world.owner,
    )  # fmt: skip
    client = staff_client()
    models = read_only_models()
    assert {AuditEntry, Run, Step, Event, Effect, Usage} <= set(models)
    index = client.get("/admin/").content.decode()
    assert "Audit entries" in index and "Usages" not in index and "Usage" in index
    without_rows = set()
    for model in models:
        assert client.get(admin_url(model)).status_code == 200, model
        row = model.unscoped_all_tenants.first()  # type: ignore[attr-defined]
        if row is None:
            without_rows.add(model.__name__)
        else:
            assert client.get(admin_url(model, "change", row.pk)).status_code == 200, model
    # Only these detail pages go unopened here: the fixture makes none of their rows.
    assert without_rows == WITHOUT_ROWS_HERE
    assert key.hashed_secret not in client.get(admin_url(ApiKey, "change", key.pk)).content.decode()
    # both tenants' rows are listed
    page = client.get(admin_url(Run)).content.decode()
    assert set(cells(page, "tenant")) == {"Acme", "Globex"}


def test_a_tenant_owner_who_is_not_staff_is_sent_to_the_admin_login(world: World) -> None:
    _, step = some_records(world)
    client = Client()
    client.force_login(world.owner)  # type: ignore[arg-type]
    for url in (admin_url(Step), admin_url(Step, "change", step.pk), admin_url(AuditEntry)):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/?next=")


def test_adding_changing_and_deleting_are_refused_and_change_nothing(world: World) -> None:
    run, step = some_records(world)
    client = staff_client()
    entry = AuditEntry.unscoped_all_tenants.filter(tenant=world.acme).first()
    usage = Usage.unscoped_all_tenants.get(run=run)
    effect = Effect.unscoped_all_tenants.get(step=step)
    counts = {m: m.unscoped_all_tenants.count() for m in (AuditEntry, Usage, Step, Effect, Run)}
    for model, pk in [
        (AuditEntry, entry.pk if entry else None),
        (Usage, usage.pk),
        (Step, step.pk),
        (Effect, effect.pk),
        (Run, run.pk),
    ]:
        assert client.post(admin_url(model, "add"), {"action": "x"}).status_code == 403, model
        change = client.post(admin_url(model, "change", pk), {"status": "done", "kind": "x"})
        assert change.status_code == 403, model
        delete = client.post(admin_url(model, "delete", pk), {"post": "yes"})
        assert delete.status_code == 403, model
        # no bulk actions are offered, so the changelist's delete action does nothing
        selected = {"action": "delete_selected", "_selected_action": [pk], "post": "yes"}
        client.post(admin_url(model), selected)
        assert model.unscoped_all_tenants.filter(pk=pk).exists(), model
    assert counts == {
        m: m.unscoped_all_tenants.count() for m in (AuditEntry, Usage, Step, Effect, Run)
    }
    step.refresh_from_db()
    effect.refresh_from_db()
    assert step.status == "queued" and effect.kind == "sink.table"


def audit_rows(client: Client, query: str) -> list[str]:
    page = client.get(f"{admin_url(AuditEntry)}?{query}").content.decode()
    return cells(page, "target_id")


def test_audit_entries_filter_by_tenant_actor_action_date_and_search(world: World) -> None:
    record(
        tenant=world.acme,
        actor=world.owner,
        action="secret.rotate",
        target_type="secret",
        target_id="t-rotate",
    )
    record(
        tenant=world.globex,
        actor=world.outsider,
        action="key.revoke",
        target_type="api_key",
        target_id="t-revoke",
    )
    long_ago = timezone.now() - timedelta(days=10)
    with mock.patch("django.utils.timezone.now", return_value=long_ago):
        record(
            tenant=world.acme,
            actor="system",
            action="run.expire",
            target_type="run",
            target_id="t-old",
        )
    client = staff_client()

    globex_only = audit_rows(client, f"tenant__id__exact={world.globex.pk}")
    assert "t-revoke" in globex_only and not {"t-rotate", "t-old"} & set(globex_only)
    assert all(
        tenant == "Globex"
        for tenant in cells(
            client.get(
                f"{admin_url(AuditEntry)}?tenant__id__exact={world.globex.pk}"
            ).content.decode(),
            "tenant",
        )
    )
    assert audit_rows(client, "actor_label=outsider") == ["t-revoke"]
    assert audit_rows(client, "action=secret.rotate") == ["t-rotate"]
    assert audit_rows(client, "q=t-old") == ["t-old"]

    week = audit_rows(client, "recent=7d")
    assert "t-rotate" in week and "t-revoke" in week and "t-old" not in week
    assert "t-old" not in audit_rows(client, "recent=today")
    assert "t-old" in audit_rows(client, "recent=30d")
    local = timezone.localtime(long_ago)
    day = f"at__year={local.year}&at__month={local.month}&at__day={local.day}"
    assert audit_rows(client, day) == ["t-old"]

    page = client.get(admin_url(AuditEntry)).content.decode()
    assert 'href="?actor_label=outsider"' in page  # the actor filter offers the labels
    assert "Past 7 days" in page


def test_the_audit_detail_shows_a_diff_and_escapes_values(world: World) -> None:
    entry = record(
        tenant=world.acme,
        actor=world.owner,
        action="tenant.change",
        target_type="tenant",
        target_id=world.acme.pk,
        before={"budget": "10", "name": "<script>alert(1)</script>", "same": [1, 2]},
        after={"budget": "20", "same": [1, 2], "note": {"html": "<b>bold</b>"}},
    )
    client = staff_client()
    page = client.get(admin_url(AuditEntry, "change", entry.pk)).content.decode()
    row = (
        r'<tr class="sluice-diff-(\w+)"><td>(.*?)</td><td>\w+</td>'
        r"<td><code>(.*?)</code></td><td><code>(.*?)</code></td></tr>"
    )
    rows = re.findall(row, page)
    assert rows == [
        ("changed", "budget", "&quot;10&quot;", "&quot;20&quot;"),
        ("removed", "name", "&quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;", ""),
        ("added", "note", "", "{&quot;html&quot;:&quot;&lt;b&gt;bold&lt;/b&gt;&quot;}"),
        ("unchanged", "same", "[1,2]", "[1,2]"),
    ]
    assert "<script>alert(1)</script>" not in page and "<b>bold</b>" not in page

    listing = client.get(f"{admin_url(AuditEntry)}?action=tenant.change").content.decode()
    assert cells(listing, "changes") == ["~budget -name +note"]


def usage_totals(client: Client, query: str) -> dict[str, str]:
    page = client.get(f"{admin_url(Usage)}?{query}").content.decode()
    table = re.search(r'<table id="usage-totals".*?</table>', page, re.S)
    assert table is not None, page
    heads = re.findall(r"<th>(.*?)</th>", table.group(0))
    values = re.findall(r"<td>(.*?)</td>", table.group(0))
    return dict(zip(heads, values, strict=True))


def test_usage_totals_match_the_rows_the_filter_selects(world: World) -> None:
    run, step = make_run(world, world.acme, {"n": 1})
    add_usage(run, step, tokens=(10, 20, 0), seconds=0.25, cost="0.000100")
    add_usage(run, step, model="big", tokens=(5, 7, 3), seconds=1.5, cost="0.002000")
    other, other_step = make_run(world, world.globex, {"n": 2})
    add_usage(other, other_step, model="big", engine="vllm", tokens=(100, 1, 0), cost="1.5")
    client = staff_client()

    usage = Usage.unscoped_all_tenants
    for query, rows in [
        (f"tenant__id__exact={world.acme.pk}", usage.filter(tenant=world.acme)),
        ("model=big", usage.filter(model="big")),
        ("engine=vllm", usage.filter(engine="vllm")),
        ("", usage.all()),
    ]:
        sums = rows.aggregate(
            tokens_in=Sum("tokens_in"),
            tokens_out=Sum("tokens_out"),
            wasted=Sum("wasted_tokens"),
            seconds=Sum("engine_seconds"),
            cost=Sum("cost_usd"),
        )
        totals = usage_totals(client, query)
        assert totals["rows"] == str(rows.count()), query
        assert totals["tokens in"] == str(sums["tokens_in"]), query
        assert totals["tokens out"] == str(sums["tokens_out"]), query
        assert totals["wasted tokens"] == str(sums["wasted"]), query
        assert totals["engine seconds"] == f"{sums['seconds']:.3f}", query
        assert Decimal(totals["cost (USD)"]) == sums["cost"], query
    assert usage_totals(client, f"tenant__id__exact={world.acme.pk}")["tokens in"] == "15"
    assert usage_totals(client, "model=nothing")["rows"] == "0"


def test_a_run_links_to_its_own_steps_events_usage_and_effects(world: World) -> None:
    run, step = some_records(world)
    make_run(world, world.acme, {"n": 3})  # another run: the filtered lists must leave it out
    client = staff_client()
    page = client.get(admin_url(Run, "change", run.pk)).content.decode()
    for model, lookup in [
        (Step, "run__id__exact"),
        (Event, "run__id__exact"),
        (Usage, "run__id__exact"),
        (Effect, "step__run__id__exact"),
    ]:
        url = f"{admin_url(model)}?{lookup}={run.pk}"
        assert f'href="{url}"' in page, model
        listing = client.get(url)
        assert listing.status_code == 200, model
        shown = listing.context["cl"].result_list
        assert len(shown) == 1 and all(row.tenant_id == world.acme.pk for row in shown), model
    steps = client.get(f"{admin_url(Step)}?run__id__exact={run.pk}").content.decode()
    assert cells(steps, "run_link") == [f"run {str(run.pk)[:8]}"]
    effect = Effect.unscoped_all_tenants.get(step=step)
    detail = client.get(admin_url(Effect, "change", effect.pk)).content.decode()
    assert f'href="{admin_url(Step, "change", step.pk)}"' in detail
    assert effect.request_digest in detail and "&quot;row_id&quot;" in detail


def changelist_queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200, url
    return len(queries)


def test_changelists_do_not_query_per_row(world: World) -> None:
    def add_runs(count: int, start: int) -> None:
        for n in range(start, start + count):
            tenant = world.acme if n % 2 else world.globex
            run, step = make_run(world, tenant, {"n": n})
            add_usage(run, step, model=f"m{n % 3}")
            add_row(run, step, {"n": n})
            record(
                tenant=tenant,
                actor=world.owner,
                action="test.touch",
                target_type="run",
                target_id=run.pk,
                before={"n": n},
                after={"n": n + 1},
            )

    client = staff_client()
    urls = [admin_url(model) for model in read_only_models()]
    add_runs(3, 0)
    few = {url: changelist_queries(client, url) for url in urls}
    add_runs(20, 3)
    many = {url: changelist_queries(client, url) for url in urls}
    assert many == few, {url: (few[url], many[url]) for url in urls if few[url] != many[url]}
    assert Step.unscoped_all_tenants.count() >= 23
