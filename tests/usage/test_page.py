"""The usage page: for members only, a period chosen by `days` (bad values are a 400 that
says what is allowed), totals, SVG charts with accessible names and data tables, the empty
state, the budget bar, and only the member's own tenant's usage."""

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.conftest import World
from tests.usage.helpers import add_usage, graph_with_run, noon
from tests.web.test_pages import logged_in, sign_in, text

pytestmark = pytest.mark.django_db

URL = reverse("usage:overview")


def today() -> datetime:
    return noon(timezone.now().astimezone(UTC).date())


def test_login_is_required(client: Client, world: World) -> None:
    response = client.get(URL)
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    loner = get_user_model().objects.create_user("loner", password="pw-loner")
    assert sign_in(client, loner).get(URL).status_code == 404


@pytest.mark.parametrize("role", ["owner", "editor", "operator", "viewer"])
def test_every_member_sees_the_empty_state(client: Client, world: World, role: str) -> None:
    response = logged_in(client, world, role).get(URL)
    assert response.status_code == 200
    body = text(response)
    assert "No usage in the last 30 days. Runs that call models show up here." in body
    assert "<svg" not in body
    assert 'href="/static/usage/usage.css"' in body
    assert re.search(r'<a href="\?days=30" aria-current="page">Last 30 days</a>', body)


def test_totals_charts_and_tables(client: Client, world: World) -> None:
    run = graph_with_run(world, "summarize")
    add_usage(run, today(), tokens_in=1200, tokens_out=34, wasted=4, seconds=2, cost="1.5")
    add_usage(run, today() - timedelta(days=3), tokens_in=5, cost="0.25")
    body = text(logged_in(client, world, "viewer").get(URL, {"days": "7"}))
    assert "No usage in" not in body
    assert re.search(r'<a href="\?days=7" aria-current="page">', body)
    for total in ("1,205", "34", "4", "2.0 s", "$1.75"):
        assert f"<dd>{total}</dd>" in body
    # Six charts (three per day, three per graph), each an image with a title.
    assert body.count('<svg class="bar-chart"') == 6
    assert body.count('role="img"') == 6
    assert '<title id="day-tokens-title">Tokens per day, last 7 days: 1,239 in all;' in body
    assert "Cost per graph, last 7 days" in body
    # Seven days of bars per per-day chart (zeros included), one per graph in the others.
    day_chart = body.split('id="day-tokens-title"')[1].split("</svg>")[0]
    assert day_chart.count('<rect class="chart-bar"') == 7
    assert day_chart.count('height="0.0"') == 5
    # The tables: every day of the period, and the graph linked.
    per_day = body.split("Per-day figures as a table")[1].split("</table>")[0]
    assert per_day.count('<tr><th scope="row">') == 7
    assert reverse("graphs:detail", args=["summarize"]) in body
    assert "$1.50" in body and "$0.25" in body


def test_only_the_members_own_tenant_is_shown(client: Client, world: World) -> None:
    add_usage(graph_with_run(world, "ours"), today(), tokens_in=11, cost="0.11")
    add_usage(
        graph_with_run(world, "theirs", tenant=world.globex), today(), tokens_in=999, cost="9"
    )
    body = text(logged_in(client, world, "owner").get(URL))
    assert "<dd>11</dd>" in body and "999" not in body and "Theirs" not in body
    outsider = text(sign_in(client, world.outsider).get(URL))
    assert "<dd>999</dd>" in outsider and "Ours" not in outsider


@pytest.mark.parametrize("days", ["14", "abc", "-1", "0"])
def test_a_bad_period_is_a_400_that_says_what_is_allowed(
    client: Client, world: World, days: str
) -> None:
    response = logged_in(client, world, "owner").get(URL, {"days": days})
    assert response.status_code == 400
    body = text(response)
    assert f"days must be one of 7, 30, 90; got '{days}'" in body
    assert 'href="?days=90"' in body  # and the periods to choose from


def test_usage_older_than_the_period_is_left_out(client: Client, world: World) -> None:
    add_usage(graph_with_run(world, "old"), today() - timedelta(days=10), tokens_in=42)
    owner = logged_in(client, world, "owner")
    assert "No usage in the last 7 days." in text(owner.get(URL, {"days": "7"}))
    assert "<dd>42</dd>" in text(owner.get(URL, {"days": "30"}))


def test_the_budget_bar_shows_this_months_spend(client: Client, world: World) -> None:
    run = graph_with_run(world, "spend")
    now = timezone.now().astimezone(UTC)
    add_usage(run, now, cost="5")
    add_usage(run, now.replace(day=1) - timedelta(days=1), cost="100")  # last month
    owner = logged_in(client, world, "owner")
    body = text(owner.get(URL))
    assert "No monthly budget is set for Acme" in body and "<progress" not in body
    assert "<strong>$5.00</strong> spent in" in body
    world.acme.monthly_budget_usd = Decimal(20)
    world.acme.save(update_fields=["monthly_budget_usd"])
    body = text(owner.get(URL))
    assert "<strong>$5.00</strong> of the $20.00 monthly budget" in body and ": 25%." in body
    assert re.search(r'<progress class="budget-bar" max="100" value="25.0"', body)
    world.acme.monthly_budget_usd = Decimal(4)
    world.acme.save(update_fields=["monthly_budget_usd"])
    body = text(owner.get(URL))
    assert 'class="budget-bar is-over" max="100" value="100.0"' in body
    assert "The budget is spent" in body
